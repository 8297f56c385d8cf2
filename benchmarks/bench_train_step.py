"""One training step against transformers' Mask2Former: forward, Hungarian matching, loss, backward and
optimizer step; time, peak memory and where m2f's time goes.

    python benchmarks/bench_train_step.py [--device cpu|cuda] [--size 512] [--batch 2] [--repeats 5]
                                          [--warmup 2] [--threads 2] [--out benchmarks/results]

Cases (R50, same weights: the m2f model is converted from transformers' randomly initialised one, the
same pair as in bench_model.py, heads scaled x20):
m2f with the paper's point-sampled matching and loss; m2f with matching and loss on full masks
(`loss.point_loss=false loss.point_matching=false`, Table 5); transformers' model with its own loss
(`mask_labels` / `class_labels`; it samples points like the paper). Each image has 20 square
ground-truth masks. One step = forward (bf16 autocast on GPU when asked), matching + loss on all 10
prediction sets, backward, gradient clipping and AdamW step (`m2f.optim.build_optimizer` for both
models, the R50 preset's learning rates and clipping). m2f gets the uint8 images (it normalises
inside); transformers gets the normalised tensor m2f computes and float masks, prepared untimed.
Before timing, both models' train-mode mask logits are compared (fp32: the run stops unless they pass
`common.check_agreement`, as in bench_model.py).

Timing: the three cases in turns in one process (`--warmup` untimed rounds, then `--repeats` timed),
medians reported; the two m2f cases share one model and optimizer. Stages from forward hooks and
timers: backbone, pixel decoder, Transformer decoder, matcher (all its calls), loss (criterion minus
matcher), backward, optimizer (clip + step); then one more m2f point-loss step under torch.profiler
for the operators that take the time. Peak memory: each case again in a fresh process, which
builds it and takes one 64x64 step (so the optimizer state exists), then measures two full-size
steps: CPU, peak RSS above the RSS before them (high-water mark reset via /proc/self/clear_refs);
CUDA, max_memory_allocated above the allocated memory. Writes `<out>/train_step_<device>.json`, `.md`.
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
    box_targets,
    check_agreement,
    forward_stages,
    logit_agreement,
    machine_info,
    operator_lines,
    parse_or_work,
    run_worker,
    synchronize,
    timing_summary,
    top_operators,
    write_report,
)
from torch import Tensor, nn

from m2f.memory import PeakMemory
from m2f.testing import model_pair

CASES = {  # name -> (model, m2f loss overrides)
    "m2f point loss": ("m2f", []),
    "m2f full-mask loss": ("m2f", ["loss.point_loss=false", "loss.point_matching=false"]),
    "transformers": ("transformers", []),
}
PRECISIONS = {"cpu": ["fp32"], "cuda": ["fp32", "bf16"]}
DEFAULT_SIZE = {"cpu": 512, "cuda": 1024}
GT_MASKS = 20
WARMUP_SIZE = 64
STAGES = ("other", "backbone", "pixel_decoder", "transformer_decoder", "matcher", "loss", "backward", "optimizer")


def batch_inputs(size: int, batch: int, num_classes: int, device: str) -> tuple[list[Tensor], list[dict]]:
    """Fixed uint8 images (3, size, size) and their targets ({"labels", "masks"}, 20 boxes each)."""
    generator = torch.Generator().manual_seed(3)
    images = [torch.randint(0, 256, (3, size, size), generator=generator, dtype=torch.uint8).to(device)
              for _ in range(batch)]
    targets = [box_targets(size=size, count=GT_MASKS, num_classes=num_classes, device=device, shift=i)
               for i in range(batch)]
    return images, targets


class Steps:
    """One training step per case, sharing the models and (per model) one optimizer.

    Args:
        theirs / ours: the transformers model and the m2f model converted from it (either may be None).
        cfg: the m2f config (training settings for both; the loss for the m2f cases).
        cases: the case names (keys of CASES) to prepare.
        precision: "fp32" or "bf16" (autocast around the forward).
    """

    def __init__(self, *, theirs: nn.Module | None, ours: nn.Module | None, cfg: Any, cases: list[str],
                 precision: str = "fp32") -> None:
        from m2f.config import apply_overrides
        from m2f.criterion import build_criterion
        from m2f.optim import build_optimizer

        self.theirs, self.ours, self.cfg, self.precision = theirs, ours, cfg, precision
        self.timer: StageTimer | None = None
        self.losses: dict[str, float] = {}
        self.criteria = {name: build_criterion(apply_overrides(cfg, CASES[name][1]))
                         for name in cases if CASES[name][0] == "m2f"}
        self.optimizers = {model: build_optimizer(module, cfg.train)
                           for model, module in (("m2f", ours), ("transformers", theirs)) if module is not None}

    def set_batch(self, images: list[Tensor], targets: list[dict[str, Tensor]], pixel_values: Tensor) -> None:
        """The step's input: B uint8 (3, H, W) images for m2f, their normalised batch (B, 3, H, W) for
        transformers, and the targets {"labels": (G,), "masks": (G, H, W) bool}."""
        self.images, self.targets, self.pixel_values = images, targets, pixel_values
        self.device = images[0].device.type
        self.mask_labels = [t["masks"].float() for t in targets]
        self.class_labels = [t["labels"] for t in targets]

    def autocast(self) -> Any:
        return torch.autocast(self.device, dtype=torch.bfloat16) if self.precision == "bf16" else nullcontext()

    def measure(self, stage: str) -> Any:
        return self.timer.measure(stage) if self.timer is not None else nullcontext()

    def run(self, name: str) -> Callable[[], None]:
        return (lambda: self.m2f(name)) if CASES[name][0] == "m2f" else self.transformers

    def m2f(self, name: str) -> None:
        from m2f.data.loader import pad_targets

        with self.autocast():
            outputs = self.ours(self.images)
        targets = pad_targets(self.targets, outputs["padded_size"], self.images[0].device)
        losses = self.criteria[name](outputs, targets)
        self._finish(name, losses["loss"], self.ours, self.optimizers["m2f"])

    def transformers(self) -> None:
        with self.autocast():
            out = self.theirs(pixel_values=self.pixel_values, mask_labels=self.mask_labels,
                              class_labels=self.class_labels)
        self._finish("transformers", out.loss, self.theirs, self.optimizers["transformers"])

    def _finish(self, name: str, loss: Tensor, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)
        with self.measure("backward"):
            loss.backward()
        with self.measure("optimizer"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), self.cfg.train.clip_grad_norm)
            optimizer.step()
        self.losses.setdefault(name, loss.item())


def prepare(backbone: str, *, size: int, batch: int, device: str, fields: dict[str, Any] | None,
            sizes: tuple[int, ...] = ()) -> tuple[nn.Module, nn.Module, Any, dict[int, tuple]]:
    """The model pair in train mode, the m2f config (its loss sampling the points transformers' config
    says, so both sample alike) and per image side (`size` and `sizes`) the (images, targets,
    pixel_values) batch."""
    from m2f.config import apply_overrides

    theirs, ours = model_pair(backbone, device=device, **(fields or {}))
    theirs.train()
    ours.train()
    hf = theirs.config
    cfg = apply_overrides(ours.config, [f"loss.num_points={hf.train_num_points}",
                                        f"loss.oversample_ratio={hf.oversample_ratio}",
                                        f"loss.importance_sample_ratio={hf.importance_sample_ratio}"])
    batches = {}
    for side in (size, *sizes):
        images, targets = batch_inputs(side, batch, cfg.model.num_classes, device)
        with torch.no_grad():
            batches[side] = (images, targets, ours.preprocess(images))
    return theirs, ours, cfg, batches


def train_mode_agreement(theirs: nn.Module, ours: nn.Module, images: list[Tensor], pixel_values: Tensor,
                         precision: str, tolerance: float) -> dict[str, float]:
    """`common.logit_agreement` of both models' outputs in train mode, before any step."""
    cast = torch.autocast(images[0].device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    with torch.no_grad(), cast:
        mine = ours(images)
        their = theirs(pixel_values=pixel_values, output_auxiliary_logits=True)
    return logit_agreement(mine, their, tolerance=tolerance)


def stage_medians(result: dict[str, Any]) -> dict[str, float]:
    """Median milliseconds per stage; "loss" = criterion minus matcher, "other" = the rest of the step
    (m2f: normalise + pad, target padding; transformers: class heads; both: zero_grad)."""
    stages = result["stage_seconds"]
    per_run: dict[str, list[float]] = {name: [] for name in (*STAGES, "deformable_attention")}
    for i, total in enumerate(result["seconds"]):
        parts = {name: stages[name][i] for name in ("backbone", "pixel_decoder", "transformer_decoder", "matcher",
                                                    "backward", "optimizer", "deformable_attention")}
        parts["loss"] = stages["criterion"][i] - parts["matcher"]
        parts["other"] = total - sum(v for k, v in parts.items() if k != "deformable_attention")
        for name, value in parts.items():
            per_run[name].append(value)
    return {name: statistics.median(values) * 1e3 for name, values in per_run.items()}


def timer_for(model: nn.Module, criterion: nn.Module, device: str) -> StageTimer:
    """Forward stages, the matcher (all calls), the criterion, backward and optimizer."""
    matcher = criterion.matcher
    timer = StageTimer(stages={**forward_stages(model), "matcher": [matcher], "criterion": [criterion],
                               "backward": [], "optimizer": []}, sync=lambda: synchronize(device))
    if hasattr(matcher, "match_sets"):  # m2f's criterion matches all sets with one call that is not forward
        match_sets = matcher.match_sets

        def timed_match_sets(*args: Any, **kwargs: Any) -> Any:
            with timer.measure("matcher"):
                return match_sets(*args, **kwargs)

        matcher.match_sets = timed_match_sets
    return timer


def compare(*, backbone: str = "r50", size: int = 512, batch: int = 2, device: str = "cpu", precision: str = "fp32",
            warmup: int = 1, repeats: int = 3, cases: list[str] | None = None, tolerance: float = TOLERANCE,
            fields: dict[str, Any] | None = None, memory: bool = True) -> dict[str, Any]:
    """Times the training-step cases (the benchmark's core; see the module docstring).

    Args:
        size: images are size x size; batch: images per step.
        cases: names from CASES (default all).
        fields: `Mask2FormerConfig` fields for a smaller model (tests).
        memory: also measure peak memory, each case in a fresh worker process.

    Returns:
        The row: settings, "agreement", "deform_impl", per case {median_ms, min_ms, max_ms, runs,
        images_per_s, stages_ms, loss, peak_mb} (the first m2f case also "profile":
        `common.top_operators` of one more step), and "ratios": transformers' median
        time (and peak memory) over each m2f case's.

    Raises:
        AgreementError: in fp32 the two models' outputs fail `common.check_agreement`.
    """
    from m2f.ops.dispatch import resolve_impl

    cases = cases or list(CASES)
    theirs, ours, cfg, batches = prepare(backbone, size=size, batch=batch, device=device, fields=fields)
    images, targets, pixel_values = batches[size]
    steps = Steps(theirs=theirs, ours=ours, cfg=cfg, cases=cases, precision=precision)
    steps.set_batch(images, targets, pixel_values)
    row: dict[str, Any] = {"backbone": backbone, "size": [size, size], "batch": batch, "gt_masks": GT_MASKS,
                           "precision": precision, "deform_impl": resolve_impl(cfg.model.deform_impl, images[0]),
                           "num_points": cfg.loss.num_points,
                           "agreement": train_mode_agreement(theirs, ours, images, pixel_values, precision,
                                                             tolerance)}
    if precision == "fp32":
        check_agreement(row["agreement"], f"train mode, {backbone} {size}x{size}")
    timers = {name: timer_for(theirs if CASES[name][0] == "transformers" else ours,
                              theirs.criterion if CASES[name][0] == "transformers" else steps.criteria[name], device)
              for name in cases}

    def timed(name: str) -> Callable[[], None]:
        def run() -> None:
            steps.timer = timers[name]
            steps.run(name)()
        return run

    for timer in timers.values():
        timer.__enter__()
    try:
        results = alternate({name: timed(name) for name in cases}, warmup=warmup, repeats=repeats, device=device,
                            timers=timers)
    finally:
        for timer in timers.values():
            timer.__exit__()
    for name in cases:
        summary = timing_summary(results[name]["seconds"])
        row[name] = {**summary, "images_per_s": batch * 1e3 / summary["median_ms"],
                     "stages_ms": stage_medians(results[name]), "loss": steps.losses[name]}
    steps.timer = None
    profiled = next(name for name in cases if CASES[name][0] == "m2f")
    row[profiled]["profile"] = top_operators(steps.run(profiled), device=device)
    if memory:
        spec = {"backbone": backbone, "size": size, "batch": batch, "device": device, "precision": precision,
                "fields": fields or {}, "threads": torch.get_num_threads()}
        for name in cases:
            measured = run_worker(__file__, {**spec, "case": name})
            row["peak_memory_method"] = measured.pop("method")
            row[name].update(measured)
    if "transformers" in cases:
        row["ratios"] = {name: {"time": row["transformers"]["median_ms"] / row[name]["median_ms"],
                                **({"memory": row["transformers"]["peak_mb"] / row[name]["peak_mb"]} if memory else {})}
                         for name in cases if name != "transformers"}
    return row


def memory_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Peak memory of one case's training steps in this (fresh) process; see the module docstring."""
    import gc

    torch.set_num_threads(spec["threads"])
    device, name = spec["device"], spec["case"]
    theirs, ours, cfg, batches = prepare(spec["backbone"], size=spec["size"], batch=spec["batch"], device=device,
                                         fields=spec["fields"], sizes=(WARMUP_SIZE,))
    if CASES[name][0] == "m2f":
        theirs = None
    else:
        ours = None
    gc.collect()
    steps = Steps(theirs=theirs, ours=ours, cfg=cfg, cases=[name], precision=spec["precision"])
    steps.set_batch(*batches[WARMUP_SIZE])
    steps.run(name)()  # kernels, thread pools and the optimizer state
    steps.set_batch(*batches[spec["size"]])
    gc.collect()
    memory = PeakMemory(device=device).start()
    steps.run(name)()
    steps.run(name)()
    synchronize(device)
    return {"peak_mb": memory.peak_bytes() / 2**20, "method": memory.method}


def markdown(report: dict[str, Any]) -> str:
    meta = report["meta"]
    lines = [f"# One training step: m2f vs transformers' Mask2Former ({meta['device']})", "",
             f"{meta['date']}, {meta['processor']}, {meta['threads']} threads, torch {meta['torch']}, transformers "
             f"{meta.get('transformers', '?')}; load average (1/5/15 min) {meta['load_average_start']} at the start, "
             f"{meta['load_average_end']} at the end (shared machine). R50, same random weights, {GT_MASKS} "
             "square masks per image; step = forward, matching + loss on 10 prediction sets, backward, "
             f"clip + AdamW. Median of {meta['repeats']} steps after {meta['warmup']} warm-up rounds, the cases in "
             "turns in one process. Peak memory: each case in a fresh process, peak "
             f"{'RSS' if meta['device'] == 'cpu' else 'allocated memory'} growth over two full-size steps above "
             "the memory held after building it and one 64x64 step (optimizer state included in the base).", ""]
    for row in report["rows"]:
        cases = [name for name in CASES if name in row]
        size = "x".join(map(str, row["size"]))
        lines += [f"## {row['backbone']} {size}, batch {row['batch']}, {row['precision']}", "",
                  "| case | step ms | images/s | transformers time / this | peak MB | transformers memory / this "
                  "| first loss |",
                  "|---|---|---|---|---|---|---|"]
        for name in cases:
            r = row[name]
            ratio = row.get("ratios", {}).get(name, {})
            time_ratio = f"**{ratio['time']:.2f}x**" if "time" in ratio else "1.00x"
            memory_ratio = f"{ratio['memory']:.2f}x" if "memory" in ratio else ("1.00x" if "peak_mb" in r else "-")
            peak = f"{r['peak_mb']:.0f}" if "peak_mb" in r else "-"
            lines.append(f"| {name} | {r['median_ms']:.0f} | {r['images_per_s']:.2f} | {time_ratio} | {peak} | "
                         f"{memory_ratio} | {r['loss']:.2f} |")
        a = row["agreement"]
        lines += ["", f"Train-mode outputs of all {a['prediction_sets']} prediction sets before any step: max |mask "
                  f"logit difference| {a['mask_logits_max_abs_diff']:.1e} (logits up to {a['mask_logits_abs_max']:.1f}; "
                  f"{100 * a['queries_within_tolerance']:.1f}% of the (set, query) pairs within {a['tolerance']:g}), "
                  f"class logits {a['class_logits_max_abs_diff']:.1e}. m2f's deformable attention: `{row['deform_impl']}` kernel; "
                  f"both losses sample {row['num_points']} points per mask (the full-mask case uses every pixel). "
                  "The first losses differ by the random point draws.", "",
                  "| stage (median ms) | " + " | ".join(cases) + " |", "|---|" + "---|" * len(cases)]
        for stage in (*STAGES[:3], "deformable_attention", *STAGES[3:]):
            label = "  of which deformable attention" if stage == "deformable_attention" else stage
            cells = [f"{row[name]['stages_ms'][stage]:.0f} ({100 * row[name]['stages_ms'][stage] / row[name]['median_ms']:.0f}%)"
                     for name in cases]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("| total | " + " | ".join(f"{row[name]['median_ms']:.0f}" for name in cases) + " |")
        profiled = next(name for name in cases if "profile" in row[name])
        lines += ["", *operator_lines(row[profiled]["profile"], f"one step, {profiled}"), "", next_speedup(row), ""]
    return "\n".join(lines)


def next_speedup(row: dict[str, Any]) -> str:
    """One sentence on where the next training speed-up is, from m2f's measured stages and operators."""
    name = next(name for name in CASES if name in row and "profile" in row[name])
    stages, total = row[name]["stages_ms"], row[name]["median_ms"]
    largest = max(STAGES, key=lambda s: stages[s])
    shares = row[name]["profile"]["group_shares"]
    matching_and_loss = stages["matcher"] + stages["loss"]
    return (f"Next speed-up: {largest.replace('_', ' ')} is the largest part of the {name} step "
            f"({100 * stages[largest] / total:.0f}%); by operator, dense convolutions and matrix products (forward "
            f"and backward) take {100 * shares['dense']:.0f}% of it, the deformable-attention kernel "
            f"{100 * shares['deformable_kernel']:.1f}% and matching + loss {100 * matching_and_loss / total:.0f}%, "
            "so the lever is the precision of the dense layers (bf16 autocast where the hardware has fast bf16, "
            "as m2f's GPU training does), not the kernel or the loss.")


def main() -> None:
    parser = benchmark_parser(__doc__, repeats=5)
    parser.add_argument("--size", type=int, help="image side (default 512 on CPU, 1024 on GPU)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    args = parse_or_work(parser, memory_worker)
    if args is None:
        return
    size = args.size or DEFAULT_SIZE[args.device]
    meta = {**machine_info(args.device, args.threads), "repeats": args.repeats, "warmup": args.warmup}
    rows = []
    for precision in PRECISIONS[args.device]:
        row = compare(size=size, batch=args.batch, device=args.device, precision=precision, warmup=args.warmup,
                      repeats=args.repeats)
        rows.append(row)
        print(f"{precision}: " + ", ".join(f"{name} {row[name]['median_ms']:.0f} ms" for name in CASES), flush=True)
    meta["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    report = {"meta": meta, "rows": rows}
    text = markdown(report)
    write_report(args.out, f"train_step_{args.device}", report, text)
    print(text)


if __name__ == "__main__":
    main()
