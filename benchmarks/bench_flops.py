"""How close m2f runs to the machine's FLOP limit: per stage, FLOPs, time, GFLOP/s and the share of a matmul
rate measured in the same run.

    python benchmarks/bench_flops.py [--device cpu|cuda] [--threads 2] [--repeats 5] [--warmup 2]
                                     [--size 800 1216] [--backbones r50 swin_t] [--out benchmarks/results]

Two workloads, each timed stage by stage in one process:
- inference: an m2f model with random weights (R50 / Swin-T, COCO panoptic, 133 classes, 100 queries), batch 1
  at `--size`, `inference_mode`: preprocess, backbone, pixel decoder, Transformer decoder, panoptic
  post-processing to the image size;
- the tiny training step (`--config tiny`: batch 8, 128 px, synthetic box targets): forward (backbone, pixel
  decoder, decoder), loss (matching + point losses on all 10 sets), backward, gradient clipping + AdamW.

FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` (matmuls, convolutions, attention; one
multiply-add = 2 FLOPs). It does not count the deformable attention's sampling (a custom op), grid_sample,
norms or elementwise work, so a stage's GFLOP/s is a lower bound on the work it does. The peak is the best of
`--repeats` fp32 (4096 x 4096) @ (4096 x 4096) matmuls and of one oneDNN/cuDNN 3x3 convolution of the
backbone's size, measured in the same process right before the workloads. Writes `<out>/flops_<device>.json`
and `.md`.
"""

import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
from common import (
    benchmark_parser,
    box_targets,
    inference_allocator,
    inference_allocator_option,
    machine_info,
    parse_or_work,
    synchronize,
    write_report,
)
from torch.utils.flop_counter import FlopCounterMode

BACKBONES = {"r50": "r50_coco_panoptic", "swin_t": "swin_t_coco_panoptic"}


Workload = list[tuple[str, Callable[[dict[str, Any]], None]]]


def measure(workload: Workload, *, warmup: int, repeats: int, device: str, peak: float,
            context: Callable[[], Any] = nullcontext) -> list[dict[str, Any]]:
    """Runs the workload's stages in order (each reads and writes a shared state dict) `warmup + repeats`
    times, timing every stage of the timed rounds, then once more with a FLOP counter around each stage.

    Returns:
        per stage and a final "total": {"stage", "gflop", "ms" (median), "gflop_per_s", "percent_of_peak"}.
    """
    seconds: dict[str, list[float]] = {name: [] for name, _ in workload}
    for round_index in range(warmup + repeats):
        state: dict[str, Any] = {}
        with context():
            for name, stage in workload:
                synchronize(device)
                start = time.perf_counter()
                stage(state)
                synchronize(device)
                if round_index >= warmup:
                    seconds[name].append(time.perf_counter() - start)
    flops: dict[str, int] = {}
    state = {}
    with context():
        for name, stage in workload:
            with FlopCounterMode(display=False) as counter:
                stage(state)
            flops[name] = counter.get_total_flops()
    rows = [{"stage": name, "gflop": flops[name] / 1e9, "ms": statistics.median(seconds[name]) * 1e3}
            for name, _ in workload]
    rows.append({"stage": "total", "gflop": sum(r["gflop"] for r in rows), "ms": sum(r["ms"] for r in rows)})
    for row in rows:
        row["gflop_per_s"] = row["gflop"] / (row["ms"] / 1e3)
        row["percent_of_peak"] = 100 * row["gflop_per_s"] / peak
    return rows


def best_seconds(run: Callable[[], Any], *, repeats: int, device: str) -> float:
    """The shortest of `repeats` timed calls (after one untimed)."""
    run()
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def measured_peak(device: str, repeats: int) -> dict[str, float]:
    """GFLOP/s of a large fp32 matmul and of a 3x3 convolution (the best of `repeats` each), and their max."""
    a, b = (torch.randn(4096, 4096, device=device) for _ in range(2))
    x = torch.randn(1, 256, 200, 304, device=device)
    conv = torch.nn.Conv2d(256, 256, 3, padding=1).to(device)
    rates = {}
    with torch.inference_mode():
        for name, run, flops in (("matmul", lambda: a @ b, 2 * 4096**3),
                                 ("conv3x3", lambda: conv(x), 2 * 256 * 256 * 9 * 200 * 304)):
            rates[f"{name}_gflop_per_s"] = flops / best_seconds(run, repeats=repeats, device=device) / 1e9
    rates["peak_gflop_per_s"] = max(rates.values())
    return rates


def inference_workload(backbone: str, size: tuple[int, int], device: str) -> Workload:
    """An m2f model with random weights, batch 1: preprocess, backbone, pixel decoder, decoder, panoptic
    post-processing to the image size."""
    from m2f.batchnorm_folding import fold_frozen_batchnorm
    from m2f.config import get_config
    from m2f.model import build_model
    from m2f.postprocess import postprocess

    torch.manual_seed(0)
    # No parameter needs a gradient: the flop counter's module hooks trip over views of parameters otherwise.
    model = build_model(get_config(BACKBONES[backbone])).to(device).eval().requires_grad_(False)
    fold_frozen_batchnorm(model)  # as `m2f predict` loads models
    image = torch.randint(0, 256, (1, 3, *size), dtype=torch.uint8, device=device)
    is_thing = [k < 80 for k in range(133)]

    def panoptic(s: dict[str, Any]) -> None:
        s["panoptic"] = postprocess(s["out"], task="panoptic", image_sizes=[size], padded_size=tuple(s["x"].shape[-2:]),
                                    is_thing=is_thing)

    return [("preprocess", lambda s: s.update(x=model.preprocess(image))),
            ("backbone", lambda s: s.update(features=model.backbone(s["x"]))),
            ("pixel_decoder", lambda s: s.update(pyramid=model.pixel_decoder(s["features"]))),
            # The final prediction set only, as m2f.predict (intermediate masks only where attention reads them).
            ("transformer_decoder", lambda s: s.update(out=model.transformer_decoder(s["pyramid"][1], s["pyramid"][0],
                                                                                     intermediate=False))),
            ("panoptic_postprocess", panoptic)]


def training_workload(device: str) -> Workload:
    """One step of the tiny preset (batch 8, 128 px, 6 box targets per image)."""
    from m2f.config import get_config
    from m2f.criterion import build_criterion
    from m2f.model import build_model
    from m2f.optim import build_optimizer

    torch.manual_seed(0)
    cfg = get_config("tiny")
    model = build_model(cfg).to(device, memory_format=torch.channels_last).train()  # as m2f.train runs it
    criterion = build_criterion(cfg)
    optimizer = build_optimizer(model, cfg.train)
    images = [torch.randint(0, 256, (3, 128, 128), dtype=torch.uint8, device=device) for _ in range(8)]
    targets = [box_targets(size=128, count=6, num_classes=cfg.model.num_classes, device=device, shift=i)
               for i in range(8)]

    def backward(s: dict[str, Any]) -> None:
        optimizer.zero_grad(set_to_none=True)
        s["loss"]["loss"].backward()

    def step(s: dict[str, Any]) -> None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip_grad_norm, foreach=True)
        optimizer.step()

    return [("backbone", lambda s: s.update(features=model.backbone(model.preprocess(images)))),
            ("pixel_decoder", lambda s: s.update(pyramid=model.pixel_decoder(s["features"]))),
            ("transformer_decoder", lambda s: s.update(out=model.transformer_decoder(s["pyramid"][1], s["pyramid"][0]))),
            ("loss (matching + point losses)", lambda s: s.update(loss=criterion(s["out"], targets))),
            ("backward", backward),
            ("clip + AdamW", step)]


def table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| stage | GFLOP | ms | GFLOP/s | % of peak |", "|---|---|---|---|---|"]
    lines += [f"| {r['stage']} | {r['gflop']:.2f} | {r['ms']:.1f} | {r['gflop_per_s']:.1f} | {r['percent_of_peak']:.0f}% |"
              for r in rows]
    return lines


def markdown(report: dict[str, Any]) -> str:
    meta, peak = report["meta"], report["peak"]
    lines = [f"# FLOP bound ({meta['device']}, {meta['processor']}, {meta['threads']} threads)", "",
             f"Measured peak in the same run: fp32 matmul {peak['matmul_gflop_per_s']:.0f} GFLOP/s, 3x3 convolution "
             f"{peak['conv3x3_gflop_per_s']:.0f} GFLOP/s; % of peak is against the larger. FLOPs from "
             "torch.utils.flop_counter (matmul, convolution, attention; not the deformable sampling, grid_sample, "
             "norms or elementwise work), so GFLOP/s is a lower bound on the work done. Median of "
             f"{meta['repeats']} runs after {meta['warmup']} warm-ups; `python benchmarks/bench_flops.py`"
             f"{'; glibc malloc keeping freed blocks, as `m2f predict` sets it' if meta.get('keep_freed_memory') else ''}.",
             ""]
    for name, rows in report["inference"].items():
        lines += [f"## Inference, {name} (batch 1, {meta['size'][0]}x{meta['size'][1]}, panoptic post-processing)",
                  "", *table(rows), ""]
    lines += ["## Training step, tiny preset (batch 8, 128x128)", "", *table(report["training"]), ""]
    return "\n".join(lines)


def main() -> None:
    parser = benchmark_parser(__doc__, repeats=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--size", type=int, nargs=2, default=(800, 1216))
    parser.add_argument("--backbones", nargs="+", choices=tuple(BACKBONES), default=list(BACKBONES))
    inference_allocator_option(parser)
    args = parse_or_work(parser, lambda spec: spec)
    if args is None:
        return
    kept = inference_allocator(args)
    peak = measured_peak(args.device, args.repeats)
    options = {"warmup": args.warmup, "repeats": args.repeats, "device": args.device,
               "peak": peak["peak_gflop_per_s"]}
    report = {"meta": {**machine_info(args.device, args.threads), "repeats": args.repeats, "warmup": args.warmup,
                       "size": list(args.size), "keep_freed_memory": kept},
              "peak": peak,
              "inference": {b: measure(inference_workload(b, tuple(args.size), args.device),
                                       context=torch.inference_mode, **options) for b in args.backbones},
              "training": measure(training_workload(args.device), **options)}
    json_path, md_path = write_report(args.out, f"flops_{args.device}", report, markdown(report))
    print(markdown(report))
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
