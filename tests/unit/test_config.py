"""BatchConfig: option checks, shard size resolution, serialisation."""

from __future__ import annotations

import json
from typing import Any

import pytest

from jobs.config import BatchConfig
from jobs.errors import JobError


def _config(**kwargs: Any) -> BatchConfig:
    return BatchConfig(manifest="m.parquet", out="out", **kwargs)


def test_defaults() -> None:
    c = _config()
    assert c.batch_size == 4
    assert c.shard_size == 1000
    assert c.dtype == "auto"
    assert c.gpus == 1


@pytest.mark.parametrize(("batch_size", "shard_size"), [(3, 1002), (1, 1000), (7, 1001), (8, 1000)])
def test_default_shard_size_is_a_multiple_of_batch_size(batch_size: int, shard_size: int) -> None:
    c = _config(batch_size=batch_size)
    assert c.shard_size == shard_size
    assert c.shard_size % batch_size == 0


def test_explicit_shard_size_kept() -> None:
    assert _config(batch_size=4, shard_size=8).shard_size == 8


@pytest.mark.parametrize("shard_size", [6, 0, -4])
def test_shard_size_not_a_multiple(shard_size: int) -> None:
    with pytest.raises(JobError) as info:
        _config(batch_size=4, shard_size=shard_size)
    message = str(info.value)
    assert "--shard-size" in message
    assert "--batch-size" in message
    assert str(shard_size) in message


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        ({"num_inference_steps": 0}, "--steps"),
        ({"guidance_scale": -1.0}, "--guidance-scale"),
        ({"guidance_scale": float("nan")}, "--guidance-scale"),
        ({"guidance_rescale": 1.5}, "--guidance-rescale"),
        ({"height": 65}, "--height"),
        ({"height": 0}, "--height"),
        ({"width": 12}, "--width"),
        ({"gpus": 0}, "--gpus"),
        ({"dtype": "int8"}, "--dtype"),
        ({"images_per_prompt": 0}, "--images-per-prompt"),
        ({"batch_size": 0}, "--batch-size"),
        ({"batch_size": 4, "max_forward_batch": 3}, "--max-forward-batch"),
        ({"seed": -1}, "--seed"),
        ({"seed": 2**63}, "--seed"),
        ({"collective_timeout_s": 0.0}, "--collective-timeout"),
    ],
)
def test_invalid_option_named(kwargs: dict[str, Any], option: str) -> None:
    with pytest.raises(JobError) as info:
        _config(**kwargs)
    message = str(info.value)
    assert message.startswith(option + " ")
    assert repr(list(kwargs.values())[-1]) in message


@pytest.mark.parametrize("dtype", ["auto", "float32", "float16", "bfloat16"])
def test_valid_dtypes(dtype: str) -> None:
    assert _config(dtype=dtype).dtype == dtype


def test_round_trip() -> None:
    c = _config(
        model="tiny-sd", dtype="float32", num_inference_steps=3, guidance_scale=1.5,
        guidance_rescale=0.7, height=64, width=128, images_per_prompt=2, batch_size=3,
        seed=12345, gpus=2, cfg_batching=False, collective_timeout_s=30.0,
    )  # fmt: skip
    d = c.to_dict()
    assert d["manifest"] == "m.parquet"
    assert d["shard_size"] == 1002
    assert d["cfg_batching"] is False
    assert BatchConfig.from_dict(d) == c
    assert BatchConfig.from_dict(json.loads(json.dumps(d))) == c


def test_generation_options_exclude_paths_and_ranks() -> None:
    a = _config(gpus=1)
    b = BatchConfig(manifest="other.parquet", out="elsewhere", gpus=2, collective_timeout_s=9.0)
    assert a.generation_options() == b.generation_options()
    assert "manifest" not in a.generation_options()
    assert a.generation_options() != _config(seed=1).generation_options()
    assert a.generation_options()["shard_size"] == 1000
