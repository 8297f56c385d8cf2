"""Launcher options and job states without running a grid: the Slurm options submitit turns into #SBATCH lines,
and what --status says for each state a job file can hold."""

import os
import socket
import subprocess

import pytest

from m2f.reproduce.jobs import Job, JobState, write_state
from m2f.reproduce.slurm import Slurm
from m2f.reproduce.status import job_status


def test_slurm_options_become_sbatch_lines(tmp_path, monkeypatch):
    import submitit

    options = Slurm(jobs=8, partition="gpu", gpus_per_job=8, cpus_per_job=80, time_min=4320, account="proj",
                    mem="480G", sbatch=("qos=high", "--exclusive"), setup=("module load cuda",))
    monkeypatch.setattr("shutil.which", lambda name, *a, **k: f"/usr/bin/{name}")  # no Slurm needed to render
    executor = submitit.AutoExecutor(folder=tmp_path, cluster="slurm")
    executor.update_parameters(**options.parameters("m2f-table4a"))
    script = executor._executor._make_submission_file_text("python -m x", "uid")
    for line in ("--partition=gpu", "--gpus-per-node=8", "--cpus-per-task=80", "--time=4320", "--account=proj",
                 "--mem=480G", "--qos=high", "--exclusive", "--signal=USR2@90", "--job-name=m2f-table4a",
                 "--nodes=1", "--ntasks-per-node=1"):
        assert f"#SBATCH {line}" in script, line
    assert "module load cuda" in script
    assert executor._executor.parameters["array_parallelism"] == 8  # --jobs: tasks of the array at once
    with pytest.raises(ValueError, match="--nodes must be >= 1"):
        Slurm(nodes=0).parameters("x")


def test_status_of_each_job_state(tmp_path):
    def job(name: str) -> Job:
        return Job(name, "02_ablation.ipynb", tmp_path / name, {"seed": 0})

    assert job_status(job("new")) == ("pending", "not started")
    write_state(job("failed"), JobState("failed", log="/logs/1_0_log.err", error="cell 5: ValueError"))
    assert job_status(job("failed")) == ("failed", "log /logs/1_0_log.err: cell 5: ValueError")
    dead = subprocess.Popen(["true"])
    dead.wait()
    write_state(job("killed"), JobState("running", job_id=str(dead.pid), host=socket.gethostname()))
    assert job_status(job("killed"))[0] == "stopped"
    write_state(job("alive"), JobState("running", job_id=str(os.getpid()), host=socket.gethostname()))
    state, detail = job_status(job("alive"))
    assert state == "running" and f"local job {os.getpid()} on {socket.gethostname()}" in detail
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "metrics.json").write_text("{}")
    (tmp_path / "done" / "params.json").write_text('{"seed": 0}')
    assert job_status(job("done"))[0] == "done"


def test_a_row_run_by_another_grid_is_left_to_it(tmp_path):
    """Two grids over one output folder: the second finds the row locked, names the first's PID, and
    neither runs the notebook nor touches the row's job.json (which is the first grid's)."""
    import sys

    from m2f.reproduce.jobs import STATE, execute

    job = Job(label="row, seed 0", notebook="02_ablation.ipynb", folder=tmp_path / "row", params={})
    holder = subprocess.Popen([sys.executable, "-c", f"""
import time
from m2f.run_lock import RunLock
with RunLock({str(job.folder)!r}, what="m2f reproduce (row, seed 0)"):
    print("locked", flush=True)
    time.sleep(600)
"""], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        error = execute(job)
        assert f"in use by m2f reproduce (row, seed 0) (PID {holder.pid} " in error
        assert not (job.folder / STATE).exists() and not job.executed.exists()
    finally:
        holder.kill()
        holder.wait()


def test_the_demo_keeps_seeds_trained_earlier_in_its_reports(tmp_path):
    """`make demo` trains one seed per row; seeds that `m2f reproduce --seeds N` trained before stay in
    the demo's reports (and a fresh clone, which has no checkpoints, counts one)."""
    import json

    from m2f.demo import seeds_done
    from m2f.reproduce.runner import plan

    def finish(job, *, checkpoint: bool = True):
        (job.folder / "run").mkdir(parents=True, exist_ok=True)
        if checkpoint:
            (job.folder / "run" / "checkpoint.pth").write_bytes(b"")
        (job.folder / "params.json").write_text(json.dumps(job.params))
        (job.folder / "metrics.json").write_text("{}")

    grid = plan("table4a", scale="tiny", out=tmp_path, seeds=3)
    assert seeds_done("table4a", tmp_path) == 1
    for _, jobs in grid.rows:
        finish(jobs[0])
        finish(jobs[1])
    assert seeds_done("table4a", tmp_path) == 2 and seeds_done("figure2", tmp_path) == 2
    for _, jobs in grid.rows[:-1]:
        finish(jobs[2])  # one row's seed 2 is missing: seed 2 is not complete
    assert seeds_done("table4a", tmp_path) == 2
    finish(grid.rows[-1][1][2], checkpoint=False)  # as in a fresh clone: committed metrics, no checkpoint
    assert seeds_done("table4a", tmp_path) == 2


def test_report_only_runs_nothing_and_reports_the_finished_seeds_and_the_pending_ones(tmp_path, monkeypatch):
    import json

    from m2f.reproduce import runner

    def refuse(*args, **kwargs):
        raise AssertionError("--report-only must not run or prepare anything")

    monkeypatch.setattr(runner, "run_jobs", refuse)
    monkeypatch.setattr(runner, "prepare_data", refuse)
    monkeypatch.setattr(runner, "table_costs", lambda table, out: {})  # counted in tests/test_reproduce_costs.py
    grid = runner.plan("table4a", scale="tiny", out=tmp_path, seeds=2, reuse_recorded=True)
    for (row, jobs), pq in zip(grid.rows, (50.0, 40.0, 45.0)):
        for k, job in jobs.items():
            if row.baseline or k == 0:  # the other rows' seed 1 is not trained
                job.folder.mkdir(parents=True, exist_ok=True)
                (job.folder / "params.json").write_text(json.dumps(job.params))
                (job.folder / "metrics.json").write_text(json.dumps({"PQ": pq + k}))
    report = runner.reproduce("table4a", scale="tiny", out=tmp_path, seeds=2, reuse_recorded=True,
                              report_only=True).read_text()
    assert "| Mask2Former (ours) (baseline) | 50.5 ± 0.71 / 51.9 |" in report   # both seeds
    assert "| - masked attention | 40.0 / 47.1 |" in report                    # the one finished seed
    assert "## Rows still to train" in report and "- **- masked attention**: seed 1 not run yet" in report
    assert "| - masked attention | PQ | 40.0 | pending |" in report                # seed 1 in its column
    assert "## Failed rows" not in report
