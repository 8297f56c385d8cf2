"""Throughput and peak memory of per-layer evaluation: post-processing + PQ + AP + mIoU for every
prediction set of synthetic images with random predictions.

Default workload: 500 images of 128 x 128, Q = 100 queries, K = 10 classes (7 things, 3 stuff),
10 prediction sets (as the paper's 9 decoder layers give), batches of 8, on the CPU. Ground truth is
synthetic (a few thing rectangles on stuff bands); predictions are random, with about 10 confident
queries per set so panoptic inference has segments to build.

    python benchmarks/eval_throughput.py            # writes benchmarks/results/eval_throughput.{json,md}
"""

import argparse
import json
import os
import platform
import resource
import time
from pathlib import Path

import numpy as np
import torch
from common import RESULTS, write_report

from m2f.evaluation import LayerwiseEvaluator, encode_masks


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def synthetic_ground_truth(rng: np.random.Generator, num_images: int, size: int, num_things: int,
                           num_classes: int) -> tuple[list, dict]:
    """Per image (id map, segments_info) and a COCO instances dict of the thing segments."""
    panoptic, annotations = [], []
    for image_id in range(1, num_images + 1):
        ids = np.zeros((size, size), dtype=np.int64)
        segments = []
        edges = np.sort(rng.choice(np.arange(8, size - 8), size=2, replace=False))
        for band, (top, bottom) in enumerate(zip([0, *edges], [*edges, size])):
            ids[top:bottom] = band + 1
            segments.append({"id": band + 1, "category_id": int(rng.integers(num_things, num_classes)) + 1,
                             "iscrowd": 0})
        for _ in range(int(rng.integers(2, 6))):
            h, w = rng.integers(8, size // 2, size=2)
            y, x = rng.integers(0, size - h), rng.integers(0, size - w)
            segment_id = len(segments) + 1
            ids[y : y + h, x : x + w] = segment_id
            segments.append({"id": segment_id, "category_id": int(rng.integers(0, num_things)) + 1,
                             "iscrowd": 0})
        present = set(np.unique(ids).tolist())
        segments = [s for s in segments if s["id"] in present]
        for s in segments:
            if s["category_id"] <= num_things:
                mask = ids == s["id"]
                ys, xs = mask.nonzero()
                annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                    "category_id": s["category_id"],
                                    "segmentation": encode_masks(mask[None])[0],
                                    "area": float(mask.sum()), "iscrowd": 0,
                                    "bbox": [float(xs.min()), float(ys.min()), float(np.ptp(xs) + 1),
                                             float(np.ptp(ys) + 1)]})
        panoptic.append((ids, segments))
    instances = {"images": [{"id": i, "height": size, "width": size} for i in range(1, num_images + 1)],
                 "annotations": annotations,
                 "categories": [{"id": c + 1, "name": f"thing{c}"} for c in range(num_things)]}
    return panoptic, instances


def random_outputs(generator: torch.Generator, batch: int, queries: int, classes: int, size: int,
                   sets: int) -> dict:
    def one_set() -> dict:
        logits = torch.randn(batch, queries, classes + 1, generator=generator)
        confident = torch.randint(0, queries, (batch, 10), generator=generator)
        labels = torch.randint(0, classes, (batch, 10), generator=generator)
        logits.scatter_(2, labels[..., None], 0.0)
        rows = torch.arange(batch)[:, None].expand_as(confident)
        logits[rows, confident, labels] = 8.0
        masks = torch.randn(batch, queries, size // 4, size // 4, generator=generator) * 4
        return {"pred_logits": logits, "pred_masks": masks}

    final = one_set()
    return {**final, "aux_outputs": [one_set() for _ in range(sets - 1)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--things", type=int, default=7)
    parser.add_argument("--sets", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    # One intra-op thread: the ops are small, and on a loaded 2-core machine OpenMP's thread
    # hand-offs made every op ~16 ms at 2 threads (8x slower overall).
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "eval_throughput")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rng = np.random.default_rng(0)
    generator = torch.Generator().manual_seed(0)
    panoptic, instances = synthetic_ground_truth(rng, args.images, args.size, args.things, args.classes)
    categories = [{"id": c + 1, "isthing": int(c < args.things)} for c in range(args.classes)]
    rss_before = peak_rss_mib()

    evaluator = LayerwiseEvaluator(categories=categories, instance_ground_truth=instances,
                                   num_prediction_sets=args.sets)
    update_seconds = 0.0
    for start in range(0, args.images, args.batch):
        image_ids = list(range(start + 1, min(start + args.batch, args.images) + 1))
        outputs = random_outputs(generator, len(image_ids), args.queries, args.classes, args.size, args.sets)
        tic = time.perf_counter()
        evaluator.update(outputs, image_ids=image_ids, image_sizes=[(args.size, args.size)] * len(image_ids),
                         panoptic_targets=[panoptic[i - 1] for i in image_ids])
        update_seconds += time.perf_counter() - tic
    rss_after_update = peak_rss_mib()
    tic = time.perf_counter()
    results = evaluator.compute()
    compute_seconds = time.perf_counter() - tic

    total = update_seconds + compute_seconds
    record = {
        "workload": {k: v for k, v in vars(args).items() if k != "out"},
        "update_seconds": round(update_seconds, 2),
        "compute_seconds": round(compute_seconds, 2),
        "total_seconds": round(total, 2),
        "image_sets_per_second": round(args.images * args.sets / total, 1),
        "peak_rss_mib_before_evaluation": round(rss_before, 1),
        "peak_rss_mib_after_updates": round(rss_after_update, 1),
        "peak_rss_mib_final": round(peak_rss_mib(), 1),
        "final_set_metrics": {"PQ": results[-1]["panoptic"]["All"]["pq"],
                              "mIoU": results[-1]["semantic"]["mIoU"], "AP": results[-1]["instance"]["AP"]},
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                    "load_average_1min_at_end": round(os.getloadavg()[0], 2)},
    }
    w = record["workload"]
    lines = [
        "# Per-layer evaluation throughput (post-processing + PQ + AP + mIoU)",
        "",
        f"{w['images']} synthetic images of {w['size']} px, Q={w['queries']}, K={w['classes']}, "
        f"{w['sets']} prediction sets, batch {w['batch']}, {w['threads']} CPU threads, random predictions.",
        "",
        "| phase | seconds |",
        "|---|---|",
        f"| update (post-processing, PQ, mIoU, RLE encoding) | {record['update_seconds']} |",
        f"| compute (COCOeval for AP, summaries) | {record['compute_seconds']} |",
        f"| total | {record['total_seconds']} |",
        "",
        f"Throughput: {record['image_sets_per_second']} image x prediction-set evaluations per second.",
        f"Peak RSS: {record['peak_rss_mib_before_evaluation']} MiB before evaluation (data + imports), "
        f"{record['peak_rss_mib_after_updates']} MiB after all updates, "
        f"{record['peak_rss_mib_final']} MiB at the end. The growth is the COCO RLE result list that AP needs "
        "(random pixel-noise masks make long RLEs, about 2 KB per detection; smooth real masks are far shorter).",
        f"Machine: {record['machine']['cpus']} CPUs, 1-min load average {record['machine']['load_average_1min_at_end']}"
        " at the end (shared machine; other jobs were running).",
        "",
    ]
    write_report(args.out.parent, args.out.name, record, "\n".join(lines))
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
