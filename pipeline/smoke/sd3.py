"""Built-in SD3 model: tiny-sd3, a StableDiffusion3Pipeline (2 CLIP-with-projection and a T5
text encoder, an SD3 transformer of 4 blocks so that skip-layer guidance on blocks 1, 2 skips
interior blocks); native 32x32, sizes multiples of 16 up to 128.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.smoke import SmokeModel
from pipeline.smoke.text import clip_config, clip_tokenizer, t5_config, t5_tokenizer

NATIVE_SIZE = 32
"""Pixels: transformer sample_size (4) x VAE scale factor (8)."""


def build(out: Path, seed: int = 0) -> None:
    """Build the tiny SD3 pipeline and save_pretrained it into ``out`` (created)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    tokenizer, tokenizer_2 = clip_tokenizer(), clip_tokenizer()
    vocab = tokenizer.get_vocab()
    tokenizer_3 = t5_tokenizer(256, seed)

    clip_dims = ((32, 32), (16, 16))  # (hidden, projection) of text_encoder, text_encoder_2
    t5_dim = 64

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clips = [
            CLIPTextModelWithProjection(
                clip_config(vocab, h, h * 2, projection_dim=p)
            ).eval()
            for h, p in clip_dims
        ]
        # Built from a config, T5 starts in training mode (dropout 0.1): eval().
        text_encoder_3 = T5EncoderModel(
            t5_config(len(tokenizer_3), t5_dim)
        ).eval()
        transformer = SD3Transformer2DModel(
            sample_size=NATIVE_SIZE // 8,
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=4,  # blocks 0..3; block 3 is context_pre_only
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=t5_dim,
            caption_projection_dim=32,  # == heads * head_dim
            pooled_projection_dim=sum(p for _, p in clip_dims),
            pos_embed_max_size=8,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            block_out_channels=(16, 16, 16, 16),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=1,
            latent_channels=16,
            norm_num_groups=8,
            scaling_factor=1.5305,  # SD3's values, so the decode formula is exercised
            shift_factor=0.0609,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=clips[0],
        tokenizer=tokenizer,
        text_encoder_2=clips[1],
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    pipe.save_pretrained(out)


MODELS = {
    "tiny-sd3": SmokeModel(
        description="StableDiffusion3Pipeline, 4-block transformer (skip-layer guidance on blocks 1,2), "
        "2 CLIP + T5; native 32x32",
        build=build,
    ),
}
