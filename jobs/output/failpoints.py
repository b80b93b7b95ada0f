"""Named kill points for crash tests: ``GEN_FAILPOINT=NAME[@N][:ACTION]`` SIGKILLs the process
at the N-th time (default 1st) it reaches ``failpoint(NAME)``. Other actions: ``enospc`` raises
the OSError(ENOSPC) a full disk gives (at ``write-parquet``: inside the parquet writer, its
temporary file written, not yet renamed), where a test cannot mount a small tmpfs; ``sleepS``
sleeps S seconds there, so that a test's signal surely lands mid-run (bytes do not change);
``oom`` raises a real torch.OutOfMemoryError (at ``denoise``: a micro-batch's denoise stage
starting, so that its out-of-memory backoff runs).

Crash tests use it to kill a run at an exact point (after a part is flushed, between writing a
shard file and its done marker, ...) instead of racing a timer. Unset, a failpoint costs one
dictionary lookup. Points: ``loaded`` (model loaded, nothing generated), ``part`` (after a
part is flushed), ``commit-samples`` (shard samples file written, no done marker yet),
``commit-done`` (done marker written, parts not yet removed), ``rank-finished`` (a rank marked
its share of a shard finished, before the commit), ``encoder-stage-written`` /
``denoiser-stage-written`` (a split job's stage file and done marker of a shard written),
``write-parquet`` (any parquet file being written, before its rename), ``denoise`` (a denoise
stage starts), ``micro-batch`` (a rank's micro-batch boundary, on the rank's own thread: parts
are written on the writer's, jobs.local.writer). ``GEN_FAILPOINT_RANK=R``
limits it to the process whose torchrun ``RANK`` is R.
"""

from __future__ import annotations

import errno
import os
import signal
import time

_hits: dict[str, int] = {}


def failpoint(name: str, path: str | os.PathLike[str] | None = None) -> None:
    """SIGKILL this process if ``GEN_FAILPOINT`` names this point and its hit count is reached.

    Args:
        name: the point.
        path: the file being written there (the ENOSPC error names it).
    Raises:
        OSError: ENOSPC, when the spec ends with ``:enospc``.
    """
    spec = os.environ.get("GEN_FAILPOINT")
    if not spec:
        return
    spec, _, action = spec.partition(":")
    point, _, nth = spec.partition("@")
    if point != name:
        return
    rank = os.environ.get("GEN_FAILPOINT_RANK")
    if rank is not None and os.environ.get("RANK", "0") != rank:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] != int(nth or 1):
        return
    if action.startswith("sleep"):
        time.sleep(float(action[len("sleep"):] or 1))
        return
    if action == "oom":
        import torch

        raise torch.OutOfMemoryError(f"CUDA out of memory (GEN_FAILPOINT {name}). Tried to allocate 2.00 GiB")
    if action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), None if path is None else str(path))
    os.kill(os.getpid(), signal.SIGKILL)
