"""`m2f.train(cfg)`: the whole training loop in one readable function, for 1 CPU process or many GPUs.

What it does, in order: start torch.distributed if launched by torchrun; seed; build data, model,
matcher + criterion, AdamW and the schedule; resume from RUN/checkpoint.pth if asked; then iterate:
forward, Hungarian matching + point-sampled losses on all prediction sets, backward, full-model gradient
clipping, optimizer and schedule step; log to a progress bar and RUN/metrics.jsonl; evaluate and
checkpoint (atomically) periodically. Everything the run needs to be understood later (config, git
revision, parameter count, skipped images) is written into the run directory.
"""

import json
import logging
import math
import subprocess
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from m2f import distributed as dist
from m2f.checkpoint import load, rng_state, save_atomic, set_rng_state
from m2f.config import Config, from_dict
from m2f.criterion import build_criterion
from m2f.data.loader import build_train_loader, pad_targets
from m2f.memory import PeakMemory
from m2f.model import build_model, count_parameters
from m2f.optim import build_optimizer, build_scheduler, lr_factor
from m2f.run_dir import RunDir

logger = logging.getLogger(__name__)

CHECKPOINT = RunDir.CHECKPOINT


def train(cfg: Config, *, out_dir: str | Path, resume: bool = False, progress: bool = True,
          evaluate_fn: Any = None) -> dict[str, Any]:
    """Trains `cfg` into `out_dir`, returning {"iterations", "final_loss", "eval": last metrics, "run_dir"}.

    Args:
        cfg: the experiment; `cfg.data.root` must point at a dataset in `cfg.data.format`.
        out_dir: the run directory (created); holds config.json, metrics.jsonl, checkpoint.pth.
        resume: continue from out_dir/checkpoint.pth (its config must equal `cfg` up to `train.max_iters`).
        progress: show a progress bar (rank 0 only).
        evaluate_fn: `fn(model, cfg) -> dict` run every `train.eval_period` iterations and at the end;
            defaults to `m2f.inference.evaluate` on the validation split.
    """
    device = dist.init()
    run = Path(out_dir)
    if dist.is_main():
        run.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    torch.manual_seed(cfg.train.seed + dist.rank())

    model = build_model(cfg).to(device)
    criterion = build_criterion(cfg)
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train)
    start_iter = 0
    if resume and (run / CHECKPOINT).is_file():
        start_iter = _restore(run / CHECKPOINT, cfg, model, optimizer, scheduler)
    elif resume:
        logger.warning("--resume: no %s in %s, starting from scratch", CHECKPOINT, run)

    if dist.is_main():  # a fresh run starts a fresh log; a resumed one drops what came after its checkpoint
        RunDir.at(run).start_metrics_log(resume_iteration=start_iter if start_iter else None)
    loader = build_train_loader(cfg, rank=dist.rank(), world_size=dist.world_size(), start_iter=start_iter)
    _write_run_info(run, cfg, model, loader, start_iter)
    ddp = DistributedDataParallel(model) if dist.world_size() > 1 else model
    if evaluate_fn is None:
        from m2f.inference import evaluate as evaluate_fn
    # bf16 autocast on GPU only: CPU autocast would slow the tiny preset down. The pixel decoder
    # disables autocast for itself (fp32 deformable attention), as the original does.
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cfg.train.amp and device.type == "cuda" else nullcontext()

    bar = tqdm(total=cfg.train.max_iters, initial=start_iter, disable=not (progress and dist.is_main()),
               desc=f"train {cfg.name}", dynamic_ncols=True)
    last_loss, last_eval, tic = math.nan, {}, time.perf_counter()
    memory = PeakMemory(device=device).start()
    model.train()
    for iteration, (images, targets) in zip(range(start_iter, cfg.train.max_iters), loader):
        with amp:
            outputs = ddp([im.to(device) for im in images])
        targets = pad_targets(targets, outputs["padded_size"], device)
        try:
            losses = criterion(outputs, targets)
            if not torch.isfinite(losses["loss"]):
                terms = {k: v.item() for k, v in losses.items() if not math.isfinite(v.item())}
                raise FloatingPointError(f"non-finite loss terms {terms}; lower train.lr or disable train.amp.")
        except FloatingPointError as err:  # from the loss or from the matcher's cost check
            raise FloatingPointError(f"training diverged at iteration {iteration}: {err} "
                                     f"--resume restarts from the last good checkpoint, {run / CHECKPOINT}") from err
        loss = losses["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip_grad_norm, foreach=True)
        optimizer.step()
        scheduler.step()
        bar.update(1)

        done = iteration + 1
        if done % cfg.train.log_period == 0 or done == cfg.train.max_iters:
            elapsed, tic = time.perf_counter() - tic, time.perf_counter()
            record = dist.all_reduce_mean({k: v.item() for k, v in losses.items() if k.startswith("loss")}, device)
            last_loss = record["loss"]
            steps = done % cfg.train.log_period or cfg.train.log_period
            record.update(iteration=done, lr=cfg.train.lr * lr_factor(iteration, cfg.train),
                          grad_norm=float(grad_norm), seconds=elapsed,
                          images_per_s=steps * cfg.train.batch_size / max(elapsed, 1e-9),
                          peak_memory_mb=memory.peak_bytes() / 2**20)
            bar.set_postfix(loss=f"{last_loss:.3f}", lr=f"{record['lr']:.1e}", ips=f"{record['images_per_s']:.1f}")
            _append_metrics(run, {"split": "train", **record})
        if done % cfg.train.checkpoint_period == 0 or done == cfg.train.max_iters:
            _checkpoint(run, cfg, model, optimizer, scheduler, done)
        if cfg.train.eval_period > 0 and (done % cfg.train.eval_period == 0 or done == cfg.train.max_iters):
            model.eval()
            last_eval = evaluate_fn(model, cfg)
            model.train()
            # The next training window starts after the evaluation, so images/s stays a training speed.
            seconds, tic = time.perf_counter() - tic, time.perf_counter()
            _append_metrics(run, {"split": "val", "iteration": done, "seconds": seconds, **_scalars(last_eval)})
            bar.write(f"[{done}] " + ", ".join(f"{k}={v:.3f}" for k, v in _scalars(last_eval).items()
                                               if k.endswith(("PQ", "AP", "mIoU"))))
    bar.close()
    skipped = loader.dataset.skip_summary()
    if skipped and dist.is_main():
        logger.warning(skipped)
    return {"iterations": cfg.train.max_iters, "final_loss": last_loss, "eval": last_eval, "run_dir": str(run)}


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The headline numbers of an evaluation as "task/metric" keys (per-class tables stay out of the log)."""
    return {f"{task}/{k}": float(v) for task, values in metrics.items() if isinstance(values, dict)
            for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _append_metrics(run: Path, record: dict[str, Any]) -> None:
    if dist.is_main():
        RunDir.at(run).append_metrics(record)


def _checkpoint(run: Path, cfg: Config, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                scheduler: Any, iteration: int) -> None:
    if not dist.is_main():
        return
    save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "rng": rng_state(), "iteration": iteration,
                 "config": cfg.to_dict()}, run / CHECKPOINT)


def _restore(path: Path, cfg: Config, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             scheduler: Any) -> int:
    state = load(path)
    saved = from_dict(state["config"])
    if saved.model != cfg.model:
        raise ValueError(f"cannot resume {path}: its model config differs from this run's "
                         f"({_diff(saved.model, cfg.model)})")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    logger.info("resumed %s at iteration %d", path, state["iteration"])
    return int(state["iteration"])


def _diff(a: Any, b: Any) -> str:
    return ", ".join(f"{k}: {v!r} -> {getattr(b, k)!r}" for k, v in vars(a).items() if getattr(b, k) != v)


def _git_revision() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _write_run_info(run: Path, cfg: Config, model: torch.nn.Module, loader: Any, start_iter: int) -> None:
    if not dist.is_main():
        return
    info = {"config": cfg.to_dict(), "git_revision": _git_revision(), "parameters": count_parameters(model),
            "world_size": dist.world_size(), "start_iteration": start_iter, "train_images": len(loader.dataset),
            "torch": torch.__version__}
    RunDir.at(run).config_file.write_text(cfg.to_json())
    RunDir.at(run).run_info_file.write_text(json.dumps(info, indent=2))
    print(f"m2f train: {cfg.name} -> {run}\n  git {info['git_revision']}, {info['parameters'] / 1e6:.2f}M parameters, "
          f"{info['train_images']} training images, {dist.world_size()} process(es)\n{cfg.to_json()}", flush=True)
