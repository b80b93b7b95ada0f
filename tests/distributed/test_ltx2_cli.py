"""LTX-2 through the CLI (tiny-ltx2: 4 branches in 3 transformer calls per step, every forward
returning a (video, audio) pair) on real gloo ranks, OMP_NUM_THREADS=1:

- ``--batch-size 1`` through ``--model DIR`` (a user's copy) equals a plain loop of the stock
  ``pipe(prompt=..., generator=torch.Generator("cpu").manual_seed(seed), output_type="np")``:
  the stock frames and waveform, encoded as gen encodes them, are the samples' mp4 and WAV bytes;
  the mp4 carries an audio stream, and ``datasets`` reads ``video`` / ``audio`` as Video / Audio;
- ``--cfg-parallel-size`` 2, 3 and 4 with ``--no-cfg-batching`` equal serial byte for byte
  (videos, audio and step records), branch i on group rank i % K at the fresh steps;
- gating every auxiliary branch at F = 0.5 gives STEPS // 2 fresh and reused for uncond, stg and
  modality in both parquets, serial == CFG parallel; the per-branch form gates them apart.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from jobs.output.media import mp4_audio, mp4_bytes, mp4_frames, wav_bytes
from pipeline.loading import resolve_model
from tests.conftest import parti_prompts, run_gen

STEPS = 4
ENV = {"OMP_NUM_THREADS": "1"}
STEP_COLUMNS = ["sample_id", "step_index", "timestep", "denoiser", "uncond", "branch_states"]
AUX = ("uncond", "stg", "modality")


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rows = parti_prompts(2)
    path = tmp_path_factory.mktemp("ltx2") / "m.parquet"
    pq.write_table(pa.table({"prompt": [r["Prompt"] for r in rows],
                             "negative_prompt": ["blurry, low quality", None]}), path)  # fmt: skip
    return path


def _batch(manifest: Path, out: Path, model: str, *extra: str) -> pa.Table:
    proc = run_gen("batch", str(manifest), "--out", str(out), "--model", model, "--steps", str(STEPS),
                   "--batch-size", "1", *extra, env=ENV, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = pq.read_table(out / "samples")
    assert table.column("status").to_pylist() == ["ok"] * table.num_rows, table.column("error").to_pylist()
    return table


def test_batch_size_1_equals_the_stock_pipe_loop(manifest: Path, tmp_path: Path) -> None:
    user_dir = tmp_path / "my-ltx2"
    shutil.copytree(resolve_model("tiny-ltx2").path, user_dir)
    table = _batch(manifest, tmp_path / "out", str(user_dir))
    samples = table.to_pylist()

    from diffusers import DiffusionPipeline

    torch.set_num_threads(1)
    pipe = DiffusionPipeline.from_pretrained(user_dir)
    pipe.set_progress_bar_config(disable=True)
    for row in samples:
        assert (row["num_frames"], row["height"], row["width"], row["fps"]) == (9, 64, 64, 24.0)
        video, audio = pipe(prompt=row["prompt"], negative_prompt=row["negative_prompt"] or "",
                            generator=torch.Generator("cpu").manual_seed(row["seed"]), num_inference_steps=STEPS,
                            num_frames=9, height=64, width=64, spatio_temporal_guidance_blocks=[1],
                            output_type="np", return_dict=False)  # fmt: skip
        frames = (video[0] * 255).round().astype(np.uint8)
        wave = audio[0].float().numpy()
        assert row["sample_rate"] == 24000 and row["audio_s"] == pytest.approx(wave.shape[-1] / 24000)
        assert row["audio"]["bytes"] == wav_bytes(wave, 24000), f"row {row['row_index']}: WAV differs"
        got = row["video"]["bytes"]
        if got != mp4_bytes(frames, 24.0, audio=wave, sample_rate=24000):
            diff = np.abs(mp4_frames(got).astype(int) - frames.astype(int))
            pytest.fail(f"row {row['row_index']}: mp4 differs from the stock output's (frames max diff {diff.max()})")
        sound, rate = mp4_audio(got)
        assert rate == 24000 and sound.shape == wave.shape  # the muxed track: every sample, both channels

    import datasets

    ds = datasets.load_dataset("parquet", data_files=str(tmp_path / "out" / "samples" / "*.parquet"), split="train")
    assert isinstance(ds.features["audio"], datasets.Audio) and isinstance(ds.features["video"], datasets.Video)
    assert ds.num_rows == 2


def _steps(out: Path) -> list[dict]:
    return pq.read_table(out / "steps", columns=STEP_COLUMNS).to_pylist()


def _layout(out: Path) -> list[list[dict]]:
    return pq.read_table(out / "steps", columns=["branches"]).column("branches").to_pylist()


@pytest.mark.parametrize("gate", ["1", "0.5"])
def test_cfg_parallel_2_3_4_equal_serial(manifest: Path, tmp_path: Path, gate: str) -> None:
    common = ["--no-cfg-batching", "--cfg-gate-step", gate]
    serial = _batch(manifest, tmp_path / "g1", "tiny-ltx2", "--gpus", "1", *common)
    sizes = (2, 3, 4) if gate == "1" else (4,)  # gated: after the gate cond runs whole on rank 0 at any K
    for k in sizes:
        out = tmp_path / f"g{k}"
        parallel = _batch(manifest, out, "tiny-ltx2", "--gpus", str(k), "--cfg-parallel-size", str(k), *common)
        for column in ("video", "audio", "branch_counts"):
            assert parallel.column(column).to_pylist() == serial.column(column).to_pylist(), (k, column)
        assert _steps(out) == _steps(tmp_path / "g1"), k
        first = _layout(out)[0]
        assert first == [{"name": n, "cfg_rank": i % k} for i, n in enumerate(("uncond", "cond", "stg", "modality"))]
    half = STEPS // 2
    fresh, reused = (STEPS, 0) if gate == "1" else (half, STEPS - half)
    expected = [{"name": n, "fresh": fresh, "reused": reused, "gate_step": None if gate == "1" else half,
                 "invalidations": 0} for n in AUX]  # fmt: skip
    assert serial.column("branch_counts").to_pylist() == [expected] * 2
    assert serial.column("fresh_uncond").to_pylist() == [fresh] * 2
    states = [{b["name"]: b["state"] for b in s["branch_states"]} for s in _steps(tmp_path / "g1")[:STEPS]]
    assert states == [dict.fromkeys(AUX, "fresh")] * (STEPS - reused) + [dict.fromkeys(AUX, "reused")] * reused
    if gate != "1":  # after the gate only cond runs: whole, on rank 0
        assert _layout(tmp_path / "g4")[half:STEPS] == [[{"name": "cond", "cfg_rank": 0}]] * (STEPS - half)


def test_per_branch_gate_steps(manifest: Path, tmp_path: Path) -> None:
    """uncond=0.5,stg=0.25: modality is never gated; stg from step 1, uncond from step 2. The
    end-of-run line counts every auxiliary branch of both samples."""
    proc = run_gen("batch", str(manifest), "--out", str(tmp_path / "out"), "--model", "tiny-ltx2",
                   "--steps", str(STEPS), "--batch-size", "1", "--cfg-gate-step", "uncond=0.5,stg=0.25",
                   env=ENV, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    samples = pq.read_table(tmp_path / "out" / "samples")
    for row in samples.column("branch_counts").to_pylist():
        counts = {c["name"]: (c["fresh"], c["reused"]) for c in row}
        assert counts == {"uncond": (2, 2), "stg": (1, 3), "modality": (4, 0)}
    assert ("cfg gating: 14 fresh, 10 reused auxiliary predictions (42% skipped; fresh/reused: "
            "uncond 4/4, stg 2/6, modality 8/0), 0 invalidations") in proc.stdout  # fmt: skip
    proc = run_gen("batch", str(manifest), "--out", str(tmp_path / "bad"), "--model", "tiny-ltx2",
                   "--cfg-gate-step", "cond_skip=0.5", env=ENV)  # fmt: skip
    assert proc.returncode == 2
    assert "has no branch cond_skip; its auxiliary branches: uncond, stg, modality" in proc.stderr
    assert "Traceback" not in proc.stderr
