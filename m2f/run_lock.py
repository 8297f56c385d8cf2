"""One writer per run directory: an advisory lock file that names the process holding it.

Two `m2f train` (or two grids running the same `m2f reproduce` row) on one folder would overwrite each
other's checkpoint and logs. `RunLock` takes an exclusive `flock` on FOLDER/.lock and writes the holder's
PID, host and command into it. The kernel releases a flock when its process dies, so a lock left by a
killed run is never in the way (a stale file is simply re-locked); a live holder makes the second
process stop at once with `RunInUseError`, naming the holder.

    >>> with RunLock(run_dir, what="m2f train"):  # doctest: +SKIP
    ...     train_loop()
"""

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any


class RunInUseError(OSError):
    """Another live process holds the folder's lock (the message names its PID and command)."""


class RunLock:
    """An exclusive, non-blocking lock on `folder` for the lifetime of a `with` block.

    Args:
        folder: the run (or row) directory; created if missing.
        what: what the holder is doing, shown to a second process ("m2f train", "m2f reproduce row").
    """

    FILE = ".lock"

    def __init__(self, folder: str | Path, *, what: str):
        self.path = Path(folder) / self.FILE
        self.what = what
        self._fd: int | None = None

    def __enter__(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = self.holder()
            raise RunInUseError(
                f"{self.path.parent} is in use by {holder.get('what', 'another process')} (PID {holder.get('pid', '?')}"
                f" on {holder.get('host', '?')}, since {holder.get('since', '?')}): wait for it to finish, stop it, "
                f"or use another output folder") from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "what": self.what,
                  "since": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(holder).encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._fd is not None:
            # The file stays (removing it would race with a process that just opened it); it is unlocked.
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def holder(self) -> dict[str, Any]:
        """What the lock file says about its holder ({} when empty or unreadable)."""
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}
