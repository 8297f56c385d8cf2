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

Multi-GPU rows: with `gpus_per_job` > 1 the row trains under torchrun inside its job (`nproc_per_node` = the
job's GPUs per node; `m2f.experiment.run_experiment`).

Multi-node rows (`nodes` = N > 1): the job gets N nodes and one task per node, and every task starts one
torchrun for its node, all meeting at one static rendezvous (`m2f.distributed.Rendezvous`) that each node
derives alone from Slurm's environment (`slurm_rendezvous`): node rank = SLURM_NODEID, master = the first host
of SLURM_JOB_NODELIST (`scontrol show hostnames`), port = a function of SLURM_JOB_ID, so the nodes agree
without talking and two jobs sharing a node do not collide. The nodes' roles differ:
- node 0 runs the notebook exactly as a one-node job does; its `run_experiment` finds the rendezvous in the
  environment and starts torchrun as node 0 of N, then alone evaluates the checkpoint and writes metrics.json;
  only node 0 writes job.json and submitit's result, so the grid sees one job per row, whatever N is.
- nodes 1..N-1 run no notebook: `_train_beside_node_0` runs the same torchrun command for their node rank
  (`m2f.experiment.torchrun_command`), whose trainers read the config that node 0 wrote before it opened the
  rendezvous. They stop when their torchrun ends, or when node 0's task ends first (its notebook failed, or the
  row needed no training), which they see from node 0's submitit result file on the shared filesystem.
Preemption and time limits are the same for N nodes: Slurm signals every node, only node 0 (global rank 0)
checkpoints and requeues, and Slurm requeues the job with all its nodes; each node's task starts again and
the training resumes from the row's checkpoint. `srun --kill-on-bad-exit` ends the other nodes when node 0
dies without a result (killed for memory, ...) instead of leaving them waiting until the time limit.
"""

import os
import shlex
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from m2f.child_process import stop
from m2f.reproduce.jobs import Job, JobState, execute, read_state, write_state

# The rendezvous port of job J is BASE_PORT + J mod PORTS: below Linux's ephemeral range (32768-60999), where
# outgoing connections could hold it, and the same on every node of the job.
BASE_PORT, PORTS = 12000, 20000

if TYPE_CHECKING:  # m2f.distributed imports torch, which the launcher itself does not need
    from m2f.distributed import Rendezvous


@dataclass(frozen=True)
class Slurm:
    """Run each job as one task of a Slurm job array.

    Args:
        jobs: array tasks running at the same time (`slurm_array_parallelism`).
        folder: submitit's folder (sbatch scripts, pickled tasks, logs).
        partition: `--partition` ("" = the cluster's default).
        gpus_per_job: `--gpus-per-node` of each job (0: CPU jobs); > 1: torchrun with that many processes per node.
        cpus_per_job: `--cpus-per-task`, per node (also the job's torch threads).
        nodes: `--nodes` of each job; > 1: the row trains on all of them (one torchrun per node, see the module
            docstring), with the same global batch (`train.batch_size` is split over all processes).
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
        if self.nodes < 1:
            raise ValueError(f"--nodes must be >= 1, got {self.nodes}")
        extra = {}
        for option in self.sbatch:
            key, _, value = option.removeprefix("--").partition("=")
            extra[key.replace("-", "_")] = value or True
        params = {"name": name, "timeout_min": self.time_min, "nodes": self.nodes, "tasks_per_node": 1,
                  "cpus_per_task": self.cpus_per_job, "slurm_array_parallelism": self.jobs,
                  "slurm_signal_delay_s": self.signal_delay_s, "slurm_additional_parameters": extra,
                  "slurm_setup": list(self.setup)}
        if self.nodes > 1:  # see the module docstring: node 0 dying without a result ends the other nodes
            params["slurm_srun_args"] = ["--kill-on-bad-exit=1"]
        if self.gpus_per_job:
            params["gpus_per_node"] = self.gpus_per_job
        for key, value in (("slurm_partition", self.partition), ("slurm_account", self.account),
                           ("slurm_mem", self.mem)):
            if value:
                params[key] = value
        return params


def hostnames(nodelist: str) -> list[str]:
    """The hosts of a Slurm node list ("node[01-03,07]" -> node01, node02, node03, node07), in Slurm's order,
    expanded by Slurm itself (`scontrol show hostnames`), which knows every form a node list takes."""
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True)
    if out.returncode != 0 or not out.stdout.split():
        raise RuntimeError(f"scontrol show hostnames {nodelist!r} failed: {out.stderr.strip()}")
    return out.stdout.split()


def slurm_rendezvous(env: Mapping[str, str] = os.environ) -> "Rendezvous":
    """This node's part of the job's torchrun rendezvous, from the job's Slurm environment alone (every node
    computes the same master and port)."""
    from m2f.distributed import Rendezvous

    nnodes = int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 1)
    return Rendezvous(nnodes=nnodes, node_rank=int(env.get("SLURM_NODEID", 0)),
                      master_addr=hostnames(env["SLURM_JOB_NODELIST"])[0],
                      master_port=BASE_PORT + int(env["SLURM_JOB_ID"]) % PORTS)


def _train_beside_node_0(job: Job, rendezvous: "Rendezvous", node_0_result: Path, *, poll_s: float = 2.0) -> str:
    """Node `rendezvous.node_rank` > 0 of a multi-node row: trains with node 0 until the training ends or node
    0's task ends (its result file appears or changes, `node_0_result`); returns what happened (for the log:
    the grid reads node 0's result only)."""
    from m2f.experiment import torchrun_command

    def stamp() -> int:
        return node_0_result.stat().st_mtime_ns if node_0_result.exists() else 0

    # The notebook trains into output_dir/run (notebooks/02_ablation.ipynb); the same command as node 0's.
    command = torchrun_command(job.folder / "run", nproc_per_node=int(job.params.get("nproc_per_node", 1)),
                               rendezvous=rendezvous)
    before = stamp()  # a requeued job may find the result of an earlier attempt
    while stamp() == before:
        print("$", shlex.join(command), flush=True)
        process = subprocess.Popen(command)
        while process.poll() is None and stamp() == before:
            time.sleep(poll_s)
        if process.poll() is None:  # node 0 ended first: nothing more to train with
            stop(process, grace_s=60)
            break
        if process.returncode == 0:
            return _said(f"node {rendezvous.node_rank}: trained")
        # Node 0 has not opened the rendezvous in torchrun's time (a slow start), or its training failed and
        # its notebook is ending: join again until node 0's task ends.
        print(f"torchrun exited with {process.returncode} while node 0 runs: joining again", flush=True)
        time.sleep(poll_s)
    return _said(f"node {rendezvous.node_rank}: node 0 ended")


def _said(outcome: str) -> str:
    print(outcome, flush=True)  # this node's log: its result is not read by the grid
    return outcome


def _checkpointable():
    import submitit

    class RowTask(submitit.helpers.Checkpointable):
        """The array task (one per node): runs one job; on preemption / timeout resubmits itself (the base
        class's `checkpoint` returns the same call; submitit calls it on node 0 only), and the rerun resumes from
        the row's checkpoint."""

        def __call__(self, job: Job, threads: int) -> str:
            from submitit.core.utils import JobPaths

            env = submitit.JobEnvironment()
            # The same intra-op threads as a local worker with this many cores: same arithmetic, same numbers.
            os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
            rendezvous = slurm_rendezvous()
            os.environ.update(rendezvous.to_env())  # for run_experiment's torchrun in the notebook's kernel
            if rendezvous.node_rank > 0:
                node_0 = JobPaths(os.environ["SUBMITIT_FOLDER"], job_id=env.job_id, task_id=0)
                return _train_beside_node_0(job, rendezvous, node_0.result_pickle)
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
    return queue_entry(job_id)[0]


def queue_entry(job_id: str) -> tuple[str, str]:
    """(state, reason) of the job from squeue ("PENDING", "launch failed requeued held"), ("", "") when it has
    left the queue."""
    out = subprocess.run(["squeue", "-h", "-o", "%T|%r", "-j", job_id], capture_output=True, text=True)
    if out.returncode != 0 or not out.stdout.strip():
        return "", ""
    state, _, reason = out.stdout.strip().splitlines()[0].partition("|")
    return state, reason


def held(reason: str) -> str:
    """What a pending job's squeue reason means for the grid: "launch failed" (Slurm could not start it, e.g. a
    node could not fork slurmstepd, and holds it so that it does not loop), "held" (a user or admin hold, which
    someone released or will release) or "" (it waits for resources or its start time)."""
    text = reason.lower()
    if "launch failed" in text:
        return "launch failed"
    return "held" if "held" in text else ""


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
        # Task 0 of each job (node 0) is the row: its log, its result (a multi-node job has one task per node).
        submitted = [array_task.task(0) for array_task in
                     executor.map_array(_checkpointable()(), fresh, [launcher.cpus_per_job] * len(fresh))]
    for job, task in zip(fresh, submitted):
        write_state(job, JobState("pending", launcher="slurm", job_id=task.job_id, log=str(task.paths.stdout)))
        print(f"  {job.label}: submitted as Slurm job {task.job_id} (log {task.paths.stdout})", flush=True)
    tasks = {**queued, **{str(job.folder): task for job, task in zip(fresh, submitted)}}
    errors: dict[str, str] = {}
    gone: dict[str, int] = {}
    released: set[str] = set()  # jobs found held (and, after a failed launch, released once)
    while len(errors) < len(jobs):
        for job in jobs:
            key, task = str(job.folder), tasks[str(job.folder)]
            if key in errors:
                continue
            if task.paths.result_pickle.exists():
                errors[key] = _result(task)
                continue
            state, reason = queue_entry(task.job_id)
            hold = held(reason) if state else ""
            if hold:
                # A held job never starts by itself: without this the grid would wait for it forever.
                gone.pop(key, None)
                if hold == "launch failed" and key not in released:
                    released.add(key)  # often transient (a node under load): one release, then it is an error
                    print(f"  {job.label}: Slurm job {task.job_id} could not be launched ({reason}); released it "
                          "once", flush=True)
                    subprocess.run(["scontrol", "release", task.job_id], capture_output=True)
                elif hold == "launch failed":
                    errors[key] = (f"Slurm job {task.job_id} could not be launched twice ({reason}); see the slurmd "
                                   "log of its node, then scancel it and run the command again")
                    write_state(job, JobState("failed", launcher="slurm", job_id=task.job_id,
                                              log=str(task.paths.stderr), error=errors[key]))
                elif key not in released:
                    released.add(key)
                    print(f"  {job.label}: Slurm job {task.job_id} is held ({reason}); the grid waits until it is "
                          f"released (scontrol release {task.job_id})", flush=True)
            elif not state:
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
