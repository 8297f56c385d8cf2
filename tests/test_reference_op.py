"""The pure-PyTorch MSDeformAttn reference against a direct loop over queries, heads, levels and points."""

import math

import pytest
import torch

from m2f.ops import ms_deform_attn_reference


def bilinear_zero_padded(value_map: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """value_map (H, W, D) sampled at normalised (x, y); pixel centres at (j + 0.5) / W, zeros outside."""
    h, w, _ = value_map.shape
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    out = torch.zeros(value_map.shape[-1], dtype=value_map.dtype)
    for dy in (0, 1):
        for dx in (0, 1):
            xi, yi = x0 + dx, y0 + dy
            weight = (1 - abs(px - xi)) * (1 - abs(py - yi))
            if 0 <= xi < w and 0 <= yi < h:
                out += weight * value_map[yi, xi]
    return out


def loop_reference(value, shapes, locations, weights):
    batch, _, heads, dim = value.shape
    _, queries, _, _, points, _ = locations.shape
    starts = [0]
    for h, w in shapes[:-1]:
        starts.append(starts[-1] + h * w)
    out = torch.zeros(batch, queries, heads, dim, dtype=value.dtype)
    for b in range(batch):
        for q in range(queries):
            for m in range(heads):
                for lv, (h, w) in enumerate(shapes):
                    level_map = value[b, starts[lv]: starts[lv] + h * w, m].view(h, w, dim)
                    for p in range(points):
                        x, y = locations[b, q, m, lv, p].tolist()
                        out[b, q, m] += weights[b, q, m, lv, p] * bilinear_zero_padded(level_map, x, y)
    return out.flatten(2)


@pytest.mark.parametrize("shapes", [[(5, 7)], [(6, 4), (3, 2), (2, 5)]])
def test_reference_matches_a_direct_loop(shapes):
    g = torch.Generator().manual_seed(0)
    batch, queries, heads, dim, points = 2, 5, 2, 3, 3
    total = sum(h * w for h, w in shapes)
    value = torch.randn(batch, total, heads, dim, generator=g, dtype=torch.float64)
    # Locations beyond [0, 1] exercise the zero padding.
    locations = torch.rand(batch, queries, heads, len(shapes), points, 2, generator=g, dtype=torch.float64) * 1.4 - 0.2
    weights = torch.rand(batch, queries, heads, len(shapes), points, generator=g, dtype=torch.float64)
    expected = loop_reference(value, shapes, locations, weights)
    got = ms_deform_attn_reference(value, torch.tensor(shapes), locations, weights)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
