"""Evaluation: PQ (panopticapi definition), COCO mask AP and Boundary AP (pycocotools), mIoU,
class-agnostic proposal AR, per-layer evaluation of all prediction sets, and attention mass.

Every evaluator streams: `update` per image, then `compute`; memory does not grow with the number
of images except for the RLE result lists that COCO AP needs. All metrics are in [0, 1].
"""

from m2f.data.image_io import read_json, read_panoptic_png
from m2f.evaluation.attention_mass import AttentionMassMeter, foreground_at_level
from m2f.evaluation.boundary_iou import BoundaryCOCOeval, mask_to_boundary
from m2f.evaluation.coco_io import load_coco, write_panoptic_png
from m2f.evaluation.files import evaluate_instance_files, pq_compute
from m2f.evaluation.instance_ap import InstanceEvaluator, encode_masks, run_cocoeval, summarize_instance_ap
from m2f.evaluation.layerwise import LayerwiseEvaluator
from m2f.evaluation.panoptic_quality import PanopticEvaluator, category_table
from m2f.evaluation.proposal_recall import ProposalRecallEvaluator
from m2f.evaluation.semantic_iou import SemanticEvaluator, panoptic_to_semantic

__all__ = [
    "AttentionMassMeter",
    "BoundaryCOCOeval",
    "InstanceEvaluator",
    "LayerwiseEvaluator",
    "PanopticEvaluator",
    "ProposalRecallEvaluator",
    "SemanticEvaluator",
    "category_table",
    "encode_masks",
    "evaluate_instance_files",
    "foreground_at_level",
    "load_coco",
    "mask_to_boundary",
    "panoptic_to_semantic",
    "pq_compute",
    "read_json",
    "read_panoptic_png",
    "run_cocoeval",
    "summarize_instance_ap",
    "write_panoptic_png",
]
