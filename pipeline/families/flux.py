"""Flux.1 (FluxPipeline): guidance-distilled by default, one transformer call per step with a
``guidance`` embedding; true CFG with ``true_cfg_scale > 1`` and a negative prompt: two calls per
step, cond first, under cache_context("cond" / "uncond") (diffusers pipelines/flux/pipeline_flux.py).

- ``guidance_scale`` is the distilled guidance embedding (3.5 by default), not CFG: one branch
  ("cond") unless true CFG is on; CFG gating then has no uncond to skip.
- Per sample: hidden_states (B, tokens, 64) packed, timestep (t / 1000, (B,)), guidance (B,),
  pooled_projections (B, D_clip), encoder_hidden_states (B, 512, D_t5). Shared: txt_ids
  (512, 3), img_ids (tokens, 3), joint_attention_kwargs, return_dict. The uncond call differs
  only in encoder_hidden_states and pooled_projections.
- Batching cond and uncond into one forward differs from the pipeline's two calls by a level
  of rounding (max 1/255 per pixel on tiny-flux), so they run as the pipeline runs them.
- output_type="latent" returns packed latents: decode unpacks them at the requested size.
- A negative prompt string shared by several prompts makes 1-row negative embeddings that the
  transformer broadcasts; gen always passes one negative per prompt.

Shape legend: B = images, D = hidden sizes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from pipeline.families.base import CfgConvention, Conditioning, TrueCfgFamily
from pipeline.prompts import truncation_warnings

MAX_SEQUENCE_LENGTH = 512
"""T5 tokens per prompt: FluxPipeline.__call__'s default."""


class FluxFamily(TrueCfgFamily):
    """FluxPipeline: one call (distilled guidance), or cond then uncond calls (true CFG)."""

    pipeline_classes = ("FluxPipeline",)
    convention = CfgConvention(
        denoisers=("transformer",),
        calls=(("cond",), ("uncond",)),
        sample_keys=frozenset({"hidden_states", "timestep", "guidance", "pooled_projections",
                               "encoder_hidden_states"}),  # fmt: skip
        latents_key="hidden_states",
    )
    call_defaults = {"num_inference_steps": 28, "guidance_scale": 3.5, "true_cfg_scale": 1.0}

    def prompt_warnings(self, prompts: Sequence[str], negative_prompts: Sequence[str]) -> list[str | None]:
        """Per prompt, a warning if CLIP's 77 or T5's 512 tokens truncate it or its negative."""
        clip = truncation_warnings(self.pipe.tokenizer, self.pipe.tokenizer.model_max_length, "CLIP",
                                   prompts, negative_prompts)  # fmt: skip
        t5 = truncation_warnings(self.pipe.tokenizer_2, MAX_SEQUENCE_LENGTH, "T5", prompts, negative_prompts)
        return ["; ".join(w for w in pair if w) or None for pair in zip(clip, t5)]

    @torch.no_grad()
    def encode(self, prompts: Sequence[str], negative_prompts: Sequence[str], *, guidance: bool) -> Conditioning:
        """Encode stage: CLIP pooled and T5 sequence embeddings, as FluxPipeline.__call__
        encodes them (512 T5 tokens), and again for the negatives under true CFG.

        Returns:
            Conditioning: prompt_embeds (B, 512, D), pooled_prompt_embeds (B, D_clip), and under
            guidance their negative_ twins.
        """
        def embed(texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
            pe, pooled, _ = self.pipe.encode_prompt(
                prompt=list(texts), prompt_2=None, device=self.pipe._execution_device,
                num_images_per_prompt=1, max_sequence_length=MAX_SEQUENCE_LENGTH,
            )  # fmt: skip
            return pe, pooled

        pe, pooled = embed(prompts)
        uncond = None
        if guidance:
            npe, npooled = embed(negative_prompts)
            uncond = {"negative_prompt_embeds": npe, "negative_pooled_prompt_embeds": npooled}
        return Conditioning({"prompt_embeds": pe, "pooled_prompt_embeds": pooled}, uncond)

    def branch_inputs(self, cond: Conditioning) -> dict[str, dict[str, Any]]:
        """The uncond call differs from the cond call in its T5 and pooled CLIP embeddings (as
        the pipeline casts them: the transformer's dtype)."""
        if not cond.uncond:
            return {}
        dtype = self.pipe.transformer.dtype
        return {"uncond": {"encoder_hidden_states": cond.uncond["negative_prompt_embeds"].to(dtype),
                           "pooled_projections": cond.uncond["negative_pooled_prompt_embeds"].to(dtype)}}  # fmt: skip

    def denoise(self, cond: Conditioning, generators: list[torch.Generator], *, height: int, width: int,
                num_inference_steps: int, guidance_scale: float, guidance_rescale: float,
                true_cfg_scale: float | None = None) -> torch.Tensor:  # fmt: skip
        """Denoise stage: the stock pipeline from noise to latents (output_type="latent").

        Args:
            guidance_scale: the distilled guidance embedding (Flux-dev; 3.5 by default).
            guidance_rescale: not a Flux argument; ignored.
            true_cfg_scale: real CFG over the negative prompt when > 1 (two calls per step).
        Returns:
            Packed latents (B, (H/16)(W/16), 64).
        """
        del guidance_rescale
        return self.pipe(
            **cond.pipe_kwargs, height=height, width=width, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, true_cfg_scale=true_cfg_scale or 1.0, generator=generators,
            output_type="latent", return_dict=False,
        )[0]  # fmt: skip

    @torch.no_grad()
    def decode(self, latents_BTC: torch.Tensor, *, height: int, width: int) -> list[Any]:
        """Decode stage, as the end of __call__: unpack at ``height`` x ``width``, undo the VAE
        scaling and shift, decode, postprocess to PIL."""
        pipe, vae = self.pipe, self.pipe.vae
        latents = type(pipe)._unpack_latents(latents_BTC, height, width, pipe.vae_scale_factor)
        latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        return pipe.image_processor.postprocess(image, output_type="pil")


FAMILY = FluxFamily
