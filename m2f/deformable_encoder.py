"""The multi-scale deformable attention Transformer encoder of the pixel decoder (Deformable DETR).

Every pixel of every level is a query; each query samples P points per head on each of the L levels
around its reference point (the pixel's own centre) and mixes them with learned weights.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from m2f.ops import ms_deform_attn


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention (Zhu et al., 2021), the module around the op.

    Args:
        dim: model width C.
        num_heads: M; the head width C/M is what the kernels see as D.
        num_levels: L.
        num_points: P sampling points per head and level.
        impl: the op implementation ("auto", "torch", "cpu", "cuda"); see `m2f.ops.ms_deform_attn`.
    """

    def __init__(self, *, dim: int, num_heads: int, num_levels: int, num_points: int, impl: str = "auto"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads, self.num_levels, self.num_points, self.impl = num_heads, num_levels, num_points, impl
        self.sampling_offsets = nn.Linear(dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # Offsets start on a ring: head h looks in direction 2πh/M, point p at distance p+1 (in pixels
        # of each level), so the initial sampling pattern already covers a neighbourhood.
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        grid = torch.stack([angles.cos(), angles.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True).values
        grid = grid.view(self.num_heads, 1, 1, 2).repeat(1, self.num_levels, self.num_points, 1)
        grid = grid * torch.arange(1, self.num_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for layer in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        value: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
    ) -> Tensor:
        """
        Args:
            query: (B, Lq, C) queries (features + positional encoding).
            reference_points: (B, Lq, L, 2) normalised (x, y) reference point of each query on each level.
            value: (B, S, C) the features of all levels, flattened.
            spatial_shapes: (L, 2) int64 (H_l, W_l).
            level_start_index: (L,) int64 offset of each level in S.

        Returns:
            (B, Lq, C)
        """
        batch, num_queries, dim = query.shape
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        v = self.value_proj(value).view(batch, value.shape[1], heads, dim // heads)
        offsets = self.sampling_offsets(query).view(batch, num_queries, heads, levels, points, 2)
        weights = self.attention_weights(query).view(batch, num_queries, heads, levels * points)
        weights = _softmax_short_rows(weights).view(batch, num_queries, heads, levels, points)
        # Offsets are in pixels of each level; normalise by (W_l, H_l) to add them to [0, 1] references.
        normalizer = spatial_shapes.flip(-1).to(offsets.dtype).view(1, 1, levels, 1, 2)  # (W_l, H_l)
        flat = offsets.view(batch * num_queries, heads, levels, points, 2)
        reference = reference_points.expand(batch, -1, -1, -1).reshape(batch * num_queries, 1, levels, 1, 2)
        if torch.onnx.is_in_onnx_export():  # the ONNX exporter has no addcdiv; the same values
            locations = reference + flat / normalizer
        else:  # one fused pass: forward and backward ~1.8x faster on the CPU than the division and the add
            locations = torch.addcdiv(reference, flat, normalizer.expand(flat.shape))
        locations = locations.view(offsets.shape)
        out = ms_deform_attn(v, spatial_shapes, level_start_index, locations, weights, impl=self.impl)
        return self.output_proj(out)


def _softmax_short_rows(x: Tensor) -> Tensor:
    """softmax(x, -1) for rows of a few elements (here L·P = 12), written out: PyTorch's CPU softmax kernel
    takes ~10x longer on such rows than these four vectorised passes. The max is a constant shift (softmax is
    shift-invariant), so it is detached and the gradient is that of softmax.

    Args:
        x: (..., R) logits.

    Returns:
        (..., R) probabilities.
    """
    e = (x - x.detach().amax(-1, keepdim=True)).exp()
    return e / e.sum(-1, keepdim=True)


class DeformableEncoderLayer(nn.Module):
    """Post-norm layer: deformable self-attention over all levels, then a ReLU FFN."""

    def __init__(self, *, dim: int, ffn_dim: int, num_heads: int, num_levels: int, num_points: int,
                 dropout: float = 0.0, impl: str = "auto"):
        super().__init__()
        self.self_attn = MSDeformAttn(dim=dim, num_heads=num_heads, num_levels=num_levels,
                                      num_points=num_points, impl=impl)
        self.norm1 = nn.LayerNorm(dim)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, src: Tensor, pos: Tensor, reference_points: Tensor, spatial_shapes: Tensor,
                level_start_index: Tensor) -> Tensor:
        """src, pos (B, S, C) -> (B, S, C). The positional encoding goes into the query, not the value."""
        attn = self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index)
        src = self.norm1(src + self.dropout(attn))
        # In place: the (B, S, 1024) hidden activation is the encoder's largest, and a fresh buffer for the
        # ReLU cost 8x its arithmetic (131 vs 16 ms at 800x1216); linear1's backward does not need its output.
        ffn = self.linear2(self.dropout(F.relu_(self.linear1(src))))
        return self.norm2(src + self.dropout(ffn))


class DeformableEncoder(nn.Module):
    """A stack of `DeformableEncoderLayer`s over the flattened multi-scale features."""

    def __init__(self, *, num_layers: int, dim: int, ffn_dim: int, num_heads: int, num_levels: int,
                 num_points: int, dropout: float = 0.0, impl: str = "auto"):
        super().__init__()
        self.layers = nn.ModuleList(
            DeformableEncoderLayer(dim=dim, ffn_dim=ffn_dim, num_heads=num_heads, num_levels=num_levels,
                                   num_points=num_points, dropout=dropout, impl=impl)
            for _ in range(num_layers)
        )

    @staticmethod
    def reference_points(spatial_shapes: Tensor, num_levels: int, device: torch.device,
                         dtype: torch.dtype = torch.float32) -> Tensor:
        """(1, S, L, 2): each pixel's centre ((j+0.5)/W, (i+0.5)/H), the same on every level.

        The original scales by "valid ratios", which are always 1 because padding is never masked.
        """
        points = []
        for h, w in spatial_shapes.tolist():
            ys, xs = torch.meshgrid(
                (torch.arange(h, device=device, dtype=dtype) + 0.5) / h,
                (torch.arange(w, device=device, dtype=dtype) + 0.5) / w,
                indexing="ij",
            )
            points.append(torch.stack((xs.flatten(), ys.flatten()), -1))
        return torch.cat(points)[None, :, None, :].expand(1, -1, num_levels, 2)

    def forward(self, src: Tensor, pos: Tensor, spatial_shapes: Tensor, level_start_index: Tensor) -> Tensor:
        """src, pos (B, S, C), spatial_shapes (L, 2) -> (B, S, C)."""
        ref = self.reference_points(spatial_shapes, spatial_shapes.shape[0], src.device, src.dtype)
        for layer in self.layers:
            src = layer(src, pos, ref, spatial_shapes, level_start_index)
        return src
