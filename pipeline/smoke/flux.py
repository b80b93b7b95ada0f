"""Built-in Flux model: tiny-flux, a FLUX.1-dev-shaped FluxPipeline (guidance-distilled:
guidance_embeds) with CLIP and T5 text encoders.

Native size 64x64 (gen_defaults.json): the pipeline's own default is a hard-coded 128 x
vae_scale_factor = 1024 whatever the config. 2x2 packing: sizes are multiples of 16.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.smoke import SmokeModel, write_gen_defaults
from pipeline.smoke.text import clip_config, clip_tokenizer, t5_config, t5_tokenizer

DEFAULT_SIZE = 64
"""Pixels, written to gen_defaults.json (a multiple of 16)."""


def build(out: Path, seed: int = 0) -> None:
    """Build the tiny FluxPipeline and save_pretrained it into ``out`` (created; must not exist
    as a non-empty dir with other content). Deterministic: same seed -> identical files."""
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTextModel, T5EncoderModel

    tokenizer = clip_tokenizer()
    vocab = tokenizer.get_vocab()
    tokenizer_2 = t5_tokenizer(256, seed)

    clip_hidden = 32
    t5_hidden = 32
    heads, head_dim = 2, 16
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(
            clip_config(vocab, clip_hidden, clip_hidden * 4)
        ).eval()
        # Built from a config, T5 starts in training mode (dropout 0.1): eval().
        text_encoder_2 = T5EncoderModel(
            t5_config(len(tokenizer_2), t5_hidden)
        ).eval()
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,  # 4 * vae latent_channels (2x2 packing)
            out_channels=None,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=head_dim,
            num_attention_heads=heads,
            joint_attention_dim=t5_hidden,  # = T5 d_model
            pooled_projection_dim=clip_hidden,  # = CLIP hidden (pooler_output)
            guidance_embeds=True,  # FLUX.1-dev: guidance-distilled
            axes_dims_rope=(4, 6, 6),  # sum == attention_head_dim; each even
        )
        # FLUX.1 VAE layout: 4 levels (8x), 16 latent channels, no quant convs, shift + scale.
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            block_out_channels=(16, 16, 16, 16),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=1,
            latent_channels=16,
            norm_num_groups=16,
            sample_size=DEFAULT_SIZE,
            scaling_factor=0.3611,
            shift_factor=0.1159,
            use_quant_conv=False,
            use_post_quant_conv=False,
            force_upcast=True,
        )
    # FLUX.1-dev scheduler_config.json values.
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    pipe.save_pretrained(out)
    write_gen_defaults(out, default_size=DEFAULT_SIZE)


MODELS = {
    "tiny-flux": SmokeModel(
        description="FluxPipeline shaped like FLUX.1-dev (guidance embedding), 1+1 blocks, CLIP + T5 32-d; "
        "native 64x64",
        build=build,
    ),
}
