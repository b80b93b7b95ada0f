"""Benchmark: CFG gating (--cfg-gate-step) on one rank, and with CFG parallel on two.

Runs the real `gen batch` CLI on small-sd, interleaved (A B C ...) to cancel drift, 1 thread per
rank, and prints the median generate_wall_s of each run and the ratios the gating issue asks
for. Not a test: run it by hand.

    python -m tests.benchmarks.bench_cfg_gating --prompts 16 --batch 4 --steps 20 --size 128
"""

from __future__ import annotations

from tests.benchmarks.cli_runs import interleaved, parse_args

RUNS = {
    "1 rank, F=1.0": ["--gpus", "1", "--cfg-gate-step", "1.0"],
    "1 rank, F=0.5": ["--gpus", "1", "--cfg-gate-step", "0.5"],
    "2 ranks cfg 2, F=0.5": ["--gpus", "2", "--cfg-parallel-size", "2", "--cfg-gate-step", "0.5"],
    "2 ranks cfg 2, F=1.0": ["--gpus", "2", "--cfg-parallel-size", "2", "--cfg-gate-step", "1.0"],
}


def main() -> None:
    med, _ = interleaved(RUNS, parse_args(__doc__.splitlines()[0]))
    print(f"  F=0.5 / F=1.0, 1 rank            : {med['1 rank, F=0.5'] / med['1 rank, F=1.0']:.3f} (ideal 0.75)")
    print(f"  1 rank / cfg 2, both F=0.5       : {med['1 rank, F=0.5'] / med['2 ranks cfg 2, F=0.5']:.3f}x")
    print(f"  F=0.5 / F=1.0, cfg 2             : {med['2 ranks cfg 2, F=0.5'] / med['2 ranks cfg 2, F=1.0']:.3f}")


if __name__ == "__main__":
    main()
