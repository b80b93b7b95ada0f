"""Built-in SD3 model: tiny-sd3, a StableDiffusion3Pipeline (2 CLIP-with-projection and a T5
text encoder, an SD3 transformer of 4 blocks so that skip-layer guidance on blocks 1, 2 skips
interior blocks); native 32x32, sizes multiples of 16 up to 128.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.smoke import SmokeModel
from pipeline.smoke.tokenizers import clip_tokenizer, t5_tokenizer

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
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    tokenizer, tokenizer_2 = clip_tokenizer(), clip_tokenizer()
    vocab = tokenizer.get_vocab()
    tokenizer_3 = t5_tokenizer(256, seed)

    clip_dims = ((32, 32), (16, 16))  # (hidden, projection) of text_encoder, text_encoder_2
    t5_dim = 64

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clips = [
            CLIPTextModelWithProjection(
                CLIPTextConfig(
                    hidden_size=h,
                    projection_dim=p,
                    intermediate_size=h * 2,
                    num_hidden_layers=2,  # hidden_states[-2] is used: >= 2 layers
                    num_attention_heads=4,
                    max_position_embeddings=77,
                    vocab_size=len(vocab),
                    bos_token_id=vocab["<|startoftext|>"],
                    eos_token_id=vocab["<|endoftext|>"],
                    pad_token_id=vocab["<|endoftext|>"],
                )
            ).eval()
            for h, p in clip_dims
        ]
        # Built from a config, T5 starts in training mode (dropout 0.1): eval().
        text_encoder_3 = T5EncoderModel(
            T5Config(
                vocab_size=len(tokenizer_3),
                d_model=t5_dim,
                d_kv=16,
                num_heads=4,
                d_ff=t5_dim * 2,
                num_layers=2,
                feed_forward_proj="gated-gelu",
                relative_attention_num_buckets=32,
                relative_attention_max_distance=128,
                pad_token_id=0,
                eos_token_id=1,
                decoder_start_token_id=0,
            )
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
