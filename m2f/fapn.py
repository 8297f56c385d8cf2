"""FaPN as the pixel decoder (Table 4e "FaPN"): an FPN whose laterals select and whose merges align features.

Huang et al. (ICCV 2021), Feature-aligned Pyramid Network, Sec. 3:
- feature selection module (FSM), on each lateral C_i: a channel-attention vector u = σ(f_m(avgpool(C_i)))
  re-weights the channels and the residual goes through the lateral 1x1 conv, Ĉ_i = f_s(C_i + u ⊙ C_i);
- feature alignment module (FAM), on each top-down merge: the coarser output is upsampled (bilinear),
  offsets Δ_i = f_o([Ĉ_i, P^u_{i+1}]) (a 1x1 conv on the concatenation) steer a 3x3 deformable conv
  f_a of P^u_{i+1}, and P_i = ReLU(f_a(P^u_{i+1}, Δ_i)) + Ĉ_i.
The FPN output convs and the mask-features conv are MaskFormer's FPN (`FPNPixelDecoder`). The deformable
conv is `torchvision.ops.deform_conv2d` without modulation (DCNv1; FaPN's code uses DCNv2), and its
offsets start at 0, so an untrained FAM is a plain 3x3 conv of the upsampled map.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import deform_conv2d

from m2f.pixel_decoder import ConvNorm, FPNPixelDecoder


class FeatureSelectionModule(nn.Module):
    """FSM: Ĉ = f_s(C + σ(f_m(avgpool(C))) ⊙ C), f_m a 1x1 conv without bias, f_s a 1x1 conv + GroupNorm."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.attention = nn.Conv2d(in_channels, in_channels, kernel_size=1, bias=False)  # f_m
        self.proj = ConvNorm(in_channels, out_channels, kernel_size=1, norm=True, relu=False)  # f_s

    def importance(self, x: Tensor) -> Tensor:
        """(B, C_in, H, W) -> u (B, C_in, 1, 1) in (0, 1), one weight per channel."""
        return self.attention(x.mean((-2, -1), keepdim=True)).sigmoid()

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x + x * self.importance(x))


class FeatureAlignmentModule(nn.Module):
    """FAM: a 3x3 deformable conv of the upsampled coarser map, offsets from [lateral, upsampled].

    Args:
        dim: channels of both inputs and of the output.
        offset_groups: groups of channels sharing one set of offsets (FaPN: 8).
    """

    def __init__(self, dim: int, *, offset_groups: int = 8):
        super().__init__()
        if dim % offset_groups:
            raise ValueError(f"dim {dim} must be divisible by offset_groups {offset_groups}")
        # f_o: one (dy, dx) pair per group and tap of the 3x3 kernel, torchvision's layout.
        self.offset = nn.Conv2d(2 * dim, 2 * 9 * offset_groups, kernel_size=1)
        nn.init.zeros_(self.offset.weight)
        nn.init.zeros_(self.offset.bias)
        self.weight = nn.Parameter(torch.empty(dim, dim, 3, 3))  # f_a
        self.bias = nn.Parameter(torch.zeros(dim))
        nn.init.kaiming_uniform_(self.weight, a=1)

    def align(self, top: Tensor, offsets: Tensor) -> Tensor:
        """f_a: the deformable 3x3 conv of `top` (B, C, H, W) at `offsets` (B, 18·groups, H, W)."""
        return deform_conv2d(top, offsets, self.weight, self.bias, padding=1)

    def forward(self, lateral: Tensor, top: Tensor) -> Tensor:
        """lateral Ĉ_i (B, C, H, W), top P_{i+1} (B, C, H/2, W/2) -> P_i (B, C, H, W) before the output conv."""
        up = F.interpolate(top, size=lateral.shape[-2:], mode="bilinear", align_corners=False)
        offsets = self.offset(torch.cat([lateral, up], 1))
        return F.relu(self.align(up, offsets)) + lateral


class FaPNPixelDecoder(FPNPixelDecoder):
    """MaskFormer's FPN with FSM laterals (`adapter_k`) and FAM merges (`align_k`).

    Args:
        in_channels: channels of res2..res5.
        conv_dim: pyramid width.
        mask_dim: channels of the per-pixel mask features.
    """

    def __init__(self, *, in_channels: tuple[int, ...], conv_dim: int, mask_dim: int):
        super().__init__(in_channels=in_channels, conv_dim=conv_dim, mask_dim=mask_dim)
        for k, c in enumerate(in_channels[:-1], start=1):
            setattr(self, f"adapter_{k}", FeatureSelectionModule(c, conv_dim))
            setattr(self, f"align_{k}", FeatureAlignmentModule(conv_dim))

    def fuse(self, k: int, lateral: Tensor, top: Tensor) -> Tensor:
        return getattr(self, f"align_{k}")(lateral, top)
