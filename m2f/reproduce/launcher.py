"""Where a grid's jobs run: here one after another, in N pinned local worker processes, or on Slurm.

`run_jobs(jobs, launcher=Local(jobs=N))` or `run_jobs(jobs, launcher=Slurm(...))` runs every job that is not
done and returns {job folder: error} ("" for success). Jobs are independent (a row at a seed); the caller
runs the stages that depend on each other (rows, then the figures on them) one after another.

Local workers split the machine: with G >= 1 visible GPUs worker i sees only GPU i mod G
(`CUDA_VISIBLE_DEVICES`); every worker gets its own share of the CPU cores (`os.sched_setaffinity`,
inherited by the notebook kernel it starts) and as many intra-op threads (OMP/MKL env, which the kernel's
torch reads at import, and `torch.set_num_threads` here). Without the pinning, N PyTorch processes would
each start one thread per core and slow each other down.
"""

import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

from m2f.reproduce.jobs import Job, execute, is_done


@dataclass(frozen=True)
class Local:
    """Run on this machine.

    Args:
        jobs: worker processes running at the same time (1: in this process, one after another).
    """

    jobs: int = 1


def worker_slots(workers: int, *, cores: list[int], gpus: int) -> list[dict[str, Any]]:
    """Each worker's cores, threads and environment: the cores split into `workers` contiguous shares
    (at least one each; shared round robin when there are more workers than cores), one GPU per worker
    when there are GPUs."""
    slots = []
    for i in range(workers):
        if workers > len(cores):
            share = [cores[i % len(cores)]]
        else:
            share = cores[i * len(cores) // workers:(i + 1) * len(cores) // workers]
        env = {"OMP_NUM_THREADS": str(len(share)), "MKL_NUM_THREADS": str(len(share))}
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(i % gpus)
        slots.append({"cores": share, "env": env})
    return slots


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _pin(slots: Any) -> None:
    """Process-pool initializer: take one slot and pin this worker (and the kernels it starts) to it."""
    slot = slots.get()
    os.environ.update(slot["env"])
    os.sched_setaffinity(0, slot["cores"])
    import torch

    torch.set_num_threads(len(slot["cores"]))


def _execute_quiet(job: Job) -> str:
    return execute(job, progress=False)


def run_local(jobs: list[Job], *, workers: int, progress: bool = True) -> dict[str, str]:
    """Runs the jobs here (`workers` 1) or in `workers` pinned processes; returns {folder: error}."""
    if workers <= 1 or len(jobs) <= 1:
        return {str(job.folder): execute(job, progress=progress) for job in jobs}
    import multiprocessing

    # spawn, not fork: the parent may hold torch threads and CUDA state, which do not survive a fork.
    context = multiprocessing.get_context("spawn")
    workers = min(workers, len(jobs))
    slots = context.Queue()
    for slot in worker_slots(workers, cores=sorted(os.sched_getaffinity(0)), gpus=_visible_gpus()):
        slots.put(slot)
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_pin, initargs=(slots,)) as pool:
        errors = pool.map(_execute_quiet, jobs)
        return {str(job.folder): error for job, error in zip(jobs, errors)}


def run_jobs(jobs: list[Job], *, launcher: Any = None, progress: bool = True) -> dict[str, str]:
    """Runs the jobs that are not done with `launcher` (`Local` (default) or `m2f.reproduce.slurm.Slurm`);
    returns {folder: error} for every job ("" when it is done)."""
    launcher = launcher or Local()
    todo = [job for job in jobs if not is_done(job)]
    errors = {str(job.folder): "" for job in jobs}
    if not todo:
        return errors
    if isinstance(launcher, Local):
        errors.update(run_local(todo, workers=launcher.jobs, progress=progress))
    else:
        from m2f.reproduce.slurm import run_slurm

        errors.update(run_slurm(todo, launcher))
    return errors
