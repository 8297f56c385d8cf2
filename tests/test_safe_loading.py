"""No file m2f loads can run code: a pickle whose `__reduce__` runs a shell command is refused everywhere.

The hostile files are what a released checkpoint from a stranger could be: a detectron2-style `.pkl`
(plain pickle) and a torch `.pth` (zip + pickle), each planting a marker file when unpickled by the
plain `pickle` module. Every command and function that reads a weight file is listed in LOADERS; each
must leave no marker and fail with an error that names the offending global and the file.
"""

import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from m2f import cli
from m2f.checkpoint import load, rng_state, save_atomic, set_rng_state
from m2f.config import get_config
from m2f.convert import from_detectron2
from m2f.model import build_model
from m2f.pretrained import load_pretrained
from m2f.run_dir import RunDir
from m2f.safe_pickle import UnsafePickleError, load_pickle


class _Payload:
    """Unpickling this runs `touch MARKER` (what a hostile checkpoint does with os.system)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _hostile(marker: Path, *, numpy_weights: bool) -> dict:
    weight = np.zeros((2, 2), np.float32) if numpy_weights else torch.zeros(2, 2)
    return {"model": {"sem_seg_head.predictor.query_feat.weight": weight, "x": _Payload(marker)},
            "config": {}, "optimizer": {}, "iteration": 3}


@pytest.fixture()
def hostile(tmp_path):
    """{"marker", "pkl", "pth", "run"}: the two hostile files and a run directory holding the .pth."""
    marker = tmp_path / "MARKER"
    pkl = tmp_path / "model_final_evil.pkl"
    with open(pkl, "wb") as f:
        pickle.dump(_hostile(marker, numpy_weights=True), f, protocol=2)  # as detectron2's files are
    pth = tmp_path / "evil.pth"
    torch.save(_hostile(marker, numpy_weights=False), pth)
    run = tmp_path / "run"
    run.mkdir()
    torch.save(_hostile(marker, numpy_weights=False), run / RunDir.CHECKPOINT)
    # The plain pickle module would run the payload: the files are really hostile.
    with open(pkl, "rb") as f:
        pickle.load(f)
    assert marker.exists()
    marker.unlink()
    return {"marker": marker, "pkl": pkl, "pth": pth, "run": run, "root": tmp_path}


def _cli(*argv):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([str(a) for a in argv])
    assert exit_info.value.code == 2


# name -> (the hostile file it reads, the call) for every way a weight file is read: commands, then functions.
LOADERS = {
    "m2f eval RUN": ("run", lambda h: _cli("eval", h["run"])),
    "m2f eval CKPT": ("pth", lambda h: _cli("eval", h["pth"])),
    "m2f convert X.pkl": ("pkl", lambda h: _cli("convert", h["pkl"], "--out", h["root"] / "out.pth")),
    "m2f convert X.pth": ("pth", lambda h: _cli("convert", h["pth"], "--out", h["root"] / "out.pth")),
    "m2f train --resume": ("run", lambda h: _cli("train", "--out", h["run"], "--resume", "--data", h["root"])),
    "m2f.pretrained.load_pretrained(.pth)": ("pth", lambda h: load_pretrained(h["pth"])),
    "m2f.pretrained.load_pretrained(.pkl)": ("pkl", lambda h: load_pretrained(h["pkl"])),
    "m2f.convert.from_detectron2": ("pkl", lambda h: from_detectron2(h["pkl"])),
    "m2f.checkpoint.load": ("pth", lambda h: load(h["pth"])),
    "dashboards (RunDir.load)": ("run", lambda h: RunDir.at(h["run"]).load()),
}


@pytest.mark.parametrize("name", list(LOADERS))
def test_hostile_file_is_refused_unrun(name, hostile, capsys):
    file, call = LOADERS[name]
    try:
        call(hostile)
    except ValueError as err:  # the library's error; the commands print it (checked below)
        message = str(err)
    else:
        message = capsys.readouterr().err
    assert not hostile["marker"].exists(), f"{name} executed the pickle's payload"
    assert "posix.system" in message or "posix system" in message, message
    named = hostile[file] / RunDir.CHECKPOINT if file == "run" else hostile[file]
    assert str(named) in message and "run code" in message, message


def test_restricted_unpickler_names_the_global_and_reads_real_weight_pickles(tmp_path):
    # What a released model_final_*.pkl holds: numpy arrays (any dtype) and scalars in an OrderedDict.
    from collections import OrderedDict

    weights = OrderedDict(a=np.arange(6, dtype=np.float32).reshape(2, 3), b=np.array([1, 2], np.int64),
                          c=np.float64(0.5), d=np.zeros(0, np.uint8))
    for protocol in (2, pickle.HIGHEST_PROTOCOL):
        path = tmp_path / f"ok{protocol}.pkl"
        path.write_bytes(pickle.dumps({"model": weights, "__author__": "Detectron2 Model Zoo",
                                       "matching_heuristics": True}, protocol=protocol))
        data = load_pickle(path)
        assert data["__author__"] == "Detectron2 Model Zoo"
        for key, value in weights.items():
            np.testing.assert_array_equal(data["model"][key], value)
            assert data["model"][key].dtype == value.dtype
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps(_Payload(tmp_path / "M")))
    with pytest.raises(UnsafePickleError, match=r"evil\.pkl refers to posix\.system"):
        load_pickle(evil)
    assert not (tmp_path / "M").exists()


def test_checkpoints_load_with_weights_only_and_old_ones_still_load(tmp_path):
    model = build_model(get_config("tiny", ["model.num_queries=4"]))
    ckpt = {"model": model.state_dict(), "rng": rng_state(), "iteration": 7,
            "config": get_config("tiny").to_dict()}
    save_atomic(ckpt, tmp_path / "new.pth")
    # The strict reader with no extra globals reads what m2f writes today.
    state = torch.load(tmp_path / "new.pth", weights_only=True)
    assert state["iteration"] == 7
    # The RNG state round-trips: the next draws after restoring equal those after saving.
    set_rng_state(state["rng"])
    after_restore = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(ckpt["rng"])
    np.testing.assert_array_equal(after_restore[0], torch.rand(3))
    np.testing.assert_array_equal(after_restore[1], np.random.rand(3))
    assert after_restore[2] == random.random()
    # Checkpoints written before the tensor RNG format (numpy's state tuple with an array) still load.
    old = {**ckpt, "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                           "python": random.getstate()}}
    torch.save(old, tmp_path / "old.pth")
    with pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "old.pth", weights_only=True)  # what plain weights_only says
    loaded = load(tmp_path / "old.pth")
    set_rng_state(loaded["rng"])
    draws = np.random.rand(3)
    np.random.set_state(old["rng"]["numpy"])
    np.testing.assert_array_equal(draws, np.random.rand(3))


@pytest.mark.parametrize("damage", ["truncated", "random bytes", "empty"])
@pytest.mark.parametrize("name", list(LOADERS))
def test_damaged_files_are_a_clear_error_naming_the_file(name, damage, hostile, capsys):
    file, call = LOADERS[name]
    named = hostile[file] / RunDir.CHECKPOINT if file == "run" else hostile[file]
    good = torch.save if file != "pkl" else (lambda obj, path: path.write_bytes(pickle.dumps(obj, protocol=2)))
    good({"model": {"w": np.zeros(3, np.float32) if file == "pkl" else torch.zeros(3)}}, named)
    content = named.read_bytes()
    named.write_bytes({"truncated": content[: len(content) // 2], "random bytes": os.urandom(len(content)),
                       "empty": b""}[damage])
    try:
        call(hostile)
    except ValueError as err:
        message = str(err)
    else:
        message = capsys.readouterr().err
    assert str(named) in message and ("cannot be read" in message or "cannot read" in message), message
