"""Table 4e's FPN-family pixel decoders: the interface the decoder needs, and each one's defining rule.

Semantic FPN: the semantic branch re-computed by hand; FaPN: feature selection and deformable alignment
against plain convolutions; BiFPN: fast normalized fusion and the top-down-then-bottom-up wiring.
"""

import pytest
import torch
import torch.nn.functional as F

from m2f.bifpn import BiFPNLayer, BiFPNPixelDecoder, FastNormalizedFusion
from m2f.config import get_config
from m2f.fapn import FaPNPixelDecoder, FeatureAlignmentModule, FeatureSelectionModule
from m2f.model import build_model
from m2f.pixel_decoder import FPNPixelDecoder
from m2f.semantic_fpn import SemanticFPNPixelDecoder

IN_CHANNELS = (8, 16, 24, 32)
DECODERS = {"fpn": FPNPixelDecoder, "semantic_fpn": SemanticFPNPixelDecoder, "fapn": FaPNPixelDecoder,
            "bifpn": BiFPNPixelDecoder}


def features(batch: int = 2, height: int = 64, width: int = 96, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"res{k + 2}": torch.randn(batch, c, height // 2 ** (k + 2), width // 2 ** (k + 2), generator=g)
            for k, c in enumerate(IN_CHANNELS)}


def decoder(name: str, **kwargs):
    torch.manual_seed(0)
    return DECODERS[name](in_channels=IN_CHANNELS, conv_dim=64, mask_dim=48, **kwargs)


@pytest.mark.parametrize("name", list(DECODERS))
def test_outputs_have_the_decoder_interface_and_every_parameter_learns(name):
    module = decoder(name)
    mask_features, pyramid = module(features(height=64, width=96))
    assert mask_features.shape == (2, 48, 16, 24)  # mask_dim at 1/4
    assert [tuple(p.shape) for p in pyramid] == [(2, 64, 2, 3), (2, 64, 4, 6), (2, 64, 8, 12)]  # 1/32, 1/16, 1/8
    (mask_features.square().mean() + sum(p.square().mean() for p in pyramid)).backward()
    assert [n for n, p in module.named_parameters() if p.grad is None or not p.grad.abs().sum()] == []


@pytest.mark.parametrize(("value", "cls"), [(v, c) for v, c in DECODERS.items()])
def test_the_config_value_builds_the_decoder_and_the_model_runs(value, cls):
    torch.manual_seed(0)
    model = build_model(get_config("tiny", [f"model.pixel_decoder={value}"])).eval()
    assert type(model.pixel_decoder) is cls
    with torch.no_grad():
        out = model(torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8))
    assert out["pred_masks"].shape == (1, 20, 16, 16)


def test_an_unknown_pixel_decoder_is_rejected_by_the_config():
    with pytest.raises(ValueError, match=r"model\.pixel_decoder"):
        get_config("tiny", ["model.pixel_decoder=panoptic_fpn"])


# ---------------------------------------------------------------------------------------------- Semantic FPN

def test_semantic_fpn_sums_upsampled_stages_of_every_level():
    module = decoder("semantic_fpn").eval()
    feats = features()
    with torch.no_grad():
        mask_features, pyramid = module(feats)
        p5, p4, p3, p2 = module.top_down(feats)

        def up(x, like):  # one stage's 2x bilinear upsampling, to the finer level's size
            return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)

        s = module.stages
        from_p5 = up(s[3][2](up(s[3][1](up(s[3][0](p5), p4)), p3)), p2)
        from_p4 = up(s[2][1](up(s[2][0](p4), p3)), p2)
        from_p3 = up(s[1][0](p3), p2)
        from_p2 = s[0][0](p2)
        expected = module.mask_features(from_p5 + from_p4 + from_p3 + from_p2)
    torch.testing.assert_close(mask_features, expected)
    torch.testing.assert_close(pyramid[0], p5)
    assert [len(stage) for stage in s] == [1, 1, 2, 3]  # Panoptic FPN: 1/4 one conv, 1/32 three upsampling stages
    assert s[3][0].out_channels == 64  # the FPN's width (see m2f/semantic_fpn.py for why not Panoptic FPN's 128)
    assert isinstance(s[3][0].norm, torch.nn.GroupNorm) and s[3][0].relu


def test_semantic_fpn_keeps_the_fpn_pyramid():
    fpn, semantic = decoder("fpn").eval(), decoder("semantic_fpn").eval()
    shared = {k: v for k, v in fpn.state_dict().items() if not k.startswith("mask_features")}
    semantic.load_state_dict(shared, strict=False)  # the FPN part; the mask features differ
    with torch.no_grad():
        for a, b in zip(fpn(features())[1], semantic(features())[1]):
            torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------- FaPN

def test_feature_alignment_with_zero_offsets_is_a_plain_conv():
    torch.manual_seed(0)
    fam = FeatureAlignmentModule(16)
    lateral, top = torch.randn(2, 16, 8, 12), torch.randn(2, 16, 4, 6)
    up = F.interpolate(top, size=(8, 12), mode="bilinear", align_corners=False)
    expected = F.relu(F.conv2d(up, fam.weight, fam.bias, padding=1)) + lateral
    torch.testing.assert_close(fam(lateral, top), expected)  # offsets start at 0: f_o is zero-initialised
    zero = torch.zeros(2, 2 * 9 * 8, 8, 12)
    torch.testing.assert_close(fam.align(up, zero), F.conv2d(up, fam.weight, fam.bias, padding=1))


def test_feature_alignment_offsets_shift_where_the_conv_samples():
    torch.manual_seed(0)
    fam = FeatureAlignmentModule(16)
    x = torch.randn(1, 16, 8, 10)
    offsets = torch.zeros(1, 2 * 9 * 8, 8, 10)
    offsets[:, 1::2] = 1.0  # dx = +1 for every tap: each output looks one pixel to the right
    shifted = F.pad(x[..., 1:], (0, 1))
    aligned, plain = fam.align(x, offsets), F.conv2d(shifted, fam.weight, fam.bias, padding=1)
    # Equal away from the borders, where padding differs (the deformable conv still reads the real column).
    torch.testing.assert_close(aligned[..., 1:-1, 1:-2], plain[..., 1:-1, 1:-2], atol=1e-4, rtol=1e-4)


def test_offsets_are_predicted_from_the_concatenated_lateral_and_upsampled_features():
    torch.manual_seed(0)
    fam = FeatureAlignmentModule(16)
    assert fam.offset.in_channels == 32 and fam.offset.out_channels == 2 * 9 * 8
    torch.nn.init.normal_(fam.offset.weight, std=0.5)
    lateral, top = torch.randn(1, 16, 8, 12), torch.randn(1, 16, 4, 6)
    up = F.interpolate(top, size=(8, 12), mode="bilinear", align_corners=False)
    learned = fam(lateral, top)
    assert not torch.allclose(learned, F.relu(F.conv2d(up, fam.weight, fam.bias, padding=1)) + lateral)
    changed = fam(lateral + torch.randn_like(lateral), top) - lateral
    assert not torch.allclose(changed, learned - lateral, atol=1e-3)  # the lateral steers the alignment


def test_feature_selection_reweights_channels_by_their_global_average():
    torch.manual_seed(0)
    fsm = FeatureSelectionModule(8, 32)
    x = torch.randn(2, 8, 5, 7)
    u = fsm.importance(x)
    assert u.shape == (2, 8, 1, 1) and ((u > 0) & (u < 1)).all()
    torch.testing.assert_close(u, torch.sigmoid(torch.einsum("oc,bc->bo", fsm.attention.weight[:, :, 0, 0],
                                                             x.mean((-2, -1))))[..., None, None])
    torch.testing.assert_close(fsm(x), fsm.proj(x * (1 + u)))
    torch.nn.init.zeros_(fsm.attention.weight)  # no preference: every channel scaled by 1 + 1/2
    torch.testing.assert_close(fsm(x), fsm.proj(1.5 * x))


def test_fapn_uses_selection_laterals_and_alignment_merges():
    module = decoder("fapn")
    assert all(isinstance(getattr(module, f"adapter_{k}"), FeatureSelectionModule) for k in (1, 2, 3))
    assert all(isinstance(getattr(module, f"align_{k}"), FeatureAlignmentModule) for k in (1, 2, 3))


# ---------------------------------------------------------------------------------------------- BiFPN

def test_fast_normalized_fusion_weights_are_non_negative_and_sum_to_one():
    fusion = FastNormalizedFusion(num_inputs=3)
    with torch.no_grad():
        fusion.weight.copy_(torch.tensor([2.0, -1.0, 0.5]))
    w = fusion.normalized_weights()
    assert (w >= 0).all() and w[1] == 0  # ReLU: a negative weight switches its input off
    assert w.sum().item() == pytest.approx(1.0, abs=1e-3)
    torch.testing.assert_close(w, torch.tensor([2.0, 0.0, 0.5]) / (2.5 + 1e-4))
    inputs = [torch.randn(2, 4, 3, 3) for _ in range(3)]
    torch.testing.assert_close(fusion(inputs), w[0] * inputs[0] + w[2] * inputs[2])
    fresh = FastNormalizedFusion(num_inputs=2)
    torch.testing.assert_close(fresh.normalized_weights(), torch.full((2,), 1 / (2 + 1e-4)))  # starts as a mean


def test_bifpn_layer_is_top_down_then_bottom_up():
    torch.manual_seed(0)
    layer = BiFPNLayer(dim=32, num_levels=4).eval()
    g = torch.Generator().manual_seed(1)
    levels = [torch.randn(1, 32, 16 // 2**i, 24 // 2**i, generator=g) for i in range(4)]  # fine to coarse
    with torch.no_grad():
        out = layer(levels)

        def up(x, i):
            return F.interpolate(x, size=levels[i].shape[-2:], mode="nearest")

        def down(x):  # 2x2 max pooling: the exact halves adaptive pooling gives here
            return F.max_pool2d(x, 2)

        td3 = levels[3]
        td2 = layer.td_conv[2](layer.td_fuse[2]([levels[2], up(td3, 2)]))
        td1 = layer.td_conv[1](layer.td_fuse[1]([levels[1], up(td2, 1)]))
        td0 = layer.td_conv[0](layer.td_fuse[0]([levels[0], up(td1, 0)]))
        out1 = layer.out_conv[1](layer.out_fuse[1]([levels[1], td1, down(td0)]))
        out2 = layer.out_conv[2](layer.out_fuse[2]([levels[2], td2, down(out1)]))
        out3 = layer.out_conv[3](layer.out_fuse[3]([levels[3], down(out2)]))
    for got, expected in zip(out, [td0, out1, out2, out3]):
        torch.testing.assert_close(got, expected)


def test_bifpn_carries_information_both_ways_in_one_layer():
    torch.manual_seed(0)
    layer = BiFPNLayer(dim=32, num_levels=4).eval()
    levels = [torch.randn(1, 32, 16 // 2**i, 16 // 2**i) for i in range(4)]
    with torch.no_grad():
        base = layer(levels)
        coarse_changed = layer([*levels[:3], levels[3] + 1.0])
        fine_changed = layer([levels[0] + 1.0, *levels[1:]])
    assert not torch.allclose(coarse_changed[0], base[0])  # top-down: 1/32 reaches 1/4
    assert not torch.allclose(fine_changed[3], base[3])  # bottom-up: 1/4 reaches 1/32


def test_bifpn_stacks_layers():
    assert len(decoder("bifpn", num_layers=2).layers) == 2
    assert len(decoder("bifpn").layers) == 3
