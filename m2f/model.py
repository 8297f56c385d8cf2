"""Mask2Former: backbone -> pixel decoder -> masked-attention Transformer decoder, and its builder.

`build_model(cfg)` is the only place that reads the config; the modules take typed keyword arguments.
"""

from typing import Any

import torch
from torch import Tensor, nn

from m2f.backbone import Backbone
from m2f.bifpn import BiFPNPixelDecoder
from m2f.config import Config
from m2f.fapn import FaPNPixelDecoder
from m2f.pixel_decoder import FPNPixelDecoder, MSDeformAttnPixelDecoder
from m2f.semantic_fpn import SemanticFPNPixelDecoder
from m2f.transformer_decoder import MaskedTransformerDecoder


class Mask2Former(nn.Module):
    """The meta-architecture: normalise and pad the images, extract features, decode queries into masks.

    Args:
        backbone: returns {"res2".."res5"} feature maps.
        pixel_decoder: returns (mask_features, [1/32, 1/16, 1/8] pyramid).
        transformer_decoder: returns the prediction dict.
        pixel_mean / pixel_std: RGB normalisation on the 0-255 scale.
        size_divisibility: images are padded (bottom, right) to a multiple of this.
    """

    def __init__(self, *, backbone: nn.Module, pixel_decoder: nn.Module, transformer_decoder: nn.Module,
                 pixel_mean: tuple[float, float, float], pixel_std: tuple[float, float, float],
                 size_divisibility: int = 32):
        super().__init__()
        self.backbone = backbone
        self.pixel_decoder = pixel_decoder
        self.transformer_decoder = transformer_decoder
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(3, 1, 1), persistent=False)
        self.size_divisibility = size_divisibility

    def preprocess(self, images: Tensor | list[Tensor]) -> Tensor:
        """Normalises 0-255 RGB images and pads them with zeros (after normalisation, as detectron2's
        ImageList) to a common size that is a multiple of `size_divisibility`.

        Args:
            images: (B, 3, H, W) or a list of (3, H_i, W_i), uint8 or float on the 0-255 scale.

        Returns:
            (B, 3, H_pad, W_pad) in the model's dtype (that of `pixel_mean`).
        """
        if isinstance(images, Tensor):
            if images.dim() != 4 or images.shape[1] != 3:
                raise ValueError(f"images must be (B, 3, H, W) RGB, got shape {tuple(images.shape)}")
            images = list(images)
        if not images:
            raise ValueError("images is empty")
        d = self.size_divisibility
        height = -(-max(im.shape[-2] for im in images) // d) * d
        width = -(-max(im.shape[-1] for im in images) // d) * d
        # The model's own dtype (float32, or float64 after `.double()`), so fidelity checks can run in float64.
        dtype = self.pixel_mean.dtype
        batch = images[0].new_zeros((len(images), 3, height, width), dtype=dtype, device=self.pixel_mean.device)
        for i, im in enumerate(images):
            if im.dim() != 3 or im.shape[0] != 3:
                raise ValueError(f"image {i} must be (3, H, W) RGB, got shape {tuple(im.shape)}")
            im = im.to(self.pixel_mean.device, dtype)
            batch[i, :, : im.shape[1], : im.shape[2]] = (im - self.pixel_mean) / self.pixel_std
        return batch

    def forward(self, images: Tensor | list[Tensor], *, capture: bool = False,
                intermediate: bool = True) -> dict[str, Any]:
        """
        Args:
            images: (B, 3, H, W) or a list of (3, H_i, W_i) RGB images on the 0-255 scale (any sizes).
            capture: also return per-layer attention weights and masks (see `MaskedTransformerDecoder`).
            intermediate: also return the intermediate prediction sets; False for inference of the final
                set only (the same final set, less work; see `MaskedTransformerDecoder`).

        Returns:
            {"pred_logits": (B, Q, K+1), "pred_masks": (B, Q, H_pad/4, W_pad/4), "aux_outputs": [...],
             "padded_size": (H_pad, W_pad)} (+ "capture").
        """
        x = self.preprocess(images)
        features = self.backbone(x)
        mask_features, pyramid = self.pixel_decoder(features)
        out = self.transformer_decoder(pyramid, mask_features, capture=capture, intermediate=intermediate)
        out["padded_size"] = tuple(x.shape[-2:])
        return out


def build_model(cfg: Config) -> Mask2Former:
    """Wires the modules from `cfg.model` (the only function that reads the model config)."""
    m = cfg.model
    backbone = Backbone(name=m.backbone, weights=m.backbone_weights, freeze_bn=m.freeze_backbone_bn,
                        drop_path_rate=m.drop_path_rate)
    pixel_decoder = build_pixel_decoder(cfg, in_channels=backbone.channels)
    decoder = MaskedTransformerDecoder(
        in_channels=m.conv_dim, mask_dim=m.mask_dim, num_classes=m.num_classes, hidden_dim=m.hidden_dim,
        num_queries=m.num_queries, nheads=m.nheads, dim_feedforward=m.dim_feedforward, num_layers=m.dec_layers,
        pre_norm=m.pre_norm, dropout=m.dropout, attention=m.attention, feature_scales=m.feature_scales,
        query_features=m.query_features, layer_order=m.layer_order)
    return Mask2Former(backbone=backbone, pixel_decoder=pixel_decoder, transformer_decoder=decoder,
                       pixel_mean=m.pixel_mean, pixel_std=m.pixel_std, size_divisibility=m.size_divisibility)


def build_pixel_decoder(cfg: Config, *, in_channels: tuple[int, ...]) -> nn.Module:
    """The pixel decoder `cfg.model.pixel_decoder` names (Table 4e) on backbone features of `in_channels`."""
    m = cfg.model
    if m.pixel_decoder == "msdeformattn":
        return MSDeformAttnPixelDecoder(
            in_channels=in_channels, conv_dim=m.conv_dim, mask_dim=m.mask_dim, num_layers=m.encoder_layers,
            ffn_dim=m.encoder_ffn_dim, num_heads=m.encoder_heads, num_points=m.encoder_points, impl=m.deform_impl)
    fpn_family = {"fpn": FPNPixelDecoder, "semantic_fpn": SemanticFPNPixelDecoder, "fapn": FaPNPixelDecoder,
                  "bifpn": BiFPNPixelDecoder}
    if m.pixel_decoder not in fpn_family:
        raise ValueError(f"model.pixel_decoder must be one of {['msdeformattn', *fpn_family]}, got {m.pixel_decoder!r}")
    return fpn_family[m.pixel_decoder](in_channels=in_channels, conv_dim=m.conv_dim, mask_dim=m.mask_dim)


def count_parameters(model: nn.Module) -> int:
    """Learnable parameters plus frozen BatchNorm affine terms, which the paper's counts include."""
    frozen_bn = sum(b.numel() for n, b in model.named_buffers() if n.endswith((".weight", ".bias")))
    return sum(p.numel() for p in model.parameters()) + frozen_bn

