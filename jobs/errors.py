"""The two ways a job stops: a user's mistake (JobError, exit 2) and a failed run (RunFailed, exit 1).

Both are printed as one line by the CLI, with no traceback."""


class JobError(ValueError):
    """A mistake in the job's input or options; the message names the file, column or option."""


class RunFailed(RuntimeError):
    """A rank or a SLURM task failed; finished shards and flushed samples are kept for a re-run."""
