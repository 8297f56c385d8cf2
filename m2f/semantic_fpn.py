"""Semantic FPN as the pixel decoder (Table 4e "Semantic FPN"): Panoptic FPN's semantic branch on an FPN.

Kirillov et al. (CVPR 2019), Panoptic FPN, Sec. 3.2: every FPN level, from 1/32 to 1/4, goes through
upsampling stages, each a 3x3 conv + GroupNorm + ReLU + 2x bilinear upsampling, until it is at 1/4 (the
1/4 level has one conv and no upsampling); the four 1/4 maps are summed and a 1x1 conv predicts. Here the
sum gives the mask features and the FPN levels 1/32, 1/16, 1/8 are the decoder's pyramid. The branch is
as wide as the FPN by default (256 at paper scale; Panoptic FPN itself uses 128). With 256 channels its
seven 3x3 convs (one at 1/32, two at 1/16, three at 1/8, one at 1/4) cost 61 GMAC on an 800x1088 image and
replace the FPN's 3x3 mask-features conv at 1/4 (32 GMAC): +29 GMAC net, +32 as counted by
`m2f.reproduce.costs` (213 vs 181). The paper's Table 4e puts Semantic FPN 63G above FPN (258G vs 195G), so
its Semantic FPN does more than this one; the paper does not say what.
"""

import torch.nn.functional as F
from torch import Tensor, nn

from m2f.pixel_decoder import NUM_DECODER_LEVELS, ConvNorm, FPNPixelDecoder


class SemanticFPNPixelDecoder(FPNPixelDecoder):
    """MaskFormer's FPN, then the semantic branch on all its levels in place of the single mask-features conv.

    Args:
        in_channels: channels of res2..res5.
        conv_dim: FPN width (the pyramid's channels).
        mask_dim: channels of the per-pixel mask features.
        branch_dim: width of the upsampling stages; None: conv_dim.
    """

    def __init__(self, *, in_channels: tuple[int, ...], conv_dim: int, mask_dim: int, branch_dim: int | None = None):
        super().__init__(in_channels=in_channels, conv_dim=conv_dim, mask_dim=mask_dim)
        branch_dim = branch_dim or conv_dim
        # stages[i] serves the level with stride 4·2^i: max(i, 1) convs, of which the first i upsample.
        self.stages = nn.ModuleList(
            nn.ModuleList(ConvNorm(conv_dim if j == 0 else branch_dim, branch_dim, kernel_size=3, norm=True, relu=True)
                          for j in range(max(i, 1)))
            for i in range(self.num_levels)
        )
        self.mask_features = ConvNorm(branch_dim, mask_dim, kernel_size=1, norm=False, relu=False)

    def semantic_branch(self, levels: list[Tensor]) -> Tensor:
        """FPN outputs from 1/32 to 1/4 -> the sum of their upsampled stages (B, branch_dim, H/4, W/4)."""
        sizes = [x.shape[-2:] for x in reversed(levels)]  # sizes[i]: the level with stride 4·2^i
        total = None
        for i, x in enumerate(reversed(levels)):
            for j, conv in enumerate(self.stages[i]):
                x = conv(x)
                if j < i:  # up one level: 2x, to the exact size of the finer level
                    x = F.interpolate(x, size=sizes[i - j - 1], mode="bilinear", align_corners=False)
            total = x if total is None else total + x
        assert total is not None
        return total

    def forward(self, features: dict[str, Tensor]) -> tuple[Tensor, list[Tensor]]:
        levels = self.top_down(features)
        return self.mask_features(self.semantic_branch(levels)), levels[:NUM_DECODER_LEVELS]
