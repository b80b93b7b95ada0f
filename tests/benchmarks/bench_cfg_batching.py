"""Benchmark: CFG branches as one concatenated forward vs one forward per branch.

Runs the real stages on small-sd, interleaved (A B A B ...) to cancel drift, and prints the
median denoise time of each and their ratio. Not a test: run it by hand.

    python -m tests.benchmarks.bench_cfg_batching --batch 1 --steps 20 --size 128 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics

import torch

from pipeline.generate import SampleRequest, StageRunner
from pipeline.loading import load_pipeline, resolve_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="small-sd")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(resolve_model(args.model), dtype=torch.float32, device=torch.device("cpu"))
    requests = [
        SampleRequest(sample_id=f"s{i}", prompt=f"prompt {i}", negative_prompt="", seed=i,
                      height=args.size, width=args.size, num_inference_steps=args.steps,
                      guidance_scale=7.5)  # fmt: skip
        for i in range(args.batch)
    ]
    runners = {
        "batched": StageRunner(pipe, cfg_batching=True, guidance_rescale=0.0),
        "separate": StageRunner(pipe, cfg_batching=False, guidance_rescale=0.0),
    }
    for runner in runners.values():  # warm-up
        runner.run(requests)
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(args.repeats):
        for name, runner in runners.items():
            out = runner.run(requests)
            times[name].append(out.results[0].denoise_s)
    med = {name: statistics.median(t) for name, t in times.items()}
    for name, t in times.items():
        print(f"{name:9s} denoise_s median {med[name]:.3f}  min {min(t):.3f}  max {max(t):.3f}")
    print(f"separate / batched = {med['separate'] / med['batched']:.3f} "
          f"({args.model}, batch {args.batch}, {args.size}px, {args.steps} steps, "
          f"{args.threads} thread(s))")  # fmt: skip


if __name__ == "__main__":
    main()
