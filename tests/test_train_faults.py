"""Training under faults: SIGKILL at random moments, Ctrl-C, a full disk, a second writer, a resume with a
new learning rate, bad images inside DataLoader workers. Each test states the promise it checks."""

import importlib
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from m2f.checkpoint import load, save_atomic
from m2f.config import get_config
from m2f.run_lock import RunInUseError, RunLock
from m2f.train import train

train_module = importlib.import_module("m2f.train")  # the module; `m2f.train` is the function
FAST = ["data.image_size=64", "data.test_size=64", "data.num_workers=0", "model.num_queries=8",
        "loss.num_points=256", "train.batch_size=2", "train.eval_period=0", "train.log_period=1",
        "train.lr_steps="]  # a constant lr: a resumed run's schedule is the uninterrupted one's


def config(data, *overrides):
    return get_config("tiny", [f"data.root={data}", *FAST, *overrides])


def assert_same_weights(a, b):
    state_a, state_b = load(a / "checkpoint.pth")["model"], load(b / "checkpoint.pth")["model"]
    for name in state_a:
        torch.testing.assert_close(state_b[name], state_a[name], rtol=0, atol=0, msg=name)


def logged_iterations(run):
    return [r["iteration"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if r["split"] == "train"]


def test_sigkill_at_random_moments_then_resume_equals_an_uninterrupted_run(data, tmp_path):
    iterations = 8
    overrides = [f"train.max_iters={iterations}", "train.checkpoint_period=1"]
    train(config(data, *overrides), out_dir=tmp_path / "reference", progress=False)
    run = tmp_path / "killed"
    command = [sys.executable, "-m", "m2f", "train", "--config", "tiny", "--data", str(data), "--out", str(run),
               "--resume", *(f"--set={o}" for o in [*FAST, *overrides])]
    rng, kills, finished = random.Random(0), 0, False
    while not finished:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if kills < 4:  # kill when the run is some way in: before, between and during checkpoint writes
            before = load(run / "checkpoint.pth")["iteration"] if (run / "checkpoint.pth").exists() else 0
            deadline = time.monotonic() + 120
            while process.poll() is None and time.monotonic() < deadline:
                now = load(run / "checkpoint.pth")["iteration"] if (run / "checkpoint.pth").exists() else 0
                if now > before:  # training is under way: die at a random moment of the next iterations
                    time.sleep(rng.uniform(0.0, 0.6))
                    break
                time.sleep(0.02)
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                kills += 1
        returncode = process.wait(timeout=300)
        stderr = process.stderr.read().decode()
        assert returncode in (0, -signal.SIGKILL), stderr
        finished = returncode == 0
        assert load(run / "checkpoint.pth")["iteration"] >= 1  # never corrupt, never missing once written
    assert kills >= 2
    assert load(run / "checkpoint.pth")["iteration"] == iterations
    assert_same_weights(tmp_path / "reference", run)
    assert logged_iterations(run) == list(range(1, iterations + 1))  # each iteration once in the log


def test_a_kill_during_the_checkpoint_write_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pth"
    save_atomic({"iteration": 1, "w": torch.ones(3)}, path)
    # A child that is killed while its torch.save is half-way through writing the temporary file.
    child = subprocess.Popen([sys.executable, "-c", f"""
import time, torch
from m2f import checkpoint
real_save = torch.save
def slow_save(obj, f):
    real_save(obj, f)
    f.flush()
    f.truncate(f.tell() // 2)
    time.sleep(600)
torch.save = slow_save
checkpoint.save_atomic({{"iteration": 2, "w": torch.zeros(100000)}}, {str(path)!r})
"""])
    tmp = tmp_path / "checkpoint.pth.tmp"
    deadline = time.monotonic() + 60
    while not (tmp.exists() and tmp.stat().st_size > 0) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert tmp.exists()
    child.kill()
    child.wait()
    state = load(path)
    assert state["iteration"] == 1 and torch.equal(state["w"], torch.ones(3))


def test_a_full_disk_keeps_the_previous_checkpoint_and_says_so(tmp_path, monkeypatch):
    import errno

    path = tmp_path / "checkpoint.pth"
    save_atomic({"iteration": 1}, path)
    real_save = torch.save

    def full_disk(obj, f):
        real_save(obj, f)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match=r"no space left on device; the previous checkpoint.pth is unchanged"):
        save_atomic({"iteration": 2}, path)
    assert load(path)["iteration"] == 1
    assert not (tmp_path / "checkpoint.pth.tmp").exists()  # no half file left on the full disk


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_real_full_tmpfs_during_training_stops_with_a_clear_message(data, tmp_path):
    run_args = [*FAST, "train.max_iters=3", "train.checkpoint_period=1"]
    train(config(data, "train.max_iters=1"), out_dir=tmp_path / "probe", progress=False)
    size = (tmp_path / "probe" / "checkpoint.pth").stat().st_size
    mount = tmp_path / "small"
    mount.mkdir()
    # Room for one checkpoint and the logs, not for the next checkpoint's temporary file beside it.
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size * 3 // 2}", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("this machine does not allow mounting a tmpfs")
    try:
        result = subprocess.run([sys.executable, "-m", "m2f", "train", "--config", "tiny", "--data", str(data),
                                 "--out", str(mount / "run"), *(f"--set={o}" for o in run_args)],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 2, result.stderr[-2000:]
        assert "Traceback" not in result.stderr, result.stderr[-2000:]
        assert "no space left on device; the previous checkpoint.pth is unchanged" in result.stderr, result.stderr
        assert not (mount / "run" / "checkpoint.pth.tmp").exists()
        assert load(mount / "run" / "checkpoint.pth")["iteration"] == 1
    finally:
        subprocess.run(["umount", str(mount)])


def test_ctrl_c_saves_the_last_finished_iteration_and_resume_continues_exactly(data, tmp_path, monkeypatch, capsys):
    overrides = ["train.max_iters=6", "train.checkpoint_period=1000"]  # no periodic checkpoint before the end
    train(config(data, *overrides), out_dir=tmp_path / "reference", progress=False)
    build = train_module.build_criterion
    calls = []

    def interrupting(cfg):
        criterion = build(cfg)

        def call(outputs, targets):
            calls.append(1)
            if len(calls) == 4:  # Ctrl-C during iteration 4's loss: 3 iterations are finished
                raise KeyboardInterrupt
            return criterion(outputs, targets)
        return call

    monkeypatch.setattr(train_module, "build_criterion", interrupting)
    with pytest.raises(KeyboardInterrupt):
        train(config(data, *overrides), out_dir=tmp_path / "stopped", progress=False)
    err = capsys.readouterr().err
    assert "stopped at iteration 3; last checkpoint at iteration 3" in err and "--resume" in err
    assert load(tmp_path / "stopped" / "checkpoint.pth")["iteration"] == 3
    monkeypatch.setattr(train_module, "build_criterion", build)
    train(config(data, *overrides), out_dir=tmp_path / "stopped", resume=True, progress=False)
    assert "resumed " in (out := capsys.readouterr().out) and " at iteration 3, lr " in out
    assert_same_weights(tmp_path / "reference", tmp_path / "stopped")


def test_resume_with_a_new_lr_trains_at_it_and_the_nan_advice_works(data, tmp_path, capsys):
    run = tmp_path / "run"
    train(config(data, "train.max_iters=3", "train.checkpoint_period=3", "train.lr=5e-4"), out_dir=run,
          progress=False)
    # A far too high lr diverges; the error says how to go on, and no diverged weights are saved.
    with pytest.raises(FloatingPointError, match=r"Lower train.lr .*\(iteration 3, .*checkpoint.pth\) with --resume"):
        train(config(data, "train.max_iters=12", "train.checkpoint_period=100", "train.lr=1e6"), out_dir=run,
              resume=True, progress=False)
    assert load(run / "checkpoint.pth")["iteration"] == 3
    capsys.readouterr()
    # The advice: lower the lr and --resume. The optimizer really uses the new rate from iteration 4 on.
    train(config(data, "train.max_iters=6", "train.checkpoint_period=3", "train.lr=1e-5"), out_dir=run,
          resume=True, progress=False)
    assert "lr 1e-05 (the checkpoint ran at 0.0005)" in capsys.readouterr().out
    state = load(run / "checkpoint.pth")
    assert state["iteration"] == 6
    assert {group["lr"] for group in state["optimizer"]["param_groups"]} == {1e-5}  # tiny: backbone_lr_mult=1
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in records if r["iteration"] > 3] == [1e-5] * 3
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert logged_iterations(run) == list(range(1, 7))


def test_a_second_training_on_the_same_run_stops_naming_the_first(data, tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", f"""
import time
from m2f.run_lock import RunLock
with RunLock({str(run)!r}, what="m2f train"):
    print("locked", flush=True)
    time.sleep(600)
"""], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunInUseError, match=rf"in use by m2f train \(PID {holder.pid} "):
            train(config(data, "train.max_iters=1"), out_dir=run, progress=False)
        assert not (run / "checkpoint.pth").exists() and not (run / "config.json").exists()
    finally:
        holder.kill()
        holder.wait()
    # The holder died without unlocking (SIGKILL): its lock is stale and the next run takes it.
    train(config(data, "train.max_iters=1"), out_dir=run, progress=False)
    assert load(run / "checkpoint.pth")["iteration"] == 1
    with RunLock(run, what="test"):  # released after training
        pass


def test_images_skipped_inside_workers_are_counted(data, tmp_path):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(data, root)
    images = sorted((root / "train2017").iterdir())
    images[0].write_bytes(b"not an image")
    train(config(root, "train.max_iters=4", "data.num_workers=1"), out_dir=tmp_path / "run", progress=False)
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert [file for file, _ in info["skipped"]] == [str(images[0])]
    assert info["skip_summary"].startswith("skipped 1 of 8 images: cannot decode image")


def test_checkpoints_by_time_and_the_stored_dataset_path_is_absolute(data, tmp_path, monkeypatch):
    """A short run with a long checkpoint_period still checkpoints every train.checkpoint_minutes (here a
    clock that advances 10 minutes per reading), and the run records where its data is from anywhere."""
    written = []
    checkpoint = train_module._checkpoint

    def recording(run, cfg, model, optimizer, scheduler, iteration, rng):
        written.append(iteration)
        checkpoint(run, cfg, model, optimizer, scheduler, iteration, rng)

    monkeypatch.setattr(train_module, "_checkpoint", recording)
    clock = iter(range(0, 10**6, 600))
    monkeypatch.setattr(train_module.time, "monotonic", lambda: float(next(clock)))
    monkeypatch.chdir(data.parent)
    train(config(data.name, "train.max_iters=3", "train.checkpoint_period=1000", "train.checkpoint_minutes=5"),
          out_dir=tmp_path / "timed", progress=False)
    assert written == [1, 2, 3]
    assert json.loads((tmp_path / "timed" / "config.json").read_text())["data"]["root"] == str(data.resolve())
    written.clear()
    train(config(data.name, "train.max_iters=3", "train.checkpoint_period=1000", "train.checkpoint_minutes=0"),
          out_dir=tmp_path / "untimed", progress=False)
    assert written == [3]


def test_a_row_evaluates_its_final_checkpoint_once(data, tmp_path, monkeypatch):
    """run_experiment evaluates the final checkpoint for every prediction set; training does not evaluate it
    first (and a smoke run with max_iters has no periodic evaluation). The validation curve still ends there."""
    from m2f import inference
    from m2f.experiment import run_experiment
    from m2f.reproduce.scales import experiment_config

    calls = []
    evaluate = inference.evaluate

    def counting(*args, **kwargs):
        calls.append(kwargs.get("layers", "final"))
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(inference, "evaluate", counting)
    cfg = experiment_config("tiny", data_dir=str(data), overrides=FAST[:-1], max_iters=2)
    assert cfg.train.eval_period == 0
    run_experiment(cfg, run_dir=tmp_path / "smoke", progress=False)
    assert calls == ["all"]
    calls.clear()
    periodic = experiment_config("tiny", data_dir=str(data), overrides=[*FAST[:-1], "train.eval_period=1"],
                                 max_iters=2)
    run_experiment(periodic, run_dir=tmp_path / "periodic", progress=False)
    assert calls == ["final", "all"]  # iteration 1 periodically; iteration 2 (the end) once, for every set
    val = [json.loads(line) for line in (tmp_path / "periodic" / "metrics.jsonl").read_text().splitlines()
           if json.loads(line)["split"] == "val"]
    assert [r["iteration"] for r in val] == [1, 2]
