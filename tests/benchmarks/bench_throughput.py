"""Benchmark (issue 18): the auto layout against forced ones, the writer overlap on / off,
--compile, and CFG parallel against its bound.

Runs the real `gen batch` CLI, each comparison interleaved (A B A B ...) to cancel drift, 1 thread
per rank, and prints median generate_wall_s and the ratios:

1. Layout ("layout"), tiny-sd: 64 prompts on --gpus 2 (auto picks dp 2) against forced
   --cfg-parallel-size 2; 1 prompt on --gpus 2 (auto picks cfg 2) against forced dp 2.
2. Writer overlap, --gpus 1 (1 thread: the writer thread has the other core): --overlap-writes
   against --no-overlap-writes, on tiny-sd PNGs at --writer-size px ("writer") and on tiny-wan22
   mp4s of --video-frames frames at --video-size px ("writer-video"), --writer-steps steps; the
   write share is measured alongside (summary.json write_s of the no-overlap run over its
   generate_wall_s): the overlap can save at most that share.
3. --compile against eager ("compile"), tiny-sd, 16 prompts, --gpus 1: generate_wall_s with and
   without the compile time (summary.json compile_s) it contains.
4. CFG parallel at its bound ("cfg-bound"), small-sd at --bound-size px: --cfg-parallel-size 2
   at batch B against dp 2 at batch B / 2 (the same forward size per rank, no exchange), and
   the ranks' seconds inside the group's collectives.

Not a test: run it by hand.

    python -m tests.benchmarks.bench_throughput [--repeats 3] [--sections layout,writer,...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tests.benchmarks.cli_runs import gen

RESULTS = Path(__file__).parent / "results" / "bench-throughput.json"


def _manifest(work: Path, n: int) -> Path:
    path = work / f"p{n}.parquet"
    pq.write_table(pa.table({"prompt": [f"a photo of thing {i}" for i in range(n)]}), path)
    return path


def _compare(name: str, manifest: Path, args: argparse.Namespace, runs: dict[str, list[str]],
             work: Path) -> dict[str, dict]:  # fmt: skip
    walls: dict[str, list[float]] = {r: [] for r in runs}
    layouts: dict[str, str] = {}
    for _ in range(args.repeats):
        for i, (run, extra) in enumerate(runs.items()):
            out = work / f"{name}-{i}"
            summary = gen(manifest, out, args, extra)
            walls[run].append(summary["generate_wall_s"])
            layout = json.loads((out / "job.json").read_text())["layout"]
            layouts[run] = f"dp {layout['dp']} x cfg {layout['cfg']} ({layout['chosen']})"
    result = {r: {"generate_wall_s": statistics.median(w), "runs": w, "layout": layouts[r]} for r, w in walls.items()}
    print(f"{name}: {args.model}, {manifest.stem[1:]} prompt(s), {args.size}px, {args.steps} steps, "
          f"batch {args.batch}, median of {args.repeats}")  # fmt: skip
    for run, r in result.items():
        print(f"  {run:28s} generate_wall_s {r['generate_wall_s']:7.3f}  {r['layout']}")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--sections", default="layout,writer,writer-video,compile,cfg-bound")
    ap.add_argument("--bound-size", type=int, default=256)
    ap.add_argument("--bound-batch", type=int, default=4)
    ap.add_argument("--bound-steps", type=int, default=10)
    ap.add_argument("--bound-prompts", type=int, default=8)
    ap.add_argument("--writer-size", type=int, default=256)
    ap.add_argument("--writer-steps", type=int, default=2)
    ap.add_argument("--writer-prompts", type=int, default=32)
    ap.add_argument("--writer-model", default="tiny-sd")
    ap.add_argument("--video-size", type=int, default=256)
    ap.add_argument("--video-frames", type=int, default=81)
    ap.add_argument("--video-prompts", type=int, default=4)
    cli = ap.parse_args()
    sections = cli.sections.split(",")
    work = Path(tempfile.mkdtemp(prefix="bench-throughput-"))
    base = dict(model="tiny-sd", batch=4, steps=cli.steps, repeats=cli.repeats)
    report: dict[str, object] = {}

    if RESULTS.exists():
        report.update(json.loads(RESULTS.read_text()))
    layout_args = argparse.Namespace(**base, size=64)
    if "layout" in sections:
        _layouts(work, layout_args, report)
    if "writer" in sections:
        png = argparse.Namespace(**{**base, "steps": cli.writer_steps, "model": cli.writer_model}, size=cli.writer_size)
        _writer(work, "writer", png, cli.writer_prompts, [], report)
    if "writer-video" in sections:
        video = argparse.Namespace(**{**base, "model": "tiny-wan22", "batch": 1, "steps": cli.writer_steps},
                                   size=cli.video_size)  # fmt: skip
        _writer(work, "writer-video", video, cli.video_prompts, ["--num-frames", str(cli.video_frames)], report)
    if "compile" in sections:
        _compile(work, base, report)
    if "cfg-bound" in sections:
        _cfg_bound(work, cli, report)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=1))
    print(f"wrote {RESULTS}")


def _layouts(work: Path, layout_args: argparse.Namespace, report: dict) -> None:
    many = _compare("layout-64", _manifest(work, 64), layout_args,
                    {"auto": ["--gpus", "2"], "forced cfg 2": ["--gpus", "2", "--cfg-parallel-size", "2"]}, work)  # fmt: skip
    one = _compare("layout-1", _manifest(work, 1), layout_args,
                   {"auto": ["--gpus", "2"], "forced dp 2": ["--gpus", "2", "--cfg-parallel-size", "1"]}, work)  # fmt: skip
    report["layout_64"] = {**many, "speedup_auto_over_cfg2": many["forced cfg 2"]["generate_wall_s"] / many["auto"]["generate_wall_s"]}
    report["layout_1"] = {**one, "speedup_auto_over_dp2": one["forced dp 2"]["generate_wall_s"] / one["auto"]["generate_wall_s"]}
    print(f"64 prompts: auto {report['layout_64']['speedup_auto_over_cfg2']:.2f}x over forced cfg 2; "
          f"1 prompt: auto {report['layout_1']['speedup_auto_over_dp2']:.2f}x over forced dp 2")  # fmt: skip



def _writer(work: Path, name: str, args: argparse.Namespace, prompts: int, extra: list[str], report: dict) -> None:
    """Overlap on / off on 1 rank; the encoding share from the runs' own write_s (summary.json,
    rank 0: seconds inside media encoding and part writes) over generate_wall_s."""
    walls = {"overlap": [], "no overlap": []}
    writes: dict[str, list[tuple[float, float]]] = {"overlap": [], "no overlap": []}
    manifest = _manifest(work, prompts)
    runs = {"overlap": ["--gpus", "1", *extra], "no overlap": ["--gpus", "1", "--no-overlap-writes", *extra]}
    for _ in range(args.repeats):
        for i, (run, opts) in enumerate(runs.items()):
            summary = gen(manifest, work / f"{name}-{i}", args, opts)
            walls[run].append(summary["generate_wall_s"])
            rank = summary["ranks"][0]
            writes[run].append((rank["write_s"], rank["write_wait_s"]))
    med = {run: statistics.median(w) for run, w in walls.items()}
    write_s = statistics.median(w for w, _ in writes["no overlap"])
    waited = statistics.median(w for _, w in writes["overlap"])
    ratio, share = med["overlap"] / med["no overlap"], write_s / med["no overlap"]
    report[name] = {"generate_wall_s": med, "runs": walls, "write_s_and_wait_s": writes,
                    "overlap_over_no_overlap": ratio, "write_share": share}  # fmt: skip
    print(f"{name}: {args.model} {' '.join(extra)}, {prompts} prompts, {args.size}px, {args.steps} steps, "
          f"batch {args.batch}, 1 rank, median of {args.repeats}")  # fmt: skip
    print(f"  overlap {med['overlap']:.2f} s vs no overlap {med['no overlap']:.2f} s: {ratio:.3f}; "
          f"writes {write_s:.2f} s = {100 * share:.1f}% of the no-overlap run; with overlap the rank "
          f"waited {waited:.2f} s of them")  # fmt: skip


def _cfg_bound(work: Path, cli: argparse.Namespace, report: dict) -> None:
    """CFG parallel at batch B against its bound, dp 2 at batch B / 2 (every rank forwards B
    samples a step either way, with no exchange in dp); the gap itemized by the ranks' own
    cfg_exchange_s (seconds inside the group's collectives, waiting for the other rank included)."""
    b = cli.bound_batch
    args = argparse.Namespace(model="small-sd", batch=b, steps=cli.bound_steps, repeats=cli.repeats,
                              size=cli.bound_size)  # fmt: skip
    manifest = _manifest(work, cli.bound_prompts)
    runs = {f"cfg 2, batch {b}": ["--gpus", "2", "--cfg-parallel-size", "2"],
            f"bound: dp 2, batch {b // 2}": ["--gpus", "2", "--cfg-parallel-size", "1", "--batch-size", str(b // 2)]}  # fmt: skip
    walls: dict[str, list[float]] = {r: [] for r in runs}
    exchange: list[list[float]] = []
    counts: list[int] = []
    for _ in range(cli.repeats):
        for i, (run, extra) in enumerate(runs.items()):
            summary = gen(manifest, work / f"bound-{i}", args, extra)
            walls[run].append(summary["generate_wall_s"])
            if i == 0:
                exchange.append([r["cfg_exchange_s"] for r in summary["ranks"]])
                counts.append(summary["ranks"][0]["cfg_exchanges"])
    med = {r: statistics.median(w) for r, w in walls.items()}
    cfg, bound = med[f"cfg 2, batch {b}"], med[f"bound: dp 2, batch {b // 2}"]
    per_rank = [statistics.median(e[k] for e in exchange) for k in range(2)]
    steps = cli.bound_steps * -(-cli.bound_prompts // b)
    report["cfg_bound"] = {"generate_wall_s": med, "runs": walls, "of_bound": bound / cfg,
                           "cfg_exchange_s_per_rank": per_rank, "cfg_exchanges": counts[-1],
                           "gap_s": cfg - bound, "gap_per_step_ms": 1000 * (cfg - bound) / steps}  # fmt: skip
    print(f"cfg bound: small-sd, {cli.bound_prompts} prompts, {cli.bound_size}px, {cli.bound_steps} steps, "
          f"median of {cli.repeats}")  # fmt: skip
    for run, w in med.items():
        print(f"  {run:24s} generate_wall_s {w:7.3f}")
    print(f"  cfg parallel at {100 * bound / cfg:.1f}% of the bound; gap {cfg - bound:.2f} s = "
          f"{1000 * (cfg - bound) / steps:.1f} ms per step over {steps} steps; in the group's "
          f"{counts[-1]} collectives: rank 0 {per_rank[0]:.2f} s, rank 1 {per_rank[1]:.2f} s")  # fmt: skip


def _compile(work: Path, base: dict, report: dict) -> None:
    args = argparse.Namespace(**base, size=64)
    runs = _compare("compile", _manifest(work, 16), args,
                    {"eager": ["--gpus", "1"], "--compile": ["--gpus", "1", "--compile"]}, work)  # fmt: skip
    summary = json.loads((work / "compile-1" / "summary.json").read_text())
    compiled, eager = runs["--compile"]["generate_wall_s"], runs["eager"]["generate_wall_s"]
    report["compile"] = {**runs, "compile_s": summary["compile_s"], "ratio_with_compile": compiled / eager,
                         "ratio_without_compile_time": (compiled - summary["compile_s"]) / eager}  # fmt: skip
    print(f"--compile: generate_wall_s {compiled / eager:.2f}x of eager with its {summary['compile_s']:.1f} s "
          f"of compilation, {(compiled - summary['compile_s']) / eager:.2f}x without it")  # fmt: skip


if __name__ == "__main__":
    main()
