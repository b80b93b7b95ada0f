"""A rank's part writer: media encoding (PNG, mp4, WAV) and part-file writes run on one
background thread while the rank starts its next micro-batch, so the device does not idle
while files are written (an 81-frame 480x832 mp4 takes ~4.8 s to encode on a CPU core).

Nothing changes on disk but the timing: parts are written in submission order, each atomically
(temp file + rename) as before, and the rank drains the writer before it marks a shard finished,
so a done marker never precedes its parts. A rank killed with writes pending loses only those
micro-batches, which a re-run generates again (as a kill during a synchronous write would).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor


class PartWriter:
    """Run part writes in order on one background thread, at most ``depth`` pending.

    Args:
        overlap: False runs every write at once on the calling thread (``--no-overlap-writes``).
        depth: writes that may wait or run at once, >= 1; a submit beyond it waits for the
            oldest (which bounds the finished micro-batches held in memory).

    An error of a write (a full disk, a lost lock) is raised by the next ``submit`` or by
    ``drain``, on the rank's thread.

    Attributes:
        write_s: seconds spent inside the writes (encoding and file writes), on either thread.
        wait_s: seconds the calling thread spent on writes: waiting for the writer in ``submit``
            and ``drain``, or (without overlap) writing. write_s - wait_s is what the overlap hid.
    """

    def __init__(self, *, overlap: bool = True, depth: int = 2) -> None:
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.depth = depth
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gen-writer") if overlap else None
        self._pending: deque[Future] = deque()
        self.write_s = 0.0
        self.wait_s = 0.0

    def _timed(self, write: Callable[[], None]) -> None:
        start = time.perf_counter()
        try:
            write()
        finally:
            self.write_s += time.perf_counter() - start

    def submit(self, write: Callable[[], None]) -> None:
        """Write (``write()``) behind the caller, after every earlier write."""
        start = time.perf_counter()
        try:
            if self._pool is None:
                self._timed(write)
                return
            while self._pending and (self._pending[0].done() or len(self._pending) >= self.depth):
                self._pending.popleft().result()
            self._pending.append(self._pool.submit(self._timed, write))
        finally:
            self.wait_s += time.perf_counter() - start

    def drain(self) -> None:
        """Wait for every pending write; raises the first write's error."""
        start = time.perf_counter()
        try:
            while self._pending:
                self._pending.popleft().result()
        finally:
            self.wait_s += time.perf_counter() - start

    def close(self, *, failed: bool = False) -> None:
        """Drain and stop the thread. ``failed``: the rank is already raising, so pending
        writes are finished but their errors are not raised over the rank's own."""
        try:
            if failed:
                for future in self._pending:
                    future.exception()
                self._pending.clear()
            else:
                self.drain()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
