"""CFG gating: after a fraction of the steps, rebuild the unconditional prediction from a cache.

Adaptive Guidance (Castillo et al., 2023, arXiv:2312.12487) observes that late in sampling the
guidance direction cond - uncond changes little. Before the gate step the unconditional branch
runs and ``delta = cond - uncond`` is cached; from the gate step on only the conditional branch
runs and ``uncond = cond - delta``. The gate step is sglang's ``cfg_gate_step`` rule:
``gate_step = int(len(scheduler.timesteps) * F)`` with F in [0, 1] (1 = never gate).

The delta belongs to one denoiser module. When a pipeline switches module mid-loop (Wan 2.2:
``transformer`` -> ``transformer_2`` at its boundary), the delta is dropped, the next step
computes a fresh uncond under the new module, and ``invalidations`` counts the drop.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    """Gating state of one pipeline call (one micro-batch).

    Args:
        fraction: F in [0, 1]; 1.0 turns gating off.
    """

    fraction: float
    delta: torch.Tensor | None = None
    """(B, ...) cond - uncond of the last fresh step, for ``module``."""
    module: str | None = None
    """Denoiser module the delta belongs to."""
    invalidations: int = 0
    """Deltas dropped because the pipeline switched denoiser module."""
    first_reused: int | None = None
    """Step index of the first reused uncond, or None."""

    def reuse(self, step_index: int, num_steps: int, module: str) -> bool:
        """Whether this step skips the uncond forward (and, on a module switch, drop the delta).

        Args:
            step_index: 0-based step of the scheduler loop.
            num_steps: len(scheduler.timesteps).
            module: the denoiser module called at this step.
        """
        if self.delta is not None and module != self.module:
            self.delta, self.module = None, None
            self.invalidations += 1
        if self.delta is None or step_index < gate_step(num_steps, self.fraction):
            return False
        if self.first_reused is None:
            self.first_reused = step_index
        return True

    def store(self, module: str, cond: torch.Tensor, uncond: torch.Tensor) -> None:
        """Cache ``delta = cond - uncond`` from a fresh step of ``module``. Shapes (B, ...)."""
        self.delta, self.module = cond - uncond, module

    def uncond(self, cond: torch.Tensor) -> torch.Tensor:
        """The reused unconditional prediction ``cond - delta``, (B, ...)."""
        assert self.delta is not None
        return cond - self.delta
