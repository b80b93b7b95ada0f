"""Text side of the built-in models, built offline: CLIP tokenizers over a byte-level vocabulary,
T5 / UMT5 tokenizers from a SentencePiece unigram model trained here on a small corpus, and the
CLIP and T5 encoder configs the builders share."""

from __future__ import annotations

import io
import json
from pathlib import Path


def bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 / CLIP / Qwen byte-level table: byte -> printable unicode symbol, the printable
    bytes first (in this order), then the others mapped to 256, 257, ..."""
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
    return dict(zip(printable, (chr(c) for c in codes)))


def byte_level_vocab() -> dict[str, int]:
    """CLIP's byte-to-unicode table as a vocabulary: every byte and its end-of-word form.

    With an empty merges list, CLIPTokenizer then tokenizes any unicode text byte by byte.
    """
    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": len(symbols) + i for i, s in enumerate(symbols)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab


def clip_tokenizer(model_max_length: int = 77, **kwargs: str):  # -> transformers.CLIPTokenizer
    """A CLIP tokenizer over the byte-level vocabulary (any text, byte by byte; 514 entries),
    built offline; ``model_max_length`` must be set (transformers defaults it to 1e30). ``kwargs``:
    further tokenizer settings, e.g. SDXL's second tokenizer pads with ``pad_token="!"``."""
    import tempfile

    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        vocab = byte_level_vocab()
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=model_max_length, **kwargs)


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


def t5_tokenizer(vocab_size: int, seed: int = 0, model_max_length: int = 512):  # -> transformers.T5Tokenizer
    """A T5 tokenizer (UMT5 layout: <pad>=0, </s>=1, <unk>=2) from a unigram model trained here.

    ``vocab_size`` is a soft target: on the small built-in corpus the trainer stops below it
    (~150 pieces).

    SentencePiece trains in memory in ~10 ms, single-threaded (deterministic). transformers 5
    rebuilds a T5Tokenizer from its vocabulary and scores on load (normalizer and byte fallback
    are not kept), so none are set here: what is built is what loads.
    """
    import sentencepiece as spm
    from transformers import T5Tokenizer

    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_TOKENIZER_CORPUS),
        model_writer=model,
        model_type="unigram",
        vocab_size=vocab_size,
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
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def t5_config(vocab_size: int, d_model: int, num_layers: int = 2):  # -> transformers.T5Config
    """A T5 v1.1-style encoder config (gated-gelu, as T5-XXL / UMT5): 4 heads of d_model / 4,
    feed-forward 2 x d_model, the UMT5 token layout (<pad>=0, </s>=1). Built from a config, T5
    starts in training mode (dropout 0.1): call .eval() on the model."""
    from transformers import T5Config

    return T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=d_model // 4, num_heads=4, d_ff=d_model * 2,
                    num_layers=num_layers, feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                    relative_attention_max_distance=128, pad_token_id=0, eos_token_id=1,
                    decoder_start_token_id=0)  # fmt: skip


def clip_config(vocab: dict[str, int], hidden: int, intermediate: int, num_layers: int = 2, **extra: object):
    """A CLIP text config over ``vocab`` (``clip_tokenizer``'s), 4 heads, 77 positions; the
    pipelines use hidden_states[-2], so 2 layers at least. ``extra``: projection_dim, hidden_act."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=num_layers,
                          num_attention_heads=4, max_position_embeddings=77, vocab_size=len(vocab),
                          bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                          pad_token_id=vocab["<|endoftext|>"], **extra)  # fmt: skip


GEMMA_SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")
"""Gemma's special tokens, ids 0-4 in this order (GemmaTokenizer's own default vocabulary)."""


def gemma_tokenizer(model_max_length: int):  # -> transformers.GemmaTokenizer
    """A Gemma tokenizer over bytes, built in memory: the 5 special tokens, the 256 byte-fallback
    tokens ``<0x00>`` ... ``<0xFF>`` and ``▁`` (the normalized space), no merges (262 entries), so
    any text tokenizes byte by byte; ``<bos>`` first as Gemma's, no ``<eos>``.

    ``model_max_length`` must be set (transformers defaults it to 1e30).
    """
    from transformers import GemmaTokenizer

    vocab = {token: i for i, token in enumerate(GEMMA_SPECIAL_TOKENS)}
    vocab.update({f"<0x{b:02X}>": len(GEMMA_SPECIAL_TOKENS) + b for b in range(256)})
    vocab["▁"] = len(vocab)
    return GemmaTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length, add_bos_token=True,
                          add_eos_token=False)  # fmt: skip
