"""torchrun for gen's ranks: ``python -m jobs.local.torchrun LAUNCHER_PID TORCHRUN_ARGS...``.

torchrun itself (``torch.distributed.run``), with two differences for a job runner:

- It dies with the `gen` launcher: the kernel SIGKILLs it when LAUNCHER_PID dies (Linux
  PR_SET_PDEATHSIG), and each rank does the same with it (jobs.local.worker), so a killed run leaves
  no orphan writing its shards.
- A failed rank ends it with a report instead of torchrun's traceback: none at all when the
  root cause is a job error the ranks have already explained (worker exit status 2, which this
  module exits with too) or ranks that stopped early on a signal (128 + the signal, passed on),
  else torchrun's failure table (rank, exit code, signal), exit 1.
- It ignores SIGINT, SIGTERM and SIGUSR2 (jobs.local.signals.quiet_torchrun): the launcher and
  the ranks stop on them, flushing first; torchrun waits for the ranks, or is SIGKILLed.
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
    from jobs.local.signals import INTERRUPTED_EXITS, TORCHRUN_SIGNALS, quiet_torchrun

    quiet_torchrun()  # before the slow imports: a Ctrl-C now is the launcher's
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    die_with_parent(int(sys.argv[1]))
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_quiet_failure_logs)
    try:
        args = parse_args(sys.argv[2:])
        if hasattr(args, "signals_to_handle"):
            args.signals_to_handle = TORCHRUN_SIGNALS
        run(args)
    except ChildFailedError as exc:
        _, first = exc.get_first_failure()
        if first.exitcode == JOB_ERROR_EXIT:
            sys.exit(JOB_ERROR_EXIT)
        codes = [f.exitcode for f in exc.failures.values()]
        if all(c in INTERRUPTED_EXITS for c in codes):
            sys.exit(codes[0])
        print(exc.format_msg(), file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
