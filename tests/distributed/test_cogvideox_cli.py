"""CogVideoX through the CLI (tiny-cogvideox: CogVideoX 1.5-shaped, batched [uncond; cond],
frames-before-channels latents with a padding latent frame, a shared rotary tuple whose dim 0 is
the token count) on real gloo ranks, OMP_NUM_THREADS=1:

- ``--batch-size 1`` through ``--model DIR`` (a user's copy) equals a plain loop of the stock
  ``pipe(prompt=..., generator=torch.Generator("cpu").manual_seed(seed), output_type="np")``:
  the stock frames, as uint8 and encoded as gen encodes them, are the samples' mp4 bytes;
- ``--gpus 2 --cfg-parallel-size 2 --no-cfg-batching`` equals ``--gpus 1 --no-cfg-batching``
  (videos and step records), with ``--cfg-gate-step 0.5`` giving STEPS // 2 fresh and reused;
- a frame count the VAE cannot give back (not 8k + 1) stops the job with one line.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from jobs.output.media import mp4_bytes, mp4_frames
from pipeline.loading import resolve_model
from tests.conftest import parti_prompts, run_gen

STEPS = 4
ENV = {"OMP_NUM_THREADS": "1"}
STEP_COLUMNS = ["sample_id", "step_index", "timestep", "denoiser", "uncond"]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rows = parti_prompts(2)
    path = tmp_path_factory.mktemp("cogvideox") / "m.parquet"
    pq.write_table(pa.table({"prompt": [r["Prompt"] for r in rows],
                             "negative_prompt": ["blurry, low quality", None]}), path)  # fmt: skip
    return path


def _batch(manifest: Path, out: Path, model: str, *extra: str) -> pa.Table:
    proc = run_gen("batch", str(manifest), "--out", str(out), "--model", model, "--steps", str(STEPS),
                   "--batch-size", "1", *extra, env=ENV)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = pq.read_table(out / "samples")
    assert table.column("status").to_pylist() == ["ok"] * table.num_rows, table.column("error").to_pylist()
    return table


def test_batch_size_1_equals_the_stock_pipe_loop(manifest: Path, tmp_path: Path) -> None:
    user_dir = tmp_path / "my-cogvideox"
    shutil.copytree(resolve_model("tiny-cogvideox").path, user_dir)
    samples = _batch(manifest, tmp_path / "out", str(user_dir)).to_pylist()

    from diffusers import DiffusionPipeline

    torch.set_num_threads(1)
    pipe = DiffusionPipeline.from_pretrained(user_dir)
    pipe.set_progress_bar_config(disable=True)
    for row in samples:
        assert (row["num_frames"], row["height"], row["width"]) == (9, 32, 32)  # gen_defaults.json
        stock = pipe(prompt=row["prompt"], negative_prompt=row["negative_prompt"] or "",
                     generator=torch.Generator("cpu").manual_seed(row["seed"]), num_inference_steps=STEPS,
                     num_frames=9, height=32, width=32, output_type="np").frames[0]  # fmt: skip
        expected = (stock * 255).round().astype(np.uint8)
        assert expected.shape == (9, 32, 32, 3)
        got = row["video"]["bytes"]
        if got != mp4_bytes(expected):  # say by how much the decoded frames differ
            diff = np.abs(mp4_frames(got).astype(int) - mp4_frames(mp4_bytes(expected)).astype(int))
            pytest.fail(f"row {row['row_index']}: mp4 differs from the stock frames' (max diff {diff.max()})")


def test_cfg_parallel_equals_serial_and_gating_counts(manifest: Path, tmp_path: Path) -> None:
    common = ["--no-cfg-batching", "--cfg-gate-step", "0.5"]
    serial = _batch(manifest, tmp_path / "g1", "tiny-cogvideox", "--gpus", "1", *common)
    parallel = _batch(manifest, tmp_path / "g2", "tiny-cogvideox", "--gpus", "2", "--cfg-parallel-size", "2",
                      *common)  # fmt: skip
    assert parallel.column("video").to_pylist() == serial.column("video").to_pylist()
    for s in parallel.to_pylist():
        assert s["video"]["path"].endswith(".mp4") and len(mp4_frames(s["video"]["bytes"])) == 9
    steps = {k: pq.read_table(tmp_path / k / "steps", columns=STEP_COLUMNS).to_pylist() for k in ("g1", "g2")}
    assert steps["g1"] == steps["g2"] and len(steps["g1"]) == 2 * STEPS
    first = [s["uncond"] for s in steps["g1"][:STEPS]]
    assert first == ["fresh"] * (STEPS // 2) + ["reused"] * (STEPS - STEPS // 2)
    branches = pq.read_table(tmp_path / "g2" / "steps", columns=["branches"]).column("branches").to_pylist()
    assert branches[0] == [{"name": "uncond", "cfg_rank": 0}, {"name": "cond", "cfg_rank": 1}]
    for table in (serial, parallel):
        assert table.column("fresh_uncond").to_pylist() == [STEPS // 2] * 2
        assert table.column("reused_uncond").to_pylist() == [STEPS - STEPS // 2] * 2


def test_frames_the_vae_cannot_give_back_stop_the_job(manifest: Path, tmp_path: Path) -> None:
    """13 frames are 4 latent frames, which the CogVideoX VAE decodes to 16 frames."""
    proc = run_gen("batch", str(manifest), "--out", str(tmp_path / "out"), "--model", "tiny-cogvideox",
                   "--num-frames", "13", env=ENV)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "--num-frames 13: must be 8k + 1" in proc.stderr + proc.stdout
