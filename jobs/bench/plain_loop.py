"""The baseline `gen bench` measures gen against: a plain diffusers loop, as a user writes it.

One process, one pipeline, one prompt per call, a PNG per image (as GenEval's generation
script does)::

    pipe = DiffusionPipeline.from_pretrained(model_dir)
    for prompt, seed in rows:
        pipe(prompt, generator=torch.Generator("cpu").manual_seed(seed), ...).images[0].save(...)

Run it in its own process so that its threads and peak memory are its own:

    python -m jobs.bench.plain_loop MANIFEST MODEL_DIR OUT_DIR RESULT_JSON --steps 20 --height 128 \\
        --width 128 --guidance-scale 7.5 --threads 1

Under torchrun it is the loop a user scripts for several ranks: the rows split with accelerate's
``PartialState().split_between_processes`` (contiguous, the first ranks take one more), each
rank calling ``pipe`` on ``--batch-size`` of its prompts at a time (one generator per prompt)::

    torchrun --standalone --nproc-per-node 2 -m jobs.bench.plain_loop ... --batch-size 4

Model load and the generation loop are timed separately, so images/s compares like with like
against `gen batch`'s generate_wall_s (which excludes model load).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

from jobs.memory import peak_rss_bytes


@dataclass(frozen=True, kw_only=True)
class PlainLoopResult:
    """What one plain-loop run measured."""

    images: int
    """PNG files written (by every process)."""
    processes: int
    """Processes the rows were split over (torchrun's world size; 1 without torchrun)."""
    batch_size: int
    """Prompts per pipeline call."""
    load_s: float
    """Seconds of ``DiffusionPipeline.from_pretrained`` (import of diffusers excluded)."""
    generate_s: float
    """Seconds of the generation loop: every pipeline call and PNG save; with several
    processes, from the first process's loop start to the last one's end (wall clock, each
    process starting once its own model is loaded): the window of gen's generate_wall_s
    (first denoising step of any rank to last decode of any rank), so that load skew between
    processes counts alike on both sides."""
    images_per_s: float
    """images / generate_s."""
    threads: int
    """torch.get_num_threads() during the loop."""
    peak_rss_bytes: int
    """Peak resident memory of process 0 (VmHWM, jobs.memory), bytes."""
    peak_device_bytes: int
    """Peak CUDA memory allocated by torch in process 0, bytes; 0 on the CPU."""
    peak_rss_bytes_per_rank: list[int]
    """Peak resident memory of every process, in rank order, bytes."""


def run_plain_loop(manifest: str, model_dir: str, out_dir: str, *, num_inference_steps: int,
                   guidance_scale: float, height: int | None, width: int | None,
                   threads: int, dtype: str = "float32", device: str = "cpu",
                   batch_size: int = 1) -> PlainLoopResult | None:  # fmt: skip
    """Generate one image per manifest row with a plain diffusers loop; write ``NNNNNNNNN.png``
    (N = the row's index in the manifest). Under torchrun (WORLD_SIZE > 1) each process takes
    its accelerate split of the rows.

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
        device: "cpu" or "cuda" (under torchrun: cuda:LOCAL_RANK, as accelerate places it).
        batch_size: prompts per ``pipe`` call, >= 1.
    Returns:
        The run's figures (in process 0; None in the others).
    Raises:
        KeyError: the manifest has no ``prompt`` or ``seed`` column.
    """
    import pyarrow.parquet as pq
    import torch
    from diffusers import DiffusionPipeline

    torch.set_num_threads(threads)
    rows = list(enumerate(pq.read_table(manifest, columns=["prompt", "seed"]).to_pylist()))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        state = PartialState(cpu=device == "cpu")
        if device == "cuda":
            device = str(state.device)

    start = time.perf_counter()
    pipe = DiffusionPipeline.from_pretrained(model_dir, torch_dtype=getattr(torch, dtype))
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - start

    start = time.time()
    with state.split_between_processes(rows) if state else nullcontext(rows) as mine:
        for at in range(0, len(mine), batch_size):
            chunk = mine[at : at + batch_size]
            images = pipe(
                [row["prompt"] for _, row in chunk],
                generator=[torch.Generator("cpu").manual_seed(row["seed"]) for _, row in chunk],
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                height=height,
                width=width,
            ).images
            for (i, _), image in zip(chunk, images):
                image.save(out / f"{i:09d}.png")
    end = time.time()
    peaks = [peak_rss_bytes()]
    generate_s = end - start
    if state is not None:
        import torch.distributed as dist

        gathered: list[tuple[int, float, float] | None] = [None] * state.num_processes
        dist.all_gather_object(gathered, (peaks[0], start, end))
        peaks = [int(p) for p, _, _ in gathered]  # type: ignore[misc]
        generate_s = max(e for _, _, e in gathered) - min(s for _, s, _ in gathered)  # type: ignore[misc]
    if state is not None and not state.is_main_process:
        return None
    return PlainLoopResult(
        images=len(rows),
        processes=state.num_processes if state else 1,
        batch_size=batch_size,
        load_s=load_s,
        generate_s=generate_s,
        images_per_s=len(rows) / generate_s if generate_s > 0 else 0.0,
        threads=torch.get_num_threads(),
        peak_rss_bytes=peaks[0],
        peak_device_bytes=torch.cuda.max_memory_allocated() if device.startswith("cuda") else 0,
        peak_rss_bytes_per_rank=peaks,
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
    ap.add_argument("--batch-size", type=int, default=1)
    args = ap.parse_args(argv)
    if args.batch_size < 1:
        ap.error(f"--batch-size {args.batch_size} is invalid: must be >= 1")
    result = run_plain_loop(args.manifest, args.model_dir, args.out_dir,
                            num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                            height=args.height, width=args.width, threads=args.threads,
                            dtype=args.dtype, device=args.device, batch_size=args.batch_size)  # fmt: skip
    if result is not None:
        Path(args.result_json).write_text(json.dumps(asdict(result), indent=2) + "\n")


if __name__ == "__main__":
    main()
