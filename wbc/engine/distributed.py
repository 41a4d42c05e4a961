"""torch.distributed glue for `torchrun ... -m wbc train|extract`: one process per device.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them everything is a world of one, no
process group is created and every collective is a no-op. NCCL on CUDA, gloo on CPU (so DDP
is testable on a laptop). Rank 0 writes the run's files; other ranks only report problems.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from wbc.device import resolve_device
from wbc.errors import WbcError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # we initialised the process group, so we tear it down

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def any(self, flag: bool) -> bool:
        """True on every rank if `flag` is true on any (so all ranks stop together, none hangs)."""
        if not self.distributed:
            return flag
        t = torch.tensor([float(flag)], device=self._comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def checked(self, fn: Callable[[], Any], main_only: bool = False) -> Any:
        """fn() on every rank (or rank 0 only); if it raises anywhere, raise on every rank.

        Doubles as a barrier, so a rank that fails never leaves the others waiting forever.
        """
        err, out = None, None
        if self.is_main or not main_only:
            try:
                out = fn()
            except Exception as e:  # noqa: BLE001 - re-raised below, once every rank knows
                err = e
        if self.any(err is not None):
            if err is not None:
                raise err
            raise WbcError("another rank failed (see its message); written blocks are kept: "
                           "rerun the same command to resume")
        return out

    def gather(self, obj: Any) -> list[Any]:
        """`obj` of every rank, in rank order."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def gather_arrays(self, *arrays: np.ndarray) -> list[np.ndarray]:
        """Concatenate each array over ranks (rank order); identity in a world of one."""
        if not self.distributed:
            return list(arrays)
        out = self.gather(arrays)
        return [np.concatenate([o[i] for o in out]) for i in range(len(arrays))]

    def sum_floats(self, *values: float) -> list[float]:
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t)
        return t.tolist()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()

    def _comm_device(self) -> torch.device:
        # NCCL only reduces CUDA tensors; gloo wants CPU ones.
        return self.device if self.device.type == "cuda" else torch.device("cpu")


def setup(device: str = "auto") -> DistEnv:
    """Join the torchrun job when WORLD_SIZE > 1 (or a process group exists); else a world of one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = resolve_device(device)
    if world <= 1 and not dist.is_initialized():
        return DistEnv(device=dev)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    env = DistEnv(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local, device=dev,
                  owns_group=owns)
    if not env.is_main:  # one voice: other ranks only report problems
        logging.getLogger("wbc").setLevel(logging.WARNING)
    log.info("DDP: %d processes (%s)", env.world, dist.get_backend())
    return env
