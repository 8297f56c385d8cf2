"""The Mask2Former model: shapes, gradients, parameter counts and that every ablation switch does what it names."""

import pytest
import torch
import torch.nn.functional as F

from m2f.config import get_config
from m2f.model import build_model, count_parameters
from m2f.pixel_decoder import FPNPixelDecoder, MSDeformAttnPixelDecoder
from m2f.transformer_decoder import MaskedTransformerDecoder


def tiny(*overrides: str):
    torch.manual_seed(0)
    return build_model(get_config("tiny", list(overrides))).eval()


def images(batch: int = 2, height: int = 70, width: int = 100) -> torch.Tensor:
    return torch.randint(0, 256, (batch, 3, height, width), generator=torch.Generator().manual_seed(1),
                         dtype=torch.uint8)


# The paper's parameter counts (Table 1); building Swin-B/L is a few seconds each on CPU.
PAPER_PARAMS = {
    "r50_coco_panoptic": 44e6, "r101_coco_panoptic": 63e6, "swin_t_coco_panoptic": 47e6,
    "swin_s_coco_panoptic": 69e6, "swin_b_coco_panoptic": 107e6, "swin_l_coco_panoptic": 216e6,
}


@pytest.mark.parametrize("preset", list(PAPER_PARAMS))
def test_parameter_counts_match_the_paper(preset):
    n = count_parameters(build_model(get_config(preset)))
    assert abs(n / PAPER_PARAMS[preset] - 1) < 0.015, f"{preset}: {n / 1e6:.2f}M"


@pytest.mark.parametrize(
    ("preset", "overrides"),
    [
        ("r50_coco_panoptic", ["model.num_classes=5", "model.num_queries=7"]),
        ("swin_t_coco_panoptic", ["model.num_classes=5", "model.num_queries=7"]),
        ("r50_coco_instance", ["model.num_queries=7"]),
        ("tiny", []),
    ],
)
def test_output_shapes_for_each_preset_family(preset, overrides):
    cfg = get_config(preset, overrides)
    model = build_model(cfg).eval()
    with torch.no_grad():
        out = model(images(1, 70, 100))
    q, k = cfg.model.num_queries, cfg.model.num_classes
    assert out["padded_size"] == (96, 128)  # padded to multiples of 32
    assert out["pred_logits"].shape == (1, q, k + 1)
    assert out["pred_masks"].shape == (1, q, 24, 32)
    assert len(out["aux_outputs"]) == 9
    for aux in out["aux_outputs"]:
        assert aux["pred_logits"].shape == (1, q, k + 1) and aux["pred_masks"].shape == (1, q, 24, 32)


def test_images_of_different_sizes_are_padded_with_zeros_after_normalisation():
    model = tiny()
    small, large = images(1, 40, 50)[0], images(1, 64, 90)[0]
    batch = model.preprocess([small, large])
    assert batch.shape == (2, 3, 64, 96)
    expected = (small.float() - model.pixel_mean) / model.pixel_std
    torch.testing.assert_close(batch[0, :, :40, :50], expected)
    assert batch[0, :, 40:].abs().sum() == 0 and batch[0, :, :, 50:].abs().sum() == 0


def test_bad_image_shapes_are_clear_errors():
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        tiny()(torch.zeros(2, 1, 32, 32))
    with pytest.raises(ValueError, match="empty"):
        tiny()([])


@pytest.mark.parametrize("overrides", [[], ["model.attention=mask_pooling"], ["model.pixel_decoder=fpn"],
                                       ["model.feature_scales=naive_multiscale"]])
def test_backward_reaches_every_trainable_parameter(overrides):
    model = tiny(*overrides).train()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # zero-initialised weights (timm's zero_init_last BN, offsets) would block gradients
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    out = model(images())
    # Random weights: a plain sum would have zero gradient through the GroupNorms.
    sets = [out, *out["aux_outputs"]]
    loss = sum((s[k] * torch.randn(s[k].shape, generator=g)).sum() for s in sets for k in ("pred_logits", "pred_masks"))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not missing


def test_frozen_batchnorm_has_no_trainable_parameters_in_paper_presets():
    model = build_model(get_config("r50_coco_panoptic", ["model.num_classes=3"]))
    assert not [n for n, _ in model.backbone.named_parameters() if "bn" in n]
    assert [n for n, _ in tiny().backbone.named_parameters() if "bn" in n]  # the tiny preset trains BN


def test_masked_attention_gives_zero_weight_outside_the_mask_of_the_previous_prediction():
    model = tiny()
    with torch.no_grad():
        out = model(images(), capture=True)
    sets = [*out["aux_outputs"], {"pred_masks": out["pred_masks"]}]
    for i, layer in enumerate(out["capture"]):
        (h, w), = layer["level_shapes"]
        # Recompute the attention mask independently from prediction set i.
        resized = F.interpolate(sets[i]["pred_masks"], size=(h, w), mode="bilinear", align_corners=False)
        attend = resized.flatten(2).sigmoid() >= 0.5
        attend[~attend.any(-1)] = True  # the empty-mask rule
        assert torch.equal(layer["attend_mask"], attend)
        weights = layer["attn_weights"]  # (B, M, Q, HW)
        assert weights.shape[1] == 4
        assert (weights.masked_select(~attend[:, None].expand_as(weights)) == 0).all()
        torch.testing.assert_close(weights.sum(-1), torch.ones_like(weights.sum(-1)))
    # The masks are not trivial: some queries attend to only part of the map in some layer.
    assert any(not layer["attend_mask"].all() for layer in out["capture"])


def test_round_robin_visits_1_32_then_1_16_then_1_8():
    with torch.no_grad():
        out = tiny()(images(1, 128, 128), capture=True)
    assert [c["levels"] for c in out["capture"]] == [(0,), (1,), (2,)] * 3
    assert [c["level_shapes"][0] for c in out["capture"][:3]] == [(4, 4), (8, 8), (16, 16)]


@pytest.mark.parametrize(("scales", "levels"), [("single_1/32", (0,)), ("single_1/16", (1,)), ("single_1/8", (2,)),
                                                 ("naive_multiscale", (0, 1, 2))])
def test_feature_scale_ablations_attend_to_the_named_levels(scales, levels):
    with torch.no_grad():
        out = tiny(f"model.feature_scales={scales}")(images(1, 128, 128), capture=True)
    assert all(c["levels"] == levels for c in out["capture"])
    size = sum({0: 16, 1: 64, 2: 256}[lv] for lv in levels)
    assert out["capture"][0]["attn_weights"].shape[-1] == size


def test_empty_mask_rule_lets_a_query_attend_everywhere():
    decoder = MaskedTransformerDecoder(in_channels=32, mask_dim=8, num_classes=3, hidden_dim=32, num_queries=4,
                                       nheads=2, dim_feedforward=64, num_layers=1)
    with torch.no_grad():  # every mask logit becomes -sum(8 ones): all masks empty
        decoder.mask_embed.layers[-1].weight.zero_()
        decoder.mask_embed.layers[-1].bias.fill_(-1.0)
    pyramid = [torch.randn(1, 32, s, s) for s in (2, 4, 8)]
    out = decoder(pyramid, torch.ones(1, 8, 16, 16), capture=True)
    layer = out["capture"][0]
    assert layer["attend_mask"].all()
    assert (layer["attn_weights"] > 0).all()  # softmax over the whole map, not NaN


def test_standard_cross_attention_ignores_the_masks_and_changes_the_output():
    masked, cross = tiny(), tiny("model.attention=cross")
    cross.load_state_dict(masked.state_dict())  # same weights: only the attention rule differs
    with torch.no_grad():
        out_m, out_c = masked(images(), capture=True), cross(images(), capture=True)
    assert all(c["attend_mask"] is None for c in out_c["capture"])
    assert any((c["attn_weights"] > 0).all() is not True for c in out_c["capture"])
    assert (out_c["capture"][0]["attn_weights"] > 0).all()
    torch.testing.assert_close(out_m["aux_outputs"][0]["pred_logits"], out_c["aux_outputs"][0]["pred_logits"])
    assert not torch.allclose(out_m["pred_logits"], out_c["pred_logits"])


def test_mask_pooling_averages_the_pixels_inside_the_mask():
    with torch.no_grad():
        out = tiny("model.attention=mask_pooling")(images(), capture=True)
    for layer in out["capture"]:
        attend, weights = layer["attend_mask"], layer["attn_weights"][:, 0]
        expected = attend.float() / attend.float().sum(-1, keepdim=True)
        torch.testing.assert_close(weights, expected)


def test_zero_query_features_make_the_first_prediction_identical_for_all_queries():
    model = tiny("model.query_features=zero")
    assert model.transformer_decoder.query_feat is None
    with torch.no_grad():
        first = model(images())["aux_outputs"][0]
    assert torch.allclose(first["pred_logits"], first["pred_logits"][:, :1].expand_as(first["pred_logits"]))
    learnable = tiny()
    assert learnable.transformer_decoder.query_feat is not None
    with torch.no_grad():
        first = learnable(images())["aux_outputs"][0]
    assert not torch.allclose(first["pred_logits"][:, 0], first["pred_logits"][:, 1])


@pytest.mark.parametrize(("order", "expected"), [("cross_first", ["cross", "self", "ffn"]),
                                                  ("self_first", ["self", "cross", "ffn"])])
def test_layer_order(order, expected):
    model = tiny(f"model.layer_order={order}")
    decoder = model.transformer_decoder
    calls: list[str] = []
    for name, layers in (("cross", decoder.transformer_cross_attention_layers),
                         ("self", decoder.transformer_self_attention_layers), ("ffn", decoder.transformer_ffn_layers)):
        layers[0].register_forward_hook(lambda *_, name=name: calls.append(name))
    with torch.no_grad():
        model(images(1))
    assert calls == expected


def test_dropout_is_off_by_default_and_on_when_asked():
    x = images(1)
    default = tiny().train()
    torch.testing.assert_close(default(x)["pred_logits"], default(x)["pred_logits"])
    dropped = tiny("model.dropout=0.1").train()
    assert not torch.allclose(dropped(x)["pred_logits"], dropped(x)["pred_logits"])


def test_number_of_queries_and_layers():
    out = tiny("model.num_queries=13", "model.dec_layers=6")(images(1))
    assert out["pred_logits"].shape[1] == 13 and len(out["aux_outputs"]) == 6


def test_pixel_decoder_switch():
    assert isinstance(tiny().pixel_decoder, MSDeformAttnPixelDecoder)
    fpn = tiny("model.pixel_decoder=fpn")
    assert isinstance(fpn.pixel_decoder, FPNPixelDecoder)
    with torch.no_grad():
        mask_features, pyramid = fpn.pixel_decoder(fpn.backbone(fpn.preprocess(images(1, 128, 128))))
    assert [tuple(p.shape[-2:]) for p in pyramid] == [(4, 4), (8, 8), (16, 16)]
    assert mask_features.shape[-2:] == (32, 32)


def test_attention_masks_are_detached():
    model = tiny().train()
    out = model(images(1), capture=True)
    assert not out["capture"][0]["attend_mask"].requires_grad


def test_capture_does_not_change_the_predictions():
    model = tiny()
    with torch.no_grad():
        plain, captured = model(images()), model(images(), capture=True)
    torch.testing.assert_close(plain["pred_masks"], captured["pred_masks"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("overrides", [[], ["model.attention=mask_pooling"], ["model.attention=cross"],
                                       ["model.feature_scales=naive_multiscale"], ["model.layer_order=self_first"]])
def test_final_only_inference_gives_the_same_final_set_bit_for_bit(overrides):
    model = tiny(*overrides)
    with torch.no_grad():
        full = model(images(2, 70, 100))              # padded to 96x128: masks 24x32, levels 3x4 / 6x8 / 12x16
        final = model(images(2, 70, 100), intermediate=False)
    assert len(full["aux_outputs"]) == model.transformer_decoder.num_layers and final["aux_outputs"] == []
    assert torch.equal(final["pred_masks"], full["pred_masks"])
    assert torch.equal(final["pred_logits"], full["pred_logits"])


@pytest.mark.parametrize("mask_size", [(200, 272), (200, 304), (136, 200), (24, 40)])
def test_sampled_attention_mask_equals_the_full_resolution_rule(mask_size):
    from m2f.transformer_decoder import attention_mask, sampled_attention_mask

    generator = torch.Generator().manual_seed(0)
    embed = torch.randn(2, 100, 256, generator=generator)
    features = torch.randn(2, 256, *mask_size, generator=generator)
    # Many logits at the threshold's edge, where any rounding difference would flip the mask.
    features[:, :, ::3] *= 1e-4
    h, w = mask_size
    shapes = [(h // 8, w // 8), (h // 4, w // 4), (h // 2, w // 2)]
    logits = torch.einsum("bqc,bchw->bqhw", embed, features)
    for targets in ([s] for s in shapes):
        assert torch.equal(sampled_attention_mask(embed, features, targets), attention_mask(logits, targets))
    assert torch.equal(sampled_attention_mask(embed, features, shapes), attention_mask(logits, shapes))
    odd = [(h // 3, w // 5)]  # not an even integer factor: every pixel is read
    assert torch.equal(sampled_attention_mask(embed, features, odd), attention_mask(logits, odd))


def test_swin_window_attention_takes_the_fused_path_with_the_explicit_softmax_result():
    """The Swin backbone runs timm's scaled_dot_product_attention path (bias + shift mask as attn_mask);
    its features and gradients (the relative-position bias table's included) equal timm's explicit
    q @ k^T + bias + mask, softmax, @ v path, in float64. A map size that is no multiple of the window
    exercises the padding and the shifted-window mask."""
    from timm.models.swin_transformer import WindowAttention

    from m2f.backbone import Backbone

    torch.manual_seed(0)
    backbone = Backbone(name="swin_tiny_patch4_window7_224", freeze_bn=False).double()
    attentions = [m for m in backbone.modules() if isinstance(m, WindowAttention)]
    assert attentions and all(m.fused_attn for m in attentions)
    x = torch.randn(2, 3, 100, 132, dtype=torch.float64)
    results = []
    for fused in (True, False):
        for m in attentions:
            m.fused_attn = fused
        backbone.zero_grad()
        feats = backbone(x)
        weights = [torch.linspace(-1, 1, f.numel(), dtype=f.dtype).view_as(f) for f in feats.values()]
        sum((f * w).sum() for f, w in zip(feats.values(), weights)).backward()
        results.append(([f.detach() for f in feats.values()], [p.grad.clone() for p in backbone.parameters()]))
    (fused_feats, fused_grads), (ref_feats, ref_grads) = results
    for got, ref in zip(fused_feats + fused_grads, ref_feats + ref_grads):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    table = attentions[0].relative_position_bias_table
    assert table.grad is not None and table.grad.abs().max() > 0


def test_folding_frozen_batchnorm_keeps_the_model_function():
    """R50 (frozen BN): all 53 convolution + BatchNorm pairs fold (stem, 16 blocks x 3, 4 shortcuts) and the
    model's predictions stay those of the unfolded model, in float64, with non-trivial BN statistics. The
    tiny preset's trainable BatchNorm is left alone."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    from m2f.batchnorm_folding import fold_frozen_batchnorm

    torch.manual_seed(0)
    model = build_model(get_config("r50_coco_panoptic", ["model.num_classes=3", "model.num_queries=5"]))
    model = model.double().eval()
    for m in model.modules():
        if isinstance(m, FrozenBatchNorm2d):
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_(0, 0.1)
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    x = images(1, 64, 96).double()
    with torch.no_grad():
        ref = model(x)
        assert fold_frozen_batchnorm(model) == 53
        got = model(x)
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    torch.testing.assert_close(got["pred_masks"], ref["pred_masks"], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got["pred_logits"], ref["pred_logits"], rtol=1e-9, atol=1e-9)
    assert fold_frozen_batchnorm(tiny()) == 0
