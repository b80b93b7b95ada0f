"""ShardLocks: one writer per shard, stale locks of killed runs taken over, rank ownership check."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs.errors import JobError
from jobs.output.lock import ShardLocks, check_owner, lock_path, read_holder
from jobs.plan import Shard

SHARDS = [Shard(0, 0, 4), Shard(1, 4, 8)]


def test_second_run_is_refused_with_the_holder_named(tmp_path: Path) -> None:
    with ShardLocks(tmp_path, "run-a", "local") as a:
        a.acquire(SHARDS)
        holder = read_holder(lock_path(tmp_path, "shard-00001"))
        assert holder is not None and holder["run_id"] == "run-a" and holder["pid"] == os.getpid()
        b = ShardLocks(tmp_path, "run-b", "local")
        with pytest.raises(JobError, match=r"2 shard\(s\) are being written by another run: "
                                           r"shard-00000 \(run run-a, pid \d+ on "):  # fmt: skip
            b.acquire(SHARDS)
        assert b.fds == []  # all or nothing
        b.acquire([Shard(2, 8, 12)])  # another shard is free
        b.release()
    assert not lock_path(tmp_path, "shard-00000").exists()  # released: files removed
    with ShardLocks(tmp_path, "run-c", "local") as c:
        c.acquire(SHARDS)
        assert c.stale == []


def test_partial_conflict_releases_what_it_took(tmp_path: Path) -> None:
    with ShardLocks(tmp_path, "run-a", "local") as a:
        a.acquire(SHARDS[1:])
        b = ShardLocks(tmp_path, "run-b", "local")
        with pytest.raises(JobError, match="shard-00001"):
            b.acquire(SHARDS)
        assert b.fds == []
        assert read_holder(lock_path(tmp_path, "shard-00000")) is None


_HOLD = """
import sys, time
from pathlib import Path
from jobs.output.lock import ShardLocks
from jobs.plan import Shard
locks = ShardLocks(Path(sys.argv[1]), "run-killed", "local")
locks.acquire([Shard(0, 0, 4), Shard(1, 4, 8)])
print("held", flush=True)
time.sleep(600)
"""


def test_lock_of_a_killed_run_is_taken_over(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path)], stdout=subprocess.PIPE,
                            text=True, cwd=Path(__file__).resolve().parents[2])  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(JobError, match="run-killed"):
            ShardLocks(tmp_path, "run-b", "local").acquire(SHARDS)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # The kernel dropped the dead run's locks; its files (and holder info) remain.
    assert read_holder(lock_path(tmp_path, "shard-00000"))["run_id"] == "run-killed"
    with ShardLocks(tmp_path, "run-b", "local") as b:
        b.acquire(SHARDS)
        assert [s.shard for s in b.stale] == ["shard-00000", "shard-00001"]
        assert b.stale[0].holder["pid"] == proc.pid
        assert f"took over the stale lock of run run-killed (pid {proc.pid}" in b.stale[0].describe()
        assert read_holder(lock_path(tmp_path, "shard-00000"))["run_id"] == "run-b"


def test_lock_is_held_while_a_child_holding_the_descriptor_lives(tmp_path: Path) -> None:
    """The launcher passes the descriptors to torchrun: the lock lives as long as either."""
    locks = ShardLocks(tmp_path, "run-a", "local")
    locks.acquire(SHARDS[:1])
    child = subprocess.Popen(["sleep", "60"], pass_fds=locks.fds)
    try:
        for fd in locks.fds:  # the launcher dies without releasing (no unlink)
            os.close(fd)
        with pytest.raises(JobError, match="run-a"):
            ShardLocks(tmp_path, "run-b", "local").acquire(SHARDS[:1])
    finally:
        child.kill()
        child.wait()
    with ShardLocks(tmp_path, "run-b", "local") as b:
        b.acquire(SHARDS[:1])
        assert len(b.stale) == 1


def test_check_owner(tmp_path: Path) -> None:
    check_owner(tmp_path, "shard-00000", "run-a")  # no lock file: a run without locks
    with ShardLocks(tmp_path, "run-a", "local") as a:
        a.acquire(SHARDS[:1])
        check_owner(tmp_path, "shard-00000", "run-a")
        with pytest.raises(JobError, match="run run-a .* has taken this shard over; run run-z stops"):
            check_owner(tmp_path, "shard-00000", "run-z")


def test_acquire_existing_probes_every_lock_file(tmp_path: Path) -> None:
    path = lock_path(tmp_path, "shard-00007")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"run_id": "old", "pid": 1, "host": "h", "since": time.time()}))
    with ShardLocks(tmp_path, "probe", "overwrite") as probe:
        probe.acquire_existing()
        assert [s.shard for s in probe.stale] == ["shard-00007"]


def test_run_shards_waits_lock_wait_s_for_a_previous_attempt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A requeued SLURM attempt may start while the previous one still exits and holds its locks."""
    import jobs.local.launch as launch
    from jobs.output.store import OutputDir, write_json

    out = OutputDir(tmp_path, "task-00000")
    write_json(out.job_json, {"manifest": {"num_rows": 8}, "config": {"shard_size": 4}})
    ran: list[list[int] | None] = []
    monkeypatch.setattr(launch, "_run_ranks", lambda *a, **k: ran.append(k["shard_indices"]))
    brief = _HOLD.replace("time.sleep(600)", "time.sleep(3)")
    proc = subprocess.Popen([sys.executable, "-c", brief, str(tmp_path)], stdout=subprocess.PIPE,
                            text=True, cwd=Path(__file__).resolve().parents[2])  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(JobError, match="run-killed"):
            launch.run_shards(out, "attempt-0", gpus=1, threads=1, shard_indices=[0])
        start = time.monotonic()
        launch.run_shards(out, "attempt-1", gpus=1, threads=1, shard_indices=[0], lock_wait_s=60)
        assert time.monotonic() - start < 30
    finally:
        proc.kill()
        proc.wait()
    assert ran == [[0]]  # ranks ran once, after the holder let go
