"""One unit of a reproduction grid: a notebook run with papermill into its folder, and its state on disk.

A `Job` is one row at one seed (or a figure's analysis of one seed's rows, or the quickstart). It is
done when folder/metrics.json exists, folder/params.json equals its parameters, and its inputs (the
row's checkpoint; for a figure, the rows' metrics) exist and are not newer. A row recorded on another
machine (a fresh clone's committed metrics, without the checkpoint) is retrained, so that the main job
reproduces rather than re-prints; `reuse_recorded` makes it count as done instead (`m2f reproduce
--reuse-recorded`: add rows to committed tables without retraining their baselines). Everything else about a job
lives in folder/job.json (`JobState`): which launcher ran it, its Slurm job id, its log, its error. That
file is what `m2f reproduce TABLE --status` reads, so it works from any shell while a grid runs.

`execute` is what every launcher runs (in this process, in a local worker, or in a Slurm job); it never
raises for a failing notebook: the error goes into job.json and the return value.
"""

import json
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from m2f.run_lock import RunInUseError, RunLock

# The package data m2f/_notebooks (the repository's top-level notebooks/, see pyproject.toml): found the
# same way in a checkout and in an installed wheel.
NOTEBOOKS = Path(resources.files("m2f") / "_notebooks").resolve()
STATE = "job.json"


@dataclass(frozen=True)
class Job:
    """A notebook to run with `params` into `folder`.

    Args:
        label: what the status and the log call it ("- masked attention, seed 1").
        notebook: a file name in `NOTEBOOKS`.
        folder: the output folder (papermill's cwd; the executed notebook, metrics.json, params.json).
        params: the notebook's parameters (also the done stamp).
        inputs: files whose presence (and age) `is_done` checks besides the stamp.
        reuse_recorded: an input that is absent does not make the job undone (one that is present and
            newer than the metrics still does: the row was retrained after them).
    """

    label: str
    notebook: str
    folder: Path
    params: dict[str, Any]
    inputs: tuple[Path, ...] = ()
    reuse_recorded: bool = False

    @property
    def executed(self) -> Path:
        return self.folder / self.notebook


@dataclass
class JobState:
    """folder/job.json: "pending" (submitted, not started), "running", "failed" or "done".

    Args:
        state: see above.
        launcher: "local" or "slurm".
        job_id: the Slurm job id ("1234_0"), or the local process id.
        log: where the job's output goes (the Slurm log; locally the executed notebook holds the output).
        host: where it ran.
        error: for a failed job, the notebook, the cell and the exception.
        time: when the state was written (seconds since the epoch).
    """

    state: str
    launcher: str = "local"
    job_id: str = ""
    log: str = ""
    host: str = ""
    error: str = ""
    time: float = field(default_factory=time.time)


def read_state(job: Job) -> JobState | None:
    path = job.folder / STATE
    try:
        return JobState(**json.loads(path.read_text()))
    except (FileNotFoundError, json.JSONDecodeError, TypeError):
        return None  # never started, or a half-written file from a killed process


def write_state(job: Job, state: JobState) -> None:
    job.folder.mkdir(parents=True, exist_ok=True)
    tmp = job.folder / f".{STATE}.{os.getpid()}"
    tmp.write_text(json.dumps(asdict(state), indent=1))
    tmp.replace(job.folder / STATE)  # atomic: --status never reads half a file


def is_done(job: Job) -> bool:
    metrics, stamp = job.folder / "metrics.json", job.folder / "params.json"
    if not (metrics.is_file() and stamp.is_file()) or json.loads(stamp.read_text()) != job.params:
        return False
    # A retrained row invalidates its metrics and the figures made from them.
    return all(p.stat().st_mtime_ns <= metrics.stat().st_mtime_ns if p.is_file() else job.reuse_recorded
               for p in job.inputs)


def execute(job: Job, *, progress: bool = False, launcher: str = "local", job_id: str = "", log: str = "") -> str:
    """Runs `job` unless it is done; returns "" on success, else the error (also in job.json, unless
    another process is running the job: then the error names that process and job.json is its)."""
    if is_done(job):
        print(f"  {job.label}: done already ({job.folder})", flush=True)
        return ""
    source = NOTEBOOKS / job.notebook
    state = JobState("running", launcher=launcher, job_id=job_id or str(os.getpid()), log=log or str(job.executed),
                     host=socket.gethostname())
    if not source.is_file():
        return _fail(job, state, f"notebook {source} does not exist")
    # Two grids over one output folder must not run the same row at once; the one that comes second
    # leaves the row (and its job.json) to the first and reports it as not done here.
    try:
        with RunLock(job.folder, what=f"m2f reproduce ({job.label})"):
            return _run(job, source, state, progress=progress, launcher=launcher)
    except RunInUseError as err:
        print(f"  {job.label}: skipped: {err}", flush=True)
        return str(err)


def _run(job: Job, source: Path, state: "JobState", *, progress: bool, launcher: str) -> str:
    import papermill as pm

    stamp = job.folder / "params.json"
    stamp.unlink(missing_ok=True)
    write_state(job, state)
    print(f"  {job.label}: running {job.notebook} -> {job.executed}", flush=True)
    tic = time.perf_counter()
    try:
        pm.execute_notebook(str(source), str(job.executed), parameters=job.params, kernel_name="python3",
                            progress_bar=progress, cwd=str(job.folder))
    except pm.PapermillExecutionError as err:
        return _fail(job, state, f"{job.executed} cell {err.cell_index} (execution count {err.exec_count}): "
                                 f"{err.ename}: {err.evalue}")
    except Exception as err:  # the kernel died, the notebook is malformed, ...: report it, run the other jobs
        return _fail(job, state, f"{job.notebook}: {type(err).__name__}: {err}")
    if not (job.folder / "metrics.json").is_file():
        return _fail(job, state, f"{job.executed} ran but wrote no metrics.json")
    stamp.write_text(json.dumps(job.params, indent=1))
    write_state(job, JobState("done", launcher=launcher, job_id=state.job_id, log=state.log, host=state.host))
    print(f"  {job.label}: finished in {(time.perf_counter() - tic) / 60:.1f} min", flush=True)
    return ""


def _fail(job: Job, state: JobState, error: str) -> str:
    print(f"  {job.label}: FAILED: {error}", flush=True)
    write_state(job, JobState("failed", launcher=state.launcher, job_id=state.job_id, log=state.log, host=state.host,
                              error=error))
    return error
