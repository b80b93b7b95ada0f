"""PixArt-Sigma (PixArtSigmaPipeline): one transformer call per step on [uncond; cond], uncond
first, with T5 attention masks per branch and learned-sigma output channels
(diffusers pipelines/pixart_alpha/pipeline_pixart_sigma.py).

- Per sample (2B under CFG): hidden_states (positional), encoder_hidden_states (B, 300, D),
  encoder_attention_mask (B, 300) int64, timestep (B,) int64. Shared: added_cond_kwargs
  ({"resolution": None, "aspect_ratio": None} in Sigma), return_dict.
- The transformer predicts 2C channels (learned sigma); the pipeline combines all of them and
  keeps the first C itself, so the intercept hands back the whole output.
- Aspect-ratio binning (``use_resolution_binning``, on by default): the pipeline denoises at the
  bin nearest the requested aspect ratio (~sample_size^2 x 64 pixels: 96x64 -> 304x208 on a
  256-px model) and resizes and centre-crops the decoded image back to the requested size, so
  the decode stage is told that size.
- ``negative_prompt=None`` crashes the stock call under CFG (pass ""); passing negative
  embeddings needs ``negative_prompt=None``.

Shape legend: B = images, L = 300 T5 tokens, D = T5 hidden size, C = 4 latent channels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from pipeline.families.base import CfgConvention, Conditioning, Family
from pipeline.prompts import truncation_warnings

MAX_SEQUENCE_LENGTH = 300
"""T5 tokens per prompt: PixArtSigmaPipeline.__call__'s default."""


class PixArtSigmaFamily(Family):
    """PixArtSigmaPipeline: batched [uncond; cond] with attention masks, learned sigma, binning."""

    pipeline_classes = ("PixArtSigmaPipeline",)
    convention = CfgConvention(
        denoisers=("transformer",),
        calls=(("uncond", "cond"),),
        sample_keys=frozenset({"hidden_states", "encoder_hidden_states", "encoder_attention_mask", "timestep"}),
        latents_key="hidden_states",
    )
    call_defaults = {"num_inference_steps": 20, "guidance_scale": 4.5}

    @property
    def size_multiple(self) -> int:
        """Pixels: the VAE scale factor (binning denoises at a bin of the requested ratio)."""
        return int(self.pipe.vae_scale_factor)

    @property
    def default_size(self) -> int:
        """Pixels: transformer sample_size x VAE scale factor, as the pipeline's own default."""
        return int(self.pipe.transformer.config.sample_size * self.pipe.vae_scale_factor)

    def prompt_warnings(self, prompts: Sequence[str], negative_prompts: Sequence[str]) -> list[str | None]:
        """Per prompt, a warning if T5's 300 tokens truncate it or its negative prompt."""
        return truncation_warnings(self.pipe.tokenizer, MAX_SEQUENCE_LENGTH, "T5", prompts, negative_prompts)

    @torch.no_grad()  # with grad on, encode_prompt's bytes differ from __call__'s
    def encode(self, prompts: Sequence[str], negative_prompts: Sequence[str], *, guidance: bool) -> Conditioning:
        """Encode stage: T5 embeddings and masks, as PixArtSigmaPipeline.__call__ encodes them
        (clean_caption=True, 300 tokens; "" is the plain negative).

        Returns:
            Conditioning: prompt_embeds (B, 300, D), prompt_attention_mask (B, 300), and under
            guidance their negative_ twins.
        """
        pe, pm, npe, nm = self.pipe.encode_prompt(
            list(prompts), do_classifier_free_guidance=guidance, negative_prompt=list(negative_prompts),
            num_images_per_prompt=1, device=self.pipe._execution_device, clean_caption=True,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
        )  # fmt: skip
        uncond = {"negative_prompt_embeds": npe, "negative_prompt_attention_mask": nm} if guidance else None
        return Conditioning({"prompt_embeds": pe, "prompt_attention_mask": pm}, uncond)

    def denoise(self, cond: Conditioning, generators: list[torch.Generator], *, height: int, width: int,
                num_inference_steps: int, guidance_scale: float, guidance_rescale: float) -> torch.Tensor:  # fmt: skip
        """Denoise stage: the stock pipeline from noise to latents (output_type="latent").

        Args:
            height, width: the requested pixels; the pipeline bins them itself.
            guidance_rescale: not a PixArt argument; ignored.
        Returns:
            Latents (B, 4, h, w) at the binned size, scaled by the VAE scaling factor.
        """
        del guidance_rescale
        return self.pipe(
            **cond.pipe_kwargs, negative_prompt=None, height=height, width=width,
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            generator=generators, output_type="latent", return_dict=False,
        )[0]  # fmt: skip

    @torch.no_grad()
    def decode(self, latents_BChw: torch.Tensor, *, height: int, width: int) -> list[Any]:
        """Decode stage, as the end of __call__: VAE decode, resize and centre-crop from the
        bin back to ``height`` x ``width``, postprocess to PIL."""
        vae = self.pipe.vae
        image = vae.decode(latents_BChw.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        if self.pipe.transformer is None or self.pipe.transformer.config.sample_size in (32, 64, 128, 256):
            image = self.pipe.image_processor.resize_and_crop_tensor(image, width, height)
        return self.pipe.image_processor.postprocess(image, output_type="pil")


FAMILY = PixArtSigmaFamily
