"""Stopping a child process we started: SIGTERM, a grace period for its own clean-up, then SIGKILL."""

import subprocess


def stop(process: subprocess.Popen, *, grace_s: float) -> int:
    """Terminates `process` if it still runs, kills it if it has not ended `grace_s` seconds later, and reaps it.

    Returns:
        Its exit code (negative: the signal that ended it).
    """
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait()
