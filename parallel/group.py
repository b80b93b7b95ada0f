"""Process groups: the default group's lifetime, and the CFG subgroups of ParallelDims.

World size 1 runs without a process group. Every collective error (a timeout, a peer that
closed its connection) comes out as ``CollectiveError``.
"""

from __future__ import annotations

import datetime as dt
import os
from typing import Any

import torch
import torch.distributed as dist

from parallel.cfg_group import CfgGroup, CollectiveError
from parallel.dims import ParallelDims
from parallel.platform import Platform


def init_ranks(*, rank: int, world_size: int, platform: Platform, timeout_s: float) -> None:
    """Join the default process group (env:// rendezvous, as torchrun sets it up), after
    setting the platform's per-job collective variables that the user has not set.

    Args:
        rank: this process's global rank, in [0, world_size).
        world_size: number of ranks; 1 skips the process group entirely.
        platform: picks the backend (nccl / hccl / gloo).
        timeout_s: seconds a collective may wait before failing instead of hanging.
    """
    if world_size == 1 or dist.is_initialized():
        return
    # Per-job collective settings (npu: HCCL_IF_BASE_PORT from the rendezvous port, so two jobs
    # on one node do not collide); the rendezvous port is the same on every rank of the job.
    port = os.environ.get("MASTER_PORT", "")
    for key, value in platform.collective_env(rdzv_port=int(port) if port.isdigit() else None,
                                              environ=os.environ).items():  # fmt: skip
        os.environ.setdefault(key, value)
    dist.init_process_group(
        backend=platform.process_group_backend,
        rank=rank,
        world_size=world_size,
        timeout=dt.timedelta(seconds=timeout_s),
    )


def barrier() -> None:
    """Wait for every rank; a no-op without a process group."""
    if dist.is_initialized():
        dist.barrier()


def close_ranks() -> None:
    """Leave the process group, if any."""
    if dist.is_initialized():
        dist.destroy_process_group()


def record_errors(fn):  # type: ignore[no-untyped-def]
    """torchrun's error recorder: a failing rank's traceback is shown in the launcher's report."""
    from torch.distributed.elastic.multiprocessing.errors import record

    return record(fn)


class DistTransport:
    """``parallel.cfg_group.Transport`` over a torch.distributed group.

    Args:
        group: the process group (from ``dist.new_group``).
        ranks: its global ranks, in group-rank order.
        timeout_s: the collective timeout, for error messages.
    """

    def __init__(self, group: Any, ranks: list[int], timeout_s: float) -> None:
        self.group = group
        self.ranks = ranks
        self.size = len(ranks)
        self.rank = dist.get_group_rank(group, dist.get_rank())
        self.timeout_s = timeout_s

    def _failed(self, exc: Exception) -> CollectiveError:
        return CollectiveError(
            f"CFG group of ranks {self.ranks}: a collective failed (a rank died, or did not "
            f"answer within --collective-timeout {self.timeout_s:g} s): {exc}"
        )

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        out = [torch.empty_like(tensor) for _ in range(self.size)]
        try:
            dist.all_gather(out, tensor, group=self.group)
        except (RuntimeError, dist.DistError) as exc:
            raise self._failed(exc) from exc
        return out

    def all_gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.size
        try:
            dist.all_gather_object(out, obj, group=self.group)
        except (RuntimeError, dist.DistError) as exc:
            raise self._failed(exc) from exc
        return out


def cfg_group(dims: ParallelDims, rank: int, *, device: torch.device, timeout_s: float) -> CfgGroup:
    """This rank's CFG group. Every rank must call it (subgroup creation is collective).

    Args:
        dims: the rank grid; ``dims.cfg == 1`` needs no process group at all.
        rank: this process's global rank.
        device: the rank's device (predictions are gathered there; control exchanges stay on
            the CPU).
        timeout_s: seconds a group collective may wait.
    """
    if dims.cfg == 1:
        return CfgGroup(None, device)
    mine = None
    for dp_rank in range(dims.dp_size):  # same order on every rank
        ranks = dims.cfg_group(dp_rank)
        group = dist.new_group(ranks, timeout=dt.timedelta(seconds=timeout_s))
        if rank in ranks:
            mine = DistTransport(group, ranks, timeout_s)
    assert mine is not None
    return CfgGroup(mine, device)
