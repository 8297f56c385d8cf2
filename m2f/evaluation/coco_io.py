"""COCO ground truth and panoptic PNGs for evaluation, with errors that name the file (the JSON and PNG
readers are the data package's, `m2f.data.image_io`)."""

import contextlib
import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools.coco import COCO

from m2f.data.image_io import read_json
from m2f.data.mask_codec import id_to_rgb


def write_panoptic_png(path: str | Path, ids: np.ndarray) -> None:
    """Writes (H, W) segment ids (< 256^3) as a COCO panoptic RGB PNG."""
    ids = np.asarray(ids, dtype=np.int64)
    if ids.ndim != 2 or ids.min(initial=0) < 0 or ids.max(initial=0) >= 256**3:
        raise ValueError(f"{path}: segment ids must be a (H, W) array in [0, 256^3), got shape {ids.shape}")
    Image.fromarray(id_to_rgb(ids), mode="RGB").save(path)


def load_coco(ground_truth: str | Path | Mapping[str, Any] | COCO) -> COCO:
    """A pycocotools `COCO` ground truth from a JSON path, a loaded dict or an existing `COCO` (as is).

    Raises:
        FileNotFoundError / ValueError: missing or unreadable file, or a dict without the COCO keys.
    """
    if isinstance(ground_truth, COCO):
        return ground_truth
    if isinstance(ground_truth, str | Path):
        source, dataset = str(ground_truth), read_json(ground_truth, what="COCO ground-truth JSON")
    else:
        source, dataset = "ground-truth dict", dict(ground_truth)
    missing = [k for k in ("images", "annotations", "categories") if k not in dataset]
    if missing:
        raise ValueError(f"{source}: COCO ground truth lacks the keys {missing}")
    unusable = [i for i, a in enumerate(dataset["annotations"]) if not {"segmentation", "image_id", "category_id"} <= set(a)]
    if unusable:
        raise ValueError(f"{source}: annotations[{unusable[0]}] (and {len(unusable) - 1} more) lack 'segmentation', "
                         f"'image_id' or 'category_id'; mask evaluation needs polygon or RLE segmentations")
    coco = COCO()
    coco.dataset = dataset
    # pycocotools prints progress; evaluation output should stay clean.
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco
