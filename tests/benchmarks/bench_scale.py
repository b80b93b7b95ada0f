"""Benchmark: planning and worker memory at manifest scale (10k and 2,000,000 rows).

1. `gen batch big.parquet --dry-run` (and with --slurm --shards-per-task 4) on a 2M-row manifest:
   wall seconds and peak RSS of the process.
2. One worker rank running one small shard (shard 0, tiny-sd, 1 step) of a 10k-row and of a
   2M-row manifest: its peak RSS, which should not grow with the manifest.

Manifests are generated here: a ``prompt`` column of short strings, written with row groups of
--row-group rows. Not a test: run it by hand.

    python -m tests.benchmarks.bench_scale --rows 2000000 --row-group 100000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from jobs.bench.runs import subprocess_env
from jobs.config import BatchConfig
from jobs.job import new_run_id, prepare_job

MIB = 1 << 20


def write_manifest(path: Path, rows: int, row_group: int) -> None:
    """``rows`` short prompts, written ``row_group`` rows per row group, without building one
    table of every row (so that this process stays small too)."""
    schema = pa.schema([("prompt", pa.string())])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, row_group):
            stop = min(rows, start + row_group)
            writer.write_table(pa.table({"prompt": [f"a photo of thing {i}" for i in range(start, stop)]},
                                        schema=schema), row_group_size=row_group)  # fmt: skip


_PEAK = "gen-bench-peak-rss-bytes="
_WRAP = (f"import atexit, runpy, sys; from jobs.memory import peak_rss_bytes; "
         f"atexit.register(lambda: print('{_PEAK}%d' % peak_rss_bytes())); "
         f"mod = sys.argv[1]; sys.argv = sys.argv[1:]; runpy.run_module(mod, run_name='__main__')")  # fmt: skip


def measured(module: str, args: list[str], env: dict[str, str]) -> tuple[float, int, str]:
    """Run ``python -m module args``; its wall seconds, own peak RSS (bytes: VmHWM, printed by
    the child at exit; wait4's ru_maxrss would include this process's size at fork) and output."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _WRAP, module, *args], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{module} {args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}")
    lines = proc.stdout.splitlines()
    peak = int(next(x for x in lines if x.startswith(_PEAK)).removeprefix(_PEAK))
    return wall, peak, "\n".join(x for x in lines if not x.startswith(_PEAK))


def dry_run(manifest: Path, extra: list[str]) -> dict:
    wall, rss, output = measured("jobs.cli", ["batch", str(manifest), "--dry-run", *extra], subprocess_env(1))
    return {"wall_s": round(wall, 2), "peak_rss_mib": round(rss / MIB, 1), "output": output.strip().splitlines()}


def worker_rss(manifest: Path, out: Path, shard_size: int) -> dict:
    """Peak RSS of one worker rank running shard 0 of ``manifest`` (1 step, tiny-sd)."""
    config = BatchConfig(manifest=str(manifest), out=str(out), model="tiny-sd", num_inference_steps=1,
                         batch_size=shard_size, shard_size=shard_size)  # fmt: skip
    prepare_job(config, overwrite=True, echo=lambda _: None)
    env = {**subprocess_env(1), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
    wall, rss, _ = measured("jobs.local.worker", [str(out), new_run_id(), "local", "0"], env)
    stats = json.loads((out / ".gen" / "runs" / "local" / "ranks" / "rank-00000.json").read_text())
    assert stats["samples_ok"] == shard_size, stats
    return {"wall_s": round(wall, 2), "peak_rss_mib": round(rss / MIB, 1),
            "rank_peak_rss_mib": round(stats["peak_rss_bytes"] / MIB, 1)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--small-rows", type=int, default=10_000)
    ap.add_argument("--row-group", type=int, default=100_000, help="rows per row group")
    ap.add_argument("--shard-size", type=int, default=4, help="rows per shard of the worker runs")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    big, small = work / "big.parquet", work / "small.parquet"
    start = time.perf_counter()
    write_manifest(big, args.rows, args.row_group)
    write_manifest(small, args.small_rows, args.row_group)
    print(f"manifests: {args.rows:,} rows ({big.stat().st_size / MIB:.1f} MiB) and {args.small_rows:,} rows, "
          f"row groups of {args.row_group:,}; written in {time.perf_counter() - start:.1f} s")  # fmt: skip
    found = {
        "dry_run_local": dry_run(big, ["--gpus", "2"]),
        "dry_run_slurm": dry_run(big, ["--slurm", "--gpus", "8", "--shards-per-task", "4", "--shard-size", "200"]),
        "worker_small": worker_rss(small, work / "out-small", args.shard_size),
        "worker_big": worker_rss(big, work / "out-big", args.shard_size),
    }
    for name, fig in found.items():
        print(f"{name}: " + ", ".join(f"{k} {v}" for k, v in fig.items() if k != "output"))
        for line in fig.get("output", []):
            print(f"    {line}")
    growth = found["worker_big"]["peak_rss_mib"] - found["worker_small"]["peak_rss_mib"]
    print(f"worker peak RSS growth {args.small_rows:,} -> {args.rows:,} rows: {growth:+.1f} MiB")
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "output"} for k, v in found.items()}))


if __name__ == "__main__":
    main()
