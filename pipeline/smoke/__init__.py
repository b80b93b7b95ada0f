"""Built-in smoke-test models: real diffusers pipelines with seeded random weights.

Nothing can be downloaded at run time, so these are built from small configs, written with
``save_pretrained`` into a cache directory once, and then loaded through the very same
``DiffusionPipeline.from_pretrained`` path as a user's model. Their images and videos are noise:
they exist to exercise and benchmark the runner, not to make pictures.

One module of this package per family declares its models in ``MODELS`` (name ->
SmokeModel); the registry finds them. Builders import torch, diffusers and transformers
inside, so naming and locating a model stays light.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

GEN_DEFAULTS_FILE = "gen_defaults.json"
"""Optional file in a model directory: the defaults gen uses when --height / --width /
--num-frames are not given (``{"default_size": 64, "default_num_frames": 5}``), and family
defaults that depend on the model (tiny-ltx2: ``"spatio_temporal_guidance_blocks": [1]``)."""


@dataclass(frozen=True, kw_only=True)
class SmokeModel:
    """A built-in model: what it is, and how to build it."""

    description: str
    build: Callable[[Path], None]
    """Builds the pipeline with seeded random weights into a (new) directory."""
    version: int = 1
    """Bumped whenever the build changes, so that cached copies are rebuilt."""


@cache
def smoke_models() -> dict[str, SmokeModel]:
    """Every built-in model, by name, over the modules of this package."""
    found: dict[str, SmokeModel] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name == "text":
            continue
        found.update(importlib.import_module(f"{__name__}.{info.name}").MODELS)
    return found


def write_gen_defaults(out: Path, **defaults: int | list[int]) -> None:
    """Write the model directory's gen_defaults.json (e.g. default_size=64)."""
    (out / GEN_DEFAULTS_FILE).write_text(json.dumps(defaults) + "\n")


def default_cache_dir() -> Path:
    """``$GEN_CACHE_DIR``, else ``$XDG_CACHE_HOME/gen/models``, else ``~/.cache/gen/models``."""
    if os.environ.get("GEN_CACHE_DIR"):
        return Path(os.environ["GEN_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gen" / "models"


def smoke_model_dir(name: str, cache_dir: Path | None = None) -> Path:
    """Where a built-in model lives once built (``ensure_smoke_model`` builds it there).

    Raises:
        KeyError: unknown name.
    """
    model = smoke_models()[name]
    return (cache_dir or default_cache_dir()) / f"{name}-v{model.version}"


def ensure_smoke_model(name: str, cache_dir: Path | None = None) -> Path:
    """Return the directory of a built-in model, building and saving it on first use.

    Safe when several processes call it at once: each builds into a temporary directory and the
    first atomic rename wins.

    Args:
        name: a built-in model name (``smoke_models()``).
        cache_dir: where built models live; default ``default_cache_dir()``.
    Returns:
        A directory that ``DiffusionPipeline.from_pretrained`` loads.
    Raises:
        KeyError: unknown name.
    """
    model = smoke_models()[name]
    root = cache_dir or default_cache_dir()
    final = smoke_model_dir(name, cache_dir)
    if (final / "model_index.json").exists():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        _quiet()
        model.build(tmp / "model")
        try:
            os.rename(tmp / "model", final)
        except OSError:
            if not (final / "model_index.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _quiet() -> None:
    """No save_pretrained progress bars while a built-in model is written."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
