"""Point sampling (PointRend): read masks at continuous points instead of on full pixel grids.

Both the matcher and the loss of Mask2Former evaluate masks at sampled points in normalised [0, 1]²
coordinates, so predicted masks (1/4 resolution) and ground-truth masks (input resolution) are compared
without resizing either. Random draws use the global torch RNG, or an explicit `torch.Generator`, in a
fixed order, so identical RNG states give identical points.
"""

import torch
import torch.nn.functional as F
from torch import Tensor


def point_sample(input: Tensor, coords: Tensor) -> Tensor:
    """Bilinear read of `input` at normalised points, as `grid_sample(2p - 1, align_corners=False)`.

    Coordinates (0, 0) and (1, 1) are the outer corners of the image, so a pixel centre is at
    ((j + 0.5) / W, (i + 0.5) / H); points within half a pixel of the border blend with zero.

    Args:
        input: (n, C, H, W) maps (float).
        coords: (n, P, 2) points, (x, y) in [0, 1], for each of the n maps.

    Returns:
        (n, C, P) values.
    """
    if coords.dim() != 3 or coords.shape[-1] != 2:
        raise ValueError(f"point_sample: coords must be (n, P, 2), got shape {tuple(coords.shape)}")
    grid = coords.mul(2.0).sub_(1.0).unsqueeze(2).to(input.dtype)  # in place: one pass less over the points
    return F.grid_sample(input, grid, mode="bilinear", padding_mode="zeros", align_corners=False).squeeze(3)


def random_points(num_sets: int, num_points: int, *, device: torch.device,
                  generator: torch.Generator | None = None) -> Tensor:
    """Uniform points in [0, 1]², drawn from `generator` (on its own device) or the global RNG.

    Args:
        num_sets: n, the number of independent point sets.
        num_points: P, points per set.
        device: where the points are returned.
        generator: optional RNG; None uses the global RNG of `device`.

    Returns:
        (n, P, 2) points (x, y).
    """
    draw_device = generator.device if generator is not None else device
    return torch.rand(num_sets, num_points, 2, generator=generator, device=draw_device).to(device)


@torch.no_grad()
def uncertain_point_coords(logits: Tensor, *, num_points: int, oversample_ratio: float,
                           importance_sample_ratio: float, generator: torch.Generator | None = None) -> Tensor:
    """PointRend's importance sampling: points concentrated where the mask logit is close to 0.

    Draws k·P uniform points (k = oversample_ratio), keeps the β·P (β = importance_sample_ratio) with the
    highest uncertainty −|logit|, and adds P − β·P fresh uniform points so that no region is ignored. Each
    mask's k·P + P − β·P uniform numbers are one consecutive block of the RNG's stream (candidates first).

    Args:
        logits: (n, 1, h, w) mask logits, one map per mask.
        num_points: P, points per mask.
        oversample_ratio: k >= 1.
        importance_sample_ratio: β in [0, 1].
        generator: optional RNG; None uses the global RNG.

    Returns:
        (n, P, 2) points (x, y) in [0, 1]: the β·P uncertain points first, then the uniform ones.
    """
    if oversample_ratio < 1:
        raise ValueError(f"oversample_ratio must be >= 1, got {oversample_ratio}")
    if not 0 <= importance_sample_ratio <= 1:
        raise ValueError(f"importance_sample_ratio must be in [0, 1], got {importance_sample_ratio}")
    if logits.dim() != 4 or logits.shape[1] != 1:
        raise ValueError(f"uncertain_point_coords: logits must be (n, 1, h, w), got shape {tuple(logits.shape)}")
    n = logits.shape[0]
    num_sampled = int(num_points * oversample_ratio)
    num_uncertain = int(importance_sample_ratio * num_points)
    # One draw holds each mask's candidates and then its fresh points, so the points of n masks equal those
    # of any split of them into consecutive groups drawn one group after another (the loss relies on it).
    draws = random_points(n, num_sampled + num_points - num_uncertain, device=logits.device, generator=generator)
    candidates, fresh = draws[:, :num_sampled], draws[:, num_sampled:]
    uncertainty = -point_sample(logits, candidates)[:, 0].abs()
    # Unsorted top-k (about 2x faster on the CPU): the losses are means over the points, order-free.
    top = uncertainty.topk(num_uncertain, dim=1, sorted=False).indices
    coords = candidates.gather(1, top.unsqueeze(-1).expand(-1, -1, 2))
    return torch.cat([coords, fresh], dim=1)
