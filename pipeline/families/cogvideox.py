"""The CogVideoX family (CogVideoXPipeline: CogVideoX 2b / 5b and 1.5): text -> video
(diffusers pipelines/cogvideo/pipeline_cogvideox.py).

CogVideoXPipeline calls its transformer once per step on [uncond; cond], uncond first, under
``cache_context("cond_uncond")``, all by keyword: ``transformer(hidden_states=,
encoder_hidden_states=, timestep=, image_rotary_emb=, attention_kwargs=, return_dict=False)``.

- Per sample (2B under CFG): hidden_states (2B, F', C, H', W'), **frames before channels**;
  encoder_hidden_states (2B, 226, D); timestep (2B,) (``t.expand``). Shared: image_rotary_emb,
  a ``(cos, sin)`` tuple of (tokens, head_dim) tensors whose dim 0 is the token count, not the
  batch (so it must never be split by shape), attention_kwargs, return_dict.
- The pipeline combines ``u + g (c - u)`` itself; with ``use_dynamic_cfg`` (off by default) it
  changes g per step from t, which the intercept never sees.
- CogVideoX 1.5 (transformer patch_size_t set) pads the latent frames to a multiple of
  patch_size_t and drops the first ``additional_frames`` of them before decoding; ``denoise``
  drops them as the end of __call__ does, so ``decode`` gets the requested frames only.
- The CogVideoX VAE decodes F' latent frames to 4 (F' - 1) + 1 frames only when F' is odd (an
  even F' gives 4 F'), so only 8k + 1 frames come out as asked (49 for 2b / 5b, 81 for 1.5).

Shape legend: B = videos in the micro-batch, L = 226 T5 tokens, D = T5 hidden size, C = latent
channels, F = frames, F' = latent frames (F - 1) / 4 + 1, H/W = pixels, H'/W' = H / 8, W / 8.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from pipeline.families.base import CfgConvention, Conditioning, Family
from pipeline.prompts import truncation_warnings

MAX_SEQUENCE_LENGTH = 226
"""T5 tokens per prompt: CogVideoXPipeline.__call__'s default (= transformer max_text_seq_length)."""


class CogVideoXFamily(Family):
    """CogVideoXPipeline: batched [uncond; cond], frames-before-channels latents, 1.5 padding."""

    pipeline_classes = ("CogVideoXPipeline",)
    convention = CfgConvention(
        denoisers=("transformer",),
        calls=(("uncond", "cond"),),
        # Not image_rotary_emb: shared, and its dim 0 is the token count (FAMILIES.md hazard 4).
        sample_keys=frozenset({"hidden_states", "encoder_hidden_states", "timestep"}),
        latents_key="hidden_states",
    )
    output_kind = "video"
    call_defaults = {"num_inference_steps": 50, "guidance_scale": 6.0}

    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this (pixels): VAE spatial scale x transformer
        patch size (8 x 2 = 16), and at least 8, which check_inputs requires."""
        pipe = self.pipe
        return math.lcm(8, int(pipe.vae_scale_factor_spatial) * int(pipe.transformer.config.patch_size))

    @property
    def default_size(self) -> int:
        """Pixels (square): ``default_size`` of the model's gen_defaults.json, else the
        pipeline's own default height, transformer sample_height x VAE scale (480 for 2b / 5b)."""
        pipe = self.pipe
        native = pipe.transformer.config.sample_height * pipe.vae_scale_factor_spatial
        return int(self.gen_defaults.get("default_size", native))

    @property
    def default_num_frames(self) -> int:
        """Frames: ``default_num_frames`` of the model's gen_defaults.json, else the pipeline's
        own default, transformer sample_frames (49 for 2b / 5b, 81 for 1.5)."""
        return int(self.gen_defaults.get("default_num_frames", self.pipe.transformer.config.sample_frames))

    def check_num_frames(self, num_frames: int) -> str | None:
        """Why ``num_frames`` is invalid, or None: it must be 2 x temporal scale x k + 1 (8k + 1).

        The pipeline takes (F - 1) // 4 + 1 latent frames of any F, and the VAE gives back
        4 (F' - 1) + 1 frames only for an odd F': other values silently come out with another
        frame count (5 -> 8, 13 -> 16).
        """
        step = 2 * int(self.pipe.vae_scale_factor_temporal)
        if num_frames < 1 or (num_frames - 1) % step:
            return f"must be {step}k + 1 (1, {step + 1}, {2 * step + 1}, ..., 49, ..., 81)"
        return None

    def prompt_warnings(self, prompts: Sequence[str], negative_prompts: Sequence[str]) -> list[str | None]:
        """Per prompt, a warning if T5's 226 tokens truncate it or its negative prompt."""
        return truncation_warnings(self.pipe.tokenizer, MAX_SEQUENCE_LENGTH, "T5", prompts, negative_prompts)

    @torch.no_grad()  # as __call__ (with grad on, encoder bytes can differ)
    def encode(self, prompts: Sequence[str], negative_prompts: Sequence[str], *, guidance: bool) -> Conditioning:
        """Encode stage: text -> T5 embeddings, as CogVideoXPipeline.__call__ encodes them
        (226 tokens, padded; "" is the plain negative, as the pipeline's ``negative_prompt or ""``).

        Returns:
            Conditioning: prompt_embeds (B, 226, D) and under guidance negative_prompt_embeds
            (B, 226, D), in the text encoder's dtype.
        """
        pe, npe = self.pipe.encode_prompt(
            list(prompts), list(negative_prompts) if guidance else None, guidance,
            num_videos_per_prompt=1, max_sequence_length=MAX_SEQUENCE_LENGTH,
            device=self.pipe._execution_device,
        )  # fmt: skip
        return Conditioning({"prompt_embeds": pe}, {"negative_prompt_embeds": npe} if guidance else None)

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
        num_frames: int | None = None,
    ) -> torch.Tensor:
        """Denoise stage: the stock pipeline from noise to latents (output_type="latent"), then
        the CogVideoX 1.5 padding frames dropped as the end of __call__ drops them.

        Args:
            cond: (B, 226, D) embeddings, one row per video.
            generators: B generators, one per video (the initial noise, and the DPM scheduler's
                noise at every step).
            height, width: pixels, multiples of ``size_multiple``.
            num_inference_steps: scheduler steps, >= 1.
            guidance_scale: CFG scale; <= 1 disables guidance.
            guidance_rescale: not a CogVideoX argument; accepted for the common interface and
                ignored.
            num_frames: 8k + 1 frames; None = ``default_num_frames``.
        Returns:
            Latents (B, F', C, H', W'), frames before channels, scaled by the VAE scaling factor.
        """
        del guidance_rescale  # CogVideoXPipeline has no guidance_rescale
        num_frames = num_frames or self.default_num_frames
        latents = self.pipe(
            **cond.pipe_kwargs,
            height=height,
            width=width,
            num_frames=num_frames,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=generators,
            output_type="latent",
            return_dict=False,
        )[0]
        return latents[:, self._padding_frames(num_frames) :]

    def _padding_frames(self, num_frames: int) -> int:
        """Latent frames CogVideoX 1.5 adds to make their count a multiple of patch_size_t
        (``additional_frames`` of __call__); 0 for CogVideoX 1.0 (patch_size_t None)."""
        patch_t = self.pipe.transformer.config.patch_size_t
        latent_frames = (num_frames - 1) // int(self.pipe.vae_scale_factor_temporal) + 1
        if patch_t is None or latent_frames % patch_t == 0:
            return 0
        return patch_t - latent_frames % patch_t

    @torch.no_grad()
    def decode(self, latents_BFCHW: torch.Tensor, *, height: int, width: int) -> list[np.ndarray]:
        """Decode stage: latents -> frames, the end of CogVideoXPipeline.__call__
        (decode_latents: frames after channels, ``1 / scaling_factor * latents``, vae.decode;
        postprocess_video to floats in [0, 1]), then ``(x * 255).round()`` to uint8, as
        diffusers' numpy_to_pil does.

        Args:
            latents_BFCHW: (B, F', C, H', W') latents from ``denoise`` (padding dropped).
        Returns:
            B arrays, each (F, H, W, 3) uint8 RGB.
        """
        del height, width  # follow from the latents
        pipe, vae = self.pipe, self.pipe.vae
        latents = latents_BFCHW.to(next(vae.parameters()).device, dtype=vae.dtype).permute(0, 2, 1, 3, 4)
        latents = 1 / pipe.vae_scaling_factor_image * latents  # the pipeline's own rounding
        video = vae.decode(latents).sample
        frames = pipe.video_processor.postprocess_video(video=video, output_type="np")
        return [(v * 255).round().astype(np.uint8) for v in frames]


FAMILY = CogVideoXFamily
