"""`gen status OUT`: where a job stands, from its output directory (and squeue when it exists).

Everything but the queue comes from files under OUT, so status works while a run is going, after
it, and on a machine where SLURM is gone.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs.errors import JobError
from jobs.output.store import OutputDir
from jobs.output.submissions import count_states, queue_states, read_submissions


def job_status(out_dir: str) -> dict[str, Any]:
    """The status of the job in ``out_dir``.

    Returns:
        manifest, num_rows, shard_size; shards_total / shards_done; samples_ok / samples_error in
        done shards; in_flight_ok / in_flight_error: samples flushed in unfinished shards;
        tasks: None when nothing was submitted to SLURM, else submitted (count), array_job_ids,
        pending / running (None when squeue is unavailable); restarts: SLURM restarts over all
        tasks, by task; last_errors: newest task and rank errors, then the last error rows.
    Raises:
        JobError: ``out_dir`` holds no job.json.
    """
    out = OutputDir(out_dir)
    if not out.job_json.exists():
        raise JobError(f"{out_dir}: not a gen output directory (no job.json)")
    job = json.loads(out.job_json.read_text())
    markers = out.done_markers()
    ok, error = _in_flight(out)
    status: dict[str, Any] = {
        "out": str(out.root),
        "manifest": job["manifest"]["path"],
        "num_rows": job["manifest"]["num_rows"],
        "shard_size": job["config"]["shard_size"],
        "shards_total": job["num_shards"],
        "shards_done": len(markers),
        "samples_ok": sum(m["samples_ok"] for m in markers),
        "samples_error": sum(m["samples_error"] for m in markers),
        "in_flight_ok": ok,
        "in_flight_error": error,
        "tasks": None,
        "restarts": _restarts(out),
        "last_errors": last_errors(out, markers=markers),
        "roles": _role_progress(out, job) if job["config"].get("roles") == "split" or job["config"].get("role")
        else None,
    }
    submissions = read_submissions(out)
    if submissions:
        states = queue_states(out)
        pending, running = count_states(states) if states is not None else (None, None)
        status["tasks"] = {
            "submitted": sum(len(s["tasks"]) for s in submissions),
            "array_job_ids": [j for s in submissions for j in s["array_job_ids"]],
            "pending": pending,
            "running": running,
        }
        if status["roles"] is not None and states is not None:
            for role, info in status["roles"].items():
                mine = {t["job_id"]: states[t["job_id"]] for sub in submissions for t in sub["tasks"]
                        if t.get("role") == role and t["job_id"] in states}  # fmt: skip
                info["pending"], info["running"] = count_states(mine)
    return status


def _role_progress(out: OutputDir, job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A split job's shards past each role, from the files on disk: the encoder's are those with
    an encoder or denoiser stage file or done; the denoiser's, with a denoiser stage file or done;
    the decoder's, the done ones."""
    from jobs.output.stages import StageFiles
    from jobs.plan import plan_shards

    stages = StageFiles(out)
    shards = plan_shards(job["manifest"]["num_rows"], job["config"]["shard_size"])
    done = {s.index for s in shards if out.is_done(s)}
    denoised = done | {s.index for s in shards if stages.is_done("denoiser", s)}
    encoded = denoised | {s.index for s in shards if stages.is_done("encoder", s)}
    return {role: {"shards_done": len(found)} for role, found in
            (("encoder", encoded), ("denoiser", denoised), ("decoder", done))}  # fmt: skip


def format_status(status: dict[str, Any]) -> list[str]:
    """``job_status`` as the lines `gen status` prints."""
    lines = [
        f"job: {status['out']} ({status['num_rows']} rows of {status['manifest']}, "
        f"shards of {status['shard_size']} rows)",
        f"shards: {status['shards_done']} / {status['shards_total']} done",
        f"samples: {status['samples_ok']} ok, {status['samples_error']} error in done shards; "
        f"{status['in_flight_ok']} ok, {status['in_flight_error']} error flushed in unfinished shards",
    ]
    if status.get("roles"):
        total = status["shards_total"]
        parts = []
        for role, info in status["roles"].items():
            queue = f" ({info['pending']} pending, {info['running']} running)" if info.get("pending") is not None else ""
            parts.append(f"{role} {info['shards_done']}/{total}{queue}")
        lines.append("roles: " + ", ".join(parts) + " shards")
    tasks = status["tasks"]
    if tasks is None:
        lines.append("tasks: none submitted to SLURM")
    else:
        ids = ",".join(tasks["array_job_ids"])
        queue = ("queue unknown (squeue unavailable)" if tasks["pending"] is None
                 else f"{tasks['pending']} pending, {tasks['running']} running")  # fmt: skip
        lines.append(f"tasks: {tasks['submitted']} submitted (array job(s) {ids}); {queue}")
    restarts = status["restarts"]
    if restarts["total"]:
        each = ", ".join(f"{k}: {v}" for k, v in restarts["by_task"].items() if v)
        lines.append(f"restarts: {restarts['total']} ({each})")
    if status["last_errors"]:
        lines.append("last errors:")
        lines += [f"  {e}" for e in status["last_errors"]]
    return lines


def last_errors(out: OutputDir, limit: int = 5, markers: list[dict[str, Any]] | None = None) -> list[str]:
    """Up to ``limit`` error messages, newest first: failed SLURM tasks, failed ranks, then the
    last error rows of done shards."""
    found: list[tuple[float, str]] = []
    for path in out.root.glob("slurm/*/*_result.pkl"):
        message = _task_error(path)
        if message:
            found.append((path.stat().st_mtime, f"task {path.name.split('_result')[0]}: {message}"))
    for report in out.run_records("rank-*.error.json"):
        found.append((report["time"], f"rank {report['rank']}: {report['error']}"))
    messages = [m for _, m in sorted(found, reverse=True)]
    rows: list[str] = []
    for path in _samples_with_errors(out, newest_first=True, markers=markers):
        rows += [f"row {r['row_index']}: {r['error']}" for r in reversed(_error_rows(path))]
        if len(rows) >= limit:
            break
    return (messages + rows)[:limit]


def error_rows(out_dir: str, limit: int = 3) -> list[str]:
    """The first ``limit`` error rows of the done shards, in manifest order:
    ``row R (sample_id): error``."""
    rows: list[str] = []
    for path in _samples_with_errors(OutputDir(out_dir)):
        rows += [f"row {r['row_index']} ({r['sample_id']}): {r['error']}" for r in _error_rows(path)]
        if len(rows) >= limit:
            break
    return rows[:limit]


def _samples_with_errors(out: OutputDir, *, newest_first: bool = False,
                         markers: list[dict[str, Any]] | None = None) -> Iterator[Path]:  # fmt: skip
    """Samples files of done shards that may hold error rows, in shard order: those whose done
    marker counts errors, and any without a marker (a run killed while committing it). A job
    of 2,000 shards is thus read from its small done markers, not its 2,000 parquet files."""
    known = {f"shard-{m['shard']:05d}": m for m in markers or ()}  # already read by the caller
    for path in sorted((out.root / "samples").glob("shard-*.parquet"), reverse=newest_first):
        marker = known[path.stem] if path.stem in known else out.done_marker(path.stem)
        if marker is None or marker.get("samples_error"):
            yield path


def _error_rows(path: Path) -> list[dict[str, Any]]:
    """The error rows of a shard's samples file, in order: {sample_id, row_index, error}."""
    table = pq.read_table(path, columns=["sample_id", "row_index", "status", "error"])
    return table.filter(pc.equal(table.column("status"), "error")).drop_columns(["status"]).to_pylist()


def _task_error(path) -> str | None:  # noqa: ANN001
    """The last line of a failed submitit task's traceback, or None if it succeeded."""
    from submitit.core.utils import pickle_load

    try:
        outcome, value = pickle_load(path)
    except Exception:  # noqa: BLE001  (half-written, or from another submitit version)
        return None
    if outcome != "error":
        return None
    lines = [line for line in str(value).strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "failed"


def _in_flight(out: OutputDir) -> tuple[int, int]:
    """(ok, error) samples flushed in parts of unfinished shards, each sample counted once."""
    seen: dict[str, str] = {}
    for path in out.in_flight_parts():
        try:
            table = pq.read_table(path, columns=["sample_id", "status"])
        except (OSError, pa.ArrowInvalid):
            continue  # removed by a commit right now
        for sid, st in zip(table.column("sample_id").to_pylist(), table.column("status").to_pylist()):
            seen.setdefault(sid, st)
    statuses = list(seen.values())
    return statuses.count("ok"), statuses.count("error")


def _restarts(out: OutputDir) -> dict[str, Any]:
    """SLURM restart counts recorded by the tasks (OUT/.gen/runs/task-*/task.json)."""
    by_task = {}
    for path in sorted(out.runs.glob("task-*/task.json")):
        try:
            by_task[path.parent.name] = json.loads(path.read_text()).get("restart_count", 0)
        except (OSError, ValueError):
            continue
    return {"total": sum(by_task.values()), "by_task": by_task}
