"""Colours, mask overlays and mosaics: numpy (H, W, 3) uint8 images for the dashboards and figures.

The same query index gets the same colour everywhere (`palette`), so a query can be followed from
the proposals grid to the attention explorer and the figures.
"""

import math

import numpy as np
from PIL import Image

from m2f.capture import MASK_STRIDE, Capture


def palette(n: int) -> np.ndarray:
    """(n, 3) uint8 distinct colours (golden-ratio hues), the same for the same index everywhere."""
    hues = (np.arange(n) * 0.618033988749895) % 1.0
    hsv = np.stack([hues, np.full(n, 0.75), np.full(n, 0.95)], -1)
    return np.asarray(Image.fromarray((hsv[None] * 255).astype(np.uint8), "HSV").convert("RGB"))[0]


def colorize(labels: np.ndarray, *, num_colors: int | None = None) -> np.ndarray:
    """(H, W) int labels (negative = none) -> (H, W, 3) uint8, black where there is no label."""
    colors = palette(max(int(num_colors or labels.max(initial=0) + 1), 1))
    out = np.zeros((*labels.shape, 3), np.uint8)
    valid = labels >= 0
    out[valid] = colors[labels[valid] % len(colors)]
    return out


def overlay(image: np.ndarray, mask: np.ndarray, color: tuple[int, int, int] | np.ndarray,
            alpha: float = 0.55) -> np.ndarray:
    """Blends `color` into an (H, W, 3) uint8 image where the (H, W) mask (bool or [0, 1]) is on,
    and dims the rest so the mask stands out."""
    weight = np.asarray(mask, np.float32)[..., None] * alpha
    out = image.astype(np.float32) * (1 - weight) + np.asarray(color, np.float32) * weight
    out = np.where(weight > 0, out, out * 0.6)
    return np.clip(out, 0, 255).astype(np.uint8)


def resize_rgb(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 resized to (rows, cols) (bilinear)."""
    return np.asarray(Image.fromarray(image).resize((shape[1], shape[0]), Image.BILINEAR))


def mosaic(tiles: list[np.ndarray], *, columns: int, gap: int = 2) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Lays equal-size (h, w, 3) tiles out in a grid. Returns the mosaic and each tile's (top, left)."""
    if not tiles:
        raise ValueError("mosaic needs at least one tile")
    h, w = tiles[0].shape[:2]
    rows = math.ceil(len(tiles) / columns)
    out = np.full((rows * (h + gap) - gap, min(columns, len(tiles)) * (w + gap) - gap, 3), 255, np.uint8)
    corners = []
    for i, tile in enumerate(tiles):
        top, left = (i // columns) * (h + gap), (i % columns) * (w + gap)
        out[top: top + h, left: left + w] = tile
        corners.append((top, left))
    return out, corners


def query_tiles(capture: Capture, *, prediction: int | None = None, query: int | None = None) -> list[np.ndarray]:
    """Mask overlays at 1/4 resolution: all queries of one prediction set, or one query in every set."""
    if (prediction is None) == (query is None):
        raise ValueError("give exactly one of prediction (all queries) or query (all prediction sets)")
    shape = capture.valid_cells(MASK_STRIDE)
    small = resize_rgb(capture.image, shape)
    colors = palette(capture.num_queries)
    pairs = ([(prediction, q) for q in range(capture.num_queries)] if query is None
             else [(p, query) for p in range(capture.num_layers + 1)])
    return [overlay(small, capture.mask(p, q) > 0.5, colors[q]) for p, q in pairs]
