"""One writer per shard: a run holds an exclusive lock on each shard it may write.

    OUT/.gen/locks/shard-00000.lock    flock(2)ed by the run that writes shard 0; JSON holder info

The lock is an advisory ``flock`` on the file, so the kernel releases it when the last process
holding the open file dies: a run killed with SIGKILL leaves no live lock behind, only the file
with its holder's info. A later run that finds the file but gets the lock has found a stale
lock; it takes it over and says whose it was. A run that cannot get the lock is refused with
the holder's pid, host and run id. The launcher takes the locks before any rank starts and
passes the descriptors to torchrun, so the lock lives as long as any process of the run does.

Ranks do not lock: before each flush they check that the lock file still names their run
(``check_owner``), so a straggler of a run whose lock was taken over stops instead of writing.

Locks on network file systems: flock is emulated with POSIX locks on NFS (Linux >= 2.6.12, with
lockd), and Lustre needs the ``flock`` mount option.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.errors import JobError
from jobs.plan import Shard


@dataclass(frozen=True)
class StaleLock:
    """A lock file left by a run that no longer exists (taken over)."""

    shard: str
    holder: dict[str, Any]
    """The dead holder's info: run_id, pid, host, scope, since."""

    def describe(self) -> str:
        h = self.holder
        return (f"{self.shard}: took over the stale lock of run {h.get('run_id')} (pid {h.get('pid')} "
                f"on {h.get('host')}, which no longer holds it)")  # fmt: skip


def lock_path(root: Path, shard_name: str) -> Path:
    """OUT/.gen/locks/shard-NNNNN.lock."""
    return root / ".gen" / "locks" / f"{shard_name}.lock"


def read_holder(path: Path) -> dict[str, Any] | None:
    """The holder info in a lock file, or None (no file, or being written)."""
    try:
        return json.loads(path.read_text() or "null")
    except (OSError, ValueError):
        return None


class ShardLocks:
    """The exclusive write locks of one run over a set of shards.

    Args:
        root: the job's output directory.
        run_id: the run that holds them.
        scope: "local" or the SLURM task's "task-NNNNN" (recorded for the error messages).
    """

    def __init__(self, root: Path, run_id: str, scope: str) -> None:
        self.root = Path(root)
        self.run_id = run_id
        self.scope = scope
        self._held: dict[str, int] = {}
        self.stale: list[StaleLock] = []
        """Stale locks taken over by ``acquire``."""

    @property
    def fds(self) -> list[int]:
        """Descriptors of the held locks (for ``subprocess``'s pass_fds)."""
        return list(self._held.values())

    def acquire(self, shards: Iterable[Shard], wait_s: float = 0.0) -> None:
        """Lock every shard, or none.

        Args:
            shards: the shards.
            wait_s: keep trying this long (seconds) while another run holds some of them: a
                requeued SLURM task whose previous attempt is still exiting.
        Raises:
            JobError: another live run holds some of them; the message names them and the
                holder (pid, host, run, scope, since when).
        """
        names = [s.name for s in shards]
        deadline = time.monotonic() + wait_s
        while True:
            try:
                return self.acquire_names(names)
            except JobError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(1.0)

    def acquire_existing(self) -> None:
        """Lock every shard that has a lock file (before replacing the whole job).

        Raises:
            JobError: as ``acquire``.
        """
        self.acquire_names(p.stem for p in sorted(lock_path(self.root, "x").parent.glob("*.lock")))

    def acquire_names(self, names: Iterable[str]) -> None:
        """``acquire`` by shard file stem ("shard-00042")."""
        busy: list[str] = []
        for name in names:
            if name in self._held:
                continue
            holder = self._try_lock(name)
            if holder is not None:
                busy.append(f"{name} (run {holder.get('run_id')}, pid {holder.get('pid')} on "
                            f"{holder.get('host')}, {holder.get('scope')}, since "
                            f"{_clock(holder.get('since'))})")  # fmt: skip
        if busy:
            self.release()
            more = f" and {len(busy) - 3} more" if len(busy) > 3 else ""
            raise JobError(
                f"--out {self.root}: {len(busy)} shard(s) are being written by another run: "
                f"{'; '.join(busy[:3])}{more}. One writer per shard: wait for that run "
                f"(`gen status {self.root}`) or stop it, then re-run to resume"
            )

    def _try_lock(self, name: str) -> dict[str, Any] | None:
        """Take the lock of shard ``name``; None on success, else the live holder's info."""
        path = lock_path(self.root, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return read_holder(path) or {}
            try:  # the file may have been released and unlinked since we opened it
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            previous = read_holder(path)
            if previous:
                self.stale.append(StaleLock(name, previous))
            info = {"run_id": self.run_id, "pid": os.getpid(), "host": socket.gethostname(),
                    "scope": self.scope, "since": time.time()}  # fmt: skip
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
            os.set_inheritable(fd, True)
            self._held[name] = fd
            return None

    def sweep(self, names: Iterable[str], cleanup: Callable[[str], None]) -> None:
        """For each shard of ``names`` (done shards) that has a lock file no live run holds:
        call ``cleanup(name)`` under its lock, then remove the file. Locks held by a live run
        are left alone."""
        for name in names:
            path = lock_path(self.root, name)
            if name in self._held or not path.exists():
                continue
            try:
                fd = os.open(path, os.O_RDWR)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if os.fstat(fd).st_ino == os.stat(path).st_ino:
                    cleanup(name)
                    path.unlink()
            except (BlockingIOError, FileNotFoundError):
                pass
            finally:
                os.close(fd)

    def release(self) -> None:
        """Remove the lock files and release the locks (unlink first, so a run that opened the
        file meanwhile sees another inode and retries)."""
        for name, fd in self._held.items():
            lock_path(self.root, name).unlink(missing_ok=True)
            os.close(fd)
        self._held.clear()

    def __enter__(self) -> ShardLocks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def live_holders(root: Path, names: Iterable[str]) -> list[dict[str, Any]]:
    """Holders of the locks that a live run holds on shards ``names`` ("shard-00042"), each
    with its ``shard``; for a dry run, which must write nothing.

    Probes each lock file with a non-blocking shared flock on a read-only descriptor, released
    at once: a lock left by a killed run (free) is not reported.
    """
    live = []
    for name in names:
        path = lock_path(root, name)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            live.append({"shard": name, **(read_holder(path) or {})})
        finally:
            os.close(fd)  # closing releases a lock we got
    return live


def check_owner(root: Path, shard_name: str, run_id: str) -> None:
    """Raise unless shard ``shard_name``'s lock names ``run_id`` (called by ranks before a flush).

    A run started without locks (no lock file) passes: tests and tools that call ranks directly.

    Raises:
        JobError: another run has taken the shard over.
    """
    holder = read_holder(lock_path(root, shard_name))
    if holder and holder.get("run_id") != run_id:
        raise JobError(f"{shard_name}: run {holder.get('run_id')} (pid {holder.get('pid')}) has "
                       f"taken this shard over; run {run_id} stops writing it")  # fmt: skip


def _clock(wall: float | None) -> str:
    return "?" if not wall else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(wall))
