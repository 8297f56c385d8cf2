"""m2f: a compact, readable Mask2Former research workbench.

The public API, for notebooks and scripts::

    import m2f

    cfg = m2f.get_config("tiny", ["train.max_iters=60"])    # a preset plus "section.field=value" overrides
    model = m2f.build_model(cfg)                             # randomly initialised Mask2Former
    result = m2f.train(cfg, out_dir="runs/tiny")             # the training loop; writes a run directory
    metrics = m2f.evaluate(model, cfg)                       # PQ / AP / mIoU on cfg.data's val split
    model = m2f.load_pretrained("model_final_94dc52.pkl")    # released weights, converted in memory
    results = m2f.predict(model, ["photo.jpg"], task="panoptic")   # typed results: segments with names, scores, masks

`python -m m2f ...` is the `m2f` command line.

Shape legend, used in docstrings and comments everywhere (one letter, one meaning):

    B      batch (images)
    Q      object queries of the transformer decoder
    K      classes (the class logits have K+1 entries: index K is "no object")
    G      ground-truth segments of one image
    C      channels (hidden dimension)
    M      attention heads
    D      channels per head, C/M
    L      feature levels
    H, W   input image height and width (H_pad, W_pad after padding to a multiple of 32)
    h, w   mask-logit resolution (H_pad/4, W_pad/4)
    H_l, W_l  height and width of level l
    S      Σ_l H_l·W_l, all positions of the levels that are attended to, flattened level after level
    Lq     queries of multi-scale deformable attention (every pixel of every level: Lq = S in the encoder)
    P      sampling points per head and level in deformable attention
    N      points sampled from a mask for the matcher and the mask losses
    T      prediction sets scored by the loss (the final one and the supervised auxiliary ones, up to 10)
    n      matched (query, segment) pairs
"""

import importlib
import sys
import types
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Name -> module of each public function. They are imported on first use, so `import m2f` (and with it
# `m2f --help`) stays instant instead of loading torch, timm and scipy.
_API = {
    "get_config": "m2f.config",
    "build_model": "m2f.model",
    "train": "m2f.train",
    "evaluate": "m2f.inference",
    "predict": "m2f.predict",
    "load_pretrained": "m2f.pretrained",
}
__all__ = list(_API)

if TYPE_CHECKING:  # for type checkers and IDEs, which do not run __getattr__ ("x as x": a re-export)
    from m2f.config import get_config as get_config
    from m2f.inference import evaluate as evaluate
    from m2f.model import build_model as build_model
    from m2f.predict import predict as predict
    from m2f.pretrained import load_pretrained as load_pretrained
    from m2f.train import train as train


def __getattr__(name: str) -> object:
    if name not in _API:
        raise AttributeError(f"module 'm2f' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})


class _Package(types.ModuleType):
    """The `m2f` module, keeping `m2f.train` the function: importing the submodule m2f/train.py makes the
    import system set the attribute `m2f.train` to that module, which would hide the function."""

    def __setattr__(self, name: str, value: object) -> None:
        if name in _API and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
