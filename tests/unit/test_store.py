"""OutputDir: parts, rank-finished markers and the shard commit."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.output.schema import STEPS_SCHEMA
from jobs.output.store import OutputDir, write_atomic, write_json
from jobs.plan import Shard

SHARD = Shard(3, 30, 33)
INFO = {"start_wall": 100.0, "end_wall": 200.0}


def _samples(*keys: tuple[int, int], status: str = "ok") -> pa.Table:
    """Samples rows for (row_index, image_index) keys, ids like the planner's."""
    return pa.table(
        {
            "sample_id": [f"{r:09d}-{i}" for r, i in keys],
            "row_index": pa.array([r for r, _ in keys], pa.int64()),
            "image_index": pa.array([i for _, i in keys], pa.int64()),
            "status": [status] * len(keys),
            "prompt": [f"p{r}" for r, _ in keys],
        }
    )


def _steps(*keys: tuple[int, int], n: int = 2) -> pa.Table:
    rows = [
        {"sample_id": f"{r:09d}-{i}", "step_index": s, "timestep": float(900 - s),
         "denoiser": "unet", "uncond": "fresh", "step_s": 0.1,
         "branches": [{"name": "uncond", "cfg_rank": 0}, {"name": "cond", "cfg_rank": 0}]}
        for r, i in keys
        for s in range(n)
    ]  # fmt: skip
    return pa.Table.from_pylist(rows, schema=STEPS_SCHEMA)


def _part(out: OutputDir, tag: str, *keys: tuple[int, int], status: str = "ok") -> None:
    out.write_part(SHARD, tag, _samples(*keys, status=status), _steps(*keys))


def test_paths(tmp_path: Path) -> None:
    out = OutputDir(tmp_path)
    assert out.samples(SHARD) == tmp_path / "samples" / "shard-00003.parquet"
    assert out.steps(SHARD) == tmp_path / "steps" / "shard-00003.parquet"
    assert out.done(SHARD) == tmp_path / "done" / "shard-00003.json"
    assert out.progress(2) == tmp_path / ".gen" / "runs" / "local" / "progress" / "rank-00002.json"
    task = OutputDir(tmp_path, scope="task-00004")
    assert task.rank_error(1) == tmp_path / ".gen" / "runs" / "task-00004" / "ranks" / "rank-00001.error.json"
    assert not out.is_done(SHARD)


def test_write_atomic_and_json(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b.json"
    write_json(target, {"x": 1, "y": [1, 2]})
    assert json.loads(target.read_text()) == {"x": 1, "y": [1, 2]}
    write_atomic(target, b"replaced")
    assert target.read_bytes() == b"replaced"
    assert sorted(p.name for p in target.parent.iterdir()) == ["b.json"]


def test_finished_sample_ids(tmp_path: Path) -> None:
    out = OutputDir(tmp_path)
    assert out.finished_sample_ids(SHARD, "now") == set()
    _part(out, "old-r0-0", (30, 0), (31, 0))
    assert out.finished_sample_ids(SHARD, "now") == {"000000030-0", "000000031-0"}
    _part(out, "old-r1-0", (32, 0), (31, 0))
    assert out.finished_sample_ids(SHARD, "now") == {"000000030-0", "000000031-0", "000000032-0"}
    assert out.finished_sample_ids(Shard(4, 33, 36), "now") == set()


def test_finished_sample_ids_leave_out_the_current_run(tmp_path: Path) -> None:
    """Ranks of one CFG group read at different times; the current run's parts never count."""
    out = OutputDir(tmp_path)
    _part(out, "old-r0-0", (30, 0))
    _part(out, "now-r1-0", (31, 0))
    assert out.finished_sample_ids(SHARD, "now") == {"000000030-0"}
    assert out.finished_sample_ids(SHARD, "later") == {"000000030-0", "000000031-0"}


def test_commit_waits_for_every_rank_then_once(tmp_path: Path) -> None:
    out = OutputDir(tmp_path)
    _part(out, "run-r0-0", (32, 0), (30, 0))
    _part(out, "run-r1-0", (31, 1), (31, 0))
    assert not out.try_commit(SHARD, "run", 2, 4)  # nobody finished
    out.mark_rank_finished(SHARD, "run", 0, {"start_wall": 150.0, "end_wall": 160.0})
    assert not out.try_commit(SHARD, "run", 2, 4)
    out.mark_rank_finished(SHARD, "other-run", 1, INFO)  # another run's marker does not count
    assert not out.try_commit(SHARD, "run", 2, 4)
    assert not out.is_done(SHARD)
    assert not out.samples(SHARD).exists()
    out.mark_rank_finished(SHARD, "run", 1, {"start_wall": 120.0, "end_wall": 180.0})
    assert out.try_commit(SHARD, "run", 2, 4)
    assert not out.try_commit(SHARD, "run", 2, 4)
    assert out.is_done(SHARD)
    assert not out.work(SHARD).exists()

    samples = pq.read_table(out.samples(SHARD))
    keys = list(
        zip(samples.column("row_index").to_pylist(), samples.column("image_index").to_pylist())
    )
    assert keys == [(30, 0), (31, 0), (31, 1), (32, 0)]
    assert samples.column("prompt").to_pylist() == ["p30", "p31", "p31", "p32"]

    steps = pq.read_table(out.steps(SHARD))
    assert steps.schema.names == STEPS_SCHEMA.names
    assert list(zip(steps.column("sample_id").to_pylist(), steps.column("step_index").to_pylist())) == [
        ("000000030-0", 0), ("000000030-0", 1), ("000000031-0", 0), ("000000031-0", 1),
        ("000000031-1", 0), ("000000031-1", 1), ("000000032-0", 0), ("000000032-0", 1),
    ]  # fmt: skip

    (marker,) = out.done_markers()
    assert marker["shard"] == 3
    assert marker["rows"] == [30, 33]
    assert marker["samples_ok"] == 4
    assert marker["samples_error"] == 0
    assert marker["steps"] == 8
    assert marker["run_id"] == "run"
    assert marker["start_wall"] == 120.0
    assert marker["end_wall"] == 180.0


def test_commit_counts_errors(tmp_path: Path) -> None:
    out = OutputDir(tmp_path)
    _part(out, "a", (30, 0), (32, 0))
    out.write_part(SHARD, "b", _samples((31, 0), status="error"), _steps())
    out.mark_rank_finished(SHARD, "run", 0, {"start_wall": None, "end_wall": None})
    assert out.try_commit(SHARD, "run", 1, 3)
    (marker,) = out.done_markers()
    assert (marker["samples_ok"], marker["samples_error"], marker["steps"]) == (2, 1, 4)
    assert marker["start_wall"] is None and marker["end_wall"] is None


def test_duplicate_sample_kept_once(tmp_path: Path) -> None:
    out = OutputDir(tmp_path)
    out.write_part(SHARD, "a", _samples((30, 0), (31, 0)), _steps())
    out.write_part(SHARD, "b", _samples((31, 0), (32, 0)), _steps())
    out.mark_rank_finished(SHARD, "run", 0, INFO)
    assert out.try_commit(SHARD, "run", 1, 3)
    ids = pq.read_table(out.samples(SHARD)).column("sample_id").to_pylist()
    assert ids == ["000000030-0", "000000031-0", "000000032-0"]


def test_duplicate_sample_steps_kept_once(tmp_path: Path) -> None:
    """A sample flushed in two parts (e.g. a re-run after a crash between the steps part and
    the samples part): the steps file holds one row per sample per step, like the samples."""
    out = OutputDir(tmp_path)
    _part(out, "a", (30, 0), (31, 0))
    _part(out, "b", (31, 0), (32, 0))
    out.mark_rank_finished(SHARD, "run", 0, INFO)
    assert out.try_commit(SHARD, "run", 1, 3)
    steps = pq.read_table(out.steps(SHARD))
    keys = list(zip(steps.column("sample_id").to_pylist(), steps.column("step_index").to_pylist()))
    assert len(keys) == len(set(keys)) == 6
    assert out.done_markers()[0]["steps"] == 6


def test_orphan_steps_part_not_duplicated(tmp_path: Path) -> None:
    """A crash after a part's steps file but before its samples file, then a re-run."""
    out = OutputDir(tmp_path)
    _part(out, "run1-a", (30, 0))
    work = out.work(SHARD)
    pq.write_table(_steps((31, 0)), work / "part-run1-b.steps.parquet")  # samples never written
    assert out.finished_sample_ids(SHARD, "run2") == {"000000030-0"}
    _part(out, "run2-a", (31, 0))
    out.mark_rank_finished(SHARD, "run2", 0, INFO)
    assert out.try_commit(SHARD, "run2", 1, 2)
    steps = pq.read_table(out.steps(SHARD))
    assert steps.column("sample_id").to_pylist() == ["000000030-0"] * 2 + ["000000031-0"] * 2


def test_steps_of_unknown_samples_dropped(tmp_path: Path) -> None:
    out = OutputDir(tmp_path)
    out.write_part(SHARD, "a", _samples((30, 0)), _steps((30, 0), (99, 0)))
    out.mark_rank_finished(SHARD, "run", 0, INFO)
    assert out.try_commit(SHARD, "run", 1, 1)
    assert set(pq.read_table(out.steps(SHARD)).column("sample_id").to_pylist()) == {"000000030-0"}


def test_wrong_count_raises_without_done_marker(tmp_path: Path) -> None:
    out = OutputDir(tmp_path)
    _part(out, "a", (30, 0), (31, 0))
    out.mark_rank_finished(SHARD, "run", 0, INFO)
    with pytest.raises(RuntimeError) as info:
        out.try_commit(SHARD, "run", 1, 3)
    assert "shard-00003" in str(info.value)
    assert "2" in str(info.value) and "3" in str(info.value)
    assert not out.is_done(SHARD)
    assert not out.done(SHARD).exists()
    assert not out.samples(SHARD).exists()
    assert out.finished_sample_ids(SHARD, "run2") == {"000000030-0", "000000031-0"}  # parts kept


def test_rerun_after_failed_commit_commits(tmp_path: Path) -> None:
    """After a failed commit, a re-run that completes the shard must be able to commit it."""
    out = OutputDir(tmp_path)
    _part(out, "run1-a", (30, 0), (31, 0))
    out.mark_rank_finished(SHARD, "run1", 0, INFO)
    with pytest.raises(RuntimeError):
        out.try_commit(SHARD, "run1", 1, 3)
    _part(out, "run2-a", (32, 0))
    out.mark_rank_finished(SHARD, "run2", 0, INFO)
    assert out.try_commit(SHARD, "run2", 1, 3)
    assert out.is_done(SHARD)
    assert pq.read_table(out.samples(SHARD)).num_rows == 3


def test_reopen_errors_of_a_done_shard_keeps_ok_samples(tmp_path: Path) -> None:
    out = OutputDir(tmp_path)
    _part(out, "run-p1", (30, 0), (32, 0))
    _part(out, "run-p2", (31, 0), status="error")
    out.mark_rank_finished(SHARD, "run", 0, INFO)
    assert out.try_commit(SHARD, "run", 1, 3)
    ok_bytes = pq.read_table(out.samples(SHARD)).filter(pa.compute.equal(
        pa.compute.field("status"), "ok")).to_pylist()  # fmt: skip
    assert out.reopen_errors(SHARD, "retry1") == 1
    assert not out.is_done(SHARD)
    assert out.finished_sample_ids(SHARD, "run2") == {"000000030-0", "000000032-0"}
    # The next run writes the retried sample; the commit holds each sample once, ok ones as before.
    _part(out, "run2-p1", (31, 0))
    out.mark_rank_finished(SHARD, "run2", 0, INFO)
    assert out.try_commit(SHARD, "run2", 1, 3)
    merged = pq.read_table(out.samples(SHARD)).to_pylist()
    assert [(s["sample_id"], s["status"]) for s in merged] == [
        ("000000030-0", "ok"), ("000000031-0", "ok"), ("000000032-0", "ok")]
    assert [s for s in merged if s["sample_id"] != "000000031-0"] == ok_bytes
    assert pq.read_table(out.steps(SHARD)).num_rows == 3 * 2
    assert json.loads(out.done(SHARD).read_text())["samples_error"] == 0


def test_reopen_errors_of_a_clean_done_shard_is_a_no_op(tmp_path: Path) -> None:
    out = OutputDir(tmp_path)
    _part(out, "run-p1", (30, 0), (31, 0), (32, 0))
    out.mark_rank_finished(SHARD, "run", 0, INFO)
    assert out.try_commit(SHARD, "run", 1, 3)
    before = out.done(SHARD).read_bytes()
    assert out.reopen_errors(SHARD, "retry1") == 0
    assert out.done(SHARD).read_bytes() == before


def test_reopen_errors_of_an_unfinished_shard_drops_error_rows_from_parts(tmp_path: Path) -> None:
    out = OutputDir(tmp_path)
    _part(out, "run-p1", (30, 0), (31, 0))
    _part(out, "run-p2", (32, 0), status="error")
    assert out.reopen_errors(SHARD, "retry1") == 1
    assert out.finished_sample_ids(SHARD, "run2") == {"000000030-0", "000000031-0"}


def test_stale_commit_lock_is_cleared(tmp_path: Path) -> None:
    out = OutputDir(tmp_path)
    _part(out, "run-p1", (30, 0), (31, 0), (32, 0))
    (out.work(SHARD) / "commit.lock").write_text("")  # a run killed while committing
    out.mark_rank_finished(SHARD, "run2", 0, INFO)
    assert not out.try_commit(SHARD, "run2", 1, 3)
    assert out.clear_stale_commit(SHARD)
    assert out.try_commit(SHARD, "run2", 1, 3)
