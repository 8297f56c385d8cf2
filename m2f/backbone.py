"""Backbones from timm: ResNets with frozen BatchNorm and Swin Transformers, as res2..res5 features.

No weights are downloaded: `weights` is a local file (a timm/torchvision state dict, or an m2f
checkpoint's backbone) or None for random initialisation.
"""

import types
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.layers import freeze_batch_norm_2d
from timm.models.swin_transformer import (
    SwinTransformerBlock,
    WindowAttention,
    window_partition,
    window_reverse,
)
from torch import Tensor, nn

FEATURE_NAMES = ("res2", "res3", "res4", "res5")


class Backbone(nn.Module):
    """A timm feature extractor returning NCHW maps at strides 4, 8, 16 and 32.

    Args:
        name: a timm model name ("resnet50", "swin_tiny_patch4_window7_224", ...).
        weights: optional local state-dict file for the timm model.
        freeze_bn: replace BatchNorm by FrozenBatchNorm2d (the original's FrozenBN for ResNets).
        drop_path_rate: stochastic depth of Swin backbones.

    Attributes:
        channels: channel count of res2..res5.
        strides: (4, 8, 16, 32).
    """

    def __init__(self, *, name: str, weights: str | None = None, freeze_bn: bool = True, drop_path_rate: float = 0.0):
        super().__init__()
        self.is_swin = name.startswith("swin")
        kwargs: dict = {"features_only": True, "out_indices": (0, 1, 2, 3) if self.is_swin else (1, 2, 3, 4)}
        if self.is_swin:
            # Any input size; shifted windows in every stage whatever the map size (timm would fix the
            # shift for its 224/384 px pretraining size and never shift the last stage).
            kwargs.update(dynamic_img_size=True, always_partition=True, drop_path_rate=drop_path_rate)
        try:
            self.body = timm.create_model(name, pretrained=False, **kwargs)
        except RuntimeError as err:
            raise ValueError(f"timm cannot build backbone {name!r} with features_only: {err}") from err
        if self.is_swin:
            for module in self.body.modules():
                if isinstance(module, SwinTransformerBlock):
                    module._attn = types.MethodType(_pad_then_shift_window_attention, module)
                elif isinstance(module, WindowAttention):
                    # timm takes its fused path (scaled_dot_product_attention with the relative-position
                    # bias and shift mask as attn_mask) for Swin only under TIMM_FUSED_ATTN=2. It computes
                    # the same attention (tests/test_model.py) and makes the backbone ~1.3x faster on CPU.
                    module.fused_attn = True
        if weights is not None:
            self._load(Path(weights))
        if freeze_bn:
            self.body = freeze_batch_norm_2d(self.body)
        self.channels = tuple(self.body.feature_info.channels())
        self.strides = tuple(self.body.feature_info.reduction())
        if self.strides != (4, 8, 16, 32):
            raise ValueError(f"backbone {name!r} has strides {self.strides}; Mask2Former needs (4, 8, 16, 32)")
        # The original's Swin wrapper normalises every output level with its own LayerNorm.
        self.out_norms = nn.ModuleList(nn.LayerNorm(c) for c in self.channels) if self.is_swin else None

    def _load(self, path: Path) -> None:
        if not path.is_file():
            raise FileNotFoundError(f"backbone weights {path} not found (m2f never downloads weights)")
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("model", state) if isinstance(state, dict) else state
        missing, unexpected = self.body.load_state_dict(state, strict=False)
        # Classifier heads are dropped by features_only, so unexpected "fc."/"head." keys are expected.
        unexpected = [k for k in unexpected if not k.startswith(("fc.", "head.", "norm."))]
        if missing or unexpected:
            raise ValueError(f"backbone weights {path}: missing keys {missing[:8]}, unexpected keys {unexpected[:8]}")

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """images (B,3,H,W) normalised -> {"res2": (B,C2,H/4,W/4), ..., "res5": (B,C5,H/32,W/32)}."""
        feats = self.body(images)
        if self.out_norms is not None:  # timm's Swin returns NHWC
            feats = [norm(f).permute(0, 3, 1, 2).contiguous() for norm, f in zip(self.out_norms, feats)]
        return dict(zip(FEATURE_NAMES, feats))


def _pad_then_shift_window_attention(block: SwinTransformerBlock, x: Tensor) -> Tensor:
    """Window attention of a Swin block in the original's order: pad to whole windows, then shift.

    timm 1.0 shifts first and pads after, which puts the padding inside the image and lets windows wrap
    across its border; the original (and transformers) pad first. Replaces timm's private `_attn`, so
    tests/test_fidelity.py (Swin-T against transformers) guards against timm changing it.

    Args:
        x: (B, H, W, C) tokens of one stage.
    """
    height, width, channels = x.shape[1:]
    wh, ww = block.window_size
    x = F.pad(x, (0, 0, 0, (ww - width % ww) % ww, 0, (wh - height % wh) % wh))
    padded_h, padded_w = x.shape[1:3]
    shifted = any(block.shift_size)
    if shifted:
        x = torch.roll(x, shifts=(-block.shift_size[0], -block.shift_size[1]), dims=(1, 2))
    windows = window_partition(x, block.window_size).view(-1, block.window_area, channels)
    windows = block.attn(windows, mask=block.get_attn_mask(x) if shifted else None)
    x = window_reverse(windows.view(-1, wh, ww, channels), block.window_size, padded_h, padded_w)
    if shifted:
        x = torch.roll(x, shifts=block.shift_size, dims=(1, 2))
    return x[:, :height, :width].contiguous()
