"""SLURM arrays through submitit: sbatch parameters, array splitting, submission and --wait.

A `gen batch --slurm` job is the same job as a local one: the submitter plans it and writes
OUT/job.json, groups the unfinished shards into tasks (``--shards-per-task`` shards each), and
submits the tasks as SLURM array jobs with submitit, at most MaxArraySize tasks per array. Each
array task runs ``ShardTask`` (jobs/slurm_task.py): torchrun with ``--gpus`` ranks on its node,
over its own shards only. Only that small object is pickled; everything else is read from OUT.

    OUT/slurm/submissions.json   every submission: array job ids, tasks and their shards
    OUT/slurm/JOBID/             submitit's sbatch scripts, pickles and task logs
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from jobs.errors import JobError
from jobs.store import OutputDir, write_json

DEFAULT_MAX_ARRAY_SIZE = 1001
"""SLURM's default MaxArraySize: array indices are 0 .. MaxArraySize - 1."""
SIGNAL_DELAY_S = 90
"""submitit sends its USR2 checkpoint signal this many seconds before the time limit."""
MAX_TIMEOUT_REQUEUES = 20
"""Requeues after a time-out before a task gives up (each requeue resumes, so it makes progress)."""

_PENDING = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "RESV_DEL_HOLD",
            "SUSPENDED", "STOPPED", "RESIZING", "SIGNALING"}  # fmt: skip
_RUNNING = {"RUNNING", "COMPLETING", "STAGE_OUT"}


@dataclass(frozen=True)
class SlurmOptions:
    """The SLURM knobs of `gen batch --slurm` (sbatch's names; see `man sbatch`)."""

    partition: str | None = None
    """sbatch --partition; None: the cluster's default partition."""
    time: str = "60"
    """sbatch --time per task, in SLURM's formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    account: str | None = None
    qos: str | None = None
    cpus_per_task: int | None = None
    """CPU cores per task (one task per node); None: SLURM's default."""
    mem: str | None = None
    """sbatch --mem per node, e.g. "64G"; None: SLURM's default."""
    array_parallelism: int | None = None
    """Tasks of an array that run at once (sbatch --array=...%N); None: all."""
    setup: tuple[str, ...] = ()
    """Shell lines run in the batch script before the task (module loads, conda activate)."""
    extra: tuple[tuple[str, str], ...] = ()
    """Further sbatch options as (name, value); value "" gives a bare flag."""
    shards_per_task: int = 1
    """Consecutive unfinished shards per array task, >= 1."""
    requeue: bool = True
    """Submit with --requeue, so that `scontrol requeue` and preemption put a task back in the
    queue (it resumes at its first unfinished sample)."""
    wait: bool = False
    """Block until every submitted shard is done, with a progress bar."""

    def __post_init__(self) -> None:
        self.time_minutes  # noqa: B018  (validates --time)
        for option, value in (("--cpus-per-task", self.cpus_per_task),
                              ("--array-parallelism", self.array_parallelism),
                              ("--shards-per-task", self.shards_per_task)):  # fmt: skip
            if value is not None and value < 1:
                raise JobError(f"{option} {value} is invalid: must be >= 1")
        if self.mem is not None and not re.fullmatch(r"\d+[KMGT]?B?", self.mem, re.IGNORECASE):
            raise JobError(f"--mem {self.mem!r} is invalid: a size such as 64G or 16000M")

    @property
    def time_minutes(self) -> int:
        """--time in whole minutes (rounded up), >= 1.

        Raises:
            JobError: not one of SLURM's time formats.
        """
        return parse_slurm_time(self.time)


def parse_slurm_time(value: str) -> int:
    """A SLURM time limit in minutes, rounded up: "90", "1:30:00", "2-00", "1-12:00:00".

    Formats (sbatch --time): M, M:S, H:M:S, D-H, D-H:M, D-H:M:S.

    Raises:
        JobError: not one of those formats, or zero.
    """
    text = str(value).strip()
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if not m:
        raise JobError(f"--time {value!r} is invalid: use M, M:S, H:M:S, D-H, D-H:M or D-H:M:S")
    days, a, b, c = (int(g) if g else None for g in m.groups())
    if days is not None:  # D-H, D-H:M, D-H:M:S
        seconds = days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    elif c is not None:  # H:M:S
        seconds = a * 3600 + b * 60 + c
    elif b is not None:  # M:S
        seconds = a * 60 + b
    else:  # M
        seconds = a * 60
    if seconds <= 0:
        raise JobError(f"--time {value!r} is invalid: must be positive")
    return -(-seconds // 60)


def parse_extra(items: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """``--slurm-extra`` values: "KEY=VALUE" (or a bare "KEY" flag) -> ((key, value), ...).

    Keys are sbatch long option names without dashes ("constraint", "gres", "exclusive").

    Raises:
        JobError: an empty key, or a key with characters other than letters, digits, - and _.
    """
    pairs = []
    for item in items:
        key, _, value = item.partition("=")
        key = key.strip().lstrip("-")
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", key):
            raise JobError(f"--slurm-extra {item!r} is invalid: use KEY=VALUE with an sbatch "
                           "option name as KEY, e.g. --slurm-extra constraint=a100")  # fmt: skip
        pairs.append((key, value))
    return tuple(pairs)


def sbatch_parameters(options: SlurmOptions, *, gpus: int, job_name: str) -> dict[str, Any]:
    """Keyword arguments of ``submitit.SlurmExecutor.update_parameters`` for one array.

    One task per node (``--ntasks-per-node=1``): the task starts torchrun, which starts the
    ``gpus`` ranks. ``--gpus-per-node`` asks for the GPUs, so SLURM sets CUDA_VISIBLE_DEVICES.
    ``--slurm-extra`` entries override anything set here (``gpus_per_node=0`` on a cluster
    without GPU GRES, for CPU ranks).
    """
    params: dict[str, Any] = {
        "job_name": job_name,
        "time": options.time_minutes,
        "nodes": 1,
        "ntasks_per_node": 1,
        "gpus_per_node": gpus,
        "signal_delay_s": SIGNAL_DELAY_S,
        "setup": list(options.setup),
    }
    for key in ("partition", "account", "qos", "cpus_per_task", "mem", "array_parallelism"):
        value = getattr(options, key)
        if value is not None:
            params[key] = value
    additional: dict[str, Any] = {"requeue": True} if options.requeue else {}
    for key, value in options.extra:
        key = key.replace("-", "_")
        if key in params and key not in ("setup", "signal_delay_s"):
            params.pop(key)
        additional[key] = True if value == "" else value
    params["additional_parameters"] = additional
    return params


def max_array_size() -> int:
    """The cluster's MaxArraySize (``scontrol show config``); 1001 when it cannot be read."""
    try:
        text = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True,
                              timeout=30).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return DEFAULT_MAX_ARRAY_SIZE
    m = re.search(r"^MaxArraySize\s*=\s*(\d+)", text, re.MULTILINE)
    return int(m.group(1)) if m and int(m.group(1)) > 0 else DEFAULT_MAX_ARRAY_SIZE


def group_shards(shard_indices: Sequence[int], shards_per_task: int) -> list[list[int]]:
    """Consecutive groups of ``shards_per_task`` shard indices, in order (the last may be short)."""
    items = list(shard_indices)
    return [items[i : i + shards_per_task] for i in range(0, len(items), shards_per_task)]


def split_arrays(num_tasks: int, max_array_size: int) -> list[range]:
    """Task index ranges of the arrays to submit: each at most ``max_array_size`` tasks, because
    SLURM rejects array indices >= MaxArraySize.

    Raises:
        ValueError: max_array_size < 1.
    """
    if max_array_size < 1:
        raise ValueError(f"MaxArraySize {max_array_size} < 1")
    return [range(i, min(i + max_array_size, num_tasks)) for i in range(0, num_tasks, max_array_size)]


def task_scope(shard_indices: Sequence[int]) -> str:
    """A task's name, for its per-run files: ``task-NNNNN`` after its first shard."""
    return f"task-{shard_indices[0]:05d}"


# -- the queue -------------------------------------------------------------------------------


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


# -- submission ------------------------------------------------------------------------------


def submit_tasks(out: OutputDir, tasks: list[list[int]], *, options: SlurmOptions,
                 gpus: int) -> dict[str, Any]:  # fmt: skip
    """Submit ``tasks`` (lists of shard indices) as SLURM arrays; returns the submission record
    (also appended to OUT/slurm/submissions.json).

    Raises:
        JobError: sbatch refused the submission (its message is included).
    """
    import submitit

    from jobs.slurm_task import ShardTask

    executor = submitit.SlurmExecutor(folder=out.root / "slurm" / "%j",
                                      max_num_timeout=MAX_TIMEOUT_REQUEUES)  # fmt: skip
    executor.update_parameters(**sbatch_parameters(options, gpus=gpus, job_name=f"gen-{out.root.name}"))
    record: dict[str, Any] = {"submitted_at": time.time(), "array_job_ids": [], "tasks": []}
    for chunk in split_arrays(len(tasks), max_array_size()):
        calls = [ShardTask(str(out.root.resolve()), tuple(tasks[i]), gpus) for i in chunk]
        try:
            with executor.batch():
                jobs = [executor.submit(call) for call in calls]
        except (submitit.core.utils.FailedJobError, subprocess.CalledProcessError, OSError) as exc:
            _save_submission(out, record)
            raise JobError(f"sbatch refused the array: {_sbatch_message(exc)}") from None
        record["array_job_ids"].append(jobs[0].job_id.split("_")[0])
        record["tasks"] += [{"job_id": job.job_id, "scope": call.scope, "shards": list(call.shard_indices)}
                            for job, call in zip(jobs, calls)]  # fmt: skip
        _save_submission(out, record)
    return record


def _save_submission(out: OutputDir, record: dict[str, Any]) -> None:
    if not record["tasks"]:
        return
    submissions = [s for s in read_submissions(out) if s["submitted_at"] != record["submitted_at"]]
    write_json(out.root / "slurm" / "submissions.json", [*submissions, record])


def _sbatch_message(exc: BaseException) -> str:
    text = str(exc)
    m = re.search(r"sbatch: error: (.*)", text)
    return m.group(1).strip() if m else text.strip().splitlines()[-1] if text.strip() else repr(exc)


def describe_submission(record: dict[str, Any], out: OutputDir) -> str:
    """How to follow a submission, for the CLI."""
    ids = ",".join(record["array_job_ids"])
    return (f"submitted {len(record['tasks'])} task(s) as SLURM array job(s) {ids}; follow with "
            f"`gen status {shlex.quote(str(out.root))}` or `squeue -j {ids}`; "
            f"logs: {out.root / 'slurm'}/")  # fmt: skip
