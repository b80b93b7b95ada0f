"""The Wan family (WanPipeline: Wan 2.1, and Wan 2.2 with two experts): text -> video.

WanPipeline calls its denoiser twice per step under CFG, cond first, then uncond, each under
``cache_context("cond" / "uncond")``, as ``transformer(hidden_states=, timestep=,
encoder_hidden_states=, attention_kwargs=, return_dict=False)``. Wan 2.2 has two experts: the
step runs ``transformer`` while t >= boundary_ratio * num_train_timesteps, else ``transformer_2``
with ``guidance_scale_2`` (None = guidance_scale).

Shape legend: B = videos in the micro-batch, L = text tokens (512: WanPipeline's default
max_sequence_length), D = text hidden size, C = latent channels (16), F = frames,
F' = latent frames (F - 1) / 4 + 1, H/W = pixels, H'/W' = latent size (H / 8, W / 8).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from pipeline.families.base import CfgConvention, Conditioning, Family
from pipeline.prompts import truncation_warnings

MAX_SEQUENCE_LENGTH = 512
"""Text tokens per prompt: WanPipeline.__call__'s default (its encode_prompt defaults to 226)."""
NATIVE_SIZE = 480
"""Pixels: the height of WanPipeline's default 480 x 832 (480p); gen's default is square."""
NATIVE_NUM_FRAMES = 81
"""WanPipeline's default num_frames (5 s at 16 fps)."""


class WanFamily(Family):
    """WanPipeline: two denoiser calls per step, cond first; Wan 2.2 switches expert mid-run."""

    pipeline_classes = ("WanPipeline",)
    convention = CfgConvention(
        denoisers=("transformer", "transformer_2"),
        calls=(("cond",), ("uncond",)),
        # timestep is (B,) (or (B, seq) with expand_timesteps); attention_kwargs shared.
        sample_keys=frozenset({"hidden_states", "timestep", "encoder_hidden_states"}),
        latents_key="hidden_states",
        merge_calls=True,  # gen's behaviour since Wan support: cond and uncond in one forward
    )
    output_kind = "video"
    call_defaults = {"num_inference_steps": 50, "guidance_scale": 5.0}

    def branch_inputs(self, cond: Conditioning) -> dict[str, dict[str, Any]]:
        """The uncond call differs from the cond call only in its text embeddings."""
        return {"uncond": {"encoder_hidden_states": cond.uncond["negative_prompt_embeds"]}} if cond.uncond else {}

    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this (pixels).

        VAE spatial scale x transformer patch size (8 x 2 = 16 for Wan 2.1 / 2.2 A14B, 16 x 2 =
        32 for Wan 2.2 TI2V-5B), and at least 16, which WanPipeline.check_inputs requires.
        """
        pipe = self.pipe
        model = pipe.transformer if pipe.transformer is not None else pipe.transformer_2
        _, patch_h, patch_w = model.config.patch_size
        scale = int(pipe.vae_scale_factor_spatial)
        return math.lcm(16, scale * patch_h, scale * patch_w)

    @property
    def default_size(self) -> int:
        """Pixels (square): ``default_size`` of the model's gen_defaults.json, else 480 (480p)."""
        return int(self.gen_defaults.get("default_size", NATIVE_SIZE))

    @property
    def default_num_frames(self) -> int:
        """Frames: ``default_num_frames`` of the model's gen_defaults.json, else 81."""
        return int(self.gen_defaults.get("default_num_frames", NATIVE_NUM_FRAMES))

    def check_num_frames(self, num_frames: int) -> str | None:
        """Why ``num_frames`` is invalid, or None: it must be k * temporal scale + 1 (4k + 1).

        WanPipeline itself would silently round other values down (with a log warning).
        """
        scale = int(self.pipe.vae_scale_factor_temporal)
        if num_frames < 1 or (num_frames - 1) % scale:
            return f"must be {scale}k + 1 (1, {scale + 1}, {2 * scale + 1}, ..., 81)"
        return None

    def prompt_warnings(self, prompts: Sequence[str], negative_prompts: Sequence[str]) -> list[str | None]:
        """Per prompt, a warning if UMT5's 512 tokens truncate it or its negative prompt."""
        return truncation_warnings(self.pipe.tokenizer, MAX_SEQUENCE_LENGTH, "UMT5", prompts,
                                   negative_prompts)  # fmt: skip

    @torch.no_grad()
    def encode(
        self, prompts: Sequence[str], negative_prompts: Sequence[str], *, guidance: bool
    ) -> Conditioning:
        """Encode stage: text -> UMT5 embeddings, as WanPipeline.__call__ encodes them.

        Each prompt's embedding is zeroed past its tokens and padded to 512 tokens.

        Args:
            prompts: B prompts.
            negative_prompts: B negative prompts ("" = the unconditional embedding).
            guidance: whether negative embeddings are needed (guidance_scale > 1).
        Returns:
            Conditioning with (B, 512, D) embeddings in the text encoder's dtype (the pipeline
            casts them to the transformer's dtype).
        """
        prompt_embeds, negative = self.pipe.encode_prompt(
            prompt=list(prompts),
            negative_prompt=list(negative_prompts) if guidance else None,
            do_classifier_free_guidance=guidance,
            num_videos_per_prompt=1,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
            device=self.pipe._execution_device,
        )
        return Conditioning({"prompt_embeds": prompt_embeds},
                            {"negative_prompt_embeds": negative} if guidance else None)

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
        """Denoise stage: the stock pipeline from noise to latents (output_type="latent").

        Args:
            cond: (B, L, D) embeddings, one row per video.
            generators: B generators, one per video: each video's noise is independent of its
                batch mates.
            height, width: pixels, multiples of ``size_multiple``.
            num_inference_steps: scheduler steps, >= 1.
            guidance_scale: CFG scale s for both experts (guidance_scale_2 left at its default,
                which is guidance_scale); <= 1 disables guidance.
            guidance_rescale: not a Wan argument; accepted for the common interface and ignored.
            num_frames: 4k + 1 frames; None = ``default_num_frames``.
        Returns:
            Latents (B, 16, F', H', W'), float32, normalized: ``decode`` undoes latents_mean /
            latents_std.
        """
        del guidance_rescale  # WanPipeline has no guidance_rescale
        return self._latents(cond, generators, height=height, width=width, num_frames=num_frames,
                             num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)  # fmt: skip

    def _latents(self, cond: Conditioning, generators: list[torch.Generator], *, num_frames: int | None,
                 **call: Any) -> torch.Tensor:  # fmt: skip
        """The pipeline call with ``cond``'s embeddings and ``call``'s further __call__ arguments,
        to normalized latents (output_type="latent")."""
        return self.pipe(
            **cond.pipe_kwargs,
            **call,
            num_frames=num_frames or self.default_num_frames,
            generator=generators,
            output_type="latent",
            return_dict=False,
        )[0]

    @torch.no_grad()
    def decode(self, latents_BCFHW: torch.Tensor, *, height: int, width: int) -> list[np.ndarray]:
        """Decode stage: latents -> frames with the pipeline's own VAE and video processor.

        The same steps as the end of WanPipeline.__call__ (un-normalize with the VAE's
        latents_mean / latents_std, vae.decode, postprocess_video to floats in [0, 1]), then
        ``(x * 255).round()`` to uint8, as diffusers' numpy_to_pil does.

        Args:
            latents_BCFHW: (B, 16, F', H', W') latents from ``denoise``.
        Returns:
            B arrays, each (F, H, W, 3) uint8 RGB.
        """
        del height, width  # follow from the latents
        vae = self.pipe.vae
        latents = latents_BCFHW.to(next(vae.parameters()).device, dtype=vae.dtype)
        view = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(view).to(latents.device, latents.dtype)
        # The pipeline multiplies by 1 / (1 / std); dividing by 1 / std keeps its rounding.
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(view).to(
            latents.device, latents.dtype
        )
        video = vae.decode(latents / inv_std + mean, return_dict=False)[0]
        frames = self.pipe.video_processor.postprocess_video(video, output_type="np")
        return [(v * 255).round().astype(np.uint8) for v in frames]


FAMILY = WanFamily
