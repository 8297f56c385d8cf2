"""Point sampling and SetCriterion: references are torch's grid-free ops (F.interpolate,
F.binary_cross_entropy_with_logits, F.cross_entropy), hand formulas, and the full-mask loss that the
uniform point loss estimates."""


import pytest
import torch
import torch.nn.functional as F

from m2f.criterion import SetCriterion
from m2f.matcher import HungarianMatcher, Indices
from m2f.point_sampling import point_sample, random_points, uncertain_point_coords


class FixedMatcher(HungarianMatcher):
    """Returns a given assignment, so the loss is tested apart from the matching."""

    def __init__(self, indices: Indices):
        super().__init__()
        self.indices = indices

    def match_sets(self, sets, targets, *, generator=None) -> list[Indices]:
        return [self.indices] * len(sets)


def _blob_masks(size: int = 64) -> torch.Tensor:
    """Three overlapping shapes that stay one pixel away from the border."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    s = size / 64
    return torch.stack([(yy - 30 * s) ** 2 + (xx - 25 * s) ** 2 < (15 * s) ** 2,
                        (yy > 5 * s) & (yy < 40 * s) & (xx > 30 * s) & (xx < 60 * s),
                        (yy - 45 * s).abs() + (xx - 20 * s).abs() < 12 * s])


def _criterion(indices: Indices | None = None, **kwargs) -> SetCriterion:
    matcher = FixedMatcher(indices) if indices is not None else HungarianMatcher(num_points=kwargs.get("num_points", 500))
    return SetCriterion(num_classes=kwargs.pop("num_classes", 3), matcher=matcher, **kwargs)


def _dice(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    p = logits.sigmoid()
    return 1 - (2 * (p * targets).sum() + 1) / (p.sum() + targets.sum() + 1)


# --- point sampling -----------------------------------------------------------------------------------------

def test_point_sample_hand_values():
    image = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])
    # pixel centres read the pixels; the middle is their mean; a corner blends with the zero padding.
    coords = torch.tensor([[[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.5, 0.5], [1.0, 1.0]]])
    torch.testing.assert_close(point_sample(image, coords), torch.tensor([[[0.0, 1.0, 2.0, 1.5, 0.75]]]))


def test_point_sample_at_pixel_centres_equals_bilinear_interpolation():
    g = torch.Generator().manual_seed(0)
    maps = torch.zeros(2, 3, 8, 8)
    maps[:, :, 1:-1, 1:-1] = torch.randn(2, 3, 6, 6, generator=g)  # zero border: padding == clamping
    centres = (torch.arange(32) + 0.5) / 32
    y, x = torch.meshgrid(centres, centres, indexing="ij")
    coords = torch.stack([x.flatten(), y.flatten()], -1).expand(2, -1, -1)
    expected = F.interpolate(maps, size=(32, 32), mode="bilinear", align_corners=False).flatten(2)
    torch.testing.assert_close(point_sample(maps, coords), expected, atol=1e-6, rtol=0)


def test_uncertain_point_coords_keeps_the_most_uncertain_candidates():
    g = torch.Generator().manual_seed(0)
    logits = 4 * torch.randn(3, 1, 10, 10, generator=g)
    coords = uncertain_point_coords(logits, num_points=40, oversample_ratio=3.0, importance_sample_ratio=0.75,
                                    generator=torch.Generator().manual_seed(5))
    assert coords.shape == (3, 40, 2) and coords.min() >= 0 and coords.max() <= 1
    # Replay the draw: per mask 120 candidates then 10 fresh points; the 30 candidates with the smallest |logit|.
    replay = random_points(3, 130, device=torch.device("cpu"), generator=torch.Generator().manual_seed(5))
    candidates, fresh = replay[:, :120], replay[:, 120:]
    magnitude = point_sample(logits, candidates)[:, 0].abs()
    for i in range(3):
        kept = sorted(magnitude[i].argsort()[:30].tolist())
        picked = sorted((candidates[i][:, None] == coords[i, :30][None]).all(-1).nonzero()[:, 0].tolist())
        assert picked == kept
    torch.testing.assert_close(coords[:, 30:], fresh)


def test_uncertain_point_coords_uses_global_rng_reproducibly():
    logits = torch.randn(2, 1, 6, 6)
    torch.manual_seed(11)
    a = uncertain_point_coords(logits, num_points=20, oversample_ratio=2.0, importance_sample_ratio=0.5)
    torch.manual_seed(11)
    b = uncertain_point_coords(logits, num_points=20, oversample_ratio=2.0, importance_sample_ratio=0.5)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="importance_sample_ratio"):
        uncertain_point_coords(logits, num_points=20, oversample_ratio=2.0, importance_sample_ratio=1.5)


# --- loss terms against references ----------------------------------------------------------------------------

def test_class_loss_equals_weighted_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 4, generator=g)
    targets = [{"labels": torch.tensor([2, 0]), "masks": torch.zeros(2, 8, 8, dtype=torch.bool)},
               {"labels": torch.tensor([1]), "masks": torch.zeros(1, 8, 8, dtype=torch.bool)}]
    indices = [(torch.tensor([1, 4]), torch.tensor([1, 0])), (torch.tensor([3]), torch.tensor([0]))]
    classes = torch.full((2, 5), 3)
    classes[0, 1], classes[0, 4], classes[1, 3] = 0, 2, 1
    expected = F.cross_entropy(logits.flatten(0, 1), classes.flatten(), weight=torch.tensor([1, 1, 1, 0.1]))
    loss = _criterion(indices).loss_labels(logits[None], targets, [indices])
    torch.testing.assert_close(loss, expected[None])


def test_mask_losses_on_all_pixels_equal_torch_bce_and_hand_dice():
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(2, 4, 6, 6, generator=g)
    masks = torch.rand(2, 3, 6, 6, generator=g) > 0.5
    targets = [{"labels": torch.tensor([0, 1, 2]), "masks": masks[0]},
               {"labels": torch.tensor([0, 1]), "masks": masks[1, :2]}]
    indices = [(torch.tensor([0, 2, 3]), torch.tensor([1, 2, 0])), (torch.tensor([1]), torch.tensor([1]))]
    pairs = [(pred[0, 0], masks[0, 1]), (pred[0, 2], masks[0, 2]), (pred[0, 3], masks[0, 0]),
             (pred[1, 1], masks[1, 1])]
    bce = sum(F.binary_cross_entropy_with_logits(p.flatten(), t.float().flatten()) for p, t in pairs) / 5
    dice = sum(_dice(p.flatten(), t.float().flatten()) for p, t in pairs) / 5
    criterion = _criterion(indices, point_loss=False)
    loss_mask, loss_dice = criterion.loss_masks(pred[None], targets, [indices],
                                                num_masks=criterion.num_masks(targets, torch.device("cpu")))
    torch.testing.assert_close(loss_mask, bce[None])
    torch.testing.assert_close(loss_dice, dice[None])


def test_full_mask_loss_upsamples_predictions_bilinearly():
    g = torch.Generator().manual_seed(1)
    pred = torch.randn(1, 2, 4, 4, generator=g)
    masks = torch.rand(1, 16, 16, generator=g) > 0.5
    indices = [(torch.tensor([1]), torch.tensor([0]))]
    loss_mask, _ = _criterion(indices, point_loss=False).loss_masks(
        pred[None], [{"labels": torch.tensor([0]), "masks": masks}], [indices], num_masks=1.0)
    upsampled = F.interpolate(pred[:, 1:2], size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(loss_mask[0], F.binary_cross_entropy_with_logits(upsampled[0, 0], masks[0].float()))


def test_uniform_point_loss_estimates_the_full_mask_loss():
    """With uniform points (β = 0) and N = H·W points (so dice's +1 smoothing has the same scale), the
    point losses are unbiased estimates of the continuous loss, which the full-mask loss approximates.
    The example keeps that discretisation gap small: smooth logits with a zero outer ring (grid_sample's
    zero padding then equals interpolate's edge clamping) and masks off the border. Importance sampling
    (β > 0) is biased towards uncertain points by design, so it is not compared."""
    g = torch.Generator().manual_seed(0)
    smooth = F.interpolate(3 * torch.randn(1, 4, 4, 4, generator=g), size=(8, 8), mode="bilinear")
    ring = (torch.minimum(torch.arange(8), 7 - torch.arange(8)).float() / 2).clamp(max=1)
    outputs = {"pred_logits": torch.randn(1, 4, 4, generator=g), "pred_masks": smooth * ring[:, None] * ring}
    targets = [{"labels": torch.tensor([0, 2, 1]), "masks": _blob_masks(64)}]
    indices = [(torch.tensor([0, 1, 3]), torch.tensor([2, 0, 1]))]
    unit = {"class_weight": 1.0, "mask_weight": 1.0, "dice_weight": 1.0}
    full = _criterion(indices, point_loss=False, **unit)(outputs, targets)
    points = _criterion(indices, num_points=64 * 64, oversample_ratio=1.0, importance_sample_ratio=0.0, **unit)
    draws = torch.tensor([[float(v) for k, v in points(outputs, targets, generator=torch.Generator().manual_seed(s))
                           .items() if k in ("loss_mask", "loss_dice")] for s in range(200)])
    standard_error = draws.std(0) / len(draws) ** 0.5
    expected = torch.tensor([float(full["loss_mask"]), float(full["loss_dice"])])
    assert ((draws.mean(0) - expected).abs() < 3 * standard_error).all(), (draws.mean(0), expected, standard_error)
    assert (standard_error < 1e-3).all()  # the check is tight: a 0.3% bias would fail it


# --- the whole criterion --------------------------------------------------------------------------------------

def _model_like_outputs(batch: int = 2, queries: int = 6, classes: int = 3, size: int = 8,
                        seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)

    def one_set() -> dict:
        return {"pred_logits": torch.randn(batch, queries, classes + 1, generator=g).requires_grad_(),
                "pred_masks": torch.randn(batch, queries, size, size, generator=g).requires_grad_()}

    return {**one_set(), "aux_outputs": [one_set() for _ in range(9)]}


def _targets(size: int = 32, counts: tuple[int, ...] = (3, 2), seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"labels": torch.randint(0, 3, (n,), generator=g), "masks": torch.rand(n, size, size, generator=g) > 0.5}
            for n in counts]


def test_deep_supervision_gives_30_weighted_terms_and_gradients_to_every_set():
    outputs, targets = _model_like_outputs(), _targets()
    losses = _criterion(num_points=200)(outputs, targets)
    names = {f"{n}{s}" for n in ("loss_ce", "loss_mask", "loss_dice") for s in ["", *(f"_{i}" for i in range(9))]}
    assert set(losses) == names | {"loss"}
    torch.testing.assert_close(losses["loss"], sum(v for k, v in losses.items() if k != "loss"))
    losses["loss"].backward()
    for prediction in [outputs, *outputs["aux_outputs"]]:
        for key in ("pred_logits", "pred_masks"):
            assert prediction[key].grad is not None and prediction[key].grad.abs().sum() > 0


def test_terms_are_weighted_and_deep_supervision_can_be_off():
    outputs, targets = _model_like_outputs(), _targets()
    torch.manual_seed(0)
    weighted = _criterion(num_points=200, deep_supervision=False)(outputs, targets)
    torch.manual_seed(0)
    unit = _criterion(num_points=200, deep_supervision=False, class_weight=1.0, mask_weight=1.0,
                      dice_weight=1.0)(outputs, targets)
    assert set(weighted) == {"loss", "loss_ce", "loss_mask", "loss_dice"}
    for name, weight in (("loss_ce", 2.0), ("loss_mask", 5.0), ("loss_dice", 5.0)):
        torch.testing.assert_close(weighted[name], weight * unit[name])


def test_same_rng_state_gives_identical_losses():
    outputs, targets = _model_like_outputs(), _targets()
    criterion = _criterion(num_points=300)
    torch.manual_seed(4)
    a = criterion(outputs, targets)
    torch.manual_seed(4)
    b = criterion(outputs, targets)
    c = criterion(outputs, targets, generator=torch.Generator().manual_seed(4))
    d = criterion(outputs, targets, generator=torch.Generator().manual_seed(4))
    assert all(torch.equal(a[k], b[k]) and torch.equal(c[k], d[k]) for k in a)
    assert not torch.equal(a["loss"], criterion(outputs, targets)["loss"])  # fresh points each call


@pytest.mark.parametrize("point_loss", [False, True])
def test_doubling_the_batch_with_identical_images_keeps_the_loss(point_loss):
    """num_masks normalisation: twice the masks, twice the summed mask loss, the same average. With point
    sampling the copies see different points, so that case is compared within sampling noise."""
    g = torch.Generator().manual_seed(0)
    outputs = {"pred_logits": torch.randn(1, 6, 4, generator=g), "pred_masks": 2 * torch.randn(1, 6, 8, 8, generator=g)}
    targets = _targets(counts=(3,))
    doubled_outputs = {"pred_logits": outputs["pred_logits"].repeat(2, 1, 1),
                       "pred_masks": outputs["pred_masks"].repeat(2, 1, 1, 1)}
    matcher = HungarianMatcher(point_matching=False)
    criterion = SetCriterion(num_classes=3, matcher=matcher, point_loss=point_loss, num_points=4096)
    single = criterion(outputs, targets)
    double = criterion(doubled_outputs, targets * 2)
    tolerance = 0.02 if point_loss else 1e-6
    for name in ("loss_ce", "loss_mask", "loss_dice"):
        assert float(double[name]) == pytest.approx(float(single[name]), rel=tolerance), name


def test_empty_targets_give_zero_mask_losses_with_a_graph():
    outputs = _model_like_outputs()
    criterion = _criterion(num_points=100)
    for counts in ((0, 0), (2, 0)):
        for prediction in [outputs, *outputs["aux_outputs"]]:
            prediction["pred_masks"].grad = None
        losses = criterion(outputs, _targets(counts=counts))
        assert all(torch.isfinite(v) for v in losses.values())
        losses["loss"].backward()
        assert outputs["pred_masks"].grad is not None
        if counts == (0, 0):
            assert losses["loss_mask"].item() == losses["loss_dice"].item() == 0.0
            assert losses["loss_ce"].item() > 0  # all queries are pushed to "no object"
            assert outputs["pred_masks"].grad.abs().sum() == 0
    assert SetCriterion.num_masks(_targets(counts=(0, 0)), torch.device("cpu")) == 1.0


def test_wrong_number_of_classes_is_a_clear_error():
    outputs, targets = _model_like_outputs(classes=3), _targets()
    with pytest.raises(ValueError, match="expected num_classes \\+ 1 = 6"):
        _criterion(num_classes=5)(outputs, targets)


def test_overfitting_free_parameters_drives_the_loss_down():
    """A (1, Q, K+1) logits tensor and (1, Q, 16, 16) mask logits, fitted to 3 ground-truth masks."""
    torch.manual_seed(0)
    masks = _blob_masks(64)
    targets = [{"labels": torch.tensor([0, 2, 1]), "masks": masks}]
    logits = (0.1 * torch.randn(1, 8, 4)).requires_grad_()
    pred_masks = (0.1 * torch.randn(1, 8, 16, 16)).requires_grad_()
    criterion = SetCriterion(num_classes=3, matcher=HungarianMatcher(num_points=1024), num_points=1024)
    optimizer = torch.optim.Adam([logits, pred_masks], lr=0.1)
    history = []
    for _ in range(300):
        loss = criterion({"pred_logits": logits, "pred_masks": pred_masks}, targets)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    assert sum(history[-10:]) / 10 < 0.1 * history[0], (history[0], history[-10:])
    pred_idx, tgt_idx = criterion.matcher({"pred_logits": logits, "pred_masks": pred_masks}, targets)[0]
    assert logits[0, pred_idx].argmax(-1).tolist() == targets[0]["labels"][tgt_idx].tolist()
    upsampled = F.interpolate(pred_masks[:, pred_idx].detach(), size=(64, 64), mode="bilinear", align_corners=False)
    binary = upsampled[0] > 0
    gt = masks[tgt_idx]
    iou = (binary & gt).flatten(1).sum(1) / (binary | gt).flatten(1).sum(1)
    assert (iou > 0.9).all(), iou


def test_bf16_outputs_are_computed_in_fp32():
    outputs, targets = _model_like_outputs(), _targets()
    half = {"pred_logits": outputs["pred_logits"].detach().bfloat16().requires_grad_(),
            "pred_masks": outputs["pred_masks"].detach().bfloat16().requires_grad_()}
    upcast = {k: v.detach().float() for k, v in half.items()}
    criterion = _criterion(num_points=300, deep_supervision=False)
    low = criterion(half, targets, generator=torch.Generator().manual_seed(0))
    full = criterion(upcast, targets, generator=torch.Generator().manual_seed(0))
    assert all(v.dtype == torch.float32 for v in low.values())
    torch.testing.assert_close(low["loss"], full["loss"])
    low["loss"].backward()
    assert half["pred_masks"].grad.dtype == torch.bfloat16 and half["pred_masks"].grad.abs().sum() > 0


@pytest.mark.parametrize(("point_matching", "point_loss"), [(True, True), (False, False), (True, False)])
def test_all_sets_at_once_equal_one_set_at_a_time(point_matching, point_loss):
    """The criterion matches and scores all 10 prediction sets in one batched pass; the straightforward
    way, one matcher call and one loss per set in turn from the same RNG state, gives the same terms and
    gradients up to float rounding (the RNG draws are the same: matching points of every set, then loss
    points, set by set)."""
    outputs, targets = _model_like_outputs(batch=3, queries=5), _targets(counts=(3, 0, 6))
    matcher = HungarianMatcher(num_points=300, point_matching=point_matching)
    criterion = SetCriterion(num_classes=3, matcher=matcher, num_points=200, point_loss=point_loss)
    batched = criterion(outputs, targets, generator=torch.Generator().manual_seed(7))
    grads = torch.autograd.grad(batched["loss"], [outputs["pred_masks"], outputs["aux_outputs"][4]["pred_logits"]])

    g = torch.Generator().manual_seed(7)
    sets = [("", outputs), *((f"_{i}", aux) for i, aux in enumerate(outputs["aux_outputs"]))]
    indices = [matcher(predictions, targets, generator=g) for _, predictions in sets]
    num_masks = criterion.num_masks(targets, torch.device("cpu"))
    reference = {}
    for (suffix, predictions), matched in zip(sets, indices):
        ce = criterion.loss_labels(predictions["pred_logits"][None], targets, [matched])[0]
        bce, dice = criterion.loss_masks(predictions["pred_masks"][None], targets, [matched], num_masks, generator=g)
        reference.update({f"loss_ce{suffix}": 2 * ce, f"loss_mask{suffix}": 5 * bce[0], f"loss_dice{suffix}": 5 * dice[0]})
    reference["loss"] = sum(reference.values())
    assert batched.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(batched[name], reference[name], rtol=1e-5, atol=1e-6, msg=name)
    expected = torch.autograd.grad(reference["loss"], [outputs["pred_masks"], outputs["aux_outputs"][4]["pred_logits"]])
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_prediction_zero_is_left_out_without_supervise_initial():
    """Table XI b: learnable queries without supervision (and DETR's zero init) do not supervise the
    prediction from the initial query features, aux_outputs[0]; the other 9 sets keep theirs."""
    outputs, targets = _model_like_outputs(), _targets()
    criterion = SetCriterion(num_classes=3, matcher=HungarianMatcher(num_points=200), num_points=200,
                             supervise_initial=False)
    losses = criterion(outputs, targets)
    assert len(losses) == 1 + 3 * 9 and "loss_ce_8" not in losses and "loss_ce_7" in losses
    losses["loss"].backward()
    assert outputs["aux_outputs"][0]["pred_masks"].grad is None
    assert all(a["pred_masks"].grad.abs().sum() > 0 for a in outputs["aux_outputs"][1:])
