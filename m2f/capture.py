"""What the model saw and attended to, as numpy arrays: `capture` runs a model with capture on and
returns per-layer masks, class probabilities, cross-attention weights and attention masks, with the
geometry that places each of them on the image; `forward` does that for a run, cached.

Coordinates: every array that is drawn comes with `bounds` (left, bottom, right, top) in the pixels of
the image the model saw, so masks at 1/4 and attention at 1/32..1/8 resolution line up with the image
when plotted together. No UI here: the dashboards, the figure functions and notebooks all use it.
"""

import functools
import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from m2f.config import Config
from m2f.evaluation.attention_mass import AttentionMassMeter, foreground_at_level
from m2f.model import Mask2Former
from m2f.run_dir import RunDir

LEVEL_NAMES = ("1/32", "1/16", "1/8")
LEVEL_STRIDES = (32, 16, 8)
MASK_STRIDE = 4
Bounds = tuple[float, float, float, float]


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


def decode_upload(data: bytes, *, name: str = "upload") -> tuple[np.ndarray, list[str]]:
    """Uploaded image bytes (PNG, JPEG, ...) as (H, W, 3) uint8 RGB, converted as dataset images are
    (`m2f.data.image_io`), with notes saying what was converted.

    Raises:
        ValueError: the bytes are not an image Pillow can read (a `DatasetError` naming the upload).
    """
    from m2f.data.image_io import decode_image

    array, mode = decode_image(data, name=name)
    notes = []
    if mode in ("1", "L", "LA") or mode.startswith("I"):
        notes.append(f"{name} is grayscale; shown and run as RGB with equal channels")
    if mode in ("RGBA", "LA", "PA"):
        notes.append(f"{name} has an alpha channel; it was dropped")
    return array, notes


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
        FileNotFoundError: no checkpoint, or the dataset is not on this machine.
    """
    dataset = RunDir.existing(path).val_dataset()
    if not 0 <= index < len(dataset):
        raise IndexError(f"image index {index} is outside the validation split (0..{len(dataset) - 1})")
    item = dataset[index]
    return ImageRef.from_array(item["image"].permute(1, 2, 0).numpy(), name=item["file_name"],
                               gt_masks=item["masks"].numpy(), gt_labels=item["labels"].numpy())


@dataclass(frozen=True)
class Capture:
    """One image's predictions and cross-attention for every decoder layer, as numpy arrays.

    Prediction set p is the one before decoder layer p (p = 0: from the learnable queries); its
    mask, thresholded, is layer p's attention mask. The last set is the final output.

    Args:
        image: (H, W, 3) uint8, the image the model saw (unpadded).
        padded_size: (H_pad, W_pad).
        mask_probs: (T, Q, H_pad/4, W_pad/4) float32 sigmoid of the mask logits, T = layers + 1 prediction sets.
        class_probs: (T, Q, K+1) softmax of the class logits (index K = no object).
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
    """The run's model on `image` with capture on, cached by (checkpoint identity, image content)."""
    run = RunDir.existing(path)
    return _forward(run, tuple(run.checkpoint_id().values()), image)


@functools.lru_cache(maxsize=32)
def _forward(run: RunDir, checkpoint_id: tuple[Any, ...], image: ImageRef) -> Capture:
    model, _ = run.load()
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
