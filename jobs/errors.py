"""How a job stops short: a user's mistake or a fault of the machine it writes to (JobError,
exit 2), a failed run (RunFailed, exit 1), a stop asked for with a signal (Interrupted, exit
128 + the signal).

Each is printed as one line by the CLI, with no traceback."""


class JobError(ValueError):
    """A mistake in the job's input or options, or a job-level fault (a full disk, an --out that
    cannot be written, a manifest gone mid-run); the message names the file, column or option,
    and what to do."""


class RunFailed(RuntimeError):
    """A rank or a SLURM task failed; finished shards and flushed samples are kept for a re-run."""


class Interrupted(RuntimeError):
    """The run stopped on a signal (SIGINT, SIGTERM) before its shards were done; what it had
    finished is flushed, and a re-run resumes.

    Args:
        message: the line to print (``interrupted: 7/10 shards done, ...``).
        signum: the signal; the CLI exits with 128 + signum (130 for SIGINT, 143 for SIGTERM).
    """

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        """128 + the signal number."""
        return 128 + self.signum
