"""SMCA (Table 4c): the Gaussian-like log-weight map, that it multiplies the cross-attention weights, and its wiring."""

import math

import pytest
import torch

from m2f.config import get_config
from m2f.model import build_model
from m2f.smca import BETA, SpatialPrior, level_coordinates, spatial_log_weights
from m2f.transformer_decoder import CrossAttentionLayer


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def fixed_prior(layer: CrossAttentionLayer, centre: tuple[float, float], scale: tuple[float, float]) -> None:
    """Makes the layer's prior predict the same centre and scales for every query (zero weights, set biases)."""
    prior = layer.spatial_prior
    with torch.no_grad():
        prior.centre.weight.zero_()
        prior.centre.bias.copy_(torch.tensor([logit(c) for c in centre]))
        prior.scale.weight.zero_()
        prior.scale.bias.copy_(torch.tensor([logit(s) for s in scale] * prior.nheads))


def test_log_weights_are_the_gaussian_exponent_of_eq_3():
    coords = torch.tensor([[0.1, 0.2], [0.5, 0.5], [0.9, 0.3]])
    centre = torch.tensor([[[0.5, 0.4]]])  # B=1, Q=1
    scale = torch.tensor([[[[0.2, 0.1], [0.4, 0.3]]]])  # two heads
    bias = spatial_log_weights(coords, centre, scale)
    assert bias.shape == (1, 2, 1, 3)
    for m, (sx, sy) in enumerate([(0.2, 0.1), (0.4, 0.3)]):
        for s, (x, y) in enumerate(coords.tolist()):
            expected = -((x - 0.5) ** 2 / (BETA * sx**2) + (y - 0.4) ** 2 / (BETA * sy**2))
            assert bias[0, m, 0, s].item() == pytest.approx(expected, rel=1e-5)
    assert BETA == 2.0  # documented: s is the Gaussian's standard deviation, exp(bias) = N(c, s²) up to a constant


def test_level_coordinates_are_pixel_centres_level_after_level():
    coords = level_coordinates([(1, 2), (2, 1)], device=torch.device("cpu"), dtype=torch.float32)
    torch.testing.assert_close(coords, torch.tensor([[0.25, 0.5], [0.75, 0.5], [0.5, 0.25], [0.5, 0.75]]))


def test_smca_weights_are_cross_attention_weights_times_the_prior():
    # softmax(logits + log G) = softmax(logits) · G / Σ(...): the defining rule, checked against the same
    # layer without the prior on random features.
    torch.manual_seed(0)
    dim, heads, h, w = 16, 2, 6, 8
    smca = CrossAttentionLayer(dim=dim, nheads=heads, dropout=0.0, pre_norm=False, spatial_prior=True)
    plain = CrossAttentionLayer(dim=dim, nheads=heads, dropout=0.0, pre_norm=False)
    plain.load_state_dict({k: v for k, v in smca.state_dict().items() if not k.startswith("spatial_prior")})
    fixed_prior(smca, centre=(0.3, 0.6), scale=(0.15, 0.25))
    tgt, query_pos = torch.randn(2, 3, dim), torch.randn(2, 3, dim)
    memory, pos = torch.randn(2, h * w, dim), torch.randn(2, h * w, dim)
    coords = level_coordinates([(h, w)], device=torch.device("cpu"), dtype=torch.float32)
    kwargs = {"blocked": None, "pos": pos, "query_pos": query_pos, "need_weights": True}
    _, with_prior = smca(tgt, memory, coords=coords, **kwargs)
    _, without = plain(tgt, memory, **kwargs)
    gauss = torch.exp(-((coords[:, 0] - 0.3) ** 2 / (BETA * 0.15**2) + (coords[:, 1] - 0.6) ** 2 / (BETA * 0.25**2)))
    expected = without * gauss
    torch.testing.assert_close(with_prior, expected / expected.sum(-1, keepdim=True), atol=1e-5, rtol=1e-4)


def test_attention_concentrates_at_the_predicted_centre():
    torch.manual_seed(0)
    h = w = 16
    layer = CrossAttentionLayer(dim=8, nheads=1, dropout=0.0, pre_norm=False, spatial_prior=True)
    fixed_prior(layer, centre=(0.8, 0.2), scale=(0.05, 0.05))
    memory = torch.randn(1, 1, 8).expand(1, h * w, 8)  # identical pixels: the content cannot prefer any
    coords = level_coordinates([(h, w)], device=torch.device("cpu"), dtype=torch.float32)
    _, weights = layer(torch.randn(1, 1, 8), memory, blocked=None, pos=torch.zeros(1, h * w, 8),
                       query_pos=torch.zeros(1, 1, 8), need_weights=True, coords=coords)
    weights = weights[0, 0, 0]
    near = (coords - torch.tensor([0.8, 0.2])).norm(dim=-1) < 2 * 0.05 * math.sqrt(2)
    assert weights[near].sum() > 0.9  # uniform attention would give near.float().mean() ≈ 0.05
    peak = coords[weights.argmax()]
    assert (peak - torch.tensor([0.8, 0.2])).abs().max() <= 0.5 / h + 1e-6  # the pixel holding the centre


def test_gradients_reach_the_centre_and_scale_heads_and_move_the_attention():
    torch.manual_seed(0)
    h = w = 8
    layer = CrossAttentionLayer(dim=8, nheads=2, dropout=0.0, pre_norm=False, spatial_prior=True)
    coords = level_coordinates([(h, w)], device=torch.device("cpu"), dtype=torch.float32)
    _, weights = layer(torch.randn(2, 4, 8), torch.randn(2, h * w, 8), blocked=None, pos=torch.zeros(2, h * w, 8),
                       query_pos=torch.randn(2, 4, 8), need_weights=True, coords=coords)
    # Attention mass on the right half: raising c_x must increase it.
    (weights * (coords[:, 0] > 0.5)).sum().backward()
    prior = layer.spatial_prior
    assert prior.centre.weight.grad.abs().sum() > 0 and prior.scale.weight.grad.abs().sum() > 0
    assert prior.centre.bias.grad[0] > 0


def test_spatial_prior_scales_start_broad_and_stay_positive():
    prior = SpatialPrior(dim=8, nheads=3)
    centre, scale = prior.centre_and_scale(torch.randn(2, 5, 8) * 100)
    assert scale.shape == (2, 5, 3, 2) and centre.shape == (2, 5, 2)
    assert ((centre >= 0) & (centre <= 1)).all()
    torch.testing.assert_close(scale, torch.full_like(scale, 0.25))


def test_the_smca_switch_builds_priors_only_for_smca():
    torch.manual_seed(0)
    model = build_model(get_config("tiny", ["model.attention=smca"])).eval()
    layers = model.transformer_decoder.transformer_cross_attention_layers
    assert all(isinstance(layer.spatial_prior, SpatialPrior) for layer in layers)
    with torch.no_grad():
        out = model(torch.randint(0, 256, (1, 3, 64, 96), dtype=torch.uint8), capture=True)
    first = out["capture"][0]
    assert first["attend_mask"] is None  # a soft prior, no hard mask
    assert first["attn_weights"].shape[-1] == 2 * 3  # the 1/32 level of a 64x96 image
    # The other variants keep the original's state-dict keys (checkpoint conversion is by name).
    default = build_model(get_config("tiny"))
    assert not any("spatial_prior" in k for k in default.state_dict())


def test_smca_under_bf16_autocast_uses_a_bias_of_the_attention_dtype():
    torch.manual_seed(0)
    model = build_model(get_config("tiny", ["model.attention=smca", "model.feature_scales=naive_multiscale"]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8))
    assert torch.isfinite(out["pred_logits"].float()).all()
