"""Key tables between m2f's state dict and the two external checkpoint formats.

Each table maps one m2f key to the key(s) holding the same tensor in the other format:
- the original's detectron2 state dict (`model_final_*.pkl`), always one key (its attentions are
  fused like ours);
- transformers' `Mask2FormerForUniversalSegmentation`, one key, or three (q, k, v) that are stacked
  along dim 0 into one fused m2f `in_proj_weight` / Swin `qkv`.
Names are regular expressions tried in order on the m2f key; the first match wins. A key that no rule
matches has no counterpart, which the converters report as an error.

The m2f names themselves mirror the original (pixel decoder and Transformer decoder keep the original's
module names), so most rules only swap a prefix; the backbones differ most:
- ResNet: timm `conv1/bn1/layerN.i.{convK,bnK,downsample.0/1}` vs detectron2
  `stem.conv1(.norm)/res(N+1).i.{convK(.norm),shortcut(.norm)}`.
- Swin: timm `layers_i` begins with the patch merging that ends the original's (and transformers')
  stage i-1, so `downsample` moves one stage; the per-level output LayerNorms are `out_norms.i` here,
  `norm{i}` in detectron2, `hidden_states_norms.stage{i+1}` in transformers.
"""

import re
from collections.abc import Callable

Rule = tuple[str, Callable[[re.Match[str]], tuple[str, ...]]]

# Source keys that carry no weight of the m2f model. Everything else must be used by a rule.
DETECTRON2_IGNORED = (
    r"^criterion\.empty_weight$",  # the no-object class weight of the loss, rebuilt from the config
    r"\.relative_position_index$",  # a constant index buffer of Swin attention, recomputed by timm
    r"^pixel_(mean|std)$",  # non-persistent in the original; normalisation lives in the config
)
TRANSFORMERS_IGNORED = (
    r"^criterion\.empty_weight$",
    r"\.relative_position_index$",
    r"\.num_batches_tracked$",  # BatchNorm counters of a non-frozen timm backbone; m2f freezes BN
    r"^model\.pixel_level_module\.encoder\.(swin\.)?layernorm\.",  # SwinModel's final norm; the backbone skips it
)

_HF_SWIN = "model.pixel_level_module.encoder.swin."
_HF_DECODER = "model.transformer_module.decoder."


def _one(template: str) -> Callable[[re.Match[str]], tuple[str, ...]]:
    return lambda m: (m.expand(template),)


def _qkv(prefix: str, suffix: str) -> Callable[[re.Match[str]], tuple[str, ...]]:
    """Three keys `prefix{q,k,v}suffix` (with the match's groups expanded) stacked into one fused tensor."""
    return lambda m: tuple(m.expand(f"{prefix}{p}{suffix}") for p in ("q", "k", "v"))


def _shifted(template: str, shift: int) -> Callable[[re.Match[str]], tuple[str, ...]]:
    """`template.format(group1 + shift, group2, ...)`: for stage indices that differ between formats."""
    return lambda m: (template.format(int(m[1]) + shift, *m.groups()[1:]),)


DETECTRON2_RULES: list[Rule] = [
    # ResNet (timm) <- detectron2 ResNet with FrozenBN.
    (r"^backbone\.body\.conv1\.weight$", _one("backbone.stem.conv1.weight")),
    (r"^backbone\.body\.bn1\.(\w+)$", _one(r"backbone.stem.conv1.norm.\1")),
    # timm layer1..layer4 are detectron2 res2..res5.
    (r"^backbone\.body\.layer(\d)\.(\d+)\.conv(\d)\.weight$", _shifted("backbone.res{0}.{1}.conv{2}.weight", 1)),
    (r"^backbone\.body\.layer(\d)\.(\d+)\.bn(\d)\.(\w+)$", _shifted("backbone.res{0}.{1}.conv{2}.norm.{3}", 1)),
    (r"^backbone\.body\.layer(\d)\.(\d+)\.downsample\.0\.weight$", _shifted("backbone.res{0}.{1}.shortcut.weight", 1)),
    (r"^backbone\.body\.layer(\d)\.(\d+)\.downsample\.1\.(\w+)$", _shifted("backbone.res{0}.{1}.shortcut.norm.{2}", 1)),
    # Swin (timm features_only) <- detectron2 D2SwinTransformer.
    (r"^backbone\.body\.patch_embed\.(.+)$", _one(r"backbone.patch_embed.\1")),
    (r"^backbone\.body\.layers_(\d)\.blocks\.(.+)$", _one(r"backbone.layers.\1.blocks.\2")),
    # timm's stage i starts with the patch merging that ends the original's stage i-1.
    (r"^backbone\.body\.layers_(\d)\.downsample\.(.+)$", _shifted("backbone.layers.{0}.downsample.{1}", -1)),
    (r"^backbone\.out_norms\.(\d)\.(\w+)$", _one(r"backbone.norm\1.\2")),
    # Pixel decoder and Transformer decoder: the same module names under the original's heads.
    (r"^pixel_decoder\.(.+)$", _one(r"sem_seg_head.pixel_decoder.\1")),
    (r"^transformer_decoder\.(.+)$", _one(r"sem_seg_head.predictor.\1")),
]

TRANSFORMERS_RULES: list[Rule] = [
    # timm backbones (TimmBackbone keeps timm's names under `_backbone`).
    (r"^backbone\.body\.((?:conv1|bn1|layer\d)\..+)$", _one(r"model.pixel_level_module.encoder._backbone.\1")),
    # transformers' Swin.
    (r"^backbone\.body\.patch_embed\.proj\.(\w+)$", _one(_HF_SWIN + r"embeddings.patch_embeddings.projection.\1")),
    (r"^backbone\.body\.patch_embed\.norm\.(\w+)$", _one(_HF_SWIN + r"embeddings.norm.\1")),
    (r"^backbone\.body\.layers_(\d)\.blocks\.(\d+)\.norm1\.(\w+)$",
     _one(_HF_SWIN + r"encoder.layers.\1.blocks.\2.layernorm_before.\3")),
    (r"^backbone\.body\.layers_(\d)\.blocks\.(\d+)\.norm2\.(\w+)$",
     _one(_HF_SWIN + r"encoder.layers.\1.blocks.\2.layernorm_after.\3")),
    (r"^backbone\.body\.layers_(\d)\.blocks\.(\d+)\.attn\.qkv\.(\w+)$",
     _qkv(_HF_SWIN + r"encoder.layers.\1.blocks.\2.attention.", r"_proj.\3")),
    (r"^backbone\.body\.layers_(\d)\.blocks\.(\d+)\.attn\.proj\.(\w+)$",
     _one(_HF_SWIN + r"encoder.layers.\1.blocks.\2.attention.o_proj.\3")),
    (r"^backbone\.body\.layers_(\d)\.blocks\.(\d+)\.attn\.relative_position_bias_table$",
     _one(_HF_SWIN + r"encoder.layers.\1.blocks.\2.attention.relative_position_bias.relative_position_bias_table")),
    (r"^backbone\.body\.layers_(\d)\.blocks\.(\d+)\.mlp\.(fc\d\.\w+)$",
     _one(_HF_SWIN + r"encoder.layers.\1.blocks.\2.mlp.\3")),
    (r"^backbone\.body\.layers_(\d)\.downsample\.(.+)$",
     _shifted(_HF_SWIN + "encoder.layers.{0}.downsample.{1}", -1)),
    (r"^backbone\.out_norms\.(\d)\.(\w+)$", _shifted("model.pixel_level_module.encoder.hidden_states_norms.stage{0}.{1}", 1)),
    # Pixel decoder.
    (r"^pixel_decoder\.transformer\.level_embed$", _one("model.pixel_level_module.decoder.level_embed")),
    (r"^pixel_decoder\.input_proj\.(.+)$", _one(r"model.pixel_level_module.decoder.input_projections.\1")),
    (r"^pixel_decoder\.transformer\.encoder\.layers\.(\d+)\.self_attn\.(.+)$",
     _one(r"model.pixel_level_module.decoder.encoder.layers.\1.self_attn.\2")),
    *[(rf"^pixel_decoder\.transformer\.encoder\.layers\.(\d+)\.{ours}\.(\w+)$",
       _one(rf"model.pixel_level_module.decoder.encoder.layers.\1.{theirs}.\2"))
      for ours, theirs in (("norm1", "self_attn_layer_norm"), ("norm2", "final_layer_norm"),
                           ("linear1", "fc1"), ("linear2", "fc2"))],
    (r"^pixel_decoder\.mask_features\.(\w+)$", _one(r"model.pixel_level_module.decoder.mask_projection.\1")),
    (r"^pixel_decoder\.(adapter_1|layer_1)\.weight$", _one(r"model.pixel_level_module.decoder.\1.0.weight")),
    (r"^pixel_decoder\.(adapter_1|layer_1)\.norm\.(\w+)$", _one(r"model.pixel_level_module.decoder.\1.1.\2")),
    # Transformer decoder.
    (r"^transformer_decoder\.transformer_self_attention_layers\.(\d+)\.self_attn\.in_proj_(weight|bias)$",
     _qkv(_HF_DECODER + r"layers.\1.self_attn.", r"_proj.\2")),
    (r"^transformer_decoder\.transformer_self_attention_layers\.(\d+)\.self_attn\.out_proj\.(\w+)$",
     _one(_HF_DECODER + r"layers.\1.self_attn.out_proj.\2")),
    (r"^transformer_decoder\.transformer_self_attention_layers\.(\d+)\.norm\.(\w+)$",
     _one(_HF_DECODER + r"layers.\1.self_attn_layer_norm.\2")),
    (r"^transformer_decoder\.transformer_cross_attention_layers\.(\d+)\.multihead_attn\.(.+)$",
     _one(_HF_DECODER + r"layers.\1.cross_attn.\2")),
    (r"^transformer_decoder\.transformer_cross_attention_layers\.(\d+)\.norm\.(\w+)$",
     _one(_HF_DECODER + r"layers.\1.cross_attn_layer_norm.\2")),
    *[(rf"^transformer_decoder\.transformer_ffn_layers\.(\d+)\.{ours}\.(\w+)$",
       _one(_HF_DECODER + rf"layers.\1.{theirs}.\2"))
      for ours, theirs in (("linear1", "fc1"), ("linear2", "fc2"), ("norm", "final_layer_norm"))],
    (r"^transformer_decoder\.decoder_norm\.(\w+)$", _one(_HF_DECODER + r"layernorm.\1")),
    (r"^transformer_decoder\.mask_embed\.layers\.(\d+)\.(\w+)$", _one(_HF_DECODER + r"mask_predictor.mask_embedder.\1.0.\2")),
    (r"^transformer_decoder\.query_embed\.weight$", _one("model.transformer_module.queries_embedder.weight")),
    (r"^transformer_decoder\.query_feat\.weight$", _one("model.transformer_module.queries_features.weight")),
    (r"^transformer_decoder\.level_embed\.weight$", _one("model.transformer_module.level_embed.weight")),
    (r"^transformer_decoder\.input_proj\.(\d+)\.(\w+)$", _one(r"model.transformer_module.input_projections.\1.\2")),
    (r"^transformer_decoder\.class_embed\.(\w+)$", _one(r"class_predictor.\1")),
]

# transformers < 5 (and the checkpoints on the hub) name the Swin backbone differently; transformers 5
# renames them on load. These renames bring such keys to the names the table above uses.
LEGACY_TRANSFORMERS_RENAMES = (
    (r"^(model\.pixel_level_module\.encoder\.)(embeddings|encoder)\.", r"\1swin.\2."),
    (r"\.attention\.self\.(query|key|value)\.", lambda m: f".attention.{m[1][0]}_proj."),
    (r"\.attention\.self\.relative_position_bias_table$", ".attention.relative_position_bias.relative_position_bias_table"),
    (r"\.attention\.self\.relative_position_index$", ".attention.relative_position_index"),
    (r"\.attention\.output\.dense\.", ".attention.o_proj."),
    (r"(\.blocks\.\d+)\.intermediate\.dense\.", r"\1.mlp.fc1."),
    (r"(\.blocks\.\d+)\.output\.dense\.", r"\1.mlp.fc2."),
)


def source_keys(key: str, rules: list[Rule]) -> tuple[str, ...]:
    """The source key(s) of the m2f `key` under `rules`; () if no rule matches it."""
    for pattern, target in rules:
        m = re.match(pattern, key)
        if m:
            return target(m)
    return ()


def modernize_transformers_key(key: str) -> str:
    """Renames a transformers < 5 Swin backbone key to the transformers 5 name (other keys unchanged)."""
    if not key.startswith("model.pixel_level_module.encoder."):
        return key
    for pattern, replacement in LEGACY_TRANSFORMERS_RENAMES:
        key = re.sub(pattern, replacement, key)
    return key


def is_ignored(key: str, patterns: tuple[str, ...]) -> bool:
    return any(re.search(p, key) for p in patterns)
