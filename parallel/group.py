"""Process-group lifetime. World size 1 runs without a process group."""

from __future__ import annotations

import datetime as dt

import torch.distributed as dist

from parallel.platform import Platform


def init_ranks(*, rank: int, world_size: int, platform: Platform, timeout_s: float) -> None:
    """Join the default process group (env:// rendezvous, as torchrun sets it up).

    Args:
        rank: this process's global rank, in [0, world_size).
        world_size: number of ranks; 1 skips the process group entirely.
        platform: picks the backend (nccl / hccl / gloo).
        timeout_s: seconds a collective may wait before failing instead of hanging.
    """
    if world_size == 1 or dist.is_initialized():
        return
    dist.init_process_group(
        backend=platform.backend,
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
