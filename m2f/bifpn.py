"""BiFPN as the pixel decoder (Table 4e "BiFPN"): EfficientDet's weighted bidirectional feature pyramid.

Tan et al. (CVPR 2020), EfficientDet, Sec. 3: each BiFPN layer runs a top-down pass and then a bottom-up
pass over the levels; every node fuses its inputs (resized to its level) with *fast normalized fusion*,
O = Σ_i w_i·I_i / (ε + Σ_j w_j) with w_i = ReLU(learned weight) ≥ 0, then applies swish and a depthwise
separable 3x3 conv with a norm. For level i (fine to coarse, L levels):

    P_i^td  = conv(fuse(P_i^in, up(P_{i+1}^td)))                       (top-down, i = L-2 .. 0; P_{L-1}^td = P_{L-1}^in)
    P_i^out = conv(fuse(P_i^in, P_i^td, down(P_{i-1}^out)))            (bottom-up, i = 1 .. L-2)
    P_0^out = P_0^td,  P_{L-1}^out = conv(fuse(P_{L-1}^in, down(P_{L-2}^out)))

Here the levels are res2..res5 (1/4 to 1/32; EfficientDet's P3-P7 would add levels below the decoder's
scales), upsampling is nearest, downsampling is max pooling, and the norm is GroupNorm (batches of a few
images per GPU; EfficientDet uses BatchNorm). 1x1 convs + GroupNorm project the backbone features to
conv_dim first; the mask features are a 3x3 conv on the 1/4 output, as in MaskFormer's FPN.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from m2f.backbone import FEATURE_NAMES
from m2f.pixel_decoder import NUM_DECODER_LEVELS, ConvNorm

FUSION_EPS = 1e-4  # EfficientDet's ε: keeps the normalisation stable when all weights are near 0


class FastNormalizedFusion(nn.Module):
    """O = Σ_i w_i·I_i / (ε + Σ_j w_j), w = ReLU(weight), the weights initialised to 1 (an average)."""

    def __init__(self, *, num_inputs: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_inputs))

    def normalized_weights(self) -> Tensor:
        """(num_inputs,) non-negative, summing to just under 1."""
        w = F.relu(self.weight)
        return w / (w.sum() + FUSION_EPS)

    def forward(self, inputs: list[Tensor]) -> Tensor:
        """inputs: num_inputs tensors of one shape (B, C, H, W) -> their weighted sum, same shape."""
        w = self.normalized_weights()
        return sum((w[i] * x for i, x in enumerate(inputs)), torch.zeros_like(inputs[0]))


class SeparableConvNorm(nn.Module):
    """Swish, then a depthwise 3x3 conv, a pointwise 1x1 conv and GroupNorm (EfficientDet's BiFPN node conv)."""

    def __init__(self, dim: int):
        super().__init__()
        self.depthwise = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim, bias=False)
        self.pointwise = nn.Conv2d(dim, dim, kernel_size=1, bias=False)
        self.norm = nn.GroupNorm(32, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.pointwise(self.depthwise(F.silu(x))))


class BiFPNLayer(nn.Module):
    """One top-down + bottom-up pass over L levels of width `dim`, ordered fine to coarse."""

    def __init__(self, *, dim: int, num_levels: int):
        super().__init__()
        self.num_levels = num_levels
        # Index i is level i for every list; the top-down pass has no node at the coarsest level and the
        # bottom-up pass none at the finest, where those lists hold Identity placeholders.
        self.td_fuse = nn.ModuleList(FastNormalizedFusion(num_inputs=2) if i < num_levels - 1 else nn.Identity()
                                     for i in range(num_levels))
        self.td_conv = nn.ModuleList(SeparableConvNorm(dim) if i < num_levels - 1 else nn.Identity()
                                     for i in range(num_levels))
        self.out_fuse = nn.ModuleList(
            nn.Identity() if i == 0 else FastNormalizedFusion(num_inputs=2 if i == num_levels - 1 else 3)
            for i in range(num_levels))
        self.out_conv = nn.ModuleList(nn.Identity() if i == 0 else SeparableConvNorm(dim) for i in range(num_levels))

    def forward(self, levels: list[Tensor]) -> list[Tensor]:
        """levels: L tensors (B, C, H_l, W_l), fine to coarse -> the L outputs, same shapes."""
        last = self.num_levels - 1
        td: list[Tensor] = [levels[last]]
        for i in range(last - 1, -1, -1):
            up = F.interpolate(td[0], size=levels[i].shape[-2:], mode="nearest")
            td.insert(0, self.td_conv[i](self.td_fuse[i]([levels[i], up])))
        out = [td[0]]
        for i in range(1, self.num_levels):
            down = F.adaptive_max_pool2d(out[-1], levels[i].shape[-2:])
            inputs = [levels[i], down] if i == last else [levels[i], td[i], down]
            out.append(self.out_conv[i](self.out_fuse[i](inputs)))
        return out


class BiFPNPixelDecoder(nn.Module):
    """1x1 projections of res2..res5, `num_layers` BiFPN layers, and the mask-features conv on the 1/4 output.

    Args:
        in_channels: channels of res2..res5.
        conv_dim: BiFPN width (the pyramid's channels).
        mask_dim: channels of the per-pixel mask features.
        num_layers: stacked BiFPN layers (EfficientDet-D0..D7 stack 3-8).
    """

    def __init__(self, *, in_channels: tuple[int, ...], conv_dim: int, mask_dim: int, num_layers: int = 3):
        super().__init__()
        self.input_proj = nn.ModuleList(ConvNorm(c, conv_dim, kernel_size=1, norm=True, relu=False)
                                        for c in in_channels)
        self.layers = nn.ModuleList(BiFPNLayer(dim=conv_dim, num_levels=len(in_channels)) for _ in range(num_layers))
        self.mask_features = ConvNorm(conv_dim, mask_dim, kernel_size=3, norm=False, relu=False)

    def forward(self, features: dict[str, Tensor]) -> tuple[Tensor, list[Tensor]]:
        levels = [proj(features[name]) for proj, name in zip(self.input_proj, FEATURE_NAMES)]
        for layer in self.layers:
            levels = layer(levels)
        return self.mask_features(levels[0]), levels[::-1][:NUM_DECODER_LEVELS]
