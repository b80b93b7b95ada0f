"""`gen batch --slurm`: plan, submit the unfinished shards as SLURM arrays (submitit), and
optionally wait (jobs.slurm.wait).

    OUT/slurm/submissions.json   every submission (jobs.output.submissions)
    OUT/slurm/JOBID/             submitit's sbatch scripts, pickles and task logs
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable
from typing import Any

from jobs.config import BatchConfig
from jobs.errors import JobError
from jobs.job import new_run_id, prepare_job, reopen_errors
from jobs.output.lock import ShardLocks
from jobs.output.store import OutputDir
from jobs.output.submissions import active_shards, queue_states, save_submission
from jobs.output.summary import build_summary
from jobs.slurm.params import (
    MAX_TIMEOUT_REQUEUES,
    SlurmOptions,
    group_shards,
    max_array_size,
    sbatch_parameters,
    split_arrays,
)
from jobs.slurm.task import ShardTask, task_scope
from jobs.slurm.wait import follow


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
    job = prepare_job(config, overwrite=overwrite, echo=echo, on_this_node=False,
                      shards_per_task=options.shards_per_task)  # fmt: skip
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
        for role in ((None, "encoder", "denoiser", "decoder") if config.split else (None,)):
            shutil.rmtree(OutputDir(out.root, task_scope(task, role)).run_dir, ignore_errors=True)
    if tasks:
        if config.split:
            record = submit_role_tasks(out, tasks, options=options, config=config)
        else:
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


def submit_tasks(out: OutputDir, tasks: list[list[int]], *, options: SlurmOptions,
                 gpus: int) -> dict[str, Any]:  # fmt: skip
    """Submit ``tasks`` (lists of shard indices) as SLURM arrays; returns the submission record
    (also appended to OUT/slurm/submissions.json).

    Raises:
        JobError: sbatch refused the submission (its message is included).
    """
    import submitit

    executor = submitit.SlurmExecutor(folder=out.root / "slurm" / "%j",
                                      max_num_timeout=MAX_TIMEOUT_REQUEUES)  # fmt: skip
    executor.update_parameters(**sbatch_parameters(options, gpus=gpus, job_name=f"gen-{out.root.name}"))
    record: dict[str, Any] = {"submitted_at": time.time(), "array_job_ids": [], "tasks": []}
    for chunk in split_arrays(len(tasks), max_array_size()):
        calls = [ShardTask(str(out.root.resolve()), tuple(tasks[i]), gpus) for i in chunk]
        jobs = _submit_array(executor, calls, out, record, "array")
        record["array_job_ids"].append(jobs[0].job_id.split("_")[0])
        record["tasks"] += [{"job_id": job.job_id, "scope": call.scope, "shards": list(call.shard_indices)}
                            for job, call in zip(jobs, calls)]  # fmt: skip
        save_submission(out, record)
    return record


def first_roles(out: OutputDir, tasks: list[list[int]], roles: tuple[str, ...]) -> list[str]:
    """Per task, the first of ``roles`` that some shard of it still needs, from the stage files
    on disk (never from old job ids): the encoder unless every shard has its encoder or denoiser
    stage, then the denoiser unless every shard has its denoiser stage, else the decoder."""
    from jobs.output.stages import StageFiles
    from jobs.plan import shard_at

    job = json.loads(out.job_json.read_text())
    num_rows, shard_size = job["manifest"]["num_rows"], job["config"]["shard_size"]
    stages = StageFiles(out)
    found = []
    for task in tasks:
        shards = [shard_at(num_rows, shard_size, i) for i in task]
        needs = {
            "encoder": any(not (stages.is_done("encoder", s) or stages.is_done("denoiser", s)) for s in shards),
            "denoiser": any(not stages.is_done("denoiser", s) for s in shards),
            "decoder": True,
        }  # fmt: skip
        found.append(next(r for r in roles if needs[r] or r == roles[-1]))
    return found


def submit_role_tasks(out: OutputDir, tasks: list[list[int]], *, options: SlurmOptions,
                      config: BatchConfig) -> dict[str, Any]:  # fmt: skip
    """A split job's tasks as one array per role and chunk of tasks, chained: the denoiser array
    with ``--dependency=aftercorr:<encoder array>`` (task i starts when encoder task i completed)
    and the decoder array with ``aftercorr:<denoiser array>``, ``--kill-on-invalid-dep=yes`` so
    that a failed upstream task cancels its partner instead of leaving it pending. A task starts
    at the first role its shards still need (first_roles); ``--role R`` submits that role only.
    Each role's arrays ask for that role's ranks (--role-gpus) and its --role-slurm-extra.

    Returns:
        The submission record (OUT/slurm/submissions.json), tasks with their role.
    Raises:
        JobError: sbatch refused an array (its message is included).
    """
    import submitit

    from jobs.slurm.params import role_options
    from pipeline.roles import ROLES

    roles = (config.role,) if config.role else ROLES
    counts = dict(config.role_gpus)
    starts = first_roles(out, tasks, roles)
    record: dict[str, Any] = {"submitted_at": time.time(), "array_job_ids": [], "tasks": [], "arrays": []}
    for first in roles:
        group = [t for t, r in zip(tasks, starts) if r == first]
        for chunk in split_arrays(len(group), max_array_size()):
            upstream = None
            for role in roles[roles.index(first):]:
                executor = submitit.SlurmExecutor(folder=out.root / "slurm" / "%j",
                                                  max_num_timeout=MAX_TIMEOUT_REQUEUES)  # fmt: skip
                params = sbatch_parameters(role_options(options, role), gpus=counts[role],
                                           job_name=f"gen-{out.root.name}-{role}")  # fmt: skip
                if upstream is not None:
                    params["additional_parameters"].update(dependency=f"aftercorr:{upstream}",
                                                           kill_on_invalid_dep="yes")  # fmt: skip
                executor.update_parameters(**params)
                calls = [ShardTask(str(out.root.resolve()), tuple(group[i]), counts[role], role=role) for i in chunk]
                jobs = _submit_array(executor, calls, out, record, f"{role} array")
                array = jobs[0].job_id.split("_")[0]
                record["array_job_ids"].append(array)
                record["arrays"].append({"role": role, "job_id": array, "dependency": upstream and f"aftercorr:{upstream}"})
                record["tasks"] += [{"job_id": job.job_id, "scope": call.scope, "shards": list(call.shard_indices),
                                     "role": role} for job, call in zip(jobs, calls)]  # fmt: skip
                save_submission(out, record)
                upstream = array
    return record


def _submit_array(executor: Any, calls: list, out: OutputDir, record: dict[str, Any], what: str) -> list:
    """Submit ``calls`` as one SLURM array with ``executor``; its submitit jobs, in order.

    Raises:
        JobError: sbatch refused it (``record``, what was submitted so far, is saved first).
    """
    import submitit

    try:
        with executor.batch():
            return [executor.submit(call) for call in calls]
    except (submitit.core.utils.FailedJobError, subprocess.CalledProcessError, OSError) as exc:
        save_submission(out, record)
        raise JobError(f"sbatch refused the {what}: {_sbatch_message(exc)}") from None


def _sbatch_message(exc: BaseException) -> str:
    text = str(exc)
    m = re.search(r"sbatch: error: (.*)", text)
    return m.group(1).strip() if m else text.strip().splitlines()[-1] if text.strip() else repr(exc)


def describe_submission(record: dict[str, Any], out: OutputDir) -> str:
    """How to follow a submission, for the CLI."""
    ids = ",".join(record["array_job_ids"])
    if record.get("arrays"):  # a split job: say which array is which role
        roles = ", ".join(f"{a['role']} {a['job_id']}" + (f" ({a['dependency']})" if a["dependency"] else "")
                          for a in record["arrays"])  # fmt: skip
        ids = f"{ids} [{roles}]"
    return (f"submitted {len(record['tasks'])} task(s) as SLURM array job(s) {ids}; follow with "
            f"`gen status {shlex.quote(str(out.root))}` or `squeue -j {ids}`; "
            f"logs: {out.root / 'slurm'}/")  # fmt: skip
