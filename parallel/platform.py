"""Platform rules: which device a rank uses, which collective backend, which default dtype.

cuda -> nccl, npu (Ascend, torch_npu) -> hccl, cpu -> gloo. A rank is pinned to the device of
its LOCAL_RANK; CUDA_VISIBLE_DEVICES (as SLURM or the user sets it) is respected because device
indices are taken relative to what torch sees.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True, kw_only=True)
class Platform:
    """The accelerator family this process runs on."""

    name: str
    """"cuda", "npu" or "cpu"."""
    backend: str
    """torch.distributed backend: "nccl", "hccl" or "gloo"."""
    num_devices: int
    """Accelerators visible to this process; 0 on cpu."""

    def device(self, local_rank: int) -> torch.device:
        """The device a rank uses.

        Args:
            local_rank: rank within this node, >= 0.
        Returns:
            ``cuda:<local_rank>`` / ``npu:<local_rank>``, or ``cpu``.
        Raises:
            ValueError: local_rank >= the number of visible devices.
        """
        if self.name == "cpu":
            return torch.device("cpu")
        if not 0 <= local_rank < self.num_devices:
            raise ValueError(
                f"local rank {local_rank} has no {self.name} device: {self.num_devices} visible"
            )
        return torch.device(self.name, local_rank)

    def bind(self, local_rank: int) -> torch.device:
        """Pin this process to the device of ``local_rank`` and return it.

        Sets the current CUDA / NPU device (NCCL and HCCL collectives, and
        ``all_gather_object``, use it); on cpu there is nothing to pin.

        Raises:
            ValueError: local_rank >= the number of visible devices.
        """
        device = self.device(local_rank)
        if self.name == "cuda":
            torch.cuda.set_device(device)
        elif self.name == "npu":
            torch.npu.set_device(device)  # type: ignore[attr-defined]
        return device

    @property
    def process_group_backend(self) -> str:
        """Backend string for ``init_process_group``: the accelerator's backend for device
        tensors plus gloo for CPU tensors (``"cpu:gloo,cuda:nccl"``), so that small control
        exchanges stay on the host and never wait for the device stream."""
        if self.name == "cpu":
            return "gloo"
        return f"cpu:gloo,{self.name}:{self.backend}"

    @property
    def default_dtype(self) -> torch.dtype:
        """bfloat16 on accelerators, float32 on cpu (bf16 matmuls are slow on most CPUs)."""
        return torch.float32 if self.name == "cpu" else torch.bfloat16


def detect_platform() -> Platform:
    """Detect the accelerator: CUDA first, then Ascend NPU (if torch_npu imports), else CPU."""
    if torch.cuda.is_available():
        return Platform(name="cuda", backend="nccl", num_devices=torch.cuda.device_count())
    try:
        import torch_npu  # noqa: F401  (registers torch.npu)

        if torch.npu.is_available():  # type: ignore[attr-defined]
            return Platform(name="npu", backend="hccl", num_devices=torch.npu.device_count())  # type: ignore[attr-defined]
    except ImportError:
        pass
    return Platform(name="cpu", backend="gloo", num_devices=0)


def parse_dtype(name: str | None, platform: Platform) -> torch.dtype:
    """Resolve a ``--dtype`` value.

    Args:
        name: "float32", "float16", "bfloat16", or None / "auto" for the platform default.
        platform: the detected platform.
    Raises:
        ValueError: an unknown name; the message lists the allowed ones.
    """
    if name in (None, "auto"):
        return platform.default_dtype
    if name not in _DTYPES:
        raise ValueError(f"--dtype {name!r} is not one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]
