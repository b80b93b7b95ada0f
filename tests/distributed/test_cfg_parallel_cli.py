"""CFG-parallel groups through the installed CLI on real torchrun gloo ranks with tiny-sd.

Every run uses OMP_NUM_THREADS=1, so all ranks use the same CPU kernels (see README).
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.conftest import parti_prompts, run_gen

STEPS = 6
ENV = {"OMP_NUM_THREADS": "1"}
STEP_COLUMNS = ["sample_id", "step_index", "timestep", "denoiser", "uncond", "branches"]

RUNS = {
    "g1": ["--gpus", "1"],
    "g2c2": ["--gpus", "2", "--cfg-parallel-size", "2"],
    "g4c2": ["--gpus", "4", "--cfg-parallel-size", "2"],
    "g1sep": ["--gpus", "1", "--no-cfg-batching"],
    "g2c2sep": ["--gpus", "2", "--cfg-parallel-size", "2", "--no-cfg-batching"],
    "g1sep_gate": ["--gpus", "1", "--no-cfg-batching", "--cfg-gate-step", "0.5"],
    "g2c2sep_gate": ["--gpus", "2", "--cfg-parallel-size", "2", "--no-cfg-batching", "--cfg-gate-step", "0.5"],
    "g2c2_gate": ["--gpus", "2", "--cfg-parallel-size", "2", "--cfg-gate-step", "0.5"],
}


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """11 PartiPrompts; row 5 without guidance (one branch), row 7 an error row. Micro-batches
    of 4 rows: [0-3], [4, 6] + [5], [7] (error), [8-10]: sizes 4, 2, 1, 3, so CFG ranks write
    uneven shares and some write nothing for a micro-batch."""
    rows = parti_prompts(11)
    guidance = [None] * 11
    guidance[5], guidance[7] = 1.0, -1.0
    path = tmp_path_factory.mktemp("cfg-manifest") / "m.parquet"
    pq.write_table(
        pa.table({"prompt": [r["Prompt"] for r in rows],
                  "guidance_scale": pa.array(guidance, pa.float64())}),  # fmt: skip
        path,
    )
    return path


@pytest.fixture(scope="module")
def outs(manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    base = tmp_path_factory.mktemp("cfg-runs")
    result = {}
    for name, args in RUNS.items():
        proc = run_gen("batch", str(manifest), "--out", str(base / name), "--steps", str(STEPS),
                       "--seed", "3", *args, env=ENV)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "10 ok, 1 error" in proc.stdout, proc.stdout
        result[name] = (base / name, proc.stdout)
    return result


def _samples(out: Path) -> pa.Table:
    return pq.read_table(out / "samples")


def _same_bytes(a: Path, b: Path, rows: int = 10, steps: int = STEPS) -> None:
    """Samples and step stats identical, but for timings and (between cfg sizes) the layout."""
    sa, sb = _samples(a), _samples(b)
    for col in ("sample_id", "seed", "status", "error", "image", "fresh_uncond", "reused_uncond"):
        assert sa.column(col).to_pylist() == sb.column(col).to_pylist(), col
    ja, jb = (json.loads((x / "job.json").read_text())["layout"]["cfg"] for x in (a, b))
    columns = STEP_COLUMNS if ja == jb else STEP_COLUMNS[:-1]
    steps_a = pq.read_table(a / "steps", columns=columns)
    assert steps_a.num_rows == rows * steps
    assert steps_a.equals(pq.read_table(b / "steps", columns=columns))


@pytest.mark.parametrize(("a", "b"), [("g2c2", "g4c2"), ("g1sep", "g2c2sep"),
                                      ("g2c2", "g2c2sep"), ("g1sep_gate", "g2c2sep_gate")])  # fmt: skip
def test_byte_identical(outs: dict[str, tuple[Path, str]], a: str, b: str) -> None:
    """cfg 2 on 2 or 4 ranks (dp alone against 1 rank: tests/integration/test_batch_cli.py);
    separate forwards serial vs CFG-parallel; and CFG parallel with or without batching (each
    rank holds one branch either way)."""
    _same_bytes(outs[a][0], outs[b][0])


def _max_pixel_diff(a: Path, b: Path) -> list[int]:
    diffs = []
    for x, y in zip(_samples(a).column("image").to_pylist(), _samples(b).column("image").to_pylist()):
        if x is None:
            assert y is None
            continue
        ix = np.asarray(Image.open(io.BytesIO(x["bytes"])), np.int16)
        iy = np.asarray(Image.open(io.BytesIO(y["bytes"])), np.int16)
        diffs.append(int(np.abs(ix - iy).max()))
    return diffs


@pytest.mark.parametrize(("a", "b"), [("g1", "g2c2"), ("g1sep_gate", "g2c2_gate")])
def test_batched_within_one_level(outs: dict[str, tuple[Path, str]], a: str, b: str) -> None:
    """Batched forwards (serial concat, or a gated cond cut by samples over the group) differ
    from one-branch forwards by float rounding only."""
    diffs = _max_pixel_diff(outs[a][0], outs[b][0])
    assert len(diffs) == 10 and max(diffs) <= 1, diffs


def test_gating_counts_in_both_parquets(outs: dict[str, tuple[Path, str]]) -> None:
    """--cfg-gate-step 0.5 at 6 steps: 3 fresh, 3 reused per guided sample; with separate
    forwards the reused steps ran cond whole on cfg rank 0, with batching (the default) cut by
    samples over both ranks."""
    out, stdout = outs["g2c2sep_gate"]
    samples = _samples(out).to_pylist()
    for s in samples:
        guided = s["status"] == "ok" and s["guidance_scale"] > 1
        assert (s["fresh_uncond"], s["reused_uncond"]) == ((3, 3) if guided else (0, 0)), s["sample_id"]
        assert s["gate_step"] == (3 if guided else None)
        assert s["cfg_gate_step"] == 0.5 and s["invalidations"] == 0
    steps = pq.read_table(out / "steps").to_pylist()
    reused = [s for s in steps if s["uncond"] == "reused"]
    assert len(reused) == 9 * 3 and {s["step_index"] for s in reused} == {3, 4, 5}
    assert all(s["branches"] == [{"name": "cond", "cfg_rank": 0}] for s in reused)
    assert "cfg gating: 27 fresh, 27 reused unconditional predictions (50% skipped), 0 invalidations" in stdout
    assert "cfg gating: 54 fresh, 0 reused" in outs["g1"][1]
    batched = [s for s in pq.read_table(outs["g2c2_gate"][0] / "steps").to_pylist()
               if s["uncond"] == "reused"]  # fmt: skip
    assert len(batched) == 27
    assert all(s["branches"] == [{"name": "cond", "cfg_rank": 0}, {"name": "cond", "cfg_rank": 1}]
               for s in batched)  # fmt: skip


def test_layout_printed_and_recorded(outs: dict[str, tuple[Path, str]]) -> None:
    out, stdout = outs["g4c2"]
    assert "layout: 4 rank(s) = dp 2 x cfg 2; CFG groups [0, 1] [2, 3]" in stdout
    assert "layout: 2 rank(s) = dp 1 x cfg 2; CFG groups [0, 1]" in outs["g2c2"][1]
    job = json.loads((out / "job.json").read_text())
    assert {k: job["layout"][k] for k in ("world_size", "dp", "cfg", "cfg_groups")} == {
        "world_size": 4, "dp": 2, "cfg": 2, "cfg_groups": [[0, 1], [2, 3]],
    }  # fmt: skip
    steps = pq.read_table(out / "steps").to_pylist()
    guided = [s for s in steps if s["uncond"] == "fresh"]
    assert guided and all(
        s["branches"] == [{"name": "uncond", "cfg_rank": 0}, {"name": "cond", "cfg_rank": 1}]
        for s in guided
    )
    unguided = [s for s in steps if s["sample_id"].startswith("000000005")]
    assert len(unguided) == STEPS
    assert all(s["uncond"] == "none" and s["branches"] == [{"name": "cond", "cfg_rank": 0}]
               for s in unguided)  # fmt: skip


def test_each_row_written_once_by_its_rank(outs: dict[str, tuple[Path, str]]) -> None:
    out = outs["g4c2"][0]
    summary = json.loads((out / "summary.json").read_text())
    ranks = {r["rank"]: r for r in summary["ranks"]}
    assert {r: (v["dp_rank"], v["cfg_rank"]) for r, v in ranks.items()} == {
        0: (0, 0), 1: (0, 1), 2: (1, 0), 3: (1, 1)
    }
    # micro-batches [0-3] [4,6] [5] [7:error] [8-10] dealt to dp 0,1,0,1,0; sample j of a
    # micro-batch is written by cfg rank j % 2
    written = {r: v["samples_ok"] + v["samples_error"] for r, v in ranks.items()}
    assert written == {0: 2 + 1 + 2, 1: 2 + 0 + 1, 2: 1 + 1, 3: 1 + 0}
    assert sum(v["samples_error"] for v in ranks.values()) == 1
    samples = _samples(out)
    assert samples.column("row_index").to_pylist() == list(range(11))


def _rank_pid(out: Path, rank: int) -> int:
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"jobs.local.worker" in cmd and str(out).encode() in cmd and f"RANK={rank}".encode() in env:
            return int(proc.name)
    raise AssertionError(f"no worker process of rank {rank}")


def _start_and_wait_for_ranks(parti64: Path, out: Path, *extra: str) -> subprocess.Popen[str]:
    gen = subprocess.Popen(
        ["gen", "batch", str(parti64), "--out", str(out), "--gpus", "2", "--cfg-parallel-size", "2",
         "--steps", "20", "--batch-size", "2", *extra],
        env={**os.environ, **ENV}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not list((out / ".gen" / "shards").glob("*/part-*-r00001-*.samples.parquet")):
        assert gen.poll() is None, gen.communicate()
        assert time.monotonic() < deadline, "no part flushed by rank 1"
        time.sleep(0.05)
    return gen  # both ranks are in the generation loop, with some samples flushed


def test_killed_rank_fails_the_run_and_a_rerun_resumes(parti64: Path, tmp_path: Path) -> None:
    out = tmp_path / "killed"
    gen = _start_and_wait_for_ranks(parti64, out)
    os.kill(_rank_pid(out, 1), signal.SIGKILL)
    killed = time.monotonic()
    _, stderr = gen.communicate(timeout=120)
    assert gen.returncode not in (0, None)
    assert time.monotonic() - killed < 60
    assert "Signal 9" in stderr or "SIGKILL" in stderr, stderr[-3000:]
    assert "re-run the same command to resume" in stderr
    args = ["--gpus", "2", "--cfg-parallel-size", "2", "--steps", "20", "--batch-size", "2"]
    proc = run_gen("batch", str(parti64), "--out", str(out), *args, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "64 ok, 0 error" in proc.stdout
    assert json.loads((out / "summary.json").read_text())["run_samples_skipped"] > 0
    # Resumed output is byte-identical to an uninterrupted run: a micro-batch that was only
    # partly flushed (one rank of the group wrote its rows, the killed one did not) is run again
    # whole, so its composition and bytes are as planned.
    clean = run_gen("batch", str(parti64), "--out", str(tmp_path / "clean"), *args, env=ENV)
    assert clean.returncode == 0, clean.stderr[-3000:]
    _same_bytes(out, tmp_path / "clean", rows=64, steps=20)


def test_hung_rank_fails_the_run_within_the_collective_timeout(parti64: Path, tmp_path: Path) -> None:
    out = tmp_path / "hung"
    gen = _start_and_wait_for_ranks(parti64, out, "--collective-timeout", "5")
    pid = _rank_pid(out, 1)
    os.kill(pid, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        _, stderr = gen.communicate(timeout=120)
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    elapsed = time.monotonic() - stopped
    assert gen.returncode == 1
    assert "rank 0 failed: CFG group of ranks [0, 1]: a collective failed" in stderr, stderr[-3000:]
    assert "--collective-timeout 5 s" in stderr
    assert elapsed < 5 + 60, elapsed  # the timeout, then torchrun stops the stuck rank
