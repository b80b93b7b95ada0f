"""The intercept: wrap each denoiser module's forward for the span of one pipeline call.

Diffusers keeps its pipeline loop (scheduler, latents, the CFG combine
``uncond + s * (cond - uncond)`` and guidance_rescale). This hook owns what happens inside each
denoiser call: the call is split into its guidance branches, CFG gating (pipeline.gating)
decides whether the uncond branch runs or is rebuilt from the cached delta, the branches that
run go to a branch executor (parallel/), the predictions are put back in the order the pipeline
expects, and every step is recorded.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.utils import BaseOutput

from parallel.branches import CfgParallelExecutor, SerialBranchExecutor, split_branches
from pipeline.families import CfgConvention
from pipeline.gating import CfgGate

Executor = SerialBranchExecutor | CfgParallelExecutor


@dataclass(frozen=True)
class StepRecord:
    """One denoiser step of a micro-batch."""

    step_index: int
    """0-based position in the scheduler's timesteps."""
    timestep: float
    """The scheduler timestep passed to the denoiser."""
    denoiser: str
    """Pipeline attribute of the module that ran ("unet", "transformer", "transformer_2")."""
    uncond: str
    """"fresh" (computed this step), "reused" (from a cached delta) or "none" (no guidance)."""
    step_s: float
    """Wall seconds in the denoiser for this step on this rank: its branch forwards and, under
    CFG parallelism, the gather of the other ranks' predictions."""
    branches: tuple[tuple[str, int], ...] = ()
    """(branch name, CFG-group rank that ran it), in the pipeline's branch order."""


@dataclass
class DenoiseTrace:
    """What the intercept recorded over one pipeline call."""

    steps: list[StepRecord]
    gate: CfgGate
    """Gating state at the end of the call: invalidations, first reused step."""


@dataclass
class DenoiserOutput(BaseOutput):
    """Output of a denoiser call on a rank that ran none of its branches (return_dict=True)."""

    sample: torch.Tensor


def _first_tensor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError("denoiser called without a tensor argument")


def _rebuild(template: Any, prediction: torch.Tensor, return_dict: bool) -> Any:
    """The module's own output type (tuple or diffusers BaseOutput) holding ``prediction``.

    ``template`` is None on a CFG rank that ran no branch this step: diffusers' convention
    (a 1-tuple, or an output whose first field is the sample) is rebuilt from ``return_dict``.
    """
    if template is None:
        return DenoiserOutput(sample=prediction) if return_dict else (prediction,)
    if isinstance(template, torch.Tensor):
        return prediction
    if isinstance(template, tuple):
        return (prediction, *template[1:])
    fields = list(template.keys())
    return type(template)(**{k: prediction if k == fields[0] else template[k] for k in fields})


def _prediction(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    return output[0]


class DenoiserHook:
    """Intercepts the denoiser modules of one pipeline.

    Args:
        pipe: the diffusers pipeline.
        convention: its CFG calling convention.
        executor: runs a step's branches (on this rank, or across its CFG group).
    """

    def __init__(self, pipe: Any, convention: CfgConvention, executor: Executor) -> None:
        if not convention.batched:
            raise NotImplementedError("two-call CFG pipelines are not supported yet")
        self.pipe = pipe
        self.convention = convention
        self.executor = executor

    @contextmanager
    def intercept(self, *, batch: int, guidance: bool, cfg_gate_step: float = 1.0) -> Iterator[DenoiseTrace]:
        """Wrap the denoisers for one pipeline call; yields the trace its steps are recorded in.

        Args:
            batch: B, images in the micro-batch.
            guidance: whether the pipeline runs CFG (guidance_scale > 1).
            cfg_gate_step: gating fraction F in [0, 1]; 1.0 = off (see pipeline.gating).
        """
        trace = DenoiseTrace([], CfgGate(cfg_gate_step))
        modules = [
            (name, getattr(self.pipe, name))
            for name in self.convention.denoisers
            if getattr(self.pipe, name, None) is not None
        ]
        saved = [module.__dict__.get("forward") for _, module in modules]
        for name, module in modules:
            module.forward = self._wrap(name, module.forward, batch, guidance, trace)
        try:
            yield trace
        finally:
            for (_, module), prior in zip(modules, saved):
                if prior is None:
                    del module.forward  # the class's forward is back
                else:
                    module.forward = prior

    def _wrap(self, name: str, forward: Any, batch: int, guidance: bool, trace: DenoiseTrace):
        names = self.convention.branch_order if guidance else ("cond",)
        gate = trace.gate

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            sample = _first_tensor(args, kwargs)
            total = batch * len(names)
            if sample.shape[0] != total:
                raise RuntimeError(
                    f"{name} called with batch {sample.shape[0]}, expected {total} "
                    f"({len(names)} branches x {batch} images)"
                )
            template: list[Any] = []

            def run(a: tuple[Any, ...], k: dict[str, Any]) -> torch.Tensor:
                out = forward(*a, **k)
                template.append(out)
                return _prediction(out)

            step = len(trace.steps)
            branches = split_branches(names, args, kwargs, total)
            gating = guidance and gate.fraction < 1.0
            reuse = gating and gate.reuse(step, len(self.pipe.scheduler.timesteps), name)
            running = [b for b in branches if b.name == "cond"] if reuse else branches
            ran = dict(zip([b.name for b in running], self.executor.run(running, run, batch)))
            if reuse:
                ran["uncond"] = gate.uncond(ran["cond"])
            elif gating:
                gate.store(name, ran["cond"], ran["uncond"])
            result = _rebuild(
                template[0] if template else None,
                torch.cat([ran[n] for n in names], dim=0),
                kwargs.get("return_dict", True),
            )
            timestep = args[1] if len(args) > 1 else kwargs.get("timestep", 0)
            trace.steps.append(
                StepRecord(
                    step_index=step,
                    timestep=float(torch.as_tensor(timestep).flatten()[0]),
                    denoiser=name,
                    uncond="none" if not guidance else "reused" if reuse else "fresh",
                    step_s=time.perf_counter() - start,
                    branches=tuple(
                        zip([b.name for b in running], self.executor.ranks_for(len(running)))
                    ),
                )
            )
            return result

        return wrapped
