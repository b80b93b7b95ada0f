"""`gen batch --dry-run`: the plan of a job, printed, with nothing started or written.

The plan is the one a real run would follow: the manifest's shards (done ones skipped), the
micro-batches and images still to make, the rank layout on this node, and with ``--slurm`` the
array tasks and SLURM arrays the submission would use (``--shards-per-task``, MaxArraySize
splitting, shards held by this job's tasks still in the queue). It reads the manifest's footer,
its ``id`` column (duplicate check) and its ``num_images`` column if any, and the output
directory's done markers; it loads no model, writes no job.json, and starts no rank.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from jobs.config import BatchConfig
from jobs.errors import JobError
from jobs.job import describe_layout, job_differences
from jobs.layout import resolve_layout
from jobs.manifest import Manifest, open_manifest
from jobs.output.lock import live_holders
from jobs.output.store import OutputDir
from jobs.output.submissions import active_shards, queue_states
from jobs.plan import Shard, num_shards
from jobs.slurm.params import SlurmOptions, group_shards, max_array_size, split_arrays
from parallel.cpus import available_cores, threads_per_rank
from pipeline.loading import resolve_model


@dataclass(frozen=True, kw_only=True)
class ArrayPlan:
    """One SLURM array of the submission."""

    first_task: int
    last_task: int
    """Task indices within the submission, inclusive; the array is ``--array=0-(last-first)``."""
    first_shard: int
    last_shard: int
    """Shard indices its tasks hold, inclusive."""


@dataclass(frozen=True, kw_only=True)
class DryRunPlan:
    """What a real `gen batch` would do."""

    manifest: str
    num_rows: int
    num_row_groups: int
    max_row_group_rows: int
    model: str
    """The model, as the run would load it (not loaded)."""
    shard_size: int
    num_shards: int
    shards_done: int
    shards_held: int
    """Unfinished shards held by this job's SLURM tasks still in the queue."""
    shards_to_run: int
    """Shards the run would start (local) or submit (SLURM)."""
    shards_reopened: int
    """Of those, done shards reopened by --retry-errors for their error rows."""
    micro_batches: int
    """Micro-batches of the shards to run, at least (per-row overrides split cells further),
    not counting reopened shards (they run only the micro-batches holding their error rows)."""
    images: int
    """Images the shards to run ask for."""
    layout: str
    dp_size: int
    """dp groups of the resolved layout (jobs.layout)."""
    """The rank grid, e.g. "2 rank(s) = dp 1 x cfg 2; CFG groups [0, 1]"."""
    threads_per_rank: int | None
    """CPU threads per rank on this node; None for SLURM (each task computes its own)."""
    out: str
    out_state: str
    """"new", "same job" (a re-run resumes) or why a real run would refuse."""
    refused: bool
    """A real run would stop with an error (another job in OUT, or queued tasks)."""
    slurm: dict[str, Any] | None = None
    """With --slurm: shards_per_task, tasks, max_array_size, arrays (ArrayPlan list), sbatch."""


def _done_indices(out: OutputDir) -> set[int]:
    """Shard indices with a done marker (one directory listing, not a stat per shard)."""
    done_dir = out.root / "done"
    if not done_dir.is_dir():
        return set()
    found = set()
    for p in done_dir.iterdir():
        stem = p.name.removesuffix(".json")
        if p.name.endswith(".json") and stem.startswith("shard-") and stem[6:].isdigit():
            found.add(int(stem[6:]))
    return found


def _images_per_shard(manifest: Manifest, shard_size: int, num_shards: int,
                      images_per_prompt: int) -> list[int] | None:  # fmt: skip
    """Images each shard asks for, from the ``num_images`` column (streamed, one pass); None
    when there is no such column (every row makes images_per_prompt)."""
    if "num_images" not in manifest.schema.names:
        return None
    import numpy as np

    per_shard = np.zeros(num_shards, dtype=np.int64)
    row = 0
    for batch in pq.ParquetFile(manifest.path).iter_batches(batch_size=65536, columns=["num_images"]):
        col = batch.column(0)
        values = np.maximum(1, col.fill_null(images_per_prompt).to_numpy(zero_copy_only=False))
        index = (row + np.arange(len(values))) // shard_size
        per_shard += np.bincount(index, weights=values, minlength=num_shards).astype(np.int64)
        row += len(values)
    return per_shard.tolist()


def _model(config: BatchConfig) -> str:
    try:
        model = resolve_model(config.model, build=False)
    except ValueError as exc:
        raise JobError(str(exc)) from None
    if model.smoke_test:
        built = (Path(model.path) / "model_index.json").exists()
        return f"{model.name} (built-in smoke-test model, {'cached' if built else 'built on first use'})"
    if Path(model.path).exists():
        return f"{model.name} (local directory)"
    return f"{model.name} (hub id, not checked)"


def _out_state(config: BatchConfig, manifest: Manifest, out: OutputDir, *, overwrite: bool) -> tuple[str, bool]:
    if overwrite and out.root.exists():
        return "would be cleared (--overwrite)", False
    if not out.job_json.exists():
        return "new", False
    diffs = job_differences(out, manifest.fingerprint, config)
    if diffs:
        return f"holds a different job ({', '.join(diffs)} differ): a real run would refuse without --overwrite", True
    return "same job: a real run resumes it", False


def plan_dry_run(config: BatchConfig, slurm: SlurmOptions | None = None, *,
                 overwrite: bool = False, retry_errors: bool = False) -> DryRunPlan:  # fmt: skip
    """The plan of a `gen batch` job, without running or writing anything.

    Args:
        config: the job's options.
        slurm: the SLURM options with --slurm, else None (a local run on this node).
        overwrite: the run would replace OUT (its done shards count as not done).
        retry_errors: done shards holding error rows are reopened (their error samples count
            as the images to make).
    Returns:
        The plan.
    Raises:
        JobError: bad manifest or model, as a real run would report them.
    """
    manifest = open_manifest(config.manifest)
    out = OutputDir(config.out)
    config, layout_reason = resolve_layout(config, manifest.num_rows,
                                           shards_per_task=slurm.shards_per_task if slurm else None)  # fmt: skip
    shard_size = config.shard_size or 1
    shard_count = num_shards(manifest.num_rows, shard_size)
    out_state, refused = _out_state(config, manifest, out, overwrite=overwrite)
    same = out_state.startswith("same")
    done = _done_indices(out) if same else set()
    states = queue_states(out) or {}
    held = (active_shards(out, states) - done) if same and slurm is not None else set()
    if states and (slurm is None or overwrite):
        out_state += f"; {len(states)} SLURM task(s) of this job are queued: a real run would refuse"
        refused = True
    reopened: dict[int, int] = {}  # shard -> its error samples, generated again
    if retry_errors:
        for i in sorted(done):
            errors = (out.done_marker(Shard(i, 0, 0).name) or {}).get("samples_error") or 0
            if errors:
                reopened[i] = errors
        done -= set(reopened)
    todo = [i for i in range(shard_count) if i not in done and i not in held]
    locked = live_holders(out.root, [Shard(i, 0, 0).name for i in todo]) if same else []
    if locked:
        first = locked[0]
        out_state += (f"; {len(locked)} shard(s) to run are locked by a live run (e.g. {first['shard']}: "
                      f"run {first.get('run_id')}, pid {first.get('pid')} on {first.get('host')}): "
                      "a real run would refuse")  # fmt: skip
        refused = True

    def rows(i: int) -> int:
        return min(shard_size, manifest.num_rows - i * shard_size)

    per_shard = _images_per_shard(manifest, shard_size, shard_count, config.images_per_prompt)
    fresh = [i for i in todo if i not in reopened]
    images = sum(per_shard[i] for i in fresh) if per_shard else sum(rows(i) for i in fresh) * config.images_per_prompt
    images += sum(reopened.values())
    sizes = [manifest.row_group_offsets[g + 1] - manifest.row_group_offsets[g]
             for g in range(len(manifest.row_group_offsets) - 1)]  # fmt: skip
    slurm_plan = None
    threads = None
    if slurm is not None:
        tasks = group_shards(todo, slurm.shards_per_task)
        cap = max_array_size()
        arrays = [ArrayPlan(first_task=r.start, last_task=r.stop - 1, first_shard=tasks[r.start][0],
                            last_shard=tasks[r.stop - 1][-1]) for r in split_arrays(len(tasks), cap)]  # fmt: skip
        slurm_plan = {"shards_per_task": slurm.shards_per_task, "tasks": len(tasks), "max_array_size": cap,
                      "arrays": arrays, "gpus_per_node": config.gpus, "accelerator": slurm.accelerator,
                      "time_minutes": slurm.time_minutes,
                      "array_parallelism": slurm.array_parallelism, "partition": slurm.partition}  # fmt: skip
    else:
        try:
            threads = threads_per_rank(config.gpus, available_cores(), os.environ.get("OMP_NUM_THREADS"))
        except ValueError as exc:
            raise JobError(str(exc)) from None
    return DryRunPlan(
        manifest=manifest.path,
        num_rows=manifest.num_rows,
        num_row_groups=len(sizes),
        max_row_group_rows=max(sizes),
        model=_model(config),
        shard_size=shard_size,
        num_shards=shard_count,
        shards_done=len(done),
        shards_held=len(held),
        shards_to_run=len(todo),
        shards_reopened=len(reopened),
        micro_batches=sum(math.ceil(rows(i) / config.batch_size) for i in fresh),
        images=images,
        layout=describe_layout(config) + (f" ({layout_reason})" if layout_reason else ""),
        dp_size=config.dims.dp_size,
        threads_per_rank=threads,
        out=str(out.root),
        out_state=out_state,
        refused=refused,
        slurm=slurm_plan,
    )


def format_plan(plan: DryRunPlan, config: BatchConfig) -> list[str]:
    """The plan as printable lines (what `gen batch --dry-run` prints)."""
    dp = plan.dp_size
    steps = config.num_inference_steps or "the model's default"
    lines = [
        "dry run: nothing is started or written",
        f"manifest: {plan.manifest}: {plan.num_rows:,} rows in {plan.num_row_groups:,} row group(s) "
        f"(largest {plan.max_row_group_rows:,} rows)",
        f"model: {plan.model}",
        f"plan: {plan.num_rows:,} rows -> {plan.num_shards:,} shard(s) of {plan.shard_size:,} rows "
        f"(shard-00000 .. {Shard(plan.num_shards - 1, 0, 0).name}); {plan.shards_done:,} done, "
        f"{plan.shards_held:,} held by queued tasks, {plan.shards_to_run:,} to run"
        + (f" ({plan.shards_reopened:,} reopened by --retry-errors)" if plan.shards_reopened else ""),
        f"work: {plan.micro_batches:,} micro-batch(es) of <= {config.batch_size} prompts, "
        f"{plan.images:,} image(s); {steps} steps",
        f"out: {plan.out}: {plan.out_state}; a real run would write {Path(plan.out) / 'job.json'}",
    ]
    if plan.max_row_group_rows > plan.shard_size:
        lines.append(f"note: row groups of up to {plan.max_row_group_rows:,} rows are larger than a shard "
                     f"({plan.shard_size:,} rows): a rank streams through a row group to read its shard (memory "
                     "follows the shard, read time the row group); row groups <= --shard-size read "
                     "faster")  # fmt: skip
    if plan.slurm is None:
        lines.append(f"local: {plan.layout}; {plan.threads_per_rank} CPU thread(s) per rank if there is "
                     f"no GPU; ~{math.ceil(plan.micro_batches / dp):,} micro-batch(es) per dp group")  # fmt: skip
    else:
        s = plan.slurm
        lines.append(f"slurm: {plan.shards_to_run:,} shard(s) -> {s['tasks']:,} array task(s) of "
                     f"{s['shards_per_task']} shard(s) (--shards-per-task) in {len(s['arrays'])} array(s) "
                     f"(MaxArraySize {s['max_array_size']})")  # fmt: skip
        for k, a in enumerate(s["arrays"]):
            lines.append(f"  array {k}: --array=0-{a.last_task - a.first_task}"
                         f"{'%' + str(s['array_parallelism']) if s['array_parallelism'] else ''}: "
                         f"tasks {a.first_task:,}-{a.last_task:,}, shards {a.first_shard:,}-{a.last_shard:,}")  # fmt: skip
        request = (f"--gres=npu:{s['gpus_per_node']}" if s.get("accelerator") == "npu"
                   else f"--gpus-per-node={s['gpus_per_node']}")  # fmt: skip
        lines.append(f"  each task: 1 node, {request}, --time={s['time_minutes']} min"
                     f"{', --partition=' + s['partition'] if s['partition'] else ''}; {plan.layout}")  # fmt: skip
        if config.split:
            roles = [config.role] if config.role else ["encoder", "denoiser", "decoder"]
            lines.append(f"  split: each array above is {len(roles)} array(s), one per role ({', '.join(roles)}), "
                         "each with its role's --role-gpus as --gpus-per-node, chained task by task with "
                         "--dependency=aftercorr:<previous role's array> --kill-on-invalid-dep=yes; a task starts "
                         "at the first role its shards still need")  # fmt: skip
    return lines
