"""What the dashboards (and notebooks) show, computed without any UI: cached run loading and forward
passes, per-layer masks and cross-attention maps, attention mass, mask colouring and metric files.

The Panel apps in `dashboards/` only choose what to look at; everything here works on numpy arrays
and can be tested (and used in a notebook) on its own. Coordinates: every array that is drawn comes
with `bounds` (left, bottom, right, top) in the pixels of the image the model saw, so masks at 1/4
and attention at 1/32..1/8 resolution line up with the image when plotted together.
"""

import functools
import hashlib
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from scipy.optimize import linear_sum_assignment

from m2f.config import Config
from m2f.evaluation.attention_mass import AttentionMassMeter, foreground_at_level
from m2f.model import Mask2Former

LEVEL_NAMES = ("1/32", "1/16", "1/8")
LEVEL_STRIDES = (32, 16, 8)
MASK_STRIDE = 4
LAYER_EVAL_FILE = "proposals_eval.json"
Bounds = tuple[float, float, float, float]


# ----------------------------------------------------------------------------------------------------
# Runs


def check_run(path: str | Path) -> Path:
    """The run directory (or checkpoint file) `path`, or a clear error when it is not there.

    Raises:
        FileNotFoundError: nothing at `path`.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"run {path} does not exist (give a run directory made by `m2f train` "
                                f"or a checkpoint file)")
    return path


def run_dir(path: str | Path) -> Path:
    """The directory holding a run's files, for a run directory or a checkpoint file inside one."""
    path = check_run(path)
    return path if path.is_dir() else path.parent


def _checkpoint_key(path: str | Path) -> tuple[str, int]:
    """(resolved checkpoint path, modification time): the cache key of everything computed from a run,
    so a run still training that writes a new checkpoint is reloaded."""
    path = check_run(path)
    ckpt = path / "checkpoint.pth" if path.is_dir() else path
    if not ckpt.is_file():
        found = "only metrics.jsonl" if (path / "metrics.jsonl").is_file() else "no files of a run"
        raise FileNotFoundError(f"{path} has no checkpoint.pth yet ({found}); the run may still be "
                                f"starting: wait for its first checkpoint (train.checkpoint_period)")
    return str(ckpt.resolve()), ckpt.stat().st_mtime_ns


def load_run_cached(path: str | Path) -> tuple[Mask2Former, Config]:
    """`m2f.inference.load_run`, cached per checkpoint file and modification time.

    Raises:
        FileNotFoundError: no run or no checkpoint yet.
        ValueError: the checkpoint does not fit its config, or is not an m2f checkpoint.
    """
    return _load_run(*_checkpoint_key(path))


@functools.lru_cache(maxsize=4)
def _load_run(ckpt: str, mtime_ns: int) -> tuple[Mask2Former, Config]:
    from m2f.inference import load_run

    return load_run(ckpt)


@functools.lru_cache(maxsize=4)
def _val_dataset(ckpt: str, mtime_ns: int) -> Any:
    from m2f.data import build_dataset, build_test_transforms

    _, cfg = _load_run(ckpt, mtime_ns)
    d = cfg.data
    if not d.root or not Path(d.root).exists():
        raise FileNotFoundError(f"the run's dataset root {d.root!r} (data.root) is not on this machine; "
                                f"upload an image instead")
    transforms = build_test_transforms(size=d.test_size, max_size=d.test_max_size)
    return build_dataset(d.format, d.root, d.val_split, task=d.task, transforms=transforms)


def val_dataset(path: str | Path) -> Any:
    """The validation split of a run's dataset with the run's test-time resize (cached).

    Raises:
        FileNotFoundError: no checkpoint, or the dataset is not on this machine.
    """
    return _val_dataset(*_checkpoint_key(path))


# ----------------------------------------------------------------------------------------------------
# Images


@dataclass(frozen=True)
class ImageRef:
    """An image as the model sees it, hashable by content so forward passes can be cached by it.

    Args:
        digest: sha1 of the pixels and shape.
        image: (H, W, 3) uint8 RGB, already at the run's test size.
        name: where it came from (for titles).
        gt_masks: (G, H, W) bool ground-truth segments, when known.
        gt_labels: (G,) class indices of `gt_masks`.
    """

    digest: str
    image: np.ndarray = field(compare=False, hash=False, repr=False)
    name: str = field(default="", compare=False, hash=False)
    gt_masks: np.ndarray | None = field(default=None, compare=False, hash=False, repr=False)
    gt_labels: np.ndarray | None = field(default=None, compare=False, hash=False, repr=False)

    @classmethod
    def from_array(cls, image: np.ndarray, *, name: str = "", gt_masks: np.ndarray | None = None,
                   gt_labels: np.ndarray | None = None) -> "ImageRef":
        image = np.ascontiguousarray(image, dtype=np.uint8)
        digest = hashlib.sha1(image.tobytes() + str(image.shape).encode()).hexdigest()
        return cls(digest, image, name, gt_masks, gt_labels)


def as_rgb(array: np.ndarray, *, name: str = "image") -> tuple[np.ndarray, list[str]]:
    """Any common image array as (H, W, 3) uint8 RGB, and notes about what was converted.

    Args:
        array: (H, W) grayscale, (H, W, 1), (H, W, 3) RGB or (H, W, 4) RGBA; uint8, bool or float in [0, 1].

    Raises:
        ValueError: another shape, or an empty image.
    """
    notes = []
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        notes.append(f"{name} is grayscale; shown and run as RGB with equal channels")
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ValueError(f"{name} must be (H, W), (H, W, 3) or (H, W, 4), got shape {array.shape}")
    if array.shape[2] == 4:
        notes.append(f"{name} has an alpha channel; it was dropped")
        array = array[..., :3]
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {array.shape})")
    if array.dtype != np.uint8:
        scale = 255.0 if array.dtype == bool or float(array.max(initial=0)) <= 1.0 else 1.0
        array = np.clip(array.astype(np.float64) * scale, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(array), notes


def decode_image(data: bytes, *, name: str = "upload") -> tuple[np.ndarray, list[str]]:
    """Decodes uploaded image bytes (PNG, JPEG, ...) to (H, W, 3) uint8 RGB, with conversion notes.

    Raises:
        ValueError: the bytes are not an image PIL can read.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            mode = im.mode
            array = np.asarray(im.convert("L") if mode in ("L", "LA", "I", "I;16", "F", "1") else im.convert("RGB"))
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"{name} is not an image file PIL can read ({err})") from err
    return as_rgb(array, name=name)


def resize_for_run(image: np.ndarray, cfg: Config, *, name: str = "image") -> tuple[np.ndarray, list[str]]:
    """Resizes an (H, W, 3) uint8 image with the run's test-time transform (shortest edge
    `data.test_size`, longest at most `data.test_max_size`), as validation images are."""
    from m2f.data import build_test_transforms
    from m2f.data.base import make_item

    h, w = image.shape[:2]
    item = make_item(image=image, image_id=0, file_name=name, labels=[], masks=np.zeros((0, h, w), bool))
    out = build_test_transforms(size=cfg.data.test_size, max_size=cfg.data.test_max_size)(item)
    resized = out["image"].permute(1, 2, 0).numpy()
    notes = []
    if min(h, w) < 32 or max(h, w) / max(min(h, w), 1) > 4:
        notes.append(f"{name} has an unusual size {h}x{w}; the model sees it at "
                     f"{resized.shape[0]}x{resized.shape[1]} (padded to a multiple of 32)")
    return np.ascontiguousarray(resized), notes


def dataset_image(path: str | Path, index: int) -> ImageRef:
    """Validation image `index` of a run's dataset with its ground truth, at the run's test size.

    Raises:
        IndexError: `index` is outside the split.
    """
    dataset = val_dataset(path)
    if not 0 <= index < len(dataset):
        raise IndexError(f"image index {index} is outside the validation split (0..{len(dataset) - 1})")
    item = dataset[index]
    return ImageRef.from_array(item["image"].permute(1, 2, 0).numpy(), name=item["file_name"],
                               gt_masks=item["masks"].numpy(), gt_labels=item["labels"].numpy())


# ----------------------------------------------------------------------------------------------------
# Forward pass with capture


@dataclass(frozen=True)
class Capture:
    """One image's predictions and cross-attention for every decoder layer, as numpy arrays.

    Prediction set p is the one before decoder layer p (p = 0: from the learnable queries); its
    mask, thresholded, is layer p's attention mask. The last set is the final output.

    Args:
        image: (H, W, 3) uint8, the image the model saw (unpadded).
        padded_size: (H_pad, W_pad).
        mask_probs: (P, Q, H_pad/4, W_pad/4) float32 sigmoid of the mask logits, P = layers + 1.
        class_probs: (P, Q, K+1) softmax of the class logits (index K = no object).
        attn: per layer (M, Q, S) attention weights (M = 1 for mask pooling).
        attend: per layer (Q, S) bool, True where the query may attend; None for cross-attention.
        levels: per layer the pyramid levels it attends (0 = 1/32, 1 = 1/16, 2 = 1/8).
        level_shapes: per layer the (H_l, W_l) of those levels, padded grid.
    """

    image: np.ndarray
    padded_size: tuple[int, int]
    mask_probs: np.ndarray
    class_probs: np.ndarray
    attn: list[np.ndarray]
    attend: list[np.ndarray | None]
    levels: list[tuple[int, ...]]
    level_shapes: list[list[tuple[int, int]]]

    @property
    def num_layers(self) -> int:
        return len(self.attn)

    @property
    def num_queries(self) -> int:
        return self.mask_probs.shape[1]

    @property
    def num_heads(self) -> int:
        return self.attn[0].shape[0]

    def _check(self, layer: int | None = None, query: int | None = None, prediction: int | None = None) -> None:
        for what, value, limit in (("layer", layer, self.num_layers), ("query", query, self.num_queries),
                                   ("prediction set", prediction, self.num_layers + 1)):
            if value is not None and not 0 <= value < limit:
                raise IndexError(f"{what} {value} is outside 0..{limit - 1}")

    def valid_cells(self, stride: int) -> tuple[int, int]:
        """(rows, cols) of a stride-`stride` grid that cover the unpadded image."""
        h, w = self.image.shape[:2]
        return math.ceil(h / stride), math.ceil(w / stride)

    def bounds(self, stride: int) -> Bounds:
        """Plot bounds (left, bottom, right, top) in image pixels of the valid cells of a grid."""
        rows, cols = self.valid_cells(stride)
        h = self.image.shape[0]
        return (0.0, float(h - rows * stride), float(cols * stride), float(h))

    @property
    def image_bounds(self) -> Bounds:
        h, w = self.image.shape[:2]
        return (0.0, 0.0, float(w), float(h))

    def mask(self, prediction: int, query: int) -> np.ndarray:
        """(rows, cols) mask probability of `query` in prediction set `prediction`, at 1/4 resolution."""
        self._check(query=query, prediction=prediction)
        rows, cols = self.valid_cells(MASK_STRIDE)
        return self.mask_probs[prediction, query, :rows, :cols]

    def classes(self, prediction: int) -> tuple[np.ndarray, np.ndarray]:
        """Per query its best object class (Q,) and that class's probability (Q,)."""
        self._check(prediction=prediction)
        probs = self.class_probs[prediction, :, :-1]
        return probs.argmax(-1), probs.max(-1)

    def level_slices(self, layer: int) -> list[tuple[int, int, slice]]:
        """Per level of `layer`: (level, stride, slice of S)."""
        self._check(layer=layer)
        out, start = [], 0
        for level, (h, w) in zip(self.levels[layer], self.level_shapes[layer]):
            out.append((level, LEVEL_STRIDES[level], slice(start, start + h * w)))
            start += h * w
        return out

    def _level(self, layer: int, level_pos: int) -> tuple[int, int, slice, tuple[int, int]]:
        slices = self.level_slices(layer)
        if not 0 <= level_pos < len(slices):
            raise IndexError(f"layer {layer} attends {len(slices)} level(s); level position {level_pos} is outside")
        level, stride, s = slices[level_pos]
        return level, stride, s, self.level_shapes[layer][level_pos]

    def weights(self, layer: int, query: int, head: int | None) -> np.ndarray:
        """(S,) attention weights of `query` in `layer` for one head, or their mean over heads (None)."""
        self._check(layer=layer, query=query)
        w = self.attn[layer][:, query]
        if head is None:
            return w.mean(0)
        if not 0 <= head < w.shape[0]:
            raise IndexError(f"head {head} is outside 0..{w.shape[0] - 1}")
        return w[head]

    def attention(self, layer: int, query: int, head: int | None, level_pos: int = 0) -> tuple[np.ndarray, Bounds]:
        """The attention map of `query` over one level of `layer` (valid cells) and its plot bounds."""
        _, stride, s, shape = self._level(layer, level_pos)
        rows, cols = self.valid_cells(stride)
        return self.weights(layer, query, head)[s].reshape(shape)[:rows, :cols], self.bounds(stride)

    def attention_mask(self, layer: int, query: int, level_pos: int = 0) -> tuple[np.ndarray | None, Bounds]:
        """The binary mask that limited `query`'s attention in `layer` (None: standard cross-attention)."""
        _, stride, s, shape = self._level(layer, level_pos)
        self._check(query=query)
        if self.attend[layer] is None:
            return None, self.bounds(stride)
        rows, cols = self.valid_cells(stride)
        return self.attend[layer][query, s].reshape(shape)[:rows, :cols], self.bounds(stride)

    def attention_mass(self, layer: int, query: int, head: int | None, region: np.ndarray) -> float:
        """Fraction of `query`'s attention in `layer` (all its levels) that falls inside `region`.

        Args:
            region: (h, w) bool covering the padded image (any resolution, e.g. a 1/4 mask or a
                padded ground-truth mask); resized to each level as `foreground_at_level` does.
        """
        region_t = torch.from_numpy(np.ascontiguousarray(region, dtype=bool))
        fg = torch.cat([foreground_at_level(region_t, shape).flatten() for shape in self.level_shapes[layer]])
        meter = AttentionMassMeter()
        # All levels of the layer form one (S, 1) "level", so the fraction is over the whole softmax.
        meter.update(torch.from_numpy(self.weights(layer, query, head))[None, None], fg.view(1, 1, -1, 1))
        return float(meter.compute()["foreground"])

    def predicted_region(self, prediction: int, query: int) -> np.ndarray:
        """(H_pad/4, W_pad/4) bool: the query's predicted mask (probability > 0.5), padded grid."""
        self._check(query=query, prediction=prediction)
        return self.mask_probs[prediction, query] > 0.5

    def pad(self, masks: np.ndarray) -> np.ndarray:
        """(..., H, W) image-size masks padded with False to (..., H_pad, W_pad)."""
        out = np.zeros((*masks.shape[:-2], *self.padded_size), dtype=bool)
        out[..., : masks.shape[-2], : masks.shape[-1]] = masks
        return out

    def match_ground_truth(self, gt_masks: np.ndarray) -> dict[int, int]:
        """One-to-one matching of the final masks to ground-truth segments by maximum total IoU
        (scipy's Hungarian solver), keeping pairs with IoU > 0. Returns {query: gt index}."""
        if len(gt_masks) == 0:
            return {}
        h4, w4 = self.mask_probs.shape[-2:]
        gt = foreground_at_level(torch.from_numpy(self.pad(gt_masks)), (h4, w4)).flatten(1).numpy()
        pred = (self.mask_probs[-1] > 0.5).reshape(self.num_queries, -1)
        inter = pred.astype(np.float64) @ gt.T.astype(np.float64)
        union = pred.sum(1)[:, None] + gt.sum(1)[None] - inter
        iou = inter / np.maximum(union, 1)
        rows, cols = linear_sum_assignment(-iou)
        return {int(q): int(g) for q, g in zip(rows, cols) if iou[q, g] > 0}


def forward(path: str | Path, image: ImageRef) -> Capture:
    """The run's model on `image` with capture on, cached by (checkpoint, mtime, image content)."""
    return _forward(*_checkpoint_key(path), image)


@functools.lru_cache(maxsize=32)
def _forward(ckpt: str, mtime_ns: int, image: ImageRef) -> Capture:
    model, _ = _load_run(ckpt, mtime_ns)
    return capture(model, image.image)


def capture(model: Mask2Former, image: np.ndarray) -> Capture:
    """`model` (in eval mode) on one (H, W, 3) uint8 image with capture on."""
    with torch.no_grad():
        out = model([torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)], capture=True)
    sets = [*out["aux_outputs"], out]
    return Capture(
        image=image,
        padded_size=tuple(out["padded_size"]),
        mask_probs=torch.stack([s["pred_masks"][0] for s in sets]).float().sigmoid().numpy(),
        class_probs=torch.stack([s["pred_logits"][0] for s in sets]).float().softmax(-1).numpy(),
        attn=[c["attn_weights"][0].float().numpy() for c in out["capture"]],
        attend=[None if c["attend_mask"] is None else c["attend_mask"][0].numpy() for c in out["capture"]],
        levels=[tuple(c["levels"]) for c in out["capture"]],
        level_shapes=[[tuple(s) for s in c["level_shapes"]] for c in out["capture"]],
    )


# ----------------------------------------------------------------------------------------------------
# Colours and mosaics


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


# ----------------------------------------------------------------------------------------------------
# Metric files


def read_metrics(path: str | Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The train and val records of RUN/metrics.jsonl. A half-written last line (a run still
    writing) is skipped.

    Raises:
        FileNotFoundError: the run has no metrics.jsonl.
        ValueError: a line before the last is not JSON.
    """
    file = run_dir(path) / "metrics.jsonl"
    if not file.is_file():
        raise FileNotFoundError(f"{file} does not exist (no training iterations logged yet)")
    lines = [line for line in file.read_text().splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number == len(lines):
                break
            raise ValueError(f"{file} line {number} is not JSON: {err}") from err
    return ([r for r in records if r.get("split") == "train"], [r for r in records if r.get("split") == "val"])


def read_layer_metrics(path: str | Path) -> list[dict[str, Any]] | None:
    """Per prediction set metrics of a run: RUN/proposals_eval.json (written by `evaluate_layers`),
    else an `m2f eval --layers all` file (eval_*.json); None when neither exists."""
    folder = run_dir(path)
    for file in [folder / LAYER_EVAL_FILE, *sorted(folder.glob("eval_*.json"))]:
        if file.is_file():
            data = json.loads(file.read_text())
            layers = data.get("metrics", data).get("layers")
            if layers:
                return layers
    return None


def evaluate_layers(path: str | Path, *, max_images: int = 8) -> list[dict[str, Any]]:
    """Evaluates every prediction set (PQ/AP/mIoU and proposal AR) on the first `max_images`
    validation images and caches the result in RUN/proposals_eval.json."""
    from m2f.inference import evaluate

    model, cfg = load_run_cached(path)
    metrics = evaluate(model, cfg, layers="all", proposals=True, max_images=max_images)
    (run_dir(path) / LAYER_EVAL_FILE).write_text(json.dumps({"metrics": metrics}, default=str))
    return metrics["layers"]


LAYER_METRICS = {"PQ": ("panoptic", "PQ"), "AP": ("instance", "AP"), "mIoU": ("semantic", "mIoU"),
                 "AR@100": ("proposals", "AR@100")}


def layer_curves(layers: list[dict[str, Any]]) -> dict[str, list[float]]:
    """{"PQ" / "AP" / "mIoU" / "AR@100": value per prediction set} for the metrics present (0-100 scale)."""
    curves = {}
    for name, (task, key) in LAYER_METRICS.items():
        values = [layer.get(task, {}).get(key) for layer in layers]
        if all(isinstance(v, (int, float)) for v in values):
            curves[name] = [100.0 * float(v) for v in values]
    return curves
