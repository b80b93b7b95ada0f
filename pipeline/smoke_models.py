"""Built-in smoke-test models: real diffusers pipelines with seeded random weights.

Nothing can be downloaded at run time, so these are built from small configs, written with
``save_pretrained`` into a cache directory once, and then loaded through the very same
``DiffusionPipeline.from_pretrained`` path as a user's model. Their images and videos are noise:
they exist to exercise and benchmark the runner, not to make pictures.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

BUILD_VERSION = 1
"""Bumped whenever a spec below changes, so cached copies are rebuilt."""

GEN_DEFAULTS_FILE = "gen_defaults.json"
"""Optional file in a model directory: the defaults gen uses when --height / --width /
--num-frames are not given (``{"default_size": 64, "default_num_frames": 5}``)."""


@dataclass(frozen=True, kw_only=True)
class SmokeSpec:
    """Config of a built-in StableDiffusionPipeline."""

    description: str
    unet_channels: tuple[int, ...]
    """UNet block_out_channels; the first block has no cross-attention, the rest do."""
    layers_per_block: int
    text_hidden: int
    """CLIP text hidden size = UNet cross_attention_dim."""
    text_layers: int
    seed: int = 0


@dataclass(frozen=True, kw_only=True)
class WanSpec:
    """Config of a built-in Wan 2.2-shaped WanPipeline (two experts: transformer, transformer_2)."""

    description: str
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


SMOKE_MODELS: dict[str, SmokeSpec | WanSpec] = {
    "tiny-sd": SmokeSpec(
        description="~1M-parameter StableDiffusionPipeline for tests",
        unet_channels=(32, 64),
        layers_per_block=1,
        text_hidden=32,
        text_layers=2,
    ),
    "small-sd": SmokeSpec(
        description="StableDiffusionPipeline whose UNet dominates CPU run time, for benchmarks",
        unet_channels=(64, 128, 256),
        layers_per_block=2,
        text_hidden=64,
        text_layers=2,
    ),
    "tiny-wan22": WanSpec(
        description="~0.1M-parameter Wan 2.2-shaped WanPipeline (two experts) for tests",
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=2,
        text_hidden=32,
        text_layers=2,
        vae_base_dim=8,
        vocab_size=256,
        default_size=64,
        default_num_frames=5,
    ),
}


def default_cache_dir() -> Path:
    """``$GEN_CACHE_DIR``, else ``$XDG_CACHE_HOME/gen/models``, else ``~/.cache/gen/models``."""
    if os.environ.get("GEN_CACHE_DIR"):
        return Path(os.environ["GEN_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gen" / "models"


def _byte_level_vocab() -> dict[str, int]:
    """CLIP's byte-to-unicode table as a vocabulary: every byte and its end-of-word form.

    With an empty merges list, CLIPTokenizer then tokenizes any unicode text byte by byte.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    symbols = [chr(c) for c in codes]
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": len(symbols) + i for i, s in enumerate(symbols)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab


def _build(spec: SmokeSpec | WanSpec, out: Path) -> None:
    if isinstance(spec, WanSpec):
        _build_wan(spec, out)
    else:
        _build_sd(spec, out)


def _build_sd(spec: SmokeSpec, out: Path) -> None:
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tok_dir = out / "_vocab"
    tok_dir.mkdir(parents=True)
    vocab = _byte_level_vocab()
    (tok_dir / "vocab.json").write_text(json.dumps(vocab))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir, model_max_length=77)
    shutil.rmtree(tok_dir)

    depth = len(spec.unet_channels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=spec.text_hidden,
                intermediate_size=spec.text_hidden * 4,
                num_hidden_layers=spec.text_layers,
                num_attention_heads=4,
                max_position_embeddings=77,
                vocab_size=len(vocab),
                bos_token_id=vocab["<|startoftext|>"],
                eos_token_id=vocab["<|endoftext|>"],
                pad_token_id=vocab["<|endoftext|>"],
            )
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


_TOKENIZER_CORPUS = (
    "a photo of a cat sitting on a red chair",
    "a dog running on the beach at sunset",
    "an astronaut riding a horse on the moon, digital art",
    "a lighthouse at dusk with waves crashing against the rocks",
    "a bowl of fruit: apples, oranges and bananas on a wooden table.",
    "the city skyline at night, long exposure, 35mm film",
    "A Portrait Of An Old Man With A Grey Beard (oil painting)",
    "two children flying a kite in a green field; blue sky & clouds!",
    "0123456789 \"quoted\" 'text' #hash $5 50% *star* +/-=<> ?@[\\]^_`{|}~",
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz",
)
"""Covers every printable ASCII character; characters outside it map to <unk>."""


def _umt5_tokenizer(spec: WanSpec):  # -> transformers.T5Tokenizer
    """A T5 tokenizer (UMT5 layout: <pad>=0, </s>=1, <unk>=2) from a unigram model trained here.

    SentencePiece trains in memory in ~10 ms, single-threaded (deterministic). transformers 5
    rebuilds a T5Tokenizer from its vocabulary and scores on load (normalizer and byte fallback
    are not kept), so none are set here: what is built is what loads.
    """
    import sentencepiece as spm
    from transformers import T5Tokenizer

    spm.set_random_generator_seed(spec.seed)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_TOKENIZER_CORPUS),
        model_writer=model,
        model_type="unigram",
        vocab_size=spec.vocab_size,
        hard_vocab_limit=False,
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def _build_wan(spec: WanSpec, out: Path) -> None:
    import torch
    from diffusers import (
        AutoencoderKLWan,
        UniPCMultistepScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = _umt5_tokenizer(spec)
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
    defaults = {"default_size": spec.default_size, "default_num_frames": spec.default_num_frames}
    (out / GEN_DEFAULTS_FILE).write_text(json.dumps(defaults) + "\n")


def smoke_model_dir(name: str, cache_dir: Path | None = None) -> Path:
    """Where a built-in model lives once built (``ensure_smoke_model`` builds it there).

    Raises:
        KeyError: unknown name.
    """
    SMOKE_MODELS[name]  # noqa: B018  (unknown names raise)
    return (cache_dir or default_cache_dir()) / f"{name}-v{BUILD_VERSION}"


def ensure_smoke_model(name: str, cache_dir: Path | None = None) -> Path:
    """Return the directory of a built-in model, building and saving it on first use.

    Safe when several processes call it at once: each builds into a temporary directory and the
    first atomic rename wins.

    Args:
        name: a key of SMOKE_MODELS.
        cache_dir: where built models live; default ``default_cache_dir()``.
    Returns:
        A directory that ``DiffusionPipeline.from_pretrained`` loads.
    Raises:
        KeyError: unknown name.
    """
    spec = SMOKE_MODELS[name]
    root = cache_dir or default_cache_dir()
    final = smoke_model_dir(name, cache_dir)
    if (final / "model_index.json").exists():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        _build(spec, tmp / "model")
        try:
            os.rename(tmp / "model", final)
        except OSError:
            if not (final / "model_index.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
