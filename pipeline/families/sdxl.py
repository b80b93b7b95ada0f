"""Stable Diffusion XL (StableDiffusionXLPipeline): one UNet call per step on [uncond; cond],
uncond first, with the SDXL micro-conditioning in ``added_cond_kwargs``
(diffusers pipelines/stable_diffusion_xl/pipeline_stable_diffusion_xl.py:1150-1231).

- Per sample (2B under CFG): sample (positional), encoder_hidden_states (B, 77, D1 + D2),
  added_cond_kwargs.text_embeds (B, D_pool), added_cond_kwargs.time_ids (B, 6). Shared: the
  0-d timestep, timestep_cond (None under CFG), cross_attention_kwargs, return_dict.
- time_ids rows come as [neg, pos, neg, pos, ...] after the pipeline's repeat while the
  embeddings are [neg...; pos...] (only visible with negative_original_size and B > 1):
  splitting both by position, as the pipeline's own chunk does, reproduces it exactly.
- No negative prompt = the pipeline's zero negative embeddings (force_zeros_for_empty_prompt);
  "" would encode the empty string. gen's "" (no negative) therefore becomes zeros per sample.
- Decode: fp16 VAEs with force_upcast decode in float32; latents_mean / latents_std when the
  VAE has them, else / scaling_factor; the invisible watermark when the pipeline has one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from pipeline.families.base import CfgConvention, Conditioning, Family
from pipeline.prompts import truncation_warnings


class StableDiffusionXLFamily(Family):
    """StableDiffusionXLPipeline: batched [uncond; cond], added_cond_kwargs split per branch."""

    pipeline_classes = ("StableDiffusionXLPipeline",)
    convention = CfgConvention(
        denoisers=("unet",),
        calls=(("uncond", "cond"),),
        sample_keys=frozenset({"sample", "encoder_hidden_states", "added_cond_kwargs.text_embeds",
                               "added_cond_kwargs.time_ids"}),  # fmt: skip
        latents_key="sample",
    )
    call_defaults = {"num_inference_steps": 50, "guidance_scale": 5.0}

    def guided(self, guidance_scale: float, true_cfg_scale: float | None) -> bool:
        """CFG runs when guidance_scale > 1 and the UNet is not guidance-distilled (LCM)."""
        return guidance_scale > 1.0 and self.pipe.unet.config.time_cond_proj_dim is None

    @property
    def size_multiple(self) -> int:
        """Pixels: the VAE scale factor."""
        return int(self.pipe.vae_scale_factor)

    @property
    def default_size(self) -> int:
        """Pixels: UNet sample_size x VAE scale factor (1024 for SDXL base), the pipeline's own."""
        return int(self.pipe.default_sample_size * self.pipe.vae_scale_factor)

    def prompt_warnings(self, prompts: Sequence[str], negative_prompts: Sequence[str]) -> list[str | None]:
        """Per prompt, a warning if CLIP's 77 tokens truncate it or its negative prompt."""
        tokenizer = self.pipe.tokenizer or self.pipe.tokenizer_2
        return truncation_warnings(tokenizer, tokenizer.model_max_length, "CLIP", prompts, negative_prompts)

    @torch.no_grad()
    def encode(self, prompts: Sequence[str], negative_prompts: Sequence[str], *, guidance: bool) -> Conditioning:
        """Encode stage, as StableDiffusionXLPipeline.__call__ encodes (both CLIPs, clip_skip
        None; a sample without a negative prompt gets zero negatives, as the pipeline's own
        ``negative_prompt=None`` with force_zeros_for_empty_prompt).

        Returns:
            Conditioning: prompt_embeds (B, 77, D), pooled_prompt_embeds (B, D_pool), and under
            guidance their negative_ twins.
        """
        pe, npe, pooled, npooled = self.pipe.encode_prompt(
            prompt=list(prompts), prompt_2=None, device=self.pipe._execution_device, num_images_per_prompt=1,
            do_classifier_free_guidance=guidance, negative_prompt=list(negative_prompts) if guidance else None,
            negative_prompt_2=None, lora_scale=None, clip_skip=None,
        )  # fmt: skip
        if not guidance:
            return Conditioning({"prompt_embeds": pe, "pooled_prompt_embeds": pooled})
        if self.pipe.config.force_zeros_for_empty_prompt:
            empty = torch.tensor([not n for n in negative_prompts], device=npe.device)
            npe = torch.where(empty.view(-1, 1, 1), torch.zeros_like(pe), npe)
            npooled = torch.where(empty.view(-1, 1), torch.zeros_like(pooled), npooled)
        return Conditioning({"prompt_embeds": pe, "pooled_prompt_embeds": pooled},
                            {"negative_prompt_embeds": npe, "negative_pooled_prompt_embeds": npooled})  # fmt: skip

    def denoise(self, cond: Conditioning, generators: list[torch.Generator], *, height: int, width: int,
                num_inference_steps: int, guidance_scale: float, guidance_rescale: float) -> torch.Tensor:  # fmt: skip
        """Denoise stage: the stock pipeline from noise to latents (output_type="latent").

        Returns:
            Latents (B, 4, H/8, W/8), scaled by the VAE scaling factor.
        """
        return self.pipe(
            **cond.pipe_kwargs, height=height, width=width, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, generator=generators,
            output_type="latent", return_dict=False,
        )[0]  # fmt: skip

    @torch.no_grad()
    def decode(self, latents_BCHW: torch.Tensor, *, height: int, width: int) -> list[Any]:
        """Decode stage, the end of __call__ (:1262-1303): upcast, un-scale, decode, watermark, PIL."""
        del height, width
        pipe, vae = self.pipe, self.pipe.vae
        latents = latents_BCHW
        upcast = vae.dtype == torch.float16 and vae.config.force_upcast
        if upcast:
            vae.to(dtype=torch.float32)
            latents = latents.to(next(iter(vae.post_quant_conv.parameters())).dtype)
        elif latents.dtype != vae.dtype:
            latents = latents.to(vae.dtype)
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            c = vae.config.latent_channels
            mean = torch.tensor(mean).view(1, c, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(std).view(1, c, 1, 1).to(latents.device, latents.dtype)
            latents = latents * std / vae.config.scaling_factor + mean
        else:
            latents = latents / vae.config.scaling_factor
        image = vae.decode(latents, return_dict=False)[0]
        if upcast:
            vae.to(dtype=torch.float16)
        if getattr(pipe, "watermark", None) is not None:
            image = pipe.watermark.apply_watermark(image)
        return pipe.image_processor.postprocess(image, output_type="pil")


FAMILY = StableDiffusionXLFamily
