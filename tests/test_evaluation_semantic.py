"""mIoU / accuracies against hand-computed confusion matrices, panoptic -> semantic conversion, and the
foreground attention mass."""

import numpy as np
import pytest
import torch

from m2f.evaluation import AttentionMassMeter, SemanticEvaluator, foreground_at_level, panoptic_to_semantic


def test_miou_hand_case():
    """Valid pixels (gt, pred): (0,0) (0,1) (1,1) (1,1) (2,2) (2,0); two pixels are ignored.
    IoU: class 0 = 1/(2+2-1), class 1 = 2/(2+3-2), class 2 = 1/(2+1-1); class 3 absent (nan)."""
    gt = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 0, 2]])
    ev = SemanticEvaluator(num_classes=4)
    ev.update(pred, gt)
    result = ev.compute()
    assert result["IoU"][:3] == pytest.approx([1 / 3, 2 / 3, 1 / 2]) and np.isnan(result["IoU"][3])
    assert result["ACC"][:3] == pytest.approx([1 / 2, 1, 1 / 2])
    assert result["mIoU"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert result["mACC"] == pytest.approx(2 / 3)
    assert result["pACC"] == pytest.approx(4 / 6)
    assert result["fwIoU"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)


def test_class_only_predicted_is_left_out_of_the_mean_but_costs_others():
    ev = SemanticEvaluator(num_classes=2)
    ev.update(np.array([[0, 1], [0, 0]]), np.array([[0, 0], [0, 0]]))  # batches of numpy work too
    ev.update(np.array([[0, 0]]), np.array([[0, 0]]))
    result = ev.compute()
    assert result["mIoU"] == pytest.approx(5 / 6) and np.isnan(result["IoU"][1])
    with pytest.raises(ValueError, match=r"prediction labels must lie in \[0, 2\)"):
        ev.update(np.array([[2]]), np.array([[0]]))
    with pytest.raises(ValueError, match="differ in shape"):
        ev.update(np.array([[0, 0]]), np.array([[0]]))


def test_panoptic_to_semantic():
    ids = np.array([[0, 5], [6, 7]])
    segments = [{"id": 5, "category_id": 10}, {"id": 6, "category_id": 20, "iscrowd": 1}]
    labels = panoptic_to_semantic(ids, segments, category_to_label={10: 0, 20: 1})
    assert labels.tolist() == [[255, 0], [1, 255]]  # void and the unlisted id 7 are ignored
    no_crowd = panoptic_to_semantic(ids, segments, category_to_label={10: 0, 20: 1}, include_crowd=False)
    assert no_crowd.tolist() == [[255, 0], [255, 255]]
    # Contiguous predictions (as panoptic_inference returns) need no map.
    assert panoptic_to_semantic(torch.tensor([[1, 0]]), [{"id": 1, "category_id": 2}]).tolist() == [[2, 255]]


def test_attention_mass():
    attention = torch.tensor([[[0.5, 0.25, 0.25, 0.0], [0.1, 0.2, 0.3, 0.4]]])  # (B=1, Q=2, 2x2 positions)
    foreground = torch.tensor([[[[1, 0], [0, 0]], [[0, 1], [1, 1]]]], dtype=torch.bool)
    meter = AttentionMassMeter()
    meter.update(attention, foreground)
    assert meter.compute() == pytest.approx({"foreground": 0.7, "background": 0.3, "count": 2})
    meter.reset()
    meter.update(torch.stack([attention, attention * 3], 1), foreground, valid=torch.tensor([[True, False]]))
    assert meter.compute()["foreground"] == pytest.approx(0.5)  # heads averaged; unnormalised rows are fine
    with pytest.raises(ValueError, match="expected attention"):
        meter.update(attention[..., :3], foreground)


def test_foreground_at_level():
    mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    mask[0, :4, :4] = True
    assert foreground_at_level(mask, (2, 2)).tolist() == [[[True, False], [False, False]]]
