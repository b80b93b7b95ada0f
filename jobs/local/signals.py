"""Stopping a run on purpose: SIGINT (Ctrl-C), SIGTERM, and SLURM's SIGUSR2.

The first signal asks every rank to stop at its next micro-batch boundary: what it finished is
flushed (part files, as always), a shard every rank finished is committed, and the run ends
with one line (``stop_line``) and exit status 128 + the signal (130 for SIGINT, 143 for
SIGTERM). A second SIGINT stops at once; a repeated SIGTERM or SIGUSR2 changes nothing (SLURM
delivers them to every process of a step, sometimes twice). Either way nothing is lost that a
``kill -9`` would not keep: a re-run resumes at the first unfinished sample.

Who hears what:

- the launcher (the `gen` process, or a SLURM task's process) holds a ``StopRequest`` that owns
  the handlers. The first signal writes OUT/.gen/runs/SCOPE/stop, which ranks under torchrun
  read at each micro-batch boundary (they run in sessions of their own and do not get the
  terminal's signals). A rank in the launcher's process reads the request itself.
- torchrun ignores SIGINT, SIGTERM and SIGUSR2 (``quiet_torchrun``): it stays to collect its
  ranks, and the launcher SIGKILLs it for a second Ctrl-C or when the ranks are not done within
  --collective-timeout seconds of the first signal (its ranks die with it).
- a rank under torchrun handles RANK_SIGNALS itself (SLURM signals every process of a step):
  the first -> stop at the boundary; a second SIGINT -> exit at once. It never writes the file.

The ranks of a CFG group run each micro-batch together, so they decide to stop together
(``stop_at_boundary``: one small exchange per micro-batch); dp groups stop independently.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from jobs.errors import Interrupted

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
"""What stops a local run."""
RANK_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)
"""What a rank under torchrun handles (SLURM's preemption signal included)."""
TORCHRUN_SIGNALS = "SIGHUP,SIGQUIT"
"""The signals torchrun still turns into SignalException (its default adds SIGTERM, SIGINT)."""
INTERRUPTED_EXITS = tuple(128 + s for s in RANK_SIGNALS)
"""Exit statuses of a rank that stopped early on a signal (130, 143, 140)."""


class StopNow(BaseException):
    """Raised in the launcher's process by a second SIGINT: stop at once. A BaseException, so
    that no per-sample ``except Exception`` turns it into an error row."""


class StopRequest:
    """Whether this process was asked to stop, and by which signal.

    Inert until ``handling`` installs its handlers (or ``request`` is called): a run that
    nobody signals never stops early.

    Args:
        stop_file: a file whose existence also means "stop" (the launcher's, read by ranks under
            torchrun; holds the signal number); None: only this process's signals count.
    """

    def __init__(self, stop_file: Path | None = None) -> None:
        self.stop_file = stop_file
        self.signum: int | None = None
        """The first signal received (or read from the stop file); None: not asked to stop."""
        self.stopped = False
        """A worker loop stopped early because of this request (set by stop_at_boundary)."""
        self.at_once: Callable[[], None] = raise_stop_now
        """What a second SIGINT does: by default raise StopNow here."""
        self.grace_s: float = 300.0
        """Seconds after the first signal by which the ranks must have ended (the job's
        --collective-timeout): then they are killed."""
        self.then = "re-run the same command to resume"
        """The end of the interrupted line: what the user does next."""
        self.killed = False
        """The ranks were killed: a second Ctrl-C, or still running at ``deadline``."""
        self._writes = False
        self._since: float | None = None
        self._scope: tuple[Path, Sequence[Any]] | None = None
        self._previous: dict[int, Any] = {}
        self._ended = threading.Event()

    @property
    def requested(self) -> bool:
        """A stop was asked for: by a signal to this process, or by the stop file."""
        if self.signum is None and self.stop_file is not None and not self._writes:
            try:
                self.request(int(self.stop_file.read_text() or signal.SIGTERM))
            except (OSError, ValueError):
                pass
        return self.signum is not None

    @property
    def deadline(self) -> float | None:
        """time.monotonic() by which the ranks must have ended; None before a request."""
        return None if self._since is None else self._since + self.grace_s

    @property
    def exit_code(self) -> int:
        """128 + the signal: 130 for SIGINT, 143 for SIGTERM, 140 for SIGUSR2."""
        assert self.signum is not None
        return 128 + self.signum

    @property
    def name(self) -> str:
        """The signal's name, e.g. "SIGINT"."""
        assert self.signum is not None
        return signal.Signals(self.signum).name

    def request(self, signum: int) -> None:
        """Record the first stop request (later ones keep the first signal)."""
        if self.signum is None:
            self.signum, self._since = signum, time.monotonic()

    def previous_handler(self, signum: int) -> Any:
        """The handler ``handling`` replaced for ``signum`` (e.g. submitit's), or None."""
        return self._previous.get(signum)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            if signum == signal.SIGINT:  # a second Ctrl-C
                self.at_once()
            return
        self.request(signum)
        if self._writes and self.stop_file is not None:
            _write_stop_file(self.stop_file, signum)

    @contextlib.contextmanager
    def handling(self, signals: Sequence[int] = STOP_SIGNALS) -> Iterator[StopRequest]:
        """Install this request's handlers for ``signals`` (main thread only) and restore the
        previous ones on exit."""
        for s in signals:
            self._previous[s] = signal.signal(s, self._handle)
        try:
            yield self
        finally:
            for s, previous in self._previous.items():
                signal.signal(s, previous if previous is not None else signal.SIG_DFL)
            self._ended.set()

    def watch(self, stop_file: Path) -> None:
        """From now on, tell ranks through ``stop_file`` (a stale one from an earlier run is
        removed; a stop already asked for is written at once)."""
        stop_file.unlink(missing_ok=True)
        self.stop_file, self._writes = stop_file, True
        if self.signum is not None:
            _write_stop_file(stop_file, self.signum)

    def counts(self, out_root: Path, shards: Sequence[Any], *, in_process: bool) -> None:
        """Set what the interrupted line counts: ``shards`` of the job in ``out_root``.

        ``in_process``: the rank runs in this process, where a rank stuck in a C call cannot
        run Python handlers: a thread then ends the process (the line, exit 128 + the signal)
        if it is still running ``grace_s`` seconds after the first signal.
        """
        self._scope = (out_root, shards)
        if in_process:
            threading.Thread(target=self._watchdog, name="gen-stop-watchdog", daemon=True).start()

    def line(self) -> str:
        """``interrupted: 7/10 shards done, 12 samples flushed in 2 unfinished shards; re-run
        the same command to resume`` (``then`` at the end)."""
        what = "before the run started" if self._scope is None else stop_line(*self._scope)
        if self.killed and self.deadline is not None and time.monotonic() >= self.deadline:
            what += f" (ranks still running {self.grace_s:g} s after the signal, --collective-timeout, were killed)"
        return f"interrupted: {what}; {self.then}"

    def interrupted(self) -> Interrupted | None:
        """The Interrupted to raise: None when no stop was asked for, or every shard counted
        is done anyway."""
        if not self.requested:
            return None
        if self._scope is not None:
            root, shards = self._scope
            if all((root / "done" / f"{s.name}.json").exists() for s in shards):
                return None
        return Interrupted(self.line(), self.signum)  # type: ignore[arg-type]

    def _watchdog(self) -> None:
        while self.deadline is None:
            if self._ended.wait(0.2):
                return
        if not self._ended.wait(max(0.0, self.deadline - time.monotonic())):
            self.killed = True
            print(self.line(), file=sys.stderr, flush=True)
            os._exit(self.exit_code)


def stoppable(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a launcher function ``fn(..., stop=StopRequest)``: SIGINT and SIGTERM are
    handled (STOP_SIGNALS) for the whole call, and a call they stopped raises Interrupted
    (see StopRequest.interrupted) instead of returning."""

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        stop = StopRequest()
        with stop.handling():
            try:
                result = fn(*args, stop=stop, **kwargs)
            except StopNow:  # a second Ctrl-C: whatever the ranks had flushed is kept
                exc = stop.interrupted() or Interrupted(stop.line(), stop.signum or signal.SIGINT)
                raise exc from None
            exc = stop.interrupted()
            if exc is not None:
                raise exc
        return result

    return call


def raise_stop_now() -> None:
    """A second SIGINT's default action in the launcher's process: raise StopNow."""
    raise StopNow()


def _write_stop_file(path: Path, signum: int) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(str(signum))
    except OSError:
        pass  # a full or read-only OUT: the ranks find out by themselves


def stop_at_boundary(stop: StopRequest | None, group: Any) -> bool:
    """At a micro-batch boundary: does this rank stop here? Every rank of the CFG group calls it
    at the same boundary and gets the same answer (any rank asked to stop: all stop).

    Args:
        stop: this rank's request (None: never stops early).
        group: the rank's CfgGroup (its ``agree`` exchange carries the flag).
    Returns:
        True: stop now (``stop.stopped`` is then set).
    """
    local = stop is not None and stop.requested
    if group.size > 1:
        rows = group.agree(None, [int(local)])
        agreed = any(r[0] for r in rows)
        if agreed and stop is not None and not local:
            stop.request(signal.SIGTERM)  # a peer's signal; the launcher's line names its own
        local = agreed
    if local and stop is not None:
        stop.stopped = True
    return local


def quiet_torchrun() -> None:
    """In the torchrun process, before it starts the ranks: ignore SIGINT, SIGTERM and SIGUSR2
    (torchrun would otherwise raise SignalException, print a traceback and kill its ranks
    before they flush). The ranks inherit the ignored dispositions until they install their
    own handlers, so a signal during their start-up is not lost either: the stop file is read
    at the first boundary. torchrun >= 2.6 takes the signals it handles from its arguments:
    set their ``signals_to_handle`` to TORCHRUN_SIGNALS as well."""
    os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = TORCHRUN_SIGNALS
    for s in RANK_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def wait_torchrun(proc: subprocess.Popen, stop: StopRequest) -> int:
    """Wait for torchrun; after a stop request, SIGKILL it (its ranks die with it) on a second
    Ctrl-C or once the request's deadline passes.

    Returns:
        torchrun's exit status (negative: the signal that killed it).
    """

    def kill() -> None:
        stop.killed = True
        with contextlib.suppress(ProcessLookupError):
            proc.kill()

    stop.at_once = kill
    try:
        while True:
            try:
                return proc.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                if stop.deadline is not None and time.monotonic() > stop.deadline:
                    kill()
    finally:
        stop.at_once = raise_stop_now


def stop_line(out_root: Path, shards: Sequence[Any]) -> str:
    """``7/10 shards done, 12 samples flushed in 2 unfinished shards`` over ``shards`` (jobs.plan
    Shard objects) of the job in ``out_root``: each flushed sample counted once."""
    import pyarrow.parquet as pq

    done = sum(1 for s in shards if (out_root / "done" / f"{s.name}.json").exists())
    samples, holding = 0, 0
    for s in shards:
        if (out_root / "done" / f"{s.name}.json").exists():
            continue
        ids: set[str] = set()
        for part in (out_root / ".gen" / "shards" / s.name).glob("part-*.samples.parquet"):
            with contextlib.suppress(OSError, ValueError):
                ids.update(pq.read_table(part, columns=["sample_id"]).column("sample_id").to_pylist())
        samples += len(ids)
        holding += bool(ids)
    return (f"{done}/{len(shards)} shards done, {samples} samples flushed in {holding} unfinished "
            f"shard{'' if holding == 1 else 's'}")  # fmt: skip
