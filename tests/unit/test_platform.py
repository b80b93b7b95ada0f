"""Platform policies: detection (cuda, npu through a fake torch.npu, a broken torch_npu install,
cpu, plugins), visibility parsing, dtype choice, backend strings, attention backends, device
rules and HCCL ports. No accelerator is needed: torch.cuda / torch.npu / torch_npu are faked."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch

from parallel import platform as platform_mod
from parallel.platform import (
    HCCL_PORT_BLOCK,
    DeviceRules,
    NpuPolicy,
    Platform,
    PlatformPolicy,
    Probe,
    detect_platform,
    hccl_base_port,
    parse_dtype,
    parse_visible_devices,
)

CPU = Platform(name="cpu", backend="gloo", num_devices=0, bf16_supported=False)
CUDA2 = Platform(name="cuda", backend="nccl", num_devices=2)
NPU8 = Platform(name="npu", backend="hccl", num_devices=8)
NPU_NO_BF16 = Platform(name="npu", backend="hccl", num_devices=1, bf16_supported=False)


class FakeNpu:
    """What torch_npu puts at torch.npu, with the answers a test picks."""

    def __init__(self, count: int = 8, bf16: bool = True, available: bool = True) -> None:
        self.count, self.bf16, self.available = count, bf16, available
        self.current: torch.device | None = None

    def is_available(self) -> bool:
        return self.available

    def device_count(self) -> int:
        return self.count

    def is_bf16_supported(self) -> bool:
        return self.bf16

    def set_device(self, device: torch.device) -> None:
        self.current = device

    def get_device_name(self, index: int) -> str:
        return "Ascend910B2"

    def max_memory_allocated(self, device: torch.device) -> int:
        return 123


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(platform_mod.torch.cuda, "is_available", lambda: False)


@pytest.fixture
def fake_npu(monkeypatch: pytest.MonkeyPatch, no_cuda: None) -> FakeNpu:
    """A working torch_npu: an importable module, and torch.npu."""
    npu = FakeNpu()
    monkeypatch.setitem(sys.modules, "torch_npu", types.ModuleType("torch_npu"))
    monkeypatch.setattr(torch, "npu", npu, raising=False)
    # the "npu" device type exists once torch_npu renames torch's privateuse1 backend, a
    # process-wide change a test must not make: devices are (type, index) pairs here
    monkeypatch.setattr(platform_mod, "_device", lambda kind, index: (kind, index))
    return npu


def _broken_torch_npu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, raise_line: str) -> None:
    """A torch_npu package on disk whose import raises (as one without CANN does)."""
    pkg = tmp_path / "torch_npu"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(raise_line + "\n")
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))


# detection


def test_detect_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(platform_mod.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(platform_mod.torch.cuda, "device_count", lambda: 3)
    monkeypatch.setattr(platform_mod.torch.cuda, "is_bf16_supported", lambda: False)
    monkeypatch.setattr(NpuPolicy, "probe", lambda self, env: pytest.fail("torch_npu tried on a CUDA machine"))
    found = detect_platform({"CUDA_VISIBLE_DEVICES": "1,3,5"})
    assert (found.name, found.backend, found.num_devices) == ("cuda", "nccl", 3)
    assert found.visible == ("1", "3", "5") and "3 CUDA device(s)" in found.reason
    assert found.default_dtype is torch.float16  # a GPU without bf16 (V100)


def test_detect_cpu_says_why(no_cuda: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # not installed
    found = detect_platform({})
    assert (found.name, found.backend, found.num_devices) == ("cpu", "gloo", 0)
    assert "cuda: torch.cuda.is_available() is False" in found.reason
    assert "npu: torch_npu is not installed" in found.reason
    assert found.rules is None and not found.guard


def test_detect_npu(fake_npu: FakeNpu) -> None:
    found = detect_platform({"ASCEND_RT_VISIBLE_DEVICES": "4,5,6,7"})
    assert (found.name, found.backend) == ("npu", "hccl")
    assert found.visible == ("4", "5", "6", "7")
    assert found.num_devices == 4  # the visible ones, though the fake reports 8
    assert found.default_dtype is torch.bfloat16
    assert found.process_group_backend == "cpu:gloo,npu:hccl"
    assert "Ascend NPU" in found.reason and "passed over: cuda" in found.reason


def test_detect_npu_without_bf16(fake_npu: FakeNpu) -> None:
    fake_npu.bf16 = False  # 310P
    found = detect_platform({})
    assert found.default_dtype is torch.float16
    assert parse_dtype("auto", found) is torch.float16
    assert parse_dtype("bfloat16", found) is torch.bfloat16  # asked for explicitly


def test_npu_bf16_query_that_raises_means_no_bf16(fake_npu: FakeNpu, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom() -> bool:
        raise RuntimeError("device init failed")

    monkeypatch.setattr(fake_npu, "is_bf16_supported", boom)
    assert detect_platform({}).default_dtype is torch.float16


def test_npu_installed_but_no_device(fake_npu: FakeNpu) -> None:
    fake_npu.available = False
    found = detect_platform({})
    assert found.name == "cpu" and "torch.npu.is_available() is False" in found.reason


@pytest.mark.parametrize("raise_line", [
    "raise RuntimeError('libhccl.so: cannot open shared object file')",  # CANN not sourced
    "raise OSError('libascendcl.so: cannot open shared object file')",
    "import torch_npu_missing_dependency",  # ModuleNotFoundError of another module
    "raise SystemError('corrupt')",
])  # fmt: skip
def test_broken_npu_install_falls_back_and_says_why(raise_line: str, tmp_path: Path, no_cuda: None,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    _broken_torch_npu(tmp_path, monkeypatch, raise_line)
    found = detect_platform({})
    assert found.name == "cpu"
    assert "torch_npu is installed but does not import" in found.reason
    assert "CANN" in found.reason
    detail = raise_line.split("(")[-1].strip("')") if "(" in raise_line else "torch_npu_missing_dependency"
    assert detail in found.reason


def test_broken_npu_query_falls_back(fake_npu: FakeNpu, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom() -> int:
        raise RuntimeError("drvGetDevNum failed")

    monkeypatch.setattr(fake_npu, "device_count", boom)
    found = detect_platform({})
    assert found.name == "cpu" and "drvGetDevNum failed" in found.reason


def test_forced_platform(fake_npu: FakeNpu) -> None:
    assert detect_platform({"GEN_PLATFORM": "cpu"}).name == "cpu"
    fake_npu.available = False
    with pytest.raises(ValueError, match="GEN_PLATFORM=npu: not usable here: .*is_available"):
        detect_platform({"GEN_PLATFORM": "npu"})
    with pytest.raises(ValueError, match="'tpu' is unknown: one of cuda, npu, cpu"):
        detect_platform({"GEN_PLATFORM": "tpu"})


def test_npu_rules_on_cpu(no_cuda: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch_npu", None)
    found = detect_platform({"GEN_PLATFORM_RULES": "npu"})
    assert (found.name, found.rules, found.guard) == ("cpu", "npu", True)
    assert "dtype rules of npu" in found.reason
    assert found.default_dtype is torch.float32 and found.process_group_backend == "gloo"
    rules = found.device_rules(torch.float32)
    assert rules == DeviceRules(forbidden_dtypes=(torch.float64, torch.complex128), attention_backend="native",
                                channels_last_3d=False, emulated_device="npu", guard=True)  # fmt: skip
    # the device decides the attention kernel: a CPU has no npu_fusion_attention
    assert found.device_rules(torch.bfloat16).attention_backend == "native"
    with pytest.raises(ValueError, match="'gpu' is unknown"):
        detect_platform({"GEN_PLATFORM_RULES": "gpu"})


def test_dtype_guard_switch(no_cuda: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch_npu", None)
    assert not detect_platform({"GEN_DTYPE_GUARD": "0"}).guard
    assert detect_platform({"GEN_DTYPE_GUARD": "1"}).guard
    # the guard only guards forbidden dtypes: a CPU's own rules forbid none
    assert not detect_platform({"GEN_DTYPE_GUARD": "1"}).device_rules(torch.float32).guard


class FakeXpuPolicy(PlatformPolicy):
    name = "xpu"
    backend = "xccl"

    def probe(self, environ: object) -> Probe:
        return Probe(True, "2 fake XPUs", 2, True)


def test_plugin_platform_from_an_entry_point(no_cuda: None, monkeypatch: pytest.MonkeyPatch) -> None:
    class EntryPoint:
        name = "xpu"

        def load(self) -> type[PlatformPolicy]:
            return FakeXpuPolicy

    class Broken(EntryPoint):
        name = "broken"

        def load(self) -> type[PlatformPolicy]:
            raise ImportError("plugin missing")

    import importlib.metadata

    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [Broken(), EntryPoint()])
    monkeypatch.setitem(sys.modules, "torch_npu", None)
    platform_mod.platform_policies.cache_clear()
    try:
        assert list(platform_mod.platform_policies()) == ["cuda", "npu", "cpu", "xpu"]
        found = detect_platform({})
        assert (found.name, found.num_devices, found.process_group_backend) == ("xpu", 2, "cpu:gloo,xpu:xccl")
        assert found.device(1) == torch.device("xpu", 1)
    finally:
        platform_mod.platform_policies.cache_clear()


# devices and binding


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


def test_npu_rank_binds_by_local_rank_within_visible_devices(fake_npu: FakeNpu) -> None:
    fake_npu.count = 4
    found = detect_platform({"ASCEND_RT_VISIBLE_DEVICES": "4,5,6,7"})
    assert found.bind(1) == ("npu", 1)
    assert fake_npu.current == ("npu", 1)  # torch_npu maps npu:1 to physical 5
    assert found.physical_device(1) == "5"
    assert found.peak_memory_bytes(found.device(1)) == 123
    with pytest.raises(ValueError, match=r"local rank 4 has no npu device: 4 visible \(ASCEND_RT_VISIBLE_DEVICES=4,5,6,7\)"):
        found.bind(4)


def test_npu_visible_devices_cap_the_count(fake_npu: FakeNpu) -> None:
    fake_npu.count = 8
    assert detect_platform({"ASCEND_RT_VISIBLE_DEVICES": "0,1"}).num_devices == 2
    assert detect_platform({"ASCEND_RT_VISIBLE_DEVICES": ""}).num_devices == 0


# visibility variables


@pytest.mark.parametrize(("var", "value", "parsed"), [
    ("ASCEND_RT_VISIBLE_DEVICES", "0,1,2,3", ("0", "1", "2", "3")),
    ("ASCEND_RT_VISIBLE_DEVICES", " 4, 6 ", ("4", "6")),
    ("ASCEND_RT_VISIBLE_DEVICES", "07", ("7",)),
    ("ASCEND_RT_VISIBLE_DEVICES", "", ()),
    ("ASCEND_RT_VISIBLE_DEVICES", None, None),
    ("CUDA_VISIBLE_DEVICES", "3,1", ("3", "1")),
    ("CUDA_VISIBLE_DEVICES", "GPU-8f1c2d3e,MIG-ab12", ("GPU-8f1c2d3e", "MIG-ab12")),
    ("CUDA_VISIBLE_DEVICES", "", ()),
])  # fmt: skip
def test_visible_devices(var: str, value: str | None, parsed: tuple[str, ...] | None) -> None:
    assert parse_visible_devices(var, value) == parsed


@pytest.mark.parametrize(("var", "value"), [
    ("ASCEND_RT_VISIBLE_DEVICES", "1,0"),  # torch_npu sees no device at all
    ("ASCEND_RT_VISIBLE_DEVICES", "0,0"),
    ("ASCEND_RT_VISIBLE_DEVICES", "0-3"),  # torch_npu would silently read only "0"
    ("ASCEND_RT_VISIBLE_DEVICES", "0,,1"),
    ("ASCEND_RT_VISIBLE_DEVICES", "npu0"),
    ("CUDA_VISIBLE_DEVICES", "0,0"),
    ("CUDA_VISIBLE_DEVICES", "-1"),
    ("CUDA_VISIBLE_DEVICES", "0;1"),
])  # fmt: skip
def test_bad_visible_devices_name_the_variable(var: str, value: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_visible_devices(var, value)
    assert f"{var}={value!r} is invalid" in str(info.value)


def test_bad_visibility_fails_detection(fake_npu: FakeNpu) -> None:
    with pytest.raises(ValueError, match="ASCEND_RT_VISIBLE_DEVICES='3,2' is invalid"):
        detect_platform({"ASCEND_RT_VISIBLE_DEVICES": "3,2"})


# dtypes, backends, attention


def test_parse_dtype_defaults() -> None:
    assert parse_dtype(None, CPU) is torch.float32
    assert parse_dtype("auto", CPU) is torch.float32
    assert parse_dtype(None, CUDA2) is torch.bfloat16
    assert parse_dtype("auto", NPU8) is torch.bfloat16
    assert parse_dtype("auto", NPU_NO_BF16) is torch.float16


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


def test_process_group_backend_keeps_control_on_the_cpu() -> None:
    assert CPU.process_group_backend == "gloo"
    assert CUDA2.process_group_backend == "cpu:gloo,cuda:nccl"
    assert NPU8.process_group_backend == "cpu:gloo,npu:hccl"


def test_attention_backend() -> None:
    assert NPU8.attention_backend(torch.bfloat16) == "_native_npu"
    assert NPU8.attention_backend(torch.float16) == "_native_npu"
    assert NPU8.attention_backend(torch.float32) == "native"  # npu_fusion_attention: fp16/bf16 only
    assert CUDA2.attention_backend(torch.bfloat16) == "native"
    assert CPU.attention_backend(torch.float16) == "native"


def test_device_rules() -> None:
    npu = NPU8.device_rules(torch.bfloat16)
    assert npu.forbidden_dtypes == (torch.float64, torch.complex128)
    assert npu.attention_backend == "_native_npu" and not npu.channels_last_3d
    assert npu.emulated_device is None and not npu.guard  # real device: no guard unless asked
    assert not CUDA2.device_rules(torch.bfloat16).active
    assert not CPU.device_rules(torch.float32).active


# HCCL ports


def test_hccl_base_port_from_the_rendezvous_port() -> None:
    env = NpuPolicy().collective_env(rdzv_port=37709, environ={})
    assert env == {"HCCL_IF_BASE_PORT": str(hccl_base_port(37709))}
    base = hccl_base_port(37709)
    assert 16384 <= base <= 32768 - HCCL_PORT_BLOCK and base % HCCL_PORT_BLOCK == 0
    assert hccl_base_port(37709) == base  # every rank of the job derives the same


def test_hccl_ports_of_jobs_on_one_node_do_not_collide() -> None:
    for start in (32768, 45000, 60000, 65535 - 511):  # the kernel's free ports (torchrun's)
        blocks = {hccl_base_port(p) for p in range(start, start + 512)}
        assert len(blocks) == 512  # 512 consecutive rendezvous ports, 512 disjoint blocks
    assert len({hccl_base_port(p) for p in range(29500, 29516)}) == 16  # users' 29500, 29501...
    assert all(not base <= p < base + HCCL_PORT_BLOCK
               for p in range(1, 65536) for base in [hccl_base_port(p)])  # fmt: skip


def test_hccl_port_set_by_the_user_wins() -> None:
    assert NpuPolicy().collective_env(rdzv_port=37709, environ={"HCCL_IF_BASE_PORT": "50000"}) == {}
    assert NpuPolicy().collective_env(rdzv_port=None, environ={}) == {}
    assert CUDA2.collective_env(rdzv_port=37709, environ={}) == {}
    with pytest.raises(ValueError, match="rendezvous port 0 is invalid"):
        hccl_base_port(0)


def test_init_ranks_sets_the_hccl_port(monkeypatch: pytest.MonkeyPatch) -> None:
    """parallel.group.init_ranks sets the job's HCCL_IF_BASE_PORT from MASTER_PORT before joining."""
    from parallel import group

    seen = {}
    monkeypatch.setattr(group.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(group.dist, "init_process_group",
                        lambda **kw: seen.update(kw, port=group.os.environ.get("HCCL_IF_BASE_PORT")))  # fmt: skip
    monkeypatch.setenv("MASTER_PORT", "41234")
    monkeypatch.setenv("HCCL_IF_BASE_PORT", "unset")
    monkeypatch.delenv("HCCL_IF_BASE_PORT")  # restored (removed) after the test
    group.init_ranks(rank=0, world_size=2, platform=NPU8, timeout_s=5)
    assert seen["backend"] == "cpu:gloo,npu:hccl"
    assert seen["port"] == str(hccl_base_port(41234))
