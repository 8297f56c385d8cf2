"""COCO mask AP (pycocotools COCOeval, iouType "segm") and Boundary AP, streaming.

`InstanceEvaluator.update` RLE-encodes each image's masks at once, so only the compact result list
(what a COCO results JSON holds) grows with the dataset. AP values are in [0, 1]; an entry is nan
where COCOeval has nothing to average (e.g. AP_S without small ground-truth objects; COCOeval's -1).
"""

import contextlib
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor

from m2f.evaluation.boundary_iou import BoundaryCOCOeval
from m2f.evaluation.coco_io import load_coco

GroundTruth = str | Path | Mapping[str, Any] | COCO


def _numpy(x: Tensor | np.ndarray | Sequence[Any]) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)


def encode_masks(masks: Tensor | np.ndarray) -> list[dict[str, Any]]:
    """(n, H, W) bool masks -> COCO compressed RLEs with str counts (JSON-ready)."""
    array = _numpy(masks).astype(np.uint8)
    if array.ndim != 3:
        raise ValueError(f"masks must be (n, H, W), got shape {array.shape}")
    if array.shape[0] == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(array.transpose(1, 2, 0)))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def run_cocoeval(gt: COCO, results: Sequence[Mapping[str, Any]], *, image_ids: Sequence[int],
                 use_cats: bool = True, max_dets: Sequence[int] = (1, 10, 100), boundary: bool = False,
                 dilation_ratio: float = 0.02) -> COCOeval:
    """Evaluates and accumulates mask results with COCOeval, without its console output.

    Args:
        gt: ground truth.
        results: COCO results [{"image_id", "category_id", "segmentation" (RLE), "score"}].
        image_ids: the images evaluated.
        use_cats: False ignores categories (proposal recall).
        max_dets: detections per image considered; the last one is used for AP.
        boundary: match with min(mask IoU, Boundary IoU) (see `boundary_iou.py`).
        dilation_ratio: boundary width for `boundary`.

    Returns:
        The COCOeval object after `accumulate()` (see its `eval["precision"]` / `eval["recall"]`).
    """
    known = set(gt.getImgIds())
    strangers = sorted({r["image_id"] for r in results} - known)
    if strangers:
        raise ValueError(f"results refer to image ids {strangers[:10]} that are not in the ground truth")
    with contextlib.redirect_stdout(io.StringIO()):
        if results:
            dt = gt.loadRes([dict(r) for r in results])
        else:
            # loadRes rejects an empty list; an empty result set is still a valid (all-zero) evaluation.
            dt = COCO()
            dt.dataset = {"images": gt.dataset["images"], "categories": gt.dataset["categories"],
                          "annotations": []}
            dt.createIndex()
        evaluator = (BoundaryCOCOeval(gt, dt, dilation_ratio=dilation_ratio) if boundary
                     else COCOeval(gt, dt, iouType="segm"))
        evaluator.params.imgIds = sorted(image_ids)
        # Datasets of small images (the synthetic set) rescale COCO's 32^2 / 96^2 size limits and record
        # them, so that AP_S / AP_M / AP_L mean small / medium / large relative to the image.
        ranges = gt.dataset.get("info", {}).get("area_ranges")
        if ranges:
            evaluator.params.areaRng = [list(ranges[k]) for k in ("all", "small", "medium", "large")]
        evaluator.params.useCats = int(use_cats)
        evaluator.params.maxDets = sorted(max_dets)
        evaluator.evaluate()
        evaluator.accumulate()
    return evaluator


def mean_valid(values: np.ndarray) -> float:
    """Mean of the entries > -1 (COCOeval's "no ground truth" marker); nan when there are none."""
    valid = values[values > -1]
    return float(valid.mean()) if valid.size else float("nan")


def ap_metrics(evaluator: COCOeval) -> dict[str, Any]:
    """AP, AP50, AP75, AP_S, AP_M, AP_L and per-class AP (keyed by category id) at the last maxDets."""
    precision = evaluator.eval["precision"]  # (T IoU thresholds, R recall points, K, A areas, M maxDets)
    thresholds = evaluator.params.iouThrs
    at = {t: int(np.argmin(np.abs(thresholds - t))) for t in (0.5, 0.75)}
    metrics: dict[str, Any] = {
        "AP": mean_valid(precision[:, :, :, 0, -1]),
        "AP50": mean_valid(precision[at[0.5], :, :, 0, -1]),
        "AP75": mean_valid(precision[at[0.75], :, :, 0, -1]),
    }
    for a, name in enumerate(("AP_S", "AP_M", "AP_L"), start=1):
        metrics[name] = mean_valid(precision[:, :, :, a, -1])
    if evaluator.params.useCats:
        metrics["per_class"] = {int(c): mean_valid(precision[:, :, k, 0, -1])
                                for k, c in enumerate(evaluator.params.catIds)}
    return metrics


def summarize_instance_ap(gt: COCO, results: Sequence[Mapping[str, Any]], *, image_ids: Sequence[int],
                          boundary: bool = False, dilation_ratio: float = 0.02) -> dict[str, Any]:
    """Mask AP of `results` on `image_ids`, plus Boundary AP with the prefix "boundary_" when asked.

    Returns:
        {"AP", "AP50", "AP75", "AP_S", "AP_M", "AP_L", "per_class": {category_id: AP}} (and
        "boundary_AP", ..., "boundary_per_class"), all in [0, 1] or nan.
    """
    metrics = ap_metrics(run_cocoeval(gt, results, image_ids=image_ids))
    if boundary:
        boundary_metrics = ap_metrics(run_cocoeval(gt, results, image_ids=image_ids, boundary=True,
                                                   dilation_ratio=dilation_ratio))
        metrics.update({f"boundary_{k}": v for k, v in boundary_metrics.items()})
    return metrics


class CocoResults:
    """Per-image mask predictions accumulated as a COCO result list against a COCO ground truth.

    Args:
        ground_truth: COCO instances JSON path, loaded dict or `COCO`.
    """

    def __init__(self, *, ground_truth: GroundTruth):
        self.gt = load_coco(ground_truth)
        self.results: list[dict[str, Any]] = []
        self.image_ids: set[int] = set()

    def reset(self) -> None:
        """Forgets all images seen so far."""
        self.results = []
        self.image_ids = set()

    def _add(self, image_id: int, masks: Tensor | np.ndarray, scores: Tensor | np.ndarray,
             category_ids: Sequence[int]) -> None:
        image_id = int(image_id)
        if image_id not in self.gt.imgs:
            raise ValueError(f"image id {image_id} is not in the ground truth")
        masks_np, scores_np = _numpy(masks), _numpy(scores).astype(np.float64)
        if masks_np.ndim != 3 or not masks_np.shape[0] == len(scores_np) == len(category_ids):
            raise ValueError(f"image {image_id}: expected masks (n, H, W), scores (n,) and labels (n,), got "
                             f"{masks_np.shape}, {scores_np.shape} and {len(category_ids)} labels")
        info = self.gt.imgs[image_id]
        expected = (info.get("height"), info.get("width"))
        if masks_np.shape[0] and tuple(masks_np.shape[1:]) != expected:
            raise ValueError(f"image {image_id}: masks are {tuple(masks_np.shape[1:])} but the ground-truth "
                             f"image is (height, width) = {expected}; resize predictions to the original "
                             "size")
        self.image_ids.add(image_id)
        for rle, score, category in zip(encode_masks(masks_np), scores_np.tolist(), category_ids):
            self.results.append({"image_id": image_id, "category_id": int(category), "segmentation": rle,
                                 "score": score})


class InstanceEvaluator(CocoResults):
    """Streaming COCO mask AP (and optionally Boundary AP) on the images passed to `update`.

    Args:
        ground_truth: COCO instances JSON path, loaded dict or `COCO`.
        category_ids: the dataset category id of each contiguous class index the model predicts;
            default the ground truth's category ids sorted. For AP^Th_pan of a panoptic model pass
            the panoptic categories' ids (things keep their ids in COCO's instance JSON).
        boundary: also compute Boundary AP (keys "boundary_AP", ...).
        dilation_ratio: boundary width for Boundary AP (paper default 0.02).
    """

    def __init__(self, *, ground_truth: GroundTruth, category_ids: Sequence[int] | None = None,
                 boundary: bool = False, dilation_ratio: float = 0.02):
        super().__init__(ground_truth=ground_truth)
        self.category_ids = (sorted(self.gt.getCatIds()) if category_ids is None
                             else [int(c) for c in category_ids])
        self.boundary = boundary
        self.dilation_ratio = dilation_ratio

    def update(self, image_id: int, masks: Tensor | np.ndarray, scores: Tensor | np.ndarray,
               labels: Tensor | np.ndarray) -> None:
        """Adds one image's predictions (e.g. from `instance_inference` at the original size).

        Args:
            image_id: the ground-truth image id.
            masks: (n, H, W) bool at the ground-truth image size.
            scores: (n,) confidence.
            labels: (n,) contiguous class indices.
        """
        labels_np = _numpy(labels).astype(np.int64).reshape(-1)
        if labels_np.size and (labels_np.min() < 0 or labels_np.max() >= len(self.category_ids)):
            raise ValueError(f"image {image_id}: labels must be contiguous indices in "
                             f"[0, {len(self.category_ids)}), "
                             f"got [{labels_np.min()}, {labels_np.max()}]")
        self._add(image_id, masks, scores, [self.category_ids[k] for k in labels_np.tolist()])

    def compute(self) -> dict[str, Any]:
        """COCO AP on the images seen; see `summarize_instance_ap`."""
        if not self.image_ids:
            raise ValueError("InstanceEvaluator.compute() before any update()")
        return summarize_instance_ap(self.gt, self.results, image_ids=sorted(self.image_ids),
                                     boundary=self.boundary, dilation_ratio=self.dilation_ratio)
