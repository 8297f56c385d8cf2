"""Data pipeline speed: synthetic generation time and panoptic loader throughput.

Measures
1. `m2f.data.synthetic.generate` for 1000 images at 128 px with 1 and 2 worker processes;
2. images/s of the COCO panoptic loader with the LSJ training transforms (128 px, scale 0.1-2.0)
   through a torch DataLoader (batch 8, `m2f.data.collate`) with 0, 1 and 2 workers on a
   200-image synthetic set: the first epoch (including worker start-up) and a second epoch with
   persistent workers (steady state).
Writes benchmarks/results/data_throughput.{json,md}.

Usage: python benchmarks/data_throughput.py [--images 200] [--generate 1000] [--epochs 2]
"""

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from m2f.data import build_dataset, build_train_transforms, collate
from m2f.data.synthetic import generate

RESULTS = Path(__file__).resolve().parent / "results"


def loader_throughput(root: Path, num_workers: int, epochs: int) -> dict[str, float]:
    dataset = build_dataset("coco_panoptic", root, "train", "panoptic", build_train_transforms("panoptic", 128))
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, shuffle=True, collate_fn=collate,
                                         num_workers=num_workers, persistent_workers=num_workers > 0,
                                         generator=torch.Generator().manual_seed(0))
    rates = []
    for _ in range(epochs):
        start = time.perf_counter()
        count = sum(images.shape[0] for images, _, _ in loader)
        rates.append(count / (time.perf_counter() - start))
    return {"first_epoch_images_per_s": rates[0], "steady_images_per_s": rates[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--generate", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)  # one thread per process, as in DataLoader workers
    result: dict = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                    "load_average_at_start": list(os.getloadavg())},
        "generate": {},
        "loader": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for workers in (1, 2):
            summary = generate(Path(tmp) / f"gen{workers}", num_train=args.generate, num_val=0, image_size=128,
                               num_workers=workers)
            result["generate"][f"{workers}_workers_seconds"] = round(summary["seconds"], 2)
            print(f"generate {args.generate} images at 128 px, {workers} worker(s): {summary['seconds']:.1f} s")
        root = Path(tmp) / "bench"
        generate(root, num_train=args.images, num_val=0, image_size=128)
        for workers in (0, 1, 2):
            rates = loader_throughput(root, workers, args.epochs)
            result["loader"][f"{workers}_workers"] = {k: round(v, 1) for k, v in rates.items()}
            print(f"loader, {workers} worker(s): {rates}")
    result["machine"]["load_average_at_end"] = list(os.getloadavg())
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "data_throughput.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Data pipeline throughput",
        "",
        f"Machine: {result['machine']['cpus']} CPUs, Python {result['machine']['python']}, torch "
        f"{result['machine']['torch']}, load average at start {result['machine']['load_average_at_start'][0]:.1f}.",
        "",
        f"Synthetic generation, {args.generate} images at 128 px:",
        "",
        "| worker processes | seconds |",
        "|---|---|",
        *(f"| {k.split('_')[0]} | {v} |" for k, v in result["generate"].items()),
        "",
        f"COCO panoptic loader + LSJ (128 px, scale 0.1-2.0), batch 8, {args.images} images:",
        "",
        "| DataLoader workers | first epoch (images/s) | steady state (images/s) |",
        "|---|---|---|",
        *(f"| {k.split('_')[0]} | {v['first_epoch_images_per_s']} | {v['steady_images_per_s']} |"
          for k, v in result["loader"].items()),
        "",
    ]
    (RESULTS / "data_throughput.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
