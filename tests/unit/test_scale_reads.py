"""Reading a shard of a large manifest: memory follows the shard, not the manifest."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import jobs.manifest as manifest_module
from jobs.manifest import open_manifest, read_rows
from jobs.plan import num_shards, plan_shards, shard_at


def _manifest(tmp_path: Path, rows: int, row_group: int) -> Path:
    path = tmp_path / "m.parquet"
    table = pa.table({"prompt": [f"p{i}" for i in range(rows)], "n": list(range(rows))})
    pq.write_table(table, path, row_group_size=row_group)
    return path


@pytest.mark.parametrize(("start", "stop"), [(0, 4), (5, 9), (37, 41), (95, 100), (20, 60), (0, 100)])
def test_streamed_rows_equal_whole_group_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             start: int, stop: int) -> None:  # fmt: skip
    """A range inside a row group much larger than it is streamed in small batches and gives
    the same table (values, schema, metadata) as reading the row group whole."""
    m = open_manifest(_manifest(tmp_path, 100, 100))
    whole = read_rows(m, start, stop)
    monkeypatch.setattr(manifest_module, "STREAM_ROWS", 3)  # force the streamed path
    streamed = read_rows(m, start, stop)
    assert streamed.equals(whole)
    assert streamed.schema.metadata == whole.schema.metadata
    assert streamed.column("n").to_pylist() == list(range(start, stop))
    assert read_rows(m, start, stop, ["prompt"]).column_names == ["prompt"]


def test_streamed_read_stops_at_the_range(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The streamed path decodes batches up to the range's end, not the rest of the group."""
    m = open_manifest(_manifest(tmp_path, 1000, 1000))
    monkeypatch.setattr(manifest_module, "STREAM_ROWS", 10)
    seen = []
    real = pq.ParquetFile.iter_batches

    def counting(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        for batch in real(self, *args, **kwargs):
            seen.append(batch.num_rows)
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", counting)
    assert read_rows(m, 0, 8).column("n").to_pylist() == list(range(8))
    assert sum(seen) == 10


@pytest.mark.parametrize(("rows", "size"), [(10, 3), (12, 4), (1, 5), (2_000_001, 1000)])
def test_shard_at_matches_plan_shards(rows: int, size: int) -> None:
    n = num_shards(rows, size)
    indices = [0, n - 1, n // 2] if n > 100 else range(n)
    plan = plan_shards(rows, size) if n <= 100 else None
    for i in indices:
        shard = shard_at(rows, size, i)
        assert shard.index == i and shard.start == i * size
        assert shard.stop == min(rows, (i + 1) * size)
        if plan is not None:
            assert shard == plan[i]
    if plan is not None:
        assert n == len(plan)
    with pytest.raises(IndexError):
        shard_at(rows, size, n)
