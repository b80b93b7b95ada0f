"""The output directory: atomic files, per-rank parts, shard commit, done markers.

    OUT/job.json  OUT/summary.json
    OUT/samples/shard-00000.parquet  OUT/steps/shard-00000.parquet  OUT/done/shard-00000.json
    OUT/.gen/shards/shard-00000/     parts written by ranks while the shard is in flight
    OUT/.gen/runs/SCOPE/progress/  OUT/.gen/runs/SCOPE/ranks/   live progress, per-rank stats
                                     and errors of the last run of each scope: "local" for a run
                                     on this node, "task-NNNNN" for a SLURM array task

Each rank flushes the samples it writes as part files; when every rank of the run has marked
its share of a shard finished, one of them (an O_EXCL lock decides) merges the parts into the shard
files, writes the done marker last, and removes the parts. A re-run skips shards with a done
marker and samples already in parts.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs.faults import with_path
from jobs.output.failpoints import failpoint
from jobs.output.schema import STEPS_SCHEMA
from jobs.plan import Shard


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename.

    Raises:
        OSError: the write failed (e.g. ENOSPC), with ``path`` as its filename; the temporary
            file is removed and ``path`` is as it was.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):  # (a read-only file system refuses even this)
            tmp.unlink()
        raise with_path(exc, path) from None


def write_json(path: Path, obj: Any) -> None:
    """Atomic JSON write (indented, keys in insertion order)."""
    write_atomic(path, (json.dumps(obj, indent=2) + "\n").encode())


def write_parquet(path: Path, table: pa.Table) -> None:
    """Atomic parquet write (failpoint ``write-parquet`` before the rename).

    Raises:
        OSError: as write_atomic.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        pq.write_table(table, tmp)
        failpoint("write-parquet", path)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):  # (a read-only file system refuses even this)
            tmp.unlink()
        raise with_path(exc, path) from None


class OutputDir:
    """Paths and protocols of one job's output directory."""

    def __init__(self, root: str | os.PathLike[str], scope: str = "local") -> None:
        self.root = Path(root)
        self.scope = scope
        """Whose per-run files progress / rank_stats / rank_error name: "local" or "task-NNNNN"."""

    @property
    def runs(self) -> Path:
        """OUT/.gen/runs: one directory per scope."""
        return self.root / ".gen" / "runs"

    @property
    def run_dir(self) -> Path:
        """OUT/.gen/runs/SCOPE."""
        return self.runs / self.scope

    @property
    def job_json(self) -> Path:
        return self.root / "job.json"

    @property
    def summary_json(self) -> Path:
        return self.root / "summary.json"

    def samples(self, shard: Shard) -> Path:
        return self.root / "samples" / f"{shard.name}.parquet"

    def steps(self, shard: Shard) -> Path:
        return self.root / "steps" / f"{shard.name}.parquet"

    def done(self, shard: Shard) -> Path:
        return self.root / "done" / f"{shard.name}.json"

    def work(self, shard: Shard) -> Path:
        return self.root / ".gen" / "shards" / shard.name

    def progress(self, rank: int) -> Path:
        return self.run_dir / "progress" / f"rank-{rank:05d}.json"

    def rank_stats(self, rank: int) -> Path:
        return self.run_dir / "ranks" / f"rank-{rank:05d}.json"

    def rank_error(self, rank: int) -> Path:
        return self.run_dir / "ranks" / f"rank-{rank:05d}.error.json"

    def is_done(self, shard: Shard) -> bool:
        return self.done(shard).exists()

    def run_records(self, pattern: str = "rank-[0-9]*[0-9].json") -> list[dict[str, Any]]:
        """JSON files under OUT/.gen/runs/*/ranks/ matching ``pattern``, over every scope
        (default: per-rank stats; ``"rank-*.error.json"``: rank errors). Unreadable files (being
        replaced right now) are left out."""
        records = []
        for path in sorted(self.runs.glob(f"*/ranks/{pattern}")):
            try:
                records.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue
        return records

    def done_marker(self, shard_name: str) -> dict[str, Any] | None:
        """The done marker of shard ``shard_name`` ("shard-00003"), or None while unfinished."""
        try:
            return json.loads((self.root / "done" / f"{shard_name}.json").read_text())
        except FileNotFoundError:
            return None

    def in_flight_parts(self) -> list[Path]:
        """Samples parts of shards not yet committed (OUT/.gen/shards/*/part-*.samples.parquet);
        parts that a run killed just after a commit left beside a done marker are left out."""
        parts = sorted(self.root.glob(".gen/shards/*/part-*.samples.parquet"))
        return [p for p in parts if not (self.root / "done" / f"{p.parent.name}.json").exists()]

    def done_markers(self) -> list[dict[str, Any]]:
        """Contents of every done marker, in shard order."""
        return [json.loads(p.read_text()) for p in sorted((self.root / "done").glob("shard-*.json"))]

    # -- parts ---------------------------------------------------------------------------

    def write_part(self, shard: Shard, tag: str, samples: pa.Table, steps: pa.Table) -> None:
        """Flush finished samples of a shard. Steps first: a samples part defines the part."""
        work = self.work(shard)
        write_parquet(work / f"part-{tag}.steps.parquet", steps)
        write_parquet(work / f"part-{tag}.samples.parquet", samples)
        failpoint("part")

    def finished_sample_ids(self, shard: Shard, run_id: str) -> set[str]:
        """Sample ids flushed in parts of this shard by earlier runs.

        Parts of the current run (tags start with ``run_id``) are left out, so every rank of a
        CFG group, reading at slightly different times, sees the same set.
        """
        ids: set[str] = set()
        for p in sorted(self.work(shard).glob("part-*.samples.parquet")):
            if p.name.startswith(f"part-{run_id}-"):
                continue
            ids.update(pq.read_table(p, columns=["sample_id"]).column("sample_id").to_pylist())
        return ids

    def mark_rank_finished(self, shard: Shard, run_id: str, rank: int, info: dict[str, Any]) -> None:
        """Record that one rank of this run has flushed all of its share of the shard."""
        write_json(self.work(shard) / f"finished-{run_id}-r{rank:05d}.json", info)

    def try_commit(self, shard: Shard, run_id: str, world_size: int, expected_samples: int) -> bool:
        """Merge a shard's parts into its final files if every rank of the run has finished it.

        Exactly one caller commits (O_EXCL lock). The merged samples are checked to hold each
        of the shard's samples exactly once before the done marker is written (last).

        Returns:
            True if this call committed the shard.
        Raises:
            RuntimeError: the parts do not hold exactly the expected samples.
        """
        work = self.work(shard)
        markers = [work / f"finished-{run_id}-r{r:05d}.json" for r in range(world_size)]
        if self.is_done(shard) or not all(m.exists() for m in markers):
            return False
        try:
            fd = os.open(work / "commit.lock", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        os.close(fd)
        try:
            self._commit(shard, run_id, markers, expected_samples)
        except BaseException:
            (work / "commit.lock").unlink(missing_ok=True)  # let a later run commit
            raise
        failpoint("commit-done")
        shutil.rmtree(work, ignore_errors=True)
        return True

    def clear_stale_commit(self, shard: Shard) -> bool:
        """Remove a commit lock left by a run killed mid-commit. Only for the holder of the
        shard's write lock (jobs.output.lock), before its ranks start: no commit can be under way.

        Returns:
            True if there was one.
        """
        lock = self.work(shard) / "commit.lock"
        found = lock.exists()
        lock.unlink(missing_ok=True)
        return found

    def reopen_errors(self, shard: Shard, tag: str) -> int:
        """Make a shard's error samples unfinished, so that the next run generates them again
        (``--retry-errors``); its ok samples are kept as they are.

        A done shard's ok samples (and their steps) move into a part, then its done marker is
        removed; the shard files stay until the next commit replaces them. Parts of an
        unfinished shard are rewritten without their error rows. Each step is atomic, and a
        crash between them leaves a state that the same call, or a plain re-run, completes.
        Only for the holder of the shard's write lock (jobs.output.lock).

        Args:
            shard: the shard.
            tag: names the part that holds a done shard's ok samples (not a run id).
        Returns:
            Error samples reopened.
        """
        reopened = 0
        if self.is_done(shard):
            samples = pq.read_table(self.samples(shard))
            errors = pc.equal(samples.column("status"), "error")
            reopened = pc.sum(errors).as_py() or 0
            if not reopened:
                return 0
            ok = samples.filter(pc.invert(errors))
            shutil.rmtree(self.work(shard), ignore_errors=True)  # a committed shard's leftovers
            steps = pq.read_table(self.steps(shard))
            steps = steps.filter(pc.is_in(steps.column("sample_id"), value_set=ok.column("sample_id")))
            self.write_part(shard, tag, ok, steps)
            self.done(shard).unlink()
            return reopened
        for path in sorted(self.work(shard).glob("part-*.samples.parquet")):
            table = pq.read_table(path)
            errors = pc.equal(table.column("status"), "error")
            count = pc.sum(errors).as_py() or 0
            if count:
                write_parquet(path, table.filter(pc.invert(errors)))
                reopened += count
        return reopened

    def _commit(self, shard: Shard, run_id: str, markers: list[Path], expected_samples: int) -> None:
        """Merge the parts into the shard files and write the done marker (last)."""
        work = self.work(shard)
        infos = [json.loads(m.read_text()) for m in markers]
        samples = _merge(sorted(work.glob("part-*.samples.parquet")), ["sample_id"], None)
        samples = samples.sort_by([("row_index", "ascending"), ("image_index", "ascending")])
        if samples.num_rows != expected_samples:
            raise RuntimeError(
                f"{shard.name}: parts hold {samples.num_rows} samples, expected {expected_samples}"
            )
        ids = samples.column("sample_id")
        step_parts = [
            p for p in sorted(work.glob("part-*.steps.parquet"))
            if p.with_name(p.name.replace(".steps.", ".samples.")).exists()
        ]  # a steps part without its samples part is left from a crash: its samples re-ran
        steps = _merge(step_parts, ["sample_id", "step_index"], STEPS_SCHEMA)
        steps = steps.filter(pc.is_in(steps.column("sample_id"), value_set=ids))
        order = {sid: i for i, sid in enumerate(ids.to_pylist())}
        sample_order = [order[sid] for sid in steps.column("sample_id").to_pylist()]
        steps = (
            steps.append_column("_order", pa.array(sample_order, type=pa.int64()))
            .sort_by([("_order", "ascending"), ("step_index", "ascending")])
            .drop_columns(["_order"])
        )
        write_parquet(self.samples(shard), samples)
        failpoint("commit-samples")
        write_parquet(self.steps(shard), steps)
        status = samples.column("status").to_pylist()
        write_json(
            self.done(shard),
            {
                "shard": shard.index,
                "rows": [shard.start, shard.stop],
                "samples_ok": status.count("ok"),
                "samples_error": status.count("error"),
                **{
                    col: pc.sum(samples.column(col)).as_py() or 0
                    for col in ("fresh_uncond", "reused_uncond", "invalidations")
                    if col in samples.schema.names
                },
                "branches": _branch_totals(samples),
                "samples_warning": (samples.num_rows - samples.column("warning").null_count
                                    if "warning" in samples.schema.names else 0),
                "steps": steps.num_rows,
                "run_id": run_id,
                "start_wall": min((i["start_wall"] for i in infos if i["start_wall"]), default=None),
                "end_wall": max((i["end_wall"] for i in infos if i["end_wall"]), default=None),
                "committed_at": time.time(),
            },
        )


def _branch_totals(samples: pa.Table) -> dict[str, dict[str, int]]:
    """Fresh and reused predictions per auxiliary branch over ``samples``' branch_counts
    (e.g. {"uncond": {"fresh": 4, "reused": 4}}); {} for a table without that column."""
    totals: dict[str, dict[str, int]] = {}
    if "branch_counts" not in samples.schema.names:
        return totals
    for counts in samples.column("branch_counts").to_pylist():
        for c in counts or ():
            t = totals.setdefault(c["name"], {"fresh": 0, "reused": 0})
            t["fresh"] += c["fresh"]
            t["reused"] += c["reused"]
    return totals


def _merge(paths: Iterable[Path], key: list[str], schema: pa.Schema | None) -> pa.Table:
    """Concatenate part files and keep the first row of each ``key`` (a sample or a step that
    a re-run produced again after a crash between part writes). No parts: an empty table of
    ``schema`` (None: there must be parts)."""
    tables = [pq.read_table(p) for p in paths]
    if not tables:
        assert schema is not None, "no parts to merge"
        return schema.empty_table()
    table = pa.concat_tables(tables, promote_options="default")
    keys = list(zip(*(table.column(c).to_pylist() for c in key)))
    first = sorted({k: i for i, k in reversed(list(enumerate(keys)))}.values())
    return table.take(pa.array(first, type=pa.int64()))
