"""Built-in PixArt-Sigma model: tiny-pixart-sigma, a PixArtSigmaPipeline with a T5 text encoder,
learned sigma and aspect-ratio binning.

sample_size 32 is the smallest that binning accepts (32, 64, 128, 256: it selects
ASPECT_RATIO_256_BIN), so the native size is 256x256 and every request is denoised at a bin of
~256^2 pixels; use_additional_conditions is off, as in PixArt-Sigma.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.smoke import SmokeModel
from pipeline.smoke.text import t5_config, t5_tokenizer

TEXT_HIDDEN = 32
"""T5 d_model = transformer caption_channels."""
SAMPLE_SIZE = 32
"""Latent side: the smallest sample_size aspect-ratio binning accepts; native size 256 px."""


def build(out: Path, seed: int = 0) -> None:
    """Build a tiny PixArtSigmaPipeline with seeded random weights and save it to ``out``."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DPMSolverMultistepScheduler,
        PixArtSigmaPipeline,
        PixArtTransformer2DModel,
    )
    from transformers import T5EncoderModel

    tokenizer = t5_tokenizer(256, seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # Built from a config, T5 starts in training mode (dropout 0.1): eval().
        text_encoder = T5EncoderModel(
            t5_config(len(tokenizer), TEXT_HIDDEN)
        ).eval()
        transformer = PixArtTransformer2DModel(
            num_attention_heads=2,
            attention_head_dim=16,
            in_channels=4,
            out_channels=8,  # learned sigma: 2 * in_channels; the pipeline keeps chunk(2, dim=1)[0]
            num_layers=2,
            cross_attention_dim=32,  # = heads * head_dim (captions are projected to inner_dim)
            sample_size=SAMPLE_SIZE,
            patch_size=2,
            norm_type="ada_norm_single",
            use_additional_conditions=False,  # Sigma passes resolution/aspect_ratio=None
            caption_channels=TEXT_HIDDEN,
            interpolation_scale=None,  # -> max(sample_size // 64, 1) = 1
        )
        # 4 levels -> vae_scale_factor 8 (what the pipeline assumes with vae=None).
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            block_out_channels=(16, 16, 16, 16),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            norm_num_groups=16,
            scaling_factor=0.13025,  # PixArt-Sigma's (SDXL) VAE value
        )
    # PixArt-Sigma-XL-2-*-MS scheduler_config.json.
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        prediction_type="epsilon",
        algorithm_type="dpmsolver++",
        solver_order=2,
        solver_type="midpoint",
        lower_order_final=True,
        euler_at_final=False,
        use_karras_sigmas=False,
        use_lu_lambdas=False,
        thresholding=False,
        timestep_spacing="linspace",
        steps_offset=0,
        variance_type=None,
    )
    pipe = PixArtSigmaPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=scheduler,
    )
    pipe.save_pretrained(out)


MODELS = {
    "tiny-pixart-sigma": SmokeModel(
        description="PixArtSigmaPipeline, 2-layer transformer with learned sigma, T5 32-d; native 256x256 "
        "(aspect-ratio binning to ~256^2 px)",
        build=build,
    ),
}
