"""PQ follows panopticapi's pq_compute: hand-made cases with known PQ/SQ/RQ, agreement with torchmetrics'
PanopticQuality where the definitions coincide, and the file interface (pq_compute) on files written here."""

import json

import numpy as np
import pytest
import torch
from torchmetrics.detection import PanopticQuality

from m2f.evaluation import PanopticEvaluator, pq_compute, read_panoptic_png, write_panoptic_png

# Category 3 (a thing) and 5 (stuff) only appear in some cases; 7 never does.
CATEGORIES = [{"id": 1, "isthing": 1}, {"id": 2, "isthing": 0}, {"id": 3, "isthing": 1},
              {"id": 5, "isthing": 0}, {"id": 7, "isthing": 1}]


def row(*runs: tuple[int, int]) -> np.ndarray:
    """A 1 x W id map from (id, length) runs."""
    return np.concatenate([np.full(n, i, dtype=np.int64) for i, n in runs])[None]


def segs(*pairs: tuple[int, int], crowd: tuple[int, ...] = ()) -> list[dict]:
    return [{"id": i, "category_id": c, "iscrowd": int(i in crowd)} for i, c in pairs]


def evaluate(pred, pred_segs, gt, gt_segs) -> dict:
    ev = PanopticEvaluator(categories=CATEGORIES, contiguous_predictions=False)
    ev.update(pred_ids=pred, pred_segments=pred_segs, gt_ids=gt, gt_segments=gt_segs)
    return ev.compute()


def test_perfect_match_and_absent_classes_excluded():
    gt = row((1, 10), (2, 10))
    result = evaluate(gt, segs((1, 1), (2, 2)), gt, segs((1, 1), (2, 2)))
    assert result["All"] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": 2}
    assert result["Things"]["n"] == 1 and result["Stuff"]["n"] == 1
    assert result["per_class"][7] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "tp": 0, "fp": 0, "fn": 0}


@pytest.mark.parametrize(("pred_a_pixels", "matched"), [(51, True), (50, False)])
def test_iou_just_above_and_at_one_half(pred_a_pixels, matched):
    """GT: thing A (100 px) then stuff B (100 px). The prediction of A covers its first n pixels
    (IoU n/100), stuff B covers the rest (IoU 100/(200-n))."""
    gt = row((1, 100), (2, 100))
    pred = row((11, pred_a_pixels), (12, 200 - pred_a_pixels))
    result = evaluate(pred, segs((11, 1), (12, 2)), gt, segs((1, 1), (2, 2)))
    iou_b = 100 / (200 - pred_a_pixels)
    a, b = result["per_class"][1], result["per_class"][2]
    assert b["pq"] == pytest.approx(iou_b) and b["tp"] == 1
    if matched:
        assert (a["tp"], a["fp"], a["fn"]) == (1, 0, 0)
        assert a["pq"] == pytest.approx(0.51) and a["sq"] == pytest.approx(0.51) and a["rq"] == 1.0
    else:  # IoU exactly 0.5 is not a match: one FP and one FN
        assert (a["tp"], a["fp"], a["fn"]) == (0, 1, 1)
        assert a["pq"] == 0.0 and a["rq"] == 0.0
    assert result["All"]["pq"] == pytest.approx((a["pq"] + iou_b) / 2)
    assert result["Things"]["pq"] == pytest.approx(a["pq"]) and result["Stuff"]["pq"] == pytest.approx(iou_b)


@pytest.mark.parametrize(("split", "fp"), [(4, 0), (5, 1)])
def test_false_positive_mostly_on_void_is_ignored(split, fp):
    """GT: void (10 px) then thing A (20 px). Prediction 21 (class A) covers pixels split..split+9, of
    which 10 - split lie on void; prediction 22 (A) covers the rest of A and matches it. With 6 of 10
    pixels on void the unmatched segment 21 is ignored; with exactly 5 (not > 0.5) it is a FP."""
    gt = row((0, 10), (1, 20))
    pred = row((0, split), (21, 10), (22, 20 - split))
    result = evaluate(pred, segs((21, 1), (22, 1)), gt, segs((1, 1)))
    a = result["per_class"][1]
    own = 20 - split
    assert (a["tp"], a["fp"], a["fn"]) == (1, fp, 0)
    assert a["sq"] == pytest.approx(own / 20)
    assert a["pq"] == pytest.approx((own / 20) / (1 + 0.5 * fp))


def test_void_pixels_are_removed_from_the_union():
    """GT: A (10 px) then void (5 px). The prediction of A spills 4 px onto void: IoU stays 1."""
    gt = row((1, 10), (0, 5))
    pred = row((9, 14), (0, 1))
    result = evaluate(pred, segs((9, 1)), gt, segs((1, 1)))
    assert result["per_class"][1]["sq"] == pytest.approx(1.0)
    assert result["All"]["pq"] == pytest.approx(1.0)


def test_crowd_regions():
    """GT: A instance (10), crowd A (10), stuff B (10). Predictions: A perfect; A on the crowd (ignored,
    and never a match); thing 3 half on the crowd of A, half on B (a FP: the crowd is another class);
    B on 8 of its 10 pixels. Crowd GT is no FN."""
    gt = row((1, 10), (2, 10), (3, 10))
    gt_segs = segs((1, 1), (2, 1), (3, 2), crowd=(2,))
    pred = row((11, 10), (12, 8), (13, 4), (14, 8))
    pred_segs = segs((11, 1), (12, 1), (13, 3), (14, 2))
    result = evaluate(pred, pred_segs, gt, gt_segs)
    pc = result["per_class"]
    assert [(pc[c]["tp"], pc[c]["fp"], pc[c]["fn"]) for c in (1, 2, 3)] == [(1, 0, 0), (1, 0, 0), (0, 1, 0)]
    assert pc[2]["pq"] == pytest.approx(0.8)
    assert result["All"] == pytest.approx({"pq": 1.8 / 3, "sq": 1.8 / 3, "rq": 2 / 3, "n": 3})
    assert result["Things"] == pytest.approx({"pq": 0.5, "sq": 0.5, "rq": 0.5, "n": 2})
    assert result["Stuff"] == pytest.approx({"pq": 0.8, "sq": 0.8, "rq": 1.0, "n": 1})


def test_contiguous_predictions_and_streaming_over_images():
    gt = row((1, 10), (2, 10))
    ev = PanopticEvaluator(categories=CATEGORIES)  # predictions use contiguous indices: id 1 -> 0, id 2 -> 1
    ev.update(pred_ids=torch.from_numpy(gt),
              pred_segments=[{"id": 1, "category_id": 0}, {"id": 2, "category_id": 1}],
              gt_ids=gt, gt_segments=segs((1, 1), (2, 2)))
    ev.update(pred_ids=np.zeros_like(gt), pred_segments=[], gt_ids=gt, gt_segments=segs((1, 1), (2, 2)))
    result = ev.compute()
    assert result["num_images"] == 2
    assert result["per_class"][1]["tp"] == 1 and result["per_class"][1]["fn"] == 1
    assert result["All"]["pq"] == pytest.approx(1 / 1.5)


def test_inconsistent_inputs_raise():
    gt = row((1, 10))
    ev = PanopticEvaluator(categories=CATEGORIES, contiguous_predictions=False)
    with pytest.raises(ValueError, match=r"\[4\] are in the id map but not in segments_info"):
        ev.update(pred_ids=row((4, 10)), pred_segments=[], gt_ids=gt, gt_segments=segs((1, 1)), image_id=9)
    with pytest.raises(ValueError, match=r"\[5\] are in segments_info but not in the id map"):
        ev.update(pred_ids=row((4, 10)), pred_segments=segs((4, 1), (5, 1)), gt_ids=gt,
                  gt_segments=segs((1, 1)))
    with pytest.raises(ValueError, match="unknown category_id 4"):
        ev.update(pred_ids=row((4, 10)), pred_segments=segs((4, 4)), gt_ids=gt, gt_segments=segs((1, 1)))
    with pytest.raises(ValueError, match="differ in size"):
        ev.update(pred_ids=row((4, 9)), pred_segments=segs((4, 1)), gt_ids=gt, gt_segments=segs((1, 1)))


def random_panoptic(rng: np.random.Generator, things: list[int], stuffs: list[int], size: int = 32):
    """(H, W, 2) (category, instance) maps from 8 x 8 blocks; stuff has instance 0. No void."""
    cats = rng.choice(things + stuffs, size=(size // 8, size // 8))
    inst = rng.integers(1, 4, size=cats.shape) * np.isin(cats, things)
    return np.stack([np.kron(cats, np.ones((8, 8), int)), np.kron(inst, np.ones((8, 8), int))], -1)


def perturb(rng: np.random.Generator, panoptic: np.ndarray, things: list[int],
            stuffs: list[int]) -> np.ndarray:
    out = panoptic.copy()
    for _ in range(6):  # random rectangles with a random (category, instance)
        y, x = rng.integers(0, 28, size=2)
        h, w = rng.integers(2, 12, size=2)
        cat = rng.choice(things + stuffs)
        out[y : y + h, x : x + w] = (cat, rng.integers(1, 4) if cat in things else 0)
    return out


def to_ids(panoptic: np.ndarray) -> tuple[np.ndarray, list[dict]]:
    pairs, inverse = np.unique(panoptic.reshape(-1, 2), axis=0, return_inverse=True)
    ids = inverse.reshape(panoptic.shape[:2]) + 1
    return ids, [{"id": i + 1, "category_id": int(c)} for i, (c, _) in enumerate(pairs)]


def test_agrees_with_torchmetrics_on_random_maps():
    """torchmetrics' PanopticQuality equals panopticapi when there is no void, no crowd and one segment
    per stuff class (its union also subtracts the GT segment's overlap with void predictions)."""
    rng = np.random.default_rng(0)
    things, stuffs = [1, 2, 3], [4, 5]
    categories = [{"id": c, "isthing": int(c in things)} for c in things + stuffs]
    ours = PanopticEvaluator(categories=categories, contiguous_predictions=False)
    metric = PanopticQuality(things=set(things), stuffs=set(stuffs), return_sq_and_rq=True,
                             return_per_class=True)
    average = PanopticQuality(things=set(things), stuffs=set(stuffs), return_sq_and_rq=True)
    for _ in range(12):
        gt = random_panoptic(rng, things, stuffs)
        pred = perturb(rng, gt, things, stuffs)
        (gt_ids, gt_segs), (pred_ids, pred_segs) = to_ids(gt), to_ids(pred)
        ours.update(pred_ids=pred_ids, pred_segments=pred_segs, gt_ids=gt_ids, gt_segments=gt_segs)
        metric.update(torch.from_numpy(pred)[None], torch.from_numpy(gt)[None])
        average.update(torch.from_numpy(pred)[None], torch.from_numpy(gt)[None])
    result = ours.compute()
    per_class = metric.compute().double()  # (C, 3) pq, sq, rq; things sorted, then stuffs sorted
    for row_index, c in enumerate(things + stuffs):
        r = result["per_class"][c]
        assert [r["pq"], r["sq"], r["rq"]] == pytest.approx(per_class[row_index].tolist(), abs=1e-6)
    pq, sq, rq = average.compute().tolist()
    assert [result["All"][k] for k in ("pq", "sq", "rq")] == pytest.approx([pq, sq, rq], abs=1e-6)
    # The random case exercises matches, misses and false positives.
    totals = [sum(r[k] for r in result["per_class"].values()) for k in ("tp", "fp", "fn")]
    assert all(t > 5 for t in totals)
    assert 0.2 < result["All"]["pq"] < 0.95


def write_panoptic_files(folder, json_path, maps_and_segments, categories):
    folder.mkdir(exist_ok=True)
    annotations, images = [], []
    for image_id, (ids, segments) in enumerate(maps_and_segments, start=1):
        name = f"{image_id:06d}.png"
        write_panoptic_png(folder / name, ids)
        annotations.append({"image_id": image_id, "file_name": name, "segments_info": segments})
        images.append({"id": image_id, "file_name": name.replace(".png", ".jpg"), "height": ids.shape[0],
                       "width": ids.shape[1]})
    json_path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))


def test_pq_compute_round_trip_and_hand_case_on_files(tmp_path):
    rng = np.random.default_rng(1)
    gt_maps = []
    for _ in range(3):
        ids, seg_list = to_ids(random_panoptic(rng, [1, 3], [2, 5]))
        # Large ids use all three PNG channels.
        big = [{**s, "id": s["id"] * 1000 + 70000, "iscrowd": 0} for s in seg_list]
        gt_maps.append((ids * 1000 + 70000, big))
    write_panoptic_files(tmp_path / "gt", tmp_path / "gt.json", gt_maps, CATEGORIES)
    assert np.array_equal(read_panoptic_png(tmp_path / "gt" / "000001.png"), gt_maps[0][0])
    same = pq_compute(tmp_path / "gt.json", tmp_path / "gt.json", tmp_path / "gt", tmp_path / "gt")
    assert same["All"] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": 4}

    # The crowd case of test_crowd_regions, through files (4 rows of the same pattern).
    crowd_gt = (np.tile(row((1, 10), (2, 10), (3, 10)), (4, 1)), segs((1, 1), (2, 1), (3, 2), crowd=(2,)))
    crowd_pred = (np.tile(row((11, 10), (12, 8), (13, 4), (14, 8)), (4, 1)),
                  segs((11, 1), (12, 1), (13, 3), (14, 2)))
    write_panoptic_files(tmp_path / "cgt", tmp_path / "cgt.json", [crowd_gt], CATEGORIES)
    write_panoptic_files(tmp_path / "cpred", tmp_path / "cpred.json", [crowd_pred], CATEGORIES)
    result = pq_compute(tmp_path / "cgt.json", tmp_path / "cpred.json", tmp_path / "cgt", tmp_path / "cpred")
    assert result["All"] == pytest.approx({"pq": 1.8 / 3, "sq": 1.8 / 3, "rq": 2 / 3, "n": 3})

    with pytest.raises(FileNotFoundError, match="panoptic PNG file not found"):
        pq_compute(tmp_path / "cgt.json", tmp_path / "cpred.json", tmp_path / "cgt", tmp_path / "nowhere")
    (tmp_path / "short.json").write_text(json.dumps({"annotations": []}))
    with pytest.raises(ValueError, match="no prediction for the image with id 1"):
        pq_compute(tmp_path / "cgt.json", tmp_path / "short.json", tmp_path / "cgt", tmp_path / "cpred")
    with pytest.raises(FileNotFoundError, match="ground-truth panoptic JSON file not found"):
        pq_compute(tmp_path / "missing.json", tmp_path / "cpred.json", tmp_path / "cgt", tmp_path / "cpred")
