"""CPU cores of a rank: how many threads each rank gets, and which cores it is pinned to.

Torch-free (only ``os``), so that planning a job (threads per rank in OUT/job.json and in the
dry run) does not import torch; the rank sets torch's thread count itself (jobs.local.worker).
"""

from __future__ import annotations

import os


def threads_per_rank(num_ranks: int, num_cores: int, omp_num_threads: str | None) -> int:
    """CPU threads each rank uses: OMP_NUM_THREADS when set, else floor(cores / ranks), at least 1.

    Args:
        num_ranks: ranks on this node, >= 1.
        num_cores: cores this process may use (``len(os.sched_getaffinity(0))``).
        omp_num_threads: the OMP_NUM_THREADS environment value, or None.
    Raises:
        ValueError: OMP_NUM_THREADS is set but is not a positive integer.
    """
    if omp_num_threads:
        try:
            value = int(omp_num_threads)
        except ValueError:
            value = 0
        if value < 1:
            raise ValueError(f"OMP_NUM_THREADS={omp_num_threads!r} is not a positive integer")
        return value
    return max(1, num_cores // max(1, num_ranks))


def available_cores() -> int:
    """Cores this process may run on (respects taskset / SLURM cpu binding)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_cores_for(local_rank: int, local_world_size: int, threads: int, allowed: list[int]) -> list[int] | None:
    """The cores a CPU rank is pinned to: its own slice of ``threads`` cores, so that ranks do
    not migrate onto each other's cores (one of two ranks sharing a core runs at half speed).

    Args:
        local_rank, local_world_size: the rank's place on this node.
        threads: threads per rank.
        allowed: cores this process may use, sorted (``sorted(os.sched_getaffinity(0))``).
    Returns:
        ``allowed[local_rank * threads : (local_rank + 1) * threads]``, or None (do not pin)
        when the ranks' threads do not fit on the allowed cores.
    """
    if local_world_size * threads > len(allowed):
        return None
    return allowed[local_rank * threads : (local_rank + 1) * threads]


def pin_cpu_rank(local_rank: int, local_world_size: int, threads: int) -> list[int] | None:
    """Pin this process to its cores (see ``cpu_cores_for``); returns them, or None if it did not."""
    try:
        allowed = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return None
    cores = cpu_cores_for(local_rank, local_world_size, threads, allowed)
    if cores is not None and local_world_size > 1:
        os.sched_setaffinity(0, cores)
    return cores
