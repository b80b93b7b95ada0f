"""The baseline `gen bench` measures gen against: a plain diffusers loop, as a user writes it.

One process, one pipeline, one prompt per call, a PNG per image (as GenEval's generation
script does)::

    pipe = DiffusionPipeline.from_pretrained(model_dir)
    for prompt, seed in rows:
        pipe(prompt, generator=torch.Generator("cpu").manual_seed(seed), ...).images[0].save(...)

Run it in its own process so that its threads and peak memory are its own:

    python -m jobs.bench.plain_loop MANIFEST MODEL_DIR OUT_DIR RESULT_JSON --steps 20 --height 128 \\
        --width 128 --guidance-scale 7.5 --threads 1

Model load and the generation loop are timed separately, so images/s compares like with like
against `gen batch`'s generate_wall_s (which excludes model load).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from jobs.memory import peak_rss_bytes


@dataclass(frozen=True, kw_only=True)
class PlainLoopResult:
    """What one plain-loop run measured."""

    images: int
    """PNG files written."""
    load_s: float
    """Seconds of ``DiffusionPipeline.from_pretrained`` (import of diffusers excluded)."""
    generate_s: float
    """Seconds of the generation loop: every pipeline call and PNG save."""
    images_per_s: float
    """images / generate_s."""
    threads: int
    """torch.get_num_threads() during the loop."""
    peak_rss_bytes: int
    """Peak resident memory of the process (VmHWM, jobs.memory), bytes."""
    peak_device_bytes: int
    """Peak CUDA memory allocated by torch, bytes; 0 on the CPU."""


def run_plain_loop(manifest: str, model_dir: str, out_dir: str, *, num_inference_steps: int,
                   guidance_scale: float, height: int | None, width: int | None,
                   threads: int, dtype: str = "float32", device: str = "cpu") -> PlainLoopResult:  # fmt: skip
    """Generate one image per manifest row with a plain diffusers loop; write ``NNNNNNNNN.png``.

    Args:
        manifest: parquet with a ``prompt`` column and a ``seed`` column (integers); rows are
            generated in order.
        model_dir: a diffusers pipeline directory (the one gen loads for the same --model).
        out_dir: where the PNGs go (created).
        num_inference_steps: scheduler steps, >= 1.
        guidance_scale: CFG scale.
        height, width: pixels, or None for the pipeline's default.
        threads: torch CPU threads, >= 1.
        dtype: weights dtype, "float32", "float16" or "bfloat16".
        device: "cpu" or "cuda".
    Returns:
        The run's figures.
    Raises:
        KeyError: the manifest has no ``prompt`` or ``seed`` column.
    """
    import pyarrow.parquet as pq
    import torch
    from diffusers import DiffusionPipeline

    torch.set_num_threads(threads)
    rows = pq.read_table(manifest, columns=["prompt", "seed"]).to_pylist()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    pipe = DiffusionPipeline.from_pretrained(model_dir, torch_dtype=getattr(torch, dtype))
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - start

    start = time.perf_counter()
    for i, row in enumerate(rows):
        image = pipe(
            row["prompt"],
            generator=torch.Generator("cpu").manual_seed(row["seed"]),
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            height=height,
            width=width,
        ).images[0]
        image.save(out / f"{i:09d}.png")
    generate_s = time.perf_counter() - start
    return PlainLoopResult(
        images=len(rows),
        load_s=load_s,
        generate_s=generate_s,
        images_per_s=len(rows) / generate_s if generate_s > 0 else 0.0,
        threads=torch.get_num_threads(),
        peak_rss_bytes=peak_rss_bytes(),
        peak_device_bytes=torch.cuda.max_memory_allocated() if device == "cuda" else 0,
    )


def main(argv: list[str] | None = None) -> None:
    """``python -m jobs.bench.plain_loop MANIFEST MODEL_DIR OUT_DIR RESULT_JSON [options]``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("manifest")
    ap.add_argument("model_dir")
    ap.add_argument("out_dir")
    ap.add_argument("result_json")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance-scale", type=float, default=7.5)
    ap.add_argument("--height", type=int)
    ap.add_argument("--width", type=int)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = ap.parse_args(argv)
    result = run_plain_loop(args.manifest, args.model_dir, args.out_dir,
                            num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                            height=args.height, width=args.width, threads=args.threads,
                            dtype=args.dtype, device=args.device)  # fmt: skip
    Path(args.result_json).write_text(json.dumps(asdict(result), indent=2) + "\n")


if __name__ == "__main__":
    main()
