"""LayerwiseEvaluator: each of the 10 prediction sets goes through post-processing to its own PQ, mIoU and
AP evaluator. The final set is planted to be perfect, the 9 others predict nothing."""

import numpy as np
import pytest
import torch

from m2f.evaluation import LayerwiseEvaluator, encode_masks, write_panoptic_png

CATEGORIES = [{"id": 1, "isthing": 1}, {"id": 2, "isthing": 1}, {"id": 5, "isthing": 0}]
K, Q, SIZE = 3, 6, 64
# Full-width bands of mask cells: bilinear upsampling reproduces them exactly (no corners to round).
BANDS = [(0, slice(0, 4)), (1, slice(4, 8)), (2, slice(8, 16))]  # (class, cell rows)


def outputs(batch: int) -> dict:
    def nothing():
        logits = torch.full((batch, Q, K + 1), -5.0)
        logits[..., K] = 5.0
        return {"pred_logits": logits, "pred_masks": torch.randn(batch, Q, SIZE // 4, SIZE // 4)}

    final = nothing()
    final["pred_masks"][:] = -10.0
    for q, (label, rows) in enumerate(BANDS):
        final["pred_logits"][:, q, label] = 10.0
        final["pred_logits"][:, q, K] = -5.0
        final["pred_masks"][:, q, rows] = 10.0
    return {**final, "aux_outputs": [nothing() for _ in range(9)]}


def ground_truth() -> tuple[np.ndarray, list[dict], dict]:
    ids = np.zeros((SIZE, SIZE), dtype=np.int64)
    segments = []
    for label, rows in BANDS:
        segment_id = label + 1
        ids[rows.start * 4 : rows.stop * 4] = segment_id
        segments.append({"id": segment_id, "category_id": CATEGORIES[label]["id"], "iscrowd": 0})
    annotations = []
    for image_id in (1, 2):
        for s in segments[:2]:  # the things
            mask = ids == s["id"]
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": s["category_id"],
                                "segmentation": encode_masks(mask[None])[0], "area": float(mask.sum()),
                                "bbox": [0.0, 0.0, 64.0, 16.0], "iscrowd": 0})
    instances = {"images": [{"id": i, "height": SIZE, "width": SIZE} for i in (1, 2)],
                 "annotations": annotations,
                 "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
    return ids, segments, instances


def test_layerwise_final_perfect_others_empty(tmp_path):
    ids, segments, instances = ground_truth()
    write_panoptic_png(tmp_path / "2.png", ids)
    ev = LayerwiseEvaluator(categories=CATEGORIES, instance_ground_truth=instances)
    ev.update(outputs(2), image_ids=[1, 2], image_sizes=[(SIZE, SIZE)] * 2,
              panoptic_targets=[(ids, segments), (tmp_path / "2.png", segments)])
    results = ev.compute()
    assert len(results) == 10
    final = results[-1]
    assert final["panoptic"]["All"] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": 3}
    assert final["semantic"]["mIoU"] == 1.0  # mIoU_pan: panoptic GT converted to semantic
    assert final["instance"]["AP"] == pytest.approx(1.0)  # AP^Th_pan: thing classes only
    for earlier in results[:-1]:
        assert earlier["panoptic"]["All"]["pq"] == 0.0
        assert earlier["panoptic"]["per_class"][1]["fn"] == 2
        assert earlier["semantic"]["mIoU"] < 1.0
        assert earlier["instance"]["AP"] < 0.2


def test_layerwise_checks_inputs():
    ids, segments, _ = ground_truth()
    ev = LayerwiseEvaluator(categories=CATEGORIES, semantic=False)
    with pytest.raises(ValueError, match="expected num_prediction_sets=10"):
        ev.update({**outputs(1), "aux_outputs": []}, image_ids=[1], image_sizes=[(SIZE, SIZE)],
                  panoptic_targets=[(ids, segments)])
    with pytest.raises(ValueError, match="needs panoptic_targets"):
        ev.update(outputs(1), image_ids=[1], image_sizes=[(SIZE, SIZE)])
    semantic_only = LayerwiseEvaluator(categories=CATEGORIES, panoptic=False)
    semantic_only.update(outputs(1), image_ids=[1], image_sizes=[(SIZE, SIZE)],
                         semantic_targets=[torch.tensor(ids - 1)])
    final = semantic_only.compute()[-1]
    assert set(final) == {"semantic"} and final["semantic"]["mIoU"] == 1.0
