"""The work of one SLURM array task: its shards, on this node's ranks, resumable on requeue.

This module is what submitit pickles by reference (``ShardTask``); it must stay importable on
the compute nodes and cheap to import.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from jobs.output.store import OutputDir, write_json


def task_scope(shard_indices: Sequence[int], role: str | None = None) -> str:
    """A task's name, for its per-run files: ``task-NNNNN`` after its first shard
    (``ROLE-task-NNNNN`` for one role of a split job)."""
    return f"{role + '-' if role else ''}task-{shard_indices[0]:05d}"


@dataclass(frozen=True)
class ShardTask:
    """One array task: run ``shard_indices`` of the job in ``out_dir`` on ``gpus`` ranks.

    Called by submitit on the compute node. Shards already done and samples already flushed are
    skipped, so a requeued task (``scontrol requeue``, preemption, time-out) resumes at its
    first unfinished sample; ``checkpoint`` is what submitit calls on its USR2 signal before
    requeueing.
    """

    out_dir: str
    shard_indices: tuple[int, ...]
    gpus: int
    role: str | None = None
    """One role of a split job (its array depends on the previous role's: aftercorr), or None."""

    @property
    def scope(self) -> str:
        """The task's per-run file scope, ``[ROLE-]task-NNNNN`` after its first shard."""
        return task_scope(self.shard_indices, self.role)

    def __call__(self) -> dict[str, Any]:
        """Run the task's shards; returns its attempt record (also in OUT/.gen/runs/SCOPE/task.json).

        Raises:
            RunFailed: a rank failed (the task ends FAILED; a re-run of the command resumes).
            JobError: the job cannot run on this node.
        """
        from jobs.job import new_run_id
        from jobs.local.launch import run_shards
        from parallel.cpus import threads_per_rank

        out = OutputDir(self.out_dir, self.scope)
        cores, bound = _task_cores()
        threads = threads_per_rank(self.gpus, cores, os.environ.get("OMP_NUM_THREADS"))
        attempt = self._record_attempt(out, threads)
        # A requeued attempt may start while the previous one is still exiting: wait for its locks.
        run_shards(out, new_run_id(), gpus=self.gpus, threads=threads,
                   shard_indices=list(self.shard_indices), pin_cpus=bound, lock_wait_s=120.0,
                   role=self.role)  # fmt: skip
        attempt["finished_at"] = time.time()
        self._save(out, attempt)
        return attempt

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """submitit's preemption / time-out hook: requeue this same task (it resumes from OUT)."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self)

    def _record_attempt(self, out: OutputDir, threads: int) -> dict[str, Any]:
        attempt = {
            "job_id": _slurm_job_id(),
            "restart_count": int(os.environ.get("SLURM_RESTART_COUNT") or 0),
            "host": socket.gethostname(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "ascend_rt_visible_devices": os.environ.get("ASCEND_RT_VISIBLE_DEVICES"),
            "threads_per_rank": threads,
            "started_at": time.time(),
            "finished_at": None,
        }
        self._save(out, attempt)
        return attempt

    def _save(self, out: OutputDir, attempt: dict[str, Any]) -> None:
        path = out.run_dir / "task.json"
        record = {"scope": self.scope, "shards": list(self.shard_indices), "attempts": []}
        if path.exists():
            record = json.loads(path.read_text())
        attempts = [a for a in record["attempts"] if a["started_at"] != attempt["started_at"]]
        record["attempts"] = [*attempts, attempt]
        record["restart_count"] = max(a["restart_count"] for a in record["attempts"])
        write_json(path, record)


def _slurm_job_id() -> str | None:
    array, index = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{index}" if array and index else os.environ.get("SLURM_JOB_ID")


def _task_cores() -> tuple[int, bool]:
    """(cores this task may use, whether SLURM bound the process to them).

    SLURM_CPUS_PER_TASK counts the allocation; without CPU binding (TaskPlugin=task/none) the
    process still sees every core of the node, and pinning ranks to "their" cores would stack
    the tasks that share a node onto the same ones.
    """
    from parallel.cpus import available_cores

    visible = available_cores()
    allocated = int(os.environ.get("SLURM_CPUS_PER_TASK") or visible)
    return min(visible, allocated), visible <= allocated
