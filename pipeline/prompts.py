"""Prompt checks before encoding: which prompts the text encoder will truncate.

Diffusers truncates a prompt longer than its text encoder takes (CLIP: 77 tokens with the start
and end tokens; Wan's UMT5: ``max_sequence_length`` tokens) and only logs it. gen keeps the
sample but says so in its row: the ``warning`` column of the samples parquet.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

MAX_DROPPED_CHARS = 80
"""Characters of the dropped text quoted in a warning."""


def truncation_warnings(tokenizer: Any, max_tokens: int, encoder: str, prompts: Sequence[str],
                        negative_prompts: Sequence[str]) -> list[str | None]:  # fmt: skip
    """Per sample, a warning when its prompt or negative prompt is longer than the encoder takes.

    The kept part is what diffusers keeps (``truncation=True, max_length=max_tokens`` with the
    special tokens), and the dropped text is decoded as diffusers' own log message does it
    (``untruncated_ids[max_tokens - 1 : -1]``).

    Args:
        tokenizer: the pipeline's tokenizer (a transformers tokenizer).
        max_tokens: tokens the encoder takes, special tokens included, >= 2.
        encoder: the encoder's name for the message ("CLIP", "UMT5").
        prompts: B prompts.
        negative_prompts: B negative prompts ("" for none).
    Returns:
        B entries: None, or e.g. "prompt truncated to 77 CLIP tokens (112 given); dropped: '...'".
    """
    texts = list(dict.fromkeys([*prompts, *negative_prompts]))
    ids = tokenizer(texts, add_special_tokens=True, truncation=False).input_ids
    dropped = {}
    for text, tokens in zip(texts, ids):
        if len(tokens) > max_tokens:
            cut = tokenizer.decode(tokens[max_tokens - 1 : -1]).strip()
            if len(cut) > MAX_DROPPED_CHARS:
                cut = cut[:MAX_DROPPED_CHARS] + "..."
            dropped[text] = (len(tokens), cut)
    warnings = []
    for prompt, negative in zip(prompts, negative_prompts):
        found = [
            f"{name} truncated to {max_tokens} {encoder} tokens ({dropped[text][0]} given); "
            f"dropped: {dropped[text][1]!r}"
            for name, text in (("prompt", prompt), ("negative_prompt", negative))
            if text in dropped
        ]
        warnings.append("; ".join(found) or None)
    return warnings
