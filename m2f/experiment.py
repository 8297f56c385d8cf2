"""One experiment from start to finish: train a config (resumable), evaluate it, summarise it.

The notebooks in notebooks/ are thin drivers around `run_experiment`; `m2f reproduce` collects
the summaries it returns. Every step is resumable: a finished run is not trained again (its
checkpoint is at `train.max_iters`), an interrupted one continues from its last checkpoint, and the
evaluation is cached in the run's evaluation cache (RUN/evaluations.json, which the dashboards read too).

    >>> cfg = get_config("tiny", ["data.root=data/synthetic", "model.attention=cross"])
    >>> summary = run_experiment(cfg, run_dir="runs/cross")
    >>> summary["PQ"], summary["layers"]["PQ"]        # final PQ, PQ of every prediction set (0-100)
"""

import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from m2f.config import Config
from m2f.distributed import Rendezvous
from m2f.run_dir import RunDir, headline, layer_curves, log_scalars


def run_experiment(cfg: Config, *, run_dir: str | Path, layers: str = "all", proposals: bool = True,
                   nproc_per_node: int = 1, progress: bool = True) -> dict[str, Any]:
    """Trains `cfg` into `run_dir` unless that is done, evaluates the final model, and summarises.

    Args:
        cfg: the experiment (`cfg.data.root` must hold the dataset).
        run_dir: the run directory (`m2f.run_dir.RunDir`: config, metrics log, checkpoint, evaluations).
        layers: "all" evaluates every prediction set (Fig. II, Fig. 3), "final" only the last.
        proposals: also class-agnostic AR@100 of the mask proposals (Fig. 3).
        nproc_per_node: >1 trains under `torchrun` with that many processes (GPUs) on this node;
            evaluation then runs here, in one process. Under a multi-node launcher (a `Rendezvous` in the
            environment, `m2f.reproduce.slurm`) torchrun also joins the other nodes, which train with this
            node (`torchrun_command` there) while only this one, node 0, evaluates and summarises.
        progress: progress bars.

    Returns:
        The `summarize` dict of the run (metrics on a 0-100 scale, as in the paper).
    """
    run = Path(run_dir)
    rendezvous = Rendezvous.from_env()
    if nproc_per_node > 1 or (rendezvous and rendezvous.nnodes > 1):
        _torchrun(cfg, run, nproc_per_node, rendezvous)
    else:
        from m2f.train import train

        # The final checkpoint is evaluated once, below, for every prediction set (not also by train).
        train(cfg, out_dir=run, resume=True, progress=progress, final_evaluation=False)
    metrics = evaluate_run(run, layers=layers, proposals=proposals, progress=progress)
    _log_final_evaluation(RunDir.at(run), cfg, metrics)
    return summarize(run, metrics)


def _log_final_evaluation(run: RunDir, cfg: Config, metrics: dict[str, Any]) -> None:
    """Ends the run's validation curve (metrics.jsonl) at the final model, once, from that evaluation."""
    _, evaluations = run.read_metrics()
    if any(r.get("iteration") == cfg.train.max_iters for r in evaluations):
        return
    run.append_metrics({"split": "val", "iteration": cfg.train.max_iters, "seconds": 0.0, **log_scalars(metrics)})


def evaluate_run(run_dir: str | Path, *, layers: str = "all", proposals: bool = True,
                 progress: bool = True) -> dict[str, Any]:
    """Metrics of a run's checkpoint on its validation split (the run's own `data.max_val_images`),
    from the run's evaluation cache when it has them for this checkpoint (`m2f.inference.evaluate_run`).

    Raises:
        FileNotFoundError: the run has no checkpoint.
    """
    from m2f.inference import evaluate_run as evaluate_cached

    return evaluate_cached(run_dir, layers=layers, proposals=proposals, progress=progress)


def summarize(run_dir: str | Path, metrics: dict[str, Any]) -> dict[str, Any]:
    """The numbers a table needs from one run, on the paper's 0-100 scale.

    Returns:
        {"PQ", "PQ_th", "PQ_st", "AP", "mIoU", "AR@100" (those evaluated), "layers": {metric: [value per
        prediction set]} (when all sets were evaluated), "train": {"iterations", "final_loss",
        "images_per_s", "minutes", "peak_memory_mb"}, "parameters", "num_images", "run_dir"}.
    """
    run = RunDir.at(run_dir)
    out: dict[str, Any] = headline(metrics)
    if "layers" in metrics:
        out["layers"] = layer_curves(metrics["layers"])
    records, evals = run.read_metrics()
    info = run.read_run_info()
    out["train"] = {
        "iterations": records[-1]["iteration"] if records else 0,
        "final_loss": records[-1]["loss"] if records else None,
        "images_per_s": sum(r["images_per_s"] for r in records) / max(len(records), 1),
        "minutes": sum(r.get("seconds", 0.0) for r in [*records, *evals]) / 60,  # with periodic evaluation
        "peak_memory_mb": max((r.get("peak_memory_mb", 0.0) for r in records), default=0.0),
    }
    out["parameters"] = info.get("parameters")
    out["num_images"] = metrics.get("num_images")
    out["run_dir"] = str(Path(run_dir))
    return out


def torchrun_command(run: Path, *, nproc_per_node: int, rendezvous: Rendezvous | None = None) -> list[str]:
    """The torchrun command line that trains `run` from its requested config (`RunDir.REQUESTED_CONFIG`, which
    `run_experiment` writes on node 0): on this node alone, or as `rendezvous.node_rank` of a multi-node
    training. Every node runs this same command but for its node rank; the other nodes' trainers read the
    config only after the rendezvous, so after node 0 has written it."""
    nodes = rendezvous.torchrun_args() if rendezvous else []
    return [sys.executable, "-m", "torch.distributed.run", *nodes, f"--nproc_per_node={max(nproc_per_node, 1)}",
            "-m", "m2f.cli", "train", "--config", str(run / RunDir.REQUESTED_CONFIG), "--out", str(run), "--resume"]


def _torchrun(cfg: Config, run: Path, nproc_per_node: int, rendezvous: Rendezvous | None) -> None:
    """Trains under torchrun (on this node, or as node 0 of `rendezvous`); the config travels as a JSON file
    next to the run."""
    run.mkdir(parents=True, exist_ok=True)
    (run / RunDir.REQUESTED_CONFIG).write_text(cfg.to_json())
    command = torchrun_command(run, nproc_per_node=nproc_per_node, rendezvous=rendezvous)
    print("$", shlex.join(command), flush=True)
    subprocess.run(command, check=True)
