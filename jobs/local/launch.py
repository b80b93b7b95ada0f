"""Run a `gen batch` job on this node: prepare it, lock its shards, start the ranks (in this
process, or under torchrun: jobs.local.torchrun, jobs.local.worker), and summarise it."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from jobs.config import BatchConfig
from jobs.errors import JobError, RunFailed
from jobs.faults import job_fault, spare_dir
from jobs.job import new_run_id, prepare_job, reopen_errors
from jobs.local.signals import StopNow, StopRequest, raise_stop_now, stoppable, wait_torchrun
from jobs.output.lock import ShardLocks
from jobs.output.progress import ProgressMonitor
from jobs.output.store import OutputDir
from jobs.output.summary import build_summary
from jobs.plan import select_shards


@stoppable
def run_batch(config: BatchConfig, *, launch_wall: float | None = None, overwrite: bool = False,
              retry_errors: bool = False, echo: Callable[[str], None] = print,
              stop: StopRequest) -> dict[str, Any]:  # fmt: skip
    """Run a job on this node and return its summary (also OUT/summary.json).

    Args:
        config: the job's options.
        launch_wall: time.time() at CLI start (default: now), for startup_s.
        overwrite: replace an --out directory that holds a different job.
        retry_errors: generate the samples whose status is "error" again (and only those,
            with the shards not yet done).
        echo: where one-line notices go.
        stop: given by ``stoppable``, which handles SIGINT and SIGTERM for the whole call.
    Raises:
        JobError: bad manifest, options, an --out holding another job, or shards being written
            by another run; a full disk, an --out that cannot be written (jobs.faults).
        RunFailed: a rank failed (its error has been printed).
        Interrupted: SIGINT or SIGTERM stopped the run before its shards were done
            (jobs.local.signals); what it finished is kept.
    """
    launch_wall = launch_wall or time.time()
    stop.grace_s = config.collective_timeout_s
    job = prepare_job(config, overwrite=overwrite, echo=echo)
    out = job.out
    stop.counts(out.root, job.shards, in_process=config.gpus == 1 and not config.split)
    run_id = new_run_id()
    with ShardLocks(out.root, run_id, out.scope) as locks:
        pending, errored = job.pending, (job.with_errors if retry_errors else [])
        locks.acquire(pending + errored)
        if retry_errors:
            reopen_errors(job, errored + pending, echo)
            pending = job.pending  # now with the reopened shards
        echo(f"plan: {job.manifest.num_rows} rows -> {len(job.shards)} shard(s) of "
             f"{config.shard_size} rows; {len(pending)} to run; out: {out.root}")  # fmt: skip
        shutil.rmtree(out.runs, ignore_errors=True)
        if pending:
            with ProgressMonitor(out.run_dir / "progress", job.total_images(pending)):
                run_shards(out, run_id, gpus=config.gpus, threads=job.threads, echo=echo,
                           locks=locks, stop=stop)  # fmt: skip
    return build_summary(out, launch_wall=launch_wall, num_shards=len(job.shards))


def run_shards(out: OutputDir, run_id: str, *, gpus: int, threads: int,
               shard_indices: list[int] | None = None, pin_cpus: bool = True,
               echo: Callable[[str], None] = print, locks: ShardLocks | None = None,
               lock_wait_s: float = 0.0, role: str | None = None,
               stop: StopRequest | None = None) -> None:  # fmt: skip
    """Run ``gpus`` ranks over the shards (None: all) on this node, under ``out.scope``.

    The run first takes the write lock of every unfinished shard it covers (jobs.output.lock): a shard
    that another live run is writing makes it refuse; a stale lock (its run was killed) is taken
    over, and so is a commit lock that a run killed mid-commit left. One rank runs in this
    process; more run under ``torchrun --standalone`` (c10d rendezvous on localhost with a free
    port, so two runs on one node do not collide), which holds the locks with this process and
    is killed by the kernel if this process dies (and its ranks with it). ``locks``: locks the
    caller already holds for this run (taken here when None, and released on return).
    ``lock_wait_s``: how long to keep trying while another run holds some of the locks (a
    requeued SLURM attempt whose previous attempt is still exiting); 0 refuses at once.
    ``role``: run only this role of a split job, without waiting for its upstream (a SLURM
    role task, started by its aftercorr dependency once the upstream task succeeded).
    ``stop``: the caller's stop request (jobs.local.signals; the caller owns the handlers): once
    asked, the ranks stop at their next micro-batch boundary and this returns, maybe with shards
    unfinished (the caller says so); a second Ctrl-C ends the ranks at once.

    Raises:
        JobError: the job cannot run (a shard is locked by another run; a rank found the job
            invalid, e.g. a size the model cannot make; a full disk, an unwritable OUT, the
            manifest gone: jobs.faults).
        RunFailed: a rank failed; the message is the root cause among the ranks' reports.
    """
    stop = stop or StopRequest()
    job = json.loads(out.job_json.read_text())
    num_rows, shard_size = job["manifest"]["num_rows"], job["config"]["shard_size"]
    shards = select_shards(num_rows, shard_size, shard_indices)
    with contextlib.ExitStack() as stack:
        if locks is None:
            locks = stack.enter_context(ShardLocks(out.root, run_id, out.scope))
        unfinished = [s for s in shards if not out.is_done(s)]
        locks.acquire(unfinished, wait_s=lock_wait_s)
        # A run killed after a commit leaves the shard's lock file, and maybe its parts.
        locks.sweep((s.name for s in shards if s not in unfinished),
                    lambda name: shutil.rmtree(out.root / ".gen" / "shards" / name, ignore_errors=True))  # fmt: skip
        for stale in locks.stale:
            echo(stale.describe())
        for shard in unfinished:
            if out.clear_stale_commit(shard):
                echo(f"{shard.name}: removed the commit lock of a run killed while committing")
        stop.watch(out.run_dir / "stop")  # where ranks under torchrun look
        if stop.requested:
            return
        try:
            if job["config"].get("roles") == "split" or job["config"].get("role"):  # BatchConfig.split
                _run_roles(out, run_id, BatchConfig.from_dict(job["config"]), threads=threads, shard_indices=shard_indices,
                           lock_fds=locks.fds, only=role, stop=stop)  # fmt: skip
            else:
                _run_ranks(out, run_id, gpus=gpus, threads=threads, shard_indices=shard_indices,
                           pin_cpus=pin_cpus, lock_fds=locks.fds, stop=stop)  # fmt: skip
        except StopNow:  # a second Ctrl-C, the rank in this process
            return
        except OSError as exc:  # the rank in this process: a full disk, the manifest gone ...
            fault = job_fault(exc, out=out.root, manifest=job["config"].get("manifest"))
            if fault is None:
                raise
            raise fault from None


def _run_ranks(out: OutputDir, run_id: str, *, gpus: int, threads: int,
               shard_indices: list[int] | None, pin_cpus: bool, lock_fds: list[int],
               stop: StopRequest) -> None:  # fmt: skip
    if gpus == 1:
        from jobs.local.worker import run_rank

        run_rank(str(out.root), run_id, rank=0, world_size=1, local_rank=0, threads=threads,
                 scope=out.scope, shard_indices=shard_indices, pin_cpus=pin_cpus, stop=stop)  # fmt: skip
        return
    from jobs.local.worker import format_shards

    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    cmd = [
        sys.executable, "-m", "jobs.local.torchrun", str(os.getpid()), "--standalone",
        f"--nproc-per-node={gpus}", "-m", "jobs.local.worker", str(out.root), run_id, out.scope,
        format_shards(shard_indices), *([] if pin_cpus else ["--no-pin"]),
    ]  # fmt: skip
    returncode = wait_torchrun(subprocess.Popen(cmd, env=env, pass_fds=lock_fds), stop)
    if returncode != 0:
        report = _first_failure(out, run_id)
        if report is not None and report.get("job_error"):
            raise JobError(report["error"])
        if stop.requested:  # stopped on a signal (ranks that hung were SIGKILLed with torchrun)
            return
        cause = _describe_failure(report, returncode)
        raise RunFailed(
            f"{cause}. Finished shards and flushed samples are kept: re-run the same command "
            "to resume."
        )


def _run_roles(out: OutputDir, run_id: str, config: BatchConfig, *, threads: int,
               shard_indices: list[int] | None, lock_fds: list[int], only: str | None = None,
               stop: StopRequest) -> None:  # fmt: skip
    """A split job: each role's ranks under their own torchrun, all roles at once (pipelined:
    the denoiser starts a shard as soon as the encoder's stage file of it is done), or the one
    ``--role`` (or ``only``: without waiting). Device slots: denoiser ranks first (0..d-1), then encoder, then decoder, modulo
    the visible devices; ranks are not pinned to cores (roles share them). When a role's ranks
    exit, its ended marker tells the next role to stop waiting for shards it did not finish.
    After a stop request every role stops at its next boundary (the stop file); the torchruns
    still running on a second Ctrl-C or past the request's deadline are killed.

    Raises:
        JobError / RunFailed: as _run_ranks, for the first role that failed.
    """
    from jobs.local.stages import mark_role_ended
    from jobs.local.worker import format_shards
    from jobs.output.stages import StageFiles
    from pipeline.roles import ROLES

    counts = dict(config.role_gpus)
    rank_base = {r: sum(counts[q] for q in ROLES[: ROLES.index(r)]) for r in ROLES}
    slots = ("denoiser", "encoder", "decoder")
    device_base = {r: sum(counts[q] for q in slots[: slots.index(r)]) for r in slots}
    roles = [only or config.role] if (only or config.role) else list(ROLES)
    if len(roles) == 1:  # one role alone (a SLURM role task: its own node): devices from slot 0
        device_base = dict.fromkeys(ROLES, 0)
    wait = len(roles) > 1
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    procs = {}
    stages = StageFiles(out)
    job = json.loads(out.job_json.read_text())
    pending = [s for s in select_shards(job["manifest"]["num_rows"], config.shard_size, shard_indices)
               if not out.is_done(s)]  # fmt: skip
    for role in roles:
        later = ROLES[ROLES.index(role):-1]
        if role != "decoder" and not any(not any(stages.is_done(r, s) for r in later) for s in pending):
            mark_role_ended(out, role, 0)  # every shard is past this role (a resumed run)
            continue
        cmd = [
            sys.executable, "-m", "jobs.local.torchrun", str(os.getpid()), "--standalone",
            f"--nproc-per-node={counts[role]}", "-m", "jobs.local.worker", str(out.root), run_id, out.scope,
            format_shards(shard_indices), "--no-pin", "--role", role, "--rank-base", str(rank_base[role]),
            "--device-base", str(device_base[role]), *(["--wait-upstream"] if wait else []),
        ]  # fmt: skip
        procs[role] = subprocess.Popen(cmd, env=env, pass_fds=lock_fds)
    codes: dict[str, int] = {}

    def kill() -> None:
        stop.killed = True
        for proc in procs.values():
            with contextlib.suppress(ProcessLookupError):
                proc.kill()

    stop.at_once = kill
    try:
        while len(codes) < len(procs):
            for role, proc in procs.items():
                if role not in codes and proc.poll() is not None:
                    codes[role] = proc.returncode
                    mark_role_ended(out, role, proc.returncode)
            if stop.deadline is not None and time.monotonic() > stop.deadline:
                kill()
            time.sleep(0.05)
    finally:
        stop.at_once = raise_stop_now
    failed = [r for r in procs if codes[r] != 0]
    if failed:
        report = _first_failure(out, run_id)
        if report is not None and report.get("job_error"):
            raise JobError(report["error"])
        if stop.requested:  # stopped on a signal
            return
        cause = _describe_failure(report, codes[failed[0]])
        raise RunFailed(f"{failed[0]} role: {cause}. Finished shards, flushed samples and stage files are kept: "
                        "re-run the same command to resume.")  # fmt: skip


def _first_failure(out: OutputDir, run_id: str) -> dict[str, Any] | None:
    """The root cause among the ranks' error reports (in OUT, or in spare_dir when OUT could not
    take them): the earliest error that is not a broken collective (those follow another rank's
    failure), else the earliest one; None if none."""
    reports = []
    spare = spare_dir(run_id)
    for path in [*(out.run_dir / "ranks").glob("rank-*.error.json"), *spare.glob("rank-*.error.json")]:
        try:
            reports.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    shutil.rmtree(spare, ignore_errors=True)
    return min(reports, key=lambda r: (r["collective"], r["time"])) if reports else None


def _describe_failure(first: dict[str, Any] | None, returncode: int) -> str:
    if first is None:
        return f"a rank failed (torchrun exit {returncode}; a rank killed by a signal leaves " \
            "no report: see torchrun's report above)"
    hint = (" (a broken group follows another rank's failure; a rank that died or hung leaves "
            "no report of its own: see torchrun's report above)")  # fmt: skip
    return f"rank {first['rank']} failed: {first['error']}" + (hint if first["collective"] else "")
