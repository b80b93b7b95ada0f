"""The Wan image-to-video family (WanImageToVideoPipeline): text + image -> video.

Three forms share the pipeline class, told apart by its config:
- Wan 2.1 I2V: a CLIP vision encoder; the transformer (``image_dim`` set) gets the image's
  penultimate CLIP hidden states as ``encoder_hidden_states_image`` (B, T, D_img), and its input
  is cat(latents, condition) on channels: the noise, a first-frame mask and the VAE latents of
  the image followed by zero frames.
- Wan 2.2 I2V A14B: no image encoder, two experts (``boundary_ratio``), the same concatenated
  input.
- Wan 2.2 TI2V-5B: no image encoder, ``expand_timesteps``: the first latent frame is the image's
  VAE latent, blended in before every call and given timestep 0 (``timestep`` is (B, seq)).

Under CFG the pipeline calls its denoiser twice per step as WanPipeline does, cond first, then
uncond, under ``cache_context("cond" / "uncond")``; the calls differ only in
``encoder_hidden_states``. ``encoder_hidden_states_image`` is the same (B, T, D_img) tensor in
both (B per call, not 2B): per sample, so it is split, concatenated and cut by samples with the
latents.

One image per pipeline call: __call__ refuses a list of images, and a (B, C, H, W) tensor of B
images encodes B x B conditions (``encode_image`` and ``prepare_latents`` each repeat over the
batch), so a micro-batch holds the videos of one image only (the image is part of
SampleRequest.batch_key). Image embeddings cannot be computed in the encode stage either:
__call__ refuses ``image_embeds`` beside ``image``, and it needs ``image`` for the VAE condition.
So the denoise stage runs the image encoder and the VAE encoder, inside the pipeline call.

Shape legend: as pipeline.families.wan; T = CLIP vision tokens (patches + 1).
"""

from __future__ import annotations

import torch

from pipeline.families.base import CfgConvention, Conditioning
from pipeline.families.wan import WanFamily
from pipeline.images import open_image
from pipeline.samples import ImageRef


class WanImageToVideoFamily(WanFamily):
    """WanImageToVideoPipeline: Wan's two calls per step, conditioned on one input image."""

    pipeline_classes = ("WanImageToVideoPipeline",)
    convention = CfgConvention(
        denoisers=("transformer", "transformer_2"),
        calls=(("cond",), ("uncond",)),
        # encoder_hidden_states_image: (B, T, D_img) in each call (Wan 2.1), None for Wan 2.2.
        sample_keys=frozenset(
            {"hidden_states", "timestep", "encoder_hidden_states", "encoder_hidden_states_image"}
        ),
        latents_key="hidden_states",
        merge_calls=True,  # as Wan: cond and uncond in one forward with cfg batching
    )
    image_input = True
    # __call__ encodes the image (CLIP, Wan 2.1) and its VAE latents: the denoise stage needs both.
    role_components = {"image_encoder": ("denoiser",), "vae": ("denoiser", "decoder")}
    call_defaults = {"num_inference_steps": 50, "guidance_scale": 5.0}

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
        image: ImageRef | None = None,
    ) -> torch.Tensor:
        """Denoise stage: the stock pipeline from the image and noise to latents.

        Args:
            cond: (B, L, D) text embeddings, one row per video.
            generators: B generators, one per video.
            height, width: pixels, multiples of ``size_multiple``; the image is resized to
                them by the pipeline (and to the CLIP size by its image processor).
            num_inference_steps: scheduler steps, >= 1.
            guidance_scale: CFG scale s (both experts of Wan 2.2 A14B); <= 1 disables guidance.
            guidance_rescale: not a Wan argument; ignored.
            num_frames: 4k + 1 frames; None = ``default_num_frames``.
            image: the input image of every video of the micro-batch.
        Returns:
            Latents (B, C, F', H', W'), float32, normalized (Wan 2.2 TI2V: first frame blended).
        Raises:
            ImageError: the image cannot be read (the micro-batch's rows become error rows).
            ValueError: no image.
        """
        del guidance_rescale  # WanImageToVideoPipeline has no guidance_rescale
        if image is None:
            raise ValueError(f"{type(self.pipe).__name__} needs an input image")
        return self._latents(cond, generators, image=open_image(image), height=height, width=width,
                             num_frames=num_frames, num_inference_steps=num_inference_steps,
                             guidance_scale=guidance_scale)  # fmt: skip


FAMILY = WanImageToVideoFamily
