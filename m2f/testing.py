"""m2f beside transformers' Mask2Former: the model pair with identical weights and the comparisons that the
fidelity tests and the peer benchmarks share.

Everything is offline: transformers' model is built from a config with random weights, nothing is fetched.
transformers' model takes normalised pixels and pads nothing (its image processor resizes instead), while
m2f pads the normalised image with zeros to a multiple of 32; callers give both models the same tensor,
m2f's own `preprocess` output.

Shapes (legend in `m2f/__init__.py`): B batch, Q queries, K classes, S = sum of H_l * W_l.
"""

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from m2f.transformer_decoder import attention_mask

BACKBONES = ("r50", "swin_t")
HEAD_SCALE = 20.0


class AgreementError(RuntimeError):
    """The two models' outputs differ: they do not compute the same thing."""


def transformers_config(backbone: str, **fields: Any) -> Any:
    """A transformers `Mask2FormerConfig` (COCO panoptic: 133 classes, 100 queries unless `fields` say
    otherwise) with an R50 (timm, frozen BatchNorm) or Swin-T (transformers' own) backbone, built
    offline: no pretrained backbone is fetched.

    Args:
        backbone: "r50", "swin_t", or "r18" (a small one for quick tests).
        **fields: other `Mask2FormerConfig` fields (widths, layers, points) for smaller models.
    """
    from transformers import Mask2FormerConfig, SwinConfig, TimmBackboneConfig

    if backbone in ("r50", "r18"):
        backbone_config = TimmBackboneConfig(backbone="resnet50" if backbone == "r50" else "resnet18",
                                             out_indices=(1, 2, 3, 4), freeze_batch_norm_2d=True)
    elif backbone == "swin_t":
        backbone_config = SwinConfig(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7,
                                     drop_path_rate=0.0, out_features=["stage1", "stage2", "stage3", "stage4"])
    else:
        raise ValueError(f"unknown backbone {backbone!r}; choose one of {(*BACKBONES, 'r18')}")
    return Mask2FormerConfig(backbone_config=backbone_config, use_pretrained_backbone=False,
                             **{"num_labels": 133, "num_queries": 100, **fields})


def perturb_weights(model: nn.Module, *, seed: int = 1) -> None:
    """Moves every weight off the special values initialisation gives (zero offsets, uniform attention,
    identity BatchNorm, zero residual branches), which could hide a wrongly mapped tensor."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if not t.is_floating_point() or "empty_weight" in name:
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith("running_mean"):
                t.copy_(0.1 * torch.randn(t.shape, generator=g))
            else:
                t.add_(0.05 * torch.randn(t.shape, generator=g))


def model_pair(backbone: str, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
               deform_impl: str = "auto", seed: int = 0, perturb: bool = False, head_scale: float = HEAD_SCALE,
               **fields: Any) -> tuple[nn.Module, nn.Module]:
    """transformers' `Mask2FormerForUniversalSegmentation` with its own random initialisation (fixed seed,
    so every process builds the same weights) and the m2f model converted from it
    (`m2f.convert.from_transformers`); both in eval mode, on `device`, in `dtype`.

    Args:
        backbone: see `transformers_config`.
        dtype: torch.float64 makes the comparison immune to rounding near the attention-mask threshold.
        deform_impl: m2f's `model.deform_impl` ("auto" = the compiled kernel of the device).
        seed: of transformers' random initialisation.
        perturb: also move every weight off its initial value (`perturb_weights`).
        head_scale: factor on the class head and the mask-embedding output layer. At initialisation every
            class score is ~1/K and mask logits stay within +-1, so panoptic post-processing would see no
            confident query and no confident pixel; scaled heads give what a trained model gives.
        **fields: `Mask2FormerConfig` fields.

    Returns:
        (theirs, ours); the m2f config is `ours.config`.
    """
    from transformers import Mask2FormerForUniversalSegmentation

    from m2f.pretrained import load_pretrained

    torch.manual_seed(seed)
    theirs = Mask2FormerForUniversalSegmentation(transformers_config(backbone, **fields)).eval()
    if perturb:
        perturb_weights(theirs)
    with torch.no_grad():
        theirs.class_predictor.weight.mul_(head_scale)
        last = theirs.model.transformer_module.decoder.mask_predictor.mask_embedder.layers[-1].layers[0]
        last.weight.mul_(head_scale)
        last.bias.mul_(head_scale)
    ours = load_pretrained(theirs, overrides=[f"model.deform_impl={deform_impl}"], device=device)
    return theirs.to(device=device, dtype=dtype), ours.to(dtype=dtype)


def prediction_sets(ours: dict[str, Any], theirs: Any) -> list[tuple[dict[str, Tensor], dict[str, Tensor]]]:
    """Pairs m2f's prediction sets (aux_outputs, then the final one) with transformers' (its auxiliary_logits,
    which need output_auxiliary_logits=True, then the final one), as
    ({"pred_logits", "pred_masks"}, {"class_queries_logits", "masks_queries_logits"}) pairs."""
    theirs_sets = [*(theirs.auxiliary_logits or []), {"masks_queries_logits": theirs.masks_queries_logits,
                                                      "class_queries_logits": theirs.class_queries_logits}]
    ours_sets = [*ours["aux_outputs"], ours]
    if len(ours_sets) != len(theirs_sets):
        raise AgreementError(f"m2f gives {len(ours_sets)} prediction sets, transformers {len(theirs_sets)}")
    return list(zip(ours_sets, theirs_sets))


def run_pair(theirs: nn.Module, ours: nn.Module, images: Tensor) -> tuple[dict[str, Any], Any]:
    """Both models on the same (B, 3, H, W) 0-255 images; m2f with `capture=True` (attention masks)."""
    with torch.no_grad():
        out = ours(images, capture=True)
        ref = theirs(pixel_values=ours.preprocess(images), output_auxiliary_logits=True)
    return out, ref


def max_differences(ours: dict[str, Any], theirs: Any) -> list[dict[str, float]]:
    """Per prediction set (0 = from the learnable queries, last = final): max |difference| of the class
    logits ("class") and of the mask logits ("mask"); shapes must match."""
    diffs = []
    for a, b in prediction_sets(ours, theirs):
        row = {}
        for name, mine, their in (("class", "pred_logits", "class_queries_logits"),
                                  ("mask", "pred_masks", "masks_queries_logits")):
            if a[mine].shape != b[their].shape:
                raise AgreementError(f"{mine} {tuple(a[mine].shape)} vs {their} {tuple(b[their].shape)}")
            row[name] = (a[mine] - b[their]).abs().max().item()
        diffs.append(row)
    return diffs


def attention_mask_flips(ours: dict[str, Any], theirs: Any) -> list[dict[str, float]]:
    """Per decoder layer, where m2f's attention mask (its capture) differs from the mask the same rule
    (`attention_mask`) gives on transformers' previous prediction set.

    A cell flips when the two models' resized mask logits lie on either side of 0 by rounding; the layers
    after a flip then legitimately diverge, while a wrong computation flips cells whose logits are far from 0.

    Returns:
        per layer {"cells": flipped (query, pixel) cells, "max_abs_logit": the largest |resized logit| of
        transformers at a flipped cell (0 without flips)}; layers without an attention mask (standard
        cross-attention) count none.
    """
    pairs = prediction_sets(ours, theirs)
    flips = []
    for layer, captured in enumerate(ours["capture"]):
        if captured["attend_mask"] is None:
            flips.append({"cells": 0, "max_abs_logit": 0.0})
            continue
        logits = pairs[layer][1]["masks_queries_logits"].to(ours["pred_masks"].dtype)  # (B, Q, H/4, W/4)
        flipped = captured["attend_mask"] == attention_mask(logits, captured["level_shapes"])  # attend == blocked
        resized = torch.cat([F.interpolate(logits, size=s, mode="bilinear", align_corners=False).flatten(2)
                             for s in captured["level_shapes"]], -1)  # (B, Q, S)
        flips.append({"cells": int(flipped.sum()),
                      "max_abs_logit": float(resized[flipped].abs().max()) if flipped.any() else 0.0})
    return flips
