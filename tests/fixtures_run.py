"""Run directories for the dashboard tests: the tiny preset trained for a few steps on a tiny synthetic set.

`make_runs(root)` writes two runs over the same data, one with masked attention and one with standard
cross-attention (what the dashboards compare), each with config.json, metrics.jsonl, checkpoint.pth and
a per-layer evaluation with proposal recall (in evaluations.json) on the validation images, plus "init": the masked model
before training. A few steps of training leave every mask empty (so every query attends everywhere);
the random initial model has non-empty masks, which the masked-attention checks need.
"""

from pathlib import Path

import torch

from m2f.checkpoint import save_atomic
from m2f.config import get_config
from m2f.data.synthetic import generate
from m2f.inference import evaluate_run
from m2f.model import build_model
from m2f.train import train

ITERATIONS = 6
FAST = ["data.image_size=64", "data.test_size=64", "data.test_max_size=128", "data.num_workers=0",
        "model.num_queries=8", "loss.num_points=256", "train.eval_period=0", "train.log_period=2"]


def make_runs(root: Path, *, iterations: int = ITERATIONS, batch_size: int = 1) -> dict[str, Path]:
    """{"data", "masked", "cross", "init"}: the dataset root and the run directories."""
    data = root / "synthetic"
    generate(data, num_train=8, num_val=3, image_size=64, seed=0)
    runs = {"data": data}
    for attention in ("masked", "cross"):
        cfg = get_config("tiny", [f"data.root={data}", *FAST, f"model.attention={attention}",
                                  f"train.max_iters={iterations}", f"train.checkpoint_period={iterations}",
                                  f"train.batch_size={batch_size}"])
        runs[attention] = root / attention
        train(cfg, out_dir=runs[attention], progress=False)
        evaluate_run(runs[attention], layers="all", proposals=True)  # the run's own: every val image
        if attention == "masked":
            runs["init"] = root / "init"
            runs["init"].mkdir()
            torch.manual_seed(0)
            save_atomic({"model": build_model(cfg).state_dict(), "config": cfg.to_dict()},
                        runs["init"] / "checkpoint.pth")
    return runs
