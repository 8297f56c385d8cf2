"""`m2f reproduce TABLE --status`: every job of a table's grid: pending / running (job id) / done / failed (log).

It reads only the files the jobs write (params.json, metrics.json, job.json; `m2f.reproduce.jobs`), and asks
Slurm (squeue) or the process table whether a job that says it runs still does, so it works from any shell
while a grid runs, and after one was killed.
"""

import json
import os
import socket

from m2f.reproduce.jobs import Job, is_done, read_state
from m2f.reproduce.runner import Grid


def job_status(job: Job) -> tuple[str, str]:
    """(state, detail): "done", "running" (job id, host), "pending" (job id or "not started"),
    "failed" (log, error) or "stopped" (a job that says it runs but whose process or Slurm job is gone)."""
    if is_done(job):
        return "done", str(job.folder)
    state = read_state(job)
    # Finished once (the rows made before job.json existed have no state), but not done now.
    if (job.folder / "metrics.json").is_file() and (state is None or state.state == "done"):
        return "pending", f"to re-run: {_stale(job)}"
    if state is None:
        return "pending", "not started"
    if state.state == "failed":
        return "failed", f"log {state.log}: {state.error}"
    if state.state in ("running", "pending"):
        alive = _alive(state.launcher, state.job_id, state.host)
        if alive is False:
            return "stopped", f"{state.launcher} job {state.job_id} is gone (log {state.log}); rerun to resume"
        where = f" on {state.host}" if state.host and state.state == "running" else ""
        reason = f"; {state.error}" if state.error else ""
        return state.state, f"{state.launcher} job {state.job_id}{where} (log {state.log}){reason}"
    return state.state, state.log


def _stale(job: Job) -> str:
    """Why a job with metrics is not done (`m2f.reproduce.jobs.is_done`)."""
    stamp = job.folder / "params.json"
    if not stamp.is_file() or json.loads(stamp.read_text()) != job.params:
        return "its parameters changed"
    missing = [p for p in job.inputs if not p.is_file()]
    if missing:
        return f"{missing[0]} is not on this machine (--reuse-recorded keeps its metrics)"
    return "its inputs are newer than its metrics"


def _alive(launcher: str, job_id: str, host: str) -> bool | None:
    """Whether the job still exists (None: cannot tell from here)."""
    if launcher == "slurm":
        from m2f.reproduce.slurm import in_queue

        try:
            return bool(in_queue(job_id))
        except FileNotFoundError:  # no squeue on this machine
            return None
    if host != socket.gethostname() or not job_id.isdigit():
        return None
    try:
        os.kill(int(job_id), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def status(grid: Grid) -> list[tuple[str, str, str]]:
    """(label, state, detail) for every job of the grid, rows first."""
    return [(job.label, *job_status(job)) for job in grid.jobs()]


def format_status(grid: Grid) -> str:
    rows = status(grid)
    width = max((len(label) for label, _, _ in rows), default=0)
    counts = {s: sum(r[1] == s for r in rows) for s in ("done", "running", "pending", "failed", "stopped")}
    lines = [f"{grid.table.name}: {len(rows)} jobs, seeds {grid.seeds[0]}-{grid.seeds[-1]}, in {grid.out}: "
             + ", ".join(f"{n} {s}" for s, n in counts.items() if n)]
    lines += [f"  {label:<{width}}  {state:<8} {detail}" for label, state, detail in rows]
    return "\n".join(lines)
