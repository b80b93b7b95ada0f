"""What a pipeline family is described by: how its stock pipeline calls the denoiser under
guidance (CfgConvention), what its encode stage hands the pipeline (Conditioning), and the
defaults and checks every family shares (Family).

A family file (pipeline/families/<name>.py) subclasses Family for the pipeline classes it
serves and sets ``FAMILY = ThatClass``; the registry (pipeline.families) finds it. Nothing
outside the family's file knows anything about the family.

Shape legend: B = images in the micro-batch, L = text tokens, D = text hidden size.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

import torch

from pipeline.smoke import GEN_DEFAULTS_FILE

Calls = tuple[tuple[str, ...], ...]
"""The denoiser calls of one step, in call order; each call's branches in dim-0 order."""


@dataclass(frozen=True, kw_only=True)
class CfgConvention:
    """How a stock pipeline calls its denoiser(s) (see ../shared/FAMILIES.md, Tables 1 and 2).

    The argument map is explicit: ``sample_keys`` names the denoiser arguments whose dim 0 is
    the sample (2B in a batched call, branch-major), by keyword name or nested dict key
    (``"added_cond_kwargs.text_embeds"``); every other argument is shared by the branches and
    the samples. Positional arguments are bound to their names first, so the map never
    depends on how a pipeline happens to pass them.
    """

    denoisers: tuple[str, ...]
    """Pipeline attributes holding denoiser modules, e.g. ("unet",)."""
    calls: Calls
    """The calls of a guided step: SD (("uncond", "cond"),) is one batched call, uncond first;
    Wan (("cond",), ("uncond",)) is two calls, cond first."""
    sample_keys: frozenset[str]
    """Per-sample denoiser arguments (see the class docstring)."""
    latents_key: str
    """The denoiser argument holding the latents: its dim 0 is the call's batch."""
    outputs: int = 1
    """How many leading fields of the denoiser's output are per-sample predictions (LTX-2: 2,
    video and audio); the intercept splits, gathers and gates them together."""
    merge_calls: bool = False
    """With cfg batching, run the branches of different calls of a step as one forward (faster,
    but not the pipeline's own forwards: rounding differs); False runs each call's forward as
    the pipeline would."""

    @property
    def branch_order(self) -> tuple[str, ...]:
        """Every branch of a guided step, in call order."""
        return tuple(name for call in self.calls for name in call)


@dataclass(frozen=True)
class Conditioning:
    """Output of the encode stage for one micro-batch: the embedding keyword arguments of the
    pipeline call, one row per image, e.g. ``{"prompt_embeds": (B, L, D)}`` and
    ``{"negative_prompt_embeds": (B, L, D)}``. None values (Qwen-Image's all-ones masks) are
    kept as None."""

    cond: dict[str, torch.Tensor | None]
    uncond: dict[str, torch.Tensor | None] | None = None
    """None when guidance is off."""

    def select(self, index: Sequence[int]) -> Conditioning:
        """Rows ``index`` of every embedding (one row per image)."""
        def pick(d: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor | None]:
            return {k: None if v is None else v.index_select(0, torch.as_tensor(list(index), device=v.device))
                    for k, v in d.items()}  # fmt: skip

        return Conditioning(pick(self.cond), None if self.uncond is None else pick(self.uncond))

    @property
    def pipe_kwargs(self) -> dict[str, torch.Tensor | None]:
        """Every embedding, as keyword arguments of the pipeline call."""
        return {**self.cond, **(self.uncond or {})}


class Family:
    """Shared parts of a family adapter; a family file fills in the class attributes and the
    stages it needs.

    Args:
        pipe: a loaded pipeline of one of ``pipeline_classes``.
    """

    pipeline_classes: ClassVar[tuple[str, ...]] = ()
    """diffusers pipeline class names this family serves."""
    convention: ClassVar[CfgConvention]
    output_kind: ClassVar[str] = "image"
    """"image" (PIL images from decode), "video" ((F, H, W, 3) uint8 frame arrays) or
    "audio_video" (pipeline.samples.AudioVideo: frames and sound, e.g. LTX-2)."""
    image_input: ClassVar[bool] = False
    """Whether the pipeline is conditioned on an input image (the manifest's ``image`` column):
    then every row needs one, and ``denoise`` takes ``image=`` (a pipeline.samples.ImageRef)."""
    call_defaults: ClassVar[dict[str, Any]] = {}
    """The pipeline's own ``__call__`` defaults gen uses when a job does not set them
    (num_inference_steps, guidance_scale, ...), checked against diffusers by a test."""

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe

    role_components: ClassVar[dict[str, tuple[str, ...]]] = {}
    """Components whose roles differ from pipeline.roles' map by name (component -> the roles
    that load it), because this family's stages run them elsewhere."""

    extra_branches: ClassVar[tuple[str, ...]] = ()
    """Branches some steps add beyond the convention's calls (SD3's skip-layer "cond_skip")."""

    @property
    def denoiser_names(self) -> tuple[str, ...]:
        return self.convention.denoisers

    @property
    def auxiliary_branches(self) -> tuple[str, ...]:
        """Every branch but cond that a step of this family may run, in call order (uncond,
        then the family's own: LTX-2's stg and modality, SD3's cond_skip): the branches CFG
        gating can rebuild from a cached delta to cond, and the per-branch statistics."""
        names = (*self.convention.branch_order, *self.extra_branches)
        return tuple(dict.fromkeys(n for n in names if n != "cond"))

    @cached_property
    def gen_defaults(self) -> dict[str, Any]:
        """The model directory's gen_defaults.json (the built-in models write one: e.g.
        default_size, default_num_frames), else {}: small defaults for pipelines whose own are
        fixed (Flux, Qwen-Image: 1024 px whatever the model)."""
        name = getattr(getattr(self.pipe, "config", None), "_name_or_path", None)
        path = Path(str(name)) / GEN_DEFAULTS_FILE if name else None
        return json.loads(path.read_text()) if path is not None and path.is_file() else {}

    def configure(self, **options: Any) -> None:
        """Take the job's family-specific options (BatchConfig.family_options: SD3's
        skip_guidance_layers ...); a family takes none unless it says so.

        Raises:
            ValueError: an option this family does not take, named.
        """
        for name in options:
            option = "--" + name.replace("_", "-")
            raise ValueError(f"{option}: {type(self.pipe).__name__} does not take it")

    def guided(self, guidance_scale: float, true_cfg_scale: float | None) -> bool:
        """Whether a call runs guidance branches (an uncond): guidance_scale > 1 by default."""
        del true_cfg_scale
        return guidance_scale > 1.0

    def step_calls(self, step: int, num_steps: int, guidance: bool) -> Calls:
        """The denoiser calls of step ``step`` (0-based) of ``num_steps``: the guided calls of
        the convention, or one cond call without guidance."""
        del step, num_steps
        return self.convention.calls if guidance else (("cond",),)

    def branch_inputs(self, cond: Conditioning) -> dict[str, dict[str, Any]]:
        """For each branch the pipeline computes in a later call of the step than its first,
        the denoiser arguments that differ from the cond branch's (two-call pipelines: the
        negative embeddings). The intercept runs those branches at the step's first call."""
        del cond
        return {}

    def prompt_warnings(self, prompts: Sequence[str], negative_prompts: Sequence[str]) -> list[str | None]:
        """Per prompt, a warning if the text encoder truncates it (none by default)."""
        del negative_prompts
        return [None] * len(prompts)


class TrueCfgFamily(Family):
    """Shared by Flux and Qwen-Image: real CFG over a negative prompt (``true_cfg_scale``) is the
    only guidance that makes an uncond branch (gen always passes a negative, "" by default),
    latents are packed 2x2, and the pipeline's own default size is a fixed 128 x VAE factor."""

    def guided(self, guidance_scale: float, true_cfg_scale: float | None) -> bool:
        """Whether the pipeline runs an uncond branch: true_cfg_scale > 1."""
        del guidance_scale
        return (true_cfg_scale or 1.0) > 1.0

    @property
    def size_multiple(self) -> int:
        """Pixels: VAE scale factor x 2 (latents are packed 2x2); the pipeline would floor others."""
        return int(self.pipe.vae_scale_factor) * 2

    @property
    def default_size(self) -> int:
        """Pixels: gen_defaults.json's default_size, else the pipeline's fixed 128 x VAE factor
        (1024 for the real models)."""
        return int(self.gen_defaults.get("default_size") or self.pipe.default_sample_size * self.pipe.vae_scale_factor)
