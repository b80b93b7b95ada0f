"""The npu rules on CPU: every built-in family runs a real job under the NPU policy's dtype
rules (GEN_PLATFORM_RULES=npu) with the float64 / complex128 guard on during its pipeline
calls, and stays within a measured tolerance of the default rules; a planted float64 op fails
its row; a 2-rank gloo CLI run takes the rules to every rank.

Measured here (2 steps, 1 sample, float32, diffusers 0.42.1): latents and decoded pixels are
identical for SD, SDXL, SD3, PixArt-Sigma, Qwen-Image and the Wan family; Flux's latents differ
by 7e-8 (relative, rotary in float32), CogVideoX's by 9e-7 (its DPM scheduler tables in
float32), LTX-2's by 3e-6 (rotary in float32; audio by 1e-7); pixels by at most 1/255. The
bounds below leave ~30x room.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from jobs.config import BatchConfig
from jobs.local.launch import run_batch
from parallel.dtype_guard import ForbiddenDtypeGuard
from parallel.platform import detect_platform
from pipeline.smoke import smoke_models
from tests.conftest import run_gen

TINY = sorted(name for name in smoke_models() if name.startswith("tiny-"))
"""One model per built-in family (Wan image-to-video twice: 2.1 I2V and 2.2 TI2V)."""
LATENTS_REL_TOL = 1e-4
PIXEL_TOL = 2  # of 255
AUDIO_TOL = 1e-4


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("npu-rules") / "m.parquet"
    pq.write_table(pa.table({"prompt": ["a red fox in the snow"], "negative_prompt": ["blurry"]}), path)
    return path


@pytest.fixture(scope="module")
def image_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from PIL import Image

    path = tmp_path_factory.mktemp("npu-rules-image") / "in.png"
    Image.new("RGB", (32, 32), (120, 30, 200)).save(path)
    return path


def _job(manifest: Path, out: Path, model: str, image: Path | None, rules: str | None,
         monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:  # fmt: skip
    if image is not None:  # image-to-video models take the manifest's image column
        table = pq.read_table(manifest).append_column("image", pa.array([str(image)]))
        manifest = out.parent / f"{out.name}-manifest.parquet"
        pq.write_table(table, manifest)
    if rules:
        monkeypatch.setenv("GEN_PLATFORM_RULES", rules)
    else:
        monkeypatch.delenv("GEN_PLATFORM_RULES", raising=False)
    lines: list[str] = []
    config = BatchConfig(manifest=str(manifest), out=str(out), model=model, num_inference_steps=2, gpus=1)
    summary = run_batch(config, echo=lines.append)
    summary["lines"] = lines
    return summary


def _image_input(model: str) -> bool:
    from pipeline.families import family_class
    from pipeline.loading import resolve_model

    index = json.loads((Path(resolve_model(model).path) / "model_index.json").read_text())
    return family_class(index["_class_name"]).image_input


def test_every_built_in_family_has_a_tiny_model() -> None:
    """The runs below cover every family: a family added without a tiny- model fails here."""
    from pipeline.families import families, family_class
    from pipeline.loading import resolve_model

    covered = set()
    for model in TINY:
        index = json.loads((Path(resolve_model(model).path) / "model_index.json").read_text())
        covered.add(family_class(index["_class_name"]))
    assert covered == set(families().values())


@pytest.mark.parametrize("model", TINY)
def test_npu_rules_job_passes_under_the_guard(model: str, manifest: Path, image_file: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    before = ForbiddenDtypeGuard.ops_total
    image = image_file if _image_input(model) else None
    summary = _job(manifest, tmp_path / "out", model, image, "npu", monkeypatch)
    assert (summary["samples_ok"], summary["samples_error"]) == (1, 0), _errors(tmp_path / "out")
    assert ForbiddenDtypeGuard.ops_total - before > 100  # the guard watched the pipeline call
    assert any("dtype rules of npu" in line for line in summary["lines"])


def _errors(out: Path) -> list[str]:
    rows = pq.read_table(sorted((out / "samples").glob("*.parquet"))).to_pylist()
    return [r["error"] for r in rows if r["error"]]


def _stages(model: str, rules: Any, image: Path | None) -> tuple[list[torch.Tensor], Any]:
    """Latents and decoded output of one sample, through the StageRunner the worker uses."""
    from pipeline.generate import StageRunner
    from pipeline.loading import load_pipeline, resolve_model
    from pipeline.samples import ImageRef, SampleRequest

    pipe = load_pipeline(resolve_model(model), dtype=torch.float32, device=torch.device("cpu"))
    runner = StageRunner(pipe, cfg_batching=True, guidance_rescale=None, rules=rules)
    family, own = runner.family, runner.family.call_defaults
    request = SampleRequest(sample_id="a", prompt="a red fox in the snow", negative_prompt="blurry", seed=3,
                            height=family.default_size, width=family.default_size, num_inference_steps=2,
                            guidance_scale=own.get("guidance_scale", 7.5), true_cfg_scale=own.get("true_cfg_scale"),
                            num_frames=getattr(family, "default_num_frames", None) if family.output_kind != "image" else None)  # fmt: skip
    if image is not None:
        request = replace(request, image=ImageRef(path=str(image)))
    latents, results = runner.denoise([request], runner.encode([request]))
    result = runner.decode(results[0], latents[0])
    assert result.error is None, result.error
    return [t.double() for t in latents[0]], result.image


@pytest.mark.parametrize("model", TINY)
def test_npu_rules_output_within_tolerance_of_the_default_rules(model: str, image_file: Path) -> None:
    image = image_file if _image_input(model) else None
    npu_rules = detect_platform({"GEN_PLATFORM_RULES": "npu"}).device_rules(torch.float32)
    assert npu_rules.guard and npu_rules.forbidden_dtypes == (torch.float64, torch.complex128)
    base_latents, base_out = _stages(model, None, image)
    npu_latents, npu_out = _stages(model, npu_rules, image)
    for a, b in zip(base_latents, npu_latents):
        assert float((a - b).abs().max() / a.abs().max()) <= LATENTS_REL_TOL
    frames = getattr(base_out, "frames", base_out)
    diff = np.abs(np.asarray(frames, np.int32) - np.asarray(getattr(npu_out, "frames", npu_out), np.int32))
    assert diff.max() <= PIXEL_TOL
    if hasattr(base_out, "audio"):
        assert np.abs(base_out.audio - npu_out.audio).max() <= AUDIO_TOL


def test_npu_rules_catch_a_planted_float64_op(manifest: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """A scheduler step that goes through float64 (as a float64 sigma table would) fails its
    row under the npu rules, naming the op; under the default rules the same job passes."""
    from diffusers import DDIMScheduler

    step = DDIMScheduler.step

    def float64_step(self: DDIMScheduler, model_output: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return step(self, (model_output.double() * 1.0).float(), *args, **kwargs)

    monkeypatch.setattr(DDIMScheduler, "step", float64_step)
    summary = _job(manifest, tmp_path / "npu", "tiny-sd", None, "npu", monkeypatch)
    assert (summary["samples_ok"], summary["samples_error"]) == (0, 1)
    [error] = _errors(tmp_path / "npu")
    assert re.match(r"ForbiddenDtypeError: aten\.(_to_copy|to)\.\w+ on float64 at ", error), error
    assert "test_npu_rules.py" in error and "npu rules forbid complex128, float64" in error
    summary = _job(manifest, tmp_path / "default", "tiny-sd", None, None, monkeypatch)
    assert (summary["samples_ok"], summary["samples_error"]) == (1, 0)


def test_npu_rules_on_two_gloo_ranks(manifest: Path, tmp_path: Path) -> None:
    """The real CLI, torchrun, 2 gloo ranks of a CFG group (LTX-2: 4 branches, float64 rotary
    and connectors by default): the rules reach every rank, and every row passes the guard."""
    proc = run_gen("batch", str(manifest), "--out", str(tmp_path / "out"), "--model", "tiny-ltx2",
                   "--steps", "2", "--gpus", "2", "--cfg-parallel-size", "2",
                   env={"GEN_PLATFORM_RULES": "npu", "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "with the dtype rules of npu (GEN_PLATFORM_RULES)" in proc.stdout
    assert "done: 1 ok, 0 error" in proc.stdout
    ranks = json.loads((tmp_path / "out" / "summary.json").read_text())["ranks"]
    assert len(ranks) == 2
