"""Benchmark: wall time of the `gen` commands that do not generate, and what they import.

Times, as whole processes, `gen --help`, `gen status` on a finished 16-row job and on a finished
2,000-shard job, `gen batch --dry-run` (local and --slurm) on a 2,000,000-row manifest, and
`gen batch` refusing a bad manifest (not parquet; no `prompt` column). Each command runs
``--repeats`` times, interleaved over the source trees given (A B A B ...), so that a tree
before a change and after it are measured side by side in one run; the floor is the same
interpreter running ``pass`` and importing only click and pyarrow.parquet (what a light command
cannot avoid). One extra run per command under ``python -X importtime`` says whether torch,
diffusers or transformers were imported.

The fixtures are real: the two finished jobs are generated here with the installed `gen`
(tiny-sd; the 2,000-shard job is 2,000 one-row shards at 1 step, about 90 s on 2 cores), the
manifests are written with pyarrow. The source trees only need to be importable (``jobs`` at
their root); each command runs as ``python -c "from jobs.cli import main; main()"`` with the
tree first on PYTHONPATH, in a neutral working directory.

    git worktree add /tmp/before <commit>
    python -m tests.benchmarks.bench_light_commands --tree before=/tmp/before --tree after=.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

HEAVY = ("torch", "diffusers", "transformers")
TARGETS_S = {"status-16": 1.0, "status-2000": 1.0, "dry-run-2M": 2.0, "dry-run-2M-slurm": 2.0,
             "bad-manifest": 1.0, "no-prompt-column": 1.0}  # fmt: skip
_MAIN = "import sys; sys.argv[0] = 'gen'; from jobs.cli import main; main()"


def _write_prompts(path: Path, rows: int, row_group: int) -> None:
    schema = pa.schema([("prompt", pa.string())])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, row_group):
            stop = min(rows, start + row_group)
            writer.write_table(pa.table({"prompt": [f"a photo of thing {i}" for i in range(start, stop)]},
                                        schema=schema), row_group_size=row_group)  # fmt: skip


def _finished_job(work: Path, name: str, rows: int, args: list[str]) -> Path:
    manifest, out = work / f"{name}.parquet", work / f"{name}-gen"
    if not (out / "summary.json").exists():
        _write_prompts(manifest, rows, rows)
        subprocess.run(["gen", "batch", str(manifest), "--out", str(out), "--overwrite", *args],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples_ok"] == rows, summary
    return out


def fixtures(work: Path) -> dict[str, list[str]]:
    """Build (once per work dir) the jobs and manifests; the gen arguments of each command."""
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    fin16 = _finished_job(work, "p16", 16, ["--steps", "2"])
    fin2000 = _finished_job(work, "p2000", 2000, ["--steps", "1", "--shard-size", "1", "--batch-size", "1",
                                                  "--height", "32", "--width", "32", "--guidance-scale", "1"])  # fmt: skip
    big = work / "big.parquet"
    if not big.exists():
        _write_prompts(big, 2_000_000, 100_000)
    bad = work / "bad.parquet"
    bad.write_text("prompt\na photo of a cat\n")
    no_prompt = work / "no-prompt.parquet"
    pq.write_table(pa.table({"caption": ["a photo of a cat"]}), no_prompt)
    print(f"fixtures in {work} ready in {time.perf_counter() - start:.1f} s", flush=True)
    return {
        "help": ["--help"],
        "status-16": ["status", str(fin16)],
        "status-2000": ["status", str(fin2000)],
        "dry-run-2M": ["batch", str(big), "--dry-run", "--gpus", "2"],
        "dry-run-2M-slurm": ["batch", str(big), "--dry-run", "--slurm", "--gpus", "8", "--shard-size", "200",
                             "--shards-per-task", "4"],  # fmt: skip
        "bad-manifest": ["batch", str(bad)],
        "no-prompt-column": ["batch", str(no_prompt)],
    }


def _env(tree: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}


def timed(cmd: list[str], env: dict[str, str], cwd: Path) -> tuple[float, int, str]:
    """Wall seconds, exit status and output (the last lines) of one process."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return time.perf_counter() - start, proc.returncode, proc.stdout


def heavy_imports(args: list[str], tree: Path, cwd: Path) -> list[str]:
    """Which of torch / diffusers / transformers the command imports (``-X importtime``)."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", _MAIN, *args], env=_env(tree), cwd=cwd,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    names = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    return [name for name in HEAVY if name in names]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", action="append", default=[], metavar="NAME=DIR",
                    help="a source tree to measure (repeatable; default: this checkout as 'this')")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "gen-bench-light")
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args()
    trees = dict(t.split("=", 1) for t in args.tree) or {"this": "."}
    trees = {name: Path(d).resolve() for name, d in trees.items()}
    commands = fixtures(args.work_dir)
    cwd = args.work_dir
    floors = {"python -c pass": [sys.executable, "-c", "pass"],
              "import click, pyarrow.parquet": [sys.executable, "-c", "import click, pyarrow.parquet"]}
    walls: dict[tuple[str, str], list[float]] = {}
    codes: dict[tuple[str, str], set[int]] = {}
    tail: dict[tuple[str, str], str] = {}
    for _ in range(args.repeats):
        for floor, cmd in floors.items():
            walls.setdefault(("floor", floor), []).append(timed(cmd, dict(os.environ), cwd)[0])
        for name, gen_args in commands.items():
            for tree_name, tree in trees.items():
                wall, code, output = timed([sys.executable, "-c", _MAIN, *gen_args], _env(tree), cwd)
                walls.setdefault((tree_name, name), []).append(wall)
                codes.setdefault((tree_name, name), set()).add(code)
                tail[(tree_name, name)] = output.strip().splitlines()[-1] if output.strip() else ""
    report: dict[str, object] = {"repeats": args.repeats, "python": sys.version.split()[0],
                                 "cores": os.cpu_count(), "trees": {k: str(v) for k, v in trees.items()},
                                 "floor_s": {}, "commands": {}}  # fmt: skip
    print(f"median [min-max] wall seconds of {args.repeats} interleaved runs; {os.cpu_count()} cores")
    for floor in floors:
        w = walls[("floor", floor)]
        report["floor_s"][floor] = statistics.median(w)  # type: ignore[index]
        print(f"  floor: {floor:<32} {statistics.median(w):6.3f} [{min(w):.3f}-{max(w):.3f}]")
    for name, gen_args in commands.items():
        print(f"gen {' '.join(a if '/' not in a else Path(a).name for a in gen_args)}")
        entry: dict[str, object] = {}
        for tree_name, tree in trees.items():
            w = walls[(tree_name, name)]
            imported = heavy_imports(gen_args, tree, cwd)
            target = TARGETS_S.get(name)
            verdict = "" if target is None else f"  target < {target:g} s: {'met' if statistics.median(w) < target else 'MISSED'}"
            print(f"  {tree_name:<8} {statistics.median(w):6.3f} [{min(w):.3f}-{max(w):.3f}] s  exit {sorted(codes[(tree_name, name)])}"
                  f"  imports {', '.join(imported) or 'none of ' + '/'.join(HEAVY)}{verdict}")  # fmt: skip
            print(f"           last line: {tail[(tree_name, name)][:150]}")
            entry[tree_name] = {"median_s": statistics.median(w), "min_s": min(w), "max_s": max(w),
                                "exit": sorted(codes[(tree_name, name)]), "heavy_imports": imported,
                                "target_s": target}  # fmt: skip
        if len(trees) == 2:
            a, b = trees
            ratio = statistics.median(walls[(a, name)]) / statistics.median(walls[(b, name)])
            print(f"  {a} / {b}: {ratio:.2f}x")
            entry[f"{a}/{b}"] = ratio
        report["commands"][name] = entry  # type: ignore[index]
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
