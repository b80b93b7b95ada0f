"""A synthetic denoiser and its branches, for executor tests in-process and on real ranks."""

from __future__ import annotations

from typing import Any

import torch

from parallel.branches import Branch, split_branches
from parallel.executors import SerialBranchExecutor

B = 2  # samples per branch
SAMPLE_KEYS = frozenset({"0", "encoder_hidden_states"})
"""Per-sample inputs of the synthetic call: the latents (positional 0) and the conditioning."""


def make_branches(n: int, dtype: torch.dtype = torch.float32) -> list[Branch]:
    """N branches of one concatenated call: sample x, per-branch conditioning, shared t."""
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n * B, 3, 4, 4, generator=g).to(dtype)
    cond = torch.randn(n * B, 5, 3, generator=g).to(dtype)
    t = torch.tensor(500)
    names = [f"b{i}" for i in range(n)]
    return split_branches(names, (x, t), {"encoder_hidden_states": cond}, n * B, SAMPLE_KEYS)


class Predictor:
    """A synthetic denoiser whose output depends on sample, timestep and conditioning; counts
    its forwards and the batch of each."""

    def __init__(self, fail_on: int | None = None) -> None:
        self.calls: list[int] = []
        self.fail_on = fail_on

    def __call__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        x, t = args
        self.calls.append(x.shape[0])
        if self.fail_on is not None and len(self.calls) == self.fail_on:
            raise ValueError("boom")
        cond = kwargs["encoder_hidden_states"]
        return torch.tanh(x * 1.7 + cond.mean(dim=(1, 2)).view(-1, 1, 1, 1) + t / 1000)


def serial_predictions(n: int, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    return SerialBranchExecutor(batched=False).run(make_branches(n, dtype), Predictor())
