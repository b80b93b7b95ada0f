"""Shared by the CLI benchmarks: the common options and interleaved `gen batch` runs."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def parse_args(description: str, prompts: int = 16) -> argparse.Namespace:
    """--model --prompts --batch --steps --size --repeats (small-sd, 4, 20, 128 px, 3 repeats)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--model", default="small-sd")
    ap.add_argument("--prompts", type=int, default=prompts)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    return ap.parse_args()


def gen(manifest: Path, out: Path, args: argparse.Namespace, extra: list[str]) -> dict:
    """One `gen batch` run with OMP_NUM_THREADS=1; its summary.json."""
    cmd = ["gen", "batch", str(manifest), "--out", str(out), "--overwrite", "--model", args.model,
           "--steps", str(args.steps), "--batch-size", str(args.batch), "--height", str(args.size),
           "--width", str(args.size), *extra]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads((out / "summary.json").read_text())


def interleaved(runs: dict[str, list[str]], args: argparse.Namespace) -> tuple[dict[str, float], dict[str, list[dict]]]:
    """Every run once per repeat, in order (A B C A B C ...) to cancel drift.

    Returns:
        Median generate_wall_s per run, and each run's summaries.
    """
    work = Path(tempfile.mkdtemp(prefix="bench-"))
    manifest = work / "prompts.parquet"
    prompts = [f"a photo of thing {i}" for i in range(args.prompts)]
    pq.write_table(pa.table({"prompt": prompts}), manifest)
    summaries: dict[str, list[dict]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for i, (name, extra) in enumerate(runs.items()):
            summary = gen(manifest, work / f"out{i}", args, extra)
            assert summary["samples_ok"] == args.prompts, summary
            summaries[name].append(summary)
    med = {n: statistics.median(s["generate_wall_s"] for s in ss) for n, ss in summaries.items()}
    print(f"{args.model}, {args.prompts} prompts, batch {args.batch}, {args.size}px, "
          f"{args.steps} steps, 1 thread per rank, median of {args.repeats}")  # fmt: skip
    width = max(len(n) for n in runs)
    for name, ss in summaries.items():
        walls = ", ".join(f"{s['generate_wall_s']:.2f}" for s in ss)
        print(f"  {name:{width}s}  generate_wall_s {med[name]:7.3f}  reused uncond "
              f"{ss[-1]['reused_uncond']:4d}  ({walls})")  # fmt: skip
    return med, summaries
