"""Pixel decoders: backbone features -> per-pixel mask features (1/4) and a 3-level pyramid for the decoder.

All pixel decoders (these two, `m2f.semantic_fpn`, `m2f.fapn`, `m2f.bifpn`) return
`(mask_features (B, mask_dim, H/4, W/4), [f_1/32, f_1/16, f_1/8])` with conv_dim channels in the pyramid,
ordered from low to high resolution as the Transformer decoder consumes it. Module names follow the original's
state-dict keys (`input_proj`, `adapter_1`, `layer_1`, `mask_features`) so checkpoints convert by name.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from m2f.backbone import FEATURE_NAMES
from m2f.deformable_encoder import DeformableEncoder
from m2f.position_encoding import sine_position_encoding

NUM_DECODER_LEVELS = 3  # the Transformer decoder uses 1/32, 1/16 and 1/8


def at_least_fp32(x: Tensor) -> Tensor:
    """Half and bfloat16 tensors cast up to float32; float32 and float64 unchanged (never cast down)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class ConvNorm(nn.Conv2d):
    """Conv2d followed by an optional GroupNorm(32) and ReLU, with detectron2's "c2 xavier" init.

    The norm lives in `.norm` like detectron2's Conv2d, so the keys read `layer_1.weight`, `layer_1.norm.weight`.
    """

    def __init__(self, in_channels: int, out_channels: int, *, kernel_size: int, norm: bool, relu: bool):
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=not norm)
        self.norm = nn.GroupNorm(32, out_channels) if norm else None
        self.relu = relu
        nn.init.kaiming_uniform_(self.weight, a=1)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = super().forward(x)
        if self.norm is not None:
            x = self.norm(x)
        return F.relu_(x) if self.relu else x  # in place on a fresh output (see the encoder's FFN)


class DeformableTransformer(nn.Module):
    """The encoder over the flattened levels plus the learnable level embedding added to their encodings."""

    def __init__(self, *, dim: int, num_layers: int, ffn_dim: int, num_heads: int, num_points: int,
                 num_levels: int, dropout: float, impl: str):
        super().__init__()
        self.level_embed = nn.Parameter(torch.empty(num_levels, dim))
        nn.init.normal_(self.level_embed)
        self.encoder = DeformableEncoder(num_layers=num_layers, dim=dim, ffn_dim=ffn_dim, num_heads=num_heads,
                                         num_levels=num_levels, num_points=num_points, dropout=dropout, impl=impl)

    def forward(self, srcs: list[Tensor], pos: list[Tensor]) -> list[Tensor]:
        """srcs, pos: per level (B, C, H_l, W_l) -> encoded features per level, same shapes."""
        shapes = [s.shape[-2:] for s in srcs]
        spatial_shapes = torch.tensor(shapes, dtype=torch.long, device=srcs[0].device)
        sizes = [h * w for h, w in shapes]
        level_start_index = torch.tensor([0, *sizes[:-1]], device=srcs[0].device).cumsum(0)
        src_flat = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)  # (B, S, C)
        pos_flat = torch.cat(
            [p.flatten(2).transpose(1, 2) + self.level_embed[lvl] for lvl, p in enumerate(pos)], 1
        )
        memory = self.encoder(src_flat, pos_flat, spatial_shapes, level_start_index)
        return [m.transpose(1, 2).reshape(*m.shape[:1], -1, h, w)
                for m, (h, w) in zip(memory.split(sizes, dim=1), shapes)]


class MSDeformAttnPixelDecoder(nn.Module):
    """6 deformable-attention encoder layers on res3..res5, then one FPN level on res2 (the paper's default).

    Args:
        in_channels: channels of res2..res5.
        conv_dim: width of the pyramid and of the encoder.
        mask_dim: channels of the per-pixel mask features.
        num_layers / ffn_dim / num_heads / num_points: the deformable encoder (6 / 1024 / 8 / 4).
        impl: the MSDeformAttn op implementation.
    """

    def __init__(self, *, in_channels: tuple[int, ...], conv_dim: int, mask_dim: int, num_layers: int,
                 ffn_dim: int, num_heads: int, num_points: int, dropout: float = 0.0, impl: str = "auto"):
        super().__init__()
        # Encoder levels from coarse to fine: res5, res4, res3 (input_proj.0 is res5, as in the original).
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, conv_dim, kernel_size=1), nn.GroupNorm(32, conv_dim))
            for c in reversed(in_channels[1:])
        )
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight)
            nn.init.zeros_(proj[0].bias)
        self.transformer = DeformableTransformer(dim=conv_dim, num_layers=num_layers, ffn_dim=ffn_dim,
                                                 num_heads=num_heads, num_points=num_points,
                                                 num_levels=len(self.input_proj), dropout=dropout, impl=impl)
        self.adapter_1 = ConvNorm(in_channels[0], conv_dim, kernel_size=1, norm=True, relu=False)
        self.layer_1 = ConvNorm(conv_dim, conv_dim, kernel_size=3, norm=True, relu=True)
        self.mask_features = ConvNorm(conv_dim, mask_dim, kernel_size=1, norm=False, relu=False)

    def forward(self, features: dict[str, Tensor]) -> tuple[Tensor, list[Tensor]]:
        # The deformable encoder runs in at least fp32, as in the original: its sampling locations need
        # the precision, and the op may not support half types. A float64 model stays float64.
        with torch.autocast(device_type=features["res2"].device.type, enabled=False):
            names = list(reversed(FEATURE_NAMES[1:]))
            srcs = [proj(at_least_fp32(features[n])) for proj, n in zip(self.input_proj, names)]
            pos = [sine_position_encoding(*s.shape[-2:], num_feats=s.shape[1] // 2, device=s.device, dtype=s.dtype)
                   .unsqueeze(0).expand(s.shape[0], -1, -1, -1) for s in srcs]
            pyramid = self.transformer(srcs, pos)
            res2 = self.adapter_1(at_least_fp32(features["res2"]))
            # Upsample in res2's layout. The encoder's 1/8 map is a channels_last view; for one image PyTorch
            # takes its slow generic bilinear kernel on it (230 vs 44 ms at 800x1216 on 2 CPU threads). In
            # training (channels_last) this is no copy.
            channels_last = res2.is_contiguous(memory_format=torch.channels_last)
            coarse = pyramid[-1].contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            fine = res2 + F.interpolate(coarse, size=res2.shape[-2:], mode="bilinear", align_corners=False)
            fine = self.layer_1(fine)
            return self.mask_features(fine), pyramid[:NUM_DECODER_LEVELS]


class FPNPixelDecoder(nn.Module):
    """MaskFormer's FPN (Table 4e "FPN"): top-down lateral + 3x3 output convs with GN, nearest upsampling.

    `lateral` and `fuse` are the two steps the FPN variants change (FaPN: feature selection and feature
    alignment); `top_down` gives every level, so Semantic FPN can add its branch on all of them.
    """

    def __init__(self, *, in_channels: tuple[int, ...], conv_dim: int, mask_dim: int):
        super().__init__()
        # layer_4 on res5 has no lateral; adapter_k/layer_k for res(k+1), k = 1..3, as in the original.
        for k, c in enumerate(in_channels, start=1):
            if k == len(in_channels):
                setattr(self, f"layer_{k}", ConvNorm(c, conv_dim, kernel_size=3, norm=True, relu=True))
            else:
                setattr(self, f"adapter_{k}", ConvNorm(c, conv_dim, kernel_size=1, norm=True, relu=False))
                setattr(self, f"layer_{k}", ConvNorm(conv_dim, conv_dim, kernel_size=3, norm=True, relu=True))
        self.num_levels = len(in_channels)
        self.mask_features = ConvNorm(conv_dim, mask_dim, kernel_size=3, norm=False, relu=False)

    def lateral(self, k: int, x: Tensor) -> Tensor:
        """The lateral connection of res(k+1): (B, C_in, H_k, W_k) -> (B, conv_dim, H_k, W_k)."""
        return getattr(self, f"adapter_{k}")(x)

    def fuse(self, k: int, lateral: Tensor, top: Tensor) -> Tensor:
        """Merges the lateral (B, C, H_k, W_k) with the coarser output `top` (B, C, H_k/2, W_k/2)."""
        return lateral + F.interpolate(top, size=lateral.shape[-2:], mode="nearest")

    def top_down(self, features: dict[str, Tensor]) -> list[Tensor]:
        """res2..res5 -> the outputs of every level, (B, conv_dim, H_l, W_l), from 1/32 to 1/4."""
        levels: list[Tensor] = []
        for k in range(self.num_levels, 0, -1):
            x = features[FEATURE_NAMES[k - 1]]
            if not levels:
                levels.append(getattr(self, f"layer_{k}")(x))
            else:
                levels.append(getattr(self, f"layer_{k}")(self.fuse(k, self.lateral(k, x), levels[-1])))
        return levels

    def forward(self, features: dict[str, Tensor]) -> tuple[Tensor, list[Tensor]]:
        levels = self.top_down(features)
        return self.mask_features(levels[-1]), levels[:NUM_DECODER_LEVELS]
