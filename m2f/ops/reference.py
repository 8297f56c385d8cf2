"""Pure-PyTorch multi-scale deformable attention: the CPU fallback path and the oracle for every kernel.

Shapes (legend in `m2f/__init__.py`): B batch, Lq queries, M heads, D = C/M channels per head, L levels,
P points per level, S = sum_l H_l*W_l.

Numerics follow the original CUDA op exactly: sampling locations are normalised (x, y) in [0, 1] with
pixel centres at (i + 0.5) / W_l, bilinear interpolation with zero padding outside the map, which is
`F.grid_sample(..., mode="bilinear", padding_mode="zeros", align_corners=False)` on coordinates 2p - 1.
"""

import torch
import torch.nn.functional as F
from torch import Tensor


def ms_deform_attn_reference(
    value: Tensor, spatial_shapes: Tensor, sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    """Multi-scale deformable attention with `F.grid_sample`, one level at a time.

    Args:
        value: (B, S, M, D) values of all levels, flattened level after level.
        spatial_shapes: (L, 2) int64, (H_l, W_l) of each level.
        sampling_locations: (B, Lq, M, L, P, 2) normalised (x, y) locations.
        attention_weights: (B, Lq, M, L, P), already normalised over L*P per head.

    Returns:
        (B, Lq, M*D) the attention-weighted sum of the bilinearly sampled values.
    """
    batch, _, heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    sizes = [int(h) * int(w) for h, w in spatial_shapes.tolist()]
    value_per_level = value.split(sizes, dim=1)
    grids = 2 * sampling_locations - 1  # grid_sample wants [-1, 1]
    sampled = []
    for level, (h, w) in enumerate(spatial_shapes.tolist()):
        # (B, H*W, M, D) -> (B*M, D, H, W): one grid_sample call for all heads of the level.
        v = value_per_level[level].flatten(2).transpose(1, 2).reshape(batch * heads, head_dim, h, w)
        # (B, Lq, M, P, 2) -> (B*M, Lq, P, 2)
        g = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    # (B*M, D, Lq, L*P) weighted by (B*M, 1, Lq, L*P), summed over the L*P samples.
    samples = torch.stack(sampled, dim=-2).flatten(-2)
    weights = attention_weights.transpose(1, 2).reshape(batch * heads, 1, num_queries, num_levels * num_points)
    out = (samples * weights).sum(-1).view(batch, heads * head_dim, num_queries)
    return out.transpose(1, 2).contiguous()
