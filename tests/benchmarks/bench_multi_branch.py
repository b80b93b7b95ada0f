"""Benchmark: a 4-branch LTX-2 step (cond, uncond, stg, modality) on 2 ranks x 1 thread against
1 rank x 1 thread, and gating every auxiliary branch at F = 0.5 against none.

Runs the real `gen batch` CLI on small-ltx2 (a 4-block 256-d audio-video transformer, 256x256,
17 frames: ~100 ms per sample forward on one core), interleaved (A B C ... A B C ...) to cancel
drift, every run with --no-cfg-batching so that a step is 4 forwards of the micro-batch. The
prompts are one micro-batch per data-parallel group, so the job's figures are the largest over
its samples of: ``steps``, the sum of the sample's ``step_s`` (the denoiser calls of every step,
with the CFG-parallel exchange: what the ratios are about), and ``denoise``, its micro-batch's
``denoise_s`` (the whole pipeline call: also LTX-2's text connectors and latent preparation,
which every rank of a CFG group runs; decode excluded).

- speedup of --cfg-parallel-size 2 over serial: ideal 2.0 (each rank runs 2 of the 4 branches);
  its bound on this machine is measured in the same run as data parallel 2 at half the batch
  (each rank forwards the same work, with no exchange: 4 forwards of B / 2 per step);
- gating uncond, stg and modality at F = 0.5: ideal time ratio 1 - 0.5 x 3/4 = 0.625 serially
  (the reused half of the steps runs cond only: 1 forward instead of 4); under CFG parallel 2
  a fresh step is 2 forwards per rank and a reused one 1, so its ideal is (2 + 1) / 4 = 0.75.

Not a test: run it by hand.

    python -m tests.benchmarks.bench_multi_branch --prompts 4 --batch 4 --steps 4 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tests.benchmarks.cli_runs import gen


def _runs(batch: int) -> dict[str, list[str]]:
    base = ["--no-cfg-batching"]
    return {
        "serial": ["--gpus", "1", *base],
        "cfg 2": ["--gpus", "2", "--cfg-parallel-size", "2", *base],
        "dp 2, half batch (bound)": ["--gpus", "2", "--cfg-parallel-size", "1", "--batch-size", str(batch // 2), *base],
        "serial, F=0.5": ["--gpus", "1", "--cfg-gate-step", "0.5", *base],
        "cfg 2, F=0.5": ["--gpus", "2", "--cfg-parallel-size", "2", "--cfg-gate-step", "0.5", *base],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="small-ltx2")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    assert args.prompts == args.batch and args.batch % 2 == 0, "one micro-batch (even) per run"

    work = Path(tempfile.mkdtemp(prefix="bench-mb-"))
    manifest = work / "prompts.parquet"
    pq.write_table(pa.table({"prompt": [f"a photo of thing {i}" for i in range(args.prompts)]}), manifest)
    runs = _runs(args.batch)
    denoise: dict[str, list[float]] = {name: [] for name in runs}
    steps: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for i, (name, extra) in enumerate(runs.items()):
            out = work / f"out{i}"
            summary = gen(manifest, out, args, extra)
            assert summary["samples_ok"] == args.prompts, summary
            denoise[name].append(max(pq.read_table(out / "samples").column("denoise_s").to_pylist()))
            per_sample: dict[str, float] = {}
            for row in pq.read_table(out / "steps", columns=["sample_id", "step_s"]).to_pylist():
                per_sample[row["sample_id"]] = per_sample.get(row["sample_id"], 0.0) + row["step_s"]
            steps[name].append(max(per_sample.values()))
    med = {name: statistics.median(v) for name, v in steps.items()}
    med_denoise = {name: statistics.median(v) for name, v in denoise.items()}
    print(f"{args.model}, {args.prompts} prompts, batch {args.batch}, {args.size}px, {args.steps} steps, "
          f"4 branches, --no-cfg-batching, 1 thread per rank, median of {args.repeats}")  # fmt: skip
    width = max(map(len, runs))
    for name, v in steps.items():
        print(f"  {name:{width}s}  steps {med[name]:7.3f} s ({', '.join(f'{x:.2f}' for x in v)})  "
              f"denoise {med_denoise[name]:7.3f} s ({', '.join(f'{x:.2f}' for x in denoise[name])})")
    print("ratios of steps:")
    bound = med["serial"] / med["dp 2, half batch (bound)"]
    speedup = med["serial"] / med["cfg 2"]
    print(f"cfg 2 over serial: {speedup:.2f}x (ideal 2.00; bound dp 2 at half batch {bound:.2f}x; "
          f"{speedup / bound:.0%} of the bound)")  # fmt: skip
    print(f"gating F=0.5 / none: serial {med['serial, F=0.5'] / med['serial']:.3f}, "
          f"(ideal {1 - 0.5 * 3 / 4:.3f}), cfg 2 {med['cfg 2, F=0.5'] / med['cfg 2']:.3f} (ideal 0.750)")


if __name__ == "__main__":
    main()
