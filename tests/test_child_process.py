"""m2f.child_process.stop: SIGTERM first, SIGKILL after the grace period, always reaped."""

import signal
import subprocess
import sys

from m2f.child_process import stop


def test_a_process_that_honours_sigterm_ends_by_it():
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    assert stop(process, grace_s=10) == -signal.SIGTERM


def test_a_process_that_ignores_sigterm_is_killed_after_the_grace_period():
    code = "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "ready"  # the handler is installed
    assert stop(process, grace_s=0.5) == -signal.SIGKILL
    assert process.returncode == -signal.SIGKILL


def test_a_process_that_already_ended_keeps_its_exit_code():
    process = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    process.wait()
    assert stop(process, grace_s=1) == 3
