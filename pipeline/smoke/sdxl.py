"""Built-in SDXL model: tiny-sdxl, a StableDiffusionXLPipeline with CLIPTextModel +
CLIPTextModelWithProjection (hidden 32 each: cross_attention_dim 64), a text_time UNet
(projection_class_embeddings_input_dim = 6 x 8 + 32), the SDXL VAE scaling and EulerDiscrete
scheduler; native 64x64, force_zeros_for_empty_prompt, no watermarker.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.smoke import SmokeModel
from pipeline.smoke.text import clip_config, clip_tokenizer

TEXT_HIDDEN = 32          # each CLIP encoder
TEXT_LAYERS = 2           # >= 2: hidden_states[-2]
PROJECTION_DIM = 32       # text_encoder_2 projection = pooled dim
ADD_TIME_DIM = 8          # unet.addition_time_embed_dim
UNET_CHANNELS = (32, 64)
SAMPLE_SIZE = 8           # latent pixels; 8 * vae_scale_factor 8 = 64 px native
VAE_CHANNELS = (32, 32, 32, 32)


def build(out: Path, seed: int = 0) -> None:
    """Build the tiny SDXL pipeline and save_pretrained it into ``out`` (created)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = clip_tokenizer()
    tokenizer_2 = clip_tokenizer(pad_token="!")  # as real SDXL's tokenizer_2
    vocab = tokenizer.get_vocab()

    def text_config(**extra):
        return clip_config(vocab, TEXT_HIDDEN, TEXT_HIDDEN * 2, TEXT_LAYERS, hidden_act="quick_gelu", **extra)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(text_config()).eval()
        text_encoder_2 = CLIPTextModelWithProjection(
            text_config(projection_dim=PROJECTION_DIM)
        ).eval()
        unet = UNet2DConditionModel(
            sample_size=SAMPLE_SIZE,
            in_channels=4,
            out_channels=4,
            block_out_channels=UNET_CHANNELS,
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),      # SDXL-style: per-block head counts (diffusers naming)
            use_linear_projection=True,
            transformer_layers_per_block=1,
            cross_attention_dim=2 * TEXT_HIDDEN,
            addition_embed_type="text_time",
            addition_time_embed_dim=ADD_TIME_DIM,
            projection_class_embeddings_input_dim=6 * ADD_TIME_DIM + PROJECTION_DIM,
            norm_num_groups=32,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            block_out_channels=VAE_CHANNELS,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            norm_num_groups=32,
            sample_size=SAMPLE_SIZE * 8,
            scaling_factor=0.13025,   # SDXL VAE; no latents_mean/std (as SDXL)
            force_upcast=True,
        )
    # SDXL base's scheduler config.
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        interpolation_type="linear",
        use_karras_sigmas=False,
        timestep_spacing="leading",
        steps_offset=1,
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.save_pretrained(out)


MODELS = {
    "tiny-sdxl": SmokeModel(
        description="StableDiffusionXLPipeline, ~1M-param text_time UNet, 2 CLIP encoders 32-d; native 64x64",
        build=build,
    ),
}
