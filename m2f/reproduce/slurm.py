"""The Slurm launcher: a grid's jobs as one submitit job array, requeued and resumed on preemption or timeout.

Every job of a grid (a row at a seed) becomes one task of a Slurm job array (`submitit.AutoExecutor`,
`map_array`; at most `jobs` run at once, `slurm_array_parallelism`). The task runs `m2f.reproduce.jobs.execute`,
the same function the local launcher runs, with the same notebook and parameters, so a row trained on Slurm is
the same row (the same folder and done stamp) as one trained locally.

Preemption and time limits: Slurm sends SIGUSR2 `signal_delay_s` before it kills a job (submitit asks for it
with `--signal`); submitit then calls `RowTask.checkpoint`, which resubmits the same task, and requeues the job
(`scontrol requeue`). The requeued task runs the notebook again, whose training resumes from the row's last
checkpoint (`m2f.train` with resume, written atomically every `train.checkpoint_period`), so nothing but the
iterations since that checkpoint is lost and the result is the same as an uninterrupted run.

Multi-GPU rows: with `gpus_per_job` > 1 the row trains under torchrun inside its job on one node
(`nproc_per_node` = the job's GPUs; `m2f.experiment.run_experiment`).
"""

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from m2f.reproduce.jobs import Job, JobState, execute, read_state, write_state


@dataclass(frozen=True)
class Slurm:
    """Run each job as one task of a Slurm job array.

    Args:
        jobs: array tasks running at the same time (`slurm_array_parallelism`).
        folder: submitit's folder (sbatch scripts, pickled tasks, logs).
        partition: `--partition` ("" = the cluster's default).
        gpus_per_job: `--gpus-per-node` of each job (0: CPU jobs).
        cpus_per_job: `--cpus-per-task` (also the job's torch threads).
        nodes: `--nodes` of each job.
        time_min: `--time` in minutes; a job reaching it is requeued and resumes (see the module docstring).
        account: `--account` ("" = none).
        mem: `--mem` ("" = the cluster's default), e.g. "64G".
        sbatch: extra `#SBATCH` options, each "key=value" or "flag" ("qos=high", "exclusive").
        setup: shell lines run in the job before the task (module load, conda activate, ...).
        signal_delay_s: how long before the time limit Slurm warns the job (SIGUSR2) to checkpoint.
        poll_s: how often the launcher looks at the queue.
    """

    jobs: int = 1
    folder: Path = Path("slurm")
    partition: str = ""
    gpus_per_job: int = 0
    cpus_per_job: int = 1
    nodes: int = 1
    time_min: int = 60
    account: str = ""
    mem: str = ""
    sbatch: tuple[str, ...] = ()
    setup: tuple[str, ...] = ()
    signal_delay_s: int = 90
    poll_s: float = 5.0

    def parameters(self, name: str) -> dict:
        """The `AutoExecutor.update_parameters` arguments."""
        if self.nodes != 1:
            # submitit would run the notebook once per node; a multi-node row needs one torchrun per node
            # with a shared rendezvous, which m2f does not start yet.
            raise ValueError("--nodes > 1 is not supported yet: a row runs on one node (up to its GPUs)")
        extra = {}
        for option in self.sbatch:
            key, _, value = option.removeprefix("--").partition("=")
            extra[key.replace("-", "_")] = value or True
        params = {"name": name, "timeout_min": self.time_min, "nodes": self.nodes, "tasks_per_node": 1,
                  "cpus_per_task": self.cpus_per_job, "slurm_array_parallelism": self.jobs,
                  "slurm_signal_delay_s": self.signal_delay_s, "slurm_additional_parameters": extra,
                  "slurm_setup": list(self.setup)}
        if self.gpus_per_job:
            params["gpus_per_node"] = self.gpus_per_job
        for key, value in (("slurm_partition", self.partition), ("slurm_account", self.account),
                           ("slurm_mem", self.mem)):
            if value:
                params[key] = value
        return params


def _checkpointable():
    import submitit

    class RowTask(submitit.helpers.Checkpointable):
        """The array task: runs one job; on preemption / timeout resubmits itself (the base class's
        `checkpoint` returns the same call), and the rerun resumes from the row's checkpoint."""

        def __call__(self, job: Job, threads: int) -> str:
            import os

            env = submitit.JobEnvironment()
            # The same intra-op threads as a local worker with this many cores: same arithmetic, same numbers.
            os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
            log = str(env.paths.stdout).replace("%j", str(env.job_id))
            return execute(job, launcher="slurm", job_id=env.job_id, log=log)

        def checkpoint(self, job: Job, threads: int):
            previous = read_state(job)
            write_state(job, JobState("pending", launcher="slurm", job_id=previous.job_id if previous else "",
                                      log=previous.log if previous else "", error="requeued (preempted or timed out)"))
            return super().checkpoint(job, threads)

    return RowTask


def in_queue(job_id: str) -> str:
    """The job's Slurm state ("PENDING", "RUNNING", ...) from squeue, or "" when it has left the queue."""
    out = subprocess.run(["squeue", "-h", "-o", "%T", "-j", job_id], capture_output=True, text=True)
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else ""


def run_slurm(jobs: list[Job], launcher: Slurm, *, name: str = "m2f-reproduce") -> dict[str, str]:
    """Submits `jobs` as one array and waits for all of them; returns {folder: error}."""
    import submitit

    # A job still queued or running from an earlier invocation (the command was stopped, the array was not)
    # is waited for, not submitted twice into the same folder.
    queued = {}
    for job in jobs:
        state = read_state(job)
        if state and state.launcher == "slurm" and state.state in ("pending", "running") and in_queue(state.job_id):
            queued[str(job.folder)] = submitit.SlurmJob(folder=launcher.folder / "%j", job_id=state.job_id)
            print(f"  {job.label}: already in the queue as Slurm job {state.job_id}", flush=True)
    fresh = [job for job in jobs if str(job.folder) not in queued]
    submitted = []
    if fresh:
        executor = submitit.AutoExecutor(folder=launcher.folder / "%j", cluster="slurm")
        executor.update_parameters(**launcher.parameters(name))
        submitted = executor.map_array(_checkpointable()(), fresh, [launcher.cpus_per_job] * len(fresh))
    for job, task in zip(fresh, submitted):
        write_state(job, JobState("pending", launcher="slurm", job_id=task.job_id, log=str(task.paths.stdout)))
        print(f"  {job.label}: submitted as Slurm job {task.job_id} (log {task.paths.stdout})", flush=True)
    tasks = {**queued, **{str(job.folder): task for job, task in zip(fresh, submitted)}}
    errors: dict[str, str] = {}
    gone: dict[str, int] = {}
    while len(errors) < len(jobs):
        for job in jobs:
            key, task = str(job.folder), tasks[str(job.folder)]
            if key in errors:
                continue
            if task.paths.result_pickle.exists():
                errors[key] = _result(task)
            elif not in_queue(task.job_id):
                # Without slurmdbd (sacct) a job that died before writing its result is only seen as gone;
                # a requeued job stays in the queue, so three polls in a row without it mean it is gone.
                gone[key] = gone.get(key, 0) + 1
                if gone[key] >= 3 and not task.paths.result_pickle.exists():
                    errors[key] = f"Slurm job {task.job_id} left the queue without a result (log {task.paths.stderr})"
                    write_state(job, JobState("failed", launcher="slurm", job_id=task.job_id,
                                              log=str(task.paths.stderr), error=errors[key]))
            else:
                gone.pop(key, None)
        if len(errors) < len(jobs):
            time.sleep(launcher.poll_s)
    return errors


def _result(task) -> str:
    try:
        return task.result() or ""
    except Exception as err:  # the task raised (an import error, out of memory, ...): its log has the rest
        return f"Slurm job {task.job_id} failed: {type(err).__name__}: {str(err)[-2000:]} (log {task.paths.stderr})"
