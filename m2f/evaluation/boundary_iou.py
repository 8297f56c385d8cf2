"""Boundary IoU (Cheng et al., 2021) and Boundary AP through pycocotools.

The installed pycocotools has no iouType "boundary" (only the boundary-iou-api fork has), so it is
added here by subclassing `COCOeval`, following the fork's definition:
- the boundary of a mask is the mask minus its erosion by a (2d+1) x (2d+1) square, with
  d = max(1, round(dilation_ratio * image diagonal)) and pixels outside the image counting as
  background (so a mask cut by the image border has a boundary there too);
- the IoU used for matching is min(mask IoU, boundary IoU) for non-crowd ground truth, and the mask
  IoU (pycocotools' crowd rule) for crowd ground truth. Everything else is plain COCOeval.
"""

import math
import warnings
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils
import torch
import torch.nn.functional as F
from pycocotools.cocoeval import COCOeval


def boundary_width(height: int, width: int, dilation_ratio: float = 0.02) -> int:
    """d = max(1, round(dilation_ratio * sqrt(H^2 + W^2))), the boundary width in pixels."""
    return max(1, round(dilation_ratio * math.hypot(height, width)))


def mask_to_boundary(masks: np.ndarray, dilation_ratio: float = 0.02) -> np.ndarray:
    """Inner boundaries of binary masks: mask AND NOT erosion(mask).

    Args:
        masks: (n, H, W) or (H, W) bool.
        dilation_ratio: boundary width as a fraction of the image diagonal (paper default 0.02).

    Returns:
        bool array of the same shape.
    """
    array = np.asarray(masks, dtype=bool)
    stack = array.reshape(-1, *array.shape[-2:])
    d = boundary_width(*stack.shape[-2:], dilation_ratio)
    outside = torch.from_numpy(~stack).float()[:, None]
    # Erosion by a square = max-pool of the complement; padding with 1 makes the outside background.
    eroded_away = F.max_pool2d(F.pad(outside, (d, d, d, d), value=1.0), kernel_size=2 * d + 1, stride=1)
    boundary = stack & (eroded_away[:, 0] > 0).numpy()
    return boundary.reshape(array.shape)


class BoundaryCOCOeval(COCOeval):
    """COCOeval for masks whose matching IoU is min(mask IoU, Boundary IoU) (Boundary AP).

    Args:
        cocoGt / cocoDt: as `COCOeval`, with segmentation annotations.
        dilation_ratio: see `mask_to_boundary`.
    """

    def __init__(self, cocoGt: Any, cocoDt: Any, *, dilation_ratio: float = 0.02):
        super().__init__(cocoGt, cocoDt, iouType="segm")
        self.dilation_ratio = dilation_ratio
        self._boundaries: dict[tuple[str, int], dict[str, Any]] = {}

    def _prepare(self) -> None:
        super()._prepare()
        self._boundaries = {}
        for role, table in (("gt", self._gts), ("dt", self._dts)):
            for anns in table.values():
                for ann in anns:
                    with warnings.catch_warnings():
                        # pycocotools' decode trips a harmless NumPy 2 copy-keyword deprecation warning.
                        warnings.filterwarnings("ignore", message="__array__ implementation",
                                                category=DeprecationWarning)
                        mask = mask_utils.decode(ann["segmentation"]).astype(bool)
                    boundary = mask_to_boundary(mask, self.dilation_ratio)
                    rle = mask_utils.encode(np.asfortranarray(boundary.astype(np.uint8)))
                    self._boundaries[role, ann["id"]] = rle

    def computeIoU(self, imgId: int, catId: int) -> Any:
        mask_ious = super().computeIoU(imgId, catId)
        p = self.params
        if p.useCats:
            gt, dt = self._gts[imgId, catId], self._dts[imgId, catId]
        else:
            gt = [g for c in p.catIds for g in self._gts[imgId, c]]
            dt = [d for c in p.catIds for d in self._dts[imgId, c]]
        if not gt or not dt:
            return mask_ious
        # Same detection order and cut as COCOeval.computeIoU, so the columns line up.
        order = np.argsort([-d["score"] for d in dt], kind="mergesort")[: p.maxDets[-1]]
        crowd = np.array([int(g["iscrowd"]) for g in gt], dtype=bool)
        dt_boundaries = [self._boundaries["dt", dt[i]["id"]] for i in order]
        gt_boundaries = [self._boundaries["gt", g["id"]] for g in gt]
        boundary_ious = np.asarray(mask_utils.iou(dt_boundaries, gt_boundaries, crowd.tolist()))
        ious = np.array(mask_ious, dtype=np.float64)
        ious[:, ~crowd] = np.minimum(ious[:, ~crowd], boundary_ious[:, ~crowd])
        return ious
