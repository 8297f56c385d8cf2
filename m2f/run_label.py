"""Short names of runs, from what the run's config says it is (for legends, selectors and titles).

A run is named by how its model differs from its preset (`Config.name`): "Mask2Former" when it is
the preset's model, else the paper's words for each changed ablation field ("cross-attention",
"single scale 1/32", "50 queries", ...). Names come from the config, never from a notebook's
default label or a directory path, so a cross-attention run is called that wherever it is shown.

    >>> describe_model(get_config("tiny", ["model.attention=cross", "model.num_queries=50"]))
    'cross-attention, 50 queries'
    >>> describe_model(get_config("tiny", ["model.feature_scales=single_1/32"]))
    'Mask2Former, single scale 1/32'
"""

import json
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from m2f.config import Config, from_dict, get_config, list_presets

BASELINE = "Mask2Former"
# The paper's ablation axes first (they name the run), then anything else in the config's order.
FIRST = ("attention", "pixel_decoder", "feature_scales", "query_features", "layer_order", "num_queries")
# The paper's words for the ablation fields' values (Tables 4 and XI); other values are named field=value.
WORDS: dict[tuple[str, Any], str] = {
    ("attention", "cross"): "cross-attention", ("attention", "masked"): "masked attention",
    ("attention", "mask_pooling"): "mask pooling", ("attention", "smca"): "SMCA",
    ("pixel_decoder", "fpn"): "FPN", ("pixel_decoder", "semantic_fpn"): "Semantic FPN",
    ("pixel_decoder", "fapn"): "FaPN", ("pixel_decoder", "bifpn"): "BiFPN",
    ("pixel_decoder", "msdeformattn"): "MSDeformAttn",
    ("feature_scales", "round_robin"): "round-robin scales", ("feature_scales", "naive_multiscale"): "naive multi-scale",
    ("query_features", "zero"): "zero query features", ("query_features", "learnable"): "learnable query features",
    ("query_features", "learnable_supervised"): "supervised query features",
    ("layer_order", "self_first"): "self-attention first", ("layer_order", "cross_first"): "cross-attention first",
}


def _words(field: str, value: Any) -> str:
    if (field, value) in WORDS:
        return WORDS[(field, value)]
    if field == "feature_scales" and str(value).startswith("single_"):
        return f"single scale {str(value).removeprefix('single_')}"
    if field == "num_queries":
        return f"{value} queries"
    if field == "dec_layers":
        return f"{value} decoder layers"
    return f"{field}={value}"


def describe_model(cfg: Config) -> str:
    """The model in a few words: "Mask2Former" (the paper's masked-attention model) and how it differs
    from its preset's model, or the other attention and its changes ("cross-attention, 50 queries")."""
    if cfg.name not in list_presets():  # a config of its own: nothing to compare with, name what it ablates
        changed = {k: getattr(cfg.model, k) for k in ("attention", "num_queries") if k != "attention"
                   or cfg.model.attention != "masked"}
    else:
        preset = asdict(get_config(cfg.name).model)
        changed = {f.name: getattr(cfg.model, f.name) for f in fields(cfg.model)
                   if getattr(cfg.model, f.name) != preset[f.name]}
    order = sorted(changed, key=lambda k: FIRST.index(k) if k in FIRST else len(FIRST))
    words = [_words(k, changed[k]) for k in order]
    if "attention" not in changed:  # still the paper's masked-attention model, with these changes
        words.insert(0, BASELINE)
    return ", ".join(words)


def run_config_file(path: str | Path) -> Config | None:
    """The config a run directory (or a checkpoint file in one) wrote at its start, read without
    loading the model; None when there is none or it does not parse."""
    path = Path(path).expanduser()
    file = (path.parent if path.is_file() else path) / "config.json"
    try:
        return from_dict(json.loads(file.read_text()))
    except (OSError, ValueError, TypeError, KeyError):  # no run yet or not an m2f config: named by its path
        return None


def path_label(path: str | Path) -> str:
    """A run's directory in a few characters: its name, or its parent's for the usual RUN_DIR/run."""
    p = Path(path).expanduser()
    if p.suffix == ".pth":
        p = p.parent if p.stem == "checkpoint" else p.with_suffix("")
    return p.parent.name if p.name == "run" and p.parent.name else p.name


def short_names(runs: list[str]) -> dict[str, str]:
    """{run: short name}: `describe_model` of each run's config; runs that would share a name (or have
    no config) get their directory in brackets, so that every run is told apart."""
    described = {}
    for run in runs:
        cfg = run_config_file(run)
        described[run] = None if cfg is None else describe_model(cfg)
    names = {}
    for run, name in described.items():
        shared = name is not None and list(described.values()).count(name) > 1
        names[run] = path_label(run) if name is None else f"{name} ({path_label(run)})" if shared else name
    return names
