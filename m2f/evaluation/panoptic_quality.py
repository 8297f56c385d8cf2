"""Panoptic quality (PQ = SQ x RQ), streaming, with exactly the panopticapi definition.

Per image (panopticapi `pq_compute_single_core`):
- a predicted and a ground-truth segment of the same category match when IoU > 0.5, where
  IoU = intersection / (pred_area + gt_area - intersection - void_overlap) and void_overlap is the
  number of the predicted segment's pixels on void (id 0) ground truth; crowd ground truth
  (iscrowd = 1) never matches;
- an unmatched non-crowd ground-truth segment is a false negative;
- an unmatched predicted segment is a false positive unless more than half of its area lies on void
  plus the crowd region of its own category (the last crowd segment of that category listed).
Per class: PQ = sum IoU / (TP + FP/2 + FN/2), SQ = sum IoU / TP, RQ = TP / (TP + FP/2 + FN/2).
Averages (All, Things, Stuff) are unweighted means over the classes with TP + FP + FN > 0; `n` is
their number. All values are in [0, 1].

Differences from panopticapi, all on inputs it would not accept or where it crashes: segment areas are
counted from the id maps rather than read from the JSON "area" fields (equal in valid COCO files),
and an average over no classes is 0 with n = 0 instead of a ZeroDivisionError.
"""

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from m2f.data.image_io import read_panoptic_png

_OFFSET = 256**3  # segment ids fit in an RGB PNG, so gt_id * _OFFSET + pred_id is a unique pair key
IdMap = np.ndarray | Tensor | str | Path


def category_table(categories: Sequence[Mapping[str, Any] | Any]) -> tuple[list[int], list[bool]]:
    """Category ids sorted by id (the contiguous order) and their isthing flags.

    Args:
        categories: COCO category dicts with "id" and "isthing", or objects with `.id` and `.isthing`.

    Raises:
        ValueError: empty, missing fields, or duplicated ids.
    """
    rows = []
    for c in categories:
        try:
            if isinstance(c, Mapping):
                rows.append((int(c["id"]), bool(c["isthing"])))
            else:
                rows.append((int(c.id), bool(c.isthing)))
        except (KeyError, AttributeError) as e:
            raise ValueError(f"category {c!r} needs an 'id' and an 'isthing' field") from e
    if not rows:
        raise ValueError("categories is empty")
    rows.sort()
    ids = [i for i, _ in rows]
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicated category ids in {ids}")
    return ids, [t for _, t in rows]


def as_id_map(ids: IdMap, what: str) -> np.ndarray:
    """A (H, W) int64 segment-id map from an array, a tensor or a panoptic PNG path.

    `what` names the map in error messages.
    """
    if isinstance(ids, str | Path):
        return read_panoptic_png(ids)
    array = ids.detach().cpu().numpy() if isinstance(ids, Tensor) else np.asarray(ids)
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{what} must be a (H, W) integer id map, got {array.dtype} {array.shape}")
    if array.size and (array.min() < 0 or array.max() >= _OFFSET):
        raise ValueError(f"{what} ids must lie in [0, 256^3), got [{array.min()}, {array.max()}]")
    return array.astype(np.int64, copy=False)


class PanopticEvaluator:
    """Streaming PQ/SQ/RQ: `update` once per image, then `compute`. Memory is O(K).

    Args:
        categories: the dataset's categories (COCO dicts with "id" and "isthing"); ground-truth
            segments_info always uses these category ids.
        contiguous_predictions: predicted segments_info "category_id" is the contiguous class index
            (position in the categories sorted by id, as `panoptic_inference` returns); False: the
            dataset's category id (as in COCO panoptic result files).
    """

    def __init__(self, *, categories: Sequence[Mapping[str, Any] | Any], contiguous_predictions: bool = True):
        self.category_ids, self.isthing = category_table(categories)
        self.contiguous_predictions = contiguous_predictions
        self._index = {c: k for k, c in enumerate(self.category_ids)}
        self.reset()

    def reset(self) -> None:
        """Forgets all images seen so far."""
        num = len(self.category_ids)
        self.iou_sum = np.zeros(num, dtype=np.float64)
        self.tp = np.zeros(num, dtype=np.int64)
        self.fp = np.zeros(num, dtype=np.int64)
        self.fn = np.zeros(num, dtype=np.int64)
        self.num_images = 0

    def _segments(self, segments: Sequence[Mapping[str, Any]], contiguous: bool,
                  where: str) -> dict[int, tuple[int, bool]]:
        """segments_info -> {segment id: (class position, iscrowd)}."""
        table: dict[int, tuple[int, bool]] = {}
        for s in segments:
            try:
                segment_id, category = int(s["id"]), int(s["category_id"])
            except KeyError as e:
                raise ValueError(f"{where}: segment {dict(s)} lacks {e}") from e
            if segment_id == 0 or segment_id in table:
                problem = "void" if segment_id == 0 else "repeated"
                raise ValueError(f"{where}: segment id {segment_id} is {problem}")
            if contiguous:
                if not 0 <= category < len(self.category_ids):
                    raise ValueError(f"{where}: segment {segment_id} has class index {category}, "
                                     f"outside [0, {len(self.category_ids)})")
                position = category
            elif category in self._index:
                position = self._index[category]
            else:
                raise ValueError(f"{where}: segment {segment_id} has unknown category_id {category}")
            table[segment_id] = (position, bool(s.get("iscrowd", 0)))
        return table

    def update(self, *, pred_ids: IdMap, pred_segments: Sequence[Mapping[str, Any]], gt_ids: IdMap,
               gt_segments: Sequence[Mapping[str, Any]], image_id: Any = None) -> None:
        """Adds one image.

        Args:
            pred_ids: (H, W) predicted segment ids (0 = void), or the path of a panoptic PNG.
            pred_segments: predicted segments_info [{"id", "category_id"}] (see `contiguous_predictions`).
            gt_ids: (H, W) ground-truth segment ids (0 = void/unlabeled), or the path of a panoptic PNG.
            gt_segments: ground-truth segments_info [{"id", "category_id" (dataset id), "iscrowd"}].
            image_id: only used in error messages.

        Raises:
            ValueError: different map sizes, unknown categories, or a predicted segment id present in
                the map but not in pred_segments or vice versa (as panopticapi).
        """
        where = f"image {image_id}" if image_id is not None else "image"
        pred = as_id_map(pred_ids, f"{where} prediction")
        gt = as_id_map(gt_ids, f"{where} ground truth")
        if pred.shape != gt.shape:
            raise ValueError(f"{where}: prediction {pred.shape} and ground truth {gt.shape} differ in size")
        pred_segms = self._segments(pred_segments, self.contiguous_predictions, f"{where} prediction")
        gt_segms = self._segments(gt_segments, False, f"{where} ground truth")

        pairs, counts = np.unique(gt * _OFFSET + pred, return_counts=True)
        gt_of, pred_of = (pairs // _OFFSET).tolist(), (pairs % _OFFSET).tolist()
        counts = counts.tolist()
        gt_area: dict[int, int] = {}
        pred_area: dict[int, int] = {}
        for g, p, n in zip(gt_of, pred_of, counts):
            gt_area[g] = gt_area.get(g, 0) + n
            pred_area[p] = pred_area.get(p, 0) + n
        unlisted = sorted(set(pred_area) - set(pred_segms) - {0})
        if unlisted:
            raise ValueError(f"{where}: predicted segment ids {unlisted} are in the id map but not in "
                             "segments_info")
        absent = sorted(set(pred_segms) - set(pred_area))
        if absent:
            raise ValueError(f"{where}: predicted segment ids {absent} are in segments_info but not in the "
                             "id map")

        void_overlap = {p: n for g, p, n in zip(gt_of, pred_of, counts) if g == 0}
        gt_matched: set[int] = set()
        pred_matched: set[int] = set()
        for g, p, intersection in zip(gt_of, pred_of, counts):
            if g not in gt_segms or p not in pred_segms:
                continue
            (gt_class, crowd), (pred_class, _) = gt_segms[g], pred_segms[p]
            if crowd or gt_class != pred_class:
                continue
            union = pred_area[p] + gt_area[g] - intersection - void_overlap.get(p, 0)
            iou = intersection / union
            if iou > 0.5:
                self.tp[gt_class] += 1
                self.iou_sum[gt_class] += iou
                gt_matched.add(g)
                pred_matched.add(p)

        crowd_of_class: dict[int, int] = {}
        for g, (gt_class, crowd) in gt_segms.items():
            if g in gt_matched:
                continue
            if crowd:
                crowd_of_class[gt_class] = g
            else:
                self.fn[gt_class] += 1

        overlap = dict(zip(zip(gt_of, pred_of), counts))
        for p, (pred_class, _) in pred_segms.items():
            if p in pred_matched:
                continue
            ignored = void_overlap.get(p, 0)
            if pred_class in crowd_of_class:
                ignored += overlap.get((crowd_of_class[pred_class], p), 0)
            if ignored / pred_area[p] > 0.5:
                continue
            self.fp[pred_class] += 1
        self.num_images += 1

    def compute(self) -> dict[str, Any]:
        """PQ, SQ, RQ in [0, 1].

        Returns:
            {"All" / "Things" / "Stuff": {"pq", "sq", "rq", "n"}, "per_class": {category_id: {"pq", "sq",
            "rq", "tp", "fp", "fn"}}, "num_images"}. Classes without TP, FP or FN have zeros in
            per_class and are left out of the averages.
        """
        denominator = self.tp + 0.5 * self.fp + 0.5 * self.fn
        used = denominator > 0
        safe = np.where(used, denominator, 1.0)
        pq = np.where(used, self.iou_sum / safe, 0.0)
        sq = np.where(self.tp > 0, self.iou_sum / np.maximum(self.tp, 1), 0.0)
        rq = np.where(used, self.tp / safe, 0.0)
        isthing = np.asarray(self.isthing, dtype=bool)

        def average(selected: np.ndarray) -> dict[str, float | int]:
            chosen = selected & used
            n = int(chosen.sum())
            if n == 0:
                return {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 0}
            return {"pq": float(pq[chosen].mean()), "sq": float(sq[chosen].mean()),
                    "rq": float(rq[chosen].mean()), "n": n}

        per_class = {
            c: {"pq": float(pq[k]), "sq": float(sq[k]), "rq": float(rq[k]),
                "tp": int(self.tp[k]), "fp": int(self.fp[k]), "fn": int(self.fn[k])}
            for k, c in enumerate(self.category_ids)
        }
        return {"All": average(np.ones_like(isthing)), "Things": average(isthing), "Stuff": average(~isthing),
                "per_class": per_class, "num_images": self.num_images}
