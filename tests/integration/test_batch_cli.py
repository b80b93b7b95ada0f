"""`gen batch` end to end: the installed CLI in a subprocess over 64 real PartiPrompts."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.conftest import run_gen

STEPS = 4


@pytest.fixture(scope="module")
def outs(parti64: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same job three ways: --gpus 2 / shard 8 (the auto layout: 16 micro-batches, dp 2),
    --gpus 2 / shard 64 (two ranks share a shard), --gpus 1 / shard 64: data parallel gives the
    1-rank bytes and splits the work (CFG-parallel runs are in
    tests/distributed/test_cfg_parallel_cli.py)."""
    base = tmp_path_factory.mktemp("e2e")
    runs = {"g2s8": ("2", "8"), "g2s64": ("2", "64"), "g1s64": ("1", "64")}
    for name, (gpus, shard) in runs.items():
        layout = [] if name == "g2s8" else ["--cfg-parallel-size", "1"]
        proc = run_gen("batch", str(parti64), "--out", str(base / name), "--gpus", gpus, *layout, "--shard-size", shard, "--steps", str(STEPS), "--height", "64",
                       "--width", "96", env={"OMP_NUM_THREADS": "1"})  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "64 ok, 0 error" in proc.stdout
        assert f"layout: {gpus} rank(s) = dp {gpus} x cfg 1" in proc.stdout
        chosen = json.loads((base / name / "job.json").read_text())["layout"]["chosen"]
        if layout:
            assert chosen == "--cfg-parallel-size"
        else:
            assert "(auto: 16 micro-batches for 2 ranks: data parallel, full-batch forwards)" in proc.stdout
            assert chosen == "auto: 16 micro-batches for 2 ranks: data parallel, full-batch forwards"
    return {name: base / name for name in runs}


def test_64_prompts_on_two_ranks(outs: dict[str, Path], parti64: Path) -> None:
    out = outs["g2s8"]
    samples = pq.read_table(out / "samples")
    assert samples.num_rows == 64
    assert set(samples.column("status").to_pylist()) == {"ok"}
    assert samples.column("row_index").to_pylist() == list(range(64))
    for cell in samples.column("image").to_pylist():
        img = Image.open(io.BytesIO(cell["bytes"]))
        assert img.format == "PNG" and img.size == (96, 64)  # (width, height)
    manifest = pq.read_table(parti64)
    for col in ("prompt", "category", "challenge", "note"):
        assert samples.column(col).to_pylist() == manifest.column(col).to_pylist()
    assert set(samples.column("fresh_uncond").to_pylist()) == {STEPS}
    steps = pq.read_table(out / "steps")
    assert steps.num_rows == 64 * STEPS
    assert set(steps.column("uncond").to_pylist()) == {"fresh"}
    assert set(steps.column("denoiser").to_pylist()) == {"unet"}
    done = sorted(p.name for p in (out / "done").iterdir())
    assert done == [f"shard-{i:05d}.json" for i in range(8)]
    assert sorted(p.name for p in (out / "samples").iterdir()) == [
        f"shard-{i:05d}.parquet" for i in range(8)
    ]
    assert not (out / ".gen" / "shards").exists() or not any((out / ".gen" / "shards").iterdir())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples_ok"] == 64 and summary["generate_wall_s"] > 0 and summary["images_per_s"] > 0
    per_rank = {r["rank"]: r["samples_ok"] for r in summary["ranks"]}
    assert per_rank == {0: 32, 1: 32}  # 16 micro-batches of 4 rows dealt round-robin
    assert all(r["peak_rss_bytes"] > 0 for r in summary["ranks"])
    job = json.loads((out / "job.json").read_text())
    assert job["config"]["gpus"] == 2 and job["manifest"]["num_rows"] == 64


@pytest.mark.parametrize("other", ["g2s64", "g1s64"])
def test_bytes_identical_across_ranks_and_shard_sizes(outs: dict[str, Path], other: str) -> None:
    a = pq.read_table(outs["g2s8"] / "samples")
    b = pq.read_table(outs[other] / "samples")
    for col in ("sample_id", "seed", "image"):
        assert a.column(col).to_pylist() == b.column(col).to_pylist(), col
    steps = ["sample_id", "step_index", "timestep", "denoiser", "uncond"]
    assert pq.read_table(outs["g2s8"] / "steps", columns=steps).equals(pq.read_table(outs[other] / "steps", columns=steps))


def test_rerun_skips_done_shards(outs: dict[str, Path], parti64: Path) -> None:
    out = outs["g1s64"]
    before = (out / "samples" / "shard-00000.parquet").stat().st_mtime_ns
    proc = run_gen("batch", str(parti64), "--out", str(out), "--gpus", "1", "--shard-size", "64",
                   "--steps", str(STEPS), "--height", "64", "--width", "96")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "0 to run" in proc.stdout and "64 ok" in proc.stdout
    assert (out / "samples" / "shard-00000.parquet").stat().st_mtime_ns == before


def test_out_holding_another_job_is_refused(outs: dict[str, Path], parti64: Path) -> None:
    proc = run_gen("batch", str(parti64), "--out", str(outs["g1s64"]), "--steps", "7",
                   "--shard-size", "64")  # fmt: skip
    assert proc.returncode == 2
    assert "holds a different job" in proc.stderr and "num_inference_steps" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_datasets_reads_image_feature(outs: dict[str, Path]) -> None:
    datasets = pytest.importorskip("datasets")
    ds = datasets.load_dataset("parquet", data_files=str(outs["g2s8"] / "samples" / "*.parquet"),
                               split="train")  # fmt: skip
    assert isinstance(ds.features["image"], datasets.Image)
    assert ds[0]["image"].size == (96, 64)


def test_row_errors_do_not_stop_the_job(tmp_path: Path) -> None:
    manifest = tmp_path / "m.parquet"
    pq.write_table(
        pa.table({
            "prompt": ["a cat", None, "   ", "a dog", "ünïcödé 猫 🐱"],
            "height": pa.array([None, None, None, 60, None], pa.int64()),
            "seed": pa.array([7, None, None, None, 9], pa.int64()),
        }),
        manifest,
    )  # fmt: skip
    proc = run_gen("batch", str(manifest), "--out", str(tmp_path / "o"), "--steps", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    samples = pq.read_table(tmp_path / "o" / "samples").to_pylist()
    assert [s["status"] for s in samples] == ["ok", "error", "error", "error", "ok"]
    assert "prompt is null" in samples[1]["error"]
    assert "prompt is empty" in samples[2]["error"]
    assert "height 60" in samples[3]["error"]
    assert samples[0]["seed"] == 7 and samples[4]["seed"] == 9
    assert samples[1]["image"] is None
    assert "2 ok, 3 error" in proc.stdout


def test_per_row_cfg_gate_step(tmp_path: Path) -> None:
    """`--cfg-gate-step 0.5` for the job; rows override it; an out-of-range value is an error
    row; the counts land in both parquets and in the run's summary line."""
    manifest = tmp_path / "m.parquet"
    pq.write_table(
        pa.table({"prompt": ["a cat", "a dog", "a cow", "a hen"],
                  "cfg_gate_step": pa.array([None, 0.0, 1.0, 2.0], pa.float64())}),  # fmt: skip
        manifest,
    )
    proc = run_gen("batch", str(manifest), "--out", str(tmp_path / "o"), "--steps", "8",
                   "--cfg-gate-step", "0.5")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    samples = pq.read_table(tmp_path / "o" / "samples").to_pylist()
    got = [(s["status"], s["cfg_gate_step"], s["fresh_uncond"], s["reused_uncond"], s["gate_step"])
           for s in samples]  # fmt: skip
    assert got == [("ok", 0.5, 4, 4, 4), ("ok", 0.0, 1, 7, 1), ("ok", 1.0, 8, 0, None),
                   ("error", 2.0, 0, 0, None)]  # fmt: skip
    assert "cfg_gate_step 2.0 must be in [0, 1]" in samples[3]["error"]
    steps = pq.read_table(tmp_path / "o" / "steps").to_pylist()
    assert [s["uncond"] for s in steps if s["sample_id"] == samples[0]["sample_id"]] == (
        ["fresh"] * 4 + ["reused"] * 4
    )
    assert "cfg gating: 13 fresh, 11 reused unconditional predictions (46% skipped), 0 invalidations" in proc.stdout


def test_gating_without_guidance_warns_once(tmp_path: Path) -> None:
    pq.write_table(pa.table({"prompt": ["a cat"]}), tmp_path / "m.parquet")
    proc = run_gen("batch", str(tmp_path / "m.parquet"), "--out", str(tmp_path / "o"), "--steps", "2",
                   "--guidance-scale", "1", "--cfg-gate-step", "0.5")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("warning: CFG gating has no effect: --guidance-scale 1 <= 1") == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["missing.parquet"], "no such file"),
        (["{ok}", "--cfg-gate-step", "1.5"], "--cfg-gate-step 1.5 is invalid: must be in [0, 1]"),
        (["{ok}", "--cfg-gate-cosine", "2"], "--cfg-gate-cosine 2.0 is invalid: must be in [-1, 1]"),
        (["{textgate}"], "cfg_gate_step"),
        (["{dir}"], "is a directory"),
        (["{notparquet}"], "not a readable parquet file"),
        (["{noprompt}"], "no 'prompt' column"),
        (["{ok}", "--shard-size", "10", "--batch-size", "4"], "must be a positive multiple of --batch-size"),
        (["{ok}", "--gpus", "0"], "--gpus 0"),
        (["{ok}", "--gpus", "3", "--cfg-parallel-size", "2"], "--gpus 3 --cfg-parallel-size 2: dp * cfg must equal 3"),
        (["{ok}", "--cfg-parallel-size", "0"], "--cfg-parallel-size 0"),
        (["{ok}", "--height", "65"], "--height 65"),
        (["{ok}", "--model", "{dir}"], "no model_index.json"),
        (["{empty}"], "has no rows"),
        (["{truncated}"], "not a readable parquet file"),
        (["{intprompt}"], "column 'prompt' has type int64, expected string"),
        (["{textsteps}"], "column 'num_inference_steps' has type string, expected integer"),
        (["{dupids}"], "column 'id' has 1 duplicated values (e.g. 'a')"),
        (["{ok}", "--gpus", "-1"], "--gpus -1"),
        (["{ok}", "--steps", "0"], "--steps 0 is invalid: must be >= 1"),
        (["{ok}", "--guidance-scale", "-2"], "--guidance-scale -2.0 is invalid"),
        (["{ok}", "--batch-size", "0"], "--batch-size 0 is invalid"),
        (["{ok}", "--partition", "gpu"], "--partition needs --slurm"),
        (["{ok}", "--skip-guidance-layers", "7,x"], "--skip-guidance-layers '7,x' is invalid"),
        (["{ok}", "--true-cfg-scale", "-1"], "--true-cfg-scale -1.0 is invalid"),
        (["{ok}", "--skip-layer-guidance-stop", "2"], "--skip-layer-guidance-stop 2.0 is invalid: must be in [0, 1]"),
        # Options a family does not take, found once the ranks know the pipeline class.
        (["{ok}", "--true-cfg-scale", "2"], "--true-cfg-scale 2: tiny-sd (StableDiffusionPipeline) has no true CFG"),
        (["{ok}", "--skip-guidance-layers", "1"], "--skip-guidance-layers: StableDiffusionPipeline does not take it"),
        (["{ok}", "--model", "tiny-sd3", "--skip-guidance-layers", "9"], "the transformer has 4 blocks (0-3)"),
        # The model's own factor (tiny-wan22: VAE 8 x patch 2), found by the ranks: still exit 2.
        (["{ok}", "--model", "tiny-wan22", "--height", "24", "--gpus", "2"],
         "--height 24 is invalid: tiny-wan22 needs a multiple of 16"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "notparquet").write_text("prompt\na cat\n")
    pq.write_table(pa.table({"text": ["a cat"]}), tmp_path / "noprompt")
    pq.write_table(pa.table({"prompt": ["a cat"]}), tmp_path / "ok")
    pq.write_table(pa.table({"prompt": ["a cat"], "cfg_gate_step": ["half"]}), tmp_path / "textgate")
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), tmp_path / "empty")
    pq.write_table(pa.table({"prompt": ["a cat"] * 100}), tmp_path / "full")
    (tmp_path / "truncated").write_bytes((tmp_path / "full").read_bytes()[:-100])
    pq.write_table(pa.table({"prompt": [1, 2]}), tmp_path / "intprompt")
    pq.write_table(pa.table({"prompt": ["a"], "num_inference_steps": ["ten"]}), tmp_path / "textsteps")
    pq.write_table(pa.table({"prompt": ["a", "b", "c"], "id": ["a", "b", "a"]}), tmp_path / "dupids")
    paths = {"dir": tmp_path, "notparquet": tmp_path / "notparquet",
             "noprompt": tmp_path / "noprompt", "ok": tmp_path / "ok",
             "textgate": tmp_path / "textgate", "empty": tmp_path / "empty",
             "truncated": tmp_path / "truncated", "intprompt": tmp_path / "intprompt",
             "textsteps": tmp_path / "textsteps", "dupids": tmp_path / "dupids"}  # fmt: skip
    argv = [a.format(**paths) for a in args]
    proc = run_gen("batch", *argv, "--out", str(tmp_path / "o"))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "closing signal" not in proc.stderr and "exitcode" not in proc.stderr  # torchrun's lines
    assert not (tmp_path / "o" / "samples").exists()
