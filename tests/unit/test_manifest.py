"""open_manifest / read_rows / total_images: the manifest contract."""

from __future__ import annotations

import random
import string
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.errors import JobError
from jobs.manifest import Manifest, open_manifest, read_rows, total_images
from jobs.rows import GenerationDefaults, plan_rows


def _write(path: Path, columns: dict[str, pa.Array | list], **kwargs: object) -> Path:
    pq.write_table(pa.table(columns), path, **kwargs)
    return path


def _ten_rows(tmp_path: Path) -> Path:
    return _write(
        tmp_path / "ten.parquet",
        {"prompt": [f"p{i}" for i in range(10)], "n": list(range(10))},
        row_group_size=3,
    )


def _error(path: Path) -> str:
    with pytest.raises(JobError) as info:
        open_manifest(path)
    message = str(info.value)
    assert str(path) in message
    return message


# -- rejected manifests ----------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    message = _error(tmp_path / "nope.parquet")
    assert "no such file" in message


def test_directory(tmp_path: Path) -> None:
    d = tmp_path / "dir.parquet"
    d.mkdir()
    message = _error(d)
    assert "directory" in message


def test_not_parquet(tmp_path: Path) -> None:
    p = tmp_path / "prompts.parquet"
    p.write_text("prompt\na cat\na dog\n")
    message = _error(p)
    assert "not a readable parquet file" in message


def test_truncated_parquet(tmp_path: Path) -> None:
    p = _ten_rows(tmp_path)
    data = p.read_bytes()
    assert len(data) > 100
    p.write_bytes(data[:-100])
    message = _error(p)
    assert "not a readable parquet file" in message


def test_zero_rows(tmp_path: Path) -> None:
    p = _write(tmp_path / "empty.parquet", {"prompt": pa.array([], type=pa.string())})
    message = _error(p)
    assert "no rows" in message


def test_no_prompt_column_lists_columns(tmp_path: Path) -> None:
    p = _write(tmp_path / "m.parquet", {"text": ["a"], "category": ["x"]})
    message = _error(p)
    assert "'prompt'" in message
    assert "text" in message and "category" in message


def test_prompt_of_int_type(tmp_path: Path) -> None:
    p = _write(tmp_path / "m.parquet", {"prompt": [1, 2]})
    message = _error(p)
    assert "'prompt'" in message
    assert "int64" in message
    assert "string" in message


def test_seed_of_string_type(tmp_path: Path) -> None:
    p = _write(tmp_path / "m.parquet", {"prompt": ["a", "b"], "seed": ["1", "2"]})
    message = _error(p)
    assert "'seed'" in message
    assert "integer" in message


@pytest.mark.parametrize("column", ["status", "sample_id", "error", "warning"])
def test_reserved_output_column(tmp_path: Path, column: str) -> None:
    p = _write(tmp_path / "m.parquet", {"prompt": ["a"], column: ["x"]})
    message = _error(p)
    assert f"'{column}'" in message
    assert "reserved" in message


def test_duplicate_ids(tmp_path: Path) -> None:
    p = _write(tmp_path / "m.parquet", {"prompt": ["a", "b", "c"], "id": ["x", "y", "x"]})
    message = _error(p)
    assert "'id'" in message
    assert "duplicated" in message
    assert "'x'" in message


def test_duplicate_ids_not_checked_when_disabled(tmp_path: Path) -> None:
    p = _write(tmp_path / "m.parquet", {"prompt": ["a", "b"], "id": [7, 7]})
    assert open_manifest(p, check_ids=False).num_rows == 2


# -- valid manifests -------------------------------------------------------------------------


def test_valid_manifest_row_groups(tmp_path: Path) -> None:
    p = _ten_rows(tmp_path)
    m = open_manifest(p)
    assert isinstance(m, Manifest)
    assert m.num_rows == 10
    assert m.row_group_offsets == (0, 3, 6, 9, 10)
    assert m.schema.names == ["prompt", "n"]
    assert Path(m.path) == p.resolve()


def test_unique_int_ids_accepted(tmp_path: Path) -> None:
    p = _write(tmp_path / "m.parquet", {"prompt": ["a", "b", "c"], "id": [3, 1, 2]})
    assert open_manifest(p).num_rows == 3


def test_fingerprint_stable_and_changes_with_one_prompt(tmp_path: Path) -> None:
    prompts = [f"prompt number {i}" for i in range(10)]
    a = _write(tmp_path / "a.parquet", {"prompt": prompts})
    a_again = _write(tmp_path / "a_again.parquet", {"prompt": prompts})
    changed = list(prompts)
    changed[4] = "prompt number X"  # same length
    b = _write(tmp_path / "b.parquet", {"prompt": changed})
    fa, fa2, fb = (open_manifest(p).fingerprint for p in (a, a_again, b))
    assert fa == fa2
    assert fa != fb


def test_fingerprint_changes_with_one_prompt_in_large_file(tmp_path: Path) -> None:
    """A manifest over 1 MiB: changing one early prompt must still change the fingerprint."""
    rng = random.Random(0)
    letters = string.ascii_lowercase[1:-1]  # b..y: "a..." and "z..." below stay min and max
    prompts = ["a" * 100, "z" * 100]
    prompts += ["".join(rng.choices(letters, k=100)) for _ in range(19_998)]
    changed = list(prompts)
    changed[2] = changed[2][:-1] + ("b" if changed[2][-1] != "b" else "c")
    opts = {"row_group_size": 5000, "compression": "none", "use_dictionary": False}
    a = _write(tmp_path / "a.parquet", {"prompt": prompts}, **opts)
    b = _write(tmp_path / "b.parquet", {"prompt": changed}, **opts)
    assert a.stat().st_size > 1 << 20
    assert pq.read_table(a).column("prompt")[2] != pq.read_table(b).column("prompt")[2]
    assert open_manifest(a).fingerprint != open_manifest(b).fingerprint


# -- read_rows -------------------------------------------------------------------------------


def test_read_rows_across_row_groups(tmp_path: Path) -> None:
    m = open_manifest(_ten_rows(tmp_path))
    table = read_rows(m, 2, 8)
    assert table.num_rows == 6
    assert table.column("n").to_pylist() == [2, 3, 4, 5, 6, 7]
    assert table.column("prompt").to_pylist() == [f"p{i}" for i in range(2, 8)]


@pytest.mark.parametrize(("start", "stop"), [(0, 10), (0, 1), (9, 10), (3, 6), (5, 6), (1, 9)])
def test_read_rows_ranges(tmp_path: Path, start: int, stop: int) -> None:
    m = open_manifest(_ten_rows(tmp_path))
    assert read_rows(m, start, stop).column("n").to_pylist() == list(range(start, stop))


def test_read_rows_selected_columns(tmp_path: Path) -> None:
    m = open_manifest(_ten_rows(tmp_path))
    table = read_rows(m, 4, 7, columns=["n"])
    assert table.column_names == ["n"]
    assert table.column("n").to_pylist() == [4, 5, 6]


def test_dictionary_and_large_string_columns_read_as_their_values(tmp_path: Path) -> None:
    """pandas' category dtype (dictionary-encoded) and large_string: prompt, negative_prompt and
    id read as plain strings, other known columns as their values; passthrough keeps its type."""
    dict_str = lambda values: pa.array(values).dictionary_encode()  # noqa: E731
    p = _write(tmp_path / "m.parquet", {
        "prompt": dict_str(["a cat", "a dog", "a cat"]),
        "negative_prompt": pa.array(["blurry", None, "blurry"], pa.large_string()),
        "id": dict_str(["x", "y", "z"]),
        "seed": pa.array([1, 2, 1]).dictionary_encode(),
        "category": dict_str(["animal", "animal", "animal"]),
    }, row_group_size=2)  # fmt: skip
    m = open_manifest(p)
    types = {f.name: f.type for f in m.schema}
    assert types["prompt"] == types["negative_prompt"] == types["id"] == pa.string()
    assert types["seed"] == pa.int64()
    assert pa.types.is_dictionary(types["category"])
    for table in (read_rows(m, 0, 3), read_rows(m, 1, 3)):  # one row group, and two
        assert {f.name: f.type for f in table.schema} == types
    rows = read_rows(m, 0, 3).to_pylist()
    assert [r["prompt"] for r in rows] == ["a cat", "a dog", "a cat"]
    assert [r["seed"] for r in rows] == [1, 2, 1] and rows[1]["negative_prompt"] is None


def test_dictionary_of_the_wrong_values_is_refused(tmp_path: Path) -> None:
    p = _write(tmp_path / "m.parquet", {"prompt": pa.array([1.5, 2.5]).dictionary_encode(),
                                        "negative_prompt": pa.array([1, 2]).dictionary_encode()})  # fmt: skip
    assert "column 'prompt' has type" in _error(p) and "expected string" in _error(p)


def test_read_rows_names_a_manifest_gone_since_it_was_opened(tmp_path: Path) -> None:
    import errno

    m = open_manifest(_ten_rows(tmp_path))
    Path(m.path).unlink()
    with pytest.raises(OSError) as info:
        read_rows(m, 0, 3)
    assert (info.value.errno, info.value.filename) == (errno.ENOENT, m.path)


# -- total_images ----------------------------------------------------------------------------


def test_total_images_without_column(tmp_path: Path) -> None:
    m = open_manifest(_ten_rows(tmp_path))
    assert total_images(m, 2, 8, 3) == 18


def test_total_images_with_nulls(tmp_path: Path) -> None:
    p = _write(
        tmp_path / "m.parquet",
        {"prompt": list("abcde"), "num_images": pa.array([2, None, 5, None, 1], pa.int64())},
        row_group_size=2,
    )
    m = open_manifest(p)
    assert total_images(m, 0, 5, 4) == 2 + 4 + 5 + 4 + 1
    assert total_images(m, 1, 3, 7) == 7 + 5


def test_total_images_matches_planned_samples(tmp_path: Path) -> None:
    """The progress total equals what plan_rows expands to, invalid counts included."""
    p = _write(
        tmp_path / "m.parquet",
        {"prompt": list("abcdef"), "num_images": pa.array([2, None, 0, 3, -1, None], pa.int64())},
    )
    m = open_manifest(p)
    defaults = GenerationDefaults(
        height=64, width=64, num_inference_steps=4, guidance_scale=5.0,
        images_per_prompt=2, seed=0, size_multiple=8,
    )  # fmt: skip
    planned = plan_rows(read_rows(m, 0, 6), 0, defaults)
    assert total_images(m, 0, 6, 2) == len(planned)


# -- the image input column ------------------------------------------------------------------

IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


@pytest.mark.parametrize(
    "column",
    [
        pa.array(["imgs/a.png"]),
        pa.array(["imgs/a.png"], pa.large_string()),
        pa.array([{"bytes": b"\x89PNG", "path": "a.png"}], IMAGE_STRUCT),  # datasets' Image storage
        pa.array(
            [{"path": None, "bytes": None}],
            pa.struct([("path", pa.string()), ("bytes", pa.large_binary())]),
        ),
    ],
)
def test_image_column_of_an_accepted_type(tmp_path: Path, column: pa.Array) -> None:
    p = _write(tmp_path / "m.parquet", {"prompt": ["a"], "image": column})
    assert open_manifest(p).schema.field("image").type == column.type


@pytest.mark.parametrize(
    "column",
    [
        pa.array([3]),
        pa.array([b"\x89PNG"]),  # bare bytes: not datasets' layout
        pa.array([{"bytes": b"x"}], pa.struct([("bytes", pa.binary())])),
        pa.array(
            [{"bytes": b"x", "path": "a", "extra": 1}],
            pa.struct([("bytes", pa.binary()), ("path", pa.string()), ("extra", pa.int8())]),
        ),
        pa.array(
            [{"bytes": "x", "path": "a"}],
            pa.struct([("bytes", pa.string()), ("path", pa.string())]),
        ),
        pa.array([["a.png"]]),  # a list of images: one per row only
    ],
)
def test_image_column_of_another_type_names_file_column_and_types(
    tmp_path: Path, column: pa.Array
) -> None:
    p = _write(tmp_path / "m.parquet", {"prompt": ["a"], "image": column})
    message = _error(p)
    written = pq.read_schema(p).field("image").type  # as parquet gives it back
    assert f"column 'image' has type {written}" in message
    assert (
        "expected string (a path relative to the manifest) or struct<bytes: binary, path: string>"
        in message
    )


def test_image_column_against_the_model(tmp_path: Path) -> None:
    """An image-conditioned model needs the column; a model writing an ``image`` output column
    refuses it (it would clash); a video model without image input lets it pass through."""
    from jobs.manifest import check_image_column

    with_image = open_manifest(
        _write(tmp_path / "a.parquet", {"prompt": ["a"], "image": ["x.png"]})
    )
    without = open_manifest(_write(tmp_path / "b.parquet", {"prompt": ["a"]}))
    assert (
        check_image_column(with_image, model="i2v", image_input=True, output_kind="video") is None
    )
    assert check_image_column(without, model="sd", image_input=False, output_kind="image") is None
    with pytest.raises(
        JobError, match="no 'image' column, but --model i2v generates from an input image"
    ):
        check_image_column(without, model="i2v", image_input=True, output_kind="video")
    with pytest.raises(JobError, match="column 'image' is the output column of --model tiny-sd, which takes no "
                                       "input image; rename it"):  # fmt: skip
        check_image_column(with_image, model="tiny-sd", image_input=False, output_kind="image")
    notice = check_image_column(
        with_image, model="tiny-wan22", image_input=False, output_kind="video"
    )
    assert (
        notice
        == "warning: --model tiny-wan22 takes no input image: column 'image' only passes through"
    )
