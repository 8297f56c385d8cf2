"""The configuration: a frozen dataclass tree with the paper's defaults, named presets and typed overrides.

Every paper ablation is a field here, not a code fork. Defaults are the official R50 COCO panoptic
values (reference/official-mask2former-facts.md §1). Modules never read the config: `m2f.build_model`
and the training loop pass its fields to typed keyword-only constructors.

    >>> cfg = get_config("r50_coco_panoptic", overrides=["model.num_queries=200"])
    >>> cfg.model.num_queries
    200
"""

import dataclasses
import json
import math
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

AttentionType = Literal["masked", "cross", "mask_pooling", "smca"]
FeatureScales = Literal["round_robin", "single_1/32", "single_1/16", "single_1/8", "naive_multiscale"]
QueryFeatures = Literal["learnable_supervised", "learnable", "zero"]
LayerOrder = Literal["cross_first", "self_first"]
PixelDecoderType = Literal["msdeformattn", "fpn", "semantic_fpn", "fapn", "bifpn"]
DeformImpl = Literal["auto", "torch", "cpu", "cuda"]
Task = Literal["panoptic", "instance", "semantic"]


@dataclass(frozen=True)
class ModelConfig:
    """The network: backbone, pixel decoder, Transformer decoder and their ablation switches."""

    num_classes: int = 133
    # Backbone: a timm model name; weights only from a local file (no download at run time).
    backbone: str = "resnet50"
    backbone_weights: str | None = None
    freeze_backbone_bn: bool = True  # the original uses FrozenBN in ResNets
    drop_path_rate: float = 0.3  # Swin only (official Swin configs use 0.3)
    # Pixel decoder (Table 4e).
    pixel_decoder: PixelDecoderType = "msdeformattn"
    conv_dim: int = 256
    mask_dim: int = 256
    encoder_layers: int = 6
    encoder_ffn_dim: int = 1024  # hard-coded in the original, DIM_FEEDFORWARD is not used there
    encoder_heads: int = 8
    encoder_points: int = 4
    deform_impl: DeformImpl = "auto"
    # Transformer decoder.
    hidden_dim: int = 256
    num_queries: int = 100
    nheads: int = 8
    dim_feedforward: int = 2048
    dec_layers: int = 9  # 3 rounds over 3 scales; the learnable queries give one more prediction set
    pre_norm: bool = False
    # Ablations (Tables 4a-4d, XI, XII).
    attention: AttentionType = "masked"
    feature_scales: FeatureScales = "round_robin"
    query_features: QueryFeatures = "learnable_supervised"
    layer_order: LayerOrder = "cross_first"
    dropout: float = 0.0
    # Input normalisation on 0-255 RGB and batch padding.
    pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    size_divisibility: int = 32


@dataclass(frozen=True)
class LossConfig:
    """Hungarian matching costs and loss weights (Section 3.3 of the paper, Table 5 switches)."""

    class_weight: float = 2.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    no_object_weight: float = 0.1
    num_points: int = 12544  # 112 * 112
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    deep_supervision: bool = True
    point_loss: bool = True  # False: BCE/dice on full upsampled masks (Table 5)
    point_matching: bool = True  # False: matching costs on full masks (Table 5)


@dataclass(frozen=True)
class DataConfig:
    """Which dataset, which task, and the augmentation (LSJ for COCO, crop for ADE20K)."""

    format: Literal["coco_panoptic", "coco_instance", "ade20k", "cityscapes"] = "coco_panoptic"
    root: str = ""
    task: Task = "panoptic"
    train_split: str = "train"
    val_split: str = "val"
    image_size: int = 1024  # LSJ crop size (ADE20K: semantic crop size)
    min_scale: float = 0.1
    max_scale: float = 2.0
    test_size: int = 800  # shortest edge at test time
    test_max_size: int = 1333
    num_workers: int = 4
    max_val_images: int = 0  # 0 = the whole split; >0 evaluates on a prefix (quick looks)


@dataclass(frozen=True)
class TrainConfig:
    """The optimiser, schedule, precision and bookkeeping of `m2f.train`."""

    max_iters: int = 368750
    batch_size: int = 16  # global batch, split over processes
    lr: float = 1e-4
    weight_decay: float = 0.05
    backbone_lr_mult: float = 0.1
    clip_grad_norm: float = 0.01  # one global L2 norm over all parameters
    lr_schedule: Literal["step", "poly"] = "step"
    lr_steps: tuple[float, ...] = (0.9, 0.95)  # fractions of max_iters where lr is multiplied by 0.1
    poly_power: float = 0.9
    amp: bool = True  # bf16 autocast on GPU (the pixel decoder stays fp32 unless the op supports bf16)
    eval_period: int = 5000
    checkpoint_period: int = 5000
    checkpoint_minutes: float = 5.0  # also checkpoint when this long has passed since the last one (0 = off)
    log_period: int = 20
    seed: int = 0


@dataclass(frozen=True)
class TestConfig:
    """Inference: which post-processings run and their thresholds."""

    panoptic_on: bool = True
    instance_on: bool = True
    semantic_on: bool = True
    object_mask_threshold: float = 0.8
    overlap_threshold: float = 0.8
    topk_per_image: int = 100


@dataclass(frozen=True)
class Config:
    """The whole experiment; printed at start and stored in every checkpoint and metrics file."""

    name: str = "r50_coco_panoptic"
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    test: TestConfig = field(default_factory=TestConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


# ----------------------------------------------------------------------------------------------------
# Presets. Each is a list of overrides on the defaults, so a preset reads like the diff from R50 COCO.

_COCO_INSTANCE = ["model.num_classes=80", "data.task=instance", "test.panoptic_on=false", "test.semantic_on=false"]
_ADE20K_SEMANTIC = [
    "model.num_classes=150",
    "data.format=ade20k",
    "data.task=semantic",
    "data.image_size=512",
    "data.test_size=512",
    "data.test_max_size=2048",
    "train.max_iters=160000",
    "train.lr_schedule=poly",
    "test.panoptic_on=false",
    "test.instance_on=false",
]
_SWIN = {
    "t": ["model.backbone=swin_tiny_patch4_window7_224"],
    "s": ["model.backbone=swin_small_patch4_window7_224"],
    "b": ["model.backbone=swin_base_patch4_window12_384"],
    "l": ["model.backbone=swin_large_patch4_window12_384", "model.num_queries=200"],
}

PRESETS: dict[str, list[str]] = {
    "r50_coco_panoptic": [],
    "r101_coco_panoptic": ["model.backbone=resnet101"],
    **{f"swin_{size}_coco_panoptic": overrides for size, overrides in _SWIN.items()},
    "r50_coco_instance": _COCO_INSTANCE,
    "r50_ade20k_semantic": _ADE20K_SEMANTIC,
    "swin_t_ade20k_semantic": [*_ADE20K_SEMANTIC, *_SWIN["t"]],
    # CPU scale: a small CNN trained from scratch (so its BatchNorm trains), narrow layers, small
    # images of the synthetic dataset, few points. The architecture and every rule are the paper's.
    # regnetx_002 is the fastest timm backbone with strides 4-32 on 2 CPU cores (3x faster than
    # resnet18 for a training step at 128 px), which buys iterations within the main job's budget.
    "tiny": [
        "model.num_classes=10",
        "model.backbone=regnetx_002",
        "model.freeze_backbone_bn=false",
        "model.conv_dim=64",
        "model.mask_dim=64",
        "model.encoder_ffn_dim=256",
        "model.encoder_heads=4",
        "model.hidden_dim=64",
        "model.nheads=4",
        "model.dim_feedforward=256",
        "model.num_queries=20",
        "loss.num_points=1024",
        "data.image_size=128",
        "data.min_scale=0.5",
        "data.max_scale=1.5",
        "data.test_size=128",
        "data.test_max_size=256",
        "data.num_workers=2",
        "train.max_iters=1500",
        "train.batch_size=8",
        "train.lr=5e-4",
        "train.backbone_lr_mult=1.0",
        "train.clip_grad_norm=1.0",
        "train.amp=false",
        "train.eval_period=500",
        "train.checkpoint_period=250",
        "train.log_period=10",
    ],
}


def list_presets() -> list[str]:
    return sorted(PRESETS)


def get_config(preset: str = "r50_coco_panoptic", overrides: Iterable[str] = ()) -> Config:
    """Builds a preset's config, then applies `key=value` overrides.

    Args:
        preset: a name from `PRESETS`.
        overrides: strings like "model.num_queries=200", "train.lr_steps=0.8,0.9", "model.backbone_weights=none".

    Raises:
        KeyError: the preset does not exist (the message lists the presets).
        ValueError: an override names an unknown field or has a value of the wrong type.
    """
    if preset not in PRESETS:
        raise KeyError(f"unknown preset {preset!r}; available presets: {', '.join(list_presets())}")
    cfg = apply_overrides(Config(name=preset), PRESETS[preset])
    return validate(apply_overrides(cfg, overrides))


def load_config_file(path: str | Path, overrides: Iterable[str] = ()) -> Config:
    """Reads a config JSON (a run's config.json, or one written by hand), then applies overrides.

    Every key must be a config field and every value must parse as the field's type, exactly as
    overrides do: a misspelled key or a string where a number belongs is an error naming the file and
    the key, not a silently ignored field. Fields the file leaves out keep the defaults.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not JSON, not an object, an unknown key, a value of the wrong type or range.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"config file {path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a JSON object of sections, not a {type(data).__name__}")
    try:
        cfg = apply_overrides(Config(), _as_overrides(data))
    except ValueError as err:
        raise ValueError(f"config file {path}: {err}") from err
    return validate(apply_overrides(cfg, overrides))


def _as_overrides(data: dict[str, Any], prefix: str = "") -> list[str]:
    """{"train": {"lr": 1e-4}} -> ["train.lr=0.0001"]: a JSON config goes through the overrides' parser."""
    items = []
    for key, value in data.items():
        if isinstance(value, dict):
            items += _as_overrides(value, f"{prefix}{key}.")
        elif isinstance(value, list):
            items.append(f"{prefix}{key}={','.join(map(str, value))}")
        else:
            items.append(f"{prefix}{key}={'none' if value is None else value}")
    return items


def validate(cfg: Config) -> Config:
    """Returns `cfg` if every field is in its range, else raises one ValueError listing each bad key.

    Types are checked when a config is built (`apply_overrides`); this checks values, so that e.g.
    `model.num_queries=0` or `train.lr=nan` fails before a model is built rather than as a traceback
    from deep inside the first iteration.
    """
    m, lo, d, t, te = cfg.model, cfg.loss, cfg.data, cfg.train, cfg.test
    rules = [
        ("model.num_classes", m.num_classes >= 1, "at least 1"),
        ("model.num_queries", m.num_queries >= 1, "at least 1"),
        ("model.hidden_dim", m.hidden_dim >= 1 and m.hidden_dim % m.nheads == 0,
         f"positive and divisible by model.nheads={m.nheads}"),
        ("model.nheads", m.nheads >= 1, "at least 1"),
        ("model.conv_dim", m.conv_dim >= 1 and m.conv_dim % m.encoder_heads == 0,
         f"positive and divisible by model.encoder_heads={m.encoder_heads}"),
        ("model.mask_dim", m.mask_dim >= 1, "at least 1"),
        ("model.encoder_layers", m.encoder_layers >= 0, "0 or more"),
        ("model.encoder_heads", m.encoder_heads >= 1, "at least 1"),
        ("model.encoder_points", m.encoder_points >= 1, "at least 1"),
        ("model.dec_layers", m.dec_layers >= 1, "at least 1"),
        ("model.dim_feedforward", m.dim_feedforward >= 1, "at least 1"),
        ("model.dropout", 0.0 <= m.dropout < 1.0, "in [0, 1)"),
        ("model.pixel_std", all(v > 0 for v in m.pixel_std), "positive"),
        ("model.size_divisibility", m.size_divisibility >= 0, "0 or more"),
        *((f"loss.{k}", math.isfinite(getattr(lo, k)) and getattr(lo, k) >= 0, "finite and 0 or more")
          for k in ("class_weight", "mask_weight", "dice_weight", "no_object_weight")),
        ("loss.num_points", lo.num_points >= 1, "at least 1"),
        ("loss.oversample_ratio", lo.oversample_ratio >= 1, "at least 1"),
        ("loss.importance_sample_ratio", 0.0 <= lo.importance_sample_ratio <= 1.0, "in [0, 1]"),
        ("data.image_size", d.image_size >= 1, "at least 1 (pixels)"),
        ("data.test_size", d.test_size >= 1, "at least 1 (pixels)"),
        ("data.test_max_size", d.test_max_size >= d.test_size, f"at least data.test_size={d.test_size}"),
        ("data.min_scale", math.isfinite(d.min_scale) and d.min_scale > 0, "positive"),
        ("data.max_scale", math.isfinite(d.max_scale) and d.max_scale >= d.min_scale,
         f"at least data.min_scale={d.min_scale}"),
        ("data.num_workers", d.num_workers >= 0, "0 or more"),
        ("data.max_val_images", d.max_val_images >= 0, "0 (all) or more"),
        ("train.max_iters", t.max_iters >= 1, "at least 1"),
        ("train.batch_size", t.batch_size >= 1, "at least 1"),
        ("train.lr", math.isfinite(t.lr) and t.lr > 0, "finite and positive"),
        ("train.weight_decay", math.isfinite(t.weight_decay) and t.weight_decay >= 0, "finite and 0 or more"),
        ("train.backbone_lr_mult", math.isfinite(t.backbone_lr_mult) and t.backbone_lr_mult >= 0, "finite and 0 or more"),
        ("train.clip_grad_norm", math.isfinite(t.clip_grad_norm) and t.clip_grad_norm > 0, "finite and positive"),
        ("train.lr_steps", all(0 < f <= 1 for f in t.lr_steps), "fractions of max_iters in (0, 1]"),
        ("train.poly_power", math.isfinite(t.poly_power) and t.poly_power >= 0, "finite and 0 or more"),
        ("train.eval_period", t.eval_period >= 0, "0 (off) or more"),
        ("train.checkpoint_period", t.checkpoint_period >= 1, "at least 1"),
        ("train.checkpoint_minutes", math.isfinite(t.checkpoint_minutes) and t.checkpoint_minutes >= 0,
         "0 (off) or more"),
        ("train.log_period", t.log_period >= 1, "at least 1"),
        ("test.object_mask_threshold", 0.0 <= te.object_mask_threshold <= 1.0, "in [0, 1]"),
        ("test.overlap_threshold", 0.0 <= te.overlap_threshold <= 1.0, "in [0, 1]"),
        ("test.topk_per_image", te.topk_per_image >= 1, "at least 1"),
    ]
    bad = [f"{key}={_value(cfg, key)!r} (must be {rule})" for key, ok, rule in rules if not ok]
    if bad:
        raise ValueError("invalid config: " + "; ".join(bad))
    return cfg


def _value(cfg: Config, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def apply_overrides(cfg: Config, overrides: Iterable[str]) -> Config:
    """Returns a copy of `cfg` with each "section.field=value" override applied and type-checked."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not of the form section.field=value")
        cfg = _replace_path(cfg, key.strip().split("."), raw.strip(), key.strip())
    return cfg


def from_dict(data: dict[str, Any]) -> Config:
    """Rebuilds a Config from `Config.to_dict()` output (checkpoints and metrics files store that)."""
    return _from_dict(Config, data)


def _from_dict(cls: type, data: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue  # an older file without a newer field keeps the default
        value = data[f.name]
        if dataclasses.is_dataclass(hints[f.name]):
            kwargs[f.name] = _from_dict(hints[f.name], value)
        else:
            kwargs[f.name] = tuple(value) if isinstance(value, list) else value
    return cls(**kwargs)


def _replace_path(node: Any, path: list[str], raw: str, full_key: str) -> Any:
    names = [f.name for f in dataclasses.fields(node)]
    if path[0] not in names:
        raise ValueError(f"unknown config key {full_key!r}: {type(node).__name__} has fields {', '.join(names)}")
    hint = typing.get_type_hints(type(node))[path[0]]
    if len(path) == 1:
        if dataclasses.is_dataclass(hint):
            raise ValueError(f"config key {full_key!r} is a section; set one of its fields instead")
        value = _parse(raw, hint, full_key)
    else:
        child = getattr(node, path[0])
        if not dataclasses.is_dataclass(child):
            raise ValueError(f"config key {full_key!r}: {path[0]!r} is a value, not a section")
        value = _replace_path(child, path[1:], raw, full_key)
    return dataclasses.replace(node, **{path[0]: value})


def _parse(raw: str, hint: Any, key: str) -> Any:
    """Parses the text of an override into the field's declared type, or raises naming the key."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        if raw not in args:
            raise ValueError(f"config key {key!r} must be one of {list(args)}, got {raw!r}")
        return raw
    if origin in (types.UnionType, typing.Union):  # only "X | None" is used
        if raw.lower() in ("none", "null", ""):
            return None
        return _parse(raw, next(a for a in args if a is not type(None)), key)
    if origin is tuple:
        parts = [p for p in raw.strip("()[] ").split(",") if p.strip()]
        item = args[0]
        if args[-1] is not Ellipsis and len(parts) != len(args):
            raise ValueError(f"config key {key!r} needs {len(args)} comma-separated values, got {raw!r}")
        return tuple(_parse(p.strip(), item, key) for p in parts)
    parsers: dict[Any, Callable[[str], Any]] = {int: int, float: float, str: str, bool: _parse_bool}
    try:
        return parsers[hint](raw)
    except (ValueError, KeyError) as err:
        raise ValueError(f"config key {key!r} expects {getattr(hint, '__name__', hint)}, got {raw!r}") from err


def _parse_bool(raw: str) -> bool:
    lowered = raw.lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise ValueError(raw)
