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
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.utils import BaseOutput

from parallel.branches import Branch, CfgParallelExecutor, SerialBranchExecutor, split_branches
from pipeline.families import CfgConvention
from pipeline.gating import CfgGate
from pipeline.samples import StepRecord

Executor = SerialBranchExecutor | CfgParallelExecutor


@dataclass
class DenoiseTrace:
    """What the intercept recorded over one pipeline call."""

    steps: list[StepRecord]
    gate: CfgGate
    """Gating state at the end of the call: invalidations, first reused step."""
    first_nonfinite: dict[str, torch.Tensor] = field(default_factory=dict)
    """Per branch ("cond", "uncond"): (B,) int64 on the prediction's device, the first step at
    which the sample's prediction held a NaN or an infinity, -1 if none. Kept on the device so
    the check costs no synchronization per step."""

    def check_finite(self, step: int, predictions: dict[str, torch.Tensor]) -> None:
        """Record which samples' predictions are not finite at ``step``.

        Args:
            step: 0-based step index.
            predictions: branch name -> (B, ...) prediction of every sample (the uncond one
                as handed to the pipeline, reused or fresh).
        """
        for name, pred_B in predictions.items():
            bad_B = ~torch.isfinite(pred_B).reshape(pred_B.shape[0], -1).all(dim=1)
            first_B = self.first_nonfinite.get(name)
            if first_B is None:
                first_B = torch.full(bad_B.shape, -1, dtype=torch.long, device=bad_B.device)
            self.first_nonfinite[name] = torch.where((first_B < 0) & bad_B, step, first_B)

    def nonfinite_errors(self, batch: int) -> list[str | None]:
        """Per sample: why its predictions are unusable (the first non-finite step and branch,
        and the denoiser that produced it), or None."""
        first: list[tuple[int, str] | None] = [None] * batch
        for name, first_B in self.first_nonfinite.items():
            for i, step in enumerate(first_B.tolist()):
                if step >= 0 and (first[i] is None or step < first[i][0]):
                    first[i] = (step, name)
        return [None if f is None else f"non-finite {f[1]} noise prediction at step {f[0]} "
                f"({self.steps[f[0]].denoiser})" for f in first]  # fmt: skip


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
        self.pipe = pipe
        self.convention = convention
        self.executor = executor

    @contextmanager
    def intercept(self, *, batch: int, guidance: bool, cfg_gate_step: float = 1.0,
                  cfg_gate_cosine: float | None = None,
                  uncond_inputs: dict[str, Any] | None = None) -> Iterator[DenoiseTrace]:  # fmt: skip
        """Wrap the denoisers for one pipeline call; yields the trace its steps are recorded in.

        Args:
            batch: B, samples in the micro-batch.
            guidance: whether the pipeline runs CFG (guidance_scale > 1).
            cfg_gate_step: gating fraction F in [0, 1]; 1.0 = off (see pipeline.gating).
            cfg_gate_cosine: adaptive gating threshold G, or None.
            uncond_inputs: two-call pipelines: the keyword inputs of the uncond call that differ
                from the cond call (the negative embeddings, (B, L, D)), so that both branches
                can run at the step's first call.
        Raises:
            ValueError: a two-call convention with guidance but no ``uncond_inputs``.
        """
        if guidance and not self.convention.batched and uncond_inputs is None:
            raise ValueError("a two-call pipeline needs uncond_inputs to run its branches")
        trace = DenoiseTrace([], CfgGate(cfg_gate_step, batch, cfg_gate_cosine))
        modules = [
            (name, getattr(self.pipe, name))
            for name in self.convention.denoisers
            if getattr(self.pipe, name, None) is not None
        ]
        saved = [module.__dict__.get("forward") for _, module in modules]
        for name, module in modules:
            module.forward = self._wrap(name, module.forward, batch, guidance, trace,
                                        uncond_inputs or {})  # fmt: skip
        try:
            yield trace
        finally:
            for (_, module), prior in zip(modules, saved):
                if prior is None:
                    del module.forward  # the class's forward is back
                else:
                    module.forward = prior

    def _wrap(self, name: str, forward: Any, batch: int, guidance: bool, trace: DenoiseTrace,
              uncond_inputs: dict[str, Any]):  # fmt: skip
        one_call = self.convention.batched
        names = self.convention.branch_order if guidance else ("cond",)
        pending: list[torch.Tensor] = []  # two-call: the uncond prediction for the next call

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if pending:  # two-call pipelines: the step's uncond call, already computed
                return _rebuild(None, pending.pop(), kwargs.get("return_dict", True))
            start = time.perf_counter()
            sample = _first_tensor(args, kwargs)
            calls = len(names) if one_call else 1
            if sample.shape[0] != batch * calls:
                raise RuntimeError(
                    f"{name} called with batch {sample.shape[0]}, expected {batch * calls} "
                    f"({calls} branch(es) x {batch} samples)"
                )
            template: list[Any] = []

            def run(a: tuple[Any, ...], k: dict[str, Any]) -> torch.Tensor:
                out = forward(*a, **k)
                template.append(out)
                return _prediction(out)

            if one_call:
                branches = split_branches(names, args, kwargs, batch * len(names))
            else:
                cond = Branch("cond", args, kwargs, batch)
                branches = [cond] + [cond.with_inputs(n, **uncond_inputs) for n in names[1:]]
            step = len(trace.steps)
            gate = trace.gate
            fresh = (
                gate.fresh(step, len(self.pipe.scheduler.timesteps), name)
                if guidance and gate.active
                else list(range(batch))
            )
            running = [
                b.take(fresh) if b.name == "uncond" else b
                for b in branches
                if b.name != "uncond" or fresh
            ]
            ran = dict(zip([b.name for b in running], self.executor.run(running, run)))
            if guidance:
                ran["uncond"] = gate.combine(name, fresh, ran["cond"], ran.get("uncond"))
            trace.check_finite(step, ran)
            fresh_set = set(fresh)
            unconds = tuple(
                "none" if not guidance else "fresh" if i in fresh_set else "reused"
                for i in range(batch)
            )
            return_dict = kwargs.get("return_dict", True)
            if one_call:
                result = _rebuild(template[0] if template else None,
                                  torch.cat([ran[n] for n in names], dim=0), return_dict)  # fmt: skip
            else:
                result = _rebuild(template[0] if template else None, ran["cond"], return_dict)
                if guidance:
                    pending.append(ran["uncond"])
            timestep = args[1] if len(args) > 1 else kwargs.get("timestep", 0)
            trace.steps.append(
                StepRecord(
                    step_index=step,
                    timestep=float(torch.as_tensor(timestep).flatten()[0]),
                    denoiser=name,
                    uncond=unconds[0] if len(set(unconds)) == 1 else "mixed",
                    step_s=time.perf_counter() - start,
                    branches=tuple(self.executor.last_layout),
                    unconds=unconds,
                )
            )
            return result

        return wrapped
