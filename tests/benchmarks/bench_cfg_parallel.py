"""Benchmark: CFG parallel (2 ranks x 1 thread, --cfg-parallel-size 2) against 1 rank x 1 thread.

Runs the real `gen batch` CLI (torchrun gloo ranks on CPU, or GPUs where there are some) on
small-sd, interleaved (A B C A B C ...) to cancel drift, and prints the median generate_wall_s
of each and their ratios. Also times, in this process and on the same model, the work that
bounds the ratio: one UNet forward at batch B and 2B, text encoding, and one VAE decode.
Not a test: run it by hand.

    python -m tests.benchmarks.bench_cfg_parallel --prompts 16 --batch 4 --steps 20 --size 128
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pipeline.loading import load_pipeline, resolve_model
from tests.benchmarks.cli_runs import interleaved, parse_args

RUNS = {
    "serial (1 rank, cfg batching)": ["--gpus", "1"],
    "serial (1 rank, --no-cfg-batching)": ["--gpus", "1", "--no-cfg-batching"],
    "cfg parallel (2 ranks, cfg 2)": ["--gpus", "2", "--cfg-parallel-size", "2"],
}


def _median_s(fn, repeats: int = 7) -> float:  # noqa: ANN001
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.inference_mode()
def _parts(args: argparse.Namespace) -> dict[str, float]:
    """Seconds of the pieces, at 1 thread: UNet forward at B and 2B, encode B prompts, decode 1."""
    torch.set_num_threads(1)
    pipe = load_pipeline(resolve_model(args.model), dtype=torch.float32, device=torch.device("cpu"))
    b, lat = args.batch, args.size // pipe.vae_scale_factor
    x = torch.randn(2 * b, pipe.unet.config.in_channels, lat, lat)
    emb = torch.randn(2 * b, 77, pipe.text_encoder.config.hidden_size)
    t = torch.tensor(500)
    prompts = [f"a photo of thing {i}" for i in range(b)]
    return {
        "unet_B": _median_s(lambda: pipe.unet(x[:b], t, encoder_hidden_states=emb[:b])),
        "unet_2B": _median_s(lambda: pipe.unet(x, t, encoder_hidden_states=emb)),
        "encode_B": _median_s(lambda: pipe.encode_prompt(prompts, "cpu", 1, True, [""] * b)),
        "decode_1": _median_s(lambda: pipe.vae.decode(x[:1] / pipe.vae.config.scaling_factor)),
    }


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    med, _ = interleaved(RUNS, args)
    par = med["cfg parallel (2 ranks, cfg 2)"]
    print(f"  speedup vs serial batched  : {med['serial (1 rank, cfg batching)'] / par:.3f}x")
    print(f"  speedup vs serial separate : {med['serial (1 rank, --no-cfg-batching)'] / par:.3f}x")
    parts = _parts(args)
    print("  pieces (median s, 1 thread): " + ", ".join(f"{k} {v:.4f}" for k, v in parts.items()))
    per_batch_serial = args.steps * parts["unet_2B"] + parts["encode_B"] + args.batch * parts["decode_1"]
    per_batch_par = args.steps * parts["unet_B"] + parts["encode_B"] + args.batch / 2 * parts["decode_1"]
    print(f"  compute bound vs batched   : unet_2B / unet_B = {parts['unet_2B'] / parts['unet_B']:.3f}; "
          f"whole micro-batch {per_batch_serial / per_batch_par:.3f}x; "
          f"encode share {parts['encode_B'] / per_batch_serial:.2%}")  # fmt: skip


if __name__ == "__main__":
    main()
