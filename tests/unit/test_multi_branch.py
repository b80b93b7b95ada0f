"""Four branches in three calls with two outputs per forward (LTX-2's shape), through the
intercept: tuple predictions split, gathered and gated together; per-branch gating; CFG
parallel on 2, 3 and 4 ranks equal to serial.

The fake pipeline runs LTX2Pipeline's loop shape (diffusers pipelines/ltx2/pipeline_ltx2.py
:1404-1590): call 1 on [uncond; cond] (2B), call 2 "stg" (B, ``stg_blocks``), call 3
"modality" (B, ``isolate_modalities=True``); every call returns (video, audio); the combine is
``c + (g-1)(c-u) + s(c-stg) + (m-1)(c-mod)`` per output.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from parallel.executors import CfgParallelExecutor, SerialBranchExecutor
from pipeline.denoiser import DenoiserHook
from pipeline.families.base import CfgConvention
from tests.unit.test_cfg_parallel import run_group

LTX_LIKE = CfgConvention(
    denoisers=("transformer",),
    calls=(("uncond", "cond"), ("stg",), ("modality",)),
    sample_keys=frozenset({"hidden_states", "audio_hidden_states", "timestep", "encoder_hidden_states"}),
    latents_key="hidden_states",
    outputs=2,
)
OFFSET = {"uncond": 0.25, "cond": 1.25, "stg": 2.5, "modality": 4.0}


class AvDenoiser(torch.nn.Module):
    """Predicts, per sample, ``OFFSET[branch] + t + scale * x`` for video (B, 3, 2) and
    ``2 * that`` for audio (B, 5); the branch is told by the text embedding (0 uncond, 1
    cond) and the stg / modality kwargs. Records the branches of each forward."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale
        self.calls: list[list[str]] = []

    def forward(self, hidden_states: torch.Tensor, audio_hidden_states: torch.Tensor, timestep: torch.Tensor,
                encoder_hidden_states: torch.Tensor, stg_blocks: list[int] | None = None,
                isolate_modalities: bool = False, return_dict: bool = True) -> Any:  # fmt: skip
        is_cond = encoder_hidden_states[:, 0].bool()
        names = ["stg" if stg_blocks else "modality" if isolate_modalities else "cond" if c else "uncond"
                 for c in is_cond.tolist()]  # fmt: skip
        self.calls.append(names)
        off = torch.tensor([OFFSET[n] for n in names]) + timestep.float()
        video = self.scale * hidden_states + off.view(-1, 1, 1)
        audio = 2 * (self.scale * audio_hidden_states + off.view(-1, 1))
        return (video, audio)


class LoopPipe:
    def __init__(self, steps: int, scale: float = 0.5) -> None:
        self.scheduler = type("S", (), {"timesteps": torch.arange(steps)})()
        self.transformer = AvDenoiser(scale)

    def __call__(self, x: torch.Tensor, a: torch.Tensor, g: float = 3.0, s: float = 1.0,
                 m: float = 3.0) -> list[tuple[torch.Tensor, torch.Tensor]]:  # fmt: skip
        b = x.shape[0]
        pos, neg = torch.ones(b, 4), torch.zeros(b, 4)
        outs = []
        for t in self.scheduler.timesteps:
            v, au = self.transformer(torch.cat([x, x]), torch.cat([a, a]), t.expand(2 * b),
                                     torch.cat([neg, pos]), return_dict=False)  # fmt: skip
            vu, vc = v.chunk(2)
            au_u, au_c = au.chunk(2)
            vs, as_ = self.transformer(x, a, t.expand(b), pos, stg_blocks=[1], return_dict=False)
            vm, am = self.transformer(x, a, t.expand(b), pos, isolate_modalities=True, return_dict=False)
            x = vc + (g - 1) * (vc - vu) + s * (vc - vs) + (m - 1) * (vc - vm)
            a = au_c + (g - 1) * (au_c - au_u) + s * (au_c - as_) + (m - 1) * (au_c - am)
            outs.append((x, a))
        return outs


BRANCH_INPUTS = {"stg": {"stg_blocks": [1]}, "modality": {"isolate_modalities": True}}
X = torch.linspace(-1, 1, 18).view(3, 3, 2)
A = torch.linspace(0, 1, 15).view(3, 5)


def _hook(pipe: LoopPipe, executor: Any, **kw: Any) -> Any:
    return DenoiserHook(pipe, LTX_LIKE, executor).intercept(batch=3, guidance=True, branch_inputs=BRANCH_INPUTS,
                                                            **kw)  # fmt: skip


def _equal(a: list[tuple[torch.Tensor, ...]], b: list[tuple[torch.Tensor, ...]]) -> bool:
    return all(torch.equal(p, q) for x, y in zip(a, b) for p, q in zip(x, y))


@pytest.mark.parametrize("batched", [False, True])
def test_intercept_without_gating_is_the_pipeline(batched: bool) -> None:
    """Every branch run at the first call of the step and served to the later calls gives the
    pipeline's own outputs, both modalities; batched, call 1 is one forward (as the pipeline)."""
    expected = LoopPipe(4)(X, A)
    pipe = LoopPipe(4)
    with _hook(pipe, SerialBranchExecutor(batched=batched)) as trace:
        got = pipe(X, A)
    assert _equal(got, expected)
    per_step = [["uncond"] * 3 + ["cond"] * 3, ["stg"] * 3, ["modality"] * 3] if batched else \
        [["uncond"] * 3, ["cond"] * 3, ["stg"] * 3, ["modality"] * 3]  # fmt: skip
    assert pipe.transformer.calls == per_step * 4
    assert [dict((n, st[0]) for n, st in s.sample_states) for s in trace.steps] == \
        [{"uncond": "fresh", "stg": "fresh", "modality": "fresh"}] * 4  # fmt: skip


def test_every_auxiliary_branch_is_gated_from_its_own_delta() -> None:
    """F = 0.5 of 4 steps: steps 2 and 3 run cond alone; each auxiliary prediction is then cond
    minus its own step-1 delta, in both outputs."""
    pipe = LoopPipe(4, scale=0.0)  # predictions independent of x: deltas are the offsets
    with _hook(pipe, SerialBranchExecutor(batched=False), cfg_gate_step=0.5) as trace:
        got = pipe(X, A)
    assert pipe.transformer.calls[8:] == [["cond"] * 3] * 2
    states = [dict((n, st) for n, st in s.sample_states) for s in trace.steps]
    assert states[1] == {n: ("fresh",) * 3 for n in ("uncond", "stg", "modality")}
    assert states[2] == states[3] == {n: ("reused",) * 3 for n in ("uncond", "stg", "modality")}
    # reused delta to cond (offsets): uncond 1, stg -1.25, modality -2.75; g 3, s 1, m 3
    t = 3.0
    c = OFFSET["cond"] + t
    video = c + 2 * 1.0 + 1 * (-1.25) + 2 * (-2.75)
    assert torch.allclose(got[3][0], torch.full((3, 3, 2), video))
    assert torch.allclose(got[3][1], torch.full((3, 5), 2 * video))
    assert {n: (g.first_reused, g.invalidations) for n, g in trace.gates.items()} == \
        {n: ([2, 2, 2], 0) for n in ("uncond", "stg", "modality")}  # fmt: skip


def test_per_branch_gate_steps() -> None:
    """uncond at 0.5, stg at 0.25, modality off (F 1 for the rest)."""
    pipe = LoopPipe(4)
    with _hook(pipe, SerialBranchExecutor(batched=False), cfg_gate_step=1.0,
               cfg_gate_steps={"uncond": 0.5, "stg": 0.25}) as trace:  # fmt: skip
        pipe(X, A)
    by_branch = {n: [dict(s.sample_states)[n][0] for s in trace.steps] for n in ("uncond", "stg", "modality")}
    assert by_branch == {
        "uncond": ["fresh", "fresh", "reused", "reused"],
        "stg": ["fresh", "reused", "reused", "reused"],
        "modality": ["fresh"] * 4,
    }
    assert pipe.transformer.calls[4:7] == [["uncond"] * 3, ["cond"] * 3, ["modality"] * 3]  # step 1


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("gate", [1.0, 0.5])
def test_cfg_parallel_equals_serial(k: int, gate: float) -> None:
    """Branch i of the running ones on group rank i % K, both outputs gathered bit-exact; after
    the gate the remaining fresh branches are dealt again (here: cond alone on rank 0)."""
    expected_pipe = LoopPipe(4)
    with _hook(expected_pipe, SerialBranchExecutor(batched=False), cfg_gate_step=gate):
        expected = expected_pipe(X, A)

    def parallel(group: Any) -> tuple[Any, Any]:
        pipe = LoopPipe(4)
        with _hook(pipe, CfgParallelExecutor(group, batched=False), cfg_gate_step=gate) as trace:
            outs = pipe(X, A)
        return outs, [s.branches for s in trace.steps], pipe.transformer.calls

    results = run_group(k, parallel)
    for rank, result in enumerate(results):
        assert not isinstance(result, Exception), (rank, result)
        outs, layouts, _ = result
        assert _equal(outs, expected), rank
    layouts = results[0][1]
    assert layouts[0] == tuple((n, i % k) for i, n in enumerate(("uncond", "cond", "stg", "modality")))
    if gate < 1:
        assert layouts[2] == layouts[3] == (("cond", 0),)
    # no dummy forwards: the group runs exactly the serial forwards, each once
    assert sorted(c[0] for _, _, calls in results for c in calls) == sorted(c[0] for c in expected_pipe.transformer.calls)


def test_end_of_run_line_counts_every_auxiliary_branch() -> None:
    """Done markers carry per-branch totals from the samples' branch_counts; the summary sums
    them (a marker without them counts its uncond totals) and the CLI line reports them all."""
    import pyarrow as pa

    from jobs.cli import _gating_line
    from jobs.output.schema import samples_schema
    from jobs.output.store import _branch_totals
    from jobs.output.summary import _branches

    counts_type = samples_schema(pa.schema([("prompt", pa.string())])).field("branch_counts").type
    samples = pa.table({"branch_counts": pa.array([
        [{"name": "uncond", "fresh": 2, "reused": 2, "gate_step": 2, "invalidations": 0},
         {"name": "stg", "fresh": 1, "reused": 3, "gate_step": 1, "invalidations": 0}],
        [{"name": "uncond", "fresh": 4, "reused": 0, "gate_step": None, "invalidations": 0},
         {"name": "stg", "fresh": 4, "reused": 0, "gate_step": None, "invalidations": 0}],
        [],  # an error row
    ], type=counts_type)})  # fmt: skip
    marker = _branch_totals(samples)
    assert marker == {"uncond": {"fresh": 6, "reused": 2}, "stg": {"fresh": 5, "reused": 3}}
    assert _branch_totals(pa.table({"x": [1]})) == {}
    old = {"fresh_uncond": 3, "reused_uncond": 1}  # a marker from before per-branch totals
    branches = _branches([{"branches": marker}, old])
    assert branches == {"uncond": {"fresh": 9, "reused": 3}, "stg": {"fresh": 5, "reused": 3}}
    summary = {"fresh_uncond": 9, "reused_uncond": 3, "invalidations": 1, "branches": branches}
    assert _gating_line(summary) == ("cfg gating: 14 fresh, 6 reused auxiliary predictions (30% skipped; "
                                     "fresh/reused: uncond 9/3, stg 5/3), 1 invalidations")  # fmt: skip
    uncond_only = {**summary, "branches": {"uncond": branches["uncond"]}}
    assert _gating_line(uncond_only) == ("cfg gating: 9 fresh, 3 reused unconditional predictions "
                                         "(25% skipped), 1 invalidations")  # fmt: skip
