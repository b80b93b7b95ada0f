"""Qwen-Image (QwenImagePipeline): true CFG over a negative prompt (``true_cfg_scale``, 4.0 by
default), two transformer calls per step, cond first, under cache_context("cond" / "uncond")
(diffusers pipelines/qwenimage/pipeline_qwenimage.py:553-672).

- Per sample: hidden_states (B, tokens, 64) packed, timestep (t / 1000, (B,)),
  encoder_hidden_states (B, L, D), encoder_hidden_states_mask (B, L) or None, img_shapes (a list
  of B entries). Shared: guidance (None unless guidance_embeds), attention_kwargs, return_dict.
- The cond and uncond texts are padded to their own longest row, so their lengths differ and
  either mask may be None (all rows full): the branches are never concatenated into one
  forward; each runs as the pipeline's own call.
- The pipeline combines: ``comb = neg + s (c - neg)``, then rescales it to the per-token norm of
  cond; the intercept hands back the raw predictions.
- gen passes "" when a row has no negative prompt, which turns true CFG on (diffusers runs it
  only when a negative is given: None is one call per step).
- One step gives all-NaN latents with Qwen-Image's scheduler (shift_terminal: 0 / 0): such rows
  become error rows ("non-finite latents").

Shape legend: B = images, L = text tokens, D = text hidden size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from pipeline.families.base import CfgConvention, Conditioning, TrueCfgFamily

MAX_SEQUENCE_LENGTH = 512
"""Text tokens per prompt: QwenImagePipeline.__call__'s default (encode_prompt's own is 1024)."""


class QwenImageFamily(TrueCfgFamily):
    """QwenImagePipeline: cond then uncond calls with texts of their own lengths."""

    pipeline_classes = ("QwenImagePipeline",)
    convention = CfgConvention(
        denoisers=("transformer",),
        calls=(("cond",), ("uncond",)),
        sample_keys=frozenset({"hidden_states", "timestep", "encoder_hidden_states",
                               "encoder_hidden_states_mask", "img_shapes"}),  # fmt: skip
        latents_key="hidden_states",
    )
    call_defaults = {"num_inference_steps": 50, "guidance_scale": 1.0, "true_cfg_scale": 4.0}

    @torch.no_grad()
    def encode(self, prompts: Sequence[str], negative_prompts: Sequence[str], *, guidance: bool) -> Conditioning:
        """Encode stage: Qwen2.5-VL hidden states behind the pipeline's prompt template (512
        tokens), for the prompts and, under true CFG, the negatives.

        Returns:
            Conditioning: prompt_embeds (B, L, D), prompt_embeds_mask (B, L) or None, and under
            guidance their negative_ twins (their own L).
        """
        def embed(texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
            return self.pipe.encode_prompt(prompt=list(texts), device=self.pipe._execution_device,
                                           num_images_per_prompt=1, max_sequence_length=MAX_SEQUENCE_LENGTH)  # fmt: skip

        pe, pm = embed(prompts)
        uncond = None
        if guidance:
            npe, nm = embed(negative_prompts)
            uncond = {"negative_prompt_embeds": npe, "negative_prompt_embeds_mask": nm}
        return Conditioning({"prompt_embeds": pe, "prompt_embeds_mask": pm}, uncond)

    def branch_inputs(self, cond: Conditioning) -> dict[str, dict[str, Any]]:
        """The uncond call differs from the cond call in its text and mask only."""
        if not cond.uncond:
            return {}
        dtype = self.pipe.transformer.dtype
        mask = cond.uncond["negative_prompt_embeds_mask"]
        return {"uncond": {"encoder_hidden_states": cond.uncond["negative_prompt_embeds"].to(dtype),
                           "encoder_hidden_states_mask": mask}}  # fmt: skip

    def denoise(self, cond: Conditioning, generators: list[torch.Generator], *, height: int, width: int,
                num_inference_steps: int, guidance_scale: float, guidance_rescale: float,
                true_cfg_scale: float | None = None) -> torch.Tensor:  # fmt: skip
        """Denoise stage: the stock pipeline from noise to latents (output_type="latent").

        Args:
            guidance_scale: only for guidance-distilled transformers (guidance_embeds); else
                not passed (the pipeline would warn that it ignores it).
            guidance_rescale: not a Qwen-Image argument; ignored.
            true_cfg_scale: CFG over the negative prompt when > 1.
        Returns:
            Packed latents (B, (H/16)(W/16), 64).
        """
        del guidance_rescale
        distilled = self.pipe.transformer.config.guidance_embeds
        return self.pipe(
            **cond.pipe_kwargs, height=height, width=width, num_inference_steps=num_inference_steps,
            true_cfg_scale=true_cfg_scale or 1.0, guidance_scale=guidance_scale if distilled else None,
            generator=generators, output_type="latent", return_dict=False,
        )[0]  # fmt: skip

    @torch.no_grad()
    def decode(self, latents_BTC: torch.Tensor, *, height: int, width: int) -> list[Any]:
        """Decode stage, the end of __call__ (:703-714): unpack at ``height`` x ``width``, undo
        latents_mean / latents_std (as ``lat / (1 / std) + mean``: its rounding), decode the one
        frame, PIL."""
        pipe, vae = self.pipe, self.pipe.vae
        latents = type(pipe)._unpack_latents(latents_BTC, height, width, pipe.vae_scale_factor).to(vae.dtype)
        view = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(view).to(latents.device, latents.dtype)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(view).to(latents.device, latents.dtype)
        image = vae.decode(latents / inv_std + mean, return_dict=False)[0][:, :, 0]
        return pipe.image_processor.postprocess(image, output_type="pil")


FAMILY = QwenImageFamily
