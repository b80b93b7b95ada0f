"""Stable Diffusion 1.x / 2.x (StableDiffusionPipeline): one UNet call per step on
[uncond; cond], uncond first (diffusers pipelines/stable_diffusion/pipeline_stable_diffusion.py).

Shape legend: B = images in the micro-batch, L = text tokens, D = text hidden size,
C/H/W = latent channels and size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from pipeline.families.base import CfgConvention, Conditioning, Family
from pipeline.prompts import truncation_warnings


class StableDiffusionFamily(Family):
    """StableDiffusionPipeline: one UNet call per step on [uncond; cond] (uncond first)."""

    pipeline_classes = ("StableDiffusionPipeline",)
    convention = CfgConvention(
        denoisers=("unet",),
        calls=(("uncond", "cond"),),
        # timestep is 0-d (shared); timestep_cond is None under CFG; cross_attention_kwargs shared.
        sample_keys=frozenset({"sample", "encoder_hidden_states"}),
        latents_key="sample",
    )
    call_defaults = {"num_inference_steps": 50, "guidance_scale": 7.5}

    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this (pixels): the VAE scale factor."""
        return int(self.pipe.vae_scale_factor)

    @property
    def default_size(self) -> int:
        """The model's native resolution in pixels (UNet sample_size x VAE scale factor)."""
        return int(self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor)

    def encode(
        self, prompts: Sequence[str], negative_prompts: Sequence[str], *, guidance: bool
    ) -> Conditioning:
        """Encode stage: text -> embeddings (CLIP, truncated at the tokenizer's max length).

        Args:
            prompts: B prompts.
            negative_prompts: B negative prompts ("" = the unconditional embedding).
            guidance: whether negative embeddings are needed (guidance_scale > 1).
        Returns:
            Conditioning with (B, L, D) ``prompt_embeds`` and ``negative_prompt_embeds``.
        """
        prompt_embeds, negative = self.pipe.encode_prompt(
            list(prompts),
            self.pipe.device,
            1,
            guidance,
            list(negative_prompts) if guidance else None,
        )
        return Conditioning({"prompt_embeds": prompt_embeds},
                            {"negative_prompt_embeds": negative} if guidance else None)

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
            **cond.pipe_kwargs,
            height=height,
            width=width,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            guidance_rescale=guidance_rescale,
            generator=generators,
            output_type="latent",
            return_dict=False,
        )[0]

    def decode(self, latents_BCHW: torch.Tensor, *, height: int, width: int) -> list[Any]:
        """Decode stage: latents -> PIL images with the pipeline's own VAE and image processor.

        The safety checker is not run (datasets are filtered downstream). ``height`` and
        ``width`` (the requested pixels) follow from the latents here.
        """
        del height, width
        vae = self.pipe.vae
        image = vae.decode(latents_BCHW / vae.config.scaling_factor, return_dict=False)[0]
        return self.pipe.image_processor.postprocess(image, output_type="pil")


FAMILY = StableDiffusionFamily
