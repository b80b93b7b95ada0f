"""Platform rules: devices, dtypes, threads."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from parallel import platform as platform_mod
from parallel.platform import (
    Platform,
    available_cores,
    detect_platform,
    parse_dtype,
    threads_per_rank,
)

CPU = Platform(name="cpu", backend="gloo", num_devices=0)
CUDA2 = Platform(name="cuda", backend="nccl", num_devices=2)


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


def test_parse_dtype_defaults() -> None:
    assert parse_dtype(None, CPU) is torch.float32
    assert parse_dtype("auto", CPU) is torch.float32
    assert parse_dtype(None, CUDA2) is torch.bfloat16
    assert parse_dtype("auto", CUDA2) is torch.bfloat16


@pytest.mark.parametrize(
    ("name", "dtype"),
    [("float32", torch.float32), ("float16", torch.float16), ("bfloat16", torch.bfloat16)],
)
def test_parse_dtype_names(name: str, dtype: torch.dtype) -> None:
    assert parse_dtype(name, CPU) is dtype
    assert parse_dtype(name, CUDA2) is dtype


def test_parse_dtype_unknown_lists_allowed() -> None:
    with pytest.raises(ValueError) as info:
        parse_dtype("int8", CPU)
    message = str(info.value)
    assert "int8" in message
    for allowed in ("auto", "float32", "float16", "bfloat16"):
        assert allowed in message


def test_cpu_device() -> None:
    assert CPU.device(0) == torch.device("cpu")
    assert CPU.device(3) == torch.device("cpu")
    assert CPU.default_dtype is torch.float32


def test_cuda_device() -> None:
    assert CUDA2.device(0) == torch.device("cuda", 0)
    assert CUDA2.device(1) == torch.device("cuda", 1)
    assert CUDA2.default_dtype is torch.bfloat16


@pytest.mark.parametrize("local_rank", [2, 5, -1])
def test_cuda_device_out_of_range(local_rank: int) -> None:
    with pytest.raises(ValueError) as info:
        CUDA2.device(local_rank)
    assert "2 visible" in str(info.value)


def test_detect_platform_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(platform_mod.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(platform_mod.torch.cuda, "device_count", lambda: 3)
    assert detect_platform() == Platform(name="cuda", backend="nccl", num_devices=3)


def test_detect_platform_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(platform_mod.torch.cuda, "is_available", lambda: False)
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # import fails
    assert detect_platform() == CPU


def test_available_cores() -> None:
    cores = available_cores()
    assert cores >= 1
    if hasattr(os, "sched_getaffinity"):
        assert cores == len(os.sched_getaffinity(0))


def test_process_group_backend_keeps_control_on_the_cpu() -> None:
    assert CPU.process_group_backend == "gloo"
    assert CUDA2.process_group_backend == "cpu:gloo,cuda:nccl"
    npu = Platform(name="npu", backend="hccl", num_devices=8)
    assert npu.process_group_backend == "cpu:gloo,npu:hccl"


def test_cpu_cores_for_ranks() -> None:
    from parallel.platform import cpu_cores_for

    allowed = [0, 1, 2, 3, 4, 5]
    assert cpu_cores_for(0, 2, 3, allowed) == [0, 1, 2]
    assert cpu_cores_for(1, 2, 3, allowed) == [3, 4, 5]
    assert cpu_cores_for(1, 3, 2, [4, 5, 8, 9, 10, 11]) == [8, 9]
    assert cpu_cores_for(0, 2, 4, allowed) is None  # 8 threads do not fit on 6 cores
