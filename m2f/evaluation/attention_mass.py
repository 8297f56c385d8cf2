"""How much of a query's cross-attention falls on its object (foreground) vs the rest (paper Fig. I b).

For a query matched to a ground-truth segment, the foreground mass at one feature level is
sum_x a_q(x) * fg(x) / sum_x a_q(x) over that level's H_l * W_l positions, with fg the matched
ground-truth mask resized to the level. The meter averages it over queries (and images); the
background mass is one minus it.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def foreground_at_level(masks: Tensor, size: Sequence[int]) -> Tensor:
    """Ground-truth masks resized to a feature level: bilinear (align_corners=False) on 0/1, >= 0.5.

    Args:
        masks: (..., H, W) bool.
        size: (H_l, W_l).

    Returns:
        (..., H_l, W_l) bool.
    """
    lead = masks.shape[:-2]
    flat = masks.reshape(1, -1, *masks.shape[-2:]).float()
    resized = F.interpolate(flat, size=tuple(size), mode="bilinear", align_corners=False)
    return (resized >= 0.5).reshape(*lead, *resized.shape[-2:])


class AttentionMassMeter:
    """Running mean of the foreground attention mass of (matched) queries at one level."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forgets everything seen so far."""
        self.total = 0.0
        self.count = 0

    def update(self, attention: Tensor, foreground: Tensor, valid: Tensor | None = None) -> None:
        """Adds a batch of queries.

        Args:
            attention: (B, Q, H_l*W_l) cross-attention weights over one level's positions, already
                averaged over heads; (B, M, Q, H_l*W_l) is averaged over the M heads here.
            foreground: (B, Q, H_l, W_l) bool, each query's matched ground-truth mask at this level.
            valid: (B, Q) bool, the queries to count (e.g. the matched ones); default all.

        Raises:
            ValueError: shapes that do not fit together.
        """
        if attention.dim() == 4:
            attention = attention.mean(1)
        if attention.dim() != 3 or foreground.dim() != 4 or attention.shape[:2] != foreground.shape[:2] \
                or attention.shape[2] != foreground.shape[2] * foreground.shape[3]:
            raise ValueError(f"expected attention (B, Q, H_l*W_l) and foreground (B, Q, H_l, W_l), got "
                             f"{tuple(attention.shape)} and {tuple(foreground.shape)}")
        weights = attention.detach().float()
        on_object = (weights * foreground.flatten(2).to(weights)).sum(-1)
        fraction = on_object / weights.sum(-1).clamp_min(torch.finfo(weights.dtype).tiny)
        if valid is not None:
            if valid.shape != fraction.shape:
                raise ValueError(f"valid must be (B, Q) = {tuple(fraction.shape)}, got {tuple(valid.shape)}")
            fraction = fraction[valid.bool()]
        self.total += float(fraction.sum())
        self.count += fraction.numel()

    def compute(self) -> dict[str, float | int]:
        """{"foreground": mean fraction, "background": 1 - it, "count": queries averaged} (nan if none)."""
        if self.count == 0:
            return {"foreground": float("nan"), "background": float("nan"), "count": 0}
        foreground = self.total / self.count
        return {"foreground": foreground, "background": 1.0 - foreground, "count": self.count}
