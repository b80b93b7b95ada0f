"""torchrun for gen's ranks: ``python -m jobs.local.torchrun LAUNCHER_PID TORCHRUN_ARGS...``.

torchrun itself (``torch.distributed.run``), with two differences for a job runner:

- It dies with the `gen` launcher: the kernel SIGKILLs it when LAUNCHER_PID dies (Linux
  PR_SET_PDEATHSIG), and each rank does the same with it (jobs.local.worker), so a killed run leaves
  no orphan writing its shards.
- A failed rank ends it with a report instead of torchrun's traceback: none at all when the
  root cause is a job error the ranks have already explained (worker exit status 2, which this
  module exits with too), else torchrun's failure table (rank, exit code, signal), exit 1.
  torchrun's own log lines about it ("failed (exitcode: N) ...", "Sending process P closing
  signal SIGTERM") are dropped: the table, or the job error, says the same.
"""

from __future__ import annotations

import logging
import os
import signal
import sys


def die_with_parent(parent: int) -> None:
    """Linux: have the kernel SIGKILL this process when ``parent`` (its parent process) dies."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)


JOB_ERROR_EXIT = 2
"""A rank's exit status for a job error it has reported (jobs.local.worker)."""


def _quiet_failure_logs(record: logging.LogRecord) -> bool:
    """Logging filter: False for torchrun's per-failure lines (see the module docstring)."""
    return not str(record.msg).startswith(("failed (exitcode:", "Sending process"))


def main() -> None:
    """Entry point; see the module docstring."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    die_with_parent(int(sys.argv[1]))
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_quiet_failure_logs)
    try:
        run(parse_args(sys.argv[2:]))
    except ChildFailedError as exc:
        _, first = exc.get_first_failure()
        if first.exitcode == JOB_ERROR_EXIT:
            sys.exit(JOB_ERROR_EXIT)
        print(exc.format_msg(), file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
