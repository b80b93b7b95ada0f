"""CFG gating: after a fraction of the steps, rebuild the unconditional prediction from a cache.

Adaptive Guidance (Castillo et al., 2023, arXiv:2312.12487) observes that late in sampling the
guidance direction cond - uncond changes little. Before the gate step the unconditional branch
runs and ``delta = cond - uncond`` is cached; from the gate step on only the conditional branch
runs and ``uncond = cond - delta``. The gate step is sglang's ``cfg_gate_step`` rule:
``gate_step = int(len(scheduler.timesteps) * F)`` with F in [0, 1] (1 = never gate).

Beyond sglang and FastVideo, an adaptive trigger (``--cfg-gate-cosine G``) stops each sample's
uncond forwards once its cond and uncond predictions are cosine-similar enough; the uncond
forward then runs only on the samples that still need it.

The delta belongs to one denoiser module. When a pipeline switches module mid-loop (Wan 2.2:
``transformer`` -> ``transformer_2`` at its boundary), the delta is dropped, the next step
computes a fresh uncond under the new module, and ``invalidations`` counts the drop.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def gate_step(num_steps: int, fraction: float) -> int:
    """First step index that may reuse the delta: ``int(num_steps * fraction)``.

    Args:
        num_steps: scheduler timesteps of the call, >= 1.
        fraction: F in [0, 1]; 1.0 gives num_steps (never gate), 0.0 gives 0 (gate after the
            first fresh step, since a delta must exist first).
    Raises:
        ValueError: fraction outside [0, 1] or not finite.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"cfg_gate_step {fraction} must be in [0, 1]")
    return int(num_steps * fraction)


@dataclass
class CfgGate:
    """Gating state of one pipeline call (one micro-batch of B samples).

    Two triggers, per sample: the step rule (every sample from ``gate_step`` on) and, with
    ``cosine`` set, the adaptive rule: a sample whose cond and uncond predictions reach cosine
    similarity ``cosine`` at a fresh step freezes its delta and runs no more uncond forwards
    (Adaptive Guidance's criterion, Castillo et al. 2023). Before a module's first fresh step
    there is no delta, so every sample runs fresh.

    Args:
        fraction: F in [0, 1]; 1.0 turns the step rule off.
        batch: B, samples in the call.
        cosine: G in [-1, 1], or None to turn the adaptive rule off.
    """

    fraction: float
    batch: int
    cosine: float | None = None
    delta: torch.Tensor | None = None
    """(B, ...) cond - uncond of each sample's last fresh step, for ``module``."""
    module: str | None = None
    """Denoiser module the delta belongs to."""
    invalidations: int = 0
    """Cached deltas dropped because the pipeline switched denoiser module at a step that would
    have reused them (a switch before the gate costs nothing and is not counted)."""
    frozen: list[bool] = field(default_factory=list)
    """Per sample: the adaptive rule fired (since the last invalidation)."""
    first_reused: list[int | None] = field(default_factory=list)
    """Per sample: step index of its first reused uncond, or None."""

    def __post_init__(self) -> None:
        self.frozen = [False] * self.batch
        self.first_reused = [None] * self.batch

    @property
    def active(self) -> bool:
        """Whether any trigger is on."""
        return self.fraction < 1.0 or self.cosine is not None

    def fresh(self, step_index: int, num_steps: int, module: str) -> list[int]:
        """Samples that run the uncond forward at this step (ascending); the rest reuse.

        A module switch drops the delta first (and counts an invalidation).

        Args:
            step_index: 0-based step of the scheduler loop.
            num_steps: len(scheduler.timesteps).
            module: the denoiser module called at this step.
        """
        if self.delta is not None and module != self.module:
            # Count the drops that cost a fresh uncond: at or past the gate, or a frozen sample.
            if step_index >= gate_step(num_steps, self.fraction) or any(self.frozen):
                self.invalidations += 1
            self.delta, self.module = None, None
            self.frozen = [False] * self.batch
        everyone = list(range(self.batch))
        if not self.active or self.delta is None:
            return everyone
        if step_index >= gate_step(num_steps, self.fraction):
            fresh = []
        else:
            fresh = [i for i in everyone if not self.frozen[i]]
        for i in everyone:
            if i not in fresh and self.first_reused[i] is None:
                self.first_reused[i] = step_index
        return fresh

    def combine(self, module: str, fresh: list[int], cond: torch.Tensor,
                uncond_fresh: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
        """The step's full uncond prediction, updating the delta from the fresh samples.

        Args:
            module: the denoiser module of this step.
            fresh: samples that ran the uncond forward (from ``fresh``).
            cond: (B, ...) cond predictions.
            uncond_fresh: (len(fresh), ...) their uncond predictions, or None if none ran.
        Returns:
            (B, ...): computed uncond for fresh samples, ``cond - delta`` for the others (the
            very tensor ``uncond_fresh`` when every sample is fresh).
        """
        if len(fresh) == self.batch:
            assert uncond_fresh is not None
            if self.active:
                self._update(module, fresh, cond, uncond_fresh)
            return uncond_fresh
        assert self.delta is not None
        uncond = cond - self.delta
        if fresh:
            assert uncond_fresh is not None
            idx = torch.as_tensor(fresh, device=cond.device)
            uncond[idx] = uncond_fresh
            self._update(module, fresh, cond, uncond_fresh)
        return uncond

    def _update(self, module: str, fresh: list[int], cond: torch.Tensor,
                uncond_fresh: torch.Tensor) -> None:  # fmt: skip
        idx = torch.as_tensor(fresh, device=cond.device)
        new = cond.index_select(0, idx) - uncond_fresh
        if self.delta is None:
            self.delta, self.module = torch.empty_like(cond), module
        self.delta[idx] = new
        if self.cosine is not None:
            a = cond.index_select(0, idx).flatten(1).float()
            b = uncond_fresh.flatten(1).float()
            cos = torch.nn.functional.cosine_similarity(a, b, dim=1)
            for i, c in zip(fresh, cos.tolist()):
                self.frozen[i] = self.frozen[i] or c >= self.cosine
