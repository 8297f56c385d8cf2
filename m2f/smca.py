"""SMCA's spatial prior (Table 4c "SMCA"): a Gaussian-like log-weight map around a centre each query predicts.

Spatially Modulated Co-Attention (Gao et al., ICCV 2021, Eq. 3-4) lets every query predict the centre of
its object and, per attention head, a width and a height; the cross-attention logits get the log of a
Gaussian-like weight map around that centre added before the softmax:

    softmax(q·kᵀ/√D + log G),   log G(x, y) = -(x - c_x)² / (β s_x²) - (y - c_y)² / (β s_y²)

We take β = 2, so that (s_x, s_y) are the standard deviations of the Gaussian, and measure x, y, c and s
in units of the attended level's width and height (pixel centres at ((j+0.5)/W_l, (i+0.5)/H_l)), so a
prior means the same region on every level of the round robin. As in SMCA the centre is shared by the
heads and the scales are per head ("multi-head" SMCA); both are predicted from the attention's query
input (query features + positional query embedding) by one linear layer per decoder layer, the centre
through a sigmoid (in the image) and the scales through a sigmoid (at most the whole image; the floor
keeps log G finite). Mask2Former's Table 4c uses it in place of masked attention: the prior is soft and
dense, the mask is hard and follows the predicted shape.
"""

import math

import torch
from torch import Tensor, nn

from m2f.deformable_encoder import DeformableEncoder

BETA = 2.0  # the bandwidth β of Eq. 3; 2 makes s a standard deviation
MIN_SCALE = 1e-3  # in image units; keeps log G finite for any head output
INITIAL_SCALE = 0.25  # a quarter of the image: a broad prior at the start, which training sharpens


def spatial_log_weights(coords: Tensor, centre: Tensor, scale: Tensor) -> Tensor:
    """log G of Eq. 3: the additive attention bias of every head of every query at every position.

    Args:
        coords: (S, 2) the (x, y) of each attended position, normalised to [0, 1].
        centre: (B, Q, 2) each query's (c_x, c_y), same units.
        scale: (B, Q, M, 2) each head's (s_x, s_y), same units, > 0.

    Returns:
        (B, M, Q, S) -Σ_{x,y} (coord - c)² / (β s²); 0 at the centre, more negative away from it.
    """
    offset = coords[None, None, None] - centre[:, :, None, None]  # (B, Q, 1, S, 2)
    log_weights = -(offset.square() / (BETA * scale[:, :, :, None].square())).sum(-1)  # (B, Q, M, S)
    return log_weights.transpose(1, 2)


class SpatialPrior(nn.Module):
    """Predicts each query's centre and per-head scales and returns their `spatial_log_weights`.

    Args:
        dim: query width C.
        nheads: M, one (s_x, s_y) per head.
    """

    def __init__(self, *, dim: int, nheads: int):
        super().__init__()
        self.nheads = nheads
        self.centre = nn.Linear(dim, 2)
        self.scale = nn.Linear(dim, 2 * nheads)
        # Centres keep the default init, so the learnable query embeddings start at different places;
        # scales start equal and broad so the first layers still see most of the image.
        nn.init.zeros_(self.scale.weight)
        nn.init.constant_(self.scale.bias, math.log(INITIAL_SCALE / (1 - INITIAL_SCALE)))

    def centre_and_scale(self, query: Tensor) -> tuple[Tensor, Tensor]:
        """query (B, Q, C) -> centre (B, Q, 2) in (0, 1), scale (B, Q, M, 2) in [MIN_SCALE, 1)."""
        centre = self.centre(query).sigmoid()
        scale = self.scale(query).sigmoid().clamp_min(MIN_SCALE)
        return centre, scale.unflatten(-1, (self.nheads, 2))

    def forward(self, query: Tensor, coords: Tensor) -> Tensor:
        """query (B, Q, C), coords (S, 2) -> the attention bias (B, M, Q, S), in float32 or float64."""
        centre, scale = self.centre_and_scale(query)
        return spatial_log_weights(coords.to(centre.dtype), centre, scale)


def level_coordinates(shapes: list[tuple[int, int]], *, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(S, 2) the normalised (x, y) pixel centres of the levels of `shapes`, flattened level after level
    (the order in which the decoder concatenates the pixels it attends to): the deformable encoder's
    reference points, which are the same pixel centres."""
    spatial_shapes = torch.tensor(shapes, dtype=torch.long).view(-1, 2)
    return DeformableEncoder.reference_points(spatial_shapes, 1, device, dtype)[0, :, 0]
