"""DenoiserHook: the intercepted denoiser computes what the module computes, and records steps."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from parallel.executors import SerialBranchExecutor
from pipeline.denoiser import DenoiserHook
from pipeline.families.base import CfgConvention
from pipeline.samples import StepRecord

SD = CfgConvention(denoisers=("unet",), calls=(("uncond", "cond"),),
                   sample_keys=frozenset({"sample", "encoder_hidden_states"}), latents_key="sample")


class TinyUNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[int] = []

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> Any:
        self.calls.append(sample.shape[0])
        out = sample * 2 + encoder_hidden_states.mean()
        return {"sample": out} if return_dict else (out,)


class FakePipe:
    def __init__(self) -> None:
        self.unet = TinyUNet()


def _inputs(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(2B, 3, 2, 2) latents and (2B, 4, 8) embeddings whose two halves have the same mean.

    The module's ``encoder_hidden_states.mean()`` spans the whole call, so the serial executor
    (one call per half) equals the unwrapped call only when each half has the mean of the whole.
    Values are multiples of 1/4, so every mean is exact whatever the summation order.
    """
    x = torch.arange(2 * batch * 12, dtype=torch.float32).reshape(2 * batch, 3, 2, 2) / 4
    half = torch.arange(batch * 32, dtype=torch.float32).reshape(batch, 4, 8) / 4
    e = torch.cat([half, half.flip(0)])
    assert e[:batch].mean() == e.mean() == e[batch:].mean()
    return x, e


@pytest.mark.parametrize("batched", [True, False])
def test_intercepted_call_matches_module(batched: bool) -> None:
    pipe = FakePipe()
    x, e = _inputs(2)
    expected = TinyUNet()(x, torch.tensor(5), encoder_hidden_states=e, return_dict=False)
    hook = DenoiserHook(pipe, SD, SerialBranchExecutor(batched=batched))
    with hook.intercept(batch=2, guidance=True) as trace:
        steps = trace.steps
        got = pipe.unet(x, torch.tensor(5), encoder_hidden_states=e, return_dict=False)
    assert isinstance(got, tuple) and len(got) == 1
    assert torch.equal(got[0], expected[0])
    assert pipe.unet.calls == ([4] if batched else [2, 2])
    assert len(steps) == 1
    (step,) = steps
    assert isinstance(step, StepRecord)
    assert step.step_index == 0
    assert step.timestep == 5.0
    assert step.uncond == "fresh"
    assert step.denoiser == "unet"
    assert step.step_s >= 0.0


def test_steps_recorded_in_order() -> None:
    pipe = FakePipe()
    x, e = _inputs(1)
    hook = DenoiserHook(pipe, SD, SerialBranchExecutor(batched=True))
    with hook.intercept(batch=1, guidance=True) as trace:
        steps = trace.steps
        for t in (999, 500, 1):
            pipe.unet(x, torch.tensor(t), encoder_hidden_states=e, return_dict=False)
    assert [(s.step_index, s.timestep) for s in steps] == [(0, 999.0), (1, 500.0), (2, 1.0)]


def test_timestep_as_keyword() -> None:
    pipe = FakePipe()
    x, e = _inputs(1)
    hook = DenoiserHook(pipe, SD, SerialBranchExecutor(batched=False))
    with hook.intercept(batch=1, guidance=True) as trace:
        steps = trace.steps
        got = pipe.unet(x, timestep=torch.tensor(42.0), encoder_hidden_states=e, return_dict=False)
    assert torch.equal(got[0], x * 2 + e.mean())
    assert steps[0].timestep == 42.0


def test_wrong_batch_raises_and_restores() -> None:
    pipe = FakePipe()
    x, e = _inputs(2)
    hook = DenoiserHook(pipe, SD, SerialBranchExecutor(batched=True))
    with pytest.raises(RuntimeError) as info:
        with hook.intercept(batch=3, guidance=True):
            pipe.unet(x, torch.tensor(5), encoder_hidden_states=e, return_dict=False)
    assert "unet" in str(info.value)
    assert "6" in str(info.value) and "4" in str(info.value)
    assert "forward" not in pipe.unet.__dict__
    assert pipe.unet.calls == []


def test_forward_restored_after_block() -> None:
    pipe = FakePipe()
    x, e = _inputs(1)
    hook = DenoiserHook(pipe, SD, SerialBranchExecutor(batched=True))
    assert "forward" not in pipe.unet.__dict__
    with hook.intercept(batch=1, guidance=True):
        assert "forward" in pipe.unet.__dict__
    assert "forward" not in pipe.unet.__dict__
    assert pipe.unet.forward.__func__ is TinyUNet.forward
    # after the block the module is plain again: any batch goes through unrecorded
    out = pipe.unet(x[:1], torch.tensor(1), encoder_hidden_states=e[:1], return_dict=False)
    assert torch.equal(out[0], x[:1] * 2 + e[:1].mean())


def test_prior_instance_forward_restored() -> None:
    pipe = FakePipe()
    original = pipe.unet.forward
    pipe.unet.forward = original  # e.g. an offload hook's instance attribute
    prior = pipe.unet.__dict__["forward"]
    with DenoiserHook(pipe, SD, SerialBranchExecutor(batched=True)).intercept(
        batch=1, guidance=False
    ):
        assert pipe.unet.__dict__["forward"] is not prior
    assert pipe.unet.__dict__["forward"] is prior


def test_no_guidance_records_none() -> None:
    pipe = FakePipe()
    x = torch.arange(2 * 3.0).reshape(2, 3)
    e = torch.arange(2 * 4.0).reshape(2, 1, 4)
    hook = DenoiserHook(pipe, SD, SerialBranchExecutor(batched=True))
    with hook.intercept(batch=2, guidance=False) as trace:
        steps = trace.steps
        got = pipe.unet(x, torch.tensor(3), encoder_hidden_states=e, return_dict=False)
    assert torch.equal(got[0], x * 2 + e.mean())
    assert pipe.unet.calls == [2]
    assert len(steps) == 1
    assert steps[0].uncond == "none"
    assert steps[0].timestep == 3.0


def test_no_guidance_rejects_cfg_batch() -> None:
    pipe = FakePipe()
    x, e = _inputs(2)  # 4 rows: a CFG-sized call
    hook = DenoiserHook(pipe, SD, SerialBranchExecutor(batched=True))
    with pytest.raises(RuntimeError), hook.intercept(batch=2, guidance=False):
        pipe.unet(x, torch.tensor(3), encoder_hidden_states=e, return_dict=False)


def test_tensor_output_module() -> None:
    class Plain(torch.nn.Module):
        def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
            return sample + timestep

    class Pipe:
        unet = Plain()
        transformer = None

    pipe = Pipe()
    conv = CfgConvention(denoisers=("unet", "transformer"), calls=(("uncond", "cond"),),
                         sample_keys=frozenset({"sample"}), latents_key="sample")
    x = torch.arange(4.0)
    with DenoiserHook(pipe, conv, SerialBranchExecutor(batched=False)).intercept(
        batch=2, guidance=True
    ) as trace:
        steps = trace.steps
        got = pipe.unet(x, torch.tensor(1.0))
    assert isinstance(got, torch.Tensor)
    assert torch.equal(got, x + 1)
    assert [s.denoiser for s in steps] == ["unet"]


def test_two_call_convention_needs_the_uncond_inputs() -> None:
    conv = CfgConvention(denoisers=("unet",), calls=(("cond",), ("uncond",)),
                         sample_keys=frozenset({"sample", "encoder_hidden_states"}), latents_key="sample")
    pipe = FakePipe()
    pipe.scheduler = type("S", (), {"timesteps": torch.arange(2)})()
    hook = DenoiserHook(pipe, conv, SerialBranchExecutor(batched=True))
    x, e = _inputs(1)
    with pytest.raises(ValueError, match="uncond of a later call has no inputs"), hook.intercept(batch=1, guidance=True):
        pipe.unet(x[:1], torch.tensor(5), encoder_hidden_states=e[:1])


class NanUNet(TinyUNet):
    """Sample 1's cond prediction turns NaN from the third call on."""

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states=None,  # noqa: ANN001
                return_dict: bool = True) -> Any:  # fmt: skip
        out = super().forward(sample, timestep, encoder_hidden_states, return_dict=False)[0].clone()
        if len(self.calls) >= 3 and sample.shape[0] == 4:  # [uncond 0, uncond 1, cond 0, cond 1]
            out[3] = float("nan")
        return {"sample": out} if return_dict else (out,)


@pytest.mark.parametrize("batched", [True, False])
def test_non_finite_predictions_are_named_per_sample(batched: bool) -> None:
    pipe = FakePipe()
    pipe.unet = NanUNet()
    x, e = _inputs(2)
    hook = DenoiserHook(pipe, SD, SerialBranchExecutor(batched=True))
    with hook.intercept(batch=2, guidance=True) as trace:
        for t in (900, 800, 700, 600):
            pipe.unet(x, torch.tensor(t), encoder_hidden_states=e, return_dict=False)
    assert trace.nonfinite_errors(2) == [None, "non-finite cond noise prediction at step 2 (unet)"]


def test_check_finite_keeps_the_first_step() -> None:
    from pipeline.denoiser import DenoiseTrace
    from pipeline.gating import CfgGate

    trace = DenoiseTrace([StepRecord(i, 0.0, "transformer", "fresh", 0.0) for i in range(3)],
                         CfgGate(1.0, 3, None))  # fmt: skip
    ok = torch.zeros(3, 2)
    inf_at_0 = ok.clone()
    inf_at_0[0, 1] = float("inf")
    trace.check_finite(0, {"cond": ok, "uncond": ok})
    trace.check_finite(1, {"cond": ok, "uncond": inf_at_0})
    trace.check_finite(2, {"cond": inf_at_0, "uncond": inf_at_0})
    assert trace.nonfinite_errors(3) == [
        "non-finite uncond noise prediction at step 1 (transformer)", None, None]
