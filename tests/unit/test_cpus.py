"""CPU rules: threads per rank, usable cores, each rank's own cores."""

from __future__ import annotations

import os

import pytest

from parallel.cpus import available_cores, cpu_cores_for, threads_per_rank


@pytest.mark.parametrize(
    ("ranks", "cores", "omp", "expected"),
    [
        (2, 2, None, 1),
        (1, 2, None, 2),
        (4, 2, None, 1),
        (2, 8, "3", 3),
        (3, 16, None, 5),
        (1, 1, None, 1),
        (8, 2, "4", 4),
    ],
)
def test_threads_per_rank(ranks: int, cores: int, omp: str | None, expected: int) -> None:
    assert threads_per_rank(ranks, cores, omp) == expected


@pytest.mark.parametrize("omp", ["x", "0", "-2", "1.5"])
def test_threads_per_rank_bad_omp(omp: str) -> None:
    with pytest.raises(ValueError) as info:
        threads_per_rank(2, 2, omp)
    assert "OMP_NUM_THREADS" in str(info.value)


def test_available_cores() -> None:
    cores = available_cores()
    assert cores >= 1
    if hasattr(os, "sched_getaffinity"):
        assert cores == len(os.sched_getaffinity(0))


def test_cpu_cores_for_ranks() -> None:
    allowed = [0, 1, 2, 3, 4, 5]
    assert cpu_cores_for(0, 2, 3, allowed) == [0, 1, 2]
    assert cpu_cores_for(1, 2, 3, allowed) == [3, 4, 5]
    assert cpu_cores_for(1, 3, 2, [4, 5, 8, 9, 10, 11]) == [8, 9]
    assert cpu_cores_for(0, 2, 4, allowed) is None  # 8 threads do not fit on 6 cores
