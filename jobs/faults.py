"""Faults of the machine, not of the code: a full disk, an --out that cannot be written, a manifest
that disappeared mid-run. Each becomes a JobError (one line, exit 2) that names the path and
what to do; nothing written so far is damaged (every file is written to a temporary name and
renamed), so the same command resumes once the cause is fixed.

Any other OSError is left alone: it is a bug, and its traceback is wanted.
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path
from typing import Any

from jobs.errors import JobError

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)
_RESUME = "then re-run the same command to resume (finished shards and flushed samples are kept)"


def with_path(exc: OSError, path: str | os.PathLike[str]) -> OSError:
    """``exc`` as an OSError that carries its errno and ``path`` (pyarrow's lack the path, and
    some their errno too: it is read from "[errno 28]" in the message)."""
    code = exc.errno
    if code is None:
        found = re.search(r"\[errno (\d+)\]", str(exc), re.IGNORECASE)
        code = int(found.group(1)) if found else None
    if code is None:
        return exc
    new = OSError(code, os.strerror(code), str(path))
    new.__cause__ = exc
    return new


def job_fault(exc: BaseException, *, out: str | os.PathLike[str],
              manifest: str | os.PathLike[str] | None) -> JobError | None:  # fmt: skip
    """The job-level message for an OSError, or None when it is not one of those faults.

    Args:
        exc: the exception.
        out: the job's --out directory.
        manifest: the manifest's path (None: unknown).
    Returns:
        A JobError: no space left (ENOSPC, EDQUOT) writing a path; a path under ``out`` that
        cannot be written (EACCES, EPERM, EROFS); the manifest missing (ENOENT) or unreadable.
    """
    if not isinstance(exc, OSError) or exc.errno is None:
        return None
    path = exc.filename
    if path is None:
        return None
    path = Path(os.fsdecode(path))
    out_root = Path(out).resolve()
    manifest_path = Path(manifest).resolve() if manifest else None
    resolved = path.resolve()
    if exc.errno in _NO_SPACE:
        return JobError(f"no space left on device: cannot write {path}; free space on its file system "
                        f"(or use another --out), {_RESUME}")  # fmt: skip
    if resolved == manifest_path:
        if exc.errno == errno.ENOENT:
            return JobError(f"manifest {manifest_path}: disappeared during the run; put the same file "
                            f"back, {_RESUME}")  # fmt: skip
        return JobError(f"manifest {manifest_path}: cannot be read ({exc.strerror}); make it readable, {_RESUME}")
    # OUT itself, a path in it, or a parent directory it cannot be created in
    on_out = resolved == out_root or out_root in resolved.parents or resolved in out_root.parents
    if exc.errno in _NOT_WRITABLE and on_out:
        return JobError(f"--out {out_root} is not writable ({exc.strerror}: {path}): make it writable "
                        f"and re-run the same command, or use another --out")  # fmt: skip
    return None


def spare_dir(run_id: str) -> Path:
    """Where a rank leaves its error report when OUT cannot take it (full, read-only): a
    directory of this run in the system's temporary directory, which the launcher reads too."""
    import tempfile

    return Path(tempfile.gettempdir()) / f"gen-run-{run_id}"


def spare_report(run_id: str, name: str, report: dict[str, Any]) -> bool:
    """Write ``report`` as ``name`` in spare_dir(run_id); False if that fails too."""
    import json

    try:
        spare = spare_dir(run_id)
        spare.mkdir(parents=True, exist_ok=True)
        (spare / name).write_text(json.dumps(report))
    except OSError:
        return False
    return True
