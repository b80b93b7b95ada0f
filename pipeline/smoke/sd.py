"""Built-in Stable Diffusion 1.x-shaped models: tiny-sd (tests) and small-sd (CPU benchmarks)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

from pipeline.smoke import SmokeModel
from pipeline.smoke.text import clip_config, clip_tokenizer


@dataclass(frozen=True, kw_only=True)
class SdSpec:
    """Config of a built-in StableDiffusionPipeline."""

    unet_channels: tuple[int, ...]
    """UNet block_out_channels; the first block has no cross-attention, the rest do."""
    layers_per_block: int
    text_hidden: int
    """CLIP text hidden size = UNet cross_attention_dim."""
    text_layers: int
    seed: int = 0


def build(spec: SdSpec, out: Path) -> None:
    """Build a StableDiffusionPipeline of ``spec`` with seeded random weights into ``out``."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel

    tokenizer = clip_tokenizer()
    vocab = tokenizer.get_vocab()

    depth = len(spec.unet_channels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        text_encoder = CLIPTextModel(
            clip_config(vocab, spec.text_hidden, spec.text_hidden * 4, spec.text_layers)
        ).eval()
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=spec.unet_channels,
            layers_per_block=spec.layers_per_block,
            down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (depth - 1),
            up_block_types=("CrossAttnUpBlock2D",) * (depth - 1) + ("UpBlock2D",),
            cross_attention_dim=spec.text_hidden,
            attention_head_dim=8,
            norm_num_groups=32,
        )
        # 4 down levels: pipelines with vae=None assume vae_scale_factor 8 (NOTES).
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            block_out_channels=(32, 32, 32, 32),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            norm_num_groups=32,
        )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out)



MODELS = {
    "tiny-sd": SmokeModel(
        description="StableDiffusionPipeline, ~1M-param UNet, CLIP 32-d, native 64x64: tests, smoke runs",
        build=partial(build, SdSpec(unet_channels=(32, 64), layers_per_block=1, text_hidden=32, text_layers=2)),
    ),
    "small-sd": SmokeModel(
        description="StableDiffusionPipeline, 24M-param UNet (64/128/256 channels), CLIP 64-d: CPU benchmarks",
        build=partial(build, SdSpec(unet_channels=(64, 128, 256), layers_per_block=2, text_hidden=64, text_layers=2)),
    ),
}
