"""`m2f dashboard` stops its `panel serve` child when it is stopped (issue 22): by SIGTERM (`kill PID`),
by SIGINT (Ctrl+C) and, on Linux, by SIGKILL (the child's parent-death signal)."""

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.is_file() else []


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _alive(pid: int) -> bool:
    """True while `pid` runs (a zombie counts as gone: it has exited and only waits to be reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _wait(condition, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads child processes from /proc (Linux)")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL], ids=lambda s: s.name)
def test_stopping_m2f_dashboard_stops_its_panel_server(signum):
    port = _free_port()
    parent = subprocess.Popen([sys.executable, "-m", "m2f", "dashboard", "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert _wait(lambda: _children(parent.pid), 30), "m2f dashboard started no panel server"
        (server,) = _children(parent.pid)
        assert _wait(lambda: _listening(port), 60), "the server never listened"
        parent.send_signal(signum)
        code = parent.wait(timeout=30)
        assert _wait(lambda: not _alive(server), 15), f"panel serve (pid {server}) still runs after {signum.name}"
        if signum != signal.SIGKILL:
            assert code == 0, parent.stdout.read()  # stopping the dashboard is not a failure
    finally:
        if parent.poll() is None:
            parent.kill()
        parent.wait()
