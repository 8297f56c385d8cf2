"""Files in, metrics out: COCO panoptic and COCO instance result files against their ground truth."""

from pathlib import Path
from typing import Any

from m2f.data.image_io import read_json
from m2f.evaluation.coco_io import load_coco
from m2f.evaluation.instance_ap import summarize_instance_ap
from m2f.evaluation.panoptic_quality import PanopticEvaluator


def _annotations(data: Any, path: str | Path) -> list[dict[str, Any]]:
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise ValueError(f"{path}: a COCO panoptic JSON needs an 'annotations' list")
    for ann in data["annotations"]:
        missing = [k for k in ("image_id", "file_name", "segments_info") if k not in ann]
        if missing:
            raise ValueError(f"{path}: annotation {ann.get('image_id', '?')} lacks {missing}")
    return data["annotations"]


def pq_compute(gt_json: str | Path, pred_json: str | Path, gt_folder: str | Path,
               pred_folder: str | Path) -> dict[str, Any]:
    """PQ of COCO panoptic result files, with panopticapi's interface and definition.

    Images are read one at a time, so memory does not grow with the dataset.

    Args:
        gt_json: COCO panoptic ground truth (annotations with file_name and segments_info, categories).
        pred_json: predictions in the same format; category_id are the dataset's category ids.
        gt_folder: folder of the ground-truth PNGs.
        pred_folder: folder of the predicted PNGs.

    Returns:
        See `PanopticEvaluator.compute`.

    Raises:
        FileNotFoundError: a JSON or PNG file is missing.
        ValueError: malformed JSON, a ground-truth image without prediction, or inconsistent segments.
    """
    gt = read_json(gt_json, what="ground-truth panoptic JSON")
    pred = read_json(pred_json, what="predicted panoptic JSON")
    if not isinstance(gt, dict) or "categories" not in gt:
        raise ValueError(f"{gt_json}: a COCO panoptic ground-truth JSON needs a 'categories' list")
    evaluator = PanopticEvaluator(categories=gt["categories"], contiguous_predictions=False)
    predictions = {ann["image_id"]: ann for ann in _annotations(pred, pred_json)}
    for gt_ann in _annotations(gt, gt_json):
        image_id = gt_ann["image_id"]
        if image_id not in predictions:
            raise ValueError(f"{pred_json}: no prediction for the image with id {image_id}")
        pred_ann = predictions[image_id]
        evaluator.update(pred_ids=Path(pred_folder) / pred_ann["file_name"],
                         pred_segments=pred_ann["segments_info"],
                         gt_ids=Path(gt_folder) / gt_ann["file_name"], gt_segments=gt_ann["segments_info"],
                         image_id=image_id)
    return evaluator.compute()


def evaluate_instance_files(gt_json: str | Path, results_json: str | Path, *,
                            boundary: bool = False) -> dict[str, Any]:
    """COCO mask AP of an instance result file against its ground truth, on all ground-truth images.

    Args:
        gt_json: COCO instances JSON (images, annotations, categories).
        results_json: COCO result list [{"image_id", "category_id" (dataset id), "segmentation" (RLE),
            "score"}].
        boundary: also report Boundary AP ("boundary_AP", ...; see `boundary_iou.py`).

    Returns:
        See `summarize_instance_ap`.
    """
    gt = load_coco(gt_json)
    results = read_json(results_json, what="COCO instance results JSON")
    if not isinstance(results, list):
        raise ValueError(f"{results_json}: COCO instance results must be a JSON list of detections, "
                         f"got {type(results).__name__}")
    return summarize_instance_ap(gt, results, image_ids=sorted(gt.getImgIds()), boundary=boundary)
