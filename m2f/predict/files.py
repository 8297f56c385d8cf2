"""The files of `m2f predict`: reading input images with notes on what was converted, and writing each
image's results in the COCO formats that `m2f eval-files`, panopticapi and pycocotools read.

Per image STEM under the output folder (`OutputPaths`):
    panoptic/STEM.png   COCO panoptic PNG (id = R + 256 G + 256^2 B, 0 = void)
    panoptic/STEM.json  its annotation {"image_id", "file_name", "segments_info": [{"id", "category_id",
                        "isthing", "score", "area"}]} (dataset category ids)
    instances/STEM.json COCO result list [{"image_id", "category_id", "segmentation" (RLE), "score", "bbox"}]
    semantic/STEM.png   the category id of each pixel (0 = none; 16-bit when an id exceeds 255), as
                        ADE20K's label PNGs
    overlay/STEM.png    the picture (`m2f.predict.draw`)
and, assembled from all per-image files, panoptic.json ({"annotations", "categories"}) and
instances.json (one list), the files `m2f eval-files` takes.
"""

import io
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from m2f.data.categories import Categories
from m2f.predict.results import Prediction

_ORIENTATION_TAG = 0x0112  # EXIF Orientation; 1 = as stored


def read_input(path: str | Path) -> tuple[np.ndarray, list[str]]:
    """An input image as RGB uint8 (`m2f.data.image_io` rules), and notes on what was converted.

    Returns:
        (H, W, 3) uint8 RGB after the EXIF orientation, and e.g. ["mode I;16 converted to RGB",
        "EXIF orientation 6 applied"] (empty for a plain RGB file).
    """
    from m2f.data.image_io import decode_image

    path = Path(path)
    data = path.read_bytes()
    image, mode = decode_image(data, name=str(path))
    notes = [] if mode == "RGB" else [f"mode {mode} converted to RGB"]
    try:
        orientation = Image.open(io.BytesIO(data)).getexif().get(_ORIENTATION_TAG, 1)
    except (OSError, SyntaxError, ValueError):
        orientation = 1
    if orientation not in (None, 1):
        notes.append(f"EXIF orientation {orientation} applied")
    return image, notes


@dataclass(frozen=True)
class OutputPaths:
    """Where the results of one image go (see the module docstring)."""

    root: Path
    stem: str

    def panoptic_png(self) -> Path:
        return self.root / "panoptic" / f"{self.stem}.png"

    def panoptic_json(self) -> Path:
        return self.root / "panoptic" / f"{self.stem}.json"

    def instances_json(self) -> Path:
        return self.root / "instances" / f"{self.stem}.json"

    def semantic_png(self) -> Path:
        return self.root / "semantic" / f"{self.stem}.png"

    def overlay_png(self) -> Path:
        return self.root / "overlay" / f"{self.stem}.png"

    def results(self, task: str) -> list[Path]:
        """The machine-readable files of `task` (the overlay is written after them)."""
        return {"panoptic": [self.panoptic_png(), self.panoptic_json()], "instance": [self.instances_json()],
                "semantic": [self.semantic_png()]}[task]

    def finished(self, task: str) -> bool:
        """Whether this image is done: the overlay is written last, so its presence means all is there."""
        return self.overlay_png().is_file() and all(p.is_file() for p in self.results(task))


def _atomic(path: Path, write: Any) -> None:
    # A run killed mid-write leaves a .tmp, never a truncated file that a resumed run would take as done.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")  # the suffix kept: Pillow picks the format by it
    write(tmp)
    os.replace(tmp, path)


def _write_json(path: Path, data: Any) -> None:
    _atomic(path, lambda p: p.write_text(json.dumps(data)))


def _save_png(path: Path, image: Image.Image) -> None:
    _atomic(path, image.save)


def write_results(paths: OutputPaths, prediction: Prediction, *, image_id: int | str, file_name: str) -> None:
    """Writes one image's machine-readable results for `prediction.task`."""
    from m2f.evaluation import encode_masks, write_panoptic_png

    if prediction.task == "panoptic":
        segments = [{"id": s.id, "category_id": s.category_id, "isthing": int(s.isthing), "score": s.score,
                     "area": s.area} for s in prediction.segments]
        _atomic(paths.panoptic_png(), lambda p: write_panoptic_png(p, prediction.panoptic_seg))
        _write_json(paths.panoptic_json(), {"image_id": image_id, "file_name": paths.panoptic_png().name,
                                            "source_file": file_name, "segments_info": segments})
    elif prediction.task == "instance":
        masks = np.stack([s.mask for s in prediction.segments]) if prediction.segments else np.zeros((0, 1, 1), bool)
        import pycocotools.mask as mask_utils

        rles = encode_masks(masks)
        boxes = mask_utils.toBbox([{**r, "counts": r["counts"].encode()} for r in rles]).tolist() if rles else []
        _write_json(paths.instances_json(), [
            {"image_id": image_id, "category_id": s.category_id, "segmentation": rle, "score": s.score, "bbox": box}
            for s, rle, box in zip(prediction.segments, rles, boxes)])
    else:
        ids = np.zeros(prediction.image_size, np.int32)
        for s in prediction.segments:
            ids[s.mask] = s.category_id
        dtype = np.uint8 if ids.max(initial=0) < 256 else np.uint16
        _save_png(paths.semantic_png(), Image.fromarray(ids.astype(dtype)))


def assemble(root: Path, stems: Iterable[str], *, task: str, categories: Categories) -> Path | None:
    """The combined results file of all images (those with results) for `m2f eval-files`: panoptic.json or
    instances.json under `root`; None for semantic (its PNGs are the result)."""
    if task == "semantic":
        return None
    found = [OutputPaths(root, s) for s in stems]
    if task == "panoptic":
        annotations = [json.loads(p.panoptic_json().read_text()) for p in found if p.panoptic_json().is_file()]
        target = root / "panoptic.json"
        _write_json(target, {"annotations": annotations, "categories": categories.to_coco()})
    else:
        detections = [d for p in found if p.instances_json().is_file() for d in json.loads(p.instances_json().read_text())]
        target = root / "instances.json"
        _write_json(target, detections)
    return target


def image_ids_from(ground_truth: str | Path) -> dict[str, int | str]:
    """File name and stem -> image id of a COCO JSON's "images" (so results match that ground truth)."""
    from m2f.data.image_io import read_json

    data: Mapping[str, Any] = read_json(ground_truth, what="COCO JSON with images")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{ground_truth}: a COCO JSON with an 'images' list is needed for image ids")
    ids: dict[str, int | str] = {}
    for entry in data["images"]:
        name = Path(entry["file_name"]).name
        ids[name] = ids[Path(name).stem] = entry["id"]
    return ids


def image_id_of(path: Path, ids: Mapping[str, int | str] | None) -> int | str:
    """The image id of an input file: from `ids` (a ground truth's, by file name or stem), else the stem as
    an int when it is one (COCO's 000000139.jpg -> 139), else the stem."""
    if ids is not None:
        for key in (path.name, path.stem):
            if key in ids:
                return ids[key]
        raise ValueError(f"{path.name} is not among the ground truth's images")
    return int(path.stem) if path.stem.isdigit() else path.stem
