"""plan_rows: manifest rows -> planned samples, overrides, seeds and row errors."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pytest

from jobs.rows import GenerationDefaults, PlannedSample, plan_rows
from jobs.seeds import derive_seed

DEFAULTS = GenerationDefaults(
    height=64, width=64, num_inference_steps=4, guidance_scale=5.0,
    images_per_prompt=1, seed=0, size_multiple=8,
)  # fmt: skip


def _plan(columns: dict[str, Any], first_row: int = 0, **overrides: Any) -> list[PlannedSample]:
    defaults = GenerationDefaults(**{**DEFAULTS.__dict__, **overrides})
    return plan_rows(pa.table(columns), first_row, defaults)


def test_one_sample_per_row_with_defaults() -> None:
    samples = _plan({"prompt": ["a cat", "a dog"]})
    assert [(s.row_index, s.image_index) for s in samples] == [(0, 0), (1, 0)]
    for s in samples:
        assert s.error is None
        r = s.request
        assert (r.height, r.width, r.num_inference_steps, r.guidance_scale) == (64, 64, 4, 5.0)
        assert r.negative_prompt == ""
    assert [s.request.prompt for s in samples] == ["a cat", "a dog"]
    assert [s.request.sample_id for s in samples] == ["000000000-0", "000000001-0"]


def test_first_row_offsets_row_index_and_ids() -> None:
    samples = _plan({"prompt": ["a", "b"]}, first_row=40)
    assert [s.row_index for s in samples] == [40, 41]
    assert [s.request.sample_id for s in samples] == ["000000040-0", "000000041-0"]


def test_per_row_overrides_null_means_default() -> None:
    samples = _plan(
        {
            "prompt": ["a", "b"],
            "negative_prompt": [None, "blurry"],
            "height": pa.array([None, 128], pa.int64()),
            "width": pa.array([96, None], pa.int64()),
            "num_inference_steps": pa.array([None, 10], pa.int32()),
            "guidance_scale": pa.array([1.0, None], pa.float64()),
        }
    )
    a, b = (s.request for s in samples)
    assert (a.height, a.width, a.num_inference_steps, a.guidance_scale) == (64, 96, 4, 1.0)
    assert (b.height, b.width, b.num_inference_steps, b.guidance_scale) == (128, 64, 10, 5.0)
    assert (a.negative_prompt, b.negative_prompt) == ("", "blurry")
    assert isinstance(b.guidance_scale, float)
    assert all(s.error is None for s in samples)


def test_integer_guidance_scale_becomes_float() -> None:
    (s,) = _plan({"prompt": ["a"], "guidance_scale": pa.array([3], pa.int64())})
    assert s.request.guidance_scale == 3.0
    assert isinstance(s.request.guidance_scale, float)


def test_num_images_expands_row() -> None:
    samples = _plan({"prompt": ["a", "b"], "num_images": pa.array([3, None], pa.int64())},
                    images_per_prompt=2)  # fmt: skip
    assert [(s.row_index, s.image_index) for s in samples] == [
        (0, 0), (0, 1), (0, 2), (1, 0), (1, 1),
    ]  # fmt: skip
    assert [s.request.sample_id for s in samples] == [
        "000000000-0", "000000000-1", "000000000-2", "000000001-0", "000000001-1",
    ]  # fmt: skip


def test_row_seed_gives_consecutive_image_seeds() -> None:
    samples = _plan({"prompt": ["a"], "seed": pa.array([100], pa.int64()),
                     "num_images": pa.array([3], pa.int64())})  # fmt: skip
    assert [s.request.seed for s in samples] == [100, 101, 102]


def test_no_seed_column_derives_from_job_seed() -> None:
    samples = _plan({"prompt": ["a", "b"]}, seed=7, images_per_prompt=2)
    seeds = [s.request.seed for s in samples]
    assert seeds == [derive_seed(7, s.request.sample_id) for s in samples]
    assert len(set(seeds)) == 4
    assert seeds != [s.request.seed for s in _plan({"prompt": ["a", "b"]}, images_per_prompt=2)]


def test_null_seed_in_seed_column_derives() -> None:
    samples = _plan({"prompt": ["a", "b"], "seed": pa.array([None, 9], pa.int64())})
    assert samples[0].request.seed == derive_seed(0, "000000000-0")
    assert samples[1].request.seed == 9


def test_id_column_names_samples() -> None:
    samples = _plan({"prompt": ["a", "b"], "id": ["cat", "dog"]}, images_per_prompt=2)
    ids = [s.request.sample_id for s in samples]
    assert ids == ["cat-0", "cat-1", "dog-0", "dog-1"]
    assert [s.request.seed for s in samples] == [derive_seed(0, i) for i in ids]


def test_seeds_independent_of_planning_split() -> None:
    """Planning rows 0..5 at once or as 0..2 and 3..5 gives the same samples."""
    prompts = [f"p{i}" for i in range(6)]
    whole = _plan({"prompt": prompts}, images_per_prompt=2)
    parts = _plan({"prompt": prompts[:3]}, images_per_prompt=2) + _plan(
        {"prompt": prompts[3:]}, first_row=3, images_per_prompt=2
    )
    assert whole == parts


def test_unicode_prompt() -> None:
    prompt = "一只猫 🐱 — café"
    (s,) = _plan({"prompt": [prompt]})
    assert s.error is None
    assert s.request.prompt == prompt


@pytest.mark.parametrize(
    ("column", "value", "field"),
    [
        ("prompt", None, "prompt"),
        ("prompt", "   ", "prompt"),
        ("prompt", "", "prompt"),
        ("height", 65, "height"),
        ("height", -8, "height"),
        ("width", 100, "width"),
        ("num_inference_steps", 0, "num_inference_steps"),
        ("guidance_scale", -1.0, "guidance_scale"),
        ("guidance_scale", float("nan"), "guidance_scale"),
        ("num_images", 0, "num_images"),
        ("seed", -5, "seed"),
    ],
)
def test_error_rows(column: str, value: Any, field: str) -> None:
    table = {"prompt": ["good", "bad", "good"]}
    if column == "prompt":
        table["prompt"] = ["good", value, "good"]
    else:
        table[column] = [None, value, None]
    samples = _plan(table)
    assert [s.row_index for s in samples] == [0, 1, 2]  # one (error) sample for the bad row
    assert samples[0].error is None and samples[2].error is None
    error = samples[1].error
    assert error is not None
    assert field in error
    if value is not None and isinstance(value, int):
        assert str(value) in error


def test_error_row_with_several_problems_lists_all() -> None:
    (s,) = _plan({"prompt": [" "], "height": [65], "num_inference_steps": [0]})
    assert s.error is not None
    for field in ("prompt", "height", "num_inference_steps"):
        assert field in s.error


def test_negative_num_images_gives_one_error_sample() -> None:
    samples = _plan({"prompt": ["a"], "num_images": pa.array([-2], pa.int64())})
    assert len(samples) == 1
    assert samples[0].image_index == 0
    assert samples[0].error is not None and "num_images" in samples[0].error


def test_invalid_row_seed_falls_back_to_derived() -> None:
    (s,) = _plan({"prompt": ["a"], "seed": pa.array([-5], pa.int64())})
    assert s.error is not None
    assert 0 <= s.request.seed < 2**63


def test_true_cfg_scale_per_row_where_the_family_has_it() -> None:
    """A family with true CFG (Flux, Qwen-Image: a job-level true_cfg_scale) takes per-row
    overrides; null is the job's value; a bad value or a family without true CFG is an error row."""
    samples = _plan({"prompt": ["a", "b", "c"], "true_cfg_scale": [4, None, -1.0]}, true_cfg_scale=1.0)
    assert [s.request.true_cfg_scale for s in samples[:2]] == [4.0, 1.0]
    assert samples[0].error is None and samples[1].error is None
    assert "true_cfg_scale -1.0 must be a finite number >= 0" in samples[2].error
    plain = _plan({"prompt": ["a", "b"], "true_cfg_scale": [4.0, None]})  # SD: no true CFG
    assert "has no true CFG" in plain[0].error and plain[1].error is None
    assert plain[1].request.true_cfg_scale is None
    assert samples[0].request.batch_key != samples[1].request.batch_key  # not in one pipeline call


def test_image_column_becomes_image_refs_of_image_conditioned_models() -> None:
    """Paths resolve against the manifest's directory (absolute ones stay), struct<bytes, path>
    cells carry their bytes (a path beside bytes is only a name), a struct with only a path is a
    path; null or empty cells are error rows. The image is part of the batch key."""
    from pipeline.samples import ImageRef

    image = {"image_input": True, "image_root": "/data/m"}
    paths = _plan({"prompt": ["p"] * 4, "image": ["imgs/a.png", "/abs/b.png", None, "  "]}, **image)
    struct = pa.array([{"bytes": b"PNG...", "path": "c.png"}, {"bytes": None, "path": "d.png"},
                       {"bytes": None, "path": None}, None, {"bytes": b"", "path": "e.png"}],
                      pa.struct([("bytes", pa.binary()), ("path", pa.string())]))  # fmt: skip
    structs = _plan({"prompt": ["p"] * 5, "image": struct}, **image)
    refs = [s.request.image for s in paths[:2] + structs[:2]]
    assert refs == [ImageRef(path="imgs/a.png", root="/data/m"), ImageRef(path="/abs/b.png", root="/data/m"),
                    ImageRef(path="c.png", data=b"PNG..."), ImageRef(path="d.png", root="/data/m")]  # fmt: skip
    assert [r.file for r in refs] == ["/data/m/imgs/a.png", "/abs/b.png", None, "/data/m/d.png"]
    assert [r.label for r in refs[:3]] == ["'imgs/a.png'", "'/abs/b.png'", "'c.png' (6 bytes)"]
    assert [s.error for s in paths[:2] + structs[:2]] == [None] * 4
    null = "image is null (this model generates from an input image)"
    assert [s.error for s in paths[2:]] == [null, "image path is empty"]
    assert [s.error for s in structs[2:]] == [null, null, "image has empty bytes"]
    assert len({s.request.batch_key for s in paths[:2] + structs[:2]}) == 4
    again = _plan({"prompt": ["p", "q"], "image": ["imgs/a.png"] * 2}, **image)
    assert again[0].request.batch_key == again[1].request.batch_key  # one image: one pipeline call


def test_image_column_passes_through_for_models_without_image_input() -> None:
    samples = _plan({"prompt": ["a", "b"], "image": ["imgs/a.png", None]})
    assert [(s.request.image, s.error) for s in samples] == [(None, None), (None, None)]
