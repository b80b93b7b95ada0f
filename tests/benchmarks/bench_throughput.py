"""Benchmark (issue 18): the auto layout against forced ones, and the writer overlap on / off.

Runs the real `gen batch` CLI, each comparison interleaved (A B A B ...) to cancel drift, 1 thread
per rank, and prints median generate_wall_s and the ratios:

3. --compile against eager, tiny-sd, 16 prompts, --gpus 1: generate_wall_s with and without the
   compile time (summary.json compile_s) it contains.

1. Layout, tiny-sd: 64 prompts on --gpus 2 (auto picks dp 2) against forced --cfg-parallel-size 2;
   1 prompt on --gpus 2 (auto picks cfg 2) against forced dp 2 (--cfg-parallel-size 1).
2. Writer overlap, tiny-sd at --writer-size px, --writer-steps steps, --gpus 1 (1 thread: the writer
   thread has the other core): --overlap-writes against --no-overlap-writes; the PNG encoding
   share is measured alongside (the same images' png_bytes timed in this process, over the
   no-overlap run's generate_wall_s): the overlap can save at most that share.

Not a test: run it by hand.

    python -m tests.benchmarks.bench_throughput [--repeats 3] [--sections layout,writer,compile]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
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


def _png_seconds(out: Path) -> float:
    """Seconds to PNG-encode the run's images again, in this process (1 thread)."""
    import io

    from PIL import Image

    from jobs.output.schema import png_bytes

    images = [Image.open(io.BytesIO(c["bytes"])).convert("RGB")
              for c in pq.read_table(out / "samples", columns=["image"]).column("image").to_pylist()]  # fmt: skip
    start = time.perf_counter()
    for image in images:
        png_bytes(image)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--sections", default="layout,writer,compile")
    ap.add_argument("--writer-size", type=int, default=256)
    ap.add_argument("--writer-steps", type=int, default=2)
    ap.add_argument("--writer-prompts", type=int, default=32)
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
        _writer(work, cli, base, report)
    if "compile" in sections:
        _compile(work, base, report)
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



def _writer(work: Path, cli: argparse.Namespace, base: dict, report: dict) -> None:
    write_args = argparse.Namespace(**{**base, "steps": cli.writer_steps}, size=cli.writer_size)
    manifest = _manifest(work, cli.writer_prompts)
    writes = _compare("writer", manifest, write_args,
                      {"overlap": ["--gpus", "1"], "no overlap": ["--gpus", "1", "--no-overlap-writes"]}, work)  # fmt: skip
    png_s = _png_seconds(work / "writer-1")
    ratio = writes["overlap"]["generate_wall_s"] / writes["no overlap"]["generate_wall_s"]
    share = png_s / writes["no overlap"]["generate_wall_s"]
    report["writer"] = {**writes, "overlap_over_no_overlap": ratio, "png_encode_s": png_s, "png_share": share}
    print(f"writer overlap: generate_wall_s {ratio:.3f} of without; PNG encoding {png_s:.2f} s = "
          f"{100 * share:.1f}% of the no-overlap run")  # fmt: skip


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
