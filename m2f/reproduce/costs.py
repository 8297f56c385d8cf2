"""What a row's model costs in the paper's configuration: parameters and FLOPs (Table 4's FLOPs column).

The paper measures FLOPs "on COCO instance segmentation" with detectron2's counter (fvcore), which counts
one multiply-add as one FLOP. Here a row's model is built with its config at paper scale (R50, the instance
task's 80 classes, 100 queries), random weights, and run on one 800x1088 image: COCO's most common size,
640x480, resized to a short side of 800 and padded to a multiple of 32 (the paper averages over val images,
most of which have that size). `torch.utils.flop_counter` counts the matrix products and convolutions, 2
FLOPs per multiply-add; the count is halved to the paper's convention. fvcore also counts norms and
interpolation (a fraction of a GFLOP here); neither sees the deformable attention's sampling (a custom op
for both). Post-processing is not counted.

A count depends on the config only, not on training, so it is made once per config (a few seconds on a CPU)
and cached in OUT/model_costs.json.
"""

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from m2f.config import Config
from m2f.reproduce.scales import experiment_config
from m2f.reproduce.tables import VARIANTS, Row, Table

SIZE = (800, 1088)
CACHE = "model_costs.json"


def gmacs(run: Callable[..., Any], *inputs: torch.Tensor) -> float:
    """Multiply-adds (in billions) of `run(*inputs)` in inference mode: "GFLOPs" as fvcore and the paper
    count. A model in `run` should be in eval mode with no parameter needing a gradient (the counter's module
    hooks trip over views of parameters otherwise)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        run(*inputs)
    return counter.get_total_flops() / 2e9


def paper_config(row: Row) -> Config:
    """The row's model in the paper's configuration (instance task, as the paper's FLOPs)."""
    base = experiment_config("paper", task="instance", data_dir="unused")
    return experiment_config("paper", task="instance", data_dir="unused",
                             overrides=[*VARIANTS[row.variant].resolve(base), *row.overrides])


def model_cost(cfg: Config, size: tuple[int, int] = SIZE) -> dict[str, float]:
    """{"parameters": count, "gflops": multiply-adds in billions} of `cfg`'s model predicting the final set
    for one image of `size`, as `m2f.predict` runs it (`intermediate=False`: the intermediate masks only where
    the attention masks read them)."""
    from m2f.model import build_model, count_parameters

    torch.manual_seed(0)  # random weights; the count does not depend on them
    model = build_model(cfg).eval().requires_grad_(False)
    image = torch.zeros(1, 3, *size)
    return {"parameters": count_parameters(model), "gflops": gmacs(lambda x: model(x, intermediate=False), image)}


def table_costs(table: Table, out: Path) -> dict[str, dict[str, float]]:
    """Row label -> `model_cost` of its paper-scale model, for the rows m2f trains; cached in out/CACHE,
    keyed by the model config, so rows shared by tables are counted once."""
    path = out / CACHE
    cache: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    costs, changed = {}, False
    for row in table.rows:
        if row.variant is None:
            continue
        cfg = paper_config(row)
        key = json.dumps({"model": cfg.model.__dict__, "size": SIZE, "intermediate": False}, sort_keys=True,
                         default=str)
        if key not in cache:
            print(f"  counting the FLOPs of {row.label!r} in the paper's configuration", flush=True)
            cache[key] = {"variant": row.variant, **model_cost(cfg)}
            changed = True
        costs[row.label] = cache[key]
    if changed:
        out.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
        tmp.replace(path)  # atomic: two grids over one folder never read half a file
    return costs
