"""Resolve ``--model`` and load it with ``DiffusionPipeline.from_pretrained``.

Resolving is light (no torch, no diffusers: the dry run and the job checks use it); loading
imports diffusers.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.smoke import ensure_smoke_model, smoke_model_dir, smoke_models

if TYPE_CHECKING:  # torch is imported where a model is loaded, not where --model is resolved
    import torch

DEFAULT_MODEL = "tiny-sd"


@dataclass(frozen=True, kw_only=True)
class ModelRef:
    """What ``--model`` resolved to."""

    name: str
    """As the user gave it (or the default)."""
    path: str
    """A local directory or a hub model id, passed to from_pretrained."""
    smoke_test: bool
    """True for a built-in random-weight model."""


def resolve_model(name: str | None, cache_dir: Path | None = None, *, build: bool = True) -> ModelRef:
    """Map ``--model`` to something from_pretrained loads; builds a built-in model on first use.

    Args:
        name: a built-in name (``tiny-sd``, ``small-sd``, ``tiny-wan22``), a local diffusers
            directory, a hub model id, or None for ``tiny-sd``.
        cache_dir: cache for built-in models.
        build: build a built-in model missing from the cache (False: only say where it would
            be, for a dry run).
    Raises:
        ValueError: a local path that is not a diffusers directory (no model_index.json).
    """
    name = name or DEFAULT_MODEL
    if name in smoke_models():
        path = ensure_smoke_model(name, cache_dir) if build else smoke_model_dir(name, cache_dir)
        return ModelRef(name=name, path=str(path), smoke_test=True)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise ValueError(
                f"--model {name}: directory has no model_index.json (not a diffusers pipeline)"
            )
        return ModelRef(name=name, path=str(path.resolve()), smoke_test=False)
    return ModelRef(name=name, path=name, smoke_test=False)


def quiet_libraries() -> None:
    """Silence per-component load bars and deprecation chatter of diffusers / transformers."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("diffusers").setLevel(logging.ERROR)


def load_pipeline(model: ModelRef, *, dtype: torch.dtype, device: torch.device):  # -> DiffusionPipeline
    """Load a pipeline the way a diffusers user does, and move it to ``device``.

    Args:
        model: the resolved model.
        dtype: weights dtype (bfloat16 on GPU, float32 on CPU by default).
        device: this rank's device.
    Returns:
        A ``diffusers.DiffusionPipeline`` in eval mode with its step progress bar disabled.
    """
    from diffusers import DiffusionPipeline

    quiet_libraries()
    with warnings.catch_warnings():  # diffusers >= 0.42 renames torch_dtype to dtype
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
        pipe = DiffusionPipeline.from_pretrained(model.path, torch_dtype=dtype)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe
