"""Named kill points for crash tests: ``GEN_FAILPOINT=NAME[@N]`` SIGKILLs the process at the
N-th time (default 1st) it reaches ``failpoint(NAME)``.

Crash tests use it to kill a run at an exact point (after a part is flushed, between writing a
shard file and its done marker, ...) instead of racing a timer. Unset, a failpoint costs one
dictionary lookup. Points: ``loaded`` (model loaded, nothing generated), ``part`` (after a
part is flushed), ``commit-samples`` (shard samples file written, no done marker yet),
``commit-done`` (done marker written, parts not yet removed), ``rank-finished`` (a rank marked
its share of a shard finished, before the commit), ``encoder-stage-written`` /
``denoiser-stage-written`` (a split job's stage file and done marker of a shard written). ``GEN_FAILPOINT_RANK=R`` limits it to the
process whose torchrun ``RANK`` is R.
"""

from __future__ import annotations

import os
import signal

_hits: dict[str, int] = {}


def failpoint(name: str) -> None:
    """SIGKILL this process if ``GEN_FAILPOINT`` names this point and its hit count is reached."""
    spec = os.environ.get("GEN_FAILPOINT")
    if not spec:
        return
    point, _, nth = spec.partition("@")
    if point != name:
        return
    rank = os.environ.get("GEN_FAILPOINT_RANK")
    if rank is not None and os.environ.get("RANK", "0") != rank:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
