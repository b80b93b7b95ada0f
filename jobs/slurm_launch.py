"""`gen batch --slurm`: plan, submit the unfinished shards as SLURM arrays, and optionally wait."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from typing import Any

from tqdm import tqdm

from jobs.config import BatchConfig
from jobs.errors import JobError
from jobs.launch import RunFailed, new_run_id, prepare_job, reopen_errors
from jobs.lock import ShardLocks
from jobs.slurm import (
    SlurmOptions,
    active_shards,
    describe_submission,
    ended_state,
    group_shards,
    queue_states,
    read_submissions,
    submit_tasks,
    task_scope,
)
from jobs.store import OutputDir
from jobs.summary import build_summary

POLL_S = 2.0
"""Seconds between looks at the done markers and squeue while waiting."""
GONE_GRACE_S = 10.0
"""How long no task of the job may be in the queue, with shards unfinished, before --wait fails
(a task between `scontrol requeue` and its return to PENDING is briefly absent)."""


def submit_batch(config: BatchConfig, options: SlurmOptions, *, launch_wall: float | None = None,
                 overwrite: bool = False, retry_errors: bool = False,
                 echo: Callable[[str], None] = print) -> dict[str, Any] | None:  # fmt: skip
    """Submit the job's unfinished shards as SLURM array tasks.

    Shards done are skipped, and so are shards held by this job's tasks still in the queue, so
    re-running the same command submits only what is missing.

    Args:
        config: the job's options; ``config.gpus`` ranks per task (one task per node).
        options: the SLURM knobs; ``options.wait`` blocks until the shards are done.
        launch_wall: time.time() at CLI start (default: now); the summary's times (startup_s,
            time_to_first_image_s, time_to_done_s) count from the submission when there is one.
        overwrite: replace an --out directory that holds a different job.
        retry_errors: submit the samples whose status is "error" again (shards not held by
            queued tasks).
        echo: where one-line notices go.
    Returns:
        With ``options.wait``, the job's summary (OUT/summary.json); else None.
    Raises:
        JobError: bad input, no SLURM here, or sbatch refused the array.
        RunFailed: with ``options.wait``, tasks ended with shards unfinished.
    """
    launch_wall = launch_wall or time.time()
    for tool in ("sbatch", "squeue"):
        if shutil.which(tool) is None:
            raise JobError(f"--slurm: `{tool}` is not on PATH; run on a SLURM login node, or start "
                           "a one-node cluster here with `slurm/cluster.sh up`")  # fmt: skip
    job = prepare_job(config, overwrite=overwrite, echo=echo, on_this_node=False)
    out = job.out
    states = queue_states(out) or {}
    queued = active_shards(out, states)
    with ShardLocks(out.root, new_run_id(), "submit") as probe:
        # A shard that a live local run (or a running task) writes is refused here, not in a task.
        unqueued = [s for s in job.pending if s.index not in queued]
        errored = [s for s in job.with_errors if s.index not in queued] if retry_errors else []
        probe.acquire(unqueued + errored)
        if retry_errors:
            reopen_errors(job, errored + unqueued, echo)
    pending = job.pending  # with the reopened shards
    held = queued & {s.index for s in pending}
    todo = [s.index for s in pending if s.index not in held]
    tasks = group_shards(todo, options.shards_per_task)
    echo(f"plan: {job.manifest.num_rows} rows -> {len(job.shards)} shard(s) of {config.shard_size} "
         f"rows; {len(job.shards) - len(job.pending)} done, {len(held)} held by queued tasks, "
         f"{len(todo)} to submit as {len(tasks)} task(s); out: {out.root}")  # fmt: skip
    if not held:
        shutil.rmtree(out.runs, ignore_errors=True)
    for task in tasks:
        shutil.rmtree(OutputDir(out.root, task_scope(task)).run_dir, ignore_errors=True)
    if tasks:
        record = submit_tasks(out, tasks, options=options, gpus=config.gpus)
        echo(describe_submission(record, out))
        launch_wall = record["submitted_at"]  # the summary's times count from submission
    elif not held:
        echo("nothing to submit: every shard is done")
    if not options.wait:
        return None
    watched = sorted(set(todo) | held)
    shards = [job.shards[i] for i in watched]
    follow(out, watched, job.total_images(shards))
    return build_summary(out, launch_wall=launch_wall, num_shards=len(job.shards))


def follow(out: OutputDir, shard_indices: list[int], total: int, *, poll_s: float = POLL_S) -> None:
    """Block until the shards are done, with a tqdm bar over their samples fed by done markers
    (no sacct needed). Tasks in the queue are looked up with squeue.

    Raises:
        RunFailed: no task of the job is left in the queue and shards are unfinished; the message
            names them and the last task error.
    """
    from jobs.plan import Shard

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
    """Job ids of the newest task holding each shard."""
    holder: dict[int, str] = {}
    for submission in read_submissions(out):
        for task in submission["tasks"]:
            for shard in task["shards"]:
                holder[shard] = task["job_id"]
    return sorted({holder[i] for i in shard_indices if i in holder})


def _unfinished_message(out: OutputDir, remaining: list[int], job_ids: list[str]) -> str:
    from jobs.status import last_errors

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
