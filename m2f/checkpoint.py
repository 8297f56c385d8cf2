"""Checkpoints that survive being killed at any moment and that load without running code.

A checkpoint holds the model, optimizer, scheduler, RNG states, iteration and config, so that
`--resume` continues a run exactly where it stopped. It is written to a temporary file, then renamed
(a reader sees the old file or the new one, never half of one), and it holds only tensors, numbers,
strings and containers, so `torch.load(weights_only=True)` reads it: loading a checkpoint from someone
else cannot execute code (see `m2f.safe_pickle`).
"""

import errno
import os
import pickle
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from m2f.safe_pickle import NUMPY_GLOBALS


def save_atomic(obj: Any, path: str | Path) -> None:
    """torch.save to `path.tmp`, fsync, then an atomic rename: a reader sees the old file or the new one.

    Raises:
        OSError: the write failed (disk full, no permission): the temporary file is removed and an
            existing `path` is left as it was; the message says so.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:  # torch's zip writer reports a full disk as a RuntimeError
        tmp.unlink(missing_ok=True)
        kept = f"the previous {path.name} is unchanged" if path.is_file() else f"no {path.name} was written"
        reason = "no space left on device" if _disk_full(err, path.parent) else _first_line(err)
        raise OSError(f"cannot write {path}: {reason}; {kept}") from err


def _disk_full(err: BaseException, folder: Path) -> bool:
    causes = [err, err.__cause__, err.__context__]
    if any(isinstance(e, OSError) and e.errno == errno.ENOSPC for e in causes):
        return True
    try:  # torch's RuntimeError does not carry the errno
        return shutil.disk_usage(folder).free < 2**20
    except OSError:
        return False


def rng_state() -> dict[str, Any]:
    """Every RNG a training step draws from, as tensors and plain Python values (weights_only-safe)."""
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    numpy = state["numpy"]
    if isinstance(numpy, dict):
        numpy = (numpy["name"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
                 numpy["cached_gaussian"])
    np.random.set_state(numpy)  # a tuple with an array: checkpoints written before the tensor format
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load(path: str | Path) -> dict[str, Any]:
    """Loads a checkpoint on CPU without executing code, with a clear error for a bad file.

    Only tensors, numbers, strings, containers and numpy arrays (older m2f checkpoints stored the
    numpy RNG state as one) are unpickled.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is truncated, not a checkpoint, or refers to code (named in the message).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals(NUMPY_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        unsafe = _unsafe_globals(path) if isinstance(err, pickle.UnpicklingError) else []
        if unsafe:
            raise ValueError(f"checkpoint {path} refers to {', '.join(unsafe)}, which a weight file never needs; it "
                             f"was not loaded (unpickling it could run code). If you made the file yourself, load it "
                             f"with torch.load(..., weights_only=False) and save only its tensors, numbers and "
                             f"strings") from err
        raise ValueError(f"checkpoint {path} cannot be read ({_first_line(err)}); it "
                         f"may be truncated or not an m2f checkpoint") from err


def _first_line(err: BaseException) -> str:
    lines = str(err).splitlines()
    return lines[0] if lines and lines[0].strip() else type(err).__name__


def _unsafe_globals(path: Path) -> list[str]:
    """The globals of the file beyond the allowed ones, read from its opcodes (nothing is executed); []
    for a file that is not a readable torch checkpoint at all."""
    allowed = {f"{g.__module__}.{g.__qualname__}" for g in NUMPY_GLOBALS}
    try:
        return [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path) if g not in allowed]
    except Exception:
        return []
