"""Multi-process extraction (torchrun): who am I, which device, and the few collectives needed.

Ranks share nothing but the output store: rank r extracts row blocks b with b % world == r and
writes them itself (a block is one chunk file per array, so writes never collide). Rank 0 creates
the store before a barrier and marks it complete after a second one. A single process needs none
of this: `Dist.world == 1` and every collective is a no-op.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from wbc.device import resolve_device
from wbc.errors import WbcError


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # we initialised the process group, so we tear it down

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def any(self, flag: bool) -> bool:
        """True if `flag` is set on any rank (lets a failing rank stop the others without a hang)."""
        if self.world == 1:
            return flag
        t = torch.tensor([int(flag)], device=self._coll_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def checked(self, fn: Callable[[], Any], main_only: bool = False) -> Any:
        """fn() on every rank (or rank 0 only); if it raises anywhere, raise on every rank.

        Doubles as a barrier, so a rank that fails never leaves the others waiting forever.
        """
        err, out = None, None
        if self.main or not main_only:
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
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()

    def _coll_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


def setup(device: str = "auto") -> Dist:
    """Join the torchrun job when WORLD_SIZE > 1 (nccl on CUDA, gloo otherwise), else one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not dist.is_initialized():
        return Dist(device=resolve_device(device))
    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        owns = True
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), device=dev, owns_group=owns)
