"""`gen bench` end to end on tiny-sd, the plain-loop baseline, and `gen batch --dry-run`.

The real CLI runs in a subprocess (``python -m jobs.cli`` from this checkout). No timed
assertions: the figures go to the report, these tests check that they exist and are sane.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from jobs.bench.suite import write_manifest
from jobs.config import BatchConfig
from jobs.job import prepare_job
from jobs.slurm.params import max_array_size, split_arrays
from pipeline.loading import resolve_model

REPO = Path(__file__).resolve().parents[2]


def _cli(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})  # fmt: skip


def test_gen_bench_end_to_end_writes_the_report(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = _cli("bench", "--model", "tiny-sd", "--gpus", "2", "--prompts", "2", "--steps", "2",
                "--repeats", "1", "--batch-size", "2", "--batch-sizes", "2", "--no-adaptive", "--json", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "comparison" in proc.stdout and "gen vs plain, batch 1" in proc.stdout
    report = json.loads(out.read_text())
    assert report["machine"]["cpu_cores"] >= 1 and report["machine"]["torch"]
    assert report["config"]["model"] == "tiny-sd"
    runs = report["runs"]
    assert set(runs) == {"plain loop", "gen b1", "gen b2", "gen b2 cfg2", "gen b2 gate0.5",
                         "gen b2 cfg2 gate0.5", "accelerate b1", "accelerate b2",
                         "gen b1 dp2", "gen b2 dp2"}  # fmt: skip
    for name, run in runs.items():
        assert len(run["repeats"]) == 1, name
        assert run["repeats"][0]["images"] == 2, name
        assert run["generate_wall_s"]["median"] > 0 and run["images_per_s"]["median"] > 0, name
        ranks = 2 if "cfg2" in name or name.endswith("dp2") or "accelerate" in name else 1
        assert len(run["peak_rss_bytes_per_rank"]) == ranks, name
        assert all(50 << 20 < b < 8 << 30 for b in run["peak_rss_bytes_per_rank"]), name
    assert runs["gen b2 gate0.5"]["reused_uncond"] == 2  # 2 samples x 1 of 2 steps gated
    assert runs["gen b2"]["reused_uncond"] == 0
    comparisons = {c["name"]: c for c in report["comparisons"]}
    assert set(comparisons) == {"gen vs plain, batch 1", "gen vs plain, best batch", "cfg parallel",
                                "gate 0.5", "cfg parallel + gate", "overhead per call",
                                "gen vs accelerate, batch 1", "gen vs accelerate, best batch",
                                "gen vs accelerate, same batch"}  # fmt: skip
    for c in comparisons.values():
        assert c["ratio"] > 0
        assert (c["met"] is None) == (c["target"] is None), c
    overhead = report["overhead"]
    assert {"tiny-sd serial", "tiny-sd serial, no cfg batching", "tiny-sd cfg parallel"} <= set(overhead)
    serial = overhead["tiny-sd serial"]
    assert serial["calls"] == serial["forwards"] > 0  # one forward per call with cfg batching
    assert 0 < serial["overhead_us"]["median"] < serial["outer_us"]["median"]
    separate = overhead["tiny-sd serial, no cfg batching"]
    assert separate["forwards"] == 2 * separate["calls"]
    assert [r["rank"] for r in overhead["tiny-sd cfg parallel"]] == [0, 1]


def test_plain_loop_writes_one_png_per_row_and_its_accelerate_split_the_same(tmp_path: Path) -> None:
    """One process, then 2 torchrun processes splitting the rows with accelerate: the same PNGs."""
    manifest = tmp_path / "p.parquet"
    write_manifest(manifest, 3)
    model = resolve_model("tiny-sd")
    found = {}
    for name, launch in (("one", []), ("split", ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"])):
        proc = subprocess.run([sys.executable, *launch, "-m", "jobs.bench.plain_loop", str(manifest), model.path,
                               str(tmp_path / name), str(tmp_path / f"{name}.json"), "--steps", "2", "--threads", "1"],
                              cwd=REPO, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        pngs = sorted((tmp_path / name).glob("*.png"))
        assert [p.name for p in pngs] == ["000000000.png", "000000001.png", "000000002.png"]
        assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
        found[name] = json.loads((tmp_path / f"{name}.json").read_text())
        assert found[name]["images"] == 3 and found[name]["threads"] == 1
        assert found[name]["generate_s"] > 0 and found[name]["load_s"] > 0 and found[name]["peak_rss_bytes"] > 50 << 20
    assert found["one"]["processes"] == 1 and found["split"]["processes"] == 2
    assert len(found["split"]["peak_rss_bytes_per_rank"]) == 2
    for png in (tmp_path / "one").glob("*.png"):
        assert (tmp_path / "split" / png.name).read_bytes() == png.read_bytes(), png.name


def _big(tmp_path: Path, rows: int = 100_000) -> Path:
    path = tmp_path / "big.parquet"
    pq.write_table(pa.table({"prompt": [f"p {i}" for i in range(rows)]}), path, row_group_size=25_000)
    return path


def test_dry_run_prints_the_local_and_slurm_plans_and_writes_nothing(tmp_path: Path) -> None:
    manifest = _big(tmp_path)
    cache = tmp_path / "cache"
    env = {"GEN_CACHE_DIR": str(cache)}
    local = _cli("batch", str(manifest), "--dry-run", "--gpus", "2", "--shard-size", "1000", env=env)
    assert local.returncode == 0, local.stderr
    text = local.stdout
    assert "dry run: nothing is started or written" in text
    assert "100,000 rows in 4 row group(s)" in text
    assert "100,000 rows -> 100 shard(s) of 1,000 rows (shard-00000 .. shard-00099); 0 done" in text
    assert "25,000 micro-batch(es) of <= 4 prompts, 100,000 image(s)" in text
    assert "2 rank(s) = dp 2 x cfg 1 (no CFG parallelism) (auto: 25000 micro-batches for 2 ranks: data parallel" in text
    assert "tiny-sd (built-in smoke-test model, built on first use)" in text
    capped = _cli("batch", str(manifest), "--dry-run", "--gpus", "2", "--max-forward-batch", "4", env=env)
    assert "data parallel, full-batch forwards; --max-forward-batch 4: each branch its own forward of 4" in capped.stdout

    slurm = _cli("batch", str(manifest), "--dry-run", "--slurm", "--gpus", "8", "--shard-size", "40",
                 "--shards-per-task", "2", "--array-parallelism", "5", "--time", "2:00:00", env=env)  # fmt: skip
    assert slurm.returncode == 0, slurm.stderr
    cap = max_array_size()
    arrays = split_arrays(1250, cap)  # 2,500 shards of 40 rows, 2 per task
    assert f"2,500 shard(s) -> 1,250 array task(s) of 2 shard(s) (--shards-per-task) in {len(arrays)} array(s)" in slurm.stdout
    first = arrays[0]
    assert (f"array 0: --array=0-{len(first) - 1}%5: tasks 0-{first[-1]:,}, shards 0-{2 * first[-1] + 1:,}"
            in slurm.stdout)  # fmt: skip
    # auto, per task: 2 shards of 40 rows = 20 micro-batches for 8 ranks
    assert "--gpus-per-node=8, --time=120 min; 8 rank(s) = dp 8 x cfg 1" in slurm.stdout
    few = _cli("batch", str(manifest), "--dry-run", "--slurm", "--gpus", "8", "--shard-size", "4", env=env)
    assert "8 rank(s) = dp 4 x cfg 2; CFG groups [0, 1] [2, 3] [4, 5] [6, 7] (auto: 1 micro-batch(es)" in few.stdout

    # nothing written: no OUT, no model built, only the manifest in its directory
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.parquet"]


def test_dry_run_on_an_existing_out_counts_done_shards_and_names_a_refusal(tmp_path: Path) -> None:
    manifest = _big(tmp_path, rows=1000)
    out = tmp_path / "out"
    config = BatchConfig(manifest=str(manifest), out=str(out), shard_size=100, num_inference_steps=2)
    prepare_job(config, overwrite=False, echo=lambda _: None)
    (out / "done").mkdir()
    for i in (0, 3):
        (out / "done" / f"shard-{i:05d}.json").write_text("{}")
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    same = _cli("batch", str(manifest), "--out", str(out), "--dry-run", "--shard-size", "100", "--steps", "2")
    assert same.returncode == 0, same.stderr
    assert "10 shard(s) of 100 rows" in same.stdout and "2 done, 0 held by queued tasks, 8 to run" in same.stdout
    assert "same job: a real run resumes it" in same.stdout
    assert "200 micro-batch(es)" in same.stdout and "800 image(s)" in same.stdout
    other = _cli("batch", str(manifest), "--out", str(out), "--dry-run", "--shard-size", "100", "--steps", "3")
    assert other.returncode == 0, other.stderr
    assert "holds a different job (num_inference_steps (2 -> 3) differ)" in other.stdout
    assert "0 done" in other.stdout and "10 to run" in other.stdout
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # untouched

    (out / "done" / "shard-00003.json").write_text(json.dumps({"samples_ok": 97, "samples_error": 3}))
    retry = _cli("batch", str(manifest), "--out", str(out), "--dry-run", "--shard-size", "100", "--steps", "2",
                 "--retry-errors")  # fmt: skip
    assert retry.returncode == 0, retry.stderr
    assert "1 done, 0 held by queued tasks, 9 to run (1 reopened by --retry-errors)" in retry.stdout
    assert "803 image(s)" in retry.stdout


def test_dry_run_names_a_shard_locked_by_a_live_run(tmp_path: Path) -> None:
    import fcntl

    manifest = _big(tmp_path, rows=1000)
    out = tmp_path / "out"
    prepare_job(BatchConfig(manifest=str(manifest), out=str(out), shard_size=100),
                overwrite=False, echo=lambda _: None)  # fmt: skip
    lock = out / ".gen" / "locks" / "shard-00001.lock"
    lock.parent.mkdir(parents=True)
    lock.write_text(json.dumps({"run_id": "r1", "pid": 4242, "host": "node7"}))
    free = _cli("batch", str(manifest), "--out", str(out), "--dry-run", "--shard-size", "100")
    assert "same job: a real run resumes it" in free.stdout and "locked" not in free.stdout  # stale
    with lock.open() as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # a live run holds shard 1
        held = _cli("batch", str(manifest), "--out", str(out), "--dry-run", "--shard-size", "100")
    assert held.returncode == 0, held.stderr
    assert ("1 shard(s) to run are locked by a live run (e.g. shard-00001: run r1, pid 4242 on node7): "
            "a real run would refuse") in held.stdout  # fmt: skip
