"""torch.distributed glue for `torchrun ... -m wbc train`: one process per device, rank 0 writes.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them everything is a world of one and no
process group is created. NCCL on CUDA, gloo on CPU (so DDP is testable on a laptop).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from wbc.device import resolve_device

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def setup(device_spec: str = "auto") -> DistEnv:
    """Join the torchrun process group when launched by torchrun; pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_spec)
    if world <= 1:
        return DistEnv(device=device)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if rank != 0:  # one voice: other ranks only report problems
        logging.getLogger("wbc").setLevel(logging.WARNING)
    log.info("DDP: %d processes (%s)", world, dist.get_backend())
    return DistEnv(rank=rank, world=world, local_rank=local, device=device)


def teardown(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def _comm_device(env: DistEnv) -> torch.device:
    # NCCL only reduces CUDA tensors; gloo wants CPU ones.
    return env.device if env.device.type == "cuda" else torch.device("cpu")


def any_true(env: DistEnv, flag: bool) -> bool:
    """True on every rank if `flag` is true on any (so all ranks stop together)."""
    if not env.distributed:
        return flag
    t = torch.tensor([float(flag)], device=_comm_device(env))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather_arrays(env: DistEnv, *arrays: np.ndarray) -> list[np.ndarray]:
    """Concatenate each array over ranks (rank order); identity in a world of one."""
    if not env.distributed:
        return list(arrays)
    out: list = [None] * env.world
    dist.all_gather_object(out, arrays)
    return [np.concatenate([o[i] for o in out]) for i in range(len(arrays))]


def sum_floats(env: DistEnv, *values: float) -> list[float]:
    if not env.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device(env))
    dist.all_reduce(t)
    return t.tolist()
