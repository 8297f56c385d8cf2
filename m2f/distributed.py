"""torch.distributed in a few functions: the same code runs as 1 process or under torchrun (DDP).

Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK set), `init()` starts the process group: NCCL when CUDA is
there, gloo otherwise. Multi-node runs use torchrun's usual rendezvous flags; nothing here changes.
"""

import os

import torch
import torch.distributed as dist


def init() -> torch.device:
    """Starts the process group if launched by torchrun, and returns this process's device."""
    if "RANK" in os.environ and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Averages scalars over processes (for logging; every rank gets the same numbers)."""
    if not dist.is_initialized() or not values:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(values, (t / world_size()).tolist()))
