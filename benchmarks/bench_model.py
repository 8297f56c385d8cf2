"""Inference against transformers' Mask2Former: the same weights and image, panoptic post-processing
included, side by side; latency, images/s, peak memory, and where each model's time goes.

    python benchmarks/bench_model.py [--device cpu|cuda] [--backbones r50 swin_t] [--size 800 1216]
                                     [--repeats 5] [--warmup 2] [--threads 2] [--out benchmarks/results]
                                     [--no-keep-freed-memory] [--shipped-rounds 2]

The peer is transformers' `Mask2FormerForUniversalSegmentation` (its deformable attention is pure
PyTorch, `grid_sample` per level) with its own random initialisation (fixed seed); the m2f model is
converted from it (`m2f.convert.from_transformers`), so both hold identical weights (the class head and
the mask-embedding output layer are scaled x20 first, so that class scores and mask logits look like a
trained model's instead of ~1/K and +-1). m2f runs as `m2f predict` loads models: frozen BatchNorm folded into
the convolutions (`m2f.batchnorm_folding`). Both get the same image: m2f the uint8 image (it normalises
and pads inside), transformers the normalised tensor m2f computes (its image processor would resize;
its preprocessing is not timed, m2f's is). Before timing,
the mask logits of all 10 prediction sets are compared; in fp32 the benchmark stops unless 99% of the
(set, query) pairs agree within 1e-3 and none differs by more than 1% of the logit range (not all:
masked attention thresholds logits at 0, and rounding can flip a pixel of one query; see
`common.logit_agreement`). One run = model forward + panoptic post-processing to the image size: m2f's
`m2f.postprocess` (the original's rules) and transformers' `post_process_panoptic_segmentation`, with
the same thresholds. The object threshold is set between the 20th and 21st best query score, so both
post-processings work on the same 20 queries. The random masks overlap, so the overlap rule (a query
must keep 80% of its mask) drops all of them in both and no segment survives; the per-query work
(resize to the image size, argmax, areas) is done for all 20.

Timing: one process holds both models and runs them in turns (A B, B A, ...), `--warmup` untimed
rounds, then `--repeats` timed ones; medians are reported. That process has glibc's malloc keeping freed
blocks, as `m2f predict` sets it (`m2f.allocator`), for both models (`--no-keep-freed-memory`: the default
for both). On the CPU each model is also timed as shipped (`as_shipped`, `--shipped-rounds`): in its own
fresh process, m2f with that setting and transformers without, the processes in turns. Stage times come from forward hooks
(backbone, pixel decoder, its deformable attention modules, Transformer decoder); post-processing is
the run minus the model call. Peak memory: each model again in a fresh process, which builds it, warms
it up on a 64x64 image, then measures one full-size warm-up and one run: CPU, peak RSS above the RSS
before them (the kernel's high-water mark reset via /proc/self/clear_refs); CUDA, max_memory_allocated
above the allocated memory. Writes `<out>/model_<device>.json` and `.md`.
"""

import os
import statistics
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
from common import (
    TOLERANCE,
    StageTimer,
    alternate,
    benchmark_parser,
    check_agreement,
    forward_stages,
    inference_allocator,
    inference_allocator_option,
    logit_agreement,
    machine_info,
    operator_lines,
    parse_or_work,
    run_worker,
    synchronize,
    thing_classes,
    timing_summary,
    top_operators,
    write_report,
)
from torch import Tensor, nn

from m2f.batchnorm_folding import fold_frozen_batchnorm
from m2f.memory import PeakMemory
from m2f.testing import BACKBONES, AgreementError, model_pair

MODELS = ("m2f", "transformers")
VARIANTS = {  # (precision, torch.compile) per device
    "cpu": [("fp32", False)],
    "cuda": [("fp32", False), ("bf16", False), ("fp32", True), ("bf16", True)],
}
KEPT_QUERIES = 20
WARMUP_SIZE = (64, 64)
ALLOCATOR_NOTE = (" (with glibc's malloc keeping freed blocks, as `m2f predict` sets it, `m2f.allocator`: both "
                  "models gain from it; in the memory processes only m2f's has it)")
STAGES = ("other", "backbone", "pixel_decoder", "transformer_decoder", "postprocess")
STAGE_NOTES = {
    "other": "m2f: normalise + pad; transformers: class heads",
    "pixel_decoder": "6 deformable encoder layers + FPN",
    "postprocess": "panoptic, to the image size",
}


def test_image(size: tuple[int, int], device: str) -> Tensor:
    """A fixed uint8 (3, H, W) RGB image."""
    generator = torch.Generator().manual_seed(2)
    return torch.randint(0, 256, (3, *size), generator=generator, dtype=torch.uint8).to(device)


def panoptic_threshold(pred_logits: Tensor, keep: int) -> float:
    """An object-score threshold that keeps `keep` queries (midway between the keep-th and the next
    score of the queries whose best class is not "no object").

    Args:
        pred_logits: (Q, K+1) class logits of one image.
    """
    scores, labels = pred_logits.float().softmax(-1).max(-1)
    candidates = scores[labels != pred_logits.shape[-1] - 1].sort(descending=True).values.tolist()
    if not candidates:
        return 0.5
    if len(candidates) <= keep:
        return candidates[-1] / 2
    return (candidates[keep - 1] + candidates[keep]) / 2


def autocast(device: str, precision: str) -> Any:
    return torch.autocast(device, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


class Runners:
    """One complete inference run per model (forward + panoptic post-processing), each returning the
    category of every pixel (H, W), -1 = void; the last model outputs stay in `last`.

    Args:
        theirs / ours: the transformers model and the m2f model converted from it (either may be None).
        image: (3, H, W) uint8.
        pixel_values: transformers' input, (1, 3, H_pad, W_pad): m2f's normalised and padded image.
        num_classes: K.
        threshold: the object-score threshold of both post-processings.
        precision: "fp32" or "bf16" (autocast around the model call).
        compile: run the models through torch.compile.
    """

    def __init__(self, *, theirs: nn.Module | None, ours: nn.Module | None, image: Tensor, pixel_values: Tensor,
                 num_classes: int, threshold: float, precision: str = "fp32", compile: bool = False) -> None:
        from transformers import Mask2FormerImageProcessor

        self.device = image.device.type
        self.image, self.pixel_values, self.size = image, pixel_values, tuple(image.shape[-2:])
        self.precision = precision
        is_thing = thing_classes(num_classes)
        self.ours_options = {"is_thing": is_thing, "object_mask_threshold": threshold, "overlap_threshold": 0.8}
        self.theirs_options = {"threshold": threshold, "mask_threshold": 0.5, "overlap_mask_area_threshold": 0.8,
                               "label_ids_to_fuse": {k for k, thing in enumerate(is_thing) if not thing}}
        self.processor = Mask2FormerImageProcessor()
        self.ours = torch.compile(ours) if compile and ours is not None else ours
        self.theirs = torch.compile(theirs) if compile and theirs is not None else theirs
        self.auxiliary = False  # transformers returns its 9 earlier prediction sets only when asked
        self.last: dict[str, Any] = {}

    def m2f(self) -> Tensor:
        from m2f.postprocess import postprocess

        with torch.no_grad(), autocast(self.device, self.precision):
            # Like m2f.predict: the intermediate prediction sets only where `agreement` compares them all.
            out = self.ours([self.image], intermediate=self.auxiliary)
        result = postprocess(out, task="panoptic", image_sizes=[self.size], **self.ours_options)[0]
        self.last["m2f"], self.last["m2f_segments"] = out, len(result["segments_info"])
        return self._categories(result["panoptic_seg"], {s["id"]: s["category_id"] for s in result["segments_info"]})

    def transformers(self) -> Tensor:
        with torch.no_grad(), autocast(self.device, self.precision):
            out = self.theirs(pixel_values=self.pixel_values, output_auxiliary_logits=self.auxiliary)
        result = self.processor.post_process_panoptic_segmentation(out, target_sizes=[self.size],
                                                                   **self.theirs_options)[0]
        self.last["transformers"], self.last["transformers_segments"] = out, len(result["segments_info"])
        return self._categories(result["segmentation"], {s["id"]: s["label_id"] for s in result["segments_info"]})

    def run(self, name: str) -> Callable[[], Tensor]:
        return self.m2f if name == "m2f" else self.transformers

    def _categories(self, segment_ids: Tensor, category_of: dict[int, int]) -> Tensor:
        categories = torch.full(self.size, -1, dtype=torch.long, device=self.image.device)
        segment_ids = segment_ids.to(categories.device)
        for segment_id, category in category_of.items():
            categories[segment_ids == segment_id] = category
        return categories


def agreement(runners: Runners, tolerance: float) -> dict[str, float]:
    """Runs both models once: `common.logit_agreement` of all prediction sets, the segment counts, and
    the share of pixels whose panoptic category (or void) is the same."""
    runners.auxiliary = True
    try:
        ours_categories, theirs_categories = runners.m2f(), runners.transformers()
    finally:
        runners.auxiliary = False
    return {**logit_agreement(runners.last["m2f"], runners.last["transformers"], tolerance=tolerance),
            "m2f_segments": runners.last["m2f_segments"],
            "transformers_segments": runners.last["transformers_segments"],
            "panoptic_same_category_fraction": (ours_categories == theirs_categories).float().mean().item(),
            "m2f_segment_pixels_fraction": (ours_categories >= 0).float().mean().item(),
            "transformers_segment_pixels_fraction": (theirs_categories >= 0).float().mean().item()}


def stage_medians(result: dict[str, Any]) -> dict[str, float]:
    """Median milliseconds per stage; "other" = model call minus its three parts, "postprocess" = run
    minus model call ("deformable_attention" is part of "pixel_decoder")."""
    per_run: dict[str, list[float]] = {name: [] for name in (*STAGES, "deformable_attention")}
    stages = result["stage_seconds"]
    for i, total in enumerate(result["seconds"]):
        model = stages["model"][i]
        parts = {name: stages[name][i] for name in ("backbone", "pixel_decoder", "transformer_decoder")}
        per_run["other"].append(model - sum(parts.values()))
        per_run["postprocess"].append(total - model)
        per_run["deformable_attention"].append(stages["deformable_attention"][i])
        for name, value in parts.items():
            per_run[name].append(value)
    return {name: statistics.median(values) * 1e3 for name, values in per_run.items()}


def inference_pair(backbone: str, *, device: str, fields: dict[str, Any]) -> tuple[nn.Module, nn.Module]:
    """`m2f.testing.model_pair`, with m2f's model as `m2f predict` loads it (frozen BatchNorm folded)."""
    theirs, ours = model_pair(backbone, device=device, **fields)
    fold_frozen_batchnorm(ours)
    return theirs, ours


def compare(backbone: str, *, size: tuple[int, int], device: str = "cpu", precision: str = "fp32",
            compile: bool = False, warmup: int = 1, repeats: int = 3, keep: int = KEPT_QUERIES,
            tolerance: float = TOLERANCE, fields: dict[str, Any] | None = None,
            memory: bool = True, keep_freed_memory: bool = False, shipped_rounds: int = 0) -> dict[str, Any]:
    """Times m2f against transformers on one image (the benchmark's core; see the module docstring).

    Args:
        backbone: "r50", "swin_t" (or "r18" for tests).
        size: (H, W) of the image.
        fields: `Mask2FormerConfig` fields for a smaller model (tests).
        memory: also measure peak memory, each model in a fresh worker process.
        keep_freed_memory: m2f's memory worker sets glibc's malloc as `m2f predict` does (`m2f.allocator`);
            transformers' keeps the default. (The timed runs share this process and its setting.)
        shipped_rounds: > 0 also times each model as shipped (`as_shipped`), in that many rounds of worker
            processes.

    Returns:
        The row: settings, per model {median_ms, min_ms, max_ms, runs, images_per_s, stages_ms,
        peak_mb} (m2f also "profile": `common.top_operators` of one more run), "speedup" (transformers /
        m2f median time), "memory_ratio" (transformers / m2f peak), "agreement", "panoptic_threshold",
        "deform_impl", and "as_shipped" with `shipped_rounds`.

    Raises:
        AgreementError: in fp32 the two models' outputs fail `common.check_agreement`.
    """
    from m2f.ops.dispatch import resolve_impl

    theirs, ours = inference_pair(backbone, device=device, fields=fields or {})
    image = test_image(size, device)
    with torch.no_grad():
        pixel_values = ours.preprocess([image])
        reference_logits = ours([image])["pred_logits"][0]
    threshold = panoptic_threshold(reference_logits, keep)
    row: dict[str, Any] = {"backbone": backbone, "size": list(size), "batch": 1, "precision": precision,
                           "compile": compile, "panoptic_threshold": threshold,
                           "deform_impl": resolve_impl(ours.config.model.deform_impl, image)}
    try:
        runners = Runners(theirs=theirs, ours=ours, image=image, pixel_values=pixel_values,
                          num_classes=ours.config.model.num_classes, threshold=threshold, precision=precision,
                          compile=compile)
        row["agreement"] = agreement(runners, tolerance)
        if precision == "fp32":
            check_agreement(row["agreement"], f"{backbone} {size[0]}x{size[1]}")
        timers = {} if compile else {
            name: StageTimer(stages=forward_stages(model), sync=lambda: synchronize(device))
            for name, model in (("m2f", ours), ("transformers", theirs))}
        for timer in timers.values():
            timer.__enter__()
        try:
            results = alternate({name: runners.run(name) for name in MODELS}, warmup=warmup, repeats=repeats,
                                device=device, timers=timers)
        finally:
            for timer in timers.values():
                timer.__exit__()
    except AgreementError:
        raise
    except Exception as err:  # torch.compile "where it works": its failure is a result, not a crash
        if not compile:
            raise
        return {**row, "error": f"{type(err).__name__}: {err}"[:2000]}
    for name in MODELS:
        summary = timing_summary(results[name]["seconds"])
        row[name] = {**summary, "images_per_s": 1e3 / summary["median_ms"]}
        if timers:
            row[name]["stages_ms"] = stage_medians(results[name])
    if not compile:
        row["m2f"]["profile"] = top_operators(runners.m2f, device=device)
    row["speedup"] = row["transformers"]["median_ms"] / row["m2f"]["median_ms"]
    spec = {"backbone": backbone, "size": list(size), "device": device, "precision": precision,
            "compile": compile, "threshold": threshold, "fields": fields or {}, "threads": torch.get_num_threads()}
    if shipped_rounds:
        row["as_shipped"] = as_shipped(spec, rounds=shipped_rounds, warmup=warmup, repeats=repeats)
    if memory:
        for name in MODELS:
            keep = keep_freed_memory and name == "m2f"
            row[name].update(run_worker(__file__, {**spec, "measure": "memory", "model": name,
                                                   "keep_freed_memory": keep}))
        row["memory_ratio"] = row["transformers"]["peak_mb"] / row["m2f"]["peak_mb"]
        row["peak_memory_method"] = row["m2f"].pop("method")
        row["transformers"].pop("method")
    return row


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One model in this (fresh) process, as the spec says: its peak memory (`"measure": "memory"`) or the
    seconds of its timed runs (`"time"`, for `as_shipped`); see the module docstring."""
    import gc

    torch.set_num_threads(spec["threads"])
    if spec["keep_freed_memory"]:
        from m2f.allocator import keep_freed_memory

        keep_freed_memory()
    device = spec["device"]
    theirs, ours = inference_pair(spec["backbone"], device=device, fields=spec["fields"])
    num_classes = ours.config.model.num_classes
    images = [test_image(size, device) for size in (tuple(spec["size"]), WARMUP_SIZE)]
    with torch.no_grad():
        pixel_values = [ours.preprocess([image]) for image in images]
    if spec["model"] == "m2f":
        theirs = None
    else:
        ours = None
    gc.collect()
    full, small = (Runners(theirs=theirs, ours=ours, image=image, pixel_values=values, num_classes=num_classes,
                           threshold=spec["threshold"], precision=spec["precision"],
                           compile=spec["compile"]).run(spec["model"]) for image, values in zip(images, pixel_values))
    if spec["measure"] == "time":
        return alternate({spec["model"]: full}, warmup=spec["warmup"], repeats=spec["repeats"],
                         device=device)[spec["model"]]
    # Load kernels and thread pools first; on CUDA the full-size warm-up can come first too (the
    # allocator's counters, unlike RSS, do not keep freed memory).
    (full if device == "cuda" else small)()
    gc.collect()
    memory = PeakMemory(device=device).start()
    full()
    full()
    synchronize(device)
    return {"peak_mb": memory.peak_bytes() / 2**20, "method": memory.method}


def as_shipped(spec: dict[str, Any], *, rounds: int, warmup: int, repeats: int) -> dict[str, Any]:
    """Each model as its users run it, in its own fresh process: m2f with glibc's malloc keeping freed
    blocks (as `m2f predict` sets it), transformers with glibc's default. The processes run in turns
    (m2f, transformers; then transformers, m2f; ...), each `warmup` untimed and `repeats` timed runs.

    Returns:
        {model: timing_summary of all its timed runs, "speedup": transformers / m2f median, "rounds": rounds}.
    """
    seconds: dict[str, list[float]] = {name: [] for name in MODELS}
    for r in range(rounds):
        for name in MODELS if r % 2 == 0 else reversed(MODELS):
            result = run_worker(__file__, {**spec, "measure": "time", "model": name, "warmup": warmup,
                                           "repeats": repeats, "keep_freed_memory": name == "m2f"})
            seconds[name] += result["seconds"]
    summary: dict[str, Any] = {name: timing_summary(seconds[name]) for name in MODELS}
    summary["speedup"] = summary["transformers"]["median_ms"] / summary["m2f"]["median_ms"]
    summary["rounds"] = rounds
    return summary


def markdown(report: dict[str, Any]) -> str:
    meta = report["meta"]
    lines = [
        f"# Inference: m2f vs transformers' Mask2Former ({meta['device']}, batch 1)", "",
        f"{meta['date']}, {meta['processor']}, {meta['threads']} threads, torch {meta['torch']}, transformers "
        f"{meta.get('transformers', '?')}; load average (1/5/15 min) {meta['load_average_start']} at the start, "
        f"{meta['load_average_end']} at the end (shared machine). Same random weights (transformers' init with "
        "the class head and mask-embedding output layer x20, so that scores and mask logits look trained; "
        "converted; m2f's frozen BatchNorm folded into the convolutions, as `m2f predict` loads models), same "
        "image; one run = forward + panoptic post-processing of 20 kept queries to the image "
        "size (random masks overlap, so no segment passes the 80% overlap rule in either). Median of "
        f"{meta['repeats']} runs after {meta['warmup']} warm-up rounds, the two models in turns in one process"
        f"{ALLOCATOR_NOTE if meta.get('keep_freed_memory') else ''}. "
        "Peak memory: each model in a fresh process, growth of the peak "
        f"{'RSS' if meta['device'] == 'cpu' else 'allocated memory'} during a full-size warm-up and one run "
        "above the memory held after building it and a 64x64 warm-up (both processes hold the same weights, "
        "so this growth is where they differ). m2f's deformable attention: "
        f"`{report['rows'][0]['deform_impl']}` kernel; transformers': pure PyTorch (grid_sample).", "",
        "| backbone | input | precision | m2f ms | transformers ms | speed-up | m2f img/s | transformers img/s "
        "| m2f peak MB | transformers peak MB | memory ratio | mask logits: max abs diff, queries within "
        f"{TOLERANCE:g} |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        setting = row["precision"] + (" + compile" if row["compile"] else "")
        size = "x".join(map(str, row["size"]))
        if "error" in row:
            lines.append(f"| {row['backbone']} | {size} | {setting} | failed: {row['error'][:120]} |")
            continue
        m, t = row["m2f"], row["transformers"]
        memory = (f"{m['peak_mb']:.0f} | {t['peak_mb']:.0f} | {row['memory_ratio']:.2f}x" if "memory_ratio" in row
                  else "- | - | -")
        lines.append(f"| {row['backbone']} | {size} | {setting} | {m['median_ms']:.0f} | {t['median_ms']:.0f} | "
                     f"**{row['speedup']:.2f}x** | {m['images_per_s']:.3f} | {t['images_per_s']:.3f} | {memory} | "
                     f"{row['agreement']['mask_logits_max_abs_diff']:.1e}, "
                     f"{100 * row['agreement']['queries_within_tolerance']:.1f}% |")
    shipped = [row for row in report["rows"] if "as_shipped" in row]
    if shipped:
        lines += ["", "As shipped: each model in its own fresh process, m2f with glibc's malloc keeping freed blocks "
                  "(as `m2f predict` sets it), transformers with glibc's default; the processes in turns, each "
                  f"{meta['warmup']} warm-up and {meta['repeats']} timed runs (`--shipped-rounds`).", "",
                  "| backbone | input | rounds | m2f ms | transformers ms | speed-up |", "|---|---|---|---|---|---|"]
        for row in shipped:
            a = row["as_shipped"]
            lines.append(f"| {row['backbone']} | {'x'.join(map(str, row['size']))} | {a['rounds']} | "
                         f"{a['m2f']['median_ms']:.0f} | {a['transformers']['median_ms']:.0f} | "
                         f"**{a['speedup']:.2f}x** |")
    lines += ["", "Agreement, checked before timing on the mask logits of all 10 prediction sets x 100 queries "
              f"(largest |logit| {report['rows'][0]['agreement']['mask_logits_abs_max']:.1f}): fp32 rows stop the "
              f"benchmark unless 99% of the (set, query) pairs agree within {TOLERANCE:g} and none differs by more "
              "than 1% of the logit range. Not all must: masked attention blocks a pixel where the resized mask "
              "logit is < 0, a few hundred logits lie within 1e-3 of 0, and float32 rounding (~3e-5) can flip one "
              "such pixel for one query of a later layer; that query then differs by ~1e-3-1e-2, every other "
              "by ~3e-5. The panoptic maps differ by design where the post-processing rules differ "
              "(docs/fidelity.md), so their agreement is shown, not required.", ""]
    lines += ["| backbone | segments m2f / transformers | same panoptic category (or void) | pixels in a segment m2f / "
              "transformers |", "|---|---|---|---|"]
    for row in report["rows"]:
        if "error" not in row and not row["compile"] and row["precision"] == "fp32":
            a = row["agreement"]
            lines.append(f"| {row['backbone']} | {a['m2f_segments']} / {a['transformers_segments']} | "
                         f"{100 * a['panoptic_same_category_fraction']:.1f}% | "
                         f"{100 * a['m2f_segment_pixels_fraction']:.1f}% / "
                         f"{100 * a['transformers_segment_pixels_fraction']:.1f}% |")
    lines += ["", "Evaluation throughput (post-processing + PQ + mIoU + AP per image and prediction set) is measured "
              "by `benchmarks/eval_throughput.py`, see `eval_throughput.md`.", "",
              "## Where the time goes (median ms per stage, eager fp32)", "",
              "From forward hooks during the timed runs: backbone, pixel decoder (its deformable attention modules, "
              "projections included, listed as a part of it), Transformer decoder; post-processing = run minus "
              "model call.", ""]
    for row in report["rows"]:
        if "error" in row or row["compile"] or "stages_ms" not in row["m2f"]:
            continue
        lines += [f"### {row['backbone']} {'x'.join(map(str, row['size']))} {row['precision']}", "",
                  "| stage | m2f ms | m2f share | transformers ms | transformers share | transformers / m2f |",
                  "|---|---|---|---|---|---|"]
        for stage in (*STAGES[:3], "deformable_attention", *STAGES[3:]):
            m, t = row["m2f"]["stages_ms"][stage], row["transformers"]["stages_ms"][stage]
            label = "  of which deformable attention" if stage == "deformable_attention" else stage
            if stage in STAGE_NOTES:
                label += f" ({STAGE_NOTES[stage]})"
            ratio = f"{t / m:.2f}x" if m > 0.05 else "-"
            lines.append(f"| {label} | {m:.0f} | {100 * m / row['m2f']['median_ms']:.0f}% | {t:.0f} | "
                         f"{100 * t / row['transformers']['median_ms']:.0f}% | {ratio} |")
        lines.append(f"| total | {row['m2f']['median_ms']:.0f} | 100% | {row['transformers']['median_ms']:.0f} | "
                     f"100% | {row['speedup']:.2f}x |")
        lines += ["", *operator_lines(row["m2f"]["profile"], "one m2f run"), "", next_speedup(row), ""]
    return "\n".join(lines)


def next_speedup(row: dict[str, Any]) -> str:
    """One sentence on where m2f's next inference speed-up is, from the measured stages and operators."""
    stages, total = row["m2f"]["stages_ms"], row["m2f"]["median_ms"]
    largest = max(STAGES, key=lambda s: stages[s])
    shares = row["m2f"]["profile"]["group_shares"]
    return (f"Next speed-up: the {largest.replace('_', ' ')} is m2f's largest stage ({100 * stages[largest] / total:.0f}%), "
            f"but by operator the largest group is dense fp32 convolutions and matrix products "
            f"({100 * shares['dense']:.0f}%: backbone, FPN, encoder projections and FFNs), while the "
            "deformable-attention kernel is only "
            f"{100 * shares['deformable_kernel']:.1f}%. Within m2f's reach: the mask product at 1/4 resolution for "
            f"all 10 prediction sets (`aten::bmm`, {100 * shares['bmm']:.1f}%), though at inference 9 of them only "
            "become attention masks at 1/32-1/8; bilinear resizing commutes with that product, so computing them "
            "from resized mask features saves most of it. Beyond that, lower precision where the hardware has "
            "fast bf16.")


def main() -> None:
    parser = benchmark_parser(__doc__, repeats=5)
    parser.add_argument("--backbones", nargs="+", choices=BACKBONES, default=list(BACKBONES))
    parser.add_argument("--size", type=int, nargs=2, default=(800, 1216), metavar=("H", "W"))
    parser.add_argument("--warmup", type=int, default=2)
    inference_allocator_option(parser)
    parser.add_argument("--shipped-rounds", type=int, default=2,
                        help="rounds of worker processes timing each model as shipped (CPU; 0: none)")
    args = parse_or_work(parser, worker)
    if args is None:
        return
    meta = {**machine_info(args.device, args.threads), "repeats": args.repeats, "warmup": args.warmup,
            "keep_freed_memory": inference_allocator(args)}
    rows = []
    for backbone in args.backbones:
        for precision, compiled in VARIANTS[args.device]:
            row = compare(backbone, size=tuple(args.size), device=args.device, precision=precision,
                          compile=compiled, warmup=args.warmup, repeats=args.repeats,
                          keep_freed_memory=meta["keep_freed_memory"],
                          shipped_rounds=args.shipped_rounds if args.device == "cpu" else 0)
            rows.append(row)
            summary = row.get("error") or (f"m2f {row['m2f']['median_ms']:.0f} ms, transformers "
                                           f"{row['transformers']['median_ms']:.0f} ms, {row['speedup']:.2f}x")
            if "as_shipped" in row:
                summary += f"; as shipped {row['as_shipped']['speedup']:.2f}x"
            print(f"{backbone} {precision}{' compile' if compiled else ''}: {summary}", flush=True)
    meta["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    report = {"meta": meta, "rows": rows}
    text = markdown(report)
    write_report(args.out, f"model_{args.device}", report, text)
    print(text)


if __name__ == "__main__":
    main()
