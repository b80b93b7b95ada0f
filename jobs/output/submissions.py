"""The SLURM array tasks a job submitted, as OUT records them, and which of them squeue still holds.

    OUT/slurm/submissions.json   every submission: array job ids, tasks and their shards

This is state of the output directory, like its shard locks (jobs.output.lock): both say who
else may be writing OUT, and a local run, a submission, `gen status` and the dry run all ask.
Submitting (submitit, sbatch) lives in jobs.slurm. Asking squeue needs no SLURM Python package
and fails soft: None when SLURM is gone.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from typing import Any

from jobs.output.store import OutputDir, write_json

_PENDING = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "RESV_DEL_HOLD",
            "SUSPENDED", "STOPPED", "RESIZING", "SIGNALING"}  # fmt: skip
_RUNNING = {"RUNNING", "COMPLETING", "STAGE_OUT"}


def read_submissions(out: OutputDir) -> list[dict[str, Any]]:
    """OUT/slurm/submissions.json, or [] if nothing was submitted."""
    path = out.root / "slurm" / "submissions.json"
    return json.loads(path.read_text()) if path.exists() else []


def queue_states(out: OutputDir) -> dict[str, str] | None:
    """SLURM states of this job's array tasks still in the queue: {"123_4": "RUNNING", ...}.

    Pending arrays are expanded (``squeue -r``). Tasks that left the queue are absent.
    Returns None when squeue is unavailable or fails (SLURM is gone); {} when nothing was
    submitted.
    """
    jobs = {j for s in read_submissions(out) for j in s["array_job_ids"]}
    if not jobs:
        return {}
    if shutil.which("squeue") is None:
        return None
    try:
        proc = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%F|%T"], capture_output=True,
                              text=True, timeout=30)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    if proc.returncode != 0:
        return None
    states = {}
    for line in proc.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 3 and parts[1] in jobs:
            states[parts[0]] = parts[2]
    return states


def count_states(states: dict[str, str]) -> tuple[int, int]:
    """(pending, running) among queue states."""
    pending = sum(1 for s in states.values() if s in _PENDING or s.startswith("REQUEUE"))
    running = sum(1 for s in states.values() if s in _RUNNING)
    return pending, running


def active_shards(out: OutputDir, states: dict[str, str]) -> set[int]:
    """Shards held by tasks still in the queue (not to be submitted again)."""
    held: set[int] = set()
    for submission in read_submissions(out):
        for task in submission["tasks"]:
            if task["job_id"] in states:
                held.update(task["shards"])
    return held


def save_submission(out: OutputDir, record: dict[str, Any]) -> None:
    """Write (or update, by its ``submitted_at``) one submission record in
    OUT/slurm/submissions.json; a record without tasks is not written."""
    if not record["tasks"]:
        return
    submissions = [s for s in read_submissions(out) if s["submitted_at"] != record["submitted_at"]]
    write_json(out.root / "slurm" / "submissions.json", [*submissions, record])
