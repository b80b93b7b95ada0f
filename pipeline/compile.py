"""``--compile``: torch.compile of a pipeline's denoisers, under gen's intercept.

Where the model declares its repeated blocks (diffusers' ``_repeated_blocks``: UNet2DConditionModel's
BasicTransformerBlock, the transformer blocks of Flux, SD3, Wan, ...), only those are compiled
(diffusers' ``ModelMixin.compile_repeated_blocks``: one compiled graph reused by every block,
so compile time does not grow with depth); else the module's own forward is compiled, as an
instance attribute that pipeline.denoiser's intercept then wraps (the intercept's bookkeeping,
gates and collectives stay outside the graph). ``dynamic=True``: the sub-batches of gated steps
(cond only, B instead of 2B rows) and the halves of an out-of-memory backoff reuse the graph.

Compiled kernels round differently from eager ones, so ``--compile`` is a generation option: a
resumed job keeps it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def compile_denoisers(pipe: Any, names: Sequence[str]) -> list[str]:
    """Compile the denoiser modules ``names`` of ``pipe`` in place (missing ones are skipped).

    Args:
        pipe: a diffusers pipeline, loaded on its device.
        names: its denoiser attributes (the family convention's ``denoisers``, e.g. ("unet",)).
    Returns:
        One line per module: what was compiled, e.g. "unet: 2 repeated blocks (BasicTransformerBlock)".
    """
    done = []
    for name in names:
        module = getattr(pipe, name, None)
        if module is None:
            continue
        blocks = getattr(module, "_repeated_blocks", None) or []
        found = [m for m in module.modules() if type(m).__name__ in blocks]
        if found and hasattr(module, "compile_repeated_blocks"):
            module.compile_repeated_blocks(dynamic=True)
            done.append(f"{name}: {len(found)} repeated block(s) ({', '.join(blocks)})")
        else:
            module.forward = torch.compile(type(module).forward.__get__(module), dynamic=True)
            done.append(f"{name}: the whole forward")
    return done


_TOP_LEVEL = "_compile.compile_inner"
"""torch._dynamo's outermost timed phase: one entry per frame compiled (torch 2.13)."""


def compile_seconds() -> float:
    """Seconds this process has spent compiling so far (torch._dynamo's own timings: tracing and
    Inductor code generation), to report apart from generation time; 0.0 when nothing compiled."""
    from torch._dynamo.utils import compilation_time_metrics

    # Its keys are nested phases (tracing, Inductor lowering, codegen ... each inside the last);
    # dynamo's entry point holds them all, once per compiled frame.
    return float(sum(compilation_time_metrics.get(_TOP_LEVEL, [])))
