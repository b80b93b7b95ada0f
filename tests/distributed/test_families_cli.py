"""Each image family through the CLI on real gloo ranks (OMP_NUM_THREADS=1), against the stock
``pipe(...)`` call of the same model directory.

Per family (tiny-sdxl, tiny-sd3 with skip-layer guidance, tiny-flux distilled and with true CFG,
tiny-pixart-sigma, tiny-qwenimage), on 3 PartiPrompts (2 with a negative prompt):
- ``--batch-size 1`` through ``--model DIR`` (a copy of the built-in model: a user's directory)
  equals a plain loop ``pipe(prompt=..., generator=torch.Generator("cpu").manual_seed(seed),
  ...)`` byte for byte;
- ``--gpus 2 --cfg-parallel-size 2 --no-cfg-batching`` equals ``--gpus 1 --no-cfg-batching``
  byte for byte, images and step records, with ``--cfg-gate-step 0.5`` giving the expected
  fresh / reused counts in both parquets (SD3's cond_skip, gated like uncond: also on 3 ranks);
- distilled Flux (one branch) on a CFG group of 2 cuts each step by samples.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline.loading import resolve_model
from tests.conftest import parti_prompts, run_gen

STEPS = 4
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
SLG = ["--skip-guidance-layers", "1,2", "--skip-layer-guidance-start", "0", "--skip-layer-guidance-stop", "1"]

# name -> (built-in model, gen options, extra stock pipe() arguments, whether rows without a
# negative prompt pass negative_prompt=None to the stock call)
FAMILIES: dict[str, tuple[str, list[str], dict[str, Any], bool]] = {
    "sdxl": ("tiny-sdxl", [], {}, True),
    "sd3-slg": ("tiny-sd3", SLG, {"skip_guidance_layers": [1, 2], "skip_layer_guidance_start": 0.0,
                                  "skip_layer_guidance_stop": 1.0}, False),  # fmt: skip
    "flux": ("tiny-flux", [], {}, True),
    "flux-true-cfg": ("tiny-flux", ["--true-cfg-scale", "4"], {"true_cfg_scale": 4.0}, False),
    "pixart-sigma": ("tiny-pixart-sigma", ["--height", "64", "--width", "96"], {"height": 64, "width": 96}, False),
    "qwenimage": ("tiny-qwenimage", [], {}, False),
}
GUIDED = {"sdxl", "sd3-slg", "flux-true-cfg", "pixart-sigma", "qwenimage"}


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rows = parti_prompts(3)
    path = tmp_path_factory.mktemp("families") / "m.parquet"
    pq.write_table(pa.table({"prompt": [r["Prompt"] for r in rows],
                             "negative_prompt": ["blurry, low quality", None, "text, watermark"]}), path)  # fmt: skip
    return path


def _batch(manifest: Path, out: Path, model: str, *extra: str) -> pa.Table:
    proc = run_gen("batch", str(manifest), "--out", str(out), "--model", model, "--steps", str(STEPS),
                   "--batch-size", "1", *extra, env=ONE_THREAD)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = pq.read_table(out / "samples")
    assert table.column("status").to_pylist() == ["ok"] * table.num_rows, table.column("error").to_pylist()
    return table


def _pixels(image: dict[str, Any]) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(image["bytes"])))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_batch_size_1_equals_the_stock_pipe_loop(family: str, manifest: Path, tmp_path: Path) -> None:
    name, options, call, none_negative = FAMILIES[family]
    user_dir = tmp_path / "my-model"  # a user's own directory of that class
    shutil.copytree(resolve_model(name).path, user_dir)
    samples = _batch(manifest, tmp_path / "out", str(user_dir), *options).to_pylist()

    from diffusers import DiffusionPipeline

    torch.set_num_threads(1)
    pipe = DiffusionPipeline.from_pretrained(user_dir)
    pipe.set_progress_bar_config(disable=True)
    for row in samples:
        # Flux and Qwen-Image default to a fixed 1024 px whatever the model: say the size.
        kwargs: dict[str, Any] = {"num_inference_steps": STEPS, "height": row["height"], "width": row["width"], **call}
        negative = row["negative_prompt"]
        if negative is not None or not none_negative:
            kwargs["negative_prompt"] = negative or ""
        if family == "flux":  # distilled: negative prompts are ignored (and say so)
            kwargs.pop("negative_prompt", None)
            assert (row["warning"] is not None) == (negative is not None)
        stock = pipe(prompt=row["prompt"], generator=torch.Generator("cpu").manual_seed(row["seed"]), **kwargs)
        expected = np.asarray(stock.images[0])
        got = _pixels(row["image"])
        assert got.shape == expected.shape and (row["height"], row["width"]) == got.shape[:2]
        assert np.array_equal(got, expected), f"{family} row {row['row_index']}: max diff " \
            f"{np.abs(got.astype(int) - expected.astype(int)).max()}"


STEP_COLUMNS = ["sample_id", "step_index", "timestep", "denoiser", "uncond", "branches", "branch_states"]


@pytest.mark.parametrize("family", sorted(GUIDED))
def test_cfg_parallel_equals_serial_and_gating_counts(family: str, manifest: Path, tmp_path: Path) -> None:
    name, options, _, _ = FAMILIES[family]
    common = ["--no-cfg-batching", "--cfg-gate-step", "0.5", *options]
    serial = _batch(manifest, tmp_path / "g1", name, "--gpus", "1", *common)
    layouts = {"g2": ["--gpus", "2", "--cfg-parallel-size", "2"]}
    if family == "sd3-slg":
        layouts["g3"] = ["--gpus", "3", "--cfg-parallel-size", "3"]
    serial_steps = pq.read_table(tmp_path / "g1" / "steps", columns=STEP_COLUMNS).to_pylist()
    for key, layout in layouts.items():
        parallel = _batch(manifest, tmp_path / key, name, *layout, *common)
        assert parallel.column("image").to_pylist() == serial.column("image").to_pylist(), key
        steps = pq.read_table(tmp_path / key / "steps", columns=STEP_COLUMNS).to_pylist()
        assert [{k: v for k, v in s.items() if k != "branches"} for s in steps] == \
            [{k: v for k, v in s.items() if k != "branches"} for s in serial_steps]  # fmt: skip
        ranks = {b["cfg_rank"] for s in steps for b in s["branches"]}
        assert ranks == set(range(int(layout[-1]))), (key, ranks)  # every rank ran branches
    half = STEPS // 2
    uncond_counts = {"name": "uncond", "fresh": half, "reused": STEPS - half, "gate_step": half, "invalidations": 0}
    # The skip-layer branch is in the pipeline's window on steps 1..N-1 (i > 0): fresh on step
    # 1, reused from its delta to cond from the gate step (2) on.
    skip_counts = {"name": "cond_skip", "fresh": half - 1, "reused": STEPS - half, "gate_step": half,
                   "invalidations": 0}  # fmt: skip
    expected_counts = [uncond_counts, skip_counts] if family == "sd3-slg" else [uncond_counts]
    for table in (serial, pq.read_table(tmp_path / "g2" / "samples")):
        assert table.column("fresh_uncond").to_pylist() == [half] * 3
        assert table.column("reused_uncond").to_pylist() == [STEPS - half] * 3
        assert table.column("branch_counts").to_pylist() == [expected_counts] * 3
    first = [s for s in serial_steps if s["sample_id"] == serial_steps[0]["sample_id"]]
    assert [s["uncond"] for s in first] == ["fresh"] * half + ["reused"] * (STEPS - half)
    if family == "sd3-slg":
        states = [{b["name"]: b["state"] for b in s["branch_states"]} for s in first]
        assert [st["cond_skip"] for st in states] == ["none", "fresh", "reused", "reused"]
        skip = [[b["name"] for b in s["branches"]].count("cond_skip") for s in first]
        assert skip == [0, 1, 0, 0]
        on_three = pq.read_table(tmp_path / "g3" / "steps", columns=STEP_COLUMNS).to_pylist()
        assert {b["cfg_rank"] for b in on_three[1]["branches"] if b["name"] == "cond_skip"} == {2}


def test_distilled_flux_on_a_cfg_group_cuts_steps_by_samples(tmp_path: Path) -> None:
    """One branch, --cfg-parallel-size 2, batch 2: each rank runs one sample of every step."""
    rows = parti_prompts(2)
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"prompt": [r["Prompt"] for r in rows]}), manifest)
    proc = run_gen("batch", str(manifest), "--out", str(tmp_path / "out"), "--model", "tiny-flux", "--steps", "2",
                   "--batch-size", "2", "--gpus", "2", "--cfg-parallel-size", "2", env=ONE_THREAD)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert pq.read_table(tmp_path / "out" / "samples").column("status").to_pylist() == ["ok", "ok"]
    steps = pq.read_table(tmp_path / "out" / "steps").to_pylist()
    assert all(s["uncond"] == "none" and s["branches"] == [{"name": "cond", "cfg_rank": 0},
                                                             {"name": "cond", "cfg_rank": 1}] for s in steps)  # fmt: skip
