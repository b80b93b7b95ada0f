"""Benchmark: CFG gating (--cfg-gate-step) on one rank, and with CFG parallel on two.

Runs the real `gen batch` CLI on small-sd, interleaved (A B C ...) to cancel drift, 1 thread per
rank, and prints the median generate_wall_s of each run and the ratios the gating issue asks
for. Not a test: run it by hand.

    python -m tests.benchmarks.bench_cfg_gating --prompts 16 --batch 4 --steps 20 --size 128
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tests.benchmarks.bench_cfg_parallel import _gen

RUNS = {
    "1 rank, F=1.0": ["--gpus", "1", "--cfg-gate-step", "1.0"],
    "1 rank, F=0.5": ["--gpus", "1", "--cfg-gate-step", "0.5"],
    "2 ranks cfg 2, F=0.5": ["--gpus", "2", "--cfg-parallel-size", "2", "--cfg-gate-step", "0.5"],
    "2 ranks cfg 2, F=1.0": ["--gpus", "2", "--cfg-parallel-size", "2", "--cfg-gate-step", "1.0"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="small-sd")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-gate-"))
    manifest = work / "prompts.parquet"
    pq.write_table(pa.table({"prompt": [f"a photo of thing {i}" for i in range(args.prompts)]}), manifest)
    walls: dict[str, list[float]] = {name: [] for name in RUNS}
    reused: dict[str, int] = {}
    for _ in range(args.repeats):
        for i, (name, extra) in enumerate(RUNS.items()):
            summary = _gen(manifest, work / f"out{i}", args, extra)
            assert summary["samples_ok"] == args.prompts, summary
            walls[name].append(summary["generate_wall_s"])
            reused[name] = summary["reused_uncond"]
    med = {name: statistics.median(w) for name, w in walls.items()}
    print(f"{args.model}, {args.prompts} prompts, batch {args.batch}, {args.size}px, "
          f"{args.steps} steps, 1 thread per rank, median of {args.repeats}")  # fmt: skip
    for name, w in walls.items():
        print(f"  {name:22s} generate_wall_s {med[name]:7.3f}  reused uncond {reused[name]:4d}  "
              f"({', '.join(f'{x:.2f}' for x in w)})")  # fmt: skip
    print(f"  F=0.5 / F=1.0, 1 rank            : {med['1 rank, F=0.5'] / med['1 rank, F=1.0']:.3f} (ideal 0.75)")
    print(f"  1 rank / cfg 2, both F=0.5       : {med['1 rank, F=0.5'] / med['2 ranks cfg 2, F=0.5']:.3f}x")
    print(f"  F=0.5 / F=1.0, cfg 2             : {med['2 ranks cfg 2, F=0.5'] / med['2 ranks cfg 2, F=1.0']:.3f}")


if __name__ == "__main__":
    main()
