"""The run directory: one evaluation cache keyed by what produced it, and a metrics log per training.

One tiny run (4 iterations on 3 validation images) is trained once; each test works on a copy.
"""

import json
import os
import shutil
from pathlib import Path

import pytest
from fixtures_run import FAST

from m2f.checkpoint import load, save_atomic
from m2f.config import get_config
from m2f.data.synthetic import generate
from m2f.train import train

ITERATIONS = 4


def _config(data, iterations):
    return get_config("tiny", [f"data.root={data}", *FAST, f"train.max_iters={iterations}",
                               f"train.checkpoint_period={ITERATIONS}", "train.batch_size=1"])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("run_dir")
    generate(root / "data", num_train=8, num_val=3, image_size=64, seed=0)
    train(_config(root / "data", ITERATIONS), out_dir=root / "run", progress=False)
    return root


@pytest.fixture
def run(trained, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(trained / "run", copy)
    return copy


def _retrain(run):
    """What a retrain leaves behind: a new checkpoint file (same weights here; a new identity)."""
    checkpoint = run / "checkpoint.pth"
    state = load(checkpoint)
    state["iteration"] += 1
    stat = checkpoint.stat()
    save_atomic(state, checkpoint)
    os.utime(checkpoint, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))


def test_a_few_image_evaluation_is_not_shown_as_the_runs_metrics_and_nothing_stale_is_served(run):
    """Issue 14: one click of the Proposals tab's evaluate button made the per-layer tab show its
    1-image numbers as the run's, and kept showing them after the checkpoint changed."""
    from dashboards.layer_metrics import LayerMetrics
    from dashboards.proposals import ProposalsExplorer
    from m2f.experiment import evaluate_run

    full = evaluate_run(run, layers="all", proposals=True, progress=False)
    assert full["num_images"] == 3
    proposals = ProposalsExplorer(runs=[str(run)])
    proposals.eval_images = 1
    proposals.param.trigger("evaluated")  # the button: the evaluation runs in a background thread
    proposals._eval_thread.join(600)

    found, _ = LayerMetrics(runs=[str(run)]).layers()
    shown = [layer["semantic"]["mIoU"] for layer in found[str(run)]]
    assert shown == pytest.approx([layer["semantic"]["mIoU"] for layer in full["layers"]])

    _retrain(run)
    found, notes = LayerMetrics(runs=[str(run)]).layers()
    assert str(run) not in found, "numbers of the previous checkpoint were shown"
    assert any("no layer evaluation" in n for n in notes)


def test_a_partial_evaluation_alone_is_shown_labelled_as_partial(run):
    import holoviews as hv

    from dashboards.layer_metrics import LayerMetrics
    from dashboards.proposals import ProposalsExplorer
    from m2f.run_dir import RunDir

    proposals = ProposalsExplorer(runs=[str(run)])
    proposals.eval_images = 1
    proposals.param.trigger("evaluated")
    proposals._eval_thread.join(600)
    evaluation = RunDir.at(run).layer_evaluation(proposals=True)
    assert evaluation.is_partial and evaluation.num_images == 1
    hv.extension("bokeh")
    assert "partial: 1 validation images" in proposals.recall().opts.get("plot").kwargs["title"]
    found, notes = LayerMetrics(runs=[str(run)]).layers()
    assert len(found[str(run)]) == 10
    assert any("only 1 validation images" in n and "not the run's metrics" in n for n in notes)


def test_the_cache_is_keyed_by_checkpoint_images_layers_and_task(run, monkeypatch):
    import m2f.inference as inference

    calls = []
    real = inference.evaluate
    monkeypatch.setattr(inference, "evaluate", lambda *a, **k: calls.append(k) or real(*a, **k))
    first = inference.evaluate_run(run, layers="final", max_images=2)
    assert inference.evaluate_run(run, layers="final", max_images=2) == first and len(calls) == 1
    inference.evaluate_run(run, layers="final", max_images=1)         # other number of images
    inference.evaluate_run(run, layers="all", max_images=2)           # other prediction sets
    inference.evaluate_checkpoint(run, task="semantic", max_images=2, out=run / "semantic.json")  # other task
    assert len(calls) == 4
    assert json.loads((run / "semantic.json").read_text())["metrics"]["num_images"] == 2   # `m2f eval --out`
    _retrain(run)
    inference.evaluate_run(run, layers="final", max_images=2)
    assert len(calls) == 5
    entries = json.loads((run / "evaluations.json").read_text())["entries"]
    assert len(entries) == 1, "entries of the replaced checkpoint are dropped"


def test_committed_results_of_earlier_versions_stay_readable(run):
    """results/ holds runs without checkpoints, some with eval_layers.json (the experiment's old cache, in
    the Figure II investigation runs) and the demo's with evaluations.json: both are served as recorded."""
    from m2f.run_dir import RunDir

    results = Path(__file__).resolve().parents[1] / "results"
    current = RunDir.at(results / "tiny" / "rows" / "panoptic-mask2former" / "run").layer_evaluation(proposals=True)
    assert current is not None and len(current.metrics["layers"]) == 10  # its checkpoint only where make demo ran
    committed = results / "tiny-figure2-1500iters" / "rows" / "panoptic-mask2former" / "run"
    evaluation = RunDir.at(committed).layer_evaluation(proposals=True)
    assert evaluation is not None and not evaluation.checkpoint_present and not evaluation.is_partial
    assert len(evaluation.metrics["layers"]) == 10 and "recorded" in evaluation.describe()
    # With its checkpoint present, an old entry is served only while the checkpoint is the one it names.
    old = json.loads((committed / "eval_layers.json").read_text())
    old["key"]["checkpoint_mtime_ns"] = (run / "checkpoint.pth").stat().st_mtime_ns
    (run / "eval_layers.json").write_text(json.dumps(old))
    assert RunDir.at(run).layer_evaluation() is not None
    _retrain(run)
    assert RunDir.at(run).layer_evaluation() is None


def _iterations(run, name="metrics.jsonl"):
    return [json.loads(line)["iteration"] for line in (run / name).read_text().splitlines()
            if json.loads(line)["split"] == "train"]


def test_a_fresh_run_starts_a_fresh_metrics_log_and_keeps_the_old_one_aside(trained, tmp_path):
    """Issue 22: metrics.jsonl was appended to even when training started from scratch."""
    run = tmp_path / "fresh"
    run.mkdir()
    shutil.copy(trained / "run" / "metrics.jsonl", run / "metrics.jsonl")
    train(_config(trained / "data", 2), out_dir=run, progress=False)
    assert _iterations(run) == [2]
    assert _iterations(run, "metrics.jsonl.1") == [2, 4]


def test_a_resumed_run_logs_every_iteration_once(run, trained):
    """Issue 22: resuming from a checkpoint older than the last logged line duplicated rows."""
    with open(run / "metrics.jsonl", "a") as f:  # logged after the checkpoint, then the run was killed
        f.write(json.dumps({"split": "train", "iteration": 6, "loss": -1.0}) + "\n")
    train(_config(trained / "data", 6), out_dir=run, resume=True, progress=False)
    assert _iterations(run) == [2, 4, 6]
    assert all(json.loads(line).get("loss") != -1.0 for line in (run / "metrics.jsonl").read_text().splitlines())
