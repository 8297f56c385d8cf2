"""Semantic segmentation metrics from a streaming confusion matrix, and panoptic -> semantic conversion.

The definitions are detectron2's SemSegEvaluator (what the Mask2Former numbers use): pixels whose
ground truth is the ignore label do not count; per-class IoU = TP / (TP + FP + FN) and accuracy =
TP / #gt pixels of the class, both only for classes that occur in the ground truth seen so far; mIoU
and mean accuracy average over those classes; pixel accuracy = all TP / all counted pixels;
frequency-weighted IoU weights the IoUs by the classes' ground-truth pixel share. Classes without
ground-truth pixels are nan in the per-class lists. All values are in [0, 1].
"""

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor


def _labels(x: Tensor | np.ndarray, what: str) -> Tensor:
    t = x.detach().cpu() if isinstance(x, Tensor) else torch.from_numpy(np.asarray(x))
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ValueError(f"{what} must be an integer label map, got {t.dtype}")
    return t.long()


class SemanticEvaluator:
    """Streaming mIoU, per-class IoU, pixel accuracy and mean accuracy. Memory is O(K^2).

    Args:
        num_classes: K; labels are contiguous class indices in [0, K).
        ignore_label: ground-truth value that is not evaluated (255 in memory).
    """

    def __init__(self, *, num_classes: int, ignore_label: int = 255):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_label = ignore_label
        self.reset()

    def reset(self) -> None:
        """Forgets all images seen so far."""
        # confusion[g, p] = number of pixels with ground truth g predicted as p.
        self.confusion = torch.zeros((self.num_classes, self.num_classes), dtype=torch.int64)

    def update(self, pred: Tensor | np.ndarray, gt: Tensor | np.ndarray) -> None:
        """Adds one image (or a batch of the same size).

        Args:
            pred: (H, W) or (B, H, W) predicted class indices in [0, K).
            gt: same shape, class indices in [0, K) or `ignore_label`.

        Raises:
            ValueError: shapes differ or labels outside the range.
        """
        p, g = _labels(pred, "prediction"), _labels(gt, "ground truth")
        if p.shape != g.shape:
            raise ValueError(f"prediction {tuple(p.shape)} and ground truth {tuple(g.shape)} differ in shape")
        valid = g != self.ignore_label
        p, g = p[valid], g[valid]
        k = self.num_classes
        for name, t in (("prediction", p), ("ground truth", g)):
            if t.numel() and (t.min() < 0 or t.max() >= k):
                raise ValueError(f"{name} labels must lie in [0, {k}) (or be {self.ignore_label} in the "
                                 f"ground truth), got [{int(t.min())}, {int(t.max())}]")
        self.confusion += torch.bincount(g * k + p, minlength=k * k).view(k, k)

    def compute(self) -> dict[str, Any]:
        """{"mIoU", "fwIoU", "mACC", "pACC", "IoU": [K], "ACC": [K]} in [0, 1] (nan where undefined)."""
        confusion = self.confusion.double()
        tp = confusion.diagonal()
        gt_pixels = confusion.sum(1)
        pred_pixels = confusion.sum(0)
        present = gt_pixels > 0
        nan = torch.full_like(tp, float("nan"))
        iou = torch.where(present, tp / (gt_pixels + pred_pixels - tp).clamp_min(1), nan)
        acc = torch.where(present, tp / gt_pixels.clamp_min(1), nan)
        total = gt_pixels.sum()
        if total == 0:
            raise ValueError("no evaluated pixels (no update, or every ground-truth pixel is ignored)")
        weights = gt_pixels / total
        return {"mIoU": float(iou[present].mean()), "fwIoU": float((iou[present] * weights[present]).sum()),
                "mACC": float(acc[present].mean()), "pACC": float(tp.sum() / total),
                "IoU": iou.tolist(), "ACC": acc.tolist()}


def panoptic_to_semantic(ids: Tensor | np.ndarray, segments_info: Sequence[Mapping[str, Any]], *,
                         category_to_label: Mapping[int, int] | None = None, ignore_label: int = 255,
                         include_crowd: bool = True) -> Tensor:
    """A panoptic id map -> a semantic label map (for mIoU_pan: panoptic ground truth as semantic).

    Pixels of a segment get its class; void (id 0) and unlisted ids get `ignore_label`. Crowd regions
    keep their class by default, as Mask2Former's conversion of COCO panoptic to semantic does.

    Args:
        ids: (H, W) segment ids.
        segments_info: [{"id", "category_id", "iscrowd"?}].
        category_to_label: dataset category id -> contiguous class index; None when category_id
            already is the contiguous index (as from `panoptic_inference`).
        ignore_label: label of void pixels.
        include_crowd: False makes crowd regions `ignore_label` too.

    Returns:
        (H, W) int64 labels.
    """
    id_map = _labels(ids, "panoptic id map")
    lookup = {0: ignore_label}
    for s in segments_info:
        category = int(s["category_id"])
        if category_to_label is not None:
            if category not in category_to_label:
                raise ValueError(f"segment {s['id']} has category_id {category}, which category_to_label "
                                 "lacks")
            category = category_to_label[category]
        lookup[int(s["id"])] = ignore_label if (s.get("iscrowd", 0) and not include_crowd) else category
    present, inverse = torch.unique(id_map, return_inverse=True)
    labels = torch.tensor([lookup.get(int(i), ignore_label) for i in present], dtype=torch.long)
    return labels[inverse]
