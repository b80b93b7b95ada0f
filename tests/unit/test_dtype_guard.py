"""The forbidden-dtype guard and the load-time device rules, on plain torch modules (no
diffusers): what is caught, what host work is let through, what adapt_pipeline converts."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from parallel.dtype_guard import ForbiddenDtypeError, ForbiddenDtypeGuard
from parallel.platform import DeviceRules
from pipeline.device_rules import adapt_pipeline, device_call

NPU_RULES = DeviceRules(forbidden_dtypes=(torch.float64, torch.complex128), channels_last_3d=False,
                        emulated_device="npu", guard=True)  # fmt: skip


@pytest.mark.parametrize("op", [
    lambda: torch.ones(2, dtype=torch.float64),  # a factory
    lambda: torch.ones(2).double(),  # a cast into float64
    lambda: torch.ones(2) * torch.tensor(2.0, dtype=torch.float64),  # a host float64 used in math
    lambda: torch.polar(torch.ones(2), torch.ones(2)).to(torch.complex128),
    lambda: torch.ones(2, dtype=torch.complex128),
    lambda: torch.arange(4, dtype=torch.float64).cos(),
])  # fmt: skip
def test_guard_catches_float64_and_complex128(op) -> None:  # noqa: ANN001
    with pytest.raises(ForbiddenDtypeError) as info, torch.inference_mode(), ForbiddenDtypeGuard():
        op()
    message = str(info.value)
    assert ("float64" in message or "complex128" in message) and "aten." in message
    assert "test_dtype_guard.py" in message  # the line that ran it


def test_guard_lets_host_numbers_in() -> None:
    """Scheduler tables from numpy and host constants cross into a call as float32."""
    guard = ForbiddenDtypeGuard()
    with torch.inference_mode(), guard:
        sigmas = torch.from_numpy(np.linspace(1.0, 0.0, 5)).to(dtype=torch.float32)
        timesteps = torch.from_numpy(np.linspace(999, 0, 5)).to(dtype=torch.int64)
        scale = torch.tensor([0.5], dtype=torch.float64).to(torch.float32)
        dst = torch.empty(5)
        dst.copy_(torch.from_numpy(np.arange(5.0)))
        value = torch.from_numpy(np.array(0.25)).item()
        out = (sigmas * scale + dst).sum() + timesteps.float().mean() + value
        latents_c = torch.polar(torch.ones(3), torch.zeros(3))  # complex64 is fine
    assert out.dtype is torch.float32 and latents_c.dtype is torch.complex64
    assert guard.ops_seen > 10


def test_guard_is_off_outside_its_block() -> None:
    with ForbiddenDtypeGuard():
        torch.ones(2) + 1
    assert torch.ones(2, dtype=torch.float64).sum().item() == 2.0


def test_guard_catches_a_float64_op_planted_in_a_module() -> None:
    class Planted(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (x.double() * 2).float()  # what a float64 rotary table does

    with pytest.raises(ForbiddenDtypeError, match="aten._to_copy.* on float64"), device_call(NPU_RULES):
        Planted()(torch.ones(3))


class Rope(torch.nn.Module):
    """A module holding what diffusers' rotary embeddings hold."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("freqs_cos", torch.ones(4, dtype=torch.float64))
        self.pos_freqs = torch.polar(torch.ones(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64))
        self.double_precision = True
        self.conv = torch.nn.Conv3d(2, 2, 1).to(memory_format=torch.channels_last_3d)


def test_adapt_pipeline_converts_tables_flags_and_formats() -> None:
    attention = []
    denoiser = Rope()
    denoiser.set_attention_backend = attention.append  # what diffusers' ModelMixin has
    scheduler = SimpleNamespace(config={}, step=None, alphas_cumprod=torch.ones(3, dtype=torch.float64),
                                sigmas=torch.ones(3))  # fmt: skip
    pipe = SimpleNamespace(transformer=denoiser, scheduler=scheduler, tokenizer=object())
    pipe.components = {"transformer": denoiser, "scheduler": scheduler, "tokenizer": pipe.tokenizer}
    changes = adapt_pipeline(pipe, NPU_RULES)
    assert denoiser.freqs_cos.dtype is torch.float32 and "freqs_cos" in dict(denoiser.named_buffers())
    assert denoiser.pos_freqs.dtype is torch.complex64
    assert denoiser.double_precision is False
    assert denoiser.conv.weight.is_contiguous()
    assert scheduler.alphas_cumprod.dtype is torch.float32 and scheduler.sigmas.dtype is torch.float32
    assert attention == []  # "native" (SDPA): diffusers' default, nothing to set
    assert "transformer.double_precision -> False" in changes
    assert "scheduler.alphas_cumprod: float64 -> float32" in changes
    assert "transformer.pos_freqs: complex128 -> complex64" in changes
    assert adapt_pipeline(pipe, NPU_RULES) == []  # nothing left to change


def test_adapt_pipeline_sets_the_fused_attention_backend() -> None:
    attention = []
    denoiser = torch.nn.Linear(2, 2)
    denoiser.set_attention_backend = attention.append
    pipe = SimpleNamespace(components={"transformer": denoiser}, transformer=denoiser)
    adapt_pipeline(pipe, DeviceRules(attention_backend="_native_npu"))
    assert attention == ["_native_npu"]


def test_no_rules_change_nothing() -> None:
    denoiser = Rope()
    pipe = SimpleNamespace(components={"transformer": denoiser}, transformer=denoiser)
    assert adapt_pipeline(pipe, None) == [] and adapt_pipeline(pipe, DeviceRules()) == []
    assert denoiser.freqs_cos.dtype is torch.float64 and denoiser.double_precision is True
    with device_call(DeviceRules()) as guard:
        assert guard is None
        torch.ones(2, dtype=torch.float64) + 1
