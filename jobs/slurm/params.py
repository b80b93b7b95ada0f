"""sbatch parameters of `gen batch --slurm`: the options, their checks, and how tasks fill arrays.

A `gen batch --slurm` job is the same job as a local one: the submitter (jobs.slurm.submit) plans
it and writes OUT/job.json, groups the unfinished shards into tasks (``--shards-per-task`` shards
each), and submits the tasks as SLURM array jobs with submitit, at most MaxArraySize tasks per
array. Each array task runs ``ShardTask`` (jobs.slurm.task): torchrun with ``--gpus`` ranks on
its node, over its own shards only. This module is pure but for one ``scontrol`` call
(``max_array_size``): the dry run plans arrays with it without importing submitit.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from jobs.errors import JobError

DEFAULT_MAX_ARRAY_SIZE = 1001
"""SLURM's default MaxArraySize: array indices are 0 .. MaxArraySize - 1."""
SIGNAL_DELAY_S = 90
"""submitit sends its USR2 checkpoint signal this many seconds before the time limit."""
ACCELERATORS = ("gpu", "npu")
"""Values of --accelerator: how --gpus is requested from SLURM."""
MAX_TIMEOUT_REQUEUES = 20
"""Requeues after a time-out before a task gives up (each requeue resumes, so it makes progress)."""


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
    role_extra: tuple[tuple[str, str, str], ...] = ()
    """sbatch options of one role's arrays in a split job, as (role, name, value)
    (``--role-slurm-extra decoder:partition=small``); they override ``extra``."""
    shards_per_task: int = 1
    """Consecutive unfinished shards per array task, >= 1."""
    requeue: bool = True
    """Submit with --requeue, so that `scontrol requeue` and preemption put a task back in the
    queue (it resumes at its first unfinished sample)."""
    wait: bool = False
    """Block until every submitted shard is done, with a progress bar."""
    accelerator: str = "gpu"
    """What ``--gpus`` asks SLURM for per node: "gpu" (``--gpus-per-node``; SLURM sets
    CUDA_VISIBLE_DEVICES) or "npu" (``--gres=npu:N``, the GRES name of Ascend clusters; the
    node's prolog sets ASCEND_RT_VISIBLE_DEVICES). Another GRES name: ``--slurm-extra gres=...``."""

    def __post_init__(self) -> None:
        self.time_minutes  # noqa: B018  (validates --time)
        if self.accelerator not in ACCELERATORS:
            raise JobError(f"--accelerator {self.accelerator!r} is invalid: one of {', '.join(ACCELERATORS)}")
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


def parse_role_extra(items: Sequence[str]) -> tuple[tuple[str, str, str], ...]:
    """``--role-slurm-extra`` values: "ROLE:KEY=VALUE" -> ((role, key, value), ...).

    Raises:
        JobError: ROLE is not encoder, denoiser or decoder, or KEY=VALUE is invalid (parse_extra).
    """
    found = []
    for item in items:
        role, sep, rest = item.partition(":")
        if not sep or role not in ("encoder", "denoiser", "decoder"):
            raise JobError(f"--role-slurm-extra {item!r} is invalid: ROLE:KEY=VALUE with ROLE one of "
                           "encoder, denoiser, decoder, e.g. decoder:partition=small")  # fmt: skip
        found += [(role, k, v) for k, v in parse_extra([rest])]
    return tuple(found)


def role_options(options: SlurmOptions, role: str) -> SlurmOptions:
    """``options`` for one role's arrays: its --role-slurm-extra entries appended to extra
    (later entries win); a ``partition`` / ``mem`` / ... entry replaces the job-wide option."""
    from dataclasses import replace

    own = tuple((k, v) for r, k, v in options.role_extra if r == role)
    return replace(options, extra=options.extra + own)


def sbatch_parameters(options: SlurmOptions, *, gpus: int, job_name: str) -> dict[str, Any]:
    """Keyword arguments of ``submitit.SlurmExecutor.update_parameters`` for one array.

    One task per node (``--ntasks-per-node=1``): the task starts torchrun, which starts the
    ``gpus`` ranks. ``--gpus-per-node`` asks for the GPUs, so SLURM sets CUDA_VISIBLE_DEVICES;
    with ``accelerator="npu"``, ``--gres=npu:<gpus>`` asks for Ascend NPUs instead.
    ``--slurm-extra`` entries override anything set here (``gpus_per_node=0`` on a cluster
    without GPU GRES, for CPU ranks; ``gres=npu:910b:8`` for a typed GRES).
    """
    params: dict[str, Any] = {
        "job_name": job_name,
        "time": options.time_minutes,
        "nodes": 1,
        "ntasks_per_node": 1,
        **({"gres": f"npu:{gpus}"} if options.accelerator == "npu" else {"gpus_per_node": gpus}),
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
