"""The types a pipeline family is described by: its CFG calling convention and the output of
its encode stage. Shape legend: B = images in the micro-batch, L = text tokens, D = text
hidden size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True, kw_only=True)
class CfgConvention:
    """How a pipeline calls its denoiser(s) under CFG (see NOTES: call conventions)."""

    batched: bool
    """True: one call per step on the branches concatenated on dim 0."""
    branch_order: tuple[str, ...]
    """Branch names in call / concatenation order, e.g. ("uncond", "cond") for SD."""
    denoisers: tuple[str, ...]
    """Pipeline attributes holding denoiser modules, e.g. ("unet",)."""


@dataclass(frozen=True)
class Conditioning:
    """Output of the encode stage for one micro-batch."""

    prompt_embeds_BLD: torch.Tensor
    negative_prompt_embeds_BLD: torch.Tensor | None
    """None when guidance is off (guidance_scale <= 1)."""

    def select(self, index: Sequence[int]) -> Conditioning:
        """Rows ``index`` of both embeddings (one row per image)."""
        idx = torch.as_tensor(list(index), device=self.prompt_embeds_BLD.device)
        neg = self.negative_prompt_embeds_BLD
        return Conditioning(
            self.prompt_embeds_BLD.index_select(0, idx),
            None if neg is None else neg.index_select(0, idx),
        )
