"""Built-in Wan models: tiny-wan22, a Wan 2.2-shaped WanPipeline with two experts."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

from pipeline.smoke import SmokeModel, write_gen_defaults
from pipeline.smoke.text import t5_tokenizer


@dataclass(frozen=True, kw_only=True)
class WanSpec:
    """Config of a built-in Wan 2.2-shaped WanPipeline (two experts: transformer, transformer_2)."""

    num_attention_heads: int
    attention_head_dim: int
    """Per head; the transformer width is heads x head dim."""
    num_layers: int
    """Transformer blocks of each expert."""
    text_hidden: int
    """UMT5 d_model = transformer text_dim."""
    text_layers: int
    vae_base_dim: int
    """AutoencoderKLWan base channels; 4 levels (8x spatial, 4x temporal, as the real VAE)."""
    vocab_size: int
    """SentencePiece unigram vocabulary target; a soft limit: on the small built-in corpus the
    trainer stops below it (tiny-wan22: ~150 pieces)."""
    boundary_ratio: float = 0.875
    """Wan 2.2 T2V: ``transformer`` runs while t >= boundary_ratio * 1000, then ``transformer_2``."""
    flow_shift: float = 3.0
    """UniPCMultistepScheduler flow_shift; 3.0 puts steps 0-1 of 4 on ``transformer``."""
    default_size: int
    """Pixels, written to gen_defaults.json: the size gen uses without --height / --width."""
    default_num_frames: int
    """4k + 1, written to gen_defaults.json."""
    seed: int = 0


def build(spec: WanSpec, out: Path) -> None:
    """Build a Wan 2.2-shaped WanPipeline of ``spec`` with seeded random weights into ``out``."""
    import torch
    from diffusers import (
        AutoencoderKLWan,
        UniPCMultistepScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = t5_tokenizer(spec.vocab_size, spec.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        # Built from a config, T5 starts in training mode (dropout 0.1): eval() (NOTES).
        text_encoder = UMT5EncoderModel(
            UMT5Config(
                vocab_size=len(tokenizer),
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
        experts = [
            WanTransformer3DModel(
                patch_size=(1, 2, 2),
                num_attention_heads=spec.num_attention_heads,
                attention_head_dim=spec.attention_head_dim,
                in_channels=16,
                out_channels=16,
                text_dim=spec.text_hidden,
                freq_dim=32,
                ffn_dim=spec.num_attention_heads * spec.attention_head_dim * 2,
                num_layers=spec.num_layers,
                cross_attn_norm=True,
                qk_norm="rms_norm_across_heads",
                rope_max_seq_len=64,
            )
            for _ in range(2)
        ]
        # 4 levels: 8x spatial, 4x temporal; with vae=None a pipeline assumes these (NOTES).
        vae = AutoencoderKLWan(
            base_dim=spec.vae_base_dim,
            z_dim=16,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
        )
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        num_train_timesteps=1000,
        flow_shift=spec.flow_shift,
    )
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=scheduler,
        transformer=experts[0],
        transformer_2=experts[1],
        boundary_ratio=spec.boundary_ratio,
    )
    pipe.save_pretrained(out)
    write_gen_defaults(out, default_size=spec.default_size, default_num_frames=spec.default_num_frames)



MODELS = {
    "tiny-wan22": SmokeModel(
        description="WanPipeline shaped like Wan 2.2: two experts (transformer, transformer_2, boundary_ratio "
        "0.875), AutoencoderKLWan, UMT5 with a SentencePiece tokenizer trained offline; native 64x64, 5 frames",
        build=partial(build, WanSpec(num_attention_heads=2, attention_head_dim=8, num_layers=2, text_hidden=32,
                                     text_layers=2, vae_base_dim=8, vocab_size=256, default_size=64,
                                     default_num_frames=5)),
    ),
}
