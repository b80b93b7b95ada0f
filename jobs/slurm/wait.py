"""`gen batch --slurm --wait`: follow the submitted shards to the end, through done markers and
squeue (no accounting needed), and say how the tasks ended when some shards never finish."""

from __future__ import annotations

import re
import subprocess
import time

from tqdm import tqdm

from jobs.errors import RunFailed
from jobs.output.status import last_errors
from jobs.output.store import OutputDir
from jobs.output.submissions import queue_states, read_submissions
from jobs.plan import Shard

POLL_S = 2.0
"""Seconds between looks at the done markers and squeue while waiting."""
GONE_GRACE_S = 10.0
"""How long no task of the job may be in the queue, with shards unfinished, before --wait fails
(a task between `scontrol requeue` and its return to PENDING is briefly absent)."""


def follow(out: OutputDir, shard_indices: list[int], total: int, *, poll_s: float = POLL_S) -> None:
    """Block until the shards are done, with a tqdm bar over their samples fed by done markers
    (no sacct needed). Tasks in the queue are looked up with squeue.

    Raises:
        RunFailed: no task of the job is left in the queue and shards are unfinished; the message
            names them and the last task error.
    """
    names = {i: Shard(i, 0, 0).name for i in shard_indices}
    bar = tqdm(total=total, unit="img", desc="slurm", dynamic_ncols=True)
    shown, gone_since = 0, None
    try:
        while True:
            done = [out.done_marker(names[i]) for i in shard_indices]
            finished = sum(d["samples_ok"] + d["samples_error"] for d in done if d)
            bar.update(max(0, finished - shown))
            shown = max(shown, finished)
            remaining = [i for i, d in zip(shard_indices, done) if d is None]
            if not remaining:
                return
            states = queue_states(out)
            mine = _tasks_of(out, remaining)
            if states is not None and not any(job_id in states for job_id in mine):
                gone_since = gone_since or time.monotonic()
                if time.monotonic() - gone_since > GONE_GRACE_S:
                    raise RunFailed(_unfinished_message(out, remaining, mine))
            else:
                gone_since = None
            time.sleep(poll_s)
    finally:
        bar.close()


def _tasks_of(out: OutputDir, shard_indices: list[int]) -> list[str]:
    """Job ids of the tasks of the newest submission holding each shard: one task, or a split
    job's chain (encoder, denoiser, decoder), so that a failed encoder shows beside the
    partners SLURM cancelled. In submission order, each once."""
    holder: dict[int, list[str]] = {}
    for submission in read_submissions(out):
        newest: dict[int, list[str]] = {}
        for task in submission["tasks"]:
            for shard in task["shards"]:
                newest.setdefault(shard, []).append(task["job_id"])
        holder.update(newest)
    ids = [job_id for i in shard_indices for job_id in holder.get(i, [])]
    return list(dict.fromkeys(ids))


def _unfinished_message(out: OutputDir, remaining: list[int], job_ids: list[str]) -> str:
    errors = last_errors(out, limit=1)
    cause = f"; last error: {errors[0]}" if errors else ""
    return (f"{len(remaining)} shard(s) unfinished and no task of this job is queued "
            f"({_how_tasks_ended(job_ids)}){cause}. Logs: {out.root / 'slurm'}/. Finished "
            "shards and flushed samples are kept: re-run the same command to resume.")  # fmt: skip


def _how_tasks_ended(job_ids: list[str], ask: int = 10) -> str:
    """``tasks 7_0, 7_1: FAILED (exit 3:0, reason NonZeroExitCode)``: the tasks grouped by how
    SLURM says they ended (the first ``ask`` of them; the rest, or those SLURM forgot, plainly)."""
    if not job_ids:
        return "tasks ?"
    by_state: dict[str | None, list[str]] = {}
    for i, job_id in enumerate(job_ids):
        by_state.setdefault(ended_state(job_id) if i < ask else None, []).append(job_id)
    unknown = by_state.pop(None, [])
    groups = [f"{', '.join(ids)}: {state}" for state, ids in by_state.items()]
    if unknown:
        more = f" and {len(unknown) - ask} more" if len(unknown) > ask else ""
        groups.append(", ".join(unknown[:ask]) + more)
    return "tasks " + "; ".join(groups)


def ended_state(job_id: str) -> str | None:
    """How a task that left the queue ended, from ``scontrol show job`` (finished jobs stay there
    for MinJobAge, 300 s by default): e.g. ``"FAILED (exit 1:0, reason NonZeroExitCode)"``.
    None when SLURM no longer knows the job or cannot be asked."""
    try:
        proc = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True,
                              text=True, timeout=30)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    fields = dict(re.findall(r"(JobState|Reason|ExitCode)=(\S+)", proc.stdout))
    if proc.returncode != 0 or "JobState" not in fields:
        return None
    details = [f"exit {fields['ExitCode']}"] if "ExitCode" in fields else []
    if fields.get("Reason", "None") != "None":
        details.append(f"reason {fields['Reason']}")
    return f"{fields['JobState']} ({', '.join(details)})" if details else fields["JobState"]
