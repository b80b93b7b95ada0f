"""What a job is on disk: its checks, OUT/job.json, and how it compares with the job an OUT holds.

A local run (jobs.local) and a SLURM submission (jobs.slurm) both start with ``prepare_job``;
the dry run (jobs.dry_run) asks the same questions without writing anything.
"""

from __future__ import annotations

import json
import os
import platform as pyplatform
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from jobs import __version__
from jobs.config import BatchConfig
from jobs.errors import JobError
from jobs.layout import resolve_layout
from jobs.manifest import Manifest, check_image_column, open_manifest, total_images
from jobs.output.lock import ShardLocks
from jobs.output.store import OutputDir, write_json
from jobs.output.submissions import queue_states
from jobs.plan import Shard, num_shards, plan_shards
from parallel.cpus import available_cores, threads_per_rank
from pipeline.loading import ModelRef, resolve_model


def default_out_dir(manifest: str) -> str:
    """``prompts.parquet`` -> ``prompts-gen`` beside it."""
    p = Path(manifest)
    return str(p.with_name(f"{p.stem}-gen"))


def _versions() -> dict[str, str]:
    names = ("torch", "diffusers", "transformers", "pyarrow")
    found = {n: metadata.version(n) for n in names}
    return {"gen": __version__, "python": pyplatform.python_version(), **found}


def _job_record(config: BatchConfig, manifest: Manifest, model: ModelRef, threads: int,
                device_kind: str, layout_reason: str | None = None) -> dict[str, Any]:  # fmt: skip
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
        "pipeline": _pipeline_record(model),
        "num_shards": num_shards(manifest.num_rows, config.shard_size or 1),
        "layout": {**_layout(config), "chosen": layout_reason or "--cfg-parallel-size"},
        "versions": _versions(),
    }


def _pipeline_record(model: ModelRef) -> dict[str, Any] | None:
    """The model's pipeline class and the defaults its family uses where the job sets none
    (``--steps``, ``--guidance-scale``, ``--true-cfg-scale``; sizes are per row in the samples);
    None when the class cannot be read here (a hub id) or has no family (the ranks say so)."""
    found = _family(model)
    if found is None:
        return None
    name, family = found
    return {"class": name, "family": family.__name__, "defaults": dict(family.call_defaults)}


def _family(model: ModelRef) -> tuple[str, Any] | None:
    """(pipeline class name, family class) of a model whose model_index.json is here; None for
    a hub id or a class without a family (the ranks say so)."""
    index = Path(model.path) / "model_index.json"
    if not index.is_file():
        return None
    from pipeline.families import UnsupportedPipelineError, family_class

    name = json.loads(index.read_text()).get("_class_name")
    try:
        return str(name), family_class(str(name))
    except UnsupportedPipelineError:
        return None


def describe_layout(config: BatchConfig) -> str:
    """One line: the rank grid, and for a split job each role's ranks (the denoiser's grid)."""
    if not config.split:
        return config.dims.describe()
    roles = [config.role] if config.role else ["encoder", "denoiser", "decoder"]
    return "roles " + ", ".join(
        f"denoiser {config.dims.describe()}" if r == "denoiser" else f"{r} {config.role_ranks(r)} rank(s)"
        for r in roles
    )


def _layout(config: BatchConfig) -> dict[str, Any]:
    dims = config.dims
    return {
        **({"roles": dict(config.role_gpus)} if config.split else {}),
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


def _check_same_job(out: OutputDir, fingerprint: str, config: BatchConfig) -> None:
    diffs = job_differences(out, fingerprint, config)
    if diffs:
        raise JobError(
            f"--out {out.root} holds a different job: {', '.join(diffs)} differ; "
            "use --overwrite to replace it, or another --out"
        )


def _clear(out: OutputDir) -> None:
    for name in ("samples", "steps", "done", ".gen", "slurm", "stages"):
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
                on_this_node: bool = True, shards_per_task: int | None = None) -> PreparedJob:  # fmt: skip
    """Check the manifest, model and options, print the notices, and write OUT/job.json.

    Every check that needs no device comes first, so that a job-level mistake (a bad manifest,
    model directory or option, an --out holding another job or written by a live run) is
    refused before torch is imported; then the platform is detected, a built-in model is built
    on first use, and job.json is written.

    Args:
        config: the job's options.
        overwrite: replace an --out directory that holds a different job.
        echo: where one-line notices go.
        on_this_node: the ranks run here (False for a SLURM submission: devices are not checked).
        shards_per_task: a SLURM submission's shards per task (the auto layout counts the
            micro-batches of one task; None: of the whole job).
    Returns:
        The prepared job; its ``config`` has the layout resolved (jobs.layout).
    Raises:
        JobError: bad manifest, options, or an --out holding another job.
    """
    manifest = open_manifest(config.manifest)
    out = OutputDir(config.out)
    config, layout_reason = resolve_layout(config, manifest.num_rows, shards_per_task=shards_per_task)
    try:
        model = resolve_model(config.model, build=False)
    except ValueError as exc:
        raise JobError(str(exc)) from None
    if model.smoke_test:
        echo(f"model: {model.name} is a built-in random-weight smoke-test model (images are noise)")
    try:
        threads = threads_per_rank(config.gpus, available_cores(), os.environ.get("OMP_NUM_THREADS"))
    except ValueError as exc:
        raise JobError(str(exc)) from None
    if overwrite or on_this_node:
        _check_no_queued_tasks(out)
    if overwrite:
        with ShardLocks(out.root, new_run_id(), "overwrite") as probe:
            probe.acquire_existing()  # refuse to wipe shards a live run is writing
            _clear(out)
    _check_same_job(out, manifest.fingerprint, config)

    from parallel.platform import detect_platform  # imports torch: the job is valid

    platform = detect_platform()
    if on_this_node and platform.name != "cpu" and config.gpus > platform.num_devices:
        raise JobError(f"--gpus {config.gpus}: only {platform.num_devices} {platform.name} "
                       "devices are visible")  # fmt: skip
    if on_this_node and platform.name == "cpu":
        echo(f"no GPU: running {config.gpus} CPU rank(s) on gloo, {threads} thread(s) each")
    if platform.rules:  # GEN_PLATFORM_RULES: another platform's dtype rules, guarded
        echo(f"platform: {platform.reason}; pipeline calls fail on ops it lacks kernels for")
    echo(f"layout: {describe_layout(config)}" + ("" if on_this_node else " per SLURM task")
         + (f" ({layout_reason})" if layout_reason else ""))  # fmt: skip
    gating = config.cfg_gate_step < 1 or config.cfg_gate_cosine is not None or any(f < 1 for _, f in config.cfg_gate_steps)
    if gating and config.guidance_scale is not None and config.guidance_scale <= 1 and not (config.true_cfg_scale or 0) > 1:
        echo(f"warning: CFG gating has no effect: --guidance-scale {config.guidance_scale:g} <= 1 "
             "runs no unconditional forward to skip")  # fmt: skip
    if model.smoke_test:
        model = resolve_model(config.model)  # built on first use
    found = _family(model)
    if found is not None:  # else the ranks check it once the model is loaded
        family = found[1]
        notice = check_image_column(manifest, model=model.name, image_input=family.image_input,
                                    output_kind=family.output_kind)  # fmt: skip
        if notice:
            echo(notice)
    write_json(out.job_json, _job_record(config, manifest, model, threads, platform.name, layout_reason))
    shards = plan_shards(manifest.num_rows, config.shard_size or 1)
    return PreparedJob(config, out, manifest, shards, threads)


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
    states = queue_states(out)
    if states:
        raise JobError(f"--out {out.root}: {len(states)} SLURM task(s) of this job are still queued "
                       f"or running ({', '.join(sorted(states))}); wait for them (`gen status "
                       f"{out.root}`) or scancel them first")  # fmt: skip


def new_run_id() -> str:
    """A run id unique on this machine: seconds since the epoch and the pid."""
    return f"{int(time.time())}{os.getpid()}"
