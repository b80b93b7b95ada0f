"""Per-call overhead of the denoiser intercept: the time gen adds around each denoiser call.

Measured directly, per call: the time inside the project's wrapped ``forward`` (splitting the
call into branches, gating, the branch executor, the CFG group's exchange and gather, the step
record) minus the time inside the module's original ``forward``. Two timers do it:

- outer: a forward pre-hook and a forward hook on the denoiser module, which sit just outside
  whatever ``forward`` the module holds (the intercept's wrapper while a pipeline call runs);
- inner: the module's own ``forward``, wrapped with a timer before the intercept wraps it.

For context it also times the stock pipeline call (``output_type="latent"``) against the same
call under the intercept, interleaved (an A/B whose difference per step is noisier than the
direct figure). Run by `gen bench`, or by hand:

    python -m jobs.bench.overhead RESULT_JSON --model tiny-sd --steps 20 --batch-size 4
    python -m torch.distributed.run --standalone --nproc-per-node=2 -m jobs.bench.overhead \\
        RESULT_DIR --ranks 2 ...       # CFG parallel: one RESULT_DIR/rank-N.json per rank
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from parallel.dims import ParallelDims
from parallel.group import cfg_group, close_ranks, init_ranks
from parallel.platform import detect_platform, parse_dtype
from pipeline.generate import SampleRequest, StageRunner
from pipeline.loading import load_pipeline, resolve_model


class CallTimer:
    """Outer (wrapped forward) and inner (original forwards) seconds of every denoiser call.

    A call through the intercept may run the original forward once (CFG branches batched),
    once per branch (``--no-cfg-batching``), or not at all (a CFG rank without a branch);
    ``inner_s`` holds, per call, the sum of the original forwards it ran.

    Args:
        module: the denoiser module (``pipe.unet``); install before the intercept wraps it.
    """

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self.outer_s: list[float] = []
        self.inner_s: list[float] = []
        self.forwards = 0
        """Original forwards run."""
        self._t0 = 0.0
        self._inner = 0.0
        self._handles: list[Any] = []

    def install(self) -> None:
        """Wrap the module's forward (inner timer) and hook its __call__ (outer timer)."""
        original = self.module.forward

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            out = original(*args, **kwargs)
            self._inner += time.perf_counter() - start
            self.forwards += 1
            return out

        self.module.forward = timed
        self._handles = [
            self.module.register_forward_pre_hook(self._pre),
            self.module.register_forward_hook(self._post),
        ]

    def remove(self) -> None:
        """Undo ``install``."""
        for handle in self._handles:
            handle.remove()
        self.module.__dict__.pop("forward", None)

    def reset(self) -> None:
        self.outer_s.clear()
        self.inner_s.clear()
        self.forwards = 0

    def _pre(self, module: torch.nn.Module, args: Any) -> None:
        self._inner = 0.0
        self._t0 = time.perf_counter()

    def _post(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        self.outer_s.append(time.perf_counter() - self._t0)
        self.inner_s.append(self._inner)

    def overhead_us(self) -> list[float]:
        """Per call: (outer - inner) in microseconds."""
        return [(o - i) * 1e6 for o, i in zip(self.outer_s, self.inner_s)]


@contextmanager
def timed_module(module: torch.nn.Module) -> Iterator[CallTimer]:
    """A CallTimer installed on ``module`` for the span of the block."""
    timer = CallTimer(module)
    timer.install()
    try:
        yield timer
    finally:
        timer.remove()


def _requests(family: Any, batch_size: int, steps: int, size: int) -> list[SampleRequest]:
    """Guided requests: the family's own guidance_scale and true_cfg_scale, CFG on (true CFG 4
    where the family has it and would otherwise run one branch)."""
    gs = family.call_defaults.get("guidance_scale", 7.5)
    tcs = family.call_defaults.get("true_cfg_scale")
    if tcs is not None and not family.guided(gs, tcs):
        tcs = 4.0
    return [SampleRequest(sample_id=f"s{i}", prompt=f"a photo of thing {i}", negative_prompt="",
                          seed=i, height=size, width=size, num_inference_steps=steps,
                          guidance_scale=gs, true_cfg_scale=tcs) for i in range(batch_size)]  # fmt: skip


def _summary(values: list[float]) -> dict[str, float]:
    vals = sorted(values)
    return {"median": statistics.median(vals), "mean": statistics.fmean(vals),
            "p10": vals[len(vals) // 10], "p90": vals[(9 * len(vals)) // 10], "n": len(vals)}  # fmt: skip


def measure(pipe: Any, *, batch_size: int, steps: int, size: int | None, repeats: int,
            cfg_batching: bool = True, group: Any = None, ab: bool = True) -> dict[str, Any]:  # fmt: skip
    """Per-call overhead of gen's intercept on ``pipe`` (any family: its first denoiser module).

    Args:
        pipe: a loaded diffusers pipeline.
        batch_size: B, images per pipeline call.
        steps: denoising steps per call.
        size: height = width in pixels; None = the model's native size.
        repeats: measured pipeline calls (after one warm-up call).
        cfg_batching: serial executor: cond and uncond in one forward (True) or two.
        group: the CFG group (parallel.cfg_group.CfgGroup) for CFG-parallel runs; None = serial.
        ab: also time the stock pipeline call against the intercepted one (serial, batched
            branches only: the stock pipeline runs them as one forward).
    Returns:
        {"overhead_us": summary of (outer - inner) per call, "inner_us", "outer_us": summaries
        of the per-call times (inner: the original forwards of the call together), "calls",
        "forwards" (original forwards run), "size" (pixels), and with ``ab`` "ab": stock vs intercepted denoise
        seconds per call and their difference per step in microseconds}. Summaries hold
        median, mean, p10, p90, n.
    """
    runner = StageRunner(pipe, cfg_batching=cfg_batching, guidance_rescale=0.0, group=group)
    requests = _requests(runner.family, batch_size, steps, size or runner.family.default_size)
    result: dict[str, Any] = {"size": requests[0].height}
    with timed_module(getattr(pipe, runner.family.denoiser_names[0])) as timer:
        runner.run(requests, decode=[False] * batch_size)  # warm-up
        timer.reset()
        for _ in range(repeats):
            runner.run(requests, decode=[False] * batch_size)
        over = timer.overhead_us()
        result.update(overhead_us=_summary(over), inner_us=_summary([t * 1e6 for t in timer.inner_s]),
                      outer_us=_summary([t * 1e6 for t in timer.outer_s]), calls=len(over),
                      forwards=timer.forwards)  # fmt: skip
    if ab and group is None and cfg_batching:  # the stock pipeline batches its branches
        result["ab"] = _stock_vs_intercepted(runner, requests, repeats)
    return result


@torch.inference_mode()
def _stock_vs_intercepted(runner: StageRunner, requests: list[SampleRequest], repeats: int) -> dict[str, Any]:
    """Denoise seconds of the stock pipeline call and of the same call intercepted, interleaved."""
    family, first = runner.family, requests[0]
    guided = family.guided(first.guidance_scale, first.true_cfg_scale)
    cond = family.encode([r.prompt for r in requests], [""] * len(requests), guidance=guided)
    extra = {} if first.true_cfg_scale is None else {"true_cfg_scale": first.true_cfg_scale}

    def denoise() -> None:
        family.denoise(cond, [torch.Generator("cpu").manual_seed(r.seed) for r in requests],
                       height=first.height, width=first.width,
                       num_inference_steps=first.num_inference_steps,
                       guidance_scale=first.guidance_scale, guidance_rescale=0.0, **extra)  # fmt: skip

    stock, hooked = [], []
    for _ in range(repeats + 1):  # the first pair warms up
        start = time.perf_counter()
        denoise()
        stock.append(time.perf_counter() - start)
        start = time.perf_counter()
        with runner.hook.intercept(batch=len(requests), guidance=guided, branch_inputs=family.branch_inputs(cond)):
            denoise()
        hooked.append(time.perf_counter() - start)
    stock, hooked = stock[1:], hooked[1:]
    steps = first.num_inference_steps
    return {
        "stock_s": statistics.median(stock),
        "intercepted_s": statistics.median(hooked),
        "difference_us_per_step": (statistics.median(hooked) - statistics.median(stock)) / steps * 1e6,
        "repeats": repeats,
    }


def main(argv: list[str] | None = None) -> None:
    """``python -m jobs.bench.overhead RESULT [--model M --steps S --batch-size B --size PX
    --repeats R --threads T --no-cfg-batching --ranks K]``: with --ranks K > 1 (under torchrun)
    RESULT is a directory and each rank writes rank-N.json there."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("result")
    ap.add_argument("--model", default="tiny-sd")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--size", type=int, help="height = width, pixels [default: the model's]")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--no-cfg-batching", action="store_true")
    ap.add_argument("--ranks", type=int, default=1)
    args = ap.parse_args(argv)

    platform = detect_platform()
    rank = int(os.environ.get("RANK", 0))
    device = platform.bind(int(os.environ.get("LOCAL_RANK", 0)))
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(resolve_model(args.model), dtype=parse_dtype(args.dtype, platform), device=device)
    group = None
    if args.ranks > 1:
        init_ranks(rank=rank, world_size=args.ranks, platform=platform, timeout_s=120)
        dims = ParallelDims(dp=1, cfg=args.ranks, world_size=args.ranks)
        group = cfg_group(dims, rank, device=device, timeout_s=120)
    found = measure(pipe, batch_size=args.batch_size, steps=args.steps, size=args.size,
                    repeats=args.repeats, cfg_batching=not args.no_cfg_batching, group=group)  # fmt: skip
    found.update(model=args.model, batch_size=args.batch_size, steps=args.steps,
                 threads=torch.get_num_threads(), cfg_batching=not args.no_cfg_batching,
                 ranks=args.ranks, rank=rank, device=str(device))  # fmt: skip
    path = Path(args.result) / f"rank-{rank}.json" if args.ranks > 1 else Path(args.result)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(found, indent=2) + "\n")
    if args.ranks > 1:
        close_ranks()


if __name__ == "__main__":
    main()
