"""Sine positional encoding of a feature map, as in DETR and Mask2Former.

Coordinates are the 1-based row/column index normalised by the map size and scaled to [0, 2π]; the
channels are the y block then the x block, sin and cos interleaved within each block.
"""

import math

import torch
from torch import Tensor


def sine_position_encoding(
    height: int,
    width: int,
    *,
    num_feats: int,
    temperature: float = 10000.0,
    scale: float = 2 * math.pi,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Returns the (2*num_feats, height, width) encoding in `dtype`; it depends only on the map's shape.

    It is computed in `dtype` (not computed in float32 and cast) so that a float64 model is float64 end to end.

    The original computes it from an all-False padding mask (the padding mask is never used), so the
    cumulative sums are plain 1..H and 1..W ranges.
    """
    eps = 1e-6
    y = torch.arange(1, height + 1, dtype=dtype, device=device) / (height + eps) * scale
    x = torch.arange(1, width + 1, dtype=dtype, device=device) / (width + eps) * scale
    dim_t = torch.arange(num_feats, dtype=dtype, device=device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    pos_y = y[:, None] / dim_t  # (H, num_feats)
    pos_x = x[:, None] / dim_t  # (W, num_feats)
    pos_y = torch.stack((pos_y[:, 0::2].sin(), pos_y[:, 1::2].cos()), dim=2).flatten(1)
    pos_x = torch.stack((pos_x[:, 0::2].sin(), pos_x[:, 1::2].cos()), dim=2).flatten(1)
    pos = torch.cat(
        (pos_y[:, None, :].expand(height, width, num_feats), pos_x[None, :, :].expand(height, width, num_feats)),
        dim=2,
    )
    return pos.permute(2, 0, 1)
