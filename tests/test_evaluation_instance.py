"""Mask AP, Boundary AP and proposal AR through pycocotools on cases with hand-computed answers."""

import json

import numpy as np
import pytest
import torch
from scipy import ndimage

from m2f.evaluation import (
    InstanceEvaluator,
    ProposalRecallEvaluator,
    encode_masks,
    evaluate_instance_files,
    mask_to_boundary,
)

SIZE = 64


def square(y: int, x: int, h: int = 20, w: int = 20) -> np.ndarray:
    m = np.zeros((SIZE, SIZE), dtype=bool)
    m[y : y + h, x : x + w] = True
    return m


def coco_gt(objects: dict[int, list[tuple[int, np.ndarray]]]) -> dict:
    """COCO instances dict: {image_id: [(category_id, mask)]}; categories 1 and 3."""
    annotations = []
    for image_id, items in objects.items():
        for category, mask in items:
            ys, xs = mask.nonzero()
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                                "segmentation": encode_masks(mask[None])[0], "area": float(mask.sum()),
                                "bbox": [float(xs.min()), float(ys.min()), float(np.ptp(xs) + 1),
                                         float(np.ptp(ys) + 1)],
                                "iscrowd": 0})
    images = [{"id": i, "height": SIZE, "width": SIZE, "file_name": f"{i}.jpg"} for i in (1, 2)]
    return {"images": images, "annotations": annotations,
            "categories": [{"id": 1, "name": "a"}, {"id": 3, "name": "b"}]}


GT1, GT2, GT3 = square(5, 5), square(35, 35), square(10, 30)
GROUND_TRUTH = {1: [(1, GT1), (1, GT2)], 2: [(3, GT3)]}


def test_perfect_predictions_give_ap_one():
    ev = InstanceEvaluator(ground_truth=coco_gt(GROUND_TRUTH))
    ev.update(1, torch.from_numpy(np.stack([GT1, GT2])), torch.tensor([0.9, 0.8]), torch.tensor([0, 0]))
    ev.update(2, GT3[None], np.array([0.7]), np.array([1]))
    result = ev.compute()
    assert result["AP"] == result["AP50"] == result["AP75"] == result["AP_S"] == 1.0
    # 20 x 20 = 400 px objects are all "small" (< 32^2): no medium or large ground truth.
    assert np.isnan(result["AP_M"]) and np.isnan(result["AP_L"])
    assert result["per_class"] == pytest.approx({1: 1.0, 3: 1.0})


@pytest.mark.parametrize(("fp_score", "expected"), [(0.9, 0.5 * 51 / 101), (0.1, 51 / 101)])
def test_one_of_two_missed(fp_score, expected):
    """Two GT of class 1; one is found exactly (score 0.5), the other missed, plus a false positive.
    Recall tops at 0.5, so 51 of COCO's 101 recall points are reached, at precision 1 when the FP
    scores lower and 0.5 when it scores higher."""
    ev = InstanceEvaluator(ground_truth=coco_gt(GROUND_TRUTH))
    fp = square(40, 2, 10, 10)
    ev.update(1, np.stack([GT1, fp]), np.array([0.5, fp_score]), np.array([0, 0]))
    result = ev.compute()  # only image 1 is evaluated; class 3 has no GT there
    assert result["AP"] == pytest.approx(expected, abs=1e-12)
    assert result["AP50"] == pytest.approx(expected, abs=1e-12)
    assert np.isnan(result["per_class"][3])


def test_no_detections_and_input_checks():
    ev = InstanceEvaluator(ground_truth=coco_gt(GROUND_TRUTH))
    ev.update(1, np.zeros((0, SIZE, SIZE), bool), np.zeros(0), np.zeros(0, int))
    assert ev.compute()["AP"] == 0.0
    with pytest.raises(ValueError, match="resize predictions to the original size"):
        ev.update(1, np.zeros((1, 32, 32), bool), [0.5], [0])
    with pytest.raises(ValueError, match="image id 5 is not in the ground truth"):
        ev.update(5, GT1[None], [0.5], [0])
    with pytest.raises(ValueError, match=r"labels must be contiguous indices in \[0, 2\)"):
        ev.update(1, GT1[None], [0.5], [2])


def test_instance_files_match_in_memory(tmp_path):
    ev = InstanceEvaluator(ground_truth=coco_gt(GROUND_TRUTH))
    ev.update(1, np.stack([GT1, square(35, 37)]), [0.9, 0.8], [0, 0])
    ev.update(2, GT3[None], [0.7], [0])  # wrong class
    (tmp_path / "gt.json").write_text(json.dumps(coco_gt(GROUND_TRUTH)))
    (tmp_path / "res.json").write_text(json.dumps(ev.results))
    from_files = evaluate_instance_files(tmp_path / "gt.json", tmp_path / "res.json")
    in_memory = ev.compute()
    assert from_files["AP"] == pytest.approx(in_memory["AP"])
    # Class 1: GT1 exact, GT2 at IoU 360/440 = 0.82 (AP 1 at the 7 thresholds up to 0.80, 51/101 at the
    # other 3, where recall stops at 0.5; the lower-scored wrong-class detection changes nothing).
    assert from_files["per_class"][1] == pytest.approx((7 + 3 * 51 / 101) / 10)
    assert from_files["per_class"][3] == 0.0
    with pytest.raises(FileNotFoundError, match="COCO instance results JSON file not found"):
        evaluate_instance_files(tmp_path / "gt.json", tmp_path / "nothing.json")


def scipy_boundary(mask: np.ndarray, d: int) -> np.ndarray:
    """Reference: erosion by d iterations of a 3 x 3 square, outside the image counting as background."""
    return mask & ~ndimage.binary_erosion(mask, structure=np.ones((3, 3)), iterations=d, border_value=0)


def test_mask_to_boundary_against_scipy():
    # A 20 x 20 square in a 64 x 64 image: d = round(0.02 * 90.5) = 2, so a 2 px ring of 400 - 16^2 px.
    assert int(mask_to_boundary(square(10, 10)).sum()) == 400 - 16 * 16
    # Touching the border counts as boundary there too.
    assert mask_to_boundary(square(0, 0))[0, :20].all()
    rng = np.random.default_rng(0)
    for h, w in ((64, 64), (37, 101), (200, 150)):
        masks = ndimage.binary_opening(rng.random((3, h, w)) > 0.4, structure=np.ones((1, 3, 3)))
        d = max(1, round(0.02 * np.hypot(h, w)))
        expected = np.stack([scipy_boundary(m, d) for m in masks])
        assert np.array_equal(mask_to_boundary(masks), expected)


def test_boundary_ap_on_a_shifted_square():
    """A prediction shifted by one pixel: mask IoU 380/420 = 0.905, its Boundary IoU is lower; COCOeval
    matches at the thresholds <= min(mask IoU, Boundary IoU), so AP = (number of such thresholds) / 10."""
    gt = {1: [(1, GT1)]}
    pred = square(5, 6)
    b_gt, b_pred = scipy_boundary(GT1, 2), scipy_boundary(pred, 2)
    boundary_iou = (b_gt & b_pred).sum() / (b_gt | b_pred).sum()
    mask_iou = 380 / 420
    thresholds = np.linspace(0.5, 0.95, 10)
    ev = InstanceEvaluator(ground_truth=coco_gt(gt), boundary=True)
    ev.update(1, pred[None], [0.9], [0])
    result = ev.compute()
    assert result["AP"] == pytest.approx((thresholds <= mask_iou).mean())
    assert boundary_iou < mask_iou
    assert result["boundary_AP"] == pytest.approx((thresholds <= boundary_iou).mean())
    assert result["boundary_AP"] < result["AP"]
    perfect = InstanceEvaluator(ground_truth=coco_gt(gt), boundary=True)
    perfect.update(1, GT1[None], [0.9], [0])
    assert perfect.compute()["boundary_AP"] == pytest.approx(1.0)


def test_proposal_recall_class_agnostic():
    """Image 1: GT1 found exactly (score 0.9); GT2 by a proposal with IoU 248/400 = 0.62 (score 0.5).
    Image 2: GT3 (another class) found exactly. Categories are ignored. Recall is 3/3 at the thresholds
    0.50, 0.55, 0.60 and 2/3 at the other 7: AR@100 = (3 + 7 * 2/3) / 10; AR@1 keeps GT1 and GT3 only."""
    partial = square(35, 35, 20, 12)
    partial[35:43, 47] = True  # 240 + 8 = 248 px inside GT2
    ev = ProposalRecallEvaluator(ground_truth=coco_gt(GROUND_TRUTH))
    ev.update(1, np.stack([GT1, partial, square(0, 44, 8, 8)]), [0.9, 0.5, 0.1])
    ev.update(2, GT3[None], [0.3])
    result = ev.compute()
    assert result["AR@100"] == pytest.approx((3 + 7 * 2 / 3) / 10)
    assert result["AR@10"] == pytest.approx(result["AR@100"])
    assert result["AR@1"] == pytest.approx(2 / 3)
    assert result["AR_S@100"] == pytest.approx(result["AR@100"]) and np.isnan(result["AR_L@100"])
