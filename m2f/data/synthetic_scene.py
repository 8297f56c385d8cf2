"""Drawing one synthetic scene: amorphous stuff regions tiled by noise, occluding shaped things.

The class vocabulary (COCO-like, non-contiguous ids):
- things (supercategory "shape"): 1 disc (ellipse-ish), 2 square (rectangle-ish), 3 triangle,
  5 star, 7 ring (has a hole), 9 cross;
- stuff (supercategory "region"): 11 sky (brighter towards the top), 13 sand, 17 grass, 21 water
  (lower in the image).
Each class has a colour tendency and a texture (shading, stripes, spots, waves), but instance
colours are pulled towards random colours (`color_overlap`) and every pixel gets noise, so a
class is never identified by one pixel's colour: shape and texture matter.

Things are drawn in order, later ones occluding earlier ones; the annotated mask of a thing is its
visible part, and a thing whose visible part is tiny is not drawn at all. With `crowd_prob` an
image also gets a crowd: a cluster of small same-class shapes annotated as one iscrowd segment.
Boundaries between stuff regions are void (`void_width` pixels), as are stuff fragments too
small to keep; void pixels still show stuff texture, the annotation just leaves them out.
"""

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from m2f.data.categories import Categories, Category

# (category id, name, isthing, appearance RGB in [0, 1], visualisation colour)
_CLASSES = (
    (1, "disc", True, (0.85, 0.25, 0.20), (220, 20, 60)),
    (2, "square", True, (0.90, 0.80, 0.20), (255, 200, 0)),
    (3, "triangle", True, (0.55, 0.30, 0.80), (140, 60, 220)),
    (5, "star", True, (0.95, 0.55, 0.15), (250, 130, 20)),
    (7, "ring", True, (0.20, 0.75, 0.80), (0, 190, 200)),
    (9, "cross", True, (0.90, 0.60, 0.70), (240, 140, 180)),
    (11, "sky", False, (0.55, 0.70, 0.95), (135, 180, 245)),
    (13, "sand", False, (0.76, 0.65, 0.45), (195, 165, 115)),
    (17, "grass", False, (0.30, 0.60, 0.25), (75, 155, 65)),
    (21, "water", False, (0.15, 0.35, 0.60), (40, 90, 155)),
)
_BASE_RGB = {cid: np.array(rgb, dtype=np.float32) for cid, _, _, rgb, _ in _CLASSES}
THING_IDS = tuple(c[0] for c in _CLASSES if c[2])
STUFF_IDS = tuple(c[0] for c in _CLASSES if not c[2])


def synthetic_categories() -> Categories:
    """The 6 thing + 4 stuff categories of the synthetic dataset (K = 10; instance K = 6)."""
    return Categories([Category(id=cid, name=name, isthing=thing, supercategory="shape" if thing else "region",
                                color=color) for cid, name, thing, _, color in _CLASSES])


@dataclass(frozen=True)
class SceneParams:
    """Difficulty knobs of the synthetic scenes (sizes are fractions of the image side).

    Args:
        objects_per_image: inclusive range of things drawn (before invisible ones are dropped).
        min_object_size: smallest object diameter (of its circumscribed circle), fraction of the side.
        max_object_size: largest diameter; diameters are log-uniform in between, so small, medium
            and large objects (COCO thresholds scaled to the image, see `synthetic.area_ranges`)
            all occur.
        noise: std of the per-pixel Gaussian noise, in [0, 1] intensity units.
        color_overlap: each instance's colour is its class colour pulled towards a random colour
            by a fraction drawn from U(0, color_overlap): 0 = pure class colours, 1 = any colour.
        texture_strength: amplitude of the class textures relative to the colour.
        illumination: amplitude of a smooth brightness field over the whole image.
        blur: Gaussian blur sigma in pixels applied to the image (softens edges; masks are exact).
        crowd_prob: probability that an image contains one crowd cluster.
        stuff_per_image: inclusive range of stuff classes present.
        void_width: width in pixels of the void band between stuff regions (0 = none).
        min_visible_fraction: a thing whose visible area is below this fraction of its in-image
            area is not drawn.
        min_visible_pixels: nor is a thing with fewer visible pixels than this.
        min_stuff_fraction: stuff regions smaller than this fraction of the image become void.
        rle_fraction: fraction of (hole-free) things stored as RLE instead of polygons in the
            instances JSON; rings and occlusion-made holes are always RLE.
    """

    objects_per_image: tuple[int, int] = (1, 8)
    min_object_size: float = 0.06
    max_object_size: float = 0.6
    noise: float = 0.05
    color_overlap: float = 0.5
    texture_strength: float = 0.25
    illumination: float = 0.15
    blur: float = 0.5
    crowd_prob: float = 0.08
    stuff_per_image: tuple[int, int] = (2, 4)
    void_width: int = 1
    min_visible_fraction: float = 0.15
    min_visible_pixels: int = 6
    min_stuff_fraction: float = 0.002
    rle_fraction: float = 0.15

    def __post_init__(self):
        if not 0 < self.min_object_size <= self.max_object_size:
            raise ValueError(f"need 0 < min_object_size <= max_object_size, got {self.min_object_size}, "
                             f"{self.max_object_size}")
        if not 0 <= self.objects_per_image[0] <= self.objects_per_image[1]:
            raise ValueError(f"bad objects_per_image range {self.objects_per_image}")
        if not 1 <= self.stuff_per_image[0] <= self.stuff_per_image[1] <= len(STUFF_IDS):
            raise ValueError(f"stuff_per_image must lie within 1..{len(STUFF_IDS)}, got {self.stuff_per_image}")


@dataclass
class Segment:
    """One annotated segment of a scene: its visible (H, W) bool mask and flags."""

    category_id: int
    isthing: bool
    iscrowd: bool
    mask: np.ndarray
    prefer_rle: bool = False


@dataclass
class _Thing:
    category_id: int
    full: np.ndarray  # (H, W) bool, before occlusion
    color: np.ndarray  # (H, W, 3) float32 appearance where full
    iscrowd: bool


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """(size, size) float32 field, roughly N(0, 1), varying over about `cells` periods."""
    grid = rng.standard_normal((cells + 1, cells + 1)).astype(np.float32)
    return np.asarray(Image.fromarray(grid, mode="F").resize((size, size), Image.Resampling.BICUBIC))


def _instance_color(rng: np.random.Generator, category_id: int, overlap: float) -> np.ndarray:
    pull = rng.uniform(0.0, overlap)
    return (1 - pull) * _BASE_RGB[category_id] + pull * rng.uniform(0.1, 0.95, 3).astype(np.float32)


def _shape_and_texture(category_id: int, u: np.ndarray, v: np.ndarray, rng: np.random.Generator
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Inside test and texture in [-1, 1] at local coordinates (unit circumscribed circle)."""
    r = np.hypot(u, v)
    theta = np.arctan2(v, u)
    freq = rng.uniform(1.5, 3.0)
    if category_id == 1:  # disc: shaded towards the rim
        return r <= 1.0, 1.0 - 2.0 * r
    if category_id == 2:  # square: stripes
        half = 1 / np.sqrt(2)
        return np.maximum(np.abs(u), np.abs(v)) <= half, np.sin(2 * np.pi * freq * u)
    if category_id == 3:  # triangle: vertices at 90, 210, 330 degrees; a vertical gradient
        inside = np.ones_like(u, dtype=bool)
        for angle in (-np.pi / 2, np.pi / 6, 5 * np.pi / 6):
            inside &= u * np.cos(angle) + v * np.sin(angle) <= 0.5
        return inside, np.clip(v, -1, 1)
    if category_id == 5:  # five-pointed star: radius between 0.4 (valleys) and 1 (tips); spots
        tri = np.abs((theta * 5 / (2 * np.pi)) % 1.0 - 0.5) * 2
        return r <= 0.4 + 0.6 * (1 - tri), np.sin(2 * np.pi * freq * u) * np.sin(2 * np.pi * freq * v)
    if category_id == 7:  # ring: angular bands
        return (r <= 1.0) & (r >= 0.5), np.sin(4 * theta)
    if category_id == 9:  # cross: diagonal stripes
        arm, bar = 0.8, 0.27
        inside = ((np.abs(u) <= arm) & (np.abs(v) <= bar)) | ((np.abs(u) <= bar) & (np.abs(v) <= arm))
        return inside, np.sin(2 * np.pi * freq * (u + v))
    raise ValueError(f"no shape for category {category_id}")


def _draw_shape(rng: np.random.Generator, size: int, category_id: int, diameter: float, cx: float, cy: float,
                color: np.ndarray, strength: float) -> tuple[np.ndarray, np.ndarray]:
    """Rasterise one shape at pixel centres: (H, W) bool mask and (H, W, 3) appearance."""
    radius = diameter / 2
    mask = np.zeros((size, size), dtype=bool)
    appearance = np.zeros((size, size, 3), dtype=np.float32)
    x0, x1 = max(0, int(cx - radius)), min(size, int(np.ceil(cx + radius)) + 1)
    y0, y1 = max(0, int(cy - radius)), min(size, int(np.ceil(cy + radius)) + 1)
    if x0 >= x1 or y0 >= y1:
        return mask, appearance
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5
    angle = rng.uniform(0, 2 * np.pi)
    aspect = rng.uniform(0.6, 1.0) if category_id in (1, 2) else rng.uniform(0.85, 1.0)
    dx, dy = (xs - cx) / radius, (ys - cy) / radius
    u = (np.cos(angle) * dx + np.sin(angle) * dy) / aspect
    v = -np.sin(angle) * dx + np.cos(angle) * dy
    inside, texture = _shape_and_texture(category_id, u, v, rng)
    mask[y0:y1, x0:x1] = inside
    appearance[y0:y1, x0:x1] = color * (1 + strength * texture[..., None])
    return mask, appearance


def _stuff(rng: np.random.Generator, size: int, params: SceneParams) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Stuff label map (H, W) of category ids (0 = void), appearance (H, W, 3), and the ids present."""
    count = int(rng.integers(params.stuff_per_image[0], params.stuff_per_image[1] + 1))
    chosen = sorted(rng.choice(STUFF_IDS, size=count, replace=False).tolist())
    y = (np.arange(size, dtype=np.float32)[:, None] + 0.5) / size - 0.5  # -0.5 top .. 0.5 bottom
    x = (np.arange(size, dtype=np.float32)[None, :] + 0.5) / size
    bias = {11: -2.0 * y, 13: np.zeros_like(y), 17: 0.5 * y, 21: 2.0 * y}
    scores = np.stack([_smooth_noise(rng, size, int(rng.integers(2, 5))) + bias[c] for c in chosen])
    labels = np.asarray(chosen)[scores.argmax(0)]
    appearance = np.zeros((size, size, 3), dtype=np.float32)
    for c in chosen:
        if c == 11:  # sky: brighter upwards, soft clouds
            texture = -1.2 * y + 0.4 * _smooth_noise(rng, size, 6)
        elif c == 13:  # sand: fine grain
            texture = ndimage.gaussian_filter(rng.standard_normal((size, size)).astype(np.float32), 0.8) * 2
        elif c == 17:  # grass: vertical streaks
            texture = np.sin(2 * np.pi * (x * size * rng.uniform(0.15, 0.3) + 0.3 * _smooth_noise(rng, size, 4)))
        else:  # water: horizontal waves
            texture = np.sin(2 * np.pi * (y * size * rng.uniform(0.08, 0.15) + 0.2 * np.sin(2 * np.pi * 3 * x)))
        color = _instance_color(rng, c, params.color_overlap)
        region = labels == c
        appearance[region] = (color * (1 + params.texture_strength * np.clip(texture, -1.5, 1.5)[..., None]))[region]
    if params.void_width > 0:
        edge = np.zeros((size, size), dtype=bool)
        edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
        edge[:-1, :] |= labels[:-1, :] != labels[1:, :]
        if params.void_width > 1:
            edge = ndimage.binary_dilation(edge, iterations=params.void_width - 1)
        labels = np.where(edge, 0, labels)
    return labels, appearance, chosen


def _things(rng: np.random.Generator, size: int, params: SceneParams) -> list[_Thing]:
    """Things in drawing order (full masks, before occlusion), a crowd cluster possibly among them."""
    log_min = np.log(params.min_object_size * size)
    log_max = np.log(params.max_object_size * size)
    things = []
    for _ in range(int(rng.integers(params.objects_per_image[0], params.objects_per_image[1] + 1))):
        cid = int(rng.choice(THING_IDS))
        color = _instance_color(rng, cid, params.color_overlap)
        mask, look = _draw_shape(rng, size, cid, float(np.exp(rng.uniform(log_min, log_max))),
                                 rng.uniform(0, size), rng.uniform(0, size), color, params.texture_strength)
        things.append(_Thing(cid, mask, look, iscrowd=False))
    if rng.random() < params.crowd_prob:
        cid = int(rng.choice(THING_IDS))
        color = _instance_color(rng, cid, params.color_overlap)
        centre = rng.uniform(0.15 * size, 0.85 * size, 2)
        full = np.zeros((size, size), dtype=bool)
        look = np.zeros((size, size, 3), dtype=np.float32)
        for _ in range(int(rng.integers(5, 10))):
            cx, cy = centre + rng.normal(0, 0.06 * size, 2)
            diameter = float(np.exp(log_min) * rng.uniform(1.0, 2.0))
            mask, part = _draw_shape(rng, size, cid, diameter, cx, cy, color, params.texture_strength)
            look[mask] = part[mask]
            full |= mask
        things.insert(int(rng.integers(0, len(things) + 1)), _Thing(cid, full, look, iscrowd=True))
    return things


def render_scene(rng: np.random.Generator, size: int, params: SceneParams) -> tuple[np.ndarray, list[Segment]]:
    """Draw one scene.

    Args:
        rng: the image's random generator (all randomness comes from it).
        size: image side in pixels.
        params: difficulty knobs.

    Returns:
        image: (size, size, 3) uint8 RGB.
        segments: visible things in drawing order (crowd flagged), then stuff by category id;
            masks are disjoint and pixels in none of them are void.
    """
    stuff_labels, canvas, stuff_present = _stuff(rng, size, params)
    things = _things(rng, size, params)
    # Decide visibility from the top of the stack down: a dropped thing is not drawn, so it
    # must not hide what lies under it.
    covered = np.zeros((size, size), dtype=bool)
    visible: list[tuple[_Thing, np.ndarray]] = []
    for thing in reversed(things):
        seen = thing.full & ~covered
        area = int(seen.sum())
        if area >= params.min_visible_pixels and area >= params.min_visible_fraction * thing.full.sum():
            visible.append((thing, seen))
            covered |= thing.full
    visible.reverse()
    segments = []
    for thing, seen in visible:
        canvas[seen] = thing.color[seen]
        segments.append(Segment(thing.category_id, True, thing.iscrowd, seen,
                                prefer_rle=bool(rng.random() < params.rle_fraction)))
    min_stuff = params.min_stuff_fraction * size * size
    for cid in stuff_present:
        region = (stuff_labels == cid) & ~covered
        if region.sum() >= max(1.0, min_stuff):
            segments.append(Segment(cid, False, False, region))
    canvas *= 1 + params.illumination * np.clip(_smooth_noise(rng, size, 3), -2, 2)[..., None]
    if params.blur > 0:
        canvas = ndimage.gaussian_filter(canvas, sigma=(params.blur, params.blur, 0))
    canvas += rng.normal(0.0, params.noise, canvas.shape).astype(np.float32)
    image = np.clip(np.rint(canvas * 255), 0, 255).astype(np.uint8)
    return image, segments
