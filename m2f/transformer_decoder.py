"""The masked-attention Transformer decoder (Section 3.2 of the paper), with every ablation as an argument.

Each of the `num_layers` layers runs (masked) cross-attention, self-attention and an FFN on the Q
query features, attending to one level of the pixel decoder's pyramid (round robin 1/32 -> 1/16 -> 1/8).
Shared heads turn the queries into class logits and mask logits after every layer and once on the
initial query features, which gives num_layers + 1 prediction sets. Each prediction's mask, resized to
the next layer's level and thresholded at 0.5, is that layer's attention mask (detached).

Module names follow the original's state-dict keys (`transformer_cross_attention_layers.i.multihead_attn`,
`query_feat`, `query_embed`, `level_embed`, `class_embed`, `mask_embed.layers.i`, ...).
"""

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from m2f.position_encoding import sine_position_encoding
from m2f.smca import SpatialPrior, level_coordinates

ATTENTION_TYPES = ("masked", "cross", "mask_pooling", "smca")
LEVEL_SCHEDULES = {
    "round_robin": None,  # layer i uses level i mod 3
    "single_1/32": (0,),
    "single_1/16": (1,),
    "single_1/8": (2,),
    "naive_multiscale": (0, 1, 2),  # every layer attends to all three levels concatenated
}


class CrossAttentionLayer(nn.Module):
    """Masked (or standard) cross-attention from queries to one level's pixels, residual and LayerNorm.

    With `spatial_prior` it is SMCA (Table 4c): the logits get each query's Gaussian-like log-weight map
    (`m2f.smca`) added before the softmax.
    """

    def __init__(self, *, dim: int, nheads: int, dropout: float, pre_norm: bool, spatial_prior: bool = False):
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(dim, nheads, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.pre_norm = pre_norm
        # Only SMCA has the submodule, so the other variants keep the original's state-dict keys.
        self.spatial_prior = SpatialPrior(dim=dim, nheads=nheads) if spatial_prior else None

    def forward(self, tgt: Tensor, memory: Tensor, *, blocked: Tensor | None, pos: Tensor, query_pos: Tensor,
                need_weights: bool, coords: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """
        Args:
            tgt: (B, Q, C) query features; memory, pos: (B, S, C) pixel features and their encoding.
            blocked: (B, Q, S) bool, True where a query may not attend; None for standard cross-attention.
            query_pos: (B, Q, C) the learnable positional query embedding.
            need_weights: also return the per-head attention weights (B, M, Q, S).
            coords: (S, 2) normalised (x, y) of the memory's pixels; needed by the spatial prior only.
        """
        q = self.norm(tgt) if self.pre_norm else tgt
        heads = self.multihead_attn.num_heads
        attn_mask = None
        if blocked is not None:
            attn_mask = blocked[:, None].expand(-1, heads, -1, -1)  # (B, M, Q, S)
        if self.spatial_prior is not None:
            if coords is None:
                raise ValueError("the spatial prior (SMCA) needs the coordinates of the attended pixels")
            bias = self.spatial_prior(q + query_pos, coords)  # (B, M, Q, S)
            attn_mask = bias if attn_mask is None else bias.masked_fill(attn_mask, float("-inf"))
            attn_mask = attn_mask.to(_attention_dtype(q))
        if attn_mask is not None:
            attn_mask = attn_mask.flatten(0, 1)  # (B*M, Q, S), the layout nn.MultiheadAttention takes
        out, weights = self.multihead_attn(q + query_pos, memory + pos, memory, attn_mask=attn_mask,
                                           need_weights=need_weights, average_attn_weights=False)
        tgt = tgt + self.dropout(out)
        return (tgt if self.pre_norm else self.norm(tgt)), weights


class MaskPoolingLayer(nn.Module):
    """K-Net's mask pooling in place of cross-attention (Table 4c): each query averages the (projected)
    pixel features inside its predicted binary mask. Queries with empty masks average the whole map."""

    def __init__(self, *, dim: int, dropout: float, pre_norm: bool):
        super().__init__()
        self.value_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.pre_norm = pre_norm

    def forward(self, tgt: Tensor, memory: Tensor, *, blocked: Tensor | None, pos: Tensor, query_pos: Tensor,
                need_weights: bool, coords: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Same interface as `CrossAttentionLayer`; `pos`, `query_pos` and `coords` are unused by pooling."""
        if blocked is None:
            raise ValueError("mask pooling needs the predicted masks (blocked must not be None)")
        weights = (~blocked).to(memory.dtype)
        weights = weights / weights.sum(-1, keepdim=True)  # never 0: empty masks were reset to all-True
        # Pooling reads only the pixels, so pre-norm and post-norm differ only in where the norm sits.
        tgt = tgt + self.dropout(self.out_proj(torch.bmm(weights, self.value_proj(memory))))
        return (tgt if self.pre_norm else self.norm(tgt)), (weights[:, None] if need_weights else None)


class SelfAttentionLayer(nn.Module):
    """Self-attention among the queries, residual and LayerNorm."""

    def __init__(self, *, dim: int, nheads: int, dropout: float, pre_norm: bool):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, nheads, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.pre_norm = pre_norm

    def forward(self, tgt: Tensor, query_pos: Tensor) -> Tensor:
        """tgt, query_pos (B, Q, C) -> (B, Q, C)."""
        x = self.norm(tgt) if self.pre_norm else tgt
        qk = x + query_pos
        tgt = tgt + self.dropout(self.self_attn(qk, qk, x, need_weights=False)[0])
        return tgt if self.pre_norm else self.norm(tgt)


class FFNLayer(nn.Module):
    """Two-layer ReLU MLP, residual and LayerNorm."""

    def __init__(self, *, dim: int, ffn_dim: int, dropout: float, pre_norm: bool):
        super().__init__()
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.pre_norm = pre_norm

    def forward(self, tgt: Tensor) -> Tensor:
        x = self.norm(tgt) if self.pre_norm else tgt
        tgt = tgt + self.dropout(self.linear2(self.dropout(F.relu_(self.linear1(x)))))  # in place: a fresh output
        return tgt if self.pre_norm else self.norm(tgt)


class MLP(nn.Module):
    """The mask embedding head: `num_layers` Linear layers with ReLU between them."""

    def __init__(self, *, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, [*dims[1:], out_dim]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class MaskedTransformerDecoder(nn.Module):
    """Mask2Former's Transformer decoder.

    Args:
        in_channels: channels of the pixel decoder's pyramid.
        mask_dim: channels of the per-pixel mask features.
        num_classes: K; the classifier has K+1 outputs, the last being "no object".
        hidden_dim / num_queries / nheads / dim_feedforward: decoder width C, Q, M, FFN width.
        num_layers: decoder layers (9 = 3 rounds over 3 scales).
        pre_norm: pre-LayerNorm instead of the default post-norm.
        dropout: in attention and FFN (0 in Mask2Former; 0.1 in MaskFormer, Table 4b).
        attention: "masked" (Mask2Former), "cross" (standard cross-attention), "mask_pooling" (K-Net),
            "smca" (standard cross-attention with SMCA's spatial prior, `m2f.smca`) (Table 4c).
        feature_scales: a key of `LEVEL_SCHEDULES` (Table 4d).
        query_features: "learnable_supervised" / "learnable" (nn.Embedding) or "zero" (DETR) initial
            query features (Table XI b). Whether prediction #0 is supervised is the loss's business.
        layer_order: "cross_first" (masked attention, self-attention, FFN) or "self_first" (Table 4b).
        num_levels: levels in the pyramid (3).
    """

    def __init__(self, *, in_channels: int, mask_dim: int, num_classes: int, hidden_dim: int = 256,
                 num_queries: int = 100, nheads: int = 8, dim_feedforward: int = 2048, num_layers: int = 9,
                 pre_norm: bool = False, dropout: float = 0.0, attention: str = "masked",
                 feature_scales: str = "round_robin", query_features: str = "learnable_supervised",
                 layer_order: str = "cross_first", num_levels: int = 3):
        super().__init__()
        _check_choice("attention", attention, ATTENTION_TYPES)
        _check_choice("feature_scales", feature_scales, tuple(LEVEL_SCHEDULES))
        _check_choice("query_features", query_features, ("learnable_supervised", "learnable", "zero"))
        _check_choice("layer_order", layer_order, ("cross_first", "self_first"))
        self.attention, self.layer_order, self.num_layers = attention, layer_order, num_layers
        schedule = LEVEL_SCHEDULES[feature_scales]
        self.layer_levels = [schedule or (i % num_levels,) for i in range(num_layers)]

        def cross_layer() -> nn.Module:
            if attention == "mask_pooling":
                return MaskPoolingLayer(dim=hidden_dim, dropout=dropout, pre_norm=pre_norm)
            return CrossAttentionLayer(dim=hidden_dim, nheads=nheads, dropout=dropout, pre_norm=pre_norm,
                                       spatial_prior=attention == "smca")

        self.transformer_cross_attention_layers = nn.ModuleList(cross_layer() for _ in range(num_layers))
        self.transformer_self_attention_layers = nn.ModuleList(
            SelfAttentionLayer(dim=hidden_dim, nheads=nheads, dropout=dropout, pre_norm=pre_norm)
            for _ in range(num_layers))
        self.transformer_ffn_layers = nn.ModuleList(
            FFNLayer(dim=hidden_dim, ffn_dim=dim_feedforward, dropout=dropout, pre_norm=pre_norm)
            for _ in range(num_layers))
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.query_feat = nn.Embedding(num_queries, hidden_dim) if query_features != "zero" else None
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.level_embed = nn.Embedding(num_levels, hidden_dim)
        # The original projects only when widths differ (ENFORCE_INPUT_PROJ is False).
        self.input_proj = nn.ModuleList(
            nn.Conv2d(in_channels, hidden_dim, kernel_size=1) if in_channels != hidden_dim else nn.Identity()
            for _ in range(num_levels))
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(in_dim=hidden_dim, hidden_dim=hidden_dim, out_dim=mask_dim, num_layers=3)
        self.num_queries, self.hidden_dim = num_queries, hidden_dim
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # xavier_uniform on every matrix of the attention and FFN layers, as the original.
        for layers in (self.transformer_cross_attention_layers, self.transformer_self_attention_layers,
                       self.transformer_ffn_layers):
            for p in layers.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
        for proj in self.input_proj:
            if isinstance(proj, nn.Conv2d):
                nn.init.kaiming_uniform_(proj.weight, a=1)
                nn.init.zeros_(proj.bias)

    def forward(self, pyramid: list[Tensor], mask_features: Tensor, *, capture: bool = False,
                intermediate: bool = True) -> dict[str, Any]:
        """
        Args:
            pyramid: [(B, C, H/32, W/32), (B, C, H/16, W/16), (B, C, H/8, W/8)] from the pixel decoder.
            mask_features: (B, mask_dim, H/4, W/4) per-pixel embeddings.
            capture: also return, per decoder layer, what it attended to (see Returns).
            intermediate: also return the num_layers intermediate prediction sets ("aux_outputs": the losses
                and the per-layer evaluation need them). False (inference of the final set) computes an
                intermediate mask only at the pixels that the next layer's attention mask reads, and not at
                all for standard cross-attention; the final set is bit-identical to that of True
                (`sampled_attention_mask`).

        Returns:
            {"pred_logits": (B, Q, K+1), "pred_masks": (B, Q, H/4, W/4), "aux_outputs": [num_layers dicts
            with the same keys, prediction #0 (before any layer) first; empty without `intermediate`]}, and
            with `capture` also
            "capture": one dict per layer with "attn_weights" (B, M, Q, S) (M = 1 for mask pooling),
            "attend_mask" (B, Q, S) bool (True = the query may attend there; None for standard
            cross-attention and SMCA, whose prior is in the weights), "levels" (pyramid indices) and "level_shapes" [(H_l, W_l)], S = sum H_l W_l.
        """
        batch = mask_features.shape[0]
        srcs, pos, shapes = [], [], []
        for lvl, x in enumerate(pyramid):
            shapes.append(tuple(x.shape[-2:]))
            pe = sine_position_encoding(*shapes[-1], num_feats=self.hidden_dim // 2, device=x.device,
                                        dtype=x.dtype)
            pos.append(pe.flatten(1).T[None].expand(batch, -1, -1))  # (B, HW, C)
            srcs.append(self.input_proj[lvl](x).flatten(2).transpose(1, 2) + self.level_embed.weight[lvl])

        query_pos = self.query_embed.weight[None].expand(batch, -1, -1)
        if self.query_feat is None:
            tgt = torch.zeros_like(query_pos)
        else:
            tgt = self.query_feat.weight[None].expand(batch, -1, -1)

        logits, masks = [], []
        captured: list[dict[str, Any]] = []
        for i in range(self.num_layers + 1):
            # Heads on the current queries; the mask is resized to the level(s) the next layer attends.
            levels = self.layer_levels[i] if i < self.num_layers else ()
            if intermediate or i == self.num_layers:
                cls, mask, blocked = self._prediction_heads(tgt, mask_features, [shapes[lv] for lv in levels])
                logits.append(cls)
                masks.append(mask)
            elif self.attention in ("masked", "mask_pooling"):
                blocked = sampled_attention_mask(self.mask_embed(self.decoder_norm(tgt)), mask_features,
                                                 [shapes[lv] for lv in levels])
            if i == self.num_layers:
                break
            memory = torch.cat([srcs[lv] for lv in levels], 1)
            memory_pos = torch.cat([pos[lv] for lv in levels], 1)
            coords = None
            if self.attention in ("cross", "smca"):
                blocked = None
            if self.attention == "smca":
                coords = level_coordinates([shapes[lv] for lv in levels], device=memory.device, dtype=memory.dtype)
            tgt, weights = self._layer(i, tgt, memory, memory_pos, query_pos, blocked, coords, capture)
            if capture:
                captured.append({
                    "attn_weights": weights,
                    "attend_mask": None if blocked is None else ~blocked,
                    "levels": levels,
                    "level_shapes": [shapes[lv] for lv in levels],
                })

        out: dict[str, Any] = {
            "pred_logits": logits[-1],
            "pred_masks": masks[-1],
            "aux_outputs": [{"pred_logits": c, "pred_masks": m} for c, m in zip(logits[:-1], masks[:-1])],
        }
        if capture:
            out["capture"] = captured
        return out

    def _layer(self, i: int, tgt: Tensor, memory: Tensor, memory_pos: Tensor, query_pos: Tensor,
               blocked: Tensor | None, coords: Tensor | None, capture: bool) -> tuple[Tensor, Tensor | None]:
        cross = self.transformer_cross_attention_layers[i]
        self_attn = self.transformer_self_attention_layers[i]
        weights = None
        if self.layer_order == "cross_first":
            tgt, weights = cross(tgt, memory, blocked=blocked, pos=memory_pos, query_pos=query_pos,
                                 need_weights=capture, coords=coords)
            tgt = self_attn(tgt, query_pos)
        else:
            tgt = self_attn(tgt, query_pos)
            tgt, weights = cross(tgt, memory, blocked=blocked, pos=memory_pos, query_pos=query_pos,
                                 need_weights=capture, coords=coords)
        return self.transformer_ffn_layers[i](tgt), weights

    def _prediction_heads(self, tgt: Tensor, mask_features: Tensor, target_shapes: list[tuple[int, int]]
                          ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Class logits (B, Q, K+1), mask logits (B, Q, H/4, W/4), and the attention mask for
        `target_shapes`: blocked (B, Q, S) bool, True where sigmoid(mask) < 0.5 (None if no shapes)."""
        x = self.decoder_norm(tgt)
        cls = self.class_embed(x)
        mask = torch.einsum("bqc,bchw->bqhw", self.mask_embed(x), mask_features)
        if not target_shapes:
            return cls, mask, None
        return cls, mask, attention_mask(mask, target_shapes)


def attention_mask(mask_logits: Tensor, target_shapes: list[tuple[int, int]]) -> Tensor:
    """The masked-attention rule (Eq. 2-3 of the paper): which pixels of the next layer's level(s) each query
    may NOT attend to.

    Args:
        mask_logits: (B, Q, H/4, W/4) a prediction set's mask logits.
        target_shapes: [(H_l, W_l)] of the level(s) the next layer attends to, concatenated in this order.

    Returns:
        blocked: (B, Q, S) bool, True where sigmoid(bilinearly resized logit) < 0.5, S = sum H_l W_l; a query
        whose mask is empty everywhere is blocked nowhere (the original's rule, not in the paper; otherwise
        its softmax would have no support). Detached: the mask is a hard decision.
    """
    with torch.no_grad():
        return _blocked([F.interpolate(mask_logits, size=s, mode="bilinear", align_corners=False).flatten(2)
                         for s in target_shapes])


def sampled_attention_mask(mask_embed: Tensor, mask_features: Tensor, target_shapes: list[tuple[int, int]]) -> Tensor:
    """`attention_mask(einsum("bqc,bchw->bqhw", mask_embed, mask_features), target_shapes)`, bit for bit,
    with the mask logits computed only at the pixels that the bilinear resizing reads.

    Resizing by an even integer factor f > 2 (align_corners=False) reads, per output row (column) i, the two
    input rows f*i + f/2 - 1 and f*i + f/2 with weights 1/2. Those rows and columns of the mask features give
    a (2h, 2w) map whose own resizing to (h, w) reads them with the same weights: the same arithmetic on the
    same logits, 16x fewer of them at 1/32 and 4x fewer at 1/16 (1/8, f = 2, reads every pixel). Any other
    size ratio falls back to all pixels. `tests/test_transformer_decoder.py` checks the bit-identity.

    Args:
        mask_embed: (B, Q, mask_dim) the queries' mask embeddings.
        mask_features: (B, mask_dim, H/4, W/4).
        target_shapes: as in `attention_mask`.
    """
    with torch.no_grad():
        resized = []
        for h, w in target_shapes:
            features = _bilinear_taps(_bilinear_taps(mask_features, 2, h), 3, w)
            logits = torch.einsum("bqc,bchw->bqhw", mask_embed, features)
            resized.append(F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False).flatten(2))
        return _blocked(resized)


def _bilinear_taps(x: Tensor, dim: int, out: int) -> Tensor:
    """The rows (dim 2) or columns (dim 3) of x that resizing them to `out` reads, when their count is f * `out`
    with f even and > 2: rows f*i + f/2 - 1 and f*i + f/2 for every i, in order (strided views, no gather); x
    itself otherwise (every row may be read)."""
    f = x.shape[dim] // out
    if f * out != x.shape[dim] or f % 2 or f == 2:
        return x
    return x.unflatten(dim, (out, f)).narrow(dim + 1, f // 2 - 1, 2).flatten(dim, dim + 1)


def _blocked(resized: list[Tensor]) -> Tensor:
    """The masked-attention rule on the resized logits [(B, Q, S_l)]: blocked (B, Q, S) where sigmoid < 0.5,
    except for a query blocked everywhere, which is blocked nowhere."""
    blocked = torch.cat(resized, -1).sigmoid() < 0.5
    # An AND, not an indexed assignment: that exports to ONNX as a Where on bool tensors, which
    # onnxruntime has no kernel for.
    return blocked & ~blocked.all(-1, keepdim=True)


def _attention_dtype(query: Tensor) -> torch.dtype:
    """The dtype nn.MultiheadAttention computes its logits in: under autocast its projections run in the
    autocast dtype, and a float attention bias must match it."""
    device = query.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else query.dtype


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
