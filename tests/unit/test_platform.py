"""Platform rules: devices, dtypes, backends."""

from __future__ import annotations

import sys

import pytest
import torch

from parallel import platform as platform_mod
from parallel.platform import Platform, detect_platform, parse_dtype

CPU = Platform(name="cpu", backend="gloo", num_devices=0)
CUDA2 = Platform(name="cuda", backend="nccl", num_devices=2)


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


def test_process_group_backend_keeps_control_on_the_cpu() -> None:
    assert CPU.process_group_backend == "gloo"
    assert CUDA2.process_group_backend == "cpu:gloo,cuda:nccl"
    npu = Platform(name="npu", backend="hccl", num_devices=8)
    assert npu.process_group_backend == "cpu:gloo,npu:hccl"
