"""CFG gating through the intercept: numeric semantics, module switches, CFG parallel == serial.

The fake pipeline runs diffusers' loop shape: one concatenated [uncond; cond] denoiser call per
step, then ``uncond + s * (cond - uncond)``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from parallel.branches import CfgParallelExecutor, SerialBranchExecutor
from pipeline.denoiser import DenoiserHook
from pipeline.families import CfgConvention
from pipeline.gating import CfgGate, gate_step
from tests.unit.test_cfg_parallel import run_group

WAN22 = CfgConvention(batched=True, branch_order=("uncond", "cond"),
                      denoisers=("transformer", "transformer_2"))  # fmt: skip


class Denoiser(torch.nn.Module):
    """uncond rows (embedding 0) predict t + 0.25, cond rows (embedding 1) t + 1.25, plus
    ``scale * x``; records which branch each forward saw."""

    def __init__(self, scale: float = 0.0) -> None:
        super().__init__()
        self.scale = scale
        self.calls: list[list[str]] = []

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor,
                encoder_hidden_states: torch.Tensor, return_dict: bool = True) -> Any:  # fmt: skip
        is_cond = encoder_hidden_states.flatten(1)[:, 0]
        self.calls.append(["cond" if c else "uncond" for c in is_cond.tolist()])
        t = timestep.float()
        out = self.scale * sample + (t + 0.25 + is_cond).view(-1, *[1] * (sample.dim() - 1))
        return (out,) if not return_dict else {"sample": out}


class Scheduler:
    def __init__(self, n: int) -> None:
        self.timesteps = torch.arange(n)


class LoopPipe:
    """diffusers' CFG loop; ``switch_at``: step from which ``transformer_2`` denoises."""

    def __init__(self, steps: int, switch_at: int | None = None, scale: float = 0.0) -> None:
        self.scheduler = Scheduler(steps)
        self.transformer = Denoiser(scale)
        self.transformer_2 = Denoiser(scale) if switch_at is not None else None
        self.switch_at = switch_at

    def __call__(self, x: torch.Tensor, s: float) -> list[torch.Tensor]:
        b = x.shape[0]
        emb = torch.cat([torch.zeros(b, 3, 2), torch.ones(b, 3, 2)])
        outs = []
        for i, t in enumerate(self.scheduler.timesteps):
            model = self.transformer
            if self.switch_at is not None and i >= self.switch_at:
                model = self.transformer_2
            pred = model(torch.cat([x, x]), t, encoder_hidden_states=emb, return_dict=False)[0]
            uncond, cond = pred.chunk(2)
            x = uncond + s * (cond - uncond)
            outs.append(x)
        return outs


@pytest.mark.parametrize(("steps", "fraction", "expected"),
                         [(8, 0.5, 4), (20, 0.5, 10), (20, 1.0, 20), (20, 0.0, 0), (7, 0.3, 2)])  # fmt: skip
def test_gate_step_rule(steps: int, fraction: float, expected: int) -> None:
    assert gate_step(steps, fraction) == expected


@pytest.mark.parametrize("fraction", [-0.1, 1.5, float("nan")])
def test_gate_step_out_of_range(fraction: float) -> None:
    with pytest.raises(ValueError, match="cfg_gate_step"):
        gate_step(10, fraction)


def test_numeric_semantics() -> None:
    """s = 4, gate after step 0: outputs 4.25 then 5.25; the denoiser runs uncond and cond at
    step 0 and cond alone at step 1."""
    pipe = LoopPipe(steps=2)
    hook = DenoiserHook(pipe, WAN22, SerialBranchExecutor(batched=False))
    with hook.intercept(batch=1, guidance=True, cfg_gate_step=0.5) as trace:
        outs = pipe(torch.zeros(1, 1), s=4.0)
    assert [o.item() for o in outs] == [4.25, 5.25]
    assert pipe.transformer.calls == [["uncond"], ["cond"], ["cond"]]
    assert [s.uncond for s in trace.steps] == ["fresh", "reused"]
    assert [s.branches for s in trace.steps] == [(("uncond", 0), ("cond", 0)), (("cond", 0),)]
    assert trace.gate.first_reused == 1 and trace.gate.invalidations == 0


def test_gating_off_runs_every_uncond() -> None:
    pipe = LoopPipe(steps=4)
    with DenoiserHook(pipe, WAN22, SerialBranchExecutor(batched=True)).intercept(
        batch=2, guidance=True, cfg_gate_step=1.0
    ) as trace:
        pipe(torch.zeros(2, 1), s=4.0)
    assert [s.uncond for s in trace.steps] == ["fresh"] * 4
    assert pipe.transformer.calls == [["uncond"] * 2 + ["cond"] * 2] * 4
    assert trace.gate.first_reused is None and trace.gate.delta is None


def test_denoiser_switch_invalidates_the_delta() -> None:
    """Wan 2.2 shape: transformer for steps 0-2, transformer_2 from step 3. Gate at step 1."""
    pipe = LoopPipe(steps=6, switch_at=3)
    with DenoiserHook(pipe, WAN22, SerialBranchExecutor(batched=False)).intercept(
        batch=1, guidance=True, cfg_gate_step=1 / 6
    ) as trace:
        pipe(torch.zeros(1, 1), s=3.0)
    assert [(s.denoiser, s.uncond) for s in trace.steps] == [
        ("transformer", "fresh"), ("transformer", "reused"), ("transformer", "reused"),
        ("transformer_2", "fresh"), ("transformer_2", "reused"), ("transformer_2", "reused"),
    ]  # fmt: skip
    assert trace.gate.invalidations == 1
    assert pipe.transformer_2.calls[0] == ["uncond"]  # one fresh uncond under the new module


def test_reused_uncond_is_cond_minus_the_frozen_delta() -> None:
    gate = CfgGate(0.5)
    cond0, uncond0 = torch.tensor([3.0, 5.0]), torch.tensor([1.0, 1.5])
    assert not gate.reuse(0, 4, "unet")
    gate.store("unet", cond0, uncond0)
    assert not gate.reuse(1, 4, "unet")  # before the gate step (2)
    assert gate.reuse(2, 4, "unet")
    assert torch.equal(gate.uncond(torch.tensor([4.0, 4.0])), torch.tensor([2.0, 0.5]))


@pytest.mark.parametrize("k", [2, 3])
def test_cfg_parallel_gating_equals_serial(k: int) -> None:
    """Fresh steps split uncond / cond over the group; reused steps run cond on one rank. Every
    rank ends with exactly the serial (separate forwards) outputs."""
    x = torch.linspace(-1, 1, 6).view(3, 2)

    def serial() -> list[torch.Tensor]:
        pipe = LoopPipe(steps=6, switch_at=4, scale=0.9)
        with DenoiserHook(pipe, WAN22, SerialBranchExecutor(batched=False)).intercept(
            batch=3, guidance=True, cfg_gate_step=0.5
        ):
            return pipe(x, s=5.0)

    def parallel(group) -> tuple[list[torch.Tensor], list, list]:  # noqa: ANN001
        pipe = LoopPipe(steps=6, switch_at=4, scale=0.9)
        hook = DenoiserHook(pipe, WAN22, CfgParallelExecutor(group, batched=True))
        with hook.intercept(batch=3, guidance=True, cfg_gate_step=0.5) as trace:
            outs = pipe(x, s=5.0)
        calls = pipe.transformer.calls + pipe.transformer_2.calls
        return outs, [s.uncond for s in trace.steps], calls

    expected = serial()
    results = run_group(k, parallel)
    for rank, (outs, unconds, _calls) in enumerate(results):
        assert all(torch.equal(a, b) for a, b in zip(outs, expected)), rank
        assert unconds == ["fresh", "fresh", "fresh", "reused", "fresh", "reused"]
    # rank 0 ran uncond at fresh steps and cond at reused steps; rank 1 cond at fresh steps
    assert results[0][2] == [["uncond"] * 3] * 3 + [["cond"] * 3] + [["uncond"] * 3] + [["cond"] * 3]
    assert results[1][2] == [["cond"] * 3] * 4
