"""Reading COCO JSON, COCO ground truth and COCO panoptic PNGs with errors that name the file."""

import contextlib
import io
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools.coco import COCO


def read_json(path: str | Path, what: str) -> Any:
    """Loads a JSON file, with errors that name the file.

    Args:
        path: the file.
        what: what the file should be, for error messages ("ground-truth panoptic JSON", ...).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not valid JSON.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        with path.open() as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: {what} is not valid JSON ({e})") from e


def read_panoptic_png(path: str | Path) -> np.ndarray:
    """Reads a COCO panoptic PNG into segment ids, id = R + 256*G + 256^2*B (0 = void).

    Returns:
        (H, W) int64 segment ids.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not an RGB image.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"panoptic PNG not found: {path}")
    with Image.open(path) as im:
        if im.mode != "RGB":
            raise ValueError(f"{path}: panoptic PNGs must be RGB, got mode {im.mode}")
        rgb = np.asarray(im, dtype=np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


def write_panoptic_png(path: str | Path, ids: np.ndarray) -> None:
    """Writes (H, W) segment ids (< 256^3) as a COCO panoptic RGB PNG."""
    ids = np.asarray(ids, dtype=np.int64)
    if ids.ndim != 2 or ids.min(initial=0) < 0 or ids.max(initial=0) >= 256**3:
        raise ValueError(f"{path}: segment ids must be a (H, W) array in [0, 256^3), got shape {ids.shape}")
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)
    Image.fromarray(rgb, mode="RGB").save(path)


def load_coco(ground_truth: str | Path | Mapping[str, Any] | COCO) -> COCO:
    """A pycocotools `COCO` ground truth from a JSON path, a loaded dict or an existing `COCO` (as is).

    Raises:
        FileNotFoundError / ValueError: missing or unreadable file, or a dict without the COCO keys.
    """
    if isinstance(ground_truth, COCO):
        return ground_truth
    if isinstance(ground_truth, str | Path):
        source, dataset = str(ground_truth), read_json(ground_truth, "COCO ground-truth JSON")
    else:
        source, dataset = "ground-truth dict", dict(ground_truth)
    missing = [k for k in ("images", "annotations", "categories") if k not in dataset]
    if missing:
        raise ValueError(f"{source}: COCO ground truth lacks the keys {missing}")
    coco = COCO()
    coco.dataset = dataset
    # pycocotools prints progress; evaluation output should stay clean.
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco
