"""The `gen` command line (click). Thin: parse options into BatchConfig, call run_batch."""

from __future__ import annotations

import time

import click

from jobs import __version__
from jobs.config import DTYPES, BatchConfig, parse_cfg_gate_step, parse_role_gpus
from jobs.errors import Interrupted, JobError, RunFailed


class _JobUsageError(click.ClickException):
    exit_code = 2


def _cfg_size(value: str | int | None) -> int | None:
    """--cfg-parallel-size: "auto" -> None (jobs.layout resolves it), else an integer."""
    if value is None or str(value).strip().lower() == "auto":
        return None
    try:
        return int(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not auto or an integer", param_hint="--cfg-parallel-size") from None


@click.group()
@click.version_option(__version__, prog_name="gen")
def main() -> None:
    """gen: batch offline generation with diffusion models."""


@main.command()
@click.argument("manifest", type=click.Path())
@click.option("--out", type=click.Path(), help="Output directory [default: MANIFEST-gen/ beside it].")
@click.option("--model", help="Built-in tiny-sd / small-sd, a local diffusers directory, or a hub id [default: tiny-sd].")
@click.option("--dtype", type=click.Choice(DTYPES), default="auto", show_default=True, help="auto: bfloat16 on GPU / NPU (float16 where the device has no bf16), float32 on CPU.")
@click.option("--steps", "num_inference_steps", type=int, help="num_inference_steps [default: the pipeline's own: SD 50, SDXL 50, SD3 28, Flux 28, PixArt-Sigma 20, Qwen-Image 50].")
@click.option("--guidance-scale", type=float, help="CFG scale; <= 1 disables guidance; Flux: its distilled guidance [default: the pipeline's own: SD 7.5, SDXL 5, SD3 7, Flux 3.5, PixArt-Sigma 4.5].")
@click.option("--true-cfg-scale", type=float, help="Real CFG over the negative prompt for pipelines that have it beside a distilled guidance (Flux, Qwen-Image); > 1 turns it on [default: the pipeline's own: Flux 1, Qwen-Image 4].")
@click.option("--skip-guidance-layers", help="SD3 skip-layer guidance: comma-separated transformer blocks skipped in the extra cond_skip branch, e.g. 7,8,9 [default: off].")
@click.option("--skip-layer-guidance-scale", type=float, help="SD3: scale of the skip-layer term [default: the pipeline's, 2.8].")
@click.option("--skip-layer-guidance-start", type=float, help="SD3: fraction of the steps where skip-layer guidance starts [default: 0.01].")
@click.option("--skip-layer-guidance-stop", type=float, help="SD3: fraction of the steps where it stops [default: 0.2].")
@click.option("--cfg-gate-step", default="1", show_default=True, help="Fraction F in [0, 1] of the steps after which every auxiliary branch (uncond; SD3 cond_skip; LTX-2 stg, modality) is skipped and rebuilt from its cached delta to cond; 1 = off. Per branch: uncond=0.6,stg=0.3 (others off), or 0.5,stg=0.3.")
@click.option("--cfg-gate-cosine", type=float, help="Adaptive gating: a sample stops running the uncond forward once the cosine similarity of its cond and uncond predictions reaches this, in [-1, 1] [default: off].")
@click.option("--guidance-rescale", type=float, help="diffusers' guidance_rescale in [0, 1] [default: the pipeline's own: 0, LTX-2 0.7].")
@click.option("--stg-scale", type=float, help="LTX-2: spatio-temporal guidance scale; 0 = no stg branch [default: 1].")
@click.option("--modality-scale", type=float, help="LTX-2: modality-isolation guidance scale; <= 1 = no modality branch [default: 3].")
@click.option("--audio-guidance-scale", type=float, help="LTX-2: CFG scale of the audio [default: 7].")
@click.option("--audio-stg-scale", type=float, help="LTX-2: stg scale of the audio [default: 1].")
@click.option("--audio-modality-scale", type=float, help="LTX-2: modality scale of the audio [default: 3].")
@click.option("--audio-guidance-rescale", type=float, help="LTX-2: guidance_rescale of the audio [default: 0.7].")
@click.option("--spatio-temporal-guidance-blocks", help="LTX-2: comma-separated transformer blocks perturbed in the stg branch [default: the pipeline's, 28].")
@click.option("--frame-rate", type=float, help="LTX-2: frames per second [default: 24].")
@click.option("--height", type=int, help="Pixels [default: the model's native size].")
@click.option("--width", type=int, help="Pixels [default: the model's native size].")
@click.option("--num-frames", type=int, help="Video models: frames per video [default: the model's].")
@click.option("--images-per-prompt", type=int, default=1, show_default=True)
@click.option("--batch-size", type=int, default=4, show_default=True, help="Prompts per denoiser forward.")
@click.option("--seed", type=int, default=0, show_default=True, help="Job seed for rows without a `seed`.")
@click.option("--shard-size", type=int, help="Rows per shard, a multiple of --batch-size [default: ~1000].")
@click.option("--gpus", type=int, default=1, show_default=True, help="Ranks on this node (CPU ranks when there is no GPU).")
@click.option("--cfg-parallel-size", default="auto", show_default=True, callback=lambda c, p, v: _cfg_size(v),
              help="Ranks per CFG group (--gpus = dp x this), or auto: data parallel first, CFG groups of 2 only when "
                   "the job has fewer micro-batches than ranks (the layout line says why).")
@click.option("--cfg-batching/--no-cfg-batching", default=True, show_default=True, help="Run CFG branches as one concatenated forward.")
@click.option("--max-forward-batch", type=int,
              help="Most samples one denoiser forward may hold (>= --batch-size): CFG branches are concatenated only up "
                   "to it; the layout line says how the cap is honoured [default: no cap].")
@click.option("--compile/--no-compile", "compile", default=False, show_default=True,
              help="torch.compile the denoiser (its repeated blocks where the model has them; dynamic shapes). "
                   "Compile time is reported apart (summary.json compile_s); images round differently from eager.")
@click.option("--overlap-writes/--no-overlap-writes", default=True, show_default=True,
              help="Encode images / videos and write part files on a background thread while the next micro-batch runs.")
@click.option("--roles", type=click.Choice(("monolithic", "split")), default="monolithic", show_default=True, help="split: encoder, denoiser and decoder run as separate ranks, each loading only its own modules, handing results on through OUT/stages/.")
@click.option("--role", type=click.Choice(("encoder", "denoiser", "decoder")), help="Run one role of a split job alone on --gpus ranks (the previous role's stage files must be there).")
@click.option("--role-gpus", help="Ranks per role with --roles split, e.g. encoder=1,denoiser=6,decoder=1 [default: encoder=1, denoiser=--gpus, decoder=1; roles share the node's devices].")
@click.option("--keep-intermediates", is_flag=True, help="Keep OUT/stages/ (embeddings, latents) after each shard is committed.")
@click.option("--collective-timeout", "collective_timeout_s", type=float, default=300.0, show_default=True, help="Seconds before a stuck collective fails the run.")
@click.option("--overwrite", is_flag=True, help="Replace an --out directory that holds a different job.")
@click.option("--retry-errors", is_flag=True, help="Generate again the samples whose status is error (and the unfinished ones); ok samples are kept.")
@click.option("--fail-on-error", is_flag=True, help="Exit with status 1 when the job holds error rows (default: 0, with their count).")
@click.option("--slurm", is_flag=True, help="Submit as SLURM array tasks (submitit), each a node running --gpus ranks.")
@click.option("--partition", help="SLURM partition [default: the cluster's].")
@click.option("--time", "time_limit", default="60", show_default=True, help="SLURM time limit per task: M, H:M:S, D-H:M ...; a task that times out is requeued and resumes.")
@click.option("--account", help="SLURM account.")
@click.option("--qos", help="SLURM quality of service.")
@click.option("--cpus-per-task", type=int, help="SLURM CPU cores per task (one task per node).")
@click.option("--mem", help="SLURM memory per node, e.g. 64G.")
@click.option("--array-parallelism", type=int, help="SLURM array tasks running at once [default: all].")
@click.option("--shards-per-task", type=int, default=1, show_default=True, help="Consecutive shards per SLURM array task.")
@click.option("--slurm-setup", multiple=True, help="Shell line run before each task (module load ...); repeatable.")
@click.option("--accelerator", type=click.Choice(("gpu", "npu")), default="gpu", show_default=True, help="SLURM: what --gpus requests per node: gpu (--gpus-per-node) or npu (--gres=npu:N, Ascend clusters).")
@click.option("--slurm-extra", multiple=True, help="Further sbatch option KEY=VALUE (e.g. constraint=a100); repeatable.")
@click.option("--role-slurm-extra", multiple=True, help="With --roles split: an sbatch option KEY=VALUE for one role's arrays, as ROLE:KEY=VALUE (e.g. decoder:partition=small, encoder:mem=64G); repeatable.")
@click.option("--requeue/--no-requeue", default=True, show_default=True, help="Submit with sbatch --requeue (preempted or requeued tasks resume).")
@click.option("--wait", is_flag=True, help="With --slurm: block until every shard is done, with a progress bar.")
@click.option("--dry-run", is_flag=True, help="Print the plan (shards, micro-batches, ranks; with --slurm: tasks and arrays) and stop: nothing is started or written.")
def batch(manifest: str, out: str | None, overwrite: bool, retry_errors: bool, fail_on_error: bool,
          dry_run: bool, **options: object) -> None:  # fmt: skip
    """Generate images for every row of a parquet MANIFEST (column `prompt`)."""
    from jobs.job import default_out_dir
    from jobs.local.launch import run_batch

    launch_wall = time.time()
    slurm_args = {k: options.pop(k) for k in _SLURM_OPTIONS}
    use_slurm = options.pop("slurm")
    try:
        slurm = _slurm_options(slurm_args) if use_slurm else _no_slurm(slurm_args)
        options["skip_guidance_layers"] = _layers(options["skip_guidance_layers"], "--skip-guidance-layers")
        options["spatio_temporal_guidance_blocks"] = _layers(options["spatio_temporal_guidance_blocks"],
                                                             "--spatio-temporal-guidance-blocks")  # fmt: skip
        options["cfg_gate_step"], options["cfg_gate_steps"] = parse_cfg_gate_step(options["cfg_gate_step"])
        options["role_gpus"] = parse_role_gpus(options["role_gpus"])
        config = BatchConfig(manifest=manifest, out=out or default_out_dir(manifest), **options)  # type: ignore[arg-type]
        if dry_run:
            from jobs.dry_run import format_plan, plan_dry_run

            plan = plan_dry_run(config, slurm, overwrite=overwrite, retry_errors=retry_errors)
            for line in format_plan(plan, config):
                click.echo(line)
            return
        if slurm is not None:
            from jobs.slurm.submit import submit_batch

            summary = submit_batch(config, slurm, launch_wall=launch_wall, overwrite=overwrite,
                                   retry_errors=retry_errors, echo=click.echo)  # fmt: skip
            if summary is None:
                return
        else:
            summary = run_batch(config, launch_wall=launch_wall, overwrite=overwrite,
                                retry_errors=retry_errors, echo=click.echo)  # fmt: skip
    except JobError as exc:
        raise _JobUsageError(str(exc)) from None
    except RunFailed as exc:
        raise click.ClickException(str(exc)) from None
    except Interrupted as exc:  # Ctrl-C, SIGTERM: one line, exit 130 / 143
        click.echo(str(exc), err=True)
        raise SystemExit(exc.exit_code) from None
    except KeyboardInterrupt:  # before the run's own handlers were installed
        click.echo("interrupted: before the run started; re-run the same command", err=True)
        raise SystemExit(130) from None
    except OSError as exc:  # a full disk, an --out that cannot be written (jobs.faults)
        from jobs.faults import job_fault

        fault = job_fault(exc, out=out or default_out_dir(manifest), manifest=manifest)
        if fault is None:
            raise
        raise _JobUsageError(str(fault)) from None
    if slurm is not None:
        click.echo(f"slurm: submit-to-first-image {_seconds(summary['time_to_first_image_s'])}, "
                   f"submit-to-done {_seconds(summary['time_to_done_s'])}")  # fmt: skip
    click.echo(
        f"done: {summary['samples_ok']} ok, {summary['samples_error']} error "
        f"({summary['shards_done']}/{summary['shards_total']} shards); this run: "
        f"{summary['run_samples_ok']} images in {summary['generate_wall_s']:.2f} s "
        f"({summary['images_per_s']:.2f} img/s), start-up {summary['startup_s']:.2f} s; "
        f"out: {config.out}"
    )
    click.echo(_gating_line(summary))
    if summary.get("samples_warning"):
        click.echo(f"warnings: {summary['samples_warning']} sample(s) carry a warning (column "
                   "`warning`: e.g. a prompt the text encoder truncated, or a negative prompt the pipeline ignores)")  # fmt: skip
    if summary["samples_error"]:
        from jobs.output.status import error_rows

        click.echo(f"errors: {summary['samples_error']} error row(s) (status \"error\", column "
                   "`error`); re-run with --retry-errors to generate them again; first:")  # fmt: skip
        for line in error_rows(config.out, limit=3):
            click.echo(f"  {line}")
        if fail_on_error:
            raise click.ClickException(f"{summary['samples_error']} error row(s) (--fail-on-error)")


@main.command()
@click.argument("out", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the status as one JSON object.")
def status(out: str, as_json: bool) -> None:
    """Where the job in OUT stands: shards, samples, SLURM tasks (squeue), restarts, last errors."""
    import json

    from jobs.output.status import format_status, job_status

    try:
        found = job_status(out)
    except JobError as exc:
        raise _JobUsageError(str(exc)) from None
    click.echo(json.dumps(found) if as_json else "\n".join(format_status(found)))


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
def env(as_json: bool) -> None:
    """The platform gen detects here and why: devices, backend, dtype, attention backend,
    versions, SLURM visibility. Loads no model."""
    import json

    from jobs.env import collect_env, format_env

    report = collect_env()
    click.echo(json.dumps(report) if as_json else "\n".join(format_env(report)))


@main.command()
@click.option("--model", default="small-sd", show_default=True, help="Built-in name, local diffusers directory, or hub id.")
@click.option("--gpus", type=int, default=2, show_default=True, help="Ranks of the CFG-parallel runs (cfg 2), compared with half as many; 1 skips them.")
@click.option("--steps", "num_inference_steps", type=int, default=20, show_default=True, help="num_inference_steps.")
@click.option("--height", type=int, help="Pixels [default: the model's native size].")
@click.option("--width", type=int, help="Pixels [default: the model's native size].")
@click.option("--prompts", "num_prompts", type=int, default=16, show_default=True, help="Prompts (one image each) per run.")
@click.option("--repeats", type=int, default=3, show_default=True, help="Interleaved repeats of every configuration.")
@click.option("--batch-size", type=int, default=4, show_default=True, help="--batch-size of the CFG-parallel and gating runs.")
@click.option("--batch-sizes", default="2,4,8", show_default=True, help="Sweep for gen's best batch size against the plain loop (comma-separated).")
@click.option("--threads", type=int, default=1, show_default=True, help="CPU threads per rank, plain loop included.")
@click.option("--guidance-scale", type=float, default=7.5, show_default=True)
@click.option("--cfg-gate-step", type=float, default=0.5, show_default=True, help="Gating fraction of the gated runs.")
@click.option("--cfg-gate-cosine", type=float, default=0.99, show_default=True, help="Threshold of the adaptive-gating run.")
@click.option("--no-adaptive", is_flag=True, help="Skip the adaptive-gating run.")
@click.option("--dtype", type=click.Choice(DTYPES), default="auto", show_default=True)
@click.option("--overhead/--no-overhead", default=True, show_default=True, help="Also measure the intercept's per-call overhead.")
@click.option("--json", "json_path", type=click.Path(), help="JSON report path [default: bench-MODEL-TIMESTAMP.json].")
@click.option("--work-dir", type=click.Path(), help="Keep the runs' files here [default: a temporary directory].")
def bench(batch_sizes: str, no_adaptive: bool, cfg_gate_cosine: float, **options: object) -> None:
    """Measure gen against a plain diffusers loop, and the CFG-parallel and gating ratios."""
    from jobs.bench.runs import BenchRunFailed
    from jobs.bench.suite import BenchConfig, run_bench

    try:
        sizes = tuple(int(b) for b in batch_sizes.split(",") if b.strip())
    except ValueError:
        raise _JobUsageError(f"--batch-sizes {batch_sizes!r} is invalid: comma-separated integers") from None
    try:
        config = BenchConfig(batch_sizes=sizes, cfg_gate_cosine=None if no_adaptive else cfg_gate_cosine,
                             **options)  # type: ignore[arg-type]  # fmt: skip
        run_bench(config, echo=click.echo)
    except JobError as exc:
        raise _JobUsageError(str(exc)) from None
    except BenchRunFailed as exc:
        raise click.ClickException(str(exc)) from None


_SLURM_OPTIONS = ("partition", "time_limit", "account", "qos", "cpus_per_task", "mem",
                  "array_parallelism", "shards_per_task", "slurm_setup", "slurm_extra", "role_slurm_extra",
                  "requeue", "wait", "accelerator")  # fmt: skip
_SLURM_DEFAULTS = {"time_limit": "60", "shards_per_task": 1, "slurm_setup": (), "slurm_extra": (), "role_slurm_extra": (),
                   "requeue": True, "wait": False, "accelerator": "gpu"}  # fmt: skip


def _slurm_options(args: dict[str, object]):  # noqa: ANN202
    from jobs.slurm.params import SlurmOptions, parse_extra, parse_role_extra

    return SlurmOptions(
        partition=args["partition"], time=args["time_limit"], account=args["account"],
        qos=args["qos"], cpus_per_task=args["cpus_per_task"], mem=args["mem"],
        array_parallelism=args["array_parallelism"], setup=tuple(args["slurm_setup"]),
        extra=parse_extra(args["slurm_extra"]), role_extra=parse_role_extra(args["role_slurm_extra"]),
        shards_per_task=args["shards_per_task"],
        requeue=args["requeue"], wait=args["wait"], accelerator=args["accelerator"],
    )  # type: ignore[arg-type]  # fmt: skip


def _no_slurm(args: dict[str, object]) -> None:
    """Without --slurm, a SLURM option is a mistake: name it."""
    for key, value in args.items():
        if value != _SLURM_DEFAULTS.get(key):
            option = "--time" if key == "time_limit" else "--" + key.replace("_", "-")
            raise JobError(f"{option} needs --slurm (without it the job runs on this node)")
    return None


def _layers(text: object, option: str) -> tuple[int, ...] | None:
    """``--skip-guidance-layers 7,8,9`` -> (7, 8, 9).

    Raises:
        JobError: not comma-separated integers.
    """
    if text is None:
        return None
    try:
        return tuple(int(part) for part in str(text).split(",") if part.strip())
    except ValueError:
        raise JobError(f"{option} {text!r} is invalid: comma-separated block indices, "
                       "e.g. 7,8,9") from None


def _gating_line(summary: dict) -> str:
    """The end-of-run CFG gating line: fresh and reused predictions of the uncond branch, or of
    every auxiliary branch (with a per-branch breakdown) for multi-branch guidance."""
    branches = {k: v for k, v in summary.get("branches", {}).items() if k != "uncond"}
    fresh, reused = summary["fresh_uncond"], summary["reused_uncond"]
    invalidations = f"{summary['invalidations']} invalidations"
    if not branches:
        return (f"cfg gating: {fresh} fresh, {reused} reused unconditional predictions "
                f"({reused / max(1, fresh + reused):.0%} skipped), {invalidations}")  # fmt: skip
    per = summary["branches"]
    fresh, reused = (sum(c[k] for c in per.values()) for k in ("fresh", "reused"))
    detail = ", ".join(f"{name} {c['fresh']}/{c['reused']}" for name, c in per.items())
    return (f"cfg gating: {fresh} fresh, {reused} reused auxiliary predictions "
            f"({reused / max(1, fresh + reused):.0%} skipped; fresh/reused: {detail}), {invalidations}")  # fmt: skip


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} s"


if __name__ == "__main__":
    main()
