"""Converters from released Mask2Former weights to m2f checkpoints.

Two sources (key tables in `m2f.convert_keys`):
- the original repository's detectron2 files (`model_final_*.pkl` from its MODEL_ZOO, or a detectron2
  `.pth` training checkpoint): `from_detectron2`; `to_detectron2` writes the inverse;
- transformers' `Mask2FormerForUniversalSegmentation` (a model, a state dict with its config, or a
  directory saved with `save_pretrained` / downloaded from the hub): `from_transformers`.

Every source key is either used or listed as ignored (`convert_keys.*_IGNORED`); a missing,
unexpected or wrongly shaped key is an error that names them all. `convert_file` writes an m2f
checkpoint `{"model": state_dict, "config": cfg.to_dict()}` that `m2f.pretrained.load_pretrained`
(and `torch.load`) read back.

    >>> cfg, state = from_detectron2("model_final_94dc52.pkl")  # doctest: +SKIP
    >>> convert_file("model_final_94dc52.pkl", "r50_coco_panoptic.pth")  # doctest: +SKIP
"""

import dataclasses
import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from m2f import convert_keys
from m2f.checkpoint import load, save_atomic
from m2f.config import PRESETS, Config, get_config
from m2f.model import build_model
from m2f.safe_pickle import UnsafePickleError, load_pickle

logger = logging.getLogger(__name__)

# (embed_dim, depths, window_size) of a Swin -> the timm model with the same architecture.
SWIN_TIMM_NAMES = {
    (96, (2, 2, 6, 2), 7): "swin_tiny_patch4_window7_224",
    (96, (2, 2, 18, 2), 7): "swin_small_patch4_window7_224",
    (128, (2, 2, 18, 2), 7): "swin_base_patch4_window7_224",
    (128, (2, 2, 18, 2), 12): "swin_base_patch4_window12_384",
    (192, (2, 2, 18, 2), 7): "swin_large_patch4_window7_224",
    (192, (2, 2, 18, 2), 12): "swin_large_patch4_window12_384",
}
RESNET_TIMM_NAMES = {(3, 4, 6, 3): "resnet50", (3, 4, 23, 3): "resnet101"}  # blocks per stage
TASK_BY_NUM_CLASSES = {133: "coco_panoptic", 80: "coco_instance", 150: "ade20k_semantic"}
_MAX_LISTED = 12


# --------------------------------------------------------------------------------------------------
# detectron2 (the original repository)

def from_detectron2(source: str | Path | Mapping[str, Any], preset: str | None = None
                    ) -> tuple[Config, dict[str, Tensor]]:
    """Converts the original's detectron2 weights.

    Args:
        source: a `model_final_*.pkl` (a pickle of `{"model": {name: numpy array}, ...}`), a detectron2
            `.pth` checkpoint, or the `{name: array}` dict itself. Files are unpickled with an allow-list
            (`m2f.safe_pickle`): one that refers to anything but arrays and containers is refused, unrun.
        preset: the m2f preset the model was trained with (its backbone must match the weights). None
            picks it from the weights: the backbone from the key names and shapes, the task from the
            class count (133 COCO panoptic, 80 COCO instance, 150 ADE20K semantic). Either way
            `num_classes` and `num_queries` are read from the weights.

    Returns:
        (config, m2f state dict of float tensors).
    """
    origin = str(source) if isinstance(source, (str, Path)) else "detectron2 state dict"
    if isinstance(source, (str, Path)):
        state = _read_detectron2(Path(source))
    else:  # a state dict, or the whole checkpoint dict holding it under "model"
        state = dict(source["model"] if isinstance(source.get("model"), Mapping) else source)
    state = {k: _as_tensor(v, k, origin) for k, v in state.items()}
    num_classes = _rows(state, "sem_seg_head.predictor.class_embed.weight", origin) - 1
    num_queries = _rows(state, "sem_seg_head.predictor.query_feat.weight", origin)
    backbone = _detectron2_backbone(state, origin)
    cfg = get_config(preset) if preset is not None else get_config(_guess_preset(backbone, num_classes))
    cfg = _with_model(cfg, num_classes=num_classes, num_queries=num_queries)
    if preset is None:
        cfg = _with_model(cfg, backbone=backbone)
    return cfg, _convert(state, cfg, convert_keys.DETECTRON2_RULES, convert_keys.DETECTRON2_IGNORED,
                         f"detectron2 checkpoint {origin}")


def to_detectron2(state_dict: Mapping[str, Tensor]) -> dict[str, np.ndarray]:
    """The inverse of `from_detectron2`: an m2f state dict under the original's names, as numpy arrays
    (what the original's `model_final_*.pkl` holds under "model")."""
    out = {}
    for key, value in state_dict.items():
        names = convert_keys.source_keys(key, convert_keys.DETECTRON2_RULES)
        if not names:
            raise ValueError(f"m2f key {key!r} has no detectron2 counterpart")
        out[names[0]] = value.detach().cpu().numpy()
    return out


def _read_detectron2(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"detectron2 checkpoint {path} does not exist")
    if path.suffix == ".pkl":
        try:
            data = load_pickle(path)
        except UnsafePickleError as err:
            raise ValueError(str(err)) from err
        except Exception as err:  # random bytes make the unpickler fail in many ways
            raise ValueError(f"cannot read detectron2 checkpoint {path}: {err or type(err).__name__}; it may be "
                             f"truncated or not a pickle") from err
    else:
        data = load(path)
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        data = data["model"]
    if not isinstance(data, dict) or not any(str(k).startswith("sem_seg_head.") for k in data):
        raise ValueError(f"{path} is not a Mask2Former detectron2 checkpoint (no 'sem_seg_head.' keys)")
    return data


def _detectron2_backbone(state: dict[str, Tensor], origin: str) -> str:
    """The timm name of the backbone the detectron2 weights were trained with."""
    if "backbone.stem.conv1.weight" in state:
        blocks = tuple(_count_indices(state, rf"backbone\.res{r}\.(\d+)\.") for r in (2, 3, 4, 5))
        if blocks in RESNET_TIMM_NAMES:
            return RESNET_TIMM_NAMES[blocks]
        raise ValueError(f"{origin}: ResNet with {blocks} blocks per stage is not supported "
                         f"(supported: {sorted(RESNET_TIMM_NAMES)})")
    if "backbone.patch_embed.proj.weight" in state:
        embed_dim = state["backbone.patch_embed.proj.weight"].shape[0]
        depths = tuple(_count_indices(state, rf"backbone\.layers\.{i}\.blocks\.(\d+)\.") for i in range(4))
        relative_positions = _rows(state, "backbone.layers.0.blocks.0.attn.relative_position_bias_table", origin)
        window = (round(relative_positions**0.5) + 1) // 2  # (2w-1)^2 relative positions
        return _swin_name(embed_dim, depths, window, origin)
    raise ValueError(f"{origin}: unknown backbone (neither detectron2 ResNet 'backbone.stem.*' nor Swin "
                     "'backbone.patch_embed.*' keys)")


# --------------------------------------------------------------------------------------------------
# transformers

def from_transformers(model_or_state_dict: nn.Module | Mapping[str, Tensor],
                      config: Any = None, *, preset: str | None = None) -> tuple[Config, dict[str, Tensor]]:
    """Converts transformers' `Mask2FormerForUniversalSegmentation` weights.

    Args:
        model_or_state_dict: the model, or its state dict (transformers 5 names, or the older names the
            hub checkpoints use).
        config: its `Mask2FormerConfig`, or that config as a dict (`config.json`); taken from the
            model when a model is given.
        preset: the m2f preset supplying what the transformers config does not say (data, training,
            test settings); None picks one with the same backbone and class count.

    Returns:
        (config, m2f state dict). Supported backbones: transformers' Swin, and timm ResNets through
        `TimmBackbone` with `out_indices` (1, 2, 3, 4).
    """
    if isinstance(model_or_state_dict, nn.Module):
        state = model_or_state_dict.state_dict()
        config = model_or_state_dict.config if config is None else config
    else:
        state = dict(model_or_state_dict)
    if config is None:
        raise ValueError("from_transformers needs the Mask2FormerConfig (config=...) when given a state dict")
    cfg = config_from_transformers(config, preset=preset)
    state = {convert_keys.modernize_transformers_key(k): _as_tensor(v, k, "transformers") for k, v in state.items()}
    return cfg, _convert(state, cfg, convert_keys.TRANSFORMERS_RULES, convert_keys.TRANSFORMERS_IGNORED,
                         "transformers Mask2Former")


def config_from_transformers(config: Any, *, preset: str | None = None) -> Config:
    """The m2f config of a transformers `Mask2FormerConfig` (or its `config.json` dict)."""
    hf = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    if hf.get("model_type", "mask2former") != "mask2former":
        raise ValueError(f"not a Mask2Former config: model_type {hf.get('model_type')!r}")
    num_classes = hf.get("num_labels") or len(hf.get("id2label") or {})
    if not num_classes:
        raise ValueError("the transformers config has neither num_labels nor id2label")
    if hf.get("common_stride", 4) != 4 or tuple(hf.get("feature_strides", (4, 8, 16, 32))) != (4, 8, 16, 32):
        raise ValueError("m2f supports common_stride 4 and feature strides (4, 8, 16, 32) only")
    if hf.get("enforce_input_projection") and hf.get("feature_size", 256) == hf.get("hidden_dim", 256):
        raise ValueError("enforce_input_projection=True is not supported: m2f projects only when widths differ")
    backbone = _transformers_backbone(hf)
    cfg = get_config(preset or _guess_preset(backbone, num_classes))
    heads = hf.get("num_attention_heads", 8)
    return _with_model(
        cfg, backbone=backbone, num_classes=num_classes, num_queries=hf.get("num_queries", 100),
        hidden_dim=hf.get("hidden_dim", 256), conv_dim=hf.get("feature_size", 256),
        mask_dim=hf.get("mask_feature_size", 256), encoder_layers=hf.get("encoder_layers", 6),
        encoder_ffn_dim=hf.get("encoder_feedforward_dim", 1024), encoder_heads=heads, encoder_points=4,
        nheads=heads, dim_feedforward=hf.get("dim_feedforward", 2048),
        dec_layers=hf.get("decoder_layers", 10) - 1,  # transformers counts the learnable-query prediction
        pre_norm=hf.get("pre_norm", False), dropout=float(hf.get("dropout", 0.0)))


def _transformers_backbone(hf: dict[str, Any]) -> str:
    bb = hf.get("backbone_config") or {}
    kind = bb.get("model_type")
    if kind == "swin":
        if tuple(bb.get("out_features") or ()) != ("stage1", "stage2", "stage3", "stage4"):
            raise ValueError(f"the Swin backbone must output stage1..stage4, got {bb.get('out_features')}")
        return _swin_name(bb["embed_dim"], tuple(bb["depths"]), bb["window_size"], "transformers config")
    timm_name = bb.get("backbone") if kind == "timm_backbone" else hf.get("backbone")
    if timm_name and (kind == "timm_backbone" or hf.get("use_timm_backbone")):
        indices = tuple(bb.get("out_indices") or (hf.get("backbone_kwargs") or {}).get("out_indices") or ())
        if timm_name.startswith("resnet") and indices != (1, 2, 3, 4):
            raise ValueError(f"timm backbone {timm_name!r} must use out_indices (1, 2, 3, 4), got {indices}")
        return timm_name
    raise ValueError(f"unsupported transformers backbone {kind or hf.get('backbone')!r}: m2f converts its "
                     "Swin backbone and timm backbones (TimmBackboneConfig)")


def read_transformers_dir(path: str | Path) -> tuple[dict[str, Any], dict[str, Tensor], dict[str, Any]]:
    """Reads a directory written by `save_pretrained` (or downloaded from the hub).

    Returns:
        (config.json dict, state dict, preprocessor_config.json dict or {}).
    """
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} has no config.json; is it a transformers model directory?")
    hf_config = json.loads(config_file.read_text())
    weights = sorted(path.glob("*.safetensors"))
    if weights:
        try:
            from safetensors.torch import load_file
        except ImportError as err:
            raise ImportError(f"reading {weights[0]} needs the safetensors package (pip install safetensors)") from err
        state: dict[str, Tensor] = {}
        for file in weights:
            state.update(load_file(str(file)))
    elif (path / "pytorch_model.bin").is_file():
        state = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{path} has neither *.safetensors nor pytorch_model.bin weights")
    processor_file = path / "preprocessor_config.json"
    processor = json.loads(processor_file.read_text()) if processor_file.is_file() else {}
    return hf_config, state, processor


# --------------------------------------------------------------------------------------------------
# Files

def load_source(path: str | Path, *, preset: str | None = None) -> tuple[Config, dict[str, Tensor]]:
    """Reads and converts any supported weights file or directory (see `convert_file`)."""
    path = Path(path)
    if path.is_dir():
        hf_config, state, processor = read_transformers_dir(path)
        cfg, converted = from_transformers(state, hf_config, preset=preset)
        if "image_mean" in processor and "image_std" in processor:
            # transformers normalises 0-1 images; m2f normalises 0-255 ones.
            cfg = _with_model(cfg, pixel_mean=tuple(255.0 * v for v in processor["image_mean"]),
                              pixel_std=tuple(255.0 * v for v in processor["image_std"]))
        return cfg, converted
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    if path.suffix == ".safetensors":
        return load_source(path.parent, preset=preset)
    return from_detectron2(path, preset)


def convert_file(src: str | Path, dst: str | Path, *, preset: str | None = None) -> Path:
    """Converts released weights into an m2f checkpoint `{"model": state_dict, "config": cfg.to_dict()}`.

    Args:
        src: a detectron2 `model_final_*.pkl` / `.pth` from the original repository, or a transformers
            model directory (config.json + weights) or its `.safetensors` file.
        dst: the m2f checkpoint to write (atomically).
        preset: see `from_detectron2` / `from_transformers`.

    Returns:
        `dst` as a Path.
    """
    cfg, state = load_source(src, preset=preset)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_atomic({"model": state, "config": cfg.to_dict()}, dst)
    logger.info("converted %s -> %s (%s, %d tensors)", src, dst, cfg.model.backbone, len(state))
    return dst


# --------------------------------------------------------------------------------------------------
# Shared

def _convert(state: dict[str, Tensor], cfg: Config, rules: list[convert_keys.Rule], ignored: tuple[str, ...],
             origin: str) -> dict[str, Tensor]:
    """Gathers every m2f tensor of `cfg`'s model from `state`, stacking split q/k/v along dim 0.

    Raises:
        ValueError: listing the missing, unexpected and wrongly shaped keys.
    """
    with torch.device("meta"):  # only names and shapes are needed; no memory, no init cost
        targets = {k: v.shape for k, v in build_model(_with_model(cfg, backbone_weights=None)).state_dict().items()}
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    missing: list[str] = []
    mismatched: list[str] = []
    for key, shape in targets.items():
        names = convert_keys.source_keys(key, rules)
        absent = [n for n in names if n not in state] if names else [f"(no rule for m2f key {key})"]
        if absent:
            missing.extend(absent)
            continue
        used.update(names)
        tensor = torch.cat([state[n] for n in names]) if len(names) > 1 else state[names[0]]
        if tensor.shape != shape:
            mismatched.append(f"{'+'.join(names)} {tuple(tensor.shape)} -> {key} {tuple(shape)}")
            continue
        out[key] = tensor.to(torch.float32).contiguous() if tensor.is_floating_point() else tensor.clone()
    unexpected = [k for k in state if k not in used and not convert_keys.is_ignored(k, ignored)]
    if missing or unexpected or mismatched:
        lines = [f"cannot convert {origin} to m2f (backbone {cfg.model.backbone}, {cfg.model.num_classes} "
                 f"classes, {cfg.model.num_queries} queries):"]
        for title, keys in (("missing from the source", missing), ("unexpected in the source", unexpected),
                            ("wrong shape", mismatched)):
            if keys:
                more = f", ... ({len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else ""
                lines.append(f"  {title} ({len(keys)}): {', '.join(keys[:_MAX_LISTED])}{more}")
        lines.append("  (is the preset's backbone the one the weights were trained with?)")
        raise ValueError("\n".join(lines))
    return out


def _guess_preset(backbone: str, num_classes: int) -> str:
    """The preset with this backbone, preferring the one whose class count matches."""
    same_backbone = [p for p in PRESETS if get_config(p).model.backbone == backbone]
    task = TASK_BY_NUM_CLASSES.get(num_classes)
    for name in same_backbone:
        if task and name.endswith(task):
            return name
    return same_backbone[0] if same_backbone else "r50_coco_panoptic"


def _swin_name(embed_dim: int, depths: tuple[int, ...], window: int, origin: str) -> str:
    key = (int(embed_dim), tuple(int(d) for d in depths), int(window))
    if key not in SWIN_TIMM_NAMES:
        raise ValueError(f"{origin}: no timm Swin with embed_dim {key[0]}, depths {key[1]}, window {key[2]} "
                         f"(supported: {sorted(SWIN_TIMM_NAMES)})")
    return SWIN_TIMM_NAMES[key]


def _with_model(cfg: Config, **fields: Any) -> Config:
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **fields))


def _as_tensor(value: Any, key: str, origin: str) -> Tensor:
    if isinstance(value, Tensor):
        return value.detach().cpu()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    raise ValueError(f"{origin}: entry {key!r} is a {type(value).__name__}, not an array")


def _rows(state: dict[str, Tensor], key: str, origin: str) -> int:
    if key not in state:
        raise ValueError(f"{origin}: no {key!r}; is this a Mask2Former checkpoint?")
    return int(state[key].shape[0])


def _count_indices(state: Mapping[str, Any], pattern: str) -> int:
    return len({m[1] for k in state if (m := re.match(pattern, k))})
