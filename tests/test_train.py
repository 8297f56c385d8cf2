"""The training loop: resume equals an uninterrupted run, 2 processes equal 1, overfitting works, NaN is loud."""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from m2f.checkpoint import load
from m2f.config import get_config
from m2f.data.synthetic import generate
from m2f.train import train

# Small and fast: 64 px images, few queries and points, no evaluation.
FAST = ["data.image_size=64", "data.test_size=64", "data.num_workers=0", "model.num_queries=8",
        "loss.num_points=256", "train.batch_size=2", "train.eval_period=0", "train.log_period=1",
        "train.checkpoint_period=1000"]


def config(data, *overrides):
    return get_config("tiny", [f"data.root={data}", *FAST, *overrides])


def params(run_dir):
    return load(run_dir / "checkpoint.pth")["model"]


def test_resume_gives_the_same_parameters_as_an_uninterrupted_run(data, tmp_path):
    # A constant lr (no milestones), so that a run stopped after 2 iterations followed the same schedule
    # as the first 2 iterations of the 4-iteration run; what is tested is the checkpoint: RNG states,
    # optimizer, scheduler, BatchNorm statistics and the position in the data stream.
    constant = "train.lr_steps="
    train(config(data, "train.max_iters=4", constant), out_dir=tmp_path / "full", progress=False)
    train(config(data, "train.max_iters=2", constant), out_dir=tmp_path / "split", progress=False)
    train(config(data, "train.max_iters=4", constant), out_dir=tmp_path / "split", resume=True, progress=False)
    full, split = params(tmp_path / "full"), params(tmp_path / "split")
    assert load(tmp_path / "split" / "checkpoint.pth")["iteration"] == 4
    for name in full:
        torch.testing.assert_close(split[name], full[name], rtol=0, atol=0, msg=name)


def test_run_directory_records_config_metrics_and_checkpoint(data, tmp_path):
    result = train(config(data, "train.max_iters=2"), out_dir=tmp_path, progress=False)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2]
    assert {"loss", "loss_ce", "loss_mask", "loss_dice", "loss_ce_0", "lr", "images_per_s"} <= set(records[0])
    assert result["final_loss"] == pytest.approx(records[-1]["loss"])
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert info["parameters"] > 0 and info["config"]["train"]["max_iters"] == 2
    assert not list(tmp_path.glob("*.tmp"))  # the atomic write left no temporary file


def test_resume_refuses_a_checkpoint_of_another_model(data, tmp_path):
    train(config(data, "train.max_iters=1"), out_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="num_queries"):
        train(config(data, "train.max_iters=2", "model.num_queries=5"), out_dir=tmp_path, resume=True, progress=False)


def test_wrong_number_of_classes_is_a_clear_error(data, tmp_path):
    with pytest.raises(ValueError, match=r"model\.num_classes=10"):
        train(config(data, "model.num_classes=3"), out_dir=tmp_path, progress=False)


def test_non_finite_loss_names_the_iteration(data, tmp_path):
    # An absurd learning rate makes the loss explode within a few steps.
    with pytest.raises(FloatingPointError, match="iteration"):
        train(config(data, "train.max_iters=30", "train.lr=1e6", "train.clip_grad_norm=1e9"),
              out_dir=tmp_path, progress=False)


def test_overfitting_one_batch_drives_the_loss_down(tmp_path):
    # A dataset of the same two images: every batch is the same batch.
    root = tmp_path / "two"
    generate(root, num_train=2, num_val=1, image_size=64, seed=1)
    cfg = config(root, "train.max_iters=60", "train.lr=1e-3", "data.min_scale=1.0", "data.max_scale=1.0")
    train(cfg, out_dir=tmp_path / "run", progress=False)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, cfg, out_dir) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    train(cfg, out_dir=out_dir, progress=False)
    torch.distributed.destroy_process_group()


def test_two_gloo_processes_equal_one_process_on_the_concatenated_batch(data, tmp_path):
    # Deterministic losses (full masks, no random points) and frozen BatchNorm, so that splitting the
    # batch over processes can change nothing but the float summation order. The class loss is a
    # weighted mean per process (as in the original); with no-object weight 1 every image weighs the
    # same, so the mean of the two processes' means is the mean over the whole batch.
    cfg = config(data, "train.max_iters=1", "loss.point_loss=false", "loss.point_matching=false",
                 "model.freeze_backbone_bn=true", "train.clip_grad_norm=1e9", "loss.no_object_weight=1.0")
    train(cfg, out_dir=tmp_path / "one", progress=False)
    mp.start_processes(_worker, args=(2, _free_port(), cfg, tmp_path / "two"), nprocs=2, start_method="spawn")
    one, two = params(tmp_path / "one"), params(tmp_path / "two")
    # Adam's first step divides each gradient by its own magnitude, so parameters whose gradient is
    # nearly zero at init (the attention in-projection biases) turn float summation-order differences
    # into up to ~1% of a step; 1e-5 is 2% of one step at lr 5e-4. Everything else agrees to 1e-6.
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5, msg=name)



def _resumed_worker(rank: int, world: int, port: int, cfgs, out_dir) -> None:
    """Trains `cfgs` one after another into `out_dir` (the first fresh, the others resumed) on `world` ranks."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    for i, cfg in enumerate(cfgs):
        train(cfg, out_dir=out_dir, resume=i > 0, progress=False)
    torch.distributed.destroy_process_group()


def test_two_process_resume_gives_the_same_parameters_as_an_uninterrupted_run(data, tmp_path):
    # The point losses draw random points from each rank's own stream (seed + rank): the checkpoint keeps
    # every rank's RNG state, so a resumed 2-process run equals an uninterrupted one bit for bit (before,
    # every rank resumed with rank 0's state and the runs drifted apart).
    constant = "train.lr_steps="
    full, split = config(data, "train.max_iters=4", constant), config(data, "train.max_iters=2", constant)
    mp.start_processes(_resumed_worker, args=(2, _free_port(), [full], tmp_path / "full"), nprocs=2,
                       start_method="spawn")
    mp.start_processes(_resumed_worker, args=(2, _free_port(), [split, full], tmp_path / "split"), nprocs=2,
                       start_method="spawn")
    checkpoint = load(tmp_path / "split" / "checkpoint.pth")
    assert checkpoint["iteration"] == 4 and len(checkpoint["rng_ranks"]) == 2
    assert not torch.equal(checkpoint["rng_ranks"][0]["torch"], checkpoint["rng_ranks"][1]["torch"])
    full_params, split_params = params(tmp_path / "full"), params(tmp_path / "split")
    for name in full_params:
        assert torch.equal(split_params[name], full_params[name]), name



def test_channels_last_training_layout_is_as_accurate_as_the_contiguous_one(data):
    # m2f.train puts the model in channels_last (oneDNN's native convolution layout) for speed. Against a
    # float64 run of the same step, its loss terms and gradients must be as close as those of the
    # straightforward contiguous float32 layout. (Gradients of single tensors are not compared to a tight
    # tolerance: bilinear sampling has kinks at pixel borders and the loss keeps the top-k uncertain points,
    # so a rounding-level change moves some gradients discretely; float32 vs float64 differ by ~1% there.)
    import copy

    from m2f.criterion import build_criterion
    from m2f.data.loader import build_train_loader
    from m2f.model import build_model
    from m2f.train import pad_targets

    cfg = config(data, "train.batch_size=4", "model.num_queries=20", "loss.num_points=1024")
    torch.manual_seed(0)
    base = build_model(cfg).train()
    images, targets, _ = next(iter(build_train_loader(cfg, rank=0, world_size=1)))
    criterion = build_criterion(cfg)

    def step(model):
        torch.manual_seed(1)  # the same point draws
        out = model(images)
        losses = criterion(out, pad_targets(targets, out["padded_size"], torch.device("cpu")))
        losses["loss"].backward()
        grads = torch.cat([p.grad.double().flatten() for p in model.parameters()])
        return {k: v.double() for k, v in losses.items()}, grads

    reference_losses, reference = step(copy.deepcopy(base).double())
    contiguous_losses, contiguous = step(copy.deepcopy(base))
    fast = copy.deepcopy(base).to(memory_format=torch.channels_last)
    assert any(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() for p in fast.parameters())
    fast_losses, fast_grads = step(fast)
    for key, value in reference_losses.items():
        tolerance = max(2 * abs(contiguous_losses[key] - value), 1e-5 * abs(value), 1e-6)
        assert abs(fast_losses[key] - value) <= tolerance, key
    error = ((fast_grads - reference).norm() / reference.norm()).item()
    baseline = ((contiguous - reference).norm() / reference.norm()).item()
    assert error <= 1.5 * baseline + 1e-6, (error, baseline)


def test_git_revision_says_when_the_package_differs_from_its_commit():
    import re
    import subprocess
    from pathlib import Path

    from m2f.train import _git_revision

    package = Path(__file__).resolve().parent.parent / "m2f"
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=package)
    revision = _git_revision()
    if head.returncode != 0:  # not a git checkout (an installed package)
        assert revision == "unknown"
        return
    modified = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "."], cwd=package).returncode == 1
    assert re.fullmatch(r"[0-9a-f]{7,}(\+modified)?", revision)
    assert revision == head.stdout.strip() + ("+modified" if modified else "")
