"""Built-in CogVideoX model: tiny-cogvideox, a CogVideoXPipeline shaped like CogVideoX 1.5 (T5,
3D rotary position embeddings, temporal patches of 2 latent frames, CogVideoXDPMScheduler).

CogVideoX 1.5's temporal patch (patch_size_t 2) makes the pipeline pad the latent frames to an
even count and drop the padding before decoding: 9 frames are 3 latent frames, denoised as 4.
The rotary "slice" grid is cut from a table of sample_height x sample_width latent pixels / 2,
so those bound the largest size (here 128 px) and, as in CogVideoX 1.5, exceed the default.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.smoke import SmokeModel, write_gen_defaults
from pipeline.smoke.text import t5_config, t5_tokenizer

TEXT_HIDDEN = 32
"""T5 d_model = transformer text_embed_dim."""
MAX_TEXT_TOKENS = 226
"""CogVideoXPipeline's max_sequence_length default = transformer max_text_seq_length."""
DEFAULT_SIZE = 32
"""Pixels (square), written to gen_defaults.json."""
DEFAULT_NUM_FRAMES = 9
"""4k + 1 frames (3 latent frames), written to gen_defaults.json and the transformer's
sample_frames (the pipeline's own num_frames default)."""
SAMPLE_SIZE = 16
"""transformer sample_height / sample_width, latent pixels: the rotary table covers up to 128 px."""


def build(out: Path, seed: int = 0) -> None:
    """Build a tiny CogVideoX 1.5-shaped CogVideoXPipeline with seeded random weights into ``out``."""
    import torch
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDPMScheduler,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
    )
    from transformers import T5EncoderModel

    tokenizer = t5_tokenizer(256, seed, model_max_length=MAX_TEXT_TOKENS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # Built from a config, T5 starts in training mode (dropout 0.1): eval().
        text_encoder = T5EncoderModel(
            t5_config(len(tokenizer), TEXT_HIDDEN)
        ).eval()
        transformer = CogVideoXTransformer3DModel(
            num_attention_heads=2,
            attention_head_dim=16,  # rotary: t / h / w get 4 / 6 / 6 of it
            in_channels=4,
            out_channels=4,
            time_embed_dim=32,
            text_embed_dim=TEXT_HIDDEN,
            num_layers=2,
            sample_width=SAMPLE_SIZE,
            sample_height=SAMPLE_SIZE,
            sample_frames=DEFAULT_NUM_FRAMES,
            patch_size=2,
            patch_size_t=2,  # CogVideoX 1.5
            temporal_compression_ratio=4,
            max_text_seq_length=MAX_TEXT_TOKENS,
            use_rotary_positional_embeddings=True,
            use_learned_positional_embeddings=False,
            patch_bias=False,  # as CogVideoX 1.5
        )
        # 4 levels: 8x spatial, 4x temporal (the scale factors the pipeline assumes with vae=None).
        vae = AutoencoderKLCogVideoX(
            block_out_channels=(8, 8, 8, 8),
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=4,
            temporal_compression_ratio=4,
            sample_height=DEFAULT_SIZE,
            sample_width=DEFAULT_SIZE,
            scaling_factor=0.7,  # CogVideoX 1.5's (and the pipeline's vae=None fallback)
        )
    # CogVideoX1.5-5B scheduler_config.json.
    scheduler = CogVideoXDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=0,
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        timestep_spacing="trailing",
        snr_shift_scale=1.0,
    )
    pipe = CogVideoXPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=scheduler,
    )
    pipe.save_pretrained(out)
    write_gen_defaults(out, default_size=DEFAULT_SIZE, default_num_frames=DEFAULT_NUM_FRAMES)


MODELS = {
    "tiny-cogvideox": SmokeModel(
        description="CogVideoXPipeline shaped like CogVideoX 1.5: T5 32-d, 2-block transformer with 3D rotary "
        "embeddings and temporal patches of 2 (padded latent frames), AutoencoderKLCogVideoX, "
        "CogVideoXDPMScheduler; native 32x32, 9 frames",
        build=build,
    ),
}
