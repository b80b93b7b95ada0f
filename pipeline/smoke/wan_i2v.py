"""Built-in Wan image-to-video models (WanImageToVideoPipeline):

- ``tiny-wan-i2v``, shaped like Wan 2.1 I2V: a CLIP vision encoder whose penultimate hidden
  states are the transformer's ``encoder_hidden_states_image`` (``image_dim`` = CLIP hidden
  size, ``added_kv_proj_dim`` = transformer width), and 36 input channels: 16 noise + 4 mask +
  16 VAE latents of the first frame followed by zeros.
- ``tiny-wan22-ti2v``, shaped like Wan 2.2 TI2V-5B: no image encoder, ``expand_timesteps``
  (the first latent frame is the image's VAE latent, blended in at every step and given
  timestep 0), the Wan 2.2 VAE layout (z_dim 48, residual, 2x2 patchified pixels: 16x spatial),
  so sizes are multiples of 32.

Both use tiny-wan22's UMT5 text side and scheduler (UniPC, flow_shift 3.0).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

from pipeline.smoke import SmokeModel, write_gen_defaults
from pipeline.smoke.text import t5_tokenizer


@dataclass(frozen=True, kw_only=True)
class WanI2VSpec:
    """Config of a built-in WanImageToVideoPipeline."""

    form: str
    """"2.1" (CLIP image encoder, latents concatenated with the condition) or "2.2-ti2v"
    (no image encoder, expand_timesteps, the Wan 2.2 VAE)."""
    num_attention_heads: int = 2
    attention_head_dim: int = 8
    """Per head; the transformer width is heads x head dim."""
    num_layers: int = 2
    text_hidden: int = 32
    """UMT5 d_model = transformer text_dim."""
    text_layers: int = 2
    image_hidden: int = 32
    """CLIP vision hidden size = transformer image_dim (2.1 only)."""
    image_size: int = 32
    """CLIP vision input pixels (square; patches of 8: 16 patches + the class token)."""
    vae_base_dim: int = 8
    vocab_size: int = 256
    default_size: int
    """Pixels (square), written to gen_defaults.json."""
    default_num_frames: int = 5
    """4k + 1, written to gen_defaults.json."""
    seed: int = 0


def _text_encoder(spec: WanI2VSpec, vocab_size: int):  # -> transformers.UMT5EncoderModel
    from transformers import UMT5Config, UMT5EncoderModel

    # Built from a config, T5 starts in training mode (dropout 0.1): eval() (NOTES).
    return UMT5EncoderModel(
        UMT5Config(
            vocab_size=vocab_size,
            d_model=spec.text_hidden,
            d_kv=spec.text_hidden // 4,
            num_heads=4,
            d_ff=spec.text_hidden * 2,
            num_layers=spec.text_layers,
            feed_forward_proj="gated-gelu",
            relative_attention_num_buckets=32,
            relative_attention_max_distance=128,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    ).eval()


def _image_encoder(spec: WanI2VSpec):  # -> (CLIPVisionModel, CLIPImageProcessorPil)
    # The PIL image processor, named: CLIPImageProcessor is the torchvision one and falls back
    # to this (with a warning) where torchvision is missing, so the saved model_index.json
    # would depend on what is installed.
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel

    encoder = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=spec.image_hidden,
            intermediate_size=spec.image_hidden * 2,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=spec.image_size,
            patch_size=8,
            projection_dim=spec.image_hidden,
        )
    ).eval()  # the pipeline uses hidden_states[-2]: 2 layers at least
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
    )
    return encoder, processor


def build(spec: WanI2VSpec, out: Path) -> None:
    """Build a WanImageToVideoPipeline of ``spec`` with seeded random weights into ``out``."""
    import torch
    from diffusers import (
        AutoencoderKLWan,
        UniPCMultistepScheduler,
        WanImageToVideoPipeline,
        WanTransformer3DModel,
    )

    if spec.form not in ("2.1", "2.2-ti2v"):
        raise ValueError(f"form {spec.form!r} is not '2.1' or '2.2-ti2v'")
    ti2v = spec.form == "2.2-ti2v"
    tokenizer = t5_tokenizer(spec.vocab_size, spec.seed)
    width = spec.num_attention_heads * spec.attention_head_dim
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        text_encoder = _text_encoder(spec, len(tokenizer))
        image_encoder, image_processor = (None, None) if ti2v else _image_encoder(spec)
        z_dim = 48 if ti2v else 16
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=spec.num_attention_heads,
            attention_head_dim=spec.attention_head_dim,
            # 2.1: noise + mask (one channel per frame of a temporal VAE step) + condition.
            in_channels=z_dim if ti2v else 16 + 4 + 16,
            out_channels=z_dim,
            text_dim=spec.text_hidden,
            freq_dim=32,
            ffn_dim=width * 2,
            num_layers=spec.num_layers,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            image_dim=None if ti2v else spec.image_hidden,
            added_kv_proj_dim=None if ti2v else width,
            rope_max_seq_len=64,
        )
        if ti2v:  # the Wan 2.2 VAE: 12 = 3 x 2 x 2 patchified pixel channels, 16x spatial
            vae = AutoencoderKLWan(
                base_dim=spec.vae_base_dim,
                z_dim=z_dim,
                dim_mult=[1, 1, 1, 1],
                num_res_blocks=1,
                temperal_downsample=[False, True, True],
                is_residual=True,
                in_channels=12,
                out_channels=12,
                patch_size=2,
                scale_factor_spatial=16,
                scale_factor_temporal=4,
                latents_mean=[0.0] * z_dim,
                latents_std=[1.0] * z_dim,
            )
        else:  # 4 levels: 8x spatial, 4x temporal, as the real VAE (NOTES)
            vae = AutoencoderKLWan(
                base_dim=spec.vae_base_dim,
                z_dim=z_dim,
                dim_mult=[1, 1, 1, 1],
                num_res_blocks=1,
                temperal_downsample=[False, True, True],
            )
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        num_train_timesteps=1000,
        flow_shift=3.0,
    )
    pipe = WanImageToVideoPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=scheduler,
        image_processor=image_processor,
        image_encoder=image_encoder,
        transformer=transformer,
        expand_timesteps=ti2v,
    )
    pipe.save_pretrained(out)
    write_gen_defaults(
        out, default_size=spec.default_size, default_num_frames=spec.default_num_frames
    )


MODELS = {
    "tiny-wan-i2v": SmokeModel(
        description="WanImageToVideoPipeline shaped like Wan 2.1 I2V: CLIP vision encoder (image_embeds), "
        "36-channel transformer input (noise, mask, first-frame latents), AutoencoderKLWan, UMT5; "
        "native 32x32, 5 frames",
        build=partial(build, WanI2VSpec(form="2.1", default_size=32)),
    ),
    "tiny-wan22-ti2v": SmokeModel(
        description="WanImageToVideoPipeline shaped like Wan 2.2 TI2V-5B: no image encoder, expand_timesteps "
        "(first latent frame = the image, timestep 0), Wan 2.2 VAE (z_dim 48, 16x spatial), UMT5; "
        "native 32x32, 5 frames",
        build=partial(build, WanI2VSpec(form="2.2-ti2v", default_size=32)),
    ),
}
