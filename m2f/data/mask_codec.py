"""COCO encodings of binary masks: pixel-exact polygons, RLE, and panoptic id <-> RGB.

Polygons are traced along pixel edges (vertices on the integer pixel-corner grid, pixel (r, c)
covering [c, c+1] x [r, r+1]). pycocotools samples each column at its pixel centre, so such a
polygon rasterises back to exactly the traced pixels. COCO merges the polygons of one object by
union and has no holes, so a mask with holes (a background region not 4-connected to the image
border) must be stored as RLE; `has_holes` tells which.
"""

from typing import Any

import numpy as np
import pycocotools.mask as mask_utils
from scipy import ndimage


def _bounding_crop(mask: np.ndarray) -> tuple[np.ndarray, int, int]:
    """The mask inside its bounding box, and the box's top-left (row, column); (0, 0) if empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return mask[:0, :0], 0, 0
    cols = np.flatnonzero(mask.any(axis=0))
    return mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1], int(rows[0]), int(cols[0])


def has_holes(mask: np.ndarray) -> bool:
    """Whether a (H, W) bool mask encloses background that is not 4-connected to the border."""
    crop = _bounding_crop(mask)[0]  # background outside the box is connected to the border anyway
    return bool((ndimage.binary_fill_holes(crop) != crop).any())


def mask_to_polygons(mask: np.ndarray) -> list[list[float]]:
    """Trace the outlines of a hole-free mask as COCO polygons.

    Boundary edges are oriented with the object on the right-hand side; where two pixels of the
    mask touch only at a corner the trace turns towards the pixel it came along, so every loop is
    a simple outline of a 4-connected part. Collinear vertices are dropped.

    Args:
        mask: (H, W) bool, without holes (see `has_holes`).

    Returns:
        One flat [x0, y0, x1, y1, ...] list per outline loop; empty for an empty mask.
    """
    mask, top, left = _bounding_crop(mask)
    h, w = mask.shape
    padded = np.zeros((h + 2, w + 2), dtype=bool)
    padded[1:-1, 1:-1] = mask
    inside = padded[1:-1, 1:-1]
    edges = []  # (x0, y0, x1, y1) per side of a mask pixel that borders the outside
    for outside, (ax, ay, bx, by) in (
        (~padded[:-2, 1:-1], (0, 0, 1, 0)),  # top side, walked in +x
        (~padded[1:-1, 2:], (1, 0, 1, 1)),  # right side, +y
        (~padded[2:, 1:-1], (1, 1, 0, 1)),  # bottom side, -x
        (~padded[1:-1, :-2], (0, 1, 0, 0)),  # left side, -y
    ):
        rows, cols = np.nonzero(inside & outside)
        edges.append(np.stack([cols + ax, rows + ay, cols + bx, rows + by], axis=1))
    seg = np.concatenate(edges).tolist()
    key = w + 2  # vertex (x, y) -> y * key + x
    leaving: dict[int, list[int]] = {}
    for i, (x0, y0, _, _) in enumerate(seg):
        leaving.setdefault(y0 * key + x0, []).append(i)
    used = [False] * len(seg)
    polygons = []
    for first in range(len(seg)):
        if used[first]:
            continue
        loop = []
        i = first
        while not used[i]:
            used[i] = True
            loop.append(i)
            x0, y0, x1, y1 = seg[i]
            options = [j for j in leaving[y1 * key + x1] if not used[j]]
            if len(options) > 1:  # a corner-touching pinch: turn right (towards the object)
                dx, dy = x1 - x0, y1 - y0
                right = [j for j in options if (seg[j][2] - seg[j][0], seg[j][3] - seg[j][1]) == (-dy, dx)]
                options = right or options
            if not options:
                break
            i = options[0]
        coords: list[float] = []
        for k, i in enumerate(loop):
            prev = seg[loop[k - 1]]
            cur = seg[i]
            if (prev[2] - prev[0], prev[3] - prev[1]) != (cur[2] - cur[0], cur[3] - cur[1]):
                coords += [float(cur[0] + left), float(cur[1] + top)]
        polygons.append(coords)
    return polygons


def mask_to_rle(mask: np.ndarray, *, compressed: bool = True) -> dict[str, Any]:
    """Encode a (H, W) bool mask as COCO RLE (column-major runs starting with background).

    Args:
        mask: (H, W) bool.
        compressed: True gives pycocotools' compressed string counts (as in result files);
            False gives the plain list of run lengths (as COCO stores crowd annotations).

    Returns:
        {"size": [H, W], "counts": str | list[int]}.
    """
    h, w = mask.shape
    if compressed:
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        return {"size": [h, w], "counts": rle["counts"].decode("ascii")}
    flat = mask.T.reshape(-1)
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0, *counts]
    return {"size": [h, w], "counts": counts}


def decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    """Rasterise a COCO `segmentation` (polygons, RLE or compressed RLE) to a (H, W) bool mask.

    Polygon coordinates outside the image are clipped by the rasteriser. Polygons with fewer
    than 3 points are ignored (pycocotools would read 4 numbers as a box).

    Args:
        segmentation: list of flat polygons, or {"size": [H, W], "counts": list | str}.
        height: image height.
        width: image width.

    Returns:
        (H, W) bool mask.

    Raises:
        ValueError: malformed polygon or RLE, or an RLE whose size is not (height, width).
    """
    if isinstance(segmentation, list):
        polygons = []
        for k, poly in enumerate(segmentation):
            if not isinstance(poly, list) or len(poly) % 2 or not all(
                isinstance(v, int | float) and np.isfinite(v) for v in poly
            ):
                raise ValueError(f"polygon {k} is not a flat list of an even number of finite numbers")
            if len(poly) >= 6:
                polygons.append([float(v) for v in poly])
        if not polygons:
            return np.zeros((height, width), dtype=bool)
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
        return mask_utils.decode(rle).astype(bool)
    if not isinstance(segmentation, dict) or "counts" not in segmentation or "size" not in segmentation:
        raise ValueError("segmentation is neither a polygon list nor an RLE with 'counts' and 'size'")
    size = list(segmentation["size"])
    if size != [height, width]:
        raise ValueError(f"RLE size {size} differs from the image size [{height}, {width}]")
    counts = segmentation["counts"]
    if isinstance(counts, list):
        if any(not isinstance(c, int) or c < 0 for c in counts) or sum(counts) != height * width:
            raise ValueError(f"RLE counts must be non-negative ints summing to {height}*{width}")
        rle = mask_utils.frPyObjects(segmentation, height, width)
    elif isinstance(counts, str | bytes):
        rle = {"size": size, "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    else:
        raise ValueError(f"RLE counts must be a list or a string, not {type(counts).__name__}")
    return mask_utils.decode(rle).astype(bool)


def id_to_rgb(ids: np.ndarray) -> np.ndarray:
    """Panoptic segment ids (H, W) -> RGB uint8 (H, W, 3) with id = R + 256*G + 256^2*B."""
    # The little-endian bytes of a 32-bit id are exactly R, G, B (and a zero byte).
    as_bytes = np.ascontiguousarray(ids, dtype="<u4").view(np.uint8).reshape(*ids.shape, 4)
    return np.ascontiguousarray(as_bytes[..., :3])


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    """RGB (H, W, 3) of a COCO panoptic PNG -> (H, W) int64 segment ids, id = R + 256*G + 256^2*B."""
    rgb = np.asarray(rgb, dtype=np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
