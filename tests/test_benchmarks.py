"""The peer benchmarks (benchmarks/bench_model.py, bench_train_step.py and their helpers in
benchmarks/common.py) at a tiny size: both models really agree, the reported ratios and stage
breakdowns add up, the JSON has the documented keys, and a model whose
weights differ stops the comparison.

The tiny pair is transformers' Mask2Former with a ResNet-18 (timm) backbone, 32 channels, 10 queries,
5 classes, 3 decoder layers and 1 encoder layer, converted to m2f as the full-size models are.
"""

import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_model
import bench_train_step
import common

from m2f import testing

TINY = {"feature_size": 32, "mask_feature_size": 32, "hidden_dim": 32, "num_attention_heads": 4,
        "encoder_feedforward_dim": 64, "dim_feedforward": 64, "num_queries": 10, "num_labels": 5,
        "decoder_layers": 4, "encoder_layers": 1, "train_num_points": 256}
SIZE = (64, 96)
INFERENCE_STAGES = {"other", "backbone", "pixel_decoder", "deformable_attention", "transformer_decoder",
                    "postprocess"}


@pytest.fixture(scope="module")
def inference_row():
    # Two timed runs: the median of two is their mean, so stage medians must add up to the total's.
    return bench_model.compare("r18", size=SIZE, warmup=1, repeats=2, keep=4, fields=TINY, memory=False)


@pytest.fixture(scope="module")
def train_row():
    return bench_train_step.compare(backbone="r18", size=64, batch=2, warmup=0, repeats=2, fields=TINY,
                                    memory=False)


def test_inference_outputs_agree_and_ratios_match_medians(inference_row):
    row = inference_row
    assert row["deform_impl"] == "cpu"
    agreement = row["agreement"]
    assert agreement["prediction_sets"] == 4  # 3 decoder layers + the learnable queries' prediction
    assert agreement["mask_logits_max_abs_diff"] < 1e-3 and agreement["queries_within_tolerance"] == 1.0
    assert agreement["class_logits_max_abs_diff"] < 1e-3
    assert agreement["mask_logits_abs_max"] > 10 * agreement["mask_logits_max_abs_diff"]
    assert agreement["m2f_segments"] >= 1  # the threshold keeps queries, so post-processing has work
    for name in ("m2f", "transformers"):
        r = row[name]
        assert r["runs"] == 2 and r["min_ms"] <= r["median_ms"] <= r["max_ms"]
        assert r["images_per_s"] == pytest.approx(1e3 / r["median_ms"])
        assert set(r["stages_ms"]) == INFERENCE_STAGES
        parts = sum(v for k, v in r["stages_ms"].items() if k != "deformable_attention")
        assert parts == pytest.approx(r["median_ms"], rel=1e-6)
        assert 0 < r["stages_ms"]["deformable_attention"] <= r["stages_ms"]["pixel_decoder"]
    assert row["speedup"] == pytest.approx(row["transformers"]["median_ms"] / row["m2f"]["median_ms"])
    profile = row["m2f"]["profile"]  # the compiled kernel really ran (it is a profiled operator)
    assert 0 < profile["group_shares"]["deformable_kernel"] < profile["group_shares"]["dense"] < 1
    assert sum(op["share"] for op in profile["operators"]) <= 1 + 1e-6


def test_inference_report_has_the_documented_keys(inference_row, tmp_path):
    meta = {**common.machine_info("cpu", 2), "repeats": 2, "warmup": 1, "load_average_end": [0.0, 0.0, 0.0]}
    assert len(meta["load_average_start"]) == 3
    report = {"meta": meta, "rows": [inference_row]}
    json_path, md_path = common.write_report(tmp_path, "model_cpu", report, bench_model.markdown(report))
    loaded = json.loads(json_path.read_text())
    assert {"backbone", "size", "batch", "precision", "compile", "deform_impl", "panoptic_threshold", "agreement",
            "m2f", "transformers", "speedup"} <= set(loaded["rows"][0])
    text = md_path.read_text()
    assert "| r18 | 64x96 | fp32 |" in text and "Next speed-up:" in text
    assert f"**{inference_row['speedup']:.2f}x**" in text


def test_panoptic_threshold_keeps_the_asked_number_of_queries():
    logits = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    scores, labels = logits.softmax(-1).max(-1)
    for keep in (1, 5, 20):
        threshold = bench_model.panoptic_threshold(logits, keep)
        assert int(((scores > threshold) & (labels != 7)).sum()) == keep


def test_inference_stops_when_the_weights_differ(monkeypatch):
    def perturbed_pair(*args, **kwargs):
        theirs, ours = testing.model_pair(*args, **kwargs)
        with torch.no_grad():
            ours.transformer_decoder.mask_embed.layers[-1].bias.add_(0.5)
        return theirs, ours

    monkeypatch.setattr(bench_model, "model_pair", perturbed_pair)
    with pytest.raises(testing.AgreementError, match="disagree"):
        bench_model.compare("r18", size=SIZE, warmup=0, repeats=1, keep=4, fields=TINY, memory=False)


def test_train_step_cases_agree_and_add_up(train_row):
    row = train_row
    assert row["agreement"]["mask_logits_max_abs_diff"] < 1e-3 and row["agreement"]["prediction_sets"] == 4
    assert row["num_points"] == 256
    for name in bench_train_step.CASES:
        r = row[name]
        assert r["images_per_s"] == pytest.approx(2e3 / r["median_ms"])
        assert torch.isfinite(torch.tensor(r["loss"])) and r["loss"] > 0
        stages = r["stages_ms"]
        assert set(stages) == {*bench_train_step.STAGES, "deformable_attention"}
        assert sum(stages[s] for s in bench_train_step.STAGES) == pytest.approx(r["median_ms"], rel=1e-6)
        assert stages["matcher"] > 0 and stages["backward"] > 0 and stages["optimizer"] > 0
    for name, ratio in row["ratios"].items():
        assert ratio["time"] == pytest.approx(row["transformers"]["median_ms"] / row[name]["median_ms"])
    profile = row["m2f point loss"]["profile"]
    assert 0 < profile["group_shares"]["deformable_kernel"] < 1
    assert any(name.endswith("Backward") for name in profile["group_operators"]["deformable_kernel"])
    text = bench_train_step.markdown({"meta": {**common.machine_info("cpu", 2), "repeats": 2, "warmup": 1,
                                               "load_average_end": [0, 0, 0]}, "rows": [row]})
    assert "| m2f full-mask loss |" in text and "Next speed-up:" in text


def synthetic_outputs(sets: int = 10, queries: int = 100):
    """m2f-style and transformers-style outputs holding the same random logits (|mask logits| ~15)."""
    g = torch.Generator().manual_seed(0)
    masks = [5 * torch.randn(1, queries, 8, 8, generator=g) for _ in range(sets)]
    logits = [torch.randn(1, queries, 6, generator=g) for _ in range(sets)]
    ours = [{"pred_masks": m.clone(), "pred_logits": c.clone()} for m, c in zip(masks, logits)]
    theirs = SimpleNamespace(masks_queries_logits=masks[-1], class_queries_logits=logits[-1],
                             auxiliary_logits=[{"masks_queries_logits": m, "class_queries_logits": c}
                                               for m, c in zip(masks[:-1], logits[:-1])])
    return {**ours[-1], "aux_outputs": ours[:-1]}, theirs


def test_agreement_gate_tolerates_one_flipped_query_not_a_real_difference():
    ours, theirs = synthetic_outputs()
    stats = common.logit_agreement(ours, theirs)
    assert stats["mask_logits_max_abs_diff"] == 0 and stats["prediction_sets"] == 10
    common.check_agreement(stats, "identical")
    ours["aux_outputs"][6]["pred_masks"][0, 3] += 6e-3  # one query of one later set, as a flipped pixel gives
    stats = common.logit_agreement(ours, theirs)
    assert stats["queries_within_tolerance"] == pytest.approx(999 / 1000)
    common.check_agreement(stats, "one flipped query")
    ours["pred_masks"] += 2e-3  # every query of the final set as well: 101 of the 1000 pairs
    with pytest.raises(testing.AgreementError, match=r"89\.9% of the"):
        common.check_agreement(common.logit_agreement(ours, theirs), "offset final set")
    ours, theirs = synthetic_outputs()
    ours["aux_outputs"][2]["pred_masks"][0, 0, 0, 0] += 1.0  # one query, but far beyond rounding
    with pytest.raises(testing.AgreementError, match="max"):
        common.check_agreement(common.logit_agreement(ours, theirs), "one wrong query")


class Sleep(nn.Module):
    def __init__(self, seconds: float, inner: nn.Module | None = None):
        super().__init__()
        self.seconds, self.inner = seconds, inner

    def forward(self, x):
        time.sleep(self.seconds)
        return self.inner(x) if self.inner is not None else x


def test_stage_timer_sums_calls_and_counts_nesting_once():
    inner = Sleep(0.02)
    outer = Sleep(0.01, inner)
    timer = common.StageTimer(stages={"outer": [outer], "inner": [inner], "both": [outer, inner], "manual": []})
    with timer:
        outer(0)
        inner(0)
        with timer.measure("manual"):
            time.sleep(0.01)
    assert timer.totals["inner"] == pytest.approx(0.04, abs=0.015)
    assert timer.totals["outer"] == pytest.approx(0.03, abs=0.015)
    assert timer.totals["both"] == pytest.approx(0.05, abs=0.015)  # outer's inner call is not added again
    assert timer.totals["manual"] == pytest.approx(0.01, abs=0.01)
    outer(0)  # hooks are gone after the with block
    assert timer.totals["outer"] == pytest.approx(0.03, abs=0.015)


def test_alternate_takes_turns_and_drops_warmups():
    calls = []
    result = common.alternate({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                              warmup=1, repeats=2, device="cpu")
    assert calls == ["a", "b", "b", "a", "a", "b"]
    assert len(result["a"]["seconds"]) == len(result["b"]["seconds"]) == 2


@pytest.mark.slow
def test_memory_workers_run_in_fresh_processes():
    """The full path: both scripts' peak-memory workers as subprocesses (about a minute)."""
    row = bench_model.compare("r18", size=SIZE, warmup=0, repeats=1, keep=4, fields=TINY, shipped_rounds=1)
    assert row["memory_ratio"] == pytest.approx(row["transformers"]["peak_mb"] / row["m2f"]["peak_mb"])
    assert row["m2f"]["peak_mb"] > 0 and row["transformers"]["peak_mb"] > 0
    shipped = row["as_shipped"]  # each model timed in its own process
    assert shipped["m2f"]["runs"] == shipped["transformers"]["runs"] == 1 and shipped["rounds"] == 1
    assert shipped["speedup"] == pytest.approx(shipped["transformers"]["median_ms"] / shipped["m2f"]["median_ms"])
    meta = {**common.machine_info("cpu", 2), "repeats": 1, "warmup": 0, "load_average_end": [0.0, 0.0, 0.0]}
    assert f"| r18 | 64x96 | 1 | {shipped['m2f']['median_ms']:.0f} |" in bench_model.markdown({"meta": meta,
                                                                                                "rows": [row]})
    row = bench_train_step.compare(backbone="r18", size=64, batch=2, warmup=0, repeats=1, fields=TINY)
    for name, ratio in row["ratios"].items():
        assert ratio["memory"] == pytest.approx(row["transformers"]["peak_mb"] / row[name]["peak_mb"])
