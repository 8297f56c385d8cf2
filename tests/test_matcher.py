"""HungarianMatcher: costs against a brute-force torch reference, optimality against exhaustive search,
batch/per-image equivalence, permutation equivariance, planted assignments, empty targets, NaN errors."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from m2f.matcher import HungarianMatcher
from m2f.point_sampling import point_sample, random_points


def _random_batch(batch: int, queries: int, classes: int, num_targets: list[int], size: int = 32,
                  seed: int = 0) -> tuple[dict, list[dict]]:
    g = torch.Generator().manual_seed(seed)
    outputs = {"pred_logits": torch.randn(batch, queries, classes + 1, generator=g),
               "pred_masks": 3 * torch.randn(batch, queries, size // 4, size // 4, generator=g)}
    targets = [{"labels": torch.randint(0, classes, (n,), generator=g),
                "masks": torch.rand(n, size, size, generator=g) > 0.6} for n in num_targets]
    return outputs, targets


def _reference_costs(outputs: dict, targets: list[dict], num_points: int, seed: int) -> list[dict]:
    """Each (query, segment) pair scored independently with torch's own BCE and a hand dice."""
    torch.manual_seed(seed)
    result = []
    for b, target in enumerate(targets):
        coords = random_points(1, num_points, device=torch.device("cpu"))
        probs = outputs["pred_logits"][b].softmax(-1)
        pred = point_sample(outputs["pred_masks"][b:b + 1].float(), coords)[0]
        tgt = point_sample(target["masks"][None].float(), coords)[0]
        q, g = pred.shape[0], tgt.shape[0]
        cost = {"class": torch.zeros(q, g), "mask": torch.zeros(q, g), "dice": torch.zeros(q, g)}
        for i, j in itertools.product(range(q), range(g)):
            cost["class"][i, j] = -probs[i, target["labels"][j]]
            cost["mask"][i, j] = F.binary_cross_entropy_with_logits(pred[i], tgt[j])
            p = pred[i].sigmoid()
            cost["dice"][i, j] = 1 - (2 * (p * tgt[j]).sum() + 1) / (p.sum() + tgt[j].sum() + 1)
        result.append(cost)
    return result


def test_cost_matrices_match_brute_force_reference():
    outputs, targets = _random_batch(2, 6, 4, [3, 5])
    matcher = HungarianMatcher(num_points=500)
    torch.manual_seed(7)
    costs = matcher.cost_matrices(outputs, targets)
    for cost, ref in zip(costs, _reference_costs(outputs, targets, 500, seed=7)):
        for term in ("class", "mask", "dice"):
            torch.testing.assert_close(cost[term], ref[term], atol=1e-5, rtol=0)


def test_full_mask_costs_use_nearest_downsampled_targets():
    outputs, targets = _random_batch(1, 4, 3, [2], size=32)
    costs = HungarianMatcher(point_matching=False).cost_matrices(outputs, targets)[0]
    pred = outputs["pred_masks"][0].flatten(1)
    tgt = targets[0]["masks"][:, ::4, ::4].float().flatten(1)  # nearest 32 -> 8 reads rows/cols 4i
    for i, j in itertools.product(range(4), range(2)):
        bce = F.binary_cross_entropy_with_logits(pred[i], tgt[j])
        p = pred[i].sigmoid()
        dice = 1 - (2 * (p * tgt[j]).sum() + 1) / (p.sum() + tgt[j].sum() + 1)
        assert costs["mask"][i, j] == pytest.approx(float(bce), abs=1e-5)
        assert costs["dice"][i, j] == pytest.approx(float(dice), abs=1e-5)


def test_assignment_is_optimal_against_exhaustive_search():
    for seed in range(5):
        outputs, targets = _random_batch(1, 6, 3, [4], seed=seed)
        matcher = HungarianMatcher(num_points=300)
        torch.manual_seed(seed)
        cost = matcher.cost_matrices(outputs, targets)[0]
        total = 5 * cost["mask"] + 2 * cost["class"] + 5 * cost["dice"]
        best = min(sum(total[q, g] for g, q in enumerate(perm)) for perm in itertools.permutations(range(6), 4))
        torch.manual_seed(seed)
        pred_idx, tgt_idx = matcher(outputs, targets)[0]
        assert len(pred_idx) == 4 and sorted(tgt_idx.tolist()) == [0, 1, 2, 3]
        assert float(total[pred_idx, tgt_idx].sum()) == pytest.approx(float(best), abs=1e-5)


def test_batched_equals_per_image_calls():
    outputs, targets = _random_batch(3, 8, 5, [2, 0, 6])
    matcher = HungarianMatcher(num_points=400)
    torch.manual_seed(3)
    batched = matcher(outputs, targets)
    torch.manual_seed(3)
    single = [matcher({k: v[b:b + 1] for k, v in outputs.items()}, [targets[b]])[0] for b in range(3)]
    for (p1, t1), (p2, t2) in zip(batched, single):
        assert torch.equal(p1, p2) and torch.equal(t1, t2)


def test_explicit_generator_is_deterministic_and_leaves_global_rng_alone():
    outputs, targets = _random_batch(2, 8, 5, [4, 3])
    matcher = HungarianMatcher(num_points=50)
    state = torch.get_rng_state()
    a = matcher(outputs, targets, generator=torch.Generator().manual_seed(1))
    b = matcher(outputs, targets, generator=torch.Generator().manual_seed(1))
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


def test_permuting_targets_permutes_assignment():
    outputs, targets = _random_batch(1, 10, 5, [6])
    matcher = HungarianMatcher(num_points=400)
    torch.manual_seed(0)
    pred_idx, tgt_idx = matcher(outputs, targets)[0]
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    permuted = [{"labels": targets[0]["labels"][perm], "masks": targets[0]["masks"][perm]}]
    torch.manual_seed(0)
    pred_idx_p, tgt_idx_p = matcher(outputs, permuted)[0]
    # Query q took original segment j before; now it must take the new position of j.
    assert dict(zip(pred_idx.tolist(), tgt_idx.tolist())) == {
        q: int(perm[j]) for q, j in zip(pred_idx_p.tolist(), tgt_idx_p.tolist())}


def test_planted_assignment_is_found():
    g = torch.Generator().manual_seed(0)
    num_queries, num_classes, size = 12, 7, 32
    masks = torch.zeros(4, size, size, dtype=torch.bool)
    for i, (y, x) in enumerate([(0, 0), (0, 16), (16, 0), (16, 16)]):
        masks[i, y:y + 16, x:x + 16] = True
    labels = torch.tensor([1, 4, 1, 6])
    planted = torch.tensor([9, 2, 5, 0])  # query planted[j] predicts segment j
    logits = torch.randn(1, num_queries, num_classes + 1, generator=g)
    pred_masks = torch.randn(1, num_queries, size // 4, size // 4, generator=g)
    for j, q in enumerate(planted):
        logits[0, q, labels[j]] = 10.0
        pred_masks[0, q] = 10.0 * (2 * masks[j, ::4, ::4].float() - 1)
    for point_matching in (True, False):
        matcher = HungarianMatcher(num_points=1000, point_matching=point_matching)
        pred_idx, tgt_idx = matcher({"pred_logits": logits, "pred_masks": pred_masks},
                                    [{"labels": labels, "masks": masks}])[0]
        assert dict(zip(tgt_idx.tolist(), pred_idx.tolist())) == dict(enumerate(planted.tolist()))


def test_empty_targets_give_empty_indices():
    outputs, targets = _random_batch(2, 5, 3, [0, 0])
    for pred_idx, tgt_idx in HungarianMatcher(num_points=20)(outputs, targets):
        assert pred_idx.dtype == tgt_idx.dtype == torch.int64
        assert pred_idx.numel() == tgt_idx.numel() == 0


def test_more_targets_than_queries_matches_every_query():
    outputs, targets = _random_batch(1, 3, 4, [5])
    pred_idx, tgt_idx = HungarianMatcher(num_points=50)(outputs, targets)[0]
    assert pred_idx.tolist() == [0, 1, 2] and len(set(tgt_idx.tolist())) == 3


@pytest.mark.parametrize(("key", "terms"), [("pred_logits", "class"), ("pred_masks", "mask/dice")])
def test_non_finite_costs_raise_clear_error(key, terms):
    outputs, targets = _random_batch(2, 5, 3, [2, 2])
    outputs[key][1, 2] = float("nan")
    with pytest.raises(FloatingPointError, match=rf"in the {terms} cost term\(s\) of image 1 .*learning rate"):
        HungarianMatcher(num_points=50)(outputs, targets)


def test_bad_targets_raise_value_errors():
    outputs, targets = _random_batch(1, 5, 3, [2])
    with pytest.raises(ValueError, match=r"labels'\] must lie in \[0, 3\)"):
        HungarianMatcher()(outputs, [{"labels": torch.tensor([0, 3]), "masks": targets[0]["masks"]}])
    with pytest.raises(ValueError, match="2 labels but masks of shape"):
        HungarianMatcher()(outputs, [{"labels": targets[0]["labels"], "masks": targets[0]["masks"][:1]}])
    with pytest.raises(ValueError, match="2 targets for a batch of 1"):
        HungarianMatcher()(outputs, targets * 2)


def test_costs_are_fp32_under_autocast_and_for_bf16_outputs():
    outputs, targets = _random_batch(2, 6, 4, [3, 2])
    matcher = HungarianMatcher(num_points=200)
    torch.manual_seed(0)
    reference = matcher.cost_matrices(outputs, targets)
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = matcher.cost_matrices(outputs, targets)
    half = {k: v.bfloat16() for k, v in outputs.items()}
    torch.manual_seed(0)
    from_bf16 = matcher.cost_matrices(half, targets)
    torch.manual_seed(0)
    upcast = matcher.cost_matrices({k: v.float() for k, v in half.items()}, targets)
    for ref, amp, low, up in zip(reference, autocast, from_bf16, upcast):
        for term in ("class", "mask", "dice"):
            assert amp[term].dtype == low[term].dtype == torch.float32
            torch.testing.assert_close(amp[term], ref[term])
            torch.testing.assert_close(low[term], up[term])


@pytest.mark.parametrize("point_matching", [True, False])
def test_matching_all_sets_at_once_equals_one_call_per_set(point_matching):
    sets = [_random_batch(3, 7, 4, [2, 0, 5], seed=s)[0] for s in range(4)]
    targets = _random_batch(3, 7, 4, [2, 0, 5])[1]
    matcher = HungarianMatcher(num_points=256, point_matching=point_matching)
    together = matcher.match_sets(sets, targets, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    one_by_one = [matcher(outputs, targets, generator=g) for outputs in sets]
    for a, b in zip(together, one_by_one):
        assert all(torch.equal(pa, pb) and torch.equal(ta, tb) for (pa, ta), (pb, tb) in zip(a, b))
