"""A real single-node Slurm cluster for the grid tests: munged, slurmctld and slurmd started from a temporary
folder (their own slurm.conf, ports, state, logs and munge socket), stopped by the PIDs this module started.

Debian's `slurm-wlm` and `munge` packages provide the binaries (`.ci/run` installs them). Client commands
(sbatch, squeue, scontrol, and submitit through them) find the cluster through the SLURM_CONF variable.
"""

import hashlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from m2f.child_process import stop as stop_process

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "sinfo")


def missing() -> list[str]:
    """The binaries this machine lacks (looked up in PATH and /usr/sbin)."""
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin" + os.pathsep + "/sbin"
    return [b for b in BINARIES if shutil.which(b, path=path) is None]


def _which(name: str) -> str:
    return shutil.which(name, path=os.environ.get("PATH", "") + os.pathsep + "/usr/sbin" + os.pathsep + "/sbin")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spool_dir(root: Path) -> Path:
    """The slurmd spool of the cluster under `root`, at a short path of its own: slurmstepd puts Unix sockets
    there, whose paths may not exceed 107 bytes, and pytest's temporary folders are long (under
    /tmp/pytest-of-root/pytest-114/<test name>/ a batch step's socket name had 110 and the job never launched)."""
    return Path(tempfile.gettempdir()) / f"m2f-spool-{hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:10]}"


def write_config(root: Path, *, cpus: int) -> Path:
    """slurm.conf for one node (this host, `cpus` CPUs) without accounting (no slurmdbd)."""
    host = socket.gethostname()
    for sub in ("state", "log"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    spool_dir(root).mkdir(parents=True, exist_ok=True)
    conf = root / "slurm.conf"
    conf.write_text(f"""ClusterName=m2ftest
SlurmctldHost={host}
SlurmUser={os.environ.get("USER") or "root"}
AuthType=auth/munge
AuthInfo=socket={root / "munge" / "munge.socket"}
CredType=cred/munge
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
StateSaveLocation={root / "state"}
SlurmdSpoolDir={spool_dir(root)}
SlurmctldPidFile={root / "slurmctld.pid"}
SlurmdPidFile={root / "slurmd.pid"}
SlurmctldLogFile={root / "log" / "slurmctld.log"}
SlurmdLogFile={root / "log" / "slurmd.log"}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobRequeue=1
ReturnToService=2
MpiDefault=none
SlurmdTimeout=60
NodeName={host} CPUs={cpus} RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
    return conf


@contextmanager
def cluster(root: Path, *, cpus: int = 0, timeout_s: float = 60.0):
    """Starts munged, slurmctld and slurmd under `root`; yields the slurm.conf path with SLURM_CONF set; stops
    the daemons it started (by PID) and restores SLURM_CONF."""
    cpus = cpus or len(os.sched_getaffinity(0))
    munge = root / "munge"
    munge.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = munge / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    conf = write_config(root, cpus=cpus)
    logs = {name: open(root / "log" / f"{name}.out", "w") for name in ("munged", "slurmctld", "slurmd")}  # noqa: SIM115
    commands = {
        "munged": munged_command(munge),
        "slurmctld": [_which("slurmctld"), "-D", "-i", "-f", str(conf)],
        "slurmd": [_which("slurmd"), "-D", "-f", str(conf)],
    }
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf)
    started: list[subprocess.Popen] = []
    try:
        for name, command in commands.items():
            started.append(subprocess.Popen(command, stdout=logs[name], stderr=subprocess.STDOUT))
            if name == "munged":
                _wait(lambda: (munge / "munge.socket").exists(), timeout_s, "munged", root)
        _wait(lambda: "idle" in _run(["sinfo", "-h", "-o", "%T"]), timeout_s, "the Slurm node", root)
        yield conf
    finally:
        stop(started)
        for log in logs.values():
            log.close()
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous


def munged_command(munge: Path) -> list[str]:
    """munged in the foreground with its key, socket, pid, log and seed files in `munge`."""
    return [_which("munged"), "--foreground", "--force", f"--key-file={munge / 'munge.key'}",
            f"--socket={munge / 'munge.socket'}", f"--pid-file={munge / 'munged.pid'}",
            f"--log-file={munge / 'munged.log'}", f"--seed-file={munge / 'munged.seed'}"]


def stop(started: list[subprocess.Popen], *, drain_s: float = 60.0) -> None:
    """Stops the daemons `started` (last first) once the queue is empty: a job whose result is written is still
    finishing its step (srun, slurmstepd), and stopping the daemons under it leaves those waiting forever."""
    deadline = time.monotonic() + drain_s
    while _run(["squeue", "-h"]).strip() and time.monotonic() < deadline:
        time.sleep(0.5)
    for process in reversed(started):
        stop_process(process, grace_s=20)


def _run(command: list[str]) -> str:
    result = subprocess.run(command, capture_output=True, text=True)
    return result.stdout if result.returncode == 0 else ""


def _wait(ready, timeout_s: float, what: str, root: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted((root / "log").glob("*")))
            raise TimeoutError(f"{what} did not come up in {timeout_s:.0f} s\n{logs}")
        time.sleep(0.5)
