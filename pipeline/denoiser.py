"""The intercept: wrap each denoiser module's forward for the span of one pipeline call.

Diffusers keeps its pipeline loop (scheduler, latents, the CFG combine
``uncond + s * (cond - uncond)`` and guidance_rescale). This hook owns what happens inside each
denoiser call: the call is split into its guidance branches, CFG gating (pipeline.gating)
decides whether the uncond branch runs or is rebuilt from the cached delta, the branches that
run go to a branch executor (parallel/), the predictions are put back in the order the pipeline
expects, and every step is recorded.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch
from diffusers.utils import BaseOutput

from parallel.branches import split_branches
from parallel.executors import CfgParallelExecutor, SerialBranchExecutor
from pipeline.families.base import Calls, CfgConvention
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


def bind_arguments(signature: inspect.Signature | None, args: tuple[Any, ...],
                   kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The call as keyword arguments named by the module's own ``forward`` signature, so that a
    family's argument map does not depend on which arguments a pipeline passes positionally.
    The module's class forward names them even when an instance forward is wrapped (a hook's
    ``(*args, **kwargs)``), and every wrapper passes keywords through. A signature that cannot
    bind the call (or none) leaves it as it is."""
    if signature is None:
        return args, kwargs
    names = _positional_names(signature)
    if names is not None and len(args) <= len(names) and not set(names[: len(args)]) & kwargs.keys():
        return (), {**dict(zip(names, args)), **kwargs}  # the common case, without bind()
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError:
        return args, kwargs
    named: dict[str, Any] = {}
    rest: tuple[Any, ...] = ()
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            rest = value
        elif kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        elif kind is inspect.Parameter.POSITIONAL_ONLY:
            return args, kwargs
        else:
            named[name] = value
    return rest, named


@lru_cache(maxsize=32)
def _positional_names(signature: inspect.Signature) -> list[str] | None:
    """Names of the parameters a call may fill positionally, in order; None when the signature
    takes ``*args`` or positional-only parameters (bind() handles those)."""
    names = []
    for p in signature.parameters.values():
        if p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.POSITIONAL_ONLY):
            return None
        if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD:
            names.append(p.name)
    return names


def _forward_signature(module: Any) -> inspect.Signature | None:
    """The signature of the module class's own forward, without self; None if unreadable."""
    try:
        return inspect.signature(type(module).forward.__get__(module, type(module)))
    except (AttributeError, TypeError, ValueError):
        return None


StepCalls = Callable[[int, int, bool], Calls]


class DenoiserHook:
    """Intercepts the denoiser modules of one pipeline.

    At the first denoiser call of a step the hook builds every branch of the step: those of
    this call, split by the convention's argument map, and those the pipeline computes in its
    later calls of the step (Wan's and Flux's uncond, SD3's skip-layer cond), built from the
    cond branch with the inputs ``branch_inputs`` gives for them. The executor runs them all;
    this call gets its own predictions back and each later call is served from the rest.

    Args:
        pipe: the diffusers pipeline.
        convention: its CFG calling convention.
        executor: runs a step's branches (on this rank, or across its CFG group).
        step_calls: the calls of a step, (step, num_steps, guidance) -> calls; default: the
            convention's calls under guidance, one cond call without.
    """

    def __init__(self, pipe: Any, convention: CfgConvention, executor: Executor,
                 step_calls: StepCalls | None = None) -> None:  # fmt: skip
        self.pipe = pipe
        self.convention = convention
        self.executor = executor
        self.step_calls = step_calls or (lambda step, n, guidance: convention.calls if guidance else (("cond",),))

    @contextmanager
    def intercept(self, *, batch: int, guidance: bool, cfg_gate_step: float = 1.0,
                  cfg_gate_cosine: float | None = None,
                  branch_inputs: dict[str, dict[str, Any]] | None = None) -> Iterator[DenoiseTrace]:  # fmt: skip
        """Wrap the denoisers for one pipeline call; yields the trace its steps are recorded in.

        Args:
            batch: B, samples in the micro-batch.
            guidance: whether the pipeline runs CFG (guidance_scale > 1).
            cfg_gate_step: gating fraction F in [0, 1]; 1.0 = off (see pipeline.gating).
            cfg_gate_cosine: adaptive gating threshold G, or None.
            branch_inputs: for each branch computed in a later call of a step, its denoiser
                arguments that differ from the cond branch's (Family.branch_inputs).
        Raises:
            ValueError: a step has a later-call branch without ``branch_inputs``.
        """
        trace = DenoiseTrace([], CfgGate(cfg_gate_step, batch, cfg_gate_cosine))
        modules = [
            (name, getattr(self.pipe, name))
            for name in self.convention.denoisers
            if getattr(self.pipe, name, None) is not None
        ]
        saved = [module.__dict__.get("forward") for _, module in modules]
        for name, module in modules:
            module.forward = self._wrap(name, module.forward, _forward_signature(module), batch, guidance,
                                        trace, branch_inputs or {})  # fmt: skip
        try:
            yield trace
        finally:
            for (_, module), prior in zip(modules, saved):
                if prior is None:
                    del module.forward  # the class's forward is back
                else:
                    module.forward = prior

    def _wrap(self, name: str, forward: Any, signature: inspect.Signature | None, batch: int,
              guidance: bool, trace: DenoiseTrace, branch_inputs: dict[str, dict[str, Any]]):  # fmt: skip
        conv = self.convention
        pending: list[tuple[int, torch.Tensor]] = []  # later calls of this step: (batch, prediction)

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            return_dict = kwargs.get("return_dict", True)
            if pending:  # a later call of the step, already computed at its first call
                size, prediction = pending.pop(0)
                rest, named = bind_arguments(signature, args, kwargs)
                got = named.get(conv.latents_key)
                if isinstance(got, torch.Tensor) and got.shape[0] != size:
                    raise RuntimeError(f"{name} called with batch {got.shape[0]}, expected {size} "
                                       "(the pipeline made a call its family did not declare)")  # fmt: skip
                return _rebuild(None, prediction, return_dict)
            start = time.perf_counter()
            rest, named = bind_arguments(signature, args, kwargs)
            step = len(trace.steps)
            timesteps = getattr(getattr(self.pipe, "scheduler", None), "timesteps", None)
            num_steps = 0 if timesteps is None else len(timesteps)
            calls = self.step_calls(step, num_steps, guidance)
            latents = named.get(conv.latents_key)
            if not isinstance(latents, torch.Tensor):
                raise RuntimeError(f"{name} called without its latents argument {conv.latents_key!r}")
            if latents.shape[0] != batch * len(calls[0]):
                raise RuntimeError(
                    f"{name} called with batch {latents.shape[0]}, expected {batch * len(calls[0])} "
                    f"({len(calls[0])} branch(es) x {batch} samples)"
                )
            template: list[Any] = []

            def run(a: tuple[Any, ...], k: dict[str, Any]) -> torch.Tensor:
                out = forward(*a, **k)
                template.append(out)
                return _prediction(out)

            branches = split_branches(calls[0], rest, named, batch * len(calls[0]), conv.sample_keys)
            cond = next((b for b in branches if b.name == "cond"), None)
            for index, call in enumerate(calls[1:], start=1):
                for branch in call:
                    if cond is None or branch not in branch_inputs:
                        raise ValueError(f"branch {branch} of a later call has no inputs")
                    branches.append(cond.with_inputs(branch, 0 if conv.merge_calls else index,
                                                     **branch_inputs[branch]))  # fmt: skip
            names = [b.name for b in branches]
            gate = trace.gate
            gated = guidance and "uncond" in names and gate.active
            fresh = gate.fresh(step, num_steps, name) if gated else list(range(batch))
            running = [b.take(fresh) if b.name == "uncond" else b
                       for b in branches if b.name != "uncond" or fresh]  # fmt: skip
            ran = dict(zip([b.name for b in running], self.executor.run(running, run)))
            if "uncond" in names:
                ran["uncond"] = gate.combine(name, fresh, ran["cond"], ran.get("uncond"))
            trace.check_finite(step, ran)
            fresh_set = set(fresh)
            unconds = tuple(
                "none" if "uncond" not in names else "fresh" if i in fresh_set else "reused"
                for i in range(batch)
            )
            for call in calls[1:]:
                pending.append((batch * len(call), torch.cat([ran[n] for n in call], dim=0)))
            result = _rebuild(template[0] if template else None,
                              torch.cat([ran[n] for n in calls[0]], dim=0), return_dict)  # fmt: skip
            timestep = named.get("timestep", 0)
            trace.steps.append(
                StepRecord(
                    step_index=step,
                    # max: Wan 2.2 TI2V's per-token timesteps are 0 on the image's latent frame
                    timestep=float(torch.as_tensor(timestep).flatten().max()),
                    denoiser=name,
                    uncond=unconds[0] if len(set(unconds)) == 1 else "mixed",
                    step_s=time.perf_counter() - start,
                    branches=tuple(self.executor.last_layout),
                    unconds=unconds,
                )
            )
            return result

        return wrapped
