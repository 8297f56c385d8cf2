"""torch.distributed in a few functions: the same code runs as 1 process or under torchrun (DDP).

Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK set), `init()` starts the process group: NCCL when CUDA is
there, gloo otherwise. Multi-node runs use torchrun's usual rendezvous flags; the training code does not change.
`Rendezvous` is where the torchrun agents of one training meet: a launcher (`m2f.reproduce.slurm`) puts it in
the environment, and `m2f.experiment` turns it into torchrun's flags on every node.
"""

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Rendezvous:
    """torchrun's static rendezvous of one training: `nnodes` agents, this one `node_rank`, all meeting at
    `master_addr:master_port` (the TCP store that node 0's agent opens).

    Static, not c10d: a node's rank is fixed by its launcher (Slurm's node id), so global rank 0 is always on
    node 0, the node that evaluates and reports; an elastic rendezvous would number the nodes in the order they
    join. Elasticity is not needed: a failed or preempted multi-node job is requeued whole and resumes from
    its checkpoint.

    Args:
        nnodes: nodes of the training (torchrun `--nnodes`).
        node_rank: this node (`--node-rank`, 0..nnodes-1).
        master_addr: the host of node 0, which every node can resolve (`--master-addr`).
        master_port: a port free on node 0, the same on every node (`--master-port`).
    """

    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int

    def torchrun_args(self) -> list[str]:
        return [f"--nnodes={self.nnodes}", f"--node-rank={self.node_rank}", f"--master-addr={self.master_addr}",
                f"--master-port={self.master_port}"]

    def to_env(self) -> dict[str, str]:
        """The environment variables `from_env` reads (a notebook kernel inherits them from its launcher)."""
        return {f"M2F_{f.name.upper()}": str(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "Rendezvous | None":
        """The rendezvous a launcher exported (`to_env`), or None outside one (plain torchrun on this node)."""
        if "M2F_NNODES" not in env:
            return None
        return cls(**{f.name: f.type(env[f"M2F_{f.name.upper()}"]) for f in fields(cls)})  # int(...), str(...)


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


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is True on at least one: decisions that must be collective (whether to
    checkpoint now) taken from per-rank information (each rank's clock)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather_objects(obj: object) -> list[object]:
    """Every rank's `obj`, in rank order, on every rank ([obj] without torch.distributed)."""
    if not dist.is_initialized():
        return [obj]
    out: list[object] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out
