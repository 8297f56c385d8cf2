"""Class-agnostic average recall (AR@1/10/100) of mask proposals, as in the paper's Fig. 3.

Ground truth: every annotation of a COCO *instance* JSON (on COCO: the 80 thing classes of val2017,
as the paper's proposal analysis uses). Crowd annotations are ignored, as COCOeval does. Categories
are ignored on both sides (COCOeval with useCats = 0), so any prediction set with per-query masks
and scores can be scored, e.g. all Q queries of one decoder layer with their max class score.
AR@m averages the recall over the IoU thresholds 0.50:0.05:0.95, counting each image's m
highest-scoring proposals.
"""

from collections.abc import Sequence

import numpy as np
from torch import Tensor

from m2f.evaluation.instance_ap import CocoResults, GroundTruth, mean_valid, run_cocoeval


class ProposalRecallEvaluator(CocoResults):
    """Streaming class-agnostic mask AR on the images passed to `update`.

    Args:
        ground_truth: COCO instances JSON path, loaded dict or `COCO`.
        max_dets: proposal budgets per image (paper: 1, 10, 100).
    """

    def __init__(self, *, ground_truth: GroundTruth, max_dets: Sequence[int] = (1, 10, 100)):
        super().__init__(ground_truth=ground_truth)
        self.max_dets = sorted(int(m) for m in max_dets)
        cat_ids = self.gt.getCatIds()
        if not cat_ids:
            raise ValueError("the ground truth has no categories")
        # COCO results need a valid category id even when categories are ignored.
        self._any_category = cat_ids[0]

    def update(self, image_id: int, masks: Tensor | np.ndarray, scores: Tensor | np.ndarray) -> None:
        """Adds one image's proposals.

        Args:
            image_id: the ground-truth image id.
            masks: (Q, H, W) bool proposals at the ground-truth image size.
            scores: (Q,) proposal scores (only their order matters).
        """
        self._add(image_id, masks, scores, [self._any_category] * len(scores))

    def compute(self) -> dict[str, float]:
        """{"AR@<m>" for each budget, and "AR_S@<m>", "AR_M@<m>", "AR_L@<m>" for the largest}, in [0, 1]."""
        if not self.image_ids:
            raise ValueError("ProposalRecallEvaluator.compute() before any update()")
        evaluator = run_cocoeval(self.gt, self.results, image_ids=sorted(self.image_ids), use_cats=False,
                                 max_dets=self.max_dets)
        recall = evaluator.eval["recall"]  # (T IoU thresholds, K=1, A areas, M budgets)
        metrics = {f"AR@{m}": mean_valid(recall[:, :, 0, i]) for i, m in enumerate(self.max_dets)}
        largest = self.max_dets[-1]
        for a, size in enumerate("SML", start=1):
            metrics[f"AR_{size}@{largest}"] = mean_valid(recall[:, :, a, -1])
        return metrics
