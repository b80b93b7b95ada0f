"""User-facing job errors: printed as one line by the CLI, exit code 2, no traceback."""


class JobError(ValueError):
    """A mistake in the job's input or options; the message names the file, column or option."""
