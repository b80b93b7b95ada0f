"""The work of one SLURM array task: its shards, on this node's ranks, resumable on requeue.

This module is what submitit pickles by reference (``ShardTask``); it must stay importable on
the compute nodes and cheap to import.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from jobs.local.signals import StopNow, StopRequest
from jobs.output.store import OutputDir, write_json
from jobs.plan import select_shards

TASK_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)
"""What stops a task's ranks at their next micro-batch boundary (jobs.local.signals)."""


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

    Signals (SLURM sends them to every process of the task): on submitit's USR2 (preemption, or
    the time limit near) and on SIGTERM (``scontrol requeue``, preemption, scancel, the time
    limit reached, KillWait before the SIGKILL), the ranks stop at their next micro-batch
    boundary and flush (jobs.local.signals); the task writes one ``interrupted (SIG...): ...``
    line to its log. Then USR2, and a SIGTERM once submitit finds the time limit reached, go
    on to submitit's checkpoint and requeue, as before; another SIGTERM ends the attempt with
    status 143 and leaves the requeue to SLURM (a requeue or a preemption requeues it, scancel
    does not).
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
            SystemExit: a signal stopped the task (see the class docstring).
        """
        from jobs.job import new_run_id
        from jobs.local.launch import run_shards
        from parallel.cpus import threads_per_rank

        out = OutputDir(self.out_dir, self.scope)
        cores, bound = _task_cores()
        threads = threads_per_rank(self.gpus, cores, os.environ.get("OMP_NUM_THREADS"))
        attempt = self._record_attempt(out, threads)
        stop = StopRequest()
        with stop.handling(TASK_SIGNALS):  # submitit's own handlers are called after the flush
            job = json.loads(out.job_json.read_text())
            stop.grace_s = job["config"].get("collective_timeout_s", stop.grace_s)
            shards = select_shards(job["manifest"]["num_rows"], job["config"]["shard_size"],
                                   list(self.shard_indices))  # fmt: skip
            stop.counts(out.root, shards, in_process=self.gpus == 1 and self.role is None)
            try:
                # A requeued attempt may start while the previous one still exits: wait for its locks.
                run_shards(out, new_run_id(), gpus=self.gpus, threads=threads,
                           shard_indices=list(self.shard_indices), pin_cpus=bound, lock_wait_s=120.0,
                           role=self.role, stop=stop)  # fmt: skip
            except StopNow:
                pass
        if stop.interrupted() is not None:
            self._stopped(out, stop, attempt)
        attempt["finished_at"] = time.time()
        self._save(out, attempt)
        return attempt

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """submitit's preemption / time-out hook: requeue this same task (it resumes from OUT)."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self)

    def _stopped(self, out: OutputDir, stop: StopRequest, attempt: dict[str, Any]) -> None:
        """The end of an attempt stopped by a signal: one line in the log, then submitit's
        checkpoint and requeue (USR2; SIGTERM at the time limit) or exit 128 + the signal."""
        checkpoint = stop.previous_handler(signal.SIGUSR2)  # submitit's, in a submitit task
        handler = getattr(checkpoint, "__self__", None)
        requeue = callable(checkpoint) and (
            stop.signum == signal.SIGUSR2
            or (stop.signum == signal.SIGTERM and hasattr(handler, "has_timed_out") and handler.has_timed_out())
        )  # fmt: skip
        stop.then = ("requeueing the task: it resumes at its first unfinished sample" if requeue else
                     "this attempt ends; a requeued task resumes, else re-run the same command")  # fmt: skip
        line = stop.line().replace("interrupted:", f"interrupted ({stop.name}):", 1)
        print(line, file=sys.stderr, flush=True)
        attempt["interrupted"] = {"signal": stop.name, "at": time.time(), "requeue": requeue}
        self._save(out, attempt)
        if requeue:
            checkpoint(stop.signum, None)  # submitit: checkpoint, scontrol requeue, exit
        sys.exit(stop.exit_code)

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
