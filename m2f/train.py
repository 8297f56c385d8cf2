"""`m2f.train(cfg)`: the whole training loop in one readable function, for 1 CPU process or many GPUs.

What it does, in order: start torch.distributed if launched by torchrun; seed; build data, model,
matcher + criterion, AdamW and the schedule; resume from RUN/checkpoint.pth if asked; then iterate:
forward, Hungarian matching + point-sampled losses on all prediction sets, backward, full-model gradient
clipping, optimizer and schedule step; log to a progress bar and RUN/metrics.jsonl; evaluate and
checkpoint (atomically) periodically. Everything the run needs to be understood later (config, git
revision, parameter count, skipped images) is written into the run directory.
"""

import dataclasses
import json
import logging
import math
import os
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from m2f import distributed as dist
from m2f.checkpoint import load, rng_state, save_atomic, set_rng_state
from m2f.config import Config, from_dict, validate
from m2f.criterion import build_criterion
from m2f.data.loader import build_train_loader, pad_targets
from m2f.memory import PeakMemory
from m2f.model import build_model, count_parameters
from m2f.optim import build_optimizer, build_scheduler, lr_factor
from m2f.run_dir import RunDir, log_scalars
from m2f.run_lock import RunLock

logger = logging.getLogger(__name__)

CHECKPOINT = RunDir.CHECKPOINT


def train(cfg: Config, *, out_dir: str | Path, resume: bool = False, progress: bool = True,
          evaluate_fn: Any = None, final_evaluation: bool = True) -> dict[str, Any]:
    """Trains `cfg` into `out_dir`, returning {"iterations", "final_loss", "eval": last metrics, "run_dir"}.

    Args:
        cfg: the experiment; `cfg.data.root` must point at a dataset in `cfg.data.format`.
        out_dir: the run directory (created); holds config.json, metrics.jsonl, checkpoint.pth. One
            training at a time may use it (`m2f.run_lock`).
        resume: continue from out_dir/checkpoint.pth (its model config must equal `cfg`'s; the schedule,
            learning rate and the other train/data fields are this call's, from the resumed iteration on).
        progress: show a progress bar (rank 0 only).
        evaluate_fn: `fn(model, cfg) -> dict` run every `train.eval_period` iterations and at the end;
            defaults to `m2f.inference.evaluate` on the validation split.
        final_evaluation: evaluate at the end too (False when the caller evaluates the final checkpoint
            itself, as `m2f.experiment.run_experiment` does for every prediction set).

    Raises:
        ValueError: a config value out of range, or no dataset given.
        FileNotFoundError: the dataset root does not exist.
        RunInUseError: another process is training into `out_dir`.
        FloatingPointError: the loss or the gradient became non-finite (the message says how to go on).
        KeyboardInterrupt: Ctrl-C, after writing a checkpoint of the last finished iteration.
    """
    validate(cfg)
    cfg = _with_absolute_data_root(cfg)
    device = dist.init()
    run = Path(out_dir)
    if dist.is_main():
        _prepare_run_dir(run)
    dist.barrier()
    with RunLock(run, what="m2f train") if dist.is_main() else nullcontext():
        return _train(cfg, run, resume=resume, progress=progress, evaluate_fn=evaluate_fn,
                      final_evaluation=final_evaluation, device=device)


def _train(cfg: Config, run: Path, *, resume: bool, progress: bool, evaluate_fn: Any, final_evaluation: bool,
           device: torch.device) -> dict[str, Any]:
    torch.manual_seed(cfg.train.seed + dist.rank())
    # channels_last: oneDNN's native convolution layout (no reorders around every convolution); the tiny
    # preset's backbone forward + backward is ~1.2x faster on the CPU, the values equal up to float rounding.
    model = build_model(cfg).to(device, memory_format=torch.channels_last)
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
    # The state after the last finished iteration (what Ctrl-C saves) and when it was last saved. The
    # buffers are kept too: the forward of an interrupted iteration has already moved BatchNorm statistics.
    done, boundary_rng, boundary_buffers, stepping, skipped = start_iter, rng_state(), _buffers(model), False, []
    saved_at, saved_time = (start_iter if start_iter else None), time.monotonic()
    model.train()
    try:
        for iteration, (images, targets, skipped_here) in zip(range(start_iter, cfg.train.max_iters), loader):
            skipped += skipped_here
            with amp:
                outputs = ddp([im.to(device) for im in images])
            targets = pad_targets(targets, outputs["padded_size"], device)
            try:
                losses = criterion(outputs, targets)
                if not torch.isfinite(losses["loss"]):
                    terms = {k: v.item() for k, v in losses.items() if not math.isfinite(v.item())}
                    raise FloatingPointError(f"non-finite loss terms {terms}")
                loss = losses["loss"]
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip_grad_norm, foreach=True)
                if not torch.isfinite(grad_norm):  # checked before the step, so the weights stay finite
                    raise FloatingPointError(f"non-finite gradient norm {grad_norm.item()}")
            except FloatingPointError as err:  # from the loss, the gradient or the matcher's cost check
                raise FloatingPointError(
                    f"training diverged at iteration {iteration}: {str(err).rstrip('.')}. Lower train.lr (or disable train.amp) "
                    f"and continue from the last checkpoint ({_checkpoint_note(run, saved_at)}) with --resume "
                    f"--set train.lr=...") from err
            lr = max(group["lr"] for group in optimizer.param_groups)  # the rate this step uses
            stepping = True  # an interrupt inside the update leaves no consistent state to save
            optimizer.step()
            scheduler.step()
            stepping, done, boundary_rng, boundary_buffers = False, iteration + 1, rng_state(), _buffers(model)
            bar.update(1)

            if done % cfg.train.log_period == 0 or done == cfg.train.max_iters:
                elapsed, tic = time.perf_counter() - tic, time.perf_counter()
                record = dist.all_reduce_mean({k: v.item() for k, v in losses.items() if k.startswith("loss")},
                                              device)
                last_loss = record["loss"]
                steps = done % cfg.train.log_period or cfg.train.log_period
                record.update(iteration=done, lr=lr, grad_norm=float(grad_norm), seconds=elapsed,
                              images_per_s=steps * cfg.train.batch_size / max(elapsed, 1e-9),
                              peak_memory_mb=memory.peak_bytes() / 2**20)
                bar.set_postfix(loss=f"{last_loss:.3f}", lr=f"{lr:.1e}", ips=f"{record['images_per_s']:.1f}")
                _append_metrics(run, {"split": "train", **record})
            minutes = cfg.train.checkpoint_minutes
            # Every rank takes part in a checkpoint (it gathers their RNG states), so the clock's verdict is
            # made collective; the iteration-based triggers are the same on every rank anyway.
            time_up = minutes > 0 and dist.any_rank(time.monotonic() - saved_time >= 60 * minutes, device)
            if done % cfg.train.checkpoint_period == 0 or done == cfg.train.max_iters or time_up:
                _checkpoint(run, cfg, model, optimizer, scheduler, done, boundary_rng)
                saved_at, saved_time = done, time.monotonic()
            at_end = done == cfg.train.max_iters
            if cfg.train.eval_period > 0 and (done % cfg.train.eval_period == 0 or at_end) and (
                    final_evaluation or not at_end):
                model.eval()
                last_eval = evaluate_fn(model, cfg)
                model.train()
                # The next training window starts after the evaluation, so images/s stays a training speed.
                seconds, tic = time.perf_counter() - tic, time.perf_counter()
                _append_metrics(run, {"split": "val", "iteration": done, "seconds": seconds, **log_scalars(last_eval)})
                bar.write(f"[{done}] " + ", ".join(f"{k}={v:.3f}" for k, v in log_scalars(last_eval).items()
                                                   if k.endswith(("PQ", "AP", "mIoU"))))
    except KeyboardInterrupt:
        bar.close()
        if dist.is_main():
            if not stepping and done != saved_at:
                model.load_state_dict(boundary_buffers, strict=False)
                # The other ranks are being interrupted too: no collective, so only this rank's RNG state.
                _checkpoint(run, cfg, model, optimizer, scheduler, done, boundary_rng, gather=False)
                saved_at = done
            print(f"\nm2f train: stopped at iteration {done}; last checkpoint at {_checkpoint_note(run, saved_at)}; "
                  f"continue with --resume", file=sys.stderr, flush=True)
        raise
    bar.close()
    summary = loader.dataset.skip_summary(also=skipped)
    if dist.is_main():
        RunDir.at(run).run_info_file.write_text(json.dumps(
            {**RunDir.at(run).read_run_info(), "skipped": sorted(set(skipped) | set(loader.dataset.skipped)),
             "skip_summary": summary}, indent=2))
        if skipped or loader.dataset.skipped:
            logger.warning(summary)
    return {"iterations": cfg.train.max_iters, "final_loss": last_loss, "eval": last_eval, "run_dir": str(run)}


def _buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: buffer.clone() for name, buffer in model.named_buffers()}


def _checkpoint_note(run: Path, iteration: int | None) -> str:
    return f"iteration {iteration}, {run / CHECKPOINT}" if iteration is not None else "none written yet"


def _with_absolute_data_root(cfg: Config) -> Config:
    """Checks the dataset root exists and makes it absolute, so the run opens from any directory later."""
    root = cfg.data.root
    if not root:
        raise ValueError("no dataset given: pass --data DIR (or set data.root); `m2f data synth DIR` generates "
                         "the synthetic one")
    if not Path(root).is_dir():
        raise FileNotFoundError(f"dataset root {root} (data.root) does not exist; generate the synthetic one with "
                                f"`m2f data synth {root}` or pass --data with the folder holding the dataset")
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=str(Path(root).resolve())))


def _prepare_run_dir(run: Path) -> None:
    """Creates the run directory, with a clear error when it cannot be one (a file, read-only, ...)."""
    try:
        run.mkdir(parents=True, exist_ok=True)
    except FileExistsError as err:
        raise NotADirectoryError(f"--out {run} is a file, not a run directory; choose another path") from err
    except OSError as err:
        raise OSError(f"cannot create the run directory {run}: {err.strerror or err}") from err
    if not os.access(run, os.W_OK | os.X_OK):
        raise PermissionError(f"the run directory {run} is not writable; choose another --out")


def _append_metrics(run: Path, record: dict[str, Any]) -> None:
    if dist.is_main():
        RunDir.at(run).append_metrics(record)


def _checkpoint(run: Path, cfg: Config, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                scheduler: Any, iteration: int, rng: dict[str, Any], *, gather: bool = True) -> None:
    """Writes the state after `iteration` finished iterations; `rng` is this rank's RNG state at that moment.

    With `gather` (every rank calls this), "rng_ranks" holds every rank's RNG state, so that a multi-process
    run resumes with each rank drawing what it would have drawn (their streams differ: seed + rank)."""
    ranks = dist.gather_objects(rng) if gather and dist.world_size() > 1 else None
    if not dist.is_main():
        return
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "rng": rng, "iteration": iteration, "config": cfg.to_dict()}
    if ranks is not None:
        state["rng_ranks"] = ranks
    save_atomic(state, run / CHECKPOINT)


def _restore(path: Path, cfg: Config, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             scheduler: Any) -> int:
    """Loads the checkpoint's weights, optimizer moments and RNG states; the learning rate, weight decay and
    schedule stay those of `cfg` (a resume with a lower train.lr really trains at it). Returns the iteration."""
    state = load(path)
    saved = from_dict(state["config"])
    if saved.model != cfg.model:
        raise ValueError(f"cannot resume {path}: its model config differs from this run's "
                         f"({_diff(saved.model, cfg.model)})")
    iteration = int(state["iteration"])
    if iteration > cfg.train.max_iters:
        raise ValueError(f"cannot resume {path}: it is at iteration {iteration}, past train.max_iters="
                         f"{cfg.train.max_iters}")
    configured = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    model.load_state_dict(state["model"])
    try:
        optimizer.load_state_dict(state["optimizer"])
    except ValueError as err:  # parameter groups are made by (lr, weight decay): a new grouping does not fit
        raise ValueError(f"cannot resume {path}: its optimizer has other parameter groups than this config's "
                         f"(train.backbone_lr_mult or a zero/non-zero weight decay changed): {err}") from err
    scheduler.load_state_dict(state["scheduler"])
    old_lr = max(group["lr"] for group in optimizer.param_groups)
    # This config's hyperparameters, at this config's schedule for the resumed iteration.
    scheduler.base_lrs = [hyper["initial_lr"] for hyper in configured]
    for group, hyper in zip(optimizer.param_groups, configured):
        group.update(hyper, lr=hyper["initial_lr"] * lr_factor(iteration, cfg.train))
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    ranks = state.get("rng_ranks")
    if ranks is not None and len(ranks) == dist.world_size():
        set_rng_state(ranks[dist.rank()])
    else:
        set_rng_state(state["rng"])
        if dist.world_size() > 1 and dist.is_main():
            logger.warning("%s holds %s; every process resumes with the RNG state of process 0, so the random "
                           "points differ from those of an uninterrupted run", path,
                           f"RNG states of {len(ranks)} processes, not {dist.world_size()}" if ranks
                           else "one process's RNG state (written on Ctrl-C or by a 1-process run)")
    new_lr = max(group["lr"] for group in optimizer.param_groups)
    if dist.is_main():
        change = f" (the checkpoint ran at {old_lr:.3g})" if not math.isclose(old_lr, new_lr, rel_tol=1e-9) else ""
        print(f"m2f train: resumed {path} at iteration {iteration}, lr {new_lr:.3g}{change}", flush=True)
    return iteration


def _diff(a: Any, b: Any) -> str:
    return ", ".join(f"{k}: {v!r} -> {getattr(b, k)!r}" for k, v in vars(a).items() if getattr(b, k) != v)


def _git_revision() -> str:
    """The commit of the m2f package that trains, "+modified" when its files differ from that commit (a run
    started from an edited tree did not train at the commit alone), "unknown" outside a git checkout."""
    package = Path(__file__).parent

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=package, timeout=5)

    try:
        revision = git("rev-parse", "--short", "HEAD").stdout.strip()
        if not revision:
            return "unknown"
        return revision + ("+modified" if git("diff", "--quiet", "HEAD", "--", ".").returncode == 1 else "")
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
          f"{info['train_images']} training images, {dist.world_size()} process(es), {cfg.train.max_iters} iterations"
          f" of batch {cfg.train.batch_size} at lr {cfg.train.lr:g}; the whole config is in "
          f"{RunDir.at(run).config_file}", flush=True)
