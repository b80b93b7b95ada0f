"""Built-in LTX-2 model: tiny-ltx2, an LTX2Pipeline (text -> video with a sound track) shaped like
LTX-2.3: a tiny Gemma 3 text encoder (Gemma3ForConditionalGeneration, vision tower included) with a
byte-level GemmaTokenizer built in memory, LTX2TextConnectors with per-modality projections,
a 2-block audio-video transformer with prompt modulation and perturbable self-attention (so the
STG branch differs from cond), AutoencoderKLLTX2Video (32x spatial, 8x temporal, as the real
VAE), AutoencoderKLLTX2Audio, LTX2Vocoder and FlowMatchEulerDiscreteScheduler with LTX's dynamic
shifting.

How the parts fit together (diffusers 0.42.1):

- Gemma hidden states of every layer are stacked: the connectors take caption_channels = Gemma
  hidden (32) x text_proj_in_factor = layers + 1 (3) (``pipelines/ltx2/pipeline_ltx2.py:354-355``,
  ``connectors.py:366-372``); their video / audio outputs (heads x head dim: 16 / 8) are the
  transformer's cross_attention_dim / audio_cross_attention_dim (use_prompt_embeddings=False:
  no caption projection, as LTX-2.3). 128 learnable registers, as the real connectors: the
  pipeline's 1024 text tokens are a multiple.
- Video: 64 px, 9 frames -> latents (8, 2, 2, 2) -> 8 transformer tokens of 8 channels.
- Audio: 9 frames at 24 fps are round(0.375 s x 16000 / 160 / 4) = 9 latent frames of
  latent_channels (2) x mel_bins / 4 (4) = 8 = audio_in_channels = the audio VAE's
  base_channels (its latents_mean has that shape and broadcasts over the packed latents,
  ``autoencoder_kl_ltx2_audio.py:745-748``). The audio decoder (2 upsamplings: ch_mult of 3)
  gives a (2, 33, 16) mel spectrogram, and the vocoder upsamples by 6 x 5 x 8 = 240 as the real
  one: 100 mel frames/s -> 24000 samples/s, 7920 samples (0.33 s) of stereo.
- The transformer has 2 blocks: ``spatio_temporal_guidance_blocks`` may name 0 or 1 (STG_BLOCK).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

from pipeline.smoke import SmokeModel, write_gen_defaults
from pipeline.smoke.text import gemma_tokenizer

MAX_SEQUENCE_LENGTH = 1024
"""LTX2Pipeline.__call__'s max_sequence_length: the tokenizer's model_max_length."""
TEXT_HIDDEN = 32
"""Gemma 3 hidden size = connectors caption_channels."""
TEXT_LAYERS = 2
"""Gemma 3 layers; the connectors take TEXT_LAYERS + 1 stacked hidden states."""
NUM_LAYERS = 2
"""Transformer blocks."""
STG_BLOCK = 1
"""The transformer block of the STG branch, written to gen_defaults.json as the model's
``spatio_temporal_guidance_blocks`` (the pipeline's own default, 28, is LTX-2.3's)."""
DEFAULT_SIZE = 64
"""Pixels (square), written to gen_defaults.json: 2 x 2 latent pixels (a multiple of 32)."""
DEFAULT_NUM_FRAMES = 9
"""8k + 1 frames (2 latent frames), written to gen_defaults.json."""


@dataclass(frozen=True)
class Ltx2Spec:
    """Transformer size of a built-in LTX-2 model (the text encoder, VAEs and vocoder are the
    same tiny ones): video / audio widths are heads x head dim; the connectors match them."""

    video_heads: int = 2
    video_head_dim: int = 8
    audio_heads: int = 2
    audio_head_dim: int = 4
    num_layers: int = NUM_LAYERS
    default_size: int = DEFAULT_SIZE
    default_num_frames: int = DEFAULT_NUM_FRAMES


def build(out: Path, seed: int = 0, spec: Ltx2Spec = Ltx2Spec()) -> None:
    """Build an LTX2Pipeline of ``spec`` with seeded random weights and save_pretrained it into ``out``."""
    import torch
    from diffusers import (
        AutoencoderKLLTX2Audio,
        AutoencoderKLLTX2Video,
        FlowMatchEulerDiscreteScheduler,
        LTX2Pipeline,
        LTX2VideoTransformer3DModel,
    )
    from diffusers.pipelines.ltx2 import LTX2TextConnectors
    from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3TextConfig,
        SiglipVisionConfig,
    )

    tokenizer = gemma_tokenizer(MAX_SEQUENCE_LENGTH)
    video_dim = spec.video_heads * spec.video_head_dim  # tiny: 2 heads x 8
    audio_dim = spec.audio_heads * spec.audio_head_dim  # tiny: 2 heads x 4
    latent_channels, audio_latent_channels, mel_bins = 8, 2, 16
    audio_channels = audio_latent_channels * mel_bins // 4  # packed audio latent width
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # The vision tower is never run (text only); it is there because LTX-2 loads a
        # Gemma3ForConditionalGeneration. 16 px images of 4 px patches pool to 4 image tokens.
        text_encoder = Gemma3ForConditionalGeneration(
            Gemma3Config(
                text_config=Gemma3TextConfig(
                    vocab_size=len(tokenizer), hidden_size=TEXT_HIDDEN, intermediate_size=64,
                    num_hidden_layers=TEXT_LAYERS, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                    query_pre_attn_scalar=16, max_position_embeddings=2048, sliding_window=512,
                ),
                vision_config=SiglipVisionConfig(
                    hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                    image_size=16, patch_size=4, vision_use_head=False,
                ),
                mm_tokens_per_image=4,
            )
        ).eval()  # fmt: skip
        connectors = LTX2TextConnectors(
            caption_channels=TEXT_HIDDEN,
            text_proj_in_factor=TEXT_LAYERS + 1,
            video_connector_num_attention_heads=spec.video_heads,
            video_connector_attention_head_dim=spec.video_head_dim,
            video_connector_num_layers=1,
            video_connector_num_learnable_registers=128,
            audio_connector_num_attention_heads=spec.audio_heads,
            audio_connector_attention_head_dim=spec.audio_head_dim,
            audio_connector_num_layers=1,
            audio_connector_num_learnable_registers=128,
            rope_type="split",
            per_modality_projections=True,  # LTX-2.3
            video_hidden_dim=video_dim,
            audio_hidden_dim=audio_dim,
        )
        transformer = LTX2VideoTransformer3DModel(
            in_channels=latent_channels,
            out_channels=latent_channels,
            num_attention_heads=spec.video_heads,
            attention_head_dim=spec.video_head_dim,
            cross_attention_dim=video_dim,
            audio_in_channels=audio_channels,
            audio_out_channels=audio_channels,
            audio_num_attention_heads=spec.audio_heads,
            audio_attention_head_dim=spec.audio_head_dim,
            audio_cross_attention_dim=audio_dim,
            num_layers=spec.num_layers,
            caption_channels=TEXT_HIDDEN,
            rope_type="split",
            cross_attn_mod=True,  # LTX-2.3: prompt modulation from sigma
            audio_cross_attn_mod=True,
            perturbed_attn=True,  # without it STG blocks change nothing
            use_prompt_embeddings=False,  # LTX-2.3: the connectors project per modality
        )
        # patch 4 x 3 spatiotemporal halvings: 32x spatial, 8x temporal (the pipeline's vae=None
        # fallbacks and the real VAE's ratios).
        vae = AutoencoderKLLTX2Video(
            latent_channels=latent_channels,
            block_out_channels=(8, 16, 32),
            down_block_types=("LTX2VideoDownBlock3D",) * 3,
            layers_per_block=(1, 1, 1, 1),
            spatio_temporal_scaling=(True, True, True),
            downsample_type=("spatiotemporal",) * 3,
            decoder_block_out_channels=(8, 16, 32),
            decoder_layers_per_block=(1, 1, 1, 1),
            decoder_spatio_temporal_scaling=(True, True, True),
            decoder_inject_noise=(False,) * 4,
            upsample_type=("spatiotemporal",) * 3,
            upsample_residual=(True, True, True),
            upsample_factor=(2, 2, 2),
            patch_size=4,
        )
        audio_vae = AutoencoderKLLTX2Audio(
            base_channels=audio_channels,
            output_channels=2,
            ch_mult=(1, 1, 1),
            num_res_blocks=1,
            latent_channels=audio_latent_channels,
            mel_bins=mel_bins,
        )
        vocoder = LTX2Vocoder(
            in_channels=2 * mel_bins,  # audio VAE output channels x mel bins
            hidden_channels=32,
            out_channels=2,
            upsample_kernel_sizes=[12, 11, 16],
            upsample_factors=[6, 5, 8],
            resnet_kernel_sizes=[3],
            resnet_dilations=[[1, 3, 5]],
            output_sampling_rate=24000,
        )
    # The pipeline passes mu (dynamic shifting); the shift bounds are the ones it falls back to
    # (pipelines/ltx2/pipeline_ltx2.py:1346-1352).
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=0.95,
        max_shift=2.05,
        base_image_seq_len=1024,
        max_image_seq_len=4096,
    )
    pipe = LTX2Pipeline(
        scheduler=scheduler,
        vae=vae,
        audio_vae=audio_vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        connectors=connectors,
        transformer=transformer,
        vocoder=vocoder,
    )
    pipe.save_pretrained(out)
    write_gen_defaults(out, default_size=spec.default_size, default_num_frames=spec.default_num_frames,
                       spatio_temporal_guidance_blocks=[STG_BLOCK])


MODELS = {
    "tiny-ltx2": SmokeModel(
        description="LTX2Pipeline shaped like LTX-2.3 (video + stereo audio): Gemma 3 32-d with a byte-level "
        "tokenizer, per-modality connectors, 2-block audio-video transformer (STG on block 1), "
        "AutoencoderKLLTX2Video (32x / 8x), AutoencoderKLLTX2Audio, LTX2Vocoder at 24 kHz; native 64x64, "
        "9 frames",
        build=build,
    ),
    "small-ltx2": SmokeModel(
        description="tiny-ltx2's parts around a 4-block, 256-d (8 heads x 32; audio 64-d) audio-video "
        "transformer (STG on block 1): a compute-bound LTX-2 step for CPU benchmarks; native 256x256, 17 frames",
        build=partial(build, spec=Ltx2Spec(video_heads=8, video_head_dim=32, audio_heads=4, audio_head_dim=16,
                                          num_layers=4, default_size=256, default_num_frames=17)),
    ),
}
