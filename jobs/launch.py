"""Run a `gen batch` job on this node: plan, job.json, ranks (in-process or torchrun), summary."""

from __future__ import annotations

import contextlib
import json
import os
import platform as pyplatform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from jobs import __version__
from jobs.config import BatchConfig
from jobs.errors import JobError
from jobs.lock import ShardLocks
from jobs.manifest import Manifest, open_manifest, total_images
from jobs.plan import Shard, num_shards, plan_shards, select_shards
from jobs.progress import ProgressMonitor
from jobs.store import OutputDir, write_json
from jobs.summary import build_summary
from pipeline.loading import ModelRef, resolve_model


class RunFailed(RuntimeError):
    """A rank failed; finished shards and flushed samples are kept for a re-run."""


def default_out_dir(manifest: str) -> str:
    """``prompts.parquet`` -> ``prompts-gen`` beside it."""
    p = Path(manifest)
    return str(p.with_name(f"{p.stem}-gen"))


def _versions() -> dict[str, str]:
    names = ("torch", "diffusers", "transformers", "pyarrow")
    found = {n: metadata.version(n) for n in names}
    return {"gen": __version__, "python": pyplatform.python_version(), **found}


def _job_record(config: BatchConfig, manifest: Manifest, model: ModelRef, threads: int,
                device_kind: str) -> dict[str, Any]:  # fmt: skip
    return {
        "config": config.to_dict(),
        "model": asdict(model),
        "threads_per_rank": threads,
        "platform": device_kind,
        "manifest": {
            "path": manifest.path,
            "num_rows": manifest.num_rows,
            "fingerprint": manifest.fingerprint,
        },
        "num_shards": num_shards(manifest.num_rows, config.shard_size or 1),
        "layout": _layout(config),
        "versions": _versions(),
    }


def _layout(config: BatchConfig) -> dict[str, Any]:
    dims = config.dims
    return {
        "world_size": dims.world_size,
        "dp": dims.dp_size,
        "cfg": dims.cfg,
        "cfg_groups": [dims.cfg_group(d) for d in range(dims.dp_size)],
        "branch_rule": "branch i of a step runs on cfg rank i % cfg; sample j of a micro-batch "
        "is decoded and written by cfg rank j % cfg",
    }


def job_differences(out: OutputDir, fingerprint: str, config: BatchConfig) -> list[str]:
    """How this job differs from the one OUT/job.json records: "the manifest's contents" (by
    ``fingerprint``) and each generation option as "name (old -> new)"; [] when OUT holds no
    job or the same one (it resumes)."""
    if not out.job_json.exists():
        return []
    old = json.loads(out.job_json.read_text())
    diffs = []
    if old["manifest"]["fingerprint"] != fingerprint:
        diffs.append("the manifest's contents")
    old_opts = BatchConfig.from_dict(old["config"]).generation_options()
    for k, v in config.generation_options().items():
        if old_opts.get(k) != v:
            diffs.append(f"{k} ({old_opts.get(k)!r} -> {v!r})")
    return diffs


def _check_same_job(out: OutputDir, record: dict[str, Any], config: BatchConfig) -> None:
    diffs = job_differences(out, record["manifest"]["fingerprint"], config)
    if diffs:
        raise JobError(
            f"--out {out.root} holds a different job: {', '.join(diffs)} differ; "
            "use --overwrite to replace it, or another --out"
        )


def _clear(out: OutputDir) -> None:
    for name in ("samples", "steps", "done", ".gen", "slurm"):
        shutil.rmtree(out.root / name, ignore_errors=True)
    for f in (out.job_json, out.summary_json):
        f.unlink(missing_ok=True)


@dataclass
class PreparedJob:
    """A job whose job.json is written: what a local run or a SLURM submission needs."""

    config: BatchConfig
    out: OutputDir
    manifest: Manifest
    shards: list[Shard]
    threads: int
    """CPU threads per rank on this node (a SLURM task computes its own)."""

    @property
    def pending(self) -> list[Shard]:
        """Shards without a done marker, in order."""
        return [s for s in self.shards if not self.out.is_done(s)]

    @property
    def with_errors(self) -> list[Shard]:
        """Done shards that hold error samples (per their done markers), in order."""
        return [s for s in self.shards
                if (self.out.done_marker(s.name) or {}).get("samples_error")]  # fmt: skip

    def total_images(self, shards: list[Shard]) -> int:
        """Samples planned in ``shards`` (error rows included)."""
        return sum(total_images(self.manifest, s.start, s.stop, self.config.images_per_prompt)
                   for s in shards)  # fmt: skip


def prepare_job(config: BatchConfig, *, overwrite: bool, echo: Callable[[str], None],
                on_this_node: bool = True) -> PreparedJob:  # fmt: skip
    """Check the manifest, model and options, print the notices, and write OUT/job.json.

    Args:
        config: the job's options.
        overwrite: replace an --out directory that holds a different job.
        echo: where one-line notices go.
        on_this_node: the ranks run here (False for a SLURM submission: devices are not checked).
    Raises:
        JobError: bad manifest, options, or an --out holding another job.
    """
    manifest = open_manifest(config.manifest)
    out = OutputDir(config.out)
    try:
        model = resolve_model(config.model)
    except ValueError as exc:
        raise JobError(str(exc)) from None
    if model.smoke_test:
        echo(f"model: {model.name} is a built-in random-weight smoke-test model (images are noise)")

    from parallel.platform import available_cores, detect_platform, threads_per_rank

    platform = detect_platform()
    if on_this_node and platform.name != "cpu" and config.gpus > platform.num_devices:
        raise JobError(f"--gpus {config.gpus}: only {platform.num_devices} {platform.name} "
                       "devices are visible")  # fmt: skip
    try:
        threads = threads_per_rank(config.gpus, available_cores(), os.environ.get("OMP_NUM_THREADS"))
    except ValueError as exc:
        raise JobError(str(exc)) from None
    if on_this_node and platform.name == "cpu":
        echo(f"no GPU: running {config.gpus} CPU rank(s) on gloo, {threads} thread(s) each")
    echo(f"layout: {config.dims.describe()}" + ("" if on_this_node else " per SLURM task"))
    gating = config.cfg_gate_step < 1 or config.cfg_gate_cosine is not None
    if gating and config.guidance_scale <= 1:
        echo(f"warning: CFG gating has no effect: --guidance-scale {config.guidance_scale:g} <= 1 "
             "runs no unconditional forward to skip")  # fmt: skip

    record = _job_record(config, manifest, model, threads, platform.name)
    if overwrite or on_this_node:
        _check_no_queued_tasks(out)
    if overwrite:
        with ShardLocks(out.root, new_run_id(), "overwrite") as probe:
            probe.acquire_existing()  # refuse to wipe shards a live run is writing
            _clear(out)
    _check_same_job(out, record, config)
    write_json(out.job_json, record)
    shards = plan_shards(manifest.num_rows, config.shard_size or 1)
    return PreparedJob(config, out, manifest, shards, threads)


def run_batch(config: BatchConfig, *, launch_wall: float | None = None, overwrite: bool = False,
              retry_errors: bool = False, echo: Callable[[str], None] = print) -> dict[str, Any]:  # fmt: skip
    """Run a job on this node and return its summary (also OUT/summary.json).

    Args:
        config: the job's options.
        launch_wall: time.time() at CLI start (default: now), for startup_s.
        overwrite: replace an --out directory that holds a different job.
        retry_errors: generate the samples whose status is "error" again (and only those,
            with the shards not yet done).
        echo: where one-line notices go.
    Raises:
        JobError: bad manifest, options, an --out holding another job, or shards being written
            by another run.
        RunFailed: a rank failed (its error has been printed).
    """
    launch_wall = launch_wall or time.time()
    job = prepare_job(config, overwrite=overwrite, echo=echo)
    out = job.out
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
                           locks=locks)  # fmt: skip
    return build_summary(out, launch_wall=launch_wall, num_shards=len(job.shards))


def reopen_errors(job: PreparedJob, shards: list[Shard], echo: Callable[[str], None]) -> int:
    """``--retry-errors``: make the error samples of ``shards`` unfinished (their write locks
    must be held), so that the next run generates them again. Returns how many."""
    tag = f"retry{time.time_ns()}"
    counts = {s.name: job.out.reopen_errors(s, tag) for s in shards}
    total = sum(counts.values())
    echo(f"retry-errors: {total} error sample(s) in {sum(1 for c in counts.values() if c)} "
         "shard(s) will be generated again")  # fmt: skip
    return total


def _check_no_queued_tasks(out: OutputDir) -> None:
    """A local run into an OUT whose SLURM tasks are still queued would run their shards twice."""
    from jobs.slurm import queue_states

    states = queue_states(out)
    if states:
        raise JobError(f"--out {out.root}: {len(states)} SLURM task(s) of this job are still queued "
                       f"or running ({', '.join(sorted(states))}); wait for them (`gen status "
                       f"{out.root}`) or scancel them first")  # fmt: skip


def new_run_id() -> str:
    """A run id unique on this machine: seconds since the epoch and the pid."""
    return f"{int(time.time())}{os.getpid()}"


def run_shards(out: OutputDir, run_id: str, *, gpus: int, threads: int,
               shard_indices: list[int] | None = None, pin_cpus: bool = True,
               echo: Callable[[str], None] = print, locks: ShardLocks | None = None,
               lock_wait_s: float = 0.0) -> None:  # fmt: skip
    """Run ``gpus`` ranks over the shards (None: all) on this node, under ``out.scope``.

    The run first takes the write lock of every unfinished shard it covers (jobs.lock): a shard
    that another live run is writing makes it refuse; a stale lock (its run was killed) is taken
    over, and so is a commit lock that a run killed mid-commit left. One rank runs in this
    process; more run under ``torchrun --standalone`` (c10d rendezvous on localhost with a free
    port, so two runs on one node do not collide), which holds the locks with this process and
    is killed by the kernel if this process dies (and its ranks with it). ``locks``: locks the
    caller already holds for this run (taken here when None, and released on return).
    ``lock_wait_s``: how long to keep trying while another run holds some of the locks (a
    requeued SLURM attempt whose previous attempt is still exiting); 0 refuses at once.

    Raises:
        JobError: the job cannot run (a shard is locked by another run; a rank found the job
            invalid, e.g. a size the model cannot make).
        RunFailed: a rank failed; the message is the root cause among the ranks' reports.
    """
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
        _run_ranks(out, run_id, gpus=gpus, threads=threads, shard_indices=shard_indices,
                   pin_cpus=pin_cpus, lock_fds=locks.fds)  # fmt: skip


def _run_ranks(out: OutputDir, run_id: str, *, gpus: int, threads: int,
               shard_indices: list[int] | None, pin_cpus: bool, lock_fds: list[int]) -> None:  # fmt: skip
    if gpus == 1:
        from jobs.worker import run_rank

        run_rank(str(out.root), run_id, rank=0, world_size=1, local_rank=0, threads=threads,
                 scope=out.scope, shard_indices=shard_indices, pin_cpus=pin_cpus)  # fmt: skip
        return
    from jobs.worker import format_shards

    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    cmd = [
        sys.executable, "-m", "jobs.torchrun", str(os.getpid()), "--standalone",
        f"--nproc-per-node={gpus}", "-m", "jobs.worker", str(out.root), run_id, out.scope,
        format_shards(shard_indices), *([] if pin_cpus else ["--no-pin"]),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, pass_fds=lock_fds)
    if proc.returncode != 0:
        report = _first_failure(out)
        if report is not None and report.get("job_error"):
            raise JobError(report["error"])
        cause = _describe_failure(report, proc.returncode)
        raise RunFailed(
            f"{cause}. Finished shards and flushed samples are kept: re-run the same command "
            "to resume."
        )


def _first_failure(out: OutputDir) -> dict[str, Any] | None:
    """The root cause among the ranks' error reports: the earliest error that is not a broken
    collective (those follow another rank's failure), else the earliest one; None if none."""
    reports = []
    for path in (out.run_dir / "ranks").glob("rank-*.error.json"):
        try:
            reports.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return min(reports, key=lambda r: (r["collective"], r["time"])) if reports else None


def _describe_failure(first: dict[str, Any] | None, returncode: int) -> str:
    if first is None:
        return f"a rank failed (torchrun exit {returncode}; a rank killed by a signal leaves " \
            "no report: see torchrun's report above)"
    hint = (" (a broken group follows another rank's failure; a rank that died or hung leaves "
            "no report of its own: see torchrun's report above)")  # fmt: skip
    return f"rank {first['rank']} failed: {first['error']}" + (hint if first["collective"] else "")
