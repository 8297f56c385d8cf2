"""Helpers shared by the benchmark scripts: machine facts, one case per worker process, peak memory,
per-stage wall time, synthetic targets, reports, and the transformers / m2f model pair with identical
weights that the peer comparisons (`bench_model.py`, `bench_train_step.py`) measure.

Scripts import it as `common` (run as `python benchmarks/<script>.py`, the folder is on sys.path).
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from m2f.testing import AgreementError, prediction_sets

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_name() -> str:
    """The processor's model name (/proc/cpuinfo), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_info(device: str, threads: int) -> dict[str, Any]:
    """What a reader needs to judge the numbers: versions, processor, threads and the load average
    (1, 5, 15 min, as `uptime` prints it) when the measurement starts."""
    info: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "device": device,
        "processor": torch.cuda.get_device_name() if device == "cuda" else cpu_name(),
        "cpus": os.cpu_count(),
        "threads": threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def run_worker(script: str | Path, spec: dict[str, Any]) -> dict[str, Any]:
    """Runs `python script --worker '<spec as JSON>'` in a fresh process and returns the JSON object it
    prints on its last stdout line, so every case starts with its own memory high-water mark.

    Raises:
        RuntimeError: the worker failed; the message holds the end of its stderr.
    """
    done = subprocess.run([sys.executable, str(script), "--worker", json.dumps(spec)], capture_output=True,
                          text=True, check=False)
    if done.returncode != 0 or not done.stdout.strip():
        raise RuntimeError(f"benchmark worker {Path(script).name} {spec} failed (exit {done.returncode}):\n"
                           f"{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def benchmark_parser(doc: str, *, repeats: int) -> argparse.ArgumentParser:
    """The options every benchmark has: --device, --threads, --repeats, --out and the hidden --worker
    (`run_worker`'s way into the script); the script adds its own."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads in every case")
    parser.add_argument("--repeats", type=int, default=repeats, help="timed runs per case")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser


def inference_allocator_option(parser: argparse.ArgumentParser) -> None:
    """--keep-freed-memory / --no-keep-freed-memory for the full-size inference benchmarks: glibc's malloc as
    `m2f predict` sets it (`m2f.allocator`) or its default."""
    parser.add_argument("--keep-freed-memory", action=argparse.BooleanOptionalAction, default=True,
                        help="glibc's malloc keeps freed blocks, as m2f predict sets it (default: yes)")


def inference_allocator(args: argparse.Namespace) -> bool:
    """Applies `inference_allocator_option`'s choice to this process; True where freed memory is now kept."""
    from m2f.allocator import keep_freed_memory

    return bool(args.keep_freed_memory) and args.device == "cpu" and keep_freed_memory()


def parse_or_work(parser: argparse.ArgumentParser,
                  worker: Callable[[dict[str, Any]], dict[str, Any]]) -> argparse.Namespace | None:
    """Parses the arguments. Started by `run_worker`: runs `worker` on the spec, prints its result as
    JSON and returns None. Otherwise checks the device, sets the CPU threads and builds m2f's kernel
    for the device once (so no timed run pays for it) and returns the arguments."""
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return None
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA device")
    torch.set_num_threads(args.threads)
    from m2f.ops.build import load_extension

    load_extension(args.device)
    return args


def write_report(out_dir: str | Path, stem: str, report: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    """Writes `<out_dir>/<stem>.json` and `<out_dir>/<stem>.md`; returns both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    md_path.write_text(markdown.rstrip("\n") + "\n")
    return json_path, md_path


def timing_summary(seconds: list[float]) -> dict[str, float]:
    """Median, min and max in milliseconds of the timed runs (warm-ups excluded by the caller)."""
    if not seconds:
        raise ValueError("timing_summary: no timed runs (repeats must be >= 1)")
    return {"median_ms": statistics.median(seconds) * 1e3, "min_ms": min(seconds) * 1e3,
            "max_ms": max(seconds) * 1e3, "runs": len(seconds)}


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class StageTimer:
    """Wall time spent inside groups of modules during one run, from forward pre/post hooks.

    A stage's time is the sum over its calls (the matcher runs once per prediction set); a call of a
    stage's module inside another call of the same stage is not counted twice. On CUDA `sync` runs at
    every boundary, so the times are the GPU's, at the price of a few extra synchronisations.

    Args:
        stages: stage name -> the modules whose forward calls belong to it (an empty list for a stage
            timed with `measure`).
        sync: called before reading the clock (torch.cuda.synchronize on GPU).
    """

    def __init__(self, *, stages: dict[str, Iterable[nn.Module]], sync: Callable[[], None] = lambda: None) -> None:
        self.stages = {name: list(modules) for name, modules in stages.items()}
        self.sync = sync
        self._handles: list[Any] = []
        self._depth = dict.fromkeys(self.stages, 0)
        self._start = dict.fromkeys(self.stages, 0.0)
        self.totals = dict.fromkeys(self.stages, 0.0)

    def __enter__(self) -> "StageTimer":
        for name, modules in self.stages.items():
            for module in modules:
                self._handles.append(module.register_forward_pre_hook(self._enter(name)))
                self._handles.append(module.register_forward_hook(self._exit(name), always_call=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def reset(self) -> None:
        self.totals = dict.fromkeys(self.stages, 0.0)

    @contextmanager
    def measure(self, name: str) -> Iterator[None]:
        """Adds the wall time of the `with` body (code that is not a module call) to stage `name`."""
        self.sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.totals[name] += time.perf_counter() - start

    def _enter(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            if self._depth[name] == 0:
                self.sync()
                self._start[name] = time.perf_counter()
            self._depth[name] += 1
        return hook

    def _exit(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self._depth[name] -= 1
            if self._depth[name] == 0:
                self.sync()
                self.totals[name] += time.perf_counter() - self._start[name]
        return hook


OPERATOR_GROUPS = {  # name fragments of torch.profiler operator names
    # The forward under no_grad (named by _recorded_kernel), and autograd's wrappers of the forward and
    # the backward kernels ("GeneratedBackwardFor_m2f_ms_deform_attn_default[Backward]").
    "deformable_kernel": ("ms_deform_attn",),
    "dense": ("convolution", "addmm", "aten::mm", "aten::bmm"),
    "bmm": ("aten::bmm",),  # in m2f's forward: the mask products, one per prediction set
}


def top_operators(run: Callable[[], Any], *, device: str, count: int = 8) -> dict[str, Any]:
    """Profiles one run with torch.profiler: the operators with the most self time (CPU time on CPU,
    device time on CUDA), their share of the run's total, and the share of each OPERATOR_GROUPS group
    (m2f's deformable-attention kernel forward + backward; dense convolutions and matrix products; batched
    matrix products alone).

    Returns:
        {"operators": [{"name", "self_ms", "share", "calls"}], "group_shares": {group: share},
         "group_operators": {group: [operator names]}, "total_ms"}.
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if device == "cuda" else [])]
    with _recorded_kernel(), profile(activities=activities) as prof:
        run()
        synchronize(device)
    key = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, key) > 0]
    total = sum(getattr(e, key) for e in events)
    top = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:count]
    members = {group: [e for e in events if any(f in e.key for f in fragments)]
               for group, fragments in OPERATOR_GROUPS.items()}
    return {"operators": [{"name": e.key, "self_ms": getattr(e, key) / 1e3, "share": getattr(e, key) / total,
                           "calls": e.count} for e in top],
            "group_shares": {group: sum(getattr(e, key) for e in found) / total for group, found in members.items()},
            "group_operators": {group: sorted(e.key for e in found) for group, found in members.items()},
            "total_ms": total / 1e3}


@contextmanager
def _recorded_kernel() -> Iterator[None]:
    """Names m2f's deformable-attention calls in the profile. m2f calls its kernel through a Python
    custom op, which the profiler records only when autograd wraps it (training); under no_grad its time
    would belong to no operator at all."""
    from m2f import deformable_encoder

    original = deformable_encoder.ms_deform_attn

    def recorded(*args: Any, **kwargs: Any) -> Tensor:
        with torch.profiler.record_function("m2f::ms_deform_attn"):
            return original(*args, **kwargs)

    deformable_encoder.ms_deform_attn = recorded
    try:
        yield
    finally:
        deformable_encoder.ms_deform_attn = original


def operator_lines(profile: dict[str, Any], what: str) -> list[str]:
    """A markdown table of `top_operators` output."""
    shares = profile["group_shares"]
    lines = [f"Top operators of {what} (torch.profiler self time, {profile['total_ms']:.0f} ms in all; dense "
             f"convolutions and matrix products {100 * shares['dense']:.0f}%, m2f's deformable-attention kernel "
             f"{100 * shares['deformable_kernel']:.1f}%):", "",
             "| operator | calls | self ms | share |", "|---|---|---|---|"]
    lines += [f"| `{op['name']}` | {op['calls']} | {op['self_ms']:.0f} | {100 * op['share']:.1f}% |"
              for op in profile["operators"]]
    return lines


def box_targets(*, size: int, count: int, num_classes: int, device: str | torch.device = "cpu",
                shift: int = 0) -> dict[str, torch.Tensor]:
    """One image's training target: `count` square masks of growing size spread over a size x size image.

    Args:
        shift: moves every box (so the images of a batch differ).

    Returns:
        {"labels": (G,) int64, "masks": (G, size, size) bool}.
    """
    masks = torch.zeros(count, size, size, dtype=torch.bool, device=device)
    for g in range(count):
        y, x, s = ((g + shift) * 37) % (size // 2), ((g + shift) * 53) % (size // 2), size // 16 + g * size // 64
        masks[g, y: y + s, x: x + s] = True
    return {"labels": (torch.arange(count, device=device) + shift) % num_classes, "masks": masks}


# --------------------------------------------------------------------------------------------------
# The peer: transformers' Mask2Former with the same weights as the m2f model converted from it
# (`m2f.testing`, shared with the fidelity tests).

def thing_classes(num_classes: int) -> list[bool]:
    """Which classes are things: the first 80 of COCO panoptic's 133, the same share for other counts."""
    things = 80 if num_classes == 133 else max(1, round(num_classes * 80 / 133))
    return [k < things for k in range(num_classes)]


def forward_stages(model: nn.Module) -> dict[str, list[nn.Module]]:
    """The modules of each forward stage of an m2f or a transformers Mask2Former: the whole model,
    backbone, pixel decoder (and, inside it, the multi-scale deformable attention modules, projections
    included) and Transformer decoder."""
    from m2f.deformable_encoder import MSDeformAttn
    from m2f.model import Mask2Former

    if isinstance(model, Mask2Former):
        parts = {"backbone": model.backbone, "pixel_decoder": model.pixel_decoder,
                 "transformer_decoder": model.transformer_decoder}
        deformable: type[nn.Module] = MSDeformAttn
    else:
        from transformers.models.mask2former import modeling_mask2former as hf

        level = model.model.pixel_level_module
        parts = {"backbone": level.encoder, "pixel_decoder": level.decoder,
                 "transformer_decoder": model.model.transformer_module}
        deformable = hf.Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention
    stages = {"model": [model], **{name: [module] for name, module in parts.items()}}
    stages["deformable_attention"] = [m for m in parts["pixel_decoder"].modules() if isinstance(m, deformable)]
    return stages


def alternate(runs: dict[str, Callable[[], Any]], *, warmup: int, repeats: int, device: str,
              timers: dict[str, StageTimer] | None = None) -> dict[str, dict[str, Any]]:
    """Times the runs in turns (A B, B A, A B, ...), so a change of machine load hits every contender
    alike.

    Args:
        runs: name -> one complete run (its work and nothing else).
        warmup: untimed rounds first.
        repeats: timed rounds.
        timers: name -> an entered StageTimer whose modules the run calls (optional).

    Returns:
        name -> {"seconds": [per timed round], "stage_seconds": {stage: [per timed round]}}.
    """
    timers = timers or {}
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    stages: dict[str, dict[str, list[float]]] = {name: {} for name in runs}
    names = list(runs)
    for round_index in range(warmup + repeats):
        for name in names if round_index % 2 == 0 else names[::-1]:
            if name in timers:
                timers[name].reset()
            synchronize(device)
            start = time.perf_counter()
            runs[name]()
            synchronize(device)
            elapsed = time.perf_counter() - start
            if round_index < warmup:
                continue
            seconds[name].append(elapsed)
            for stage, total in (timers[name].totals.items() if name in timers else ()):
                stages[name].setdefault(stage, []).append(total)
    return {name: {"seconds": seconds[name], "stage_seconds": stages[name]} for name in runs}


# --------------------------------------------------------------------------------------------------
# Are the two models computing the same thing?

TOLERANCE = 1e-3  # |mask logit difference| within which a query counts as agreeing (fp32)
MIN_AGREEING = 0.99  # share of (prediction set, query) pairs that must agree within TOLERANCE
MAX_RELATIVE = 0.01  # no query may differ by more than this share of the largest |mask logit|


def logit_agreement(ours: dict[str, Any], theirs: Any, *, tolerance: float = TOLERANCE) -> dict[str, float]:
    """How closely the two models' outputs agree, over all prediction sets.

    Masked attention blocks a pixel where the (resized) mask logit is < 0. A few of the millions of
    logits lie within float32 rounding of 0, so the two implementations can block a different pixel
    for one query of a later layer, and that query then differs by more than rounding while every
    other one agrees to ~1e-5. So the gate is: at least MIN_AGREEING of the (set, query) pairs within
    `tolerance`, and none beyond MAX_RELATIVE of the logit range (wrong weights fail both by far).

    Returns:
        {"mask_logits_max_abs_diff", "class_logits_max_abs_diff", "mask_logits_abs_max",
         "queries_within_tolerance" (share of (set, query) pairs), "tolerance", "prediction_sets"}.
    """
    pairs = prediction_sets(ours, theirs)
    per_query = torch.cat([(a["pred_masks"].float() - b["masks_queries_logits"].float()).abs().flatten(2)
                           .amax(-1).flatten() for a, b in pairs])
    class_diff = max((a["pred_logits"].float() - b["class_queries_logits"].float()).abs().max().item()
                     for a, b in pairs)
    return {"mask_logits_max_abs_diff": per_query.max().item(), "class_logits_max_abs_diff": class_diff,
            "mask_logits_abs_max": max(a["pred_masks"].float().abs().max().item() for a, _ in pairs),
            "queries_within_tolerance": (per_query <= tolerance).float().mean().item(),
            "tolerance": tolerance, "prediction_sets": len(pairs)}


def check_agreement(stats: dict[str, float], what: str) -> None:
    """Raises AgreementError when `logit_agreement` stats fail the gate (see there)."""
    if (stats["queries_within_tolerance"] < MIN_AGREEING
            or stats["mask_logits_max_abs_diff"] > MAX_RELATIVE * stats["mask_logits_abs_max"]):
        raise AgreementError(
            f"{what}: m2f and transformers disagree: {100 * stats['queries_within_tolerance']:.1f}% of the "
            f"(prediction set, query) mask logits within {stats['tolerance']:g} (need {100 * MIN_AGREEING:g}%), "
            f"max |difference| {stats['mask_logits_max_abs_diff']:.2e} (limit {MAX_RELATIVE:g} x "
            f"{stats['mask_logits_abs_max']:.2f}); the comparison would not be apples to apples")
