"""`gen bench`: gen against a plain diffusers loop, and the CFG-parallel and gating ratios.

Every configuration runs in its own process(es) on the same manifest (prompts with explicit
seeds), interleaved (A B C ... A B C ...) to cancel drift, ``repeats`` times:

    plain loop           pipe(prompt, generator=...) per prompt, PNGs   (jobs.bench.plain_loop)
    gen b1, gen bK       gen batch, 1 rank, --batch-size 1 and a sweep of K
    gen bB cfg2          --gpus N --cfg-parallel-size 2 against --gpus N/2 (bB: --batch-size B)
    gen bB gate0.5       --cfg-gate-step 0.5 against 1.0; gen bB gate-cos: --cfg-gate-cosine
    gen bB cfg2 gate0.5  both together
    accelerate b1, bB    the plain loop on N ranks, rows split with accelerate's
                         split_between_processes, 1 and B prompts per call
    gen b1 dpN, bB dpN   gen batch on the same N ranks, data parallel

with the same threads per rank everywhere. Then the per-call overhead of the intercept
(jobs.bench.overhead) on tiny-sd, against a denoiser call of the benchmarked model. The
report (a table and a JSON file) holds every run's raw figures, medians and spreads, the
ratios and whether each target was met.
"""

from __future__ import annotations

import json
import os
import platform as pyplatform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from jobs.bench.report import format_report
from jobs.bench.runs import BenchRunFailed, RunSpec, Workload, run_one, subprocess_env
from jobs.bench.stats import Target, best, compare, interleave, spread
from jobs.errors import JobError

TARGETS = {
    "gen vs plain, batch 1": Target(op=">=", value=1.0),
    "gen vs plain, best batch": Target(op=">", value=1.0),
    "gen vs accelerate, batch 1": Target(op=">=", value=1.0),
    "gen vs accelerate, best batch": Target(op=">=", value=1.5),
    "cfg parallel": Target(op=">=", value=1.85),
    "gate 0.5": Target(op="<=", value=0.80),
    "overhead per call": Target(op="<=", value=0.01),
}
"""The issue's targets (2-core CPU, small-sd 128x128, 20 steps, batch 4); met or not is
reported for every bench, but they are meant for those settings."""


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    """Options of `gen bench`."""

    model: str = "small-sd"
    """Built-in name, local diffusers directory or hub id."""
    gpus: int = 2
    """Ranks of the CFG-parallel runs (dp = gpus / 2 x cfg 2), compared with gpus / 2 ranks
    without CFG parallelism; 1 skips the CFG-parallel comparisons. 1 or even."""
    num_inference_steps: int = 20
    """Scheduler steps, >= 1."""
    height: int | None = None
    """Pixels, a positive multiple of 8; None = the model's native size."""
    width: int | None = None
    """Pixels, a positive multiple of 8; None = the model's native size."""
    num_prompts: int = 16
    """Manifest rows (one image each), >= 1."""
    repeats: int = 3
    """Times every configuration runs (interleaved), >= 1."""
    batch_size: int = 4
    """--batch-size of the CFG-parallel and gating runs, >= 1."""
    batch_sizes: tuple[int, ...] = (2, 4, 8)
    """Sweep for gen's best batch size against the plain loop; sizes above num_prompts are
    dropped, batch_size is added."""
    threads: int = 1
    """CPU threads per rank (OMP_NUM_THREADS) of every run, the plain loop's included, >= 1."""
    guidance_scale: float = 7.5
    """CFG scale, > 1 (the comparisons are about the unconditional forward)."""
    cfg_gate_step: float = 0.5
    """Gating fraction of the gated runs, in [0, 1)."""
    cfg_gate_cosine: float | None = 0.99
    """Threshold of the adaptive-gating run, in [-1, 1]; None skips it."""
    dtype: str = "auto"
    """auto = bfloat16 on GPU, float32 on CPU; the plain loop uses the same."""
    overhead: bool = True
    """Also measure the intercept's per-call overhead (tiny-sd, and the model's call time)."""
    json_path: str | None = None
    """Where the JSON report goes; None = bench-<model>-<timestamp>.json here."""
    work_dir: str | None = None
    """Where runs write (kept); None = a temporary directory, removed afterwards."""

    def __post_init__(self) -> None:
        def need(ok: bool, option: str, value: Any, allowed: str) -> None:
            if not ok:
                raise JobError(f"{option} {value!r} is invalid: {allowed}")

        need(self.gpus == 1 or (self.gpus >= 2 and self.gpus % 2 == 0), "--gpus", self.gpus,
             "must be 1 or even (CFG groups of 2)")  # fmt: skip
        need(self.num_inference_steps >= 1, "--steps", self.num_inference_steps, "must be >= 1")
        for option, value in (("--height", self.height), ("--width", self.width)):
            need(value is None or (value > 0 and value % 8 == 0), option, value,
                 "must be a positive multiple of 8")  # fmt: skip
        need(self.num_prompts >= 1, "--prompts", self.num_prompts, "must be >= 1")
        need(self.repeats >= 1, "--repeats", self.repeats, "must be >= 1")
        need(self.batch_size >= 1, "--batch-size", self.batch_size, "must be >= 1")
        need(all(b >= 1 for b in self.batch_sizes), "--batch-sizes", self.batch_sizes, "each >= 1")
        need(self.threads >= 1, "--threads", self.threads, "must be >= 1")
        need(self.guidance_scale > 1, "--guidance-scale", self.guidance_scale, "must be > 1")
        need(0 <= self.cfg_gate_step < 1, "--cfg-gate-step", self.cfg_gate_step, "must be in [0, 1)")
        need(self.cfg_gate_cosine is None or -1 <= self.cfg_gate_cosine <= 1, "--cfg-gate-cosine",
             self.cfg_gate_cosine, "must be in [-1, 1]")  # fmt: skip

    @property
    def sweep(self) -> tuple[int, ...]:
        """Batch sizes of the sweep: those <= num_prompts, and batch_size, ascending."""
        return tuple(sorted({b for b in self.batch_sizes if b <= self.num_prompts} | {self.batch_size}))


def plan_runs(config: BenchConfig) -> list[RunSpec]:
    """The configurations to measure, in run order within a repeat.

    Returns:
        The plain loop, gen at batch 1 and at each sweep size, then (at config.batch_size) the
        CFG-parallel baseline and runs, the gated runs, both together, and (gpus > 1) the
        accelerate-split plain loop and gen data parallel on the same gpus ranks, at batch 1
        and batch_size; no duplicates.
    """
    b, f, half = config.batch_size, config.cfg_gate_step, config.gpus // 2
    runs = [RunSpec(name="plain loop", kind="plain")]
    runs += [RunSpec(name=f"gen b{k}", kind="gen", batch_size=k) for k in sorted({1, *config.sweep})]
    if config.gpus > 1:
        if half > 1:
            runs.append(RunSpec(name=f"gen b{b} dp{half}", kind="gen", gpus=half, batch_size=b))
        runs.append(RunSpec(name=f"gen b{b} cfg2", kind="gen", gpus=config.gpus, cfg_parallel_size=2,
                            batch_size=b))  # fmt: skip
    runs.append(RunSpec(name=f"gen b{b} gate{f:g}", kind="gen", batch_size=b, cfg_gate_step=f))
    if config.cfg_gate_cosine is not None:
        runs.append(RunSpec(name=f"gen b{b} gate-cos{config.cfg_gate_cosine:g}", kind="gen",
                            batch_size=b, cfg_gate_cosine=config.cfg_gate_cosine))  # fmt: skip
    if config.gpus > 1:
        runs.append(RunSpec(name=f"gen b{b} cfg2 gate{f:g}", kind="gen", gpus=config.gpus,
                            cfg_parallel_size=2, batch_size=b, cfg_gate_step=f))  # fmt: skip
        n = config.gpus
        for k in sorted({1, b}):
            runs.append(RunSpec(name=f"accelerate b{k}", kind="plain", gpus=n, batch_size=k))
        runs += [RunSpec(name=f"gen b{k} dp{n}", kind="gen", gpus=n, batch_size=k)
                 for k in sorted({1, b}) if f"gen b{k} dp{n}" not in {r.name for r in runs}]  # fmt: skip
    return runs


def comparisons(config: BenchConfig, figures: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The ratios the bench reports, from every run's per-repeat figures.

    Args:
        config: the bench's options (run names follow plan_runs).
        figures: run name -> one dict per repeat with "generate_wall_s" and "images_per_s".
    Returns:
        One entry per comparison (see jobs.bench.stats.compare), with "numerator" and
        "denominator" run names; "gen vs plain, best batch" also names the best batch size.
    """
    b, f, half = config.batch_size, config.cfg_gate_step, config.gpus // 2

    def col(name: str, key: str) -> list[float]:
        return [r[key] for r in figures[name]]

    def add(name: str, num: str, den: str, key: str, what: str) -> None:
        entry = compare(name, col(num, key), col(den, key), what=what, target=TARGETS.get(name))
        found.append({**entry, "numerator": num, "denominator": den})

    found: list[dict[str, Any]] = []
    add("gen vs plain, batch 1", "gen b1", "plain loop", "images_per_s", "images/s gen / plain loop")
    sweep = {f"gen b{k}": col(f"gen b{k}", "images_per_s") for k in config.sweep}
    top = best(sweep)
    add("gen vs plain, best batch", top, "plain loop", "images_per_s",
        f"images/s gen at its best batch size ({top.split('b')[-1]}) / plain loop")  # fmt: skip
    base = f"gen b{b}" if half <= 1 else f"gen b{b} dp{half}"
    if config.gpus > 1:
        add("cfg parallel", base, f"gen b{b} cfg2", "generate_wall_s",
            f"generate_wall_s {half} rank(s) / {config.gpus} ranks with --cfg-parallel-size 2 (speed-up)")  # fmt: skip
    add("gate 0.5" if f == 0.5 else f"gate {f:g}", f"gen b{b} gate{f:g}", f"gen b{b}", "generate_wall_s",
        f"generate_wall_s --cfg-gate-step {f:g} / 1.0")  # fmt: skip
    if config.cfg_gate_cosine is not None:
        g = config.cfg_gate_cosine
        add("adaptive gate", f"gen b{b} gate-cos{g:g}", f"gen b{b}", "generate_wall_s",
            f"generate_wall_s --cfg-gate-cosine {g:g} / no gate")  # fmt: skip
    if config.gpus > 1:
        add("cfg parallel + gate", base, f"gen b{b} cfg2 gate{f:g}", "generate_wall_s",
            f"generate_wall_s {half} rank(s) without gate / {config.gpus} ranks cfg 2 with "
            f"--cfg-gate-step {f:g} (speed-up)")  # fmt: skip
        n = config.gpus
        add("gen vs accelerate, batch 1", f"gen b1 dp{n}", "accelerate b1", "images_per_s",
            f"images/s gen / the plain loop split with accelerate, both on {n} ranks, 1 prompt per call")  # fmt: skip
        gens = {f"gen b{k} dp{n}": col(f"gen b{k} dp{n}", "images_per_s") for k in sorted({1, b})}
        top = best(gens)
        add("gen vs accelerate, best batch", top, "accelerate b1", "images_per_s",
            f"images/s gen at its best batch size ({top.split(' ')[1][1:]}) / accelerate split at "
            f"batch 1, {n} ranks")  # fmt: skip
        if b > 1:
            add("gen vs accelerate, same batch", f"gen b{b} dp{n}", f"accelerate b{b}", "images_per_s",
                f"images/s gen / accelerate split, both {b} prompts per call on {n} ranks")  # fmt: skip
    return found


def write_manifest(path: Path, num_prompts: int) -> None:
    """The bench manifest: ``prompt`` and explicit ``seed`` columns (both kinds use the seeds)."""
    prompts = [f"a photo of thing {i}, studio light" for i in range(num_prompts)]
    pq.write_table(pa.table({"prompt": prompts, "seed": list(range(num_prompts))}), path)


def machine_info(device: str) -> dict[str, Any]:
    """Cores, memory, CPU model, versions and the device the ranks run on."""
    info: dict[str, Any] = {
        "cpu_cores": os.cpu_count(),
        "cores_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": _cpu_model(),
        "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "platform": pyplatform.platform(),
        "python": pyplatform.python_version(),
        "device": device,
        "hostname": pyplatform.node(),
    }
    for name in ("gen", "torch", "diffusers", "transformers"):
        try:
            info[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            info[name] = None
    if device == "cuda":
        import torch

        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpus_visible"] = torch.cuda.device_count()
    return info


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def run_bench(config: BenchConfig, *, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the benchmark, print its table, write its JSON report, and return the report.

    Raises:
        JobError: bad options or model.
        BenchRunFailed: a measured run failed (its output's tail is in the message).
    """
    from parallel.platform import detect_platform, parse_dtype
    from pipeline.loading import resolve_model

    platform = detect_platform()
    if platform.name != "cpu" and config.gpus > platform.num_devices:
        raise JobError(f"--gpus {config.gpus}: only {platform.num_devices} {platform.name} devices are visible")
    try:
        model = resolve_model(config.model)
    except ValueError as exc:
        raise JobError(str(exc)) from None
    dtype = str(parse_dtype(config.dtype, platform)).removeprefix("torch.")
    work_root = Path(config.work_dir or tempfile.mkdtemp(prefix="gen-bench-"))
    work_root.mkdir(parents=True, exist_ok=True)
    manifest = work_root / "prompts.parquet"
    write_manifest(manifest, config.num_prompts)
    work = Workload(manifest=str(manifest), model=config.model, model_path=model.path,
                    num_inference_steps=config.num_inference_steps,
                    guidance_scale=config.guidance_scale, height=config.height, width=config.width,
                    dtype=dtype, device="cuda" if platform.name == "cuda" else "cpu",
                    threads=config.threads)  # fmt: skip
    runs = plan_runs(config)
    order = interleave([r.name for r in runs], config.repeats)
    by_name = {r.name: r for r in runs}
    echo(f"bench: {len(runs)} configurations x {config.repeats} repeat(s), interleaved; "
         f"{config.model}, {config.num_prompts} prompts, {config.num_inference_steps} steps, "
         f"{config.threads} thread(s) per rank; work: {work_root}")  # fmt: skip
    figures: dict[str, list[dict[str, Any]]] = {r.name: [] for r in runs}
    started = time.time()
    try:
        for i, (repeat, name) in enumerate(order):
            run_dir = work_root / "runs" / f"{repeat:02d}-{runs.index(by_name[name]):02d}"
            found = run_one(by_name[name], work, run_dir)
            shutil.rmtree(run_dir, ignore_errors=True)
            figures[name].append(found)
            echo(f"  [{i + 1}/{len(order)}] repeat {repeat + 1} {name}: {found['generate_wall_s']:.3f} s, "
                 f"{found['images_per_s']:.3f} img/s")  # fmt: skip
        overhead = _overhead(config, work, work_root) if config.overhead else None
    finally:
        if config.work_dir is None:
            shutil.rmtree(work_root, ignore_errors=True)
    report = _report(config, runs, figures, overhead, machine_info(work.device), time.time() - started)
    path = Path(config.json_path or f"bench-{Path(config.model).name}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    for line in format_report(report):
        echo(line)
    echo(f"json: {path}")
    report["json_path"] = str(path)
    return report


def _report(config: BenchConfig, runs: list[RunSpec], figures: dict[str, list[dict[str, Any]]],
            overhead: dict[str, Any] | None, machine: dict[str, Any], wall_s: float) -> dict[str, Any]:  # fmt: skip
    summary = {}
    for spec in runs:
        rows = figures[spec.name]
        peaks = [max(r["peak_rss_bytes"][k] for r in rows) for k in range(len(rows[0]["peak_rss_bytes"]))]
        summary[spec.name] = {
            "spec": asdict(spec),
            "generate_wall_s": spread([r["generate_wall_s"] for r in rows]),
            "images_per_s": spread([r["images_per_s"] for r in rows]),
            "peak_rss_bytes_per_rank": peaks,
            "peak_device_bytes_per_rank": [max(r["peak_device_bytes"][k] for r in rows)
                                           for k in range(len(peaks))],  # fmt: skip
            "reused_uncond": rows[-1].get("reused_uncond"),
            "fresh_uncond": rows[-1].get("fresh_uncond"),
            "repeats": rows,
        }
    ratios = comparisons(config, figures)
    if overhead is not None:
        ratios.append(overhead.pop("comparison"))
    return {
        "config": asdict(config),
        "machine": machine,
        "bench_wall_s": round(wall_s, 1),
        "runs": summary,
        "comparisons": ratios,
        "overhead": overhead,
        "targets_note": "targets are set for a 2-core CPU, small-sd 128x128, 20 steps, batch 4",
    }


def _overhead(config: BenchConfig, work: Workload, root: Path) -> dict[str, Any]:
    """Per-call overhead on tiny-sd (serial, and CFG parallel on 2 ranks when gpus > 1), and the
    benchmarked model's denoiser call time at the bench's batch size, size and threads."""
    size = config.height or config.width
    results: dict[str, Any] = {}
    common = ["--steps", str(config.num_inference_steps), "--threads", str(config.threads),
              "--dtype", work.dtype, "--repeats", str(max(2, config.repeats))]  # fmt: skip

    def run(name: str, *args: str, ranks: int = 1) -> None:
        out = root / "overhead" / name
        if ranks == 1:
            cmd = [sys.executable, "-m", "jobs.bench.overhead", str(out), *args, *common]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc-per-node={ranks}", "-m", "jobs.bench.overhead", str(out), *args,
                   *common, "--ranks", str(ranks)]  # fmt: skip
        proc = subprocess.run(cmd, env=subprocess_env(config.threads), capture_output=True, text=True)
        if proc.returncode != 0:
            raise BenchRunFailed(f"overhead run {name!r} failed:\n{(proc.stdout + proc.stderr)[-2000:]}")
        results[name] = (json.loads(out.read_text()) if ranks == 1 else
                         [json.loads(p.read_text()) for p in sorted(out.glob("rank-*.json"))])  # fmt: skip

    b = str(config.batch_size)
    run("tiny-sd serial", "--model", "tiny-sd", "--batch-size", b)
    run("tiny-sd serial, no cfg batching", "--model", "tiny-sd", "--batch-size", b, "--no-cfg-batching")
    if config.gpus > 1:
        run("tiny-sd cfg parallel", "--model", "tiny-sd", "--batch-size", b, ranks=2)
    model_run = "tiny-sd serial"
    if config.model != "tiny-sd" or size:
        model_run = f"{config.model} serial, bench size"
        run(model_run, "--model", config.model, "--batch-size", b, *(["--size", str(size)] if size else []))
    over = results["tiny-sd serial"]["overhead_us"]["median"]
    call = results[model_run]["inner_us"]["median"]
    frac = over / call
    target = TARGETS["overhead per call"]
    results["comparison"] = {
        "name": "overhead per call",
        "what": f"tiny-sd intercept overhead per call / {config.model} denoiser call (median, serial, "
                f"batch {config.batch_size})",
        "ratio": frac,
        "paired": None,
        "target": target.describe(),
        "met": target.met(frac),
        "shortfall": target.shortfall(frac),
        "numerator": f"{over:.1f} us",
        "denominator": f"{call:.1f} us",
    }  # fmt: skip
    return results
