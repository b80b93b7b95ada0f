"""The worker loop of one rank: its share of every unfinished shard, flushed as it goes.

Entry point for torchrun: ``python -m jobs.local.worker OUT RUN_ID SCOPE SHARDS`` (reads RANK,
WORLD_SIZE, LOCAL_RANK, OMP_NUM_THREADS). With one rank the launcher (or a SLURM task) calls
``run_rank`` in its own process.

Ranks form dp x cfg groups (ParallelDims). Micro-batches are dealt to dp groups; the ranks of a
CFG group run each of their micro-batches together, and sample j of a micro-batch is decoded
and written by group rank j % cfg, so every row is written exactly once.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import time
from collections.abc import Sequence

import torch

from jobs.config import BatchConfig
from jobs.errors import JobError
from jobs.faults import job_fault, spare_report
from jobs.local.rank_stats import RankStats
from jobs.local.signals import RANK_SIGNALS, StopRequest, stop_at_boundary
from jobs.local.torchrun import JOB_ERROR_EXIT, die_with_parent
from jobs.local.writer import PartWriter
from jobs.manifest import check_image_column, open_manifest, read_rows
from jobs.memory import peak_rss_bytes
from jobs.output.failpoints import failpoint
from jobs.output.lock import check_owner
from jobs.output.schema import VIDEO_KINDS, samples_schema, samples_table, steps_table
from jobs.output.store import OutputDir, write_json
from jobs.plan import deal, micro_batches, select_shards
from jobs.rows import GenerationDefaults, PlannedSample, plan_rows
from parallel.cfg_group import CollectiveError
from parallel.cpus import pin_cpu_rank
from parallel.group import barrier, cfg_group, close_ranks, init_ranks, record_errors
from parallel.platform import detect_platform, parse_dtype
from pipeline.generate import SampleResult, StageRunner
from pipeline.loading import ModelRef, load_pipeline
from pipeline.roles import load_role_pipeline


class ProgressFile:
    """Samples finished by this rank in this run, for the launcher's progress bar."""

    def __init__(self, out: OutputDir, rank: int) -> None:
        self.path = out.progress(rank)
        self.samples = 0
        self._last = 0.0

    def add(self, n: int, *, force: bool = False) -> None:
        self.samples += n
        now = time.monotonic()
        if force or now - self._last > 0.25:
            write_json(self.path, {"samples": self.samples})
            self._last = now


def run_rank(out_dir: str, run_id: str, *, rank: int, world_size: int, local_rank: int,
             threads: int, scope: str = "local", shard_indices: Sequence[int] | None = None,
             pin_cpus: bool = True, role: str = "monolithic", rank_base: int = 0,
             device_base: int = 0, wait_upstream: bool = False,
             stop: StopRequest | None = None) -> RankStats:  # fmt: skip
    """Run one rank's share of the job in ``out_dir`` (whose job.json the launcher wrote).

    Args:
        out_dir: the job's output directory.
        run_id: identifies this run's shard-finished markers.
        rank, world_size, local_rank: this process's place (torchrun's RANK etc.).
        threads: CPU threads of this rank (torch.set_num_threads), >= 1.
        scope: whose per-run files (progress, stats, errors) this rank writes: "local" or a
            SLURM task's "task-NNNNN".
        shard_indices: indices of the shards to run (None: every shard of the plan); done ones are
            skipped.
        pin_cpus: pin CPU ranks to their own cores (off when the cores this process sees are
            not its own, e.g. a SLURM task on a node without CPU binding).
        role: "monolithic" (the whole pipeline), or one role of a split job ("encoder",
            "denoiser", "decoder": jobs.local.stages); rank and world_size are then the role's.
        rank_base: this role's first index among the run's processes (stats and error files).
        device_base: this role's first device slot (role rank r uses (base + r) % devices).
        wait_upstream: a split job's previous role runs at the same time: wait for its stage
            files instead of skipping shards that lack them.
        stop: asks this rank to stop at its next micro-batch boundary (jobs.local.signals);
            it then leaves its unfinished shard uncommitted and sets ``stop.stopped``.
    Returns:
        This rank's stats (also written to OUT/.gen/runs/SCOPE/ranks/).
    """
    out = OutputDir(out_dir, scope)
    job = json.loads(out.job_json.read_text())
    config = BatchConfig.from_dict(job["config"])
    platform = detect_platform()
    monolithic = role == "monolithic"
    device = platform.bind(local_rank if monolithic else (device_base + local_rank) % max(1, platform.num_devices))
    if platform.name == "cpu":
        torch.set_num_threads(threads)
        if pin_cpus:
            pin_cpu_rank(local_rank, int(os.environ.get("LOCAL_WORLD_SIZE", world_size)), threads)
    init_ranks(rank=rank, world_size=world_size, platform=platform,
               timeout_s=config.collective_timeout_s)  # fmt: skip
    dims = config.dims if monolithic else config.role_dims(role)
    if dims.world_size != world_size:
        raise JobError(f"job.json plans {dims.world_size} {'' if monolithic else role + ' '}ranks, "
                       f"but {world_size} were started")  # fmt: skip
    dp_rank, cfg_rank = dims.coords(rank)
    group = cfg_group(dims, rank, device=device, timeout_s=config.collective_timeout_s)
    stats = RankStats(rank=rank_base + rank, dp_rank=dp_rank, cfg_rank=cfg_rank, device=str(device),
                      threads=torch.get_num_threads(), role=role)  # fmt: skip

    start = time.perf_counter()
    model = ModelRef(**job["model"])
    dtype = parse_dtype(config.dtype, platform)
    try:
        if monolithic:
            pipe = load_pipeline(model, dtype=dtype, device=device)
        else:
            pipe = load_role_pipeline(model, role, dtype=dtype, device=device)
        runner = StageRunner(pipe, cfg_batching=config.cfg_batching,
                             guidance_rescale=config.guidance_rescale, group=group,
                             cfg_gate_cosine=config.cfg_gate_cosine,
                             rules=platform.device_rules(dtype), fault=failpoint,
                             max_forward_batch=config.max_forward_batch)  # fmt: skip
    except (OSError, ValueError) as exc:  # not found, not a pipeline, unsupported class
        raise JobError(f"--model {model.name}: cannot load it: {exc}") from None
    try:
        runner.family.configure(**config.family_options())
    except ValueError as exc:
        raise JobError(f"--model {model.name}: {exc}") from None
    if config.compile and role in ("monolithic", "denoiser"):
        from pipeline.compile import compile_denoisers

        compile_denoisers(pipe, runner.family.convention.denoisers)
    stats.load_s = time.perf_counter() - start
    failpoint("loaded")

    manifest = open_manifest(config.manifest, check_ids=False)
    family = runner.family
    for option, value in (("--height", config.height), ("--width", config.width)):
        if value is not None and value % family.size_multiple:
            raise JobError(f"{option} {value} is invalid: {model.name} needs a multiple of "
                           f"{family.size_multiple} (its VAE scale x patch size)")  # fmt: skip
    num_frames = None
    if family.output_kind in VIDEO_KINDS:  # "video", "audio_video"
        num_frames = config.num_frames or family.default_num_frames
        problem = family.check_num_frames(num_frames)
        if problem:
            raise JobError(f"--num-frames {num_frames}: {problem}")
    unknown = [n for n, _ in config.cfg_gate_steps if n not in family.auxiliary_branches]
    if unknown:
        raise JobError(f"--cfg-gate-step {unknown[0]}=...: {model.name} ({type(pipe).__name__}) has no branch "
                       f"{unknown[0]}; its auxiliary branches: {', '.join(family.auxiliary_branches)}")  # fmt: skip
    check_image_column(manifest, model=model.name, image_input=family.image_input,
                       output_kind=family.output_kind)  # fmt: skip
    own = family.call_defaults
    if config.true_cfg_scale is not None and "true_cfg_scale" not in own:
        raise JobError(f"--true-cfg-scale {config.true_cfg_scale:g}: {model.name} "
                       f"({type(pipe).__name__}) has no true CFG; use --guidance-scale")  # fmt: skip
    defaults = GenerationDefaults(
        height=config.height or family.default_size,
        width=config.width or family.default_size,
        num_inference_steps=config.num_inference_steps or own.get("num_inference_steps", 50),
        guidance_scale=own.get("guidance_scale", 7.5) if config.guidance_scale is None else config.guidance_scale,
        true_cfg_scale=own.get("true_cfg_scale") if config.true_cfg_scale is None else config.true_cfg_scale,
        cfg_gate_step=config.cfg_gate_step,
        cfg_gate_steps=config.cfg_gate_steps,
        num_frames=num_frames,
        images_per_prompt=config.images_per_prompt,
        seed=config.seed,
        size_multiple=family.size_multiple,
        image_input=family.image_input,
        image_root=os.path.dirname(manifest.path),
    )
    try:
        schema = samples_schema(manifest.schema, family.output_kind)
    except ValueError as exc:  # a manifest column named like an output column
        raise JobError(f"{config.manifest}: {exc}") from None
    progress = ProgressFile(out, stats.rank) if role in ("monolithic", "decoder") else None
    if progress is not None:
        progress.add(0, force=True)  # loaded: the launcher starts its bar
    shards = select_shards(manifest.num_rows, config.shard_size, shard_indices)
    if role in ("encoder", "denoiser"):
        from jobs.local.stages import StageRole

        StageRole(role, out=out, config=config, runner=runner, manifest=manifest, defaults=defaults,
                  group=group, dp_rank=dp_rank, dp_size=dims.dp_size, stats=stats, device=device,
                  wait_upstream=wait_upstream, stop=stop).run(shards)  # fmt: skip
        _finish(out, stats, platform, device, group)
        return stats
    if role == "decoder":
        from jobs.local.stages import DecodeSource

        source = DecodeSource(out=out, runner=runner, stats=stats, device=device, wait_upstream=wait_upstream,
                              keep_intermediates=config.keep_intermediates)  # fmt: skip
        ready, produce, committed = source.ready, source.produce, source.committed
    else:
        ready, committed = (lambda shard: True), (lambda shard: None)

        def produce(todo: list[PlannedSample], writes: set[str]):  # noqa: ANN202
            return _generate(runner, todo, writes, stats)

    stopped = False
    writer = PartWriter(overlap=config.overlap_writes)
    try:
        for shard in shards:
            if out.is_done(shard) or not ready(shard):
                continue
            rows = read_rows(manifest, shard.start, shard.stop)
            planned = plan_rows(rows, shard.start, defaults)
            runner.new_shard()  # an out-of-memory backoff holds for one shard
            finished = out.finished_sample_ids(shard, run_id)
            mine = deal(micro_batches(planned, config.batch_size), dp_rank, dims.dp_size)
            first_wall, last_wall = None, None
            for part, batch in enumerate(mine):
                failpoint("micro-batch")
                if stop_at_boundary(stop, group):  # every rank of the CFG group at the same batch
                    stopped = True
                    break
                ids = [p.request.sample_id for p in batch]
                missing = set(ids) - finished
                ours = {sid for j, sid in enumerate(ids) if group.owner(j) == cfg_rank}
                writes = ours & missing  # sample j of a micro-batch is written by cfg rank j % K
                stats.samples_skipped += len(ours - missing)
                if missing:
                    # The whole micro-batch runs again, even if a crash left part of it flushed:
                    # its composition, and so every image's bytes, stay as planned.
                    results, span = produce(batch, writes)
                    _count(batch, results, writes, stats)
                    if span is not None:
                        first_wall = first_wall or span[0]
                        last_wall = span[1]
                    own = [(p, r) for p, r in zip(batch, results) if p.request.sample_id in writes]
                    if own:
                        writer.submit(functools.partial(_write_part, out, shard, f"{run_id}-r{rank:05d}-{part:05d}",
                                                        schema, own, rows, run_id))  # fmt: skip
                progress.add(len(ours))
            writer.drain()  # the shard's parts are on disk before it is marked finished
            if stopped:
                break
            out.mark_rank_finished(shard, run_id, rank,
                                   {"start_wall": first_wall, "end_wall": last_wall})  # fmt: skip
            failpoint("rank-finished")
            if out.try_commit(shard, run_id, world_size, len(planned)):
                committed(shard)
    except BaseException:
        writer.close(failed=True)  # finished micro-batches still reach their parts
        raise
    writer.close()
    stats.write_s, stats.write_wait_s = round(writer.write_s, 4), round(writer.wait_s, 4)
    progress.add(0, force=True)
    barrier()
    if rank == 0:  # a shard whose last finisher lost the commit race
        for shard in shards:
            if not out.is_done(shard):
                out.try_commit(shard, run_id, world_size, _num_samples(manifest, shard, defaults))
            if out.is_done(shard):
                committed(shard)
    _finish(out, stats, platform, device, group)
    return stats


def _finish(out: OutputDir, stats: RankStats, platform, device: torch.device, group) -> None:  # noqa: ANN001
    """Record this rank's peaks and stats, and leave the process group with the others."""
    stats.cfg_exchanges, stats.cfg_exchange_s = group.exchanges, round(group.exchange_s, 4)
    if "torch._dynamo" in sys.modules:  # something was compiled (--compile)
        from pipeline.compile import compile_seconds

        stats.compile_s = compile_seconds()
    stats.peak_rss_bytes = peak_rss_bytes()
    stats.peak_device_bytes = platform.peak_memory_bytes(device)
    write_json(out.rank_stats(stats.rank), stats.__dict__)
    barrier()
    close_ranks()


def _num_samples(manifest, shard, defaults) -> int:  # noqa: ANN001
    return len(plan_rows(read_rows(manifest, shard.start, shard.stop), shard.start, defaults))


def _generate(
    runner: StageRunner, todo: list[PlannedSample], writes: set[str], stats: RankStats
) -> tuple[list[SampleResult | None], tuple[float, float] | None]:  # fmt: skip
    """Results for ``todo`` in order (None for samples that failed planning checks), and the
    wall-clock span (denoise start, decode end) of the generation, if anything was generated.

    Every rank of the CFG group calls this with the same ``todo``; this rank decodes only the
    samples in ``writes`` (the rows it writes).
    """
    gen = [p for p in todo if p.error is None]
    by_id: dict[str, SampleResult] = {}
    span = None
    if gen:
        output = runner.run(
            [p.request for p in gen], decode=[p.request.sample_id in writes for p in gen]
        )
        span = (output.start_wall, output.end_wall)
        if stats.first_denoise_wall is None:
            stats.first_denoise_wall, stats.first_image_wall = output.start_wall, output.end_wall
        stats.last_decode_wall = output.end_wall
        by_id = {r.request.sample_id: r for r in output.results}
    results = [by_id.get(p.request.sample_id) for p in todo]
    return results, span


def _write_part(out: OutputDir, shard, name: str, schema, own: list, rows, run_id: str) -> None:  # noqa: ANN001
    """Encode ``own`` (planned sample, result) pairs and write them as part ``name`` of ``shard``
    (on the PartWriter's thread), if this run still owns the shard."""
    check_owner(out.root, shard.name, run_id)
    out.write_part(shard, name,
                   samples_table(schema, [p for p, _ in own], [r for _, r in own], rows, shard.start),
                   steps_table([r for _, r in own if r is not None]))  # fmt: skip


def _count(todo: list[PlannedSample], results: list[SampleResult | None], writes: set[str],
           stats: RankStats) -> None:  # fmt: skip
    """Count the samples this rank writes as ok or error in ``stats``."""
    for p, r in zip(todo, results):
        if p.request.sample_id in writes:
            if r is not None and r.error is None:
                stats.samples_ok += 1
            else:
                stats.samples_error += 1


def report_failure(out: OutputDir, rank: int, exc: BaseException, *, collective: bool,
                   run_id: str = "") -> None:  # fmt: skip
    """Leave this rank's error where the launcher reads it (OUT/.gen/runs/SCOPE/ranks/rank-N.error.json,
    or jobs.faults.spare_report's directory when OUT cannot take it).

    ``collective``: the error is a broken group (likely a consequence of another rank's
    failure), so the launcher prefers other ranks' errors as the cause.
    """
    message = str(exc) if isinstance(exc, (JobError, CollectiveError)) else f"{type(exc).__name__}: {exc}"
    report = {"rank": rank, "error": message, "collective": collective,
              "job_error": isinstance(exc, JobError), "time": time.time()}  # fmt: skip
    try:
        write_json(out.rank_error(rank), report)
    except OSError:  # a full or read-only OUT
        if not spare_report(run_id, out.rank_error(rank).name, report):
            print(f"gen: rank {rank}: error: {message}", file=sys.stderr, flush=True)
            return
    if not isinstance(exc, JobError):  # a job error is the launcher's one line
        print(f"gen: rank {rank}: error: {message}", file=sys.stderr, flush=True)


def _manifest_of(out: OutputDir) -> str | None:
    """The job's manifest path (job.json), or None if it cannot be read."""
    try:
        return json.loads(out.job_json.read_text())["config"]["manifest"]
    except (OSError, ValueError, KeyError):
        return None


def format_shards(indices: Sequence[int] | None) -> str:
    """Shard indices as a worker argument: ``"all"`` or ``"0,3,4"``."""
    return "all" if indices is None else ",".join(str(i) for i in indices)


def parse_shards(arg: str) -> list[int] | None:
    """Inverse of format_shards."""
    return None if arg == "all" else [int(i) for i in arg.split(",") if i]


@record_errors
def main() -> None:
    """torchrun entry: ``python -m jobs.local.worker OUT RUN_ID SCOPE SHARDS [--no-pin]
    [--role ROLE --rank-base K --device-base D] [--wait-upstream]``."""
    die_with_parent(os.getppid())
    out_dir, run_id, scope, shards = sys.argv[1:5]
    flags = sys.argv[5:]

    def value(flag: str, default: str) -> str:
        return flags[flags.index(flag) + 1] if flag in flags else default

    role, rank_base = value("--role", "monolithic"), int(value("--rank-base", "0"))
    rank = int(os.environ["RANK"])
    out = OutputDir(out_dir, scope)
    stop = StopRequest(out.run_dir / "stop")  # the launcher's; and this rank's own signals
    stop.at_once = lambda: os._exit(128 + signal.SIGINT)  # a second Ctrl-C
    try:
        with stop.handling(RANK_SIGNALS):
            run_rank(out_dir, run_id, rank=rank, world_size=int(os.environ["WORLD_SIZE"]),
                     local_rank=int(os.environ["LOCAL_RANK"]),
                     threads=int(os.environ.get("OMP_NUM_THREADS") or 1), scope=scope,
                     shard_indices=parse_shards(shards), pin_cpus="--no-pin" not in flags, role=role,
                     rank_base=rank_base, device_base=int(value("--device-base", "0")),
                     wait_upstream="--wait-upstream" in flags, stop=stop)  # fmt: skip
    except JobError as exc:
        report_failure(out, rank_base + rank, exc, collective=False, run_id=run_id)
        sys.exit(JOB_ERROR_EXIT)
    except CollectiveError as exc:
        report_failure(out, rank_base + rank, exc, collective=True, run_id=run_id)
        sys.exit(3)
    except Exception as exc:
        fault = job_fault(exc, out=out_dir, manifest=_manifest_of(out))
        report_failure(out, rank_base + rank, fault or exc, collective=False, run_id=run_id)
        if fault is not None:  # a full disk, an unwritable OUT, the manifest gone
            sys.exit(JOB_ERROR_EXIT)
        raise  # torchrun's recorder shows the traceback
    if stop.stopped:  # stopped early on a signal: the launcher prints the line
        sys.exit(stop.exit_code)


if __name__ == "__main__":
    main()
