"""The synthetic dataset: shaped things on amorphous stuff, written in the COCO 2017 layout.

`generate(out_dir, num_train=..., num_val=...)` writes (split = train / val)::

    out_dir/categories.json                         COCO panoptic categories (all 10)
    out_dir/{split}2017/<12-digit id>.png           RGB images (PNG: lossless, no JPEG artefacts)
    out_dir/annotations/panoptic_{split}2017.json   + panoptic_{split}2017/<id>.png (id = R + 256G + 256^2 B)
    out_dir/annotations/instances_{split}2017.json  things only: polygons, RLE, crowd as uncompressed RLE
    out_dir/annotations/semantic_{split}2017/<id>.png  uint8, 0 = void/crowd (ignore), c + 1 = class c

Every JSON holds its categories; panoptic and instance JSON `info` also records the scene knobs
and `area_ranges`, COCO's small/medium/large thresholds (32^2, 96^2 px at 640 px) scaled to the
image side: at 128 px small < 41 px^2 and large > 369 px^2. Set `COCOeval.params.areaRng` to
them so AP_S/M/L are all populated (pycocotools' absolute defaults leave AP_L empty at 128 px).

Polygons are traced from the visible raster mask and checked with pycocotools: rasterising the
polygons gives the identical mask (otherwise the object is stored as RLE). Crowd segments are
iscrowd = 1 in both JSON files and 0 (ignore) in the semantic PNGs.

Output is a function of the arguments only: each image draws from its own generator seeded by
(seed, split, index), so the files are byte-identical for a seed whatever the number of workers.
Speed: 1000 images at 128 px took 26 s (1 or 2 worker processes) on a 2-core machine shared with
other jobs (load average about 7); unloaded, one process takes about 22 ms per image, so about
22 s, or about 11 s with 2 worker processes. benchmarks/data_throughput.py measures it.
"""

import json
import multiprocessing
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from m2f.data.mask_codec import decode_segmentation, has_holes, id_to_rgb, mask_to_polygons, mask_to_rle
from m2f.data.synthetic_scene import SceneParams, render_scene, synthetic_categories

SPLITS = ("train", "val")
_SPLIT_CODE = {"train": 0, "val": 1}
_VAL_ID_OFFSET = 1_000_000  # image ids are unique across splits, as in COCO

# Named difficulty presets; "default" is meant to be learnable but not trivial for the "tiny"
# model in a few CPU minutes (not yet verified by training: adjust here once it has been).
DIFFICULTY: dict[str, SceneParams] = {
    "easy": SceneParams(objects_per_image=(1, 4), min_object_size=0.12, noise=0.02, color_overlap=0.15,
                        crowd_prob=0.05, blur=0.3),
    "default": SceneParams(),
    "hard": SceneParams(objects_per_image=(3, 12), min_object_size=0.04, noise=0.10, color_overlap=0.9,
                        texture_strength=0.35, illumination=0.3),
}


def area_ranges(image_size: int) -> dict[str, list[float]]:
    """COCO's area ranges (all, small < 32^2, medium < 96^2, large) scaled from 640 px to `image_size`.

    Returns:
        {"all": [0, 1e10], "small": [0, a], "medium": [a, b], "large": [b, 1e10]} in px^2, in
        pycocotools' `areaRng` order.
    """
    scale = (image_size / 640) ** 2
    small, large = 32**2 * scale, 96**2 * scale
    return {"all": [0.0, 1e10], "small": [0.0, small], "medium": [small, large], "large": [large, 1e10]}


@dataclass(frozen=True)
class _Job:
    out_dir: Path
    split: str
    index: int
    image_size: int
    seed: int
    scene: SceneParams
    return_truth: bool


def _bbox(mask: np.ndarray) -> list[int]:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]


def _instance_segmentation(mask: np.ndarray, prefer_rle: bool, iscrowd: bool) -> tuple[Any, str]:
    """COCO segmentation of a visible mask and its kind ("polygon", "rle" or "crowd")."""
    if iscrowd:
        return mask_to_rle(mask, compressed=False), "crowd"
    if not prefer_rle and not has_holes(mask):
        polygons = mask_to_polygons(mask)
        if np.array_equal(decode_segmentation(polygons, *mask.shape), mask):
            return polygons, "polygon"
    return mask_to_rle(mask), "rle"


def _make_image(job: _Job) -> dict[str, Any]:
    """Render and write one image with its PNG annotations; return its JSON entries and stats."""
    rng = np.random.default_rng([job.seed, _SPLIT_CODE[job.split], job.index])
    image_id = job.index + 1 + (_VAL_ID_OFFSET if job.split == "val" else 0)
    stem = f"{image_id:012d}"
    image, segments = render_scene(rng, job.image_size, job.scene)
    categories = synthetic_categories()
    size = job.image_size
    segment_ids: list[int] = []
    while len(segment_ids) < len(segments):  # random ids exercise all three RGB channels
        candidate = int(rng.integers(1, 256**3))
        if candidate not in segment_ids:
            segment_ids.append(candidate)
    ids = np.zeros((size, size), dtype=np.int64)
    semantic = np.zeros((size, size), dtype=np.uint8)
    segments_info, objects, kinds = [], [], []
    for seg, seg_id in zip(segments, segment_ids):
        ids[seg.mask] = seg_id
        if not seg.iscrowd:
            semantic[seg.mask] = categories.index(seg.category_id) + 1
        area, bbox = int(seg.mask.sum()), _bbox(seg.mask)
        segments_info.append({"id": seg_id, "category_id": seg.category_id, "iscrowd": int(seg.iscrowd),
                              "area": area, "bbox": bbox})
        if seg.isthing:
            segmentation, kind = _instance_segmentation(seg.mask, seg.prefer_rle, seg.iscrowd)
            kinds.append(kind)
            objects.append({"image_id": image_id, "category_id": seg.category_id, "segmentation": segmentation,
                            "area": area, "bbox": bbox, "iscrowd": int(seg.iscrowd)})
    split_dir = f"{job.split}2017"
    Image.fromarray(image).save(job.out_dir / split_dir / f"{stem}.png")
    Image.fromarray(id_to_rgb(ids)).save(job.out_dir / "annotations" / f"panoptic_{split_dir}" / f"{stem}.png")
    Image.fromarray(semantic).save(job.out_dir / "annotations" / f"semantic_{split_dir}" / f"{stem}.png")
    result = {
        "image": {"id": image_id, "file_name": f"{stem}.png", "height": size, "width": size},
        "panoptic": {"image_id": image_id, "file_name": f"{stem}.png", "segments_info": segments_info},
        "objects": objects,
        "kinds": kinds,
    }
    if job.return_truth:
        result["truth"] = {
            "image_id": image_id,
            "file_name": f"{stem}.png",
            "category_ids": [s.category_id for s in segments],
            "iscrowd": [s.iscrowd for s in segments],
            "masks": np.stack([s.mask for s in segments]) if segments else np.zeros((0, size, size), dtype=bool),
        }
    return result


def _write_json(path: Path, data: Any) -> None:
    with path.open("w") as f:
        json.dump(data, f, separators=(",", ":"))


def _run(jobs: list[_Job], num_workers: int) -> list[dict[str, Any]]:
    if num_workers <= 1 or len(jobs) < 32:
        return [_make_image(job) for job in jobs]
    # fork starts workers instantly; elsewhere spawn (each worker then imports m2f once).
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(num_workers) as pool:
        return pool.map(_make_image, jobs, chunksize=max(1, len(jobs) // (8 * num_workers)))


def generate(out_dir: str | Path, *, num_train: int, num_val: int, image_size: int = 128, seed: int = 0,
             difficulty: str | SceneParams = "default", num_workers: int | None = None,
             return_truth: bool = False) -> dict[str, Any]:
    """Generate the synthetic dataset (see the module docstring for the layout).

    The CLI `m2f data synth OUT --train N --val M --size S --seed K` maps onto
    `generate(OUT, num_train=N, num_val=M, image_size=S, seed=K)`.

    Args:
        out_dir: output root; created if needed. Existing files of the same names are overwritten.
        num_train: number of training images.
        num_val: number of validation images.
        image_size: side of the square images in pixels.
        seed: random seed; the same seed gives byte-identical files.
        difficulty: a name in `DIFFICULTY` ("easy", "default", "hard") or a `SceneParams` with
            the knobs (objects per image, object sizes, noise, colour overlap, crowd rate, ...).
        num_workers: worker processes; None = min(8, CPU count). Sets under 32 images run in-process.
        return_truth: also return the drawn ground truth (memory: G masks per image).

    Returns:
        Summary dict: "root", "image_size", "seed", "seconds", "categories" (COCO list),
        "area_ranges", "splits" {split: {"num_images", "image_dir", "panoptic_json", "panoptic_dir",
        "instances_json", "semantic_dir", "num_segments", "num_things", "num_crowd", "num_polygon",
        "num_rle", "thing_areas" {"small", "medium", "large"}}}, and with return_truth "truth"
        {split: [{"image_id", "file_name", "category_ids", "iscrowd", "masks" (G, H, W) bool}, ...]}
        with segments in the panoptic JSON's order.
    """
    if isinstance(difficulty, str) and difficulty not in DIFFICULTY:
        raise ValueError(f"unknown difficulty {difficulty!r}; choose from {list(DIFFICULTY)} or pass SceneParams")
    scene = DIFFICULTY[difficulty] if isinstance(difficulty, str) else difficulty
    if num_train < 0 or num_val < 0 or image_size < 16:
        raise ValueError(f"need num_train, num_val >= 0 and image_size >= 16, got {num_train}, {num_val}, "
                         f"{image_size}")
    start = time.perf_counter()
    root = Path(out_dir)
    categories = synthetic_categories()
    ranges = area_ranges(image_size)
    info = {"description": "m2f synthetic shapes", "version": "1", "image_size": image_size, "seed": seed,
            "scene": asdict(scene), "area_ranges": ranges}
    root.mkdir(parents=True, exist_ok=True)
    _write_json(root / "categories.json", categories.to_coco())
    workers = num_workers if num_workers is not None else min(8, os.cpu_count() or 1)
    summary: dict[str, Any] = {"root": str(root), "image_size": image_size, "seed": seed,
                               "categories": categories.to_coco(), "area_ranges": ranges, "splits": {}}
    truth: dict[str, list[dict[str, Any]]] = {}
    for split, count in zip(SPLITS, (num_train, num_val)):
        name = f"{split}2017"
        dirs = {"image_dir": root / name, "panoptic_dir": root / "annotations" / f"panoptic_{name}",
                "semantic_dir": root / "annotations" / f"semantic_{name}"}
        for folder in dirs.values():
            folder.mkdir(parents=True, exist_ok=True)
        jobs = [_Job(root, split, i, image_size, seed, scene, return_truth) for i in range(count)]
        results = _run(jobs, workers)
        objects = [obj for r in results for obj in r["objects"]]
        for ann_id, obj in enumerate(objects, start=1):
            obj["id"] = ann_id
        images = [r["image"] for r in results]
        panoptic_json = root / "annotations" / f"panoptic_{name}.json"
        instances_json = root / "annotations" / f"instances_{name}.json"
        _write_json(panoptic_json, {"info": info, "licenses": [], "images": images,
                                    "annotations": [r["panoptic"] for r in results],
                                    "categories": categories.to_coco()})
        _write_json(instances_json, {"info": info, "licenses": [], "images": images, "annotations": objects,
                                     "categories": categories.things().to_coco()})
        kinds = [k for r in results for k in r["kinds"]]
        areas = np.array([o["area"] for o in objects if not o["iscrowd"]], dtype=np.float64)
        summary["splits"][split] = {
            "num_images": count, **{k: str(v) for k, v in dirs.items()},
            "panoptic_json": str(panoptic_json), "instances_json": str(instances_json),
            "num_segments": sum(len(r["panoptic"]["segments_info"]) for r in results),
            "num_things": len(kinds), "num_crowd": kinds.count("crowd"),
            "num_polygon": kinds.count("polygon"), "num_rle": kinds.count("rle"),
            "thing_areas": {k: int(((areas >= lo) & (areas < hi)).sum())
                            for k, (lo, hi) in ranges.items() if k != "all"},
        }
        if return_truth:
            truth[split] = [r["truth"] for r in results]
    summary["seconds"] = time.perf_counter() - start
    if return_truth:
        summary["truth"] = truth
    return summary
