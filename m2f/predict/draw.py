"""The picture of a prediction, like the original's visualiser: every segment filled with its category's
colour, thing instances outlined, stuff as plain regions, and each segment labelled with its category
name and score.

Instances of one category get slightly different shades of its colour (deterministic per segment id),
so touching instances stay apart; larger segments are drawn first so small ones stay visible on top.
"""

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from m2f.predict.results import Prediction, Segment


def _shade(segment: Segment) -> np.ndarray:
    color = np.asarray(segment.color, np.float32)
    if not segment.isthing:
        return color
    jitter = np.random.default_rng(segment.id).uniform(-40, 40, 3)
    return np.clip(color + jitter, 0, 255)


def _label_point(mask: np.ndarray) -> tuple[int, int]:
    """(x, y) of the mask pixel nearest to the mask's centroid: inside the mask even for a ring."""
    rows, cols = np.nonzero(mask)
    cy, cx = rows.mean(), cols.mean()
    i = int(np.argmin((rows - cy) ** 2 + (cols - cx) ** 2))
    return int(cols[i]), int(rows[i])


def draw_prediction(image: np.ndarray, prediction: Prediction, *, min_score: float = 0.5,
                    alpha: float = 0.55) -> np.ndarray:
    """Draws a prediction over its image.

    Args:
        image: (H, W, 3) uint8 RGB, the image the prediction is of.
        prediction: its `Prediction`.
        min_score: segments scoring below are not drawn (instance results hold all top-k pairs).
        alpha: opacity of the fill.

    Returns:
        (H, W, 3) uint8 RGB.
    """
    if image.shape[:2] != tuple(prediction.image_size):
        raise ValueError(f"image {image.shape[:2]} and prediction {prediction.image_size} differ in size")
    segments = sorted((s for s in prediction.segments if s.score >= min_score), key=lambda s: -s.area)
    out = image.astype(np.float32)
    h, w = prediction.image_size
    thickness = max(1, round(min(h, w) / 250))
    for segment in segments:
        color = _shade(segment)
        out[segment.mask] = out[segment.mask] * (1 - alpha) + color * alpha
        if segment.isthing:
            edge = segment.mask & ~ndimage.binary_erosion(segment.mask, iterations=thickness)
            out[edge] = color * 0.6  # a darker outline of the fill's colour
    picture = Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))
    canvas = ImageDraw.Draw(picture)
    font = ImageFont.load_default(size=max(10, round(min(h, w) / 40)))
    for segment in segments:
        if segment.area == 0:
            continue
        text = f"{segment.name} {segment.score:.0%}"
        x, y = _label_point(segment.mask)
        left, top, right, bottom = canvas.textbbox((x, y), text, font=font, anchor="mm")
        # Shift labels near the border back inside the picture.
        dx = max(2 - left, 0) - max(right - (w - 3), 0)
        dy = max(1 - top, 0) - max(bottom - (h - 2), 0)
        x, y, left, top, right, bottom = x + dx, y + dy, left + dx, top + dy, right + dx, bottom + dy
        canvas.rectangle((left - 2, top - 1, right + 2, bottom + 1), fill=(0, 0, 0))
        canvas.text((x, y), text, fill=tuple(int(c) for c in np.maximum(_shade(segment), 120)), font=font,
                    anchor="mm")
    return np.asarray(picture)
