"""Tokenizers of the built-in models, built offline: CLIP over a byte-level vocabulary, and T5 /
UMT5 from a SentencePiece unigram model trained here on a small corpus."""

from __future__ import annotations

import io
import json
from pathlib import Path


def byte_level_vocab() -> dict[str, int]:
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
