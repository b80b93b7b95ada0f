"""Disaggregated roles: which pipeline components the encoder, denoiser and decoder load.

A role loads only the weights of its own modules: ``DiffusionPipeline.from_pretrained(dir,
text_encoder=..., vae=...)`` is given, for every other module, a *stub*: the module's class built
from its config with parameters on the meta device (no memory; accelerate's init_empty_weights)
and its persistent buffers read from the checkpoint (LTX-2's denoise reads ``vae.latents_mean``:
a few floats). The pipeline's ``__init__`` then derives what it derives from its components'
configs (vae_scale_factor, patch sizes, tokenizer lengths) exactly as for the whole pipeline:
with ``vae=None`` it would fall back to constants that are wrong for most tiny models (and for
some real ones: FAMILIES.md, "Stage-split obstacles"). After construction each stub is wrapped in
a RoleStub (not a torch module, so ``pipe.device`` and ``pipe.to`` see only loaded modules):
its config, dtype and buffers read through; calling any of its methods raises RoleError naming
the role that should have loaded it.

Components that are not torch modules (tokenizers, schedulers, image processors) hold no
weights and are loaded by every role. The map by name (sglang's filter_modules_for_role does the
same by module-name prefix): text encoders, image encoders -> encoder; unet, transformer(s) ->
denoiser; vae, audio_vae, vocoder -> decoder; a family moves what its stages need elsewhere
(Family.role_components: Wan I2V's denoise runs the image encoder and the VAE encoder; LTX-2's
runs the text connectors). A module named nowhere is loaded by every role, so nothing goes
missing.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.loading import ModelRef, quiet_libraries

if TYPE_CHECKING:
    import torch

ROLES = ("encoder", "denoiser", "decoder")
"""The three stages of a pipeline, in order."""

_BY_PREFIX = (
    ("text_encoder", "encoder"), ("image_encoder", "encoder"), ("prompt_enhancer", "encoder"),
    ("unet", "denoiser"), ("transformer", "denoiser"),
    ("vae", "decoder"), ("audio_vae", "decoder"), ("vocoder", "decoder"),
)  # fmt: skip


class RoleError(RuntimeError):
    """A stage used a module its role does not load."""


def component_roles(name: str, overrides: dict[str, tuple[str, ...]] | None = None) -> tuple[str, ...]:
    """The roles that load module ``name`` (a model_index.json key).

    Args:
        name: e.g. "text_encoder_2", "transformer", "vae".
        overrides: a family's role_components (component -> the roles that load it).
    Returns:
        The roles, in ROLES order: the family's, else the one of the name map, else every role
        (a name the map does not know).
    """
    if overrides and name in overrides:
        return tuple(r for r in ROLES if r in overrides[name])
    own = next((role for prefix, role in _BY_PREFIX if name.startswith(prefix)), None)
    return ROLES if own is None else (own,)


def role_modules(model_dir: str | Path, role: str) -> dict[str, bool]:
    """For every torch-module component of a pipeline directory, whether ``role`` loads it.

    Args:
        model_dir: a local diffusers directory (model_index.json); its family's
            role_components apply.
        role: one of ROLES.
    Returns:
        {component: loaded}, components in model_index.json order; components whose class is
        not a torch module (tokenizers, schedulers, processors) or null are left out: every
        role loads them.
    Raises:
        ValueError: an unknown role.
        UnsupportedPipelineError: no family serves the directory's pipeline class.
    """
    from pipeline.families import family_class

    if role not in ROLES:
        raise ValueError(f"role {role!r} is not one of {', '.join(ROLES)}")
    index = json.loads((Path(model_dir) / "model_index.json").read_text())
    overrides = family_class(index["_class_name"]).role_components
    out = {}
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or spec[1] is None:
            continue
        if _is_module_class(spec[0], spec[1]):
            out[name] = role in component_roles(name, overrides)
    return out


def _component_class(library: str, class_name: str) -> type | None:
    """The class model_index.json names: ``library`` is a package (diffusers, transformers) or,
    as diffusers reads it, a module of diffusers.pipelines (LTX-2's connectors: "ltx2")."""
    import importlib

    for module in (library, f"diffusers.pipelines.{library}"):
        try:
            return getattr(importlib.import_module(module), class_name)
        except (ImportError, AttributeError):
            continue
    return None


def _is_module_class(library: str, class_name: str) -> bool:
    import torch

    cls = _component_class(library, class_name)
    return isinstance(cls, type) and issubclass(cls, torch.nn.Module)


def load_role_pipeline(model: ModelRef, role: str, *, dtype: torch.dtype, device: torch.device):  # -> DiffusionPipeline
    """Load the pipeline with only ``role``'s modules, the way load_pipeline loads all of it.

    Args:
        model: a resolved model whose path is a local directory.
        role: one of ROLES.
        dtype: weights dtype of the loaded modules (and the stubs' dtype and float buffers).
        device: where the loaded modules (and the stubs' buffers) go.
    Returns:
        A DiffusionPipeline whose non-role modules are RoleStubs.
    Raises:
        ValueError: an unknown role, or a model that is not a local directory.
        UnsupportedPipelineError: no family serves the pipeline class.
    """
    from diffusers import DiffusionPipeline

    path = Path(model.path)
    if not (path / "model_index.json").is_file():
        raise ValueError(f"--model {model.name}: roles need a local diffusers directory")
    index = json.loads((path / "model_index.json").read_text())
    skipped = [name for name, loaded in role_modules(path, role).items() if not loaded]
    quiet_libraries()
    stubs = {name: _stub(path, name, *index[name], dtype=dtype, device=device) for name in skipped}
    with warnings.catch_warnings():  # diffusers >= 0.42 renames torch_dtype to dtype
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
        pipe = DiffusionPipeline.from_pretrained(str(path), torch_dtype=dtype, **stubs)
    for name, module in stubs.items():  # bypass register_modules: the config keeps the class
        object.__setattr__(pipe, name, RoleStub(name, role, module))
    pipe.to(device)  # moves the loaded modules only: stubs are not torch modules
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _stub(path: Path, name: str, library: str, class_name: str, *, dtype: torch.dtype,
          device: torch.device) -> Any:  # fmt: skip
    """``class_name`` of ``library`` built from path/name's config with meta parameters and
    the checkpoint's persistent buffers (float ones in ``dtype``) on ``device``."""
    from accelerate import init_empty_weights

    cls = _component_class(library, class_name)
    folder = path / name
    with init_empty_weights(include_buffers=False), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if cls.__module__.startswith("transformers."):
            config = cls.config_class.from_pretrained(folder)
            module = cls._from_config(config)
        else:
            module = cls.from_config(cls.load_config(folder))
    module.eval()
    module.to(dtype)  # meta parameters: only their dtype changes
    saved = _read_tensors(folder, {k for k, _ in module.named_buffers()})
    for key, buf in list(module.named_buffers()):
        owner_name, _, leaf = key.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        value = saved.get(key, buf)
        if value.is_floating_point():
            value = value.to(dtype)
        owner._buffers[leaf] = value.to(device)
    return module


def _read_tensors(folder: Path, keys: set[str]) -> dict[str, torch.Tensor]:
    """Tensors ``keys`` from a component folder's checkpoint (safetensors, sharded or not, else
    a torch .bin), reading nothing else; keys it lacks are left out."""
    import torch
    from safetensors import safe_open

    found: dict[str, torch.Tensor] = {}
    if not keys:
        return found
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in keys & set(f.keys()):
                found[key] = f.get_tensor(key)
    if not found:
        for file in sorted(folder.glob("*.bin")):
            state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
            found.update({k: state[k].clone() for k in keys & set(state)})
    return found


class RoleStub:
    """A module a role does not load, standing in for it in the pipeline.

    Reads of its config, dtype, buffers and other plain attributes go to the module built on
    the meta device (what the pipeline's call reads of modules it does not run: LTX-2's
    ``vae.latents_mean``, Flux's ``text_encoder.dtype``); calling any of its methods raises
    RoleError. It is not a torch.nn.Module, so ``pipe.device`` and ``pipe.to`` ignore it.
    """

    def __init__(self, name: str, role: str, module: Any) -> None:
        self._gen_name, self._gen_role, self._gen_module = name, role, module

    def __getattr__(self, attr: str) -> Any:
        value = getattr(self._gen_module, attr)
        if attr == "_reset_stateful_cache":  # diffusers' end-of-call cleanup: nothing to reset
            return lambda *a, **k: None
        if callable(value) and not isinstance(value, type) and not hasattr(value, "shape"):
            return self._refuse(attr)
        return value

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._refuse("forward")()

    def _refuse(self, attr: str):  # noqa: ANN202
        def refuse(*args: Any, **kwargs: Any) -> Any:
            raise RoleError(f"{self._gen_name}.{attr}(): the {self._gen_role} role does not load "
                            f"{self._gen_name} ({type(self._gen_module).__name__}); see pipeline.roles")  # fmt: skip

        return refuse

    def __repr__(self) -> str:
        return f"RoleStub({self._gen_name}: {type(self._gen_module).__name__}, not loaded by the {self._gen_role} role)"
