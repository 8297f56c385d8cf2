"""Evaluating every prediction set of the decoder (prediction #0 ... final) in one pass over the data.

Mask2Former predicts classes and masks before the first decoder layer (from the learnable queries)
and after every layer: 10 prediction sets for 9 layers. `LayerwiseEvaluator` post-processes each
set with the same rules as the final output and feeds it to its own PQ / mIoU / AP evaluator, so
per-layer curves come from one run over the data.
"""

from collections.abc import Mapping, Sequence
from typing import Any

from m2f.evaluation.instance_ap import GroundTruth, InstanceEvaluator
from m2f.evaluation.panoptic_quality import IdMap, PanopticEvaluator, as_id_map, category_table
from m2f.evaluation.semantic_iou import SemanticEvaluator, panoptic_to_semantic
from m2f.postprocess import postprocess

PanopticTarget = tuple[IdMap, Sequence[Mapping[str, Any]]]


class LayerwiseEvaluator:
    """PQ, mIoU and AP for each prediction set; index 0 is prediction #0, the last index the final output.

    Args:
        categories: the dataset's categories (COCO dicts with "id" and "isthing"); the model's class k
            is the k-th category by id.
        panoptic: evaluate PQ (needs `panoptic_targets` in `update`).
        semantic: evaluate mIoU (needs `semantic_targets`, or `panoptic_targets` which are then
            converted with `panoptic_to_semantic`: mIoU_pan).
        instance_ground_truth: COCO instances ground truth; when given, evaluate mask AP. With
            `panoptic` on, only thing classes are kept (AP^Th_pan), as in the original.
        num_prediction_sets: aux_outputs + 1 (10 for the paper's 9 decoder layers).
        object_mask_threshold / overlap_threshold: panoptic inference thresholds (defaults 0.8 / 0.8).
        topk: instance inference detections per image (default 100).
        ignore_label: semantic ground-truth label that is not evaluated.
    """

    def __init__(self, *, categories: Sequence[Mapping[str, Any] | Any], panoptic: bool = True,
                 semantic: bool = True, instance_ground_truth: GroundTruth | None = None,
                 num_prediction_sets: int = 10, object_mask_threshold: float = 0.8,
                 overlap_threshold: float = 0.8, topk: int = 100, ignore_label: int = 255):
        self.category_ids, self.is_thing = category_table(categories)
        self.num_prediction_sets = num_prediction_sets
        self.panoptic_options = {"is_thing": self.is_thing, "object_mask_threshold": object_mask_threshold,
                                 "overlap_threshold": overlap_threshold}
        self.instance_options: dict[str, Any] = {"topk": topk,
                                                 "is_thing": self.is_thing if panoptic else None}
        self.ignore_label = ignore_label
        self._label_of = {c: k for k, c in enumerate(self.category_ids)}
        sets = range(num_prediction_sets)
        self.panoptic = [PanopticEvaluator(categories=categories) for _ in sets] if panoptic else None
        self.semantic = ([SemanticEvaluator(num_classes=len(self.category_ids), ignore_label=ignore_label)
                          for _ in sets] if semantic else None)
        self.instance = None
        if instance_ground_truth is not None:
            first = InstanceEvaluator(ground_truth=instance_ground_truth, category_ids=self.category_ids)
            # One loaded ground truth shared by all sets.
            self.instance = [first, *(InstanceEvaluator(ground_truth=first.gt, category_ids=self.category_ids)
                                      for _ in sets[1:])]

    def update(self, outputs: Mapping[str, Any], *, image_ids: Sequence[int],
               image_sizes: Sequence[Sequence[int]], output_sizes: Sequence[Sequence[int]] | None = None,
               padded_size: Sequence[int] | None = None,
               panoptic_targets: Sequence[PanopticTarget] | None = None,
               semantic_targets: Sequence[Any] | None = None) -> None:
        """Adds a batch.

        Args:
            outputs: the model output dict ("pred_logits", "pred_masks", "aux_outputs").
            image_ids: per image its ground-truth id (used for AP).
            image_sizes: per image its valid (h, w) inside the padded batch.
            output_sizes: per image the original (H, W) the ground truth has; default `image_sizes`.
            padded_size: see `m2f.postprocess.postprocess`.
            panoptic_targets: per image (ground-truth id map or panoptic PNG path, segments_info with
                dataset category ids).
            semantic_targets: per image (H, W) labels in [0, K) or `ignore_label`.

        Raises:
            ValueError: a wrong number of prediction sets or a missing target kind.
        """
        sets = [*outputs.get("aux_outputs", []), outputs]
        if len(sets) != self.num_prediction_sets:
            raise ValueError(f"outputs have {len(sets)} prediction sets (aux_outputs + final), "
                             f"expected num_prediction_sets={self.num_prediction_sets}")
        if self.panoptic is not None and panoptic_targets is None:
            raise ValueError("panoptic evaluation needs panoptic_targets")
        if panoptic_targets is not None:
            # Read each ground-truth PNG once, not once per prediction set.
            panoptic_targets = [(as_id_map(ids, f"image {i} ground truth"), segments)
                                for i, (ids, segments) in zip(image_ids, panoptic_targets)]
        if self.semantic is not None and semantic_targets is None:
            if panoptic_targets is None:
                raise ValueError("semantic evaluation needs semantic_targets or panoptic_targets")
            semantic_targets = [panoptic_to_semantic(ids, segments, category_to_label=self._label_of,
                                                     ignore_label=self.ignore_label)
                                for ids, segments in panoptic_targets]
        common = {"image_sizes": image_sizes, "output_sizes": output_sizes, "padded_size": padded_size}
        for s, prediction in enumerate(sets):
            if self.panoptic is not None:
                results = postprocess(prediction, task="panoptic", **common, **self.panoptic_options)
                for result, (gt_ids, gt_segments), image_id in zip(results, panoptic_targets, image_ids):
                    self.panoptic[s].update(pred_ids=result["panoptic_seg"],
                                            pred_segments=result["segments_info"], gt_ids=gt_ids,
                                            gt_segments=gt_segments, image_id=image_id)
            if self.semantic is not None:
                labels = postprocess(prediction, task="semantic", **common)
                for pred, gt in zip(labels, semantic_targets):
                    self.semantic[s].update(pred, gt)
            if self.instance is not None:
                results = postprocess(prediction, task="instance", **common, **self.instance_options)
                for result, image_id in zip(results, image_ids):
                    self.instance[s].update(image_id, result["masks"], result["scores"], result["labels"])

    def compute(self) -> list[dict[str, Any]]:
        """Per prediction set {"panoptic": PQ dict, "semantic": mIoU dict, "instance": AP dict} (the
        evaluated ones), index 0 = prediction #0, last = final output."""
        results: list[dict[str, Any]] = [{} for _ in range(self.num_prediction_sets)]
        for name, evaluators in (("panoptic", self.panoptic), ("semantic", self.semantic),
                                 ("instance", self.instance)):
            for s, evaluator in enumerate(evaluators or []):
                results[s][name] = evaluator.compute()
        return results
