"""Built-in Qwen-Image model: tiny-qwenimage, a QwenImagePipeline with a tiny Qwen2.5-VL text
encoder (mrope_section [2, 3, 3] = head_dim / 2), an in-memory byte-level BPE Qwen2Tokenizer whose
first 34 template tokens are exactly the system prefix the pipeline drops, a 2-layer
transformer and AutoencoderKLQwenImage; native 64x64 (gen_defaults.json: the pipeline's own
default is a fixed 1024).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.smoke import SmokeModel, write_gen_defaults
from pipeline.smoke.text import bytes_to_unicode

TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, "
    "text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}"
    "<|im_end|>\n<|im_start|>assistant\n"
)
"""QwenImagePipeline.prompt_template_encode (diffusers 0.42.1, pipeline_qwenimage.py:175)."""
DROP_IDX = 34
"""QwenImagePipeline.prompt_template_encode_start_idx."""

DEFAULT_SIZE = 64
"""Pixels, written to gen_defaults.json (a multiple of 16)."""

SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
)  # fmt: skip

# Words given whole-word merge chains. Bare forms only for the words that follow a special token
# or a newline in the template; all others with a leading space ("Ġ"). Mixing bare and spaced
# chains of the same letters makes BPE stop half-way (e.g. "Ġ" + "the").
_BARE_WORDS = ("system", "Describe", "user", "assistant")
_SPACED_WORDS = (
    "the image by detailing color shape size texture quantity text spatial relationships of"
    " objects and background an photo cat dog on in with at red blue"
).split()


def _vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """256 byte symbols, then a left-to-right merge chain per word, each chain prefix a vocabulary
    entry. Deterministic (no randomness)."""
    table = bytes_to_unicode()
    symbols = [table[b] for b in range(256)]
    vocab = {s: i for i, s in enumerate(symbols)}
    merges: list[tuple[str, str]] = []
    for form in [" " + w for w in _SPACED_WORDS] + list(_BARE_WORDS):
        units = [table[b] for b in form.encode("utf-8")]
        cur = units[0]
        for u in units[1:]:
            pair = (cur, u)
            cur = cur + u
            if cur not in vocab:
                vocab[cur] = len(vocab)
                merges.append(pair)
    return vocab, merges


def build(out: Path, seed: int = 0) -> None:
    """Build the tiny QwenImagePipeline and save_pretrained it into ``out`` (created)."""
    import torch
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from tokenizers import AddedToken
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2Tokenizer,
    )

    out = Path(out)
    vocab, merges = _vocab_and_merges()
    for tok in SPECIAL_TOKENS:  # specials in the BPE vocab too, so their ids are fixed
        vocab[tok] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=[AddedToken(t, special=True) for t in SPECIAL_TOKENS[1:]],
        model_max_length=32768,
    )
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    assert ids == {t: vocab[t] for t in SPECIAL_TOKENS}, ids
    # The pipeline drops the template's first 34 tokens: make them exactly the system message.
    head = tokenizer(TEMPLATE.format("x")).input_ids[:DROP_IDX]
    assert tokenizer.decode(head) == TEMPLATE[: TEMPLATE.index("{}")], tokenizer.decode(head)

    text_hidden, text_heads = 32, 2
    head_dim = text_hidden // text_heads  # 16
    mrope_section = [2, 3, 3]  # sum == head_dim / 2 (modeling_qwen2_5_vl.py:508, :546)
    assert sum(mrope_section) * 2 == head_dim

    tx_heads, tx_head_dim = 2, 16
    axes = (4, 6, 6)  # sum == transformer head dim; each even
    assert sum(axes) == tx_head_dim

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        config = Qwen2_5_VLConfig(
            text_config=dict(
                vocab_size=len(vocab),
                hidden_size=text_hidden,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=text_heads,
                num_key_value_heads=text_heads,
                max_position_embeddings=4096,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                 "mrope_section": mrope_section},  # fmt: skip
                bos_token_id=ids["<|endoftext|>"],
                eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"],
            ),
            vision_config=dict(
                depth=1,
                hidden_size=16,
                intermediate_size=32,
                num_heads=2,
                out_hidden_size=text_hidden,
                fullatt_block_indexes=[0],
            ),
            image_token_id=ids["<|image_pad|>"],
            video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"],
            vision_end_token_id=ids["<|vision_end|>"],
        )
        text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
        transformer = QwenImageTransformer2DModel(
            patch_size=2,
            in_channels=64,  # 16 latent channels x 2x2 patch
            out_channels=16,
            num_layers=2,
            attention_head_dim=tx_head_dim,
            num_attention_heads=tx_heads,
            joint_attention_dim=text_hidden,
            axes_dims_rope=axes,
        ).eval()
        vae = AutoencoderKLQwenImage(
            base_dim=8,
            z_dim=16,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],  # 3 entries -> vae_scale_factor 8
        ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=0.9,
        base_image_seq_len=256,
        max_image_seq_len=8192,
        shift_terminal=0.02,
        time_shift_type="exponential",
    )
    pipe = QwenImagePipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
    pipe.save_pretrained(out)
    write_gen_defaults(out, default_size=DEFAULT_SIZE)


MODELS = {
    "tiny-qwenimage": SmokeModel(
        description="QwenImagePipeline, 2-layer transformer, Qwen2.5-VL text encoder 32-d with an offline BPE "
        "tokenizer; native 64x64",
        build=build,
    ),
}
