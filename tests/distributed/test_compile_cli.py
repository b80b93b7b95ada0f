"""--compile through the CLI on 2 CFG-parallel gloo ranks with gating: the compiled UNet
(its repeated blocks, dynamic shapes) runs under the intercept, the gated steps' half-size
forwards do not break it, compile time is reported apart, and the images are eager's up to
the compiled kernels' rounding. A resume without --compile is refused (it would mix the two)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from tests.conftest import parti_manifest, run_gen

ENV = {"OMP_NUM_THREADS": "1"}
ARGS = ["--steps", "4", "--batch-size", "2", "--gpus", "2", "--cfg-parallel-size", "2", "--cfg-gate-step", "0.5"]


def _pixels(out: Path) -> list[np.ndarray]:
    cells = pq.read_table(out / "samples").sort_by("sample_id").column("image").to_pylist()
    return [np.asarray(Image.open(io.BytesIO(c["bytes"])), dtype=np.int16) for c in cells]


def test_compile_under_cfg_parallel_gating(tmp_path: Path) -> None:
    manifest = parti_manifest(tmp_path / "m.parquet", 2)
    eager = run_gen("batch", str(manifest), "--out", str(tmp_path / "eager"), *ARGS, env=ENV)
    assert eager.returncode == 0, eager.stderr[-3000:]
    compiled = run_gen("batch", str(manifest), "--out", str(tmp_path / "compiled"), *ARGS, "--compile", env=ENV,
                       timeout=900)  # fmt: skip
    assert compiled.returncode == 0, compiled.stdout[-2000:] + compiled.stderr[-3000:]
    assert "2 ok, 0 error" in compiled.stdout
    summary = json.loads((tmp_path / "compiled" / "summary.json").read_text())
    assert summary["compile_s"] > 0 and all(r["compile_s"] > 0 for r in summary["ranks"])
    assert json.loads((tmp_path / "eager" / "summary.json").read_text())["compile_s"] == 0
    steps = [pq.read_table(tmp_path / o / "steps").sort_by([("sample_id", "ascending"), ("step_index", "ascending")])
             .select(["sample_id", "step_index", "uncond", "branches"]) for o in ("eager", "compiled")]  # fmt: skip
    assert steps[0].equals(steps[1]) and "reused" in steps[1].column("uncond").to_pylist()
    for a, b in zip(_pixels(tmp_path / "eager"), _pixels(tmp_path / "compiled")):
        diff = np.abs(a - b)
        assert diff.mean() <= 1.0 and diff.max() <= 16, (diff.mean(), diff.max())
    again = run_gen("batch", str(manifest), "--out", str(tmp_path / "compiled"), *ARGS, env=ENV)
    assert again.returncode == 2 and "compile (True -> False)" in again.stderr, again.stderr[-2000:]
