"""The commands that do not generate run without torch, diffusers or transformers.

Each command runs twice: as the installed `gen`, and as the same CLI in an interpreter where
importing torch, diffusers or transformers raises ImportError (``sys.modules[name] = None``).
Both must give the same exit status and the same output, with no traceback: `gen --help`,
`gen status` (text and --json), `gen batch --dry-run` (local and --slurm) and the job-level
errors (bad manifest, bad option, an --out holding another job). Timings are the benchmark's
business (tests/benchmarks/bench_light_commands.py), not this test's.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO, parti_manifest, run_gen

BLOCKED = ("torch", "diffusers", "transformers")
_BLOCKING_MAIN = (
    "import sys\n"
    f"for name in {BLOCKED!r}:\n"
    "    sys.modules[name] = None  # any import of it raises ImportError\n"
    "sys.argv[0] = 'gen'\n"
    "from jobs.cli import main\n"
    "main()\n"
)


def run_without_torch(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", _BLOCKING_MAIN, *args], capture_output=True, text=True,
                          cwd=REPO, env=dict(os.environ), timeout=120)  # fmt: skip


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A finished 4-row job (tiny-sd, 2 steps, shards of 2 rows): (manifest, OUT)."""
    work = tmp_path_factory.mktemp("light")
    manifest = parti_manifest(work / "parti4.parquet", 4)
    out = work / "out"
    proc = run_gen("batch", str(manifest), "--out", str(out), "--steps", "2", "--batch-size", "2",
                   "--shard-size", "2")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return manifest, out


def _cases(manifest: Path, out: Path, tmp: Path) -> list[tuple[list[str], int, str]]:
    bad = tmp / "bad.parquet"
    bad.write_text("prompt\na cat\n")
    no_prompt = tmp / "caption.parquet"
    pq.write_table(pa.table({"caption": ["a cat"]}), no_prompt)
    not_a_model = tmp / "model"
    not_a_model.mkdir(exist_ok=True)
    return [
        (["--help"], 0, "batch"),
        (["batch", "--help"], 0, "--cfg-parallel-size"),
        (["status", str(out)], 0, "shards: 2 / 2 done"),
        (["status", str(out), "--json"], 0, '"shards_done": 2'),
        (["status", str(tmp / "nothing")], 2, "not a gen output directory"),
        (["batch", str(manifest), "--out", str(out), "--steps", "2", "--batch-size", "2", "--shard-size", "2",
          "--dry-run"], 0, "same job: a real run resumes it"),  # fmt: skip
        (["batch", str(manifest), "--out", str(tmp / "new"), "--dry-run", "--slurm", "--gpus", "8",
          "--shard-size", "1", "--batch-size", "1", "--shards-per-task", "2"], 0, "2 array task(s)"),  # fmt: skip
        (["batch", str(bad)], 2, "not a readable parquet file"),
        (["batch", str(no_prompt)], 2, "no 'prompt' column"),
        (["batch", str(manifest), "--gpus", "3", "--cfg-parallel-size", "2"], 2, "--cfg-parallel-size"),
        (["batch", str(manifest), "--model", str(not_a_model)], 2, "no model_index.json"),
        (["batch", str(manifest), "--partition", "gpu"], 2, "--partition needs --slurm"),
        (["batch", str(manifest), "--out", str(out), "--steps", "3", "--batch-size", "2", "--shard-size", "2"],
         2, "holds a different job"),  # fmt: skip
    ]


def test_light_commands_need_no_torch(finished: tuple[Path, Path], tmp_path: Path) -> None:
    manifest, out = finished
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    for args, code, expected in _cases(manifest, out, tmp_path):
        real = run_gen(*args)
        light = run_without_torch(*args)
        what = "gen " + " ".join(args)
        assert real.returncode == code, (what, real.stderr)
        assert light.returncode == code, (what, light.stderr[-2000:])
        assert "Traceback" not in light.stderr + real.stderr, what
        assert expected in light.stdout + light.stderr, (what, light.stdout, light.stderr)
        assert (light.stdout, light.stderr) == (real.stdout, real.stderr), what
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # nothing written or lost
    assert not (tmp_path / "new").exists()
