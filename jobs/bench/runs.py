"""One measured run of `gen bench`: a plain diffusers loop or a `gen batch`, each in its own
process(es), and the figures it reports.

Both kinds run the same manifest (prompts and explicit seeds) with the same threads per rank.
`gen batch` runs through ``python -m jobs.cli`` with this checkout's packages on PYTHONPATH,
so torchrun's ranks (``python -m jobs.local.worker``) load the same code as the bench.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jobs


class BenchRunFailed(RuntimeError):
    """A measured run exited with an error; the message holds the tail of its output."""


@dataclass(frozen=True, kw_only=True)
class RunSpec:
    """One configuration to measure."""

    name: str
    """Unique label, e.g. "gen b4 cfg2"."""
    kind: str
    """"plain" (the diffusers loop; on gpus > 1 ranks split with accelerate) or "gen"
    (`gen batch`)."""
    gpus: int = 1
    """Ranks: torchrun processes of either kind."""
    cfg_parallel_size: int = 1
    """Ranks of a CFG group (gen only)."""
    batch_size: int = 1
    """Prompts per pipeline call."""
    cfg_gate_step: float = 1.0
    """Gating fraction F in [0, 1]; 1.0 = off (gen only)."""
    cfg_gate_cosine: float | None = None
    """Adaptive gating threshold in [-1, 1], or None (gen only)."""

    def __post_init__(self) -> None:
        if self.kind not in ("plain", "gen"):
            raise ValueError(f"run kind {self.kind!r} is invalid: 'plain' or 'gen'")
        if self.kind == "plain" and self.cfg_parallel_size != 1:
            raise ValueError(f"run {self.name!r}: the plain loop has no CFG parallelism")
        if self.gpus < 1 or self.batch_size < 1 or self.gpus % self.cfg_parallel_size:
            raise ValueError(f"run {self.name!r}: gpus {self.gpus}, cfg {self.cfg_parallel_size}, "
                             f"batch {self.batch_size} are invalid")  # fmt: skip

    def gen_options(self) -> list[str]:
        """The `gen batch` options that differ between runs."""
        opts = ["--gpus", str(self.gpus), "--cfg-parallel-size", str(self.cfg_parallel_size),
                "--batch-size", str(self.batch_size), "--cfg-gate-step", str(self.cfg_gate_step)]  # fmt: skip
        if self.cfg_gate_cosine is not None:
            opts += ["--cfg-gate-cosine", str(self.cfg_gate_cosine)]
        return opts


@dataclass(frozen=True, kw_only=True)
class Workload:
    """What every run generates, and with how many threads per rank."""

    manifest: str
    """Parquet with ``prompt`` and ``seed`` columns."""
    model: str
    """--model as given (built-in name, directory or hub id)."""
    model_path: str
    """The directory (or hub id) gen loads for it: the plain loop loads the same."""
    num_inference_steps: int
    guidance_scale: float
    height: int | None
    """Pixels; None = the model's native size."""
    width: int | None
    dtype: str
    """"float32", "float16" or "bfloat16", the same for both kinds."""
    device: str
    """"cpu" or "cuda": where the plain loop runs (gen picks its ranks' devices itself)."""
    threads: int
    """CPU threads per rank (OMP_NUM_THREADS), >= 1."""


def subprocess_env(threads: int) -> dict[str, str]:
    """This process's environment, with OMP_NUM_THREADS and this checkout first on PYTHONPATH."""
    root = str(Path(jobs.__file__).resolve().parent.parent)
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}


def _run(cmd: list[str], threads: int, what: str) -> None:
    proc = subprocess.run(cmd, env=subprocess_env(threads), capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise BenchRunFailed(f"{what} failed (exit {proc.returncode}):\n{tail}")


def run_plain(spec: RunSpec, work: Workload, out: Path) -> dict[str, Any]:
    """One plain-loop run in its own process, or on ``spec.gpus`` torchrun processes (the rows
    split with accelerate).

    Returns:
        {"generate_wall_s", "images_per_s", "images", "load_s", "peak_rss_bytes" and
        "peak_device_bytes" (lists, one per rank; the device peak of rank 0 only), "threads"}.
    Raises:
        BenchRunFailed: the process failed.
    """
    result = out / "plain.json"
    launch = [sys.executable, "-m", "jobs.bench.plain_loop"]
    if spec.gpus > 1:
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                  f"--nproc-per-node={spec.gpus}", "-m", "jobs.bench.plain_loop"]  # fmt: skip
    cmd = [*launch, work.manifest, work.model_path, str(out / "png"),
           str(result), "--steps", str(work.num_inference_steps), "--guidance-scale",
           str(work.guidance_scale), "--threads", str(work.threads), "--dtype", work.dtype,
           "--device", work.device, "--batch-size", str(spec.batch_size),
           *(["--height", str(work.height)] if work.height else []),
           *(["--width", str(work.width)] if work.width else [])]  # fmt: skip
    _run(cmd, work.threads, f"run {spec.name!r}")
    found = json.loads(result.read_text())
    return {
        "generate_wall_s": found["generate_s"],
        "images_per_s": found["images_per_s"],
        "images": found["images"],
        "load_s": found["load_s"],
        "peak_rss_bytes": found["peak_rss_bytes_per_rank"],
        "peak_device_bytes": [found["peak_device_bytes"]] * len(found["peak_rss_bytes_per_rank"]),
        "threads": found["threads"],
    }


def run_gen(spec: RunSpec, work: Workload, out: Path) -> dict[str, Any]:
    """One `gen batch` run (fresh --out) through ``python -m jobs.cli``.

    Returns:
        {"generate_wall_s", "images_per_s", "images", "load_s" (max over ranks), "startup_s",
        "peak_rss_bytes" and "peak_device_bytes" (per rank), "fresh_uncond", "reused_uncond",
        "threads"} from OUT/summary.json.
    Raises:
        BenchRunFailed: the command failed.
    """
    cmd = [sys.executable, "-m", "jobs.cli", "batch", work.manifest, "--out", str(out / "gen"),
           "--overwrite", "--model", work.model, "--dtype", work.dtype,
           "--steps", str(work.num_inference_steps), "--guidance-scale", str(work.guidance_scale),
           *(["--height", str(work.height)] if work.height else []),
           *(["--width", str(work.width)] if work.width else []),
           *spec.gen_options()]  # fmt: skip
    _run(cmd, work.threads, f"run {spec.name!r}")
    summary = json.loads((out / "gen" / "summary.json").read_text())
    ranks = sorted(summary["ranks"], key=lambda r: r["rank"])
    return {
        "generate_wall_s": summary["generate_wall_s"],
        "images_per_s": summary["images_per_s"],
        "images": summary["run_samples_ok"],
        "load_s": max(r["load_s"] for r in ranks),
        "startup_s": summary["startup_s"],
        "peak_rss_bytes": [r["peak_rss_bytes"] for r in ranks],
        "peak_device_bytes": [r["peak_device_bytes"] for r in ranks],
        "fresh_uncond": summary["fresh_uncond"],
        "reused_uncond": summary["reused_uncond"],
        "threads": ranks[0]["threads"],
    }


def run_one(spec: RunSpec, work: Workload, out: Path) -> dict[str, Any]:
    """Run ``spec`` into the fresh directory ``out``; see run_plain / run_gen."""
    out.mkdir(parents=True, exist_ok=True)
    return run_plain(spec, work, out) if spec.kind == "plain" else run_gen(spec, work, out)
