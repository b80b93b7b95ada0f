"""Supported pipeline families: their CFG calling convention and their three stages.

Each family declares how its stock diffusers pipeline calls the denoiser under classifier-free
guidance (one concatenated call, or one call per branch), which modules are denoisers, and how
to run encode / denoise / decode as separate steps (later: separate roles). Pipeline code stays
diffusers' own; only the denoiser call is intercepted (pipeline/denoiser.py).

Shape legend: B = images in the micro-batch, L = text tokens, D = text hidden size,
C/H/W = latent channels and size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from pipeline.conventions import CfgConvention, Conditioning
from pipeline.prompts import truncation_warnings
from pipeline.wan import WanFamily

__all__ = ["FAMILIES", "CfgConvention", "Conditioning", "StableDiffusionFamily", "WanFamily",
           "UnsupportedPipelineError", "family_for"]  # fmt: skip


class StableDiffusionFamily:
    """StableDiffusionPipeline: one UNet call per step on [uncond; cond] (uncond first)."""

    convention = CfgConvention(batched=True, branch_order=("uncond", "cond"), denoisers=("unet",))
    cond_kwarg = "encoder_hidden_states"
    """The denoiser argument that carries the text conditioning."""
    output_kind = "image"
    """"image" (PIL images from decode) or "video" (frame arrays)."""

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe

    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this (pixels): the VAE scale factor."""
        return int(self.pipe.vae_scale_factor)

    @property
    def default_size(self) -> int:
        """The model's native resolution in pixels (UNet sample_size x VAE scale factor)."""
        return int(self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor)

    @property
    def denoiser_names(self) -> tuple[str, ...]:
        return self.convention.denoisers

    def encode(
        self, prompts: Sequence[str], negative_prompts: Sequence[str], *, guidance: bool
    ) -> Conditioning:
        """Encode stage: text -> embeddings (CLIP, truncated at the tokenizer's max length).

        Args:
            prompts: B prompts.
            negative_prompts: B negative prompts ("" = the unconditional embedding).
            guidance: whether negative embeddings are needed (guidance_scale > 1).
        Returns:
            Conditioning with (B, L, D) embeddings.
        """
        prompt_embeds, negative = self.pipe.encode_prompt(
            list(prompts),
            self.pipe.device,
            1,
            guidance,
            list(negative_prompts) if guidance else None,
        )
        return Conditioning(prompt_embeds, negative if guidance else None)

    def prompt_warnings(self, prompts: Sequence[str], negative_prompts: Sequence[str]) -> list[str | None]:
        """Per prompt, a warning if CLIP truncates it or its negative prompt (pipeline.prompts)."""
        tokenizer = self.pipe.tokenizer
        return truncation_warnings(tokenizer, tokenizer.model_max_length, "CLIP", prompts,
                                   negative_prompts)  # fmt: skip

    def denoise(
        self,
        cond: Conditioning,
        generators: list[torch.Generator],
        *,
        height: int,
        width: int,
        num_inference_steps: int,
        guidance_scale: float,
        guidance_rescale: float,
    ) -> torch.Tensor:
        """Denoise stage: the stock pipeline from noise to latents (output_type="latent").

        Args:
            cond: (B, L, D) embeddings, one row per image.
            generators: B generators, one per image: each image's noise is independent of its
                batch mates.
            height, width: pixels, multiples of ``size_multiple``.
            num_inference_steps: scheduler steps, >= 1.
            guidance_scale: CFG scale s; <= 1 disables guidance.
            guidance_rescale: diffusers' guidance_rescale phi in [0, 1] (Lin et al., 2023).
        Returns:
            Latents (B, C, H/8, W/8), still scaled by the VAE scaling factor.
        """
        return self.pipe(
            prompt_embeds=cond.prompt_embeds_BLD,
            negative_prompt_embeds=cond.negative_prompt_embeds_BLD,
            height=height,
            width=width,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            guidance_rescale=guidance_rescale,
            generator=generators,
            output_type="latent",
            return_dict=False,
        )[0]

    def decode(self, latents_BCHW: torch.Tensor) -> list[Any]:
        """Decode stage: latents -> PIL images with the pipeline's own VAE and image processor.

        The safety checker is not run (datasets are filtered downstream).
        """
        vae = self.pipe.vae
        image = vae.decode(latents_BCHW / vae.config.scaling_factor, return_dict=False)[0]
        return self.pipe.image_processor.postprocess(image, output_type="pil")



FAMILIES: dict[str, type[StableDiffusionFamily] | type[WanFamily]] = {
    "StableDiffusionPipeline": StableDiffusionFamily,
    "WanPipeline": WanFamily,
}


class UnsupportedPipelineError(ValueError):
    """The loaded pipeline class has no declared CFG convention."""


def family_for(pipe: Any) -> StableDiffusionFamily | WanFamily:
    """The family adapter of a loaded pipeline.

    Raises:
        UnsupportedPipelineError: the class is not supported; the message lists those that are.
    """
    cls = type(pipe).__name__
    if cls not in FAMILIES:
        raise UnsupportedPipelineError(
            f"pipeline class {cls} is not supported; supported: {', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[cls](pipe)
