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
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch
from diffusers.utils import BaseOutput

from parallel.branches import split_branches
from parallel.executors import CfgParallelExecutor, Prediction, SerialBranchExecutor
from pipeline.families.base import Calls, CfgConvention
from pipeline.gating import CfgGate
from pipeline.samples import StepRecord

Executor = SerialBranchExecutor | CfgParallelExecutor


@dataclass
class DenoiseTrace:
    """What the intercept recorded over one pipeline call.

    Args:
        steps: the steps recorded so far.
        batch: B, samples in the call.
        cfg_gate_step: gating fraction F of every auxiliary branch without its own.
        cfg_gate_steps: per auxiliary branch name, its own F.
        cfg_gate_cosine: the adaptive threshold G of every auxiliary branch, or None.
    """

    steps: list[StepRecord]
    batch: int = 1
    cfg_gate_step: float = 1.0
    cfg_gate_steps: dict[str, float] = field(default_factory=dict)
    cfg_gate_cosine: float | None = None
    gates: dict[str, CfgGate] = field(default_factory=dict)
    """Per auxiliary branch (every branch but cond: uncond, stg, modality, cond_skip), its
    gating state at the end of the call: invalidations, first reused step."""
    first_nonfinite: dict[str, torch.Tensor] = field(default_factory=dict)
    """Per branch ("cond", "uncond"): (B,) int64 on the prediction's device, the first step at
    which the sample's prediction held a NaN or an infinity, -1 if none. Kept on the device so
    the check costs no synchronization per step."""

    def gate_of(self, branch: str) -> CfgGate:
        """The gate of an auxiliary branch (made on first use, with its own F if it has one)."""
        if branch not in self.gates:
            fraction = self.cfg_gate_steps.get(branch, self.cfg_gate_step)
            self.gates[branch] = CfgGate(fraction, self.batch, self.cfg_gate_cosine)
        return self.gates[branch]

    @property
    def gate(self) -> CfgGate:
        """The uncond branch's gate."""
        return self.gate_of("uncond")

    def check_finite(self, step: int, predictions: dict[str, torch.Tensor]) -> None:
        """Record which samples' predictions are not finite at ``step``.

        Args:
            step: 0-based step index.
            predictions: branch name -> (B, ...) prediction of every sample (an auxiliary one
                as handed to the pipeline, reused or fresh; several outputs packed, see _pack).
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


def _rebuild(template: Any, prediction: Prediction, return_dict: bool) -> Any:
    """The module's own output type (tuple or diffusers BaseOutput) holding ``prediction``
    (one tensor, or a tuple for a denoiser with several outputs, in its leading fields).

    ``template`` is None on a CFG rank that ran no branch this step: diffusers' convention
    (a tuple, or an output whose first field is the sample) is rebuilt from ``return_dict``.

    Raises:
        RuntimeError: a multi-output denoiser called with return_dict=True on a rank that ran
            none of the step's branches (its output class is unknown there).
    """
    outputs = prediction if isinstance(prediction, tuple) else (prediction,)
    if template is None:
        if not return_dict:
            return outputs
        if len(outputs) > 1:
            raise RuntimeError("a denoiser with several outputs called with return_dict=True "
                               "on a CFG rank that ran none of its branches")  # fmt: skip
        return DenoiserOutput(sample=prediction)
    if isinstance(template, torch.Tensor):
        return prediction
    if isinstance(template, tuple):
        return (*outputs, *template[len(outputs) :])
    fields = list(template.keys())
    values = {**{k: template[k] for k in fields}, **dict(zip(fields, outputs))}
    return type(template)(**values)


def _prediction(output: Any, outputs: int) -> Prediction:
    """The prediction(s) in a denoiser's output: its first field, or its first ``outputs``."""
    if isinstance(output, torch.Tensor):
        return output
    return output[0] if outputs == 1 else tuple(output[i] for i in range(outputs))


Spec = tuple[tuple[int, ...], ...] | None
"""Per-sample shapes of a multi-output prediction's tensors; None for a single tensor."""


def _pack(prediction: Prediction) -> tuple[torch.Tensor, Spec]:
    """One (samples, ...) tensor for gating and checks: a tuple's outputs flattened per sample
    and concatenated (bytes copied, not changed: ``cond - delta`` is elementwise, so packing
    gives the same values as per output; the adaptive rule's cosine covers every output)."""
    if isinstance(prediction, torch.Tensor):
        return prediction, None
    spec = tuple(tuple(p.shape[1:]) for p in prediction)
    return torch.cat([p.reshape(p.shape[0], -1) for p in prediction], dim=1), spec


def _unpack(packed: torch.Tensor, spec: Spec) -> Prediction:
    """Inverse of _pack."""
    if spec is None:
        return packed
    sizes = [math.prod(shape) for shape in spec]
    return tuple(part.reshape(packed.shape[0], *shape) for part, shape in zip(packed.split(sizes, dim=1), spec))


def _cat(predictions: list[Prediction]) -> Prediction:
    """Predictions concatenated on dim 0 (output by output)."""
    if isinstance(predictions[0], torch.Tensor):
        return torch.cat(predictions, dim=0)
    return tuple(torch.cat(outs, dim=0) for outs in zip(*predictions))


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
    later calls of the step (Wan's and Flux's uncond, SD3's skip-layer cond, LTX-2's stg and
    modality), built from the cond branch with the inputs ``branch_inputs`` gives for them.
    CFG gating decides, per auxiliary branch and sample, whether it runs or is rebuilt from
    its cached delta to cond; the executor runs the rest. This call gets its own predictions
    back and each later call is served from the rest.

    Args:
        pipe: the diffusers pipeline.
        convention: its CFG calling convention.
        executor: runs a step's branches (on this rank, or across its CFG group).
        step_calls: the calls of a step, (step, num_steps, guidance) -> calls; default: the
            convention's calls under guidance, one cond call without.
        auxiliary: every auxiliary branch the family may run (Family.auxiliary_branches): the
            per-branch states recorded at each step; default: those of the convention.
    """

    def __init__(self, pipe: Any, convention: CfgConvention, executor: Executor,
                 step_calls: StepCalls | None = None, auxiliary: tuple[str, ...] | None = None) -> None:  # fmt: skip
        self.pipe = pipe
        self.convention = convention
        self.executor = executor
        self.step_calls = step_calls or (lambda step, n, guidance: convention.calls if guidance else (("cond",),))
        self.auxiliary = auxiliary if auxiliary is not None else tuple(
            n for n in convention.branch_order if n != "cond")  # fmt: skip

    @contextmanager
    def intercept(self, *, batch: int, guidance: bool, cfg_gate_step: float = 1.0,
                  cfg_gate_steps: dict[str, float] | None = None, cfg_gate_cosine: float | None = None,
                  branch_inputs: dict[str, dict[str, Any]] | None = None) -> Iterator[DenoiseTrace]:  # fmt: skip
        """Wrap the denoisers for one pipeline call; yields the trace its steps are recorded in.

        Args:
            batch: B, samples in the micro-batch.
            guidance: whether the pipeline runs CFG (an uncond branch).
            cfg_gate_step: gating fraction F in [0, 1] of every auxiliary branch; 1.0 = off
                (see pipeline.gating).
            cfg_gate_steps: per auxiliary branch, its own F (overrides cfg_gate_step).
            cfg_gate_cosine: adaptive gating threshold G, or None.
            branch_inputs: for each branch computed in a later call of a step, its denoiser
                arguments that differ from the cond branch's (Family.branch_inputs).
        Raises:
            ValueError: a step has a later-call branch without ``branch_inputs``.
        """
        trace = DenoiseTrace([], batch, cfg_gate_step, dict(cfg_gate_steps or {}), cfg_gate_cosine)
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
        pending: list[tuple[int, Prediction]] = []  # later calls of this step: (batch, prediction)

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

            def run(a: tuple[Any, ...], k: dict[str, Any]) -> Prediction:
                out = forward(*a, **k)
                template.append(out)
                return _prediction(out, conv.outputs)

            branches = split_branches(calls[0], rest, named, batch * len(calls[0]), conv.sample_keys)
            cond = next((b for b in branches if b.name == "cond"), None)
            for index, call in enumerate(calls[1:], start=1):
                for branch in call:
                    if cond is None or branch not in branch_inputs:
                        raise ValueError(f"branch {branch} of a later call has no inputs")
                    branches.append(cond.with_inputs(branch, 0 if conv.merge_calls else index,
                                                     **branch_inputs[branch]))  # fmt: skip
            names = [b.name for b in branches]
            # Gating: each auxiliary branch runs on the samples its gate says are fresh.
            aux = [n for n in names if n != "cond"] if cond is not None else []
            fresh = {n: trace.gate_of(n).fresh(step, num_steps, name) for n in aux}
            running = [b.take(fresh[b.name]) if b.name in fresh else b
                       for b in branches if b.name not in fresh or fresh[b.name]]  # fmt: skip
            ran = dict(zip([b.name for b in running], self.executor.run(running, run)))
            packed, spec = {}, None
            for n, prediction in ran.items():
                packed[n], spec = _pack(prediction)
            for n in aux:
                packed[n] = trace.gate_of(n).combine(name, fresh[n], packed["cond"], packed.get(n))
            trace.check_finite(step, packed)
            preds = {n: _unpack(packed[n], spec) if n not in ran or n in fresh else ran[n] for n in names}
            states = []
            for n in dict.fromkeys((*self.auxiliary, *aux)):
                mine = set(fresh.get(n, ()))
                states.append((n, tuple("none" if n not in fresh else "fresh" if i in mine else "reused"
                                        for i in range(batch))))  # fmt: skip
            unconds = dict(states).get("uncond", ("none",) * batch)
            for call in calls[1:]:
                pending.append((batch * len(call), _cat([preds[n] for n in call])))
            result = _rebuild(template[0] if template else None, _cat([preds[n] for n in calls[0]]), return_dict)
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
                    sample_states=tuple(states),
                )
            )
            return result

        return wrapped
