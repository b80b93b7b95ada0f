"""truncation_warnings: which prompts the text encoder truncates, and what it drops."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.prompts import truncation_warnings
from pipeline.smoke.text import byte_level_vocab


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory):  # -> CLIPTokenizer
    """The byte-level CLIP tokenizer of the built-in SD models: one token per byte."""
    from transformers import CLIPTokenizer

    d = tmp_path_factory.mktemp("tok")
    (d / "vocab.json").write_text(json.dumps(byte_level_vocab()))
    (d / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer.from_pretrained(Path(d), model_max_length=77)


def test_short_prompts_have_no_warning(clip) -> None:  # noqa: ANN001
    assert truncation_warnings(clip, 77, "CLIP", ["a cat", "猫 🐱"], ["", "blurry"]) == [None, None]


def test_prompt_at_the_limit_is_not_truncated(clip) -> None:  # noqa: ANN001
    exact = "a" * 75  # + start and end tokens = 77
    assert truncation_warnings(clip, 77, "CLIP", [exact], [""]) == [None]
    (warning,) = truncation_warnings(clip, 77, "CLIP", [exact + "bc"], [""])
    assert warning == "prompt truncated to 77 CLIP tokens (79 given); dropped: 'bc'"


def test_long_prompt_and_negative_prompt(clip) -> None:  # noqa: ANN001
    long = "x" * 70 + "tail words here " * 20
    warnings = truncation_warnings(clip, 77, "CLIP", [long, "short", long], ["", long, long])
    # CLIP splits on whitespace and makes no token of it: 70 + 20 * 13 + 2 tokens.
    assert warnings[0].startswith("prompt truncated to 77 CLIP tokens (332 given); dropped: 'ords here tail")
    assert warnings[0].endswith("...'")  # the dropped text is quoted up to 80 characters
    assert warnings[1].startswith("negative_prompt truncated to 77 CLIP tokens")
    assert warnings[2].count("truncated") == 2


def test_unicode_counts_tokens_not_characters(clip) -> None:  # noqa: ANN001
    # 26 CJK characters are 78 UTF-8 bytes: 80 tokens with the special ones.
    (warning,) = truncation_warnings(clip, 77, "CLIP", ["猫" * 26], [""])
    assert warning is not None and "(80 given)" in warning
