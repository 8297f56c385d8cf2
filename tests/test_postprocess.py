"""Post-processing: planted confident queries give the expected segments, thresholds act as documented,
stuff merges, outputs come at the original size from a padded input, and chunking changes nothing
(checked against a direct transcription of the original code that upsamples all queries at once)."""

import math

import pytest
import torch
import torch.nn.functional as F

from m2f.postprocess import (
    instance_inference,
    panoptic_inference,
    postprocess,
    resize_mask_logits,
    semantic_inference,
)

K = 3  # classes 0, 1 are things, 2 is stuff
IS_THING = [True, True, False]
PADDED = (64, 64)  # masks at 1/4: 16 x 16 cells
IMAGE = (48, 40)  # valid part of the padded input: 12 x 10 cells
OUTPUT = (96, 80)  # original size: every mask cell is 8 x 8 output pixels


def class_logits(label: int, prob: float, num_classes: int = K) -> torch.Tensor:
    """Logits whose softmax gives `prob` to `label` and shares the rest equally among the others."""
    rest = (1 - prob) / num_classes
    return torch.tensor([math.log(prob) if k == label else math.log(rest) for k in range(num_classes + 1)])


def planted(queries: list[tuple[int, float, tuple[slice, slice]]], num_queries: int = 8,
            cells: tuple[int, int] = (16, 16)) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, K+1) logits and (Q, h, w) mask logits: each planted query has a confident class and a +10
    rectangle of mask cells; every other query is a confident no-object with an empty mask."""
    logits = torch.stack([class_logits(K, 0.999)] * num_queries)
    masks = torch.full((num_queries, *cells), -10.0)
    for q, (label, prob, (rows, cols)) in enumerate(queries):
        logits[q] = class_logits(label, prob)
        masks[q, rows, cols] = 10.0
    return logits, masks


def cell_box(rows: slice, cols: slice, scale: int = 8) -> tuple[slice, slice]:
    return slice(rows.start * scale, rows.stop * scale), slice(cols.start * scale, cols.stop * scale)


def rect_pixels(rows: slice, cols: slice) -> int:
    """Output pixels of a cell rectangle: 64 per cell, less 6 at each corner, which bilinear
    upsampling rounds off (the 1 + 2 + 3 staircase checked in the resize test)."""
    return (rows.stop - rows.start) * (cols.stop - cols.start) * 64 - 4 * 6


def interior(rows: slice, cols: slice, scale: int = 8, margin: int = 4) -> tuple[slice, slice]:
    """The output pixels of a cell rectangle away from its (bilinearly rounded) corners."""
    r, c = cell_box(rows, cols, scale)
    return slice(r.start + margin, r.stop - margin), slice(c.start + margin, c.stop - margin)


A = (slice(1, 5), slice(1, 5))  # thing class 0
B = (slice(1, 5), slice(6, 9))  # thing class 1
C = (slice(7, 11), slice(1, 4))  # stuff class 2
D = (slice(7, 11), slice(6, 9))  # stuff class 2 again (merged with C)
PADDING_ONLY = (slice(13, 16), slice(0, 16))  # lies entirely in the padding


def naive_panoptic(logits: torch.Tensor, masks: torch.Tensor, *, thr: float = 0.8, overlap: float = 0.8):
    """The original MaskFormer panoptic_inference, transcribed directly (all Q upsampled at once)."""
    up = F.interpolate(masks[None], size=PADDED, mode="bilinear", align_corners=False)[0]
    up = up[:, : IMAGE[0], : IMAGE[1]]
    up = F.interpolate(up[None], size=OUTPUT, mode="bilinear", align_corners=False)[0].sigmoid()
    scores, labels = logits.softmax(-1).max(-1)
    keep = labels.ne(K) & (scores > thr)
    cur_scores, cur_classes, cur_masks = scores[keep], labels[keep], up[keep]
    seg = torch.zeros(OUTPUT, dtype=torch.int32)
    info, current, stuff_memory = [], 0, {}
    if cur_masks.shape[0] == 0:
        return seg, info
    ids = (cur_scores.view(-1, 1, 1) * cur_masks).argmax(0)
    for k in range(cur_classes.shape[0]):
        cls = int(cur_classes[k])
        isthing = IS_THING[cls]
        mask_area = int((ids == k).sum())
        original_area = int((cur_masks[k] >= 0.5).sum())
        mask = (ids == k) & (cur_masks[k] >= 0.5)
        if mask_area > 0 and original_area > 0 and int(mask.sum()) > 0:
            if mask_area / original_area < overlap:
                continue
            if not isthing:
                if cls in stuff_memory:
                    seg[mask] = stuff_memory[cls]
                    continue
                stuff_memory[cls] = current + 1
            current += 1
            seg[mask] = current
            info.append({"id": current, "isthing": isthing, "category_id": cls})
    return seg, info


def run_panoptic(logits, masks, **kw):
    return panoptic_inference(logits, masks, padded_size=PADDED, image_size=IMAGE, output_size=OUTPUT,
                              is_thing=IS_THING, **kw)


def test_resize_goes_through_padded_size_crop_and_output_size():
    masks = torch.full((1, 16, 16), -10.0)
    masks[0, 2:6, 2:6] = 10.0
    out = resize_mask_logits(masks, padded_size=PADDED, image_size=IMAGE, output_size=OUTPUT)
    assert out.shape == (1, *OUTPUT)
    ys, xs = (out[0] > 0).nonzero(as_tuple=True)
    # Cells 2..5 -> padded pixels 8..23 -> output pixels 16..47 (zero crossings at the cell edges).
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (16, 47, 16, 47)
    assert bool((out[0, 20:44, 20:44] > 0).all())
    corner = (out[0, 16:20, 16:20] > 0).int()
    assert corner.tolist() == [[0, 0, 0, 1], [0, 0, 1, 1], [0, 1, 1, 1], [1, 1, 1, 1]]
    assert int((out[0] > 0).sum()) == rect_pixels(slice(2, 6), slice(2, 6))
    # The crop uses the valid size, not the mask grid: resizing 12 x 10 cells straight to the output
    # size (ignoring the padding) would put the square elsewhere.
    wrong = F.interpolate(masks[None], size=OUTPUT, mode="bilinear", align_corners=False)[0]
    assert not torch.equal(wrong > 0, out > 0)


def test_panoptic_planted_queries_and_stuff_merging():
    logits, masks = planted([(0, 0.99, A), (1, 0.98, B), (2, 0.97, C), (2, 0.96, D), (0, 0.99, PADDING_ONLY)])
    result = run_panoptic(logits, masks)
    seg, info = result["panoptic_seg"], result["segments_info"]
    assert seg.shape == OUTPUT and seg.dtype == torch.int32
    described = [(s["id"], s["category_id"], s["isthing"]) for s in info]
    assert described == [(1, 0, True), (2, 1, True), (3, 2, False)]
    assert info[2]["score"] == pytest.approx(0.97, abs=1e-5)
    for segment_id, regions in ((1, [A]), (2, [B]), (3, [C, D])):
        box = torch.zeros(OUTPUT, dtype=torch.bool)
        for region in regions:
            assert bool((seg[interior(*region)] == segment_id).all())
            box[cell_box(*region)] = True
        assert not bool(((seg == segment_id) & ~box).any())
    # Stuff queries C and D share one id; their combined area is the two rectangles (corners rounded).
    assert [int((seg == i).sum()) for i in (1, 2, 3)] == [rect_pixels(*A), rect_pixels(*B),
                                                          rect_pixels(*C) + rect_pixels(*D)]
    # The query that lies only in the padding contributes nothing; uncovered pixels are void.
    assert int((seg == 0).sum()) == 96 * 80 - sum(rect_pixels(*r) for r in (A, B, C, D))
    expected_seg, expected_info = naive_panoptic(logits, masks)
    assert torch.equal(seg, expected_seg)
    assert [{k: s[k] for k in ("id", "isthing", "category_id")} for s in info] == expected_info


@pytest.mark.parametrize(("prob", "kept"), [(0.79, False), (0.81, True)])
def test_panoptic_object_mask_threshold(prob, kept):
    logits, masks = planted([(0, 0.99, A), (1, prob, B)])
    info = run_panoptic(logits, masks)["segments_info"]
    assert [s["category_id"] for s in info] == ([0, 1] if kept else [0])


@pytest.mark.parametrize(("b_region", "kept"), [
    ((slice(1, 6), slice(4, 6)), False),  # overlaps A (cells rows 1..4, cols 1..4) in 4 of its 10 cells
    ((slice(4, 9), slice(4, 6)), True),  # overlaps A in the single cell (4, 4)
])
def test_panoptic_overlap_threshold(b_region, kept):
    """Query b has a lower score than a, so a takes their overlap: b keeps about 6/10 of its mask
    (< 0.8: dropped) or 9/10 (kept, without the overlap). A confident stuff query covers the rest of
    the image, so that no query wins pixels outside its mask (the argmax area counts those too)."""
    logits, masks = planted([(0, 0.999, A), (1, 0.95, b_region), (2, 0.99, (slice(0, 16), slice(0, 16)))])
    masks[2, A[0], A[1]] = -10.0
    masks[2, b_region[0], b_region[1]] = -10.0
    result = run_panoptic(logits, masks)
    seg, info = result["panoptic_seg"], result["segments_info"]
    assert [s["category_id"] for s in info] == ([0, 1, 2] if kept else [0, 2])
    # a loses a few pixels along its edge inside b, where b's mask is stronger than a's fading one.
    assert int((seg == 1).sum()) == pytest.approx(rect_pixels(*A), rel=0.05)
    if kept:
        assert int((seg == 2).sum()) == pytest.approx(9 * 64, rel=0.05)
    else:
        assert not bool((seg[interior(*b_region)] == 1).all())  # b's own pixels stay void
    # A lower overlap threshold keeps b in both cases.
    assert len(run_panoptic(logits, masks, overlap_threshold=0.5)["segments_info"]) == 3
    expected_seg, _ = naive_panoptic(logits, masks)
    assert torch.equal(seg, expected_seg)


def test_panoptic_nothing_kept_gives_void():
    logits, masks = planted([])
    result = run_panoptic(logits, masks)
    assert result["segments_info"] == [] and not bool(result["panoptic_seg"].any())


def test_instance_planted_queries():
    logits, masks = planted([(0, 0.99, A), (1, 0.98, B), (2, 0.97, C)])
    out = instance_inference(logits, masks, padded_size=PADDED, image_size=IMAGE, output_size=OUTPUT, topk=3)
    assert out["masks"].shape == (3, *OUTPUT) and out["masks"].dtype == torch.bool
    assert out["labels"].tolist() == [0, 1, 2]
    for m, region in zip(out["masks"], (A, B, C)):
        assert bool(m[interior(*region)].all())
        assert int(m.sum()) == rect_pixels(*region)
    # score = class prob * mask score (mean sigmoid over the binary mask; below 1 along the edges).
    probs = resize_mask_logits(masks[:3], padded_size=PADDED, image_size=IMAGE, output_size=OUTPUT).sigmoid()
    mask_scores = (probs * out["masks"]).flatten(1).sum(1) / (out["masks"].flatten(1).sum(1) + 1e-6)
    assert torch.allclose(out["scores"], torch.tensor([0.99, 0.98, 0.97]) * mask_scores, atol=1e-5)
    assert bool((mask_scores > 0.9).all())
    # With the thing filter (panoptic model) the stuff prediction is dropped.
    things = instance_inference(logits, masks, padded_size=PADDED, image_size=IMAGE, output_size=OUTPUT,
                                topk=3, is_thing=IS_THING)
    assert things["labels"].tolist() == [0, 1]


def test_instance_topk_over_query_class_pairs_and_mask_score():
    """One query, three classes: top-k over (query, class) pairs repeats the query with each class."""
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    masks = torch.full((1, 4, 4), 1.0)  # every pixel has logit 1
    out = instance_inference(logits, masks, padded_size=(16, 16), image_size=(16, 16), output_size=(16, 16),
                             topk=100)
    probs = logits.softmax(-1)[0, :3]
    assert out["labels"].tolist() == [0, 1, 2]
    mask_score = torch.sigmoid(torch.tensor(1.0)) * 256 / (256 + 1e-6)
    assert torch.allclose(out["scores"], probs * mask_score, atol=1e-6)
    assert bool(out["masks"].all())


def test_semantic_planted_queries_and_formula():
    logits, masks = planted([(0, 0.99, A), (1, 0.98, B), (2, 0.97, C)])
    labels = semantic_inference(logits, masks, padded_size=PADDED, image_size=IMAGE, output_size=OUTPUT)
    assert labels.shape == OUTPUT and labels.dtype == torch.int64
    for label, region in ((0, A), (1, B), (2, C)):
        assert bool((labels[interior(*region)] == label).all())
    scores = semantic_inference(logits, masks, padded_size=PADDED, image_size=IMAGE, output_size=OUTPUT,
                                return_scores=True)
    up = resize_mask_logits(masks, padded_size=PADDED, image_size=IMAGE, output_size=OUTPUT).sigmoid()
    expected = torch.einsum("qk,qhw->khw", logits.softmax(-1)[:, :-1], up)
    assert scores.shape == (K, *OUTPUT)
    assert torch.allclose(scores, expected, atol=1e-5)


def test_semantic_combine_before_resize_option():
    """postprocess_before_inference=False combines at the valid size and resizes the score map after."""
    torch.manual_seed(0)
    logits, masks = torch.randn(6, K + 1), torch.randn(6, 16, 16)
    scores = semantic_inference(logits, masks, padded_size=PADDED, image_size=IMAGE, output_size=OUTPUT,
                                return_scores=True, postprocess_before_inference=False)
    up = F.interpolate(masks[None], size=PADDED, mode="bilinear", align_corners=False)[0].sigmoid()
    combined = torch.einsum("qk,qhw->khw", logits.softmax(-1)[:, :-1], up)[:, : IMAGE[0], : IMAGE[1]]
    expected = F.interpolate(combined[None], size=OUTPUT, mode="bilinear", align_corners=False)[0]
    assert torch.allclose(scores, expected, atol=1e-5)


def test_chunking_gives_identical_results():
    torch.manual_seed(1)
    logits, masks = planted([(0, 0.99, A), (1, 0.98, B), (2, 0.97, C), (2, 0.96, D), (0, 0.9, C)],
                            num_queries=20)
    logits += torch.randn_like(logits) * 0.1
    masks += torch.randn_like(masks) * 4
    kw = {"padded_size": PADDED, "image_size": IMAGE, "output_size": OUTPUT}
    for fn, extra in ((panoptic_inference, {"is_thing": IS_THING}), (instance_inference, {}),
                      (semantic_inference, {"return_scores": True})):
        one = fn(logits, masks, chunk_size=1, **kw, **extra)
        many = fn(logits, masks, chunk_size=1000, **kw, **extra)
        if isinstance(one, dict):
            for key in one:
                assert (torch.allclose(one[key].float(), many[key].float(), atol=1e-6)
                        if isinstance(one[key], torch.Tensor) else one[key] == many[key])
        else:
            assert torch.allclose(one, many, atol=1e-5)
    seg, info = naive_panoptic(logits, masks)
    result = panoptic_inference(logits, masks, chunk_size=3, is_thing=IS_THING, **kw)
    assert len(info) > 0
    assert torch.equal(result["panoptic_seg"], seg)


def test_postprocess_batch_matches_per_image_and_validates():
    torch.manual_seed(2)
    outputs = {"pred_logits": torch.randn(2, 5, K + 1), "pred_masks": torch.randn(2, 5, 16, 16)}
    sizes, out_sizes = [(64, 64), (40, 56)], [(64, 64), (80, 112)]
    batch = postprocess(outputs, task="semantic", image_sizes=sizes, output_sizes=out_sizes)
    assert [tuple(r.shape) for r in batch] == out_sizes
    single = semantic_inference(outputs["pred_logits"][1], outputs["pred_masks"][1], padded_size=PADDED,
                                image_size=sizes[1], output_size=out_sizes[1])
    assert torch.equal(batch[1], single)
    with pytest.raises(ValueError, match="task"):
        postprocess(outputs, task="depth", image_sizes=sizes)
    with pytest.raises(ValueError, match="larger than padded_size"):
        postprocess(outputs, task="semantic", image_sizes=[(65, 64), (40, 40)])
    with pytest.raises(ValueError, match="is_thing has 2 entries"):
        postprocess(outputs, task="panoptic", image_sizes=sizes, is_thing=[True, False])
