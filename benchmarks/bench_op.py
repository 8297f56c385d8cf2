"""MSDeformAttn op benchmark: the grid_sample reference against the compiled kernels, side by side.

    python benchmarks/bench_op.py [--device cpu|cuda] [--out benchmarks/results] [--threads 2]

For every shape, impl and mode (forward under no_grad; forward + backward) a fresh subprocess builds
the inputs, runs the op once to measure its peak memory, then times `--repeats` runs and reports the
median. Peak memory (`m2f.memory.PeakMemory`) is that first run's growth above the inputs: CPU, peak
RSS (high-water mark reset first), so cases never share a peak; CUDA, `max_memory_allocated`.
CUDA rows also report the achieved bandwidth: the unique bytes the op must touch (inputs, outputs and,
for the backward, the gradients) over the median time, against the H200's ~4.3 TB/s.

Sampling locations follow the encoder: every query is a pixel of one level and samples around its own
position on every level, with offsets of ~2 pixels (like trained offsets, unlike uniform noise, this
keeps the memory locality of the real op). Writes `<out>/op_<device>.json` and `<out>/op_<device>.md`.
"""

import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass

import torch
from common import benchmark_parser, cpu_name, parse_or_work, run_worker, write_report

from m2f.memory import PeakMemory

H200_BANDWIDTH = 4.3e12  # bytes/s, HBM3e


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    levels: tuple[tuple[int, int], ...]
    heads: int
    head_dim: int
    points: int

    @property
    def spatial(self) -> int:
        return sum(h * w for h, w in self.levels)


SHAPES = {
    "cpu": [
        Shape("tiny preset (B=8, 128x128 input)", 8, ((16, 16), (8, 8), (4, 4)), 4, 16, 4),
        Shape("mid (B=2, 512x512 input)", 2, ((64, 64), (32, 32), (16, 16)), 8, 32, 4),
    ],
    "cuda": [
        Shape("tiny preset (B=8, 128x128 input)", 8, ((16, 16), (8, 8), (4, 4)), 4, 16, 4),
        Shape("mid (B=2, 512x512 input)", 2, ((64, 64), (32, 32), (16, 16)), 8, 32, 4),
        Shape("R50 COCO inference (B=1, 800x1344)", 1, ((100, 168), (50, 84), (25, 42)), 8, 32, 4),
        Shape("R50 LSJ training (B=2, 1024x1024)", 2, ((128, 128), (64, 64), (32, 32)), 8, 32, 4),
    ],
}
DTYPES = {"cpu": ["float32"], "cuda": ["float32", "bfloat16"]}
MODES = ("fwd", "fwd+bwd")


def make_inputs(shape: Shape, dtype: torch.dtype, device: str, *, all_same_dtype: bool) -> list[torch.Tensor]:
    """(value, spatial_shapes, level_start_index, sampling_locations, attention_weights) for `shape`."""
    generator = torch.Generator().manual_seed(0)
    spatial_shapes = torch.tensor(shape.levels, dtype=torch.int64)
    sizes = spatial_shapes.prod(1)
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    levels, queries = len(shape.levels), shape.spatial
    centres = torch.cat([
        torch.stack(torch.meshgrid((torch.arange(w) + 0.5) / w, (torch.arange(h) + 0.5) / h, indexing="xy"), -1)
        .reshape(-1, 2) for h, w in shape.levels
    ])  # (Lq, 2) normalised (x, y) of each query's own pixel
    pixel = 1.0 / spatial_shapes.flip(-1).float()  # (L, 2) one pixel of each level, as (x, y)
    offsets = torch.randn(shape.batch, queries, shape.heads, levels, shape.points, 2, generator=generator)
    locations = centres[None, :, None, None, None, :] + 2.0 * offsets * pixel[None, None, None, :, None, :]
    weights = torch.rand(shape.batch, queries, shape.heads, levels, shape.points, generator=generator)
    weights = weights / weights.sum((-1, -2), keepdim=True)
    value = torch.randn(shape.batch, shape.spatial, shape.heads, shape.head_dim, generator=generator)
    sampling_dtype = dtype if all_same_dtype else torch.float32
    return [value.to(device, dtype), spatial_shapes.to(device), starts.to(device),
            locations.to(device, sampling_dtype), weights.to(device, sampling_dtype)]


def unique_bytes(shape: Shape, dtype: torch.dtype, mode: str) -> int:
    """Bytes the op has to read or write at least once: a DRAM-traffic floor."""
    value = shape.batch * shape.spatial * shape.heads * shape.head_dim
    out = shape.batch * shape.spatial * shape.heads * shape.head_dim  # Lq = S for the encoder
    samples = shape.batch * shape.spatial * shape.heads * len(shape.levels) * shape.points
    size = torch.tensor([], dtype=dtype).element_size()
    forward = (value + out) * size + samples * 3 * 4  # locations (2) and weights (1) in fp32
    if mode == "fwd":
        return forward
    # Backward reads grad_out, value, locations, weights and writes the three gradients.
    return forward + (out + 2 * value) * size + 2 * samples * 3 * 4


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def worker(spec: dict) -> dict:
    """Runs one (shape, impl, dtype, mode) case in this fresh process and returns its measurements."""
    from m2f.ops import ms_deform_attn

    torch.set_num_threads(spec["threads"])
    device, impl, mode = spec["device"], spec["impl"], spec["mode"]
    shape = Shape(**{**spec["shape"], "levels": tuple(map(tuple, spec["shape"]["levels"]))})
    dtype = getattr(torch, spec["dtype"])
    # grid_sample needs the grid in the dtype of the input, so the reference gets 16-bit locations.
    value, shapes, starts, locations, weights = make_inputs(shape, dtype, device, all_same_dtype=impl == "torch")
    leaves = [t.requires_grad_(mode == "fwd+bwd") for t in (value, locations, weights)]
    grad_output = torch.randn(shape.batch, shape.spatial, shape.heads * shape.head_dim, device=device, dtype=dtype)

    def run() -> None:
        if mode == "fwd":
            with torch.no_grad():
                ms_deform_attn(value, shapes, starts, locations, weights, impl=impl)
        else:
            for leaf in leaves:
                leaf.grad = None
            ms_deform_attn(value, shapes, starts, locations, weights, impl=impl).backward(grad_output)

    # Warm everything up (kernel load, OpenMP pool, CUDA context) on 8 queries of one image, then measure
    # the peak of one full run before timing, so the peak is this case's own.
    with torch.no_grad():
        ms_deform_attn(value[:1], shapes, starts, locations[:1, :8], weights[:1, :8], impl=impl)
    synchronize(device)
    memory = PeakMemory(device=device).start()
    run()
    peak_mb = memory.peak_bytes() / 2**20
    times = []
    for _ in range(spec["repeats"]):
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    row = {**spec, "median_ms": median * 1e3, "min_ms": min(times) * 1e3, "peak_mb": peak_mb}
    if device == "cuda":
        row["unique_mb"] = unique_bytes(shape, dtype, mode) / 2**20
        row["bandwidth_gbs"] = unique_bytes(shape, dtype, mode) / median / 1e9
        row["of_h200_peak"] = unique_bytes(shape, dtype, mode) / median / H200_BANDWIDTH
    return row


def markdown(report: dict) -> str:
    """The rows as one table per dtype: reference vs kernel with time and memory ratios."""
    meta = report["meta"]
    kernel = report["kernel_impl"]
    lines = [
        f"# MSDeformAttn op benchmark ({meta['device']})", "",
        f"{meta['date']}, torch {meta['torch']}, {meta['processor']}, {meta['threads']} threads, "
        f"load average before/after {meta['load_before']:.2f}/{meta['load_after']:.2f}. "
        f"Median of {meta['repeats']} runs; peak memory of one run in a fresh process "
        f"({'peak RSS growth' if meta['device'] == 'cpu' else 'max_memory_allocated above the inputs'}).",
        "",
    ]
    rows = {(r["shape"]["name"], r["dtype"], r["mode"], r["impl"]): r for r in report["rows"]}
    for dtype in DTYPES[meta["device"]]:
        header = (f"| shape | mode | torch ms | {kernel} ms | speed-up | torch peak MB | {kernel} peak MB "
                  "| memory ratio |")
        bandwidth = meta["device"] == "cuda"
        if bandwidth:
            header += " unique MB | GB/s | of 4.3 TB/s |"
        lines += [f"## {dtype}", "", header, "|" + "---|" * (header.count("|") - 1)]
        for shape in SHAPES[meta["device"]]:
            for mode in MODES:
                ref, ker = rows[(shape.name, dtype, mode, "torch")], rows[(shape.name, dtype, mode, kernel)]
                # Below ~0.1 MB the RSS growth is noise: the allocator reuses pages the process already has.
                ratio = f"{ref['peak_mb'] / ker['peak_mb']:.1f}x" if ker["peak_mb"] >= 0.1 else "n/a (< 0.1 MB)"
                line = (f"| {shape.name} | {mode} | {ref['median_ms']:.2f} | {ker['median_ms']:.2f} | "
                        f"{ref['median_ms'] / ker['median_ms']:.1f}x | {ref['peak_mb']:.1f} | {ker['peak_mb']:.1f} | "
                        f"{ratio} |")
                if bandwidth:
                    line += f" {ker['unique_mb']:.1f} | {ker['bandwidth_gbs']:.0f} | {100 * ker['of_h200_peak']:.1f}% |"
                lines.append(line)
        lines.append("")
    lines += [
        "Peak memory is what the op adds on top of its inputs: the reference materialises the sampled values "
        "(B*M, D, Lq, L*P) several times (per-level grid_sample outputs, their stack, the weighted product) and keeps "
        "one for backward; the kernels allocate only outputs and gradients. A kernel output smaller than the pages "
        "the process already holds does not grow the peak RSS fully (or at all), so at the tiny shape the kernel's "
        "peak is an underestimate and its memory ratio overstates the gain; the mid shape is the meaningful memory "
        "comparison.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    args = parse_or_work(benchmark_parser(__doc__, repeats=7), worker)
    if args is None:
        return
    load_before = os.getloadavg()[0]
    rows = []
    for shape in SHAPES[args.device]:
        for dtype in DTYPES[args.device]:
            for mode in MODES:
                for impl in ("torch", args.device):
                    spec = {"shape": asdict(shape), "impl": impl, "dtype": dtype, "mode": mode,
                            "device": args.device, "threads": args.threads, "repeats": args.repeats}
                    rows.append(run_worker(__file__, spec))
                    print(f"{shape.name:38s} {dtype:9s} {mode:8s} {impl:6s} {rows[-1]['median_ms']:9.2f} ms "
                          f"{rows[-1]['peak_mb']:9.1f} MB", flush=True)
    report = {
        "meta": {
            "device": args.device,
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "torch": torch.__version__,
            "processor": torch.cuda.get_device_name() if args.device == "cuda" else cpu_name(),
            "threads": args.threads,
            "repeats": args.repeats,
            "load_before": load_before,
            "load_after": os.getloadavg()[0],
            "python": platform.python_version(),
        },
        "kernel_impl": args.device,
        "rows": rows,
    }
    write_report(args.out, f"op_{args.device}", report, markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
