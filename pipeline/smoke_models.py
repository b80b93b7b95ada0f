"""Built-in smoke-test models: real diffusers pipelines with seeded random weights.

Nothing can be downloaded at run time, so these are built from small configs, written with
``save_pretrained`` into a cache directory once, and then loaded through the very same
``DiffusionPipeline.from_pretrained`` path as a user's model. Their images are noise: they exist
to exercise and benchmark the runner, not to make pictures.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

BUILD_VERSION = 1
"""Bumped whenever a spec below changes, so cached copies are rebuilt."""


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


SMOKE_MODELS: dict[str, SmokeSpec] = {
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


def _build(spec: SmokeSpec, out: Path) -> None:
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
    final = root / f"{name}-v{BUILD_VERSION}"
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
