"""Manifest rows -> planned samples (one per image), with per-row overrides and checks.

A row that cannot be generated (null or blank prompt, an override out of range, no input image
for an image-conditioned model) becomes error samples here, before any model runs; the rest of
the job goes on. An input image is only referenced here: it is read at generate time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from jobs.seeds import SEED_LIMIT, derive_seed, image_seed, sample_id
from pipeline.samples import ImageRef, SampleRequest


@dataclass(frozen=True, kw_only=True)
class GenerationDefaults:
    """Job-level values used where a row has no override (None / missing column)."""

    height: int
    width: int
    num_inference_steps: int
    guidance_scale: float
    true_cfg_scale: float | None = None
    """None when the model's pipeline has no true CFG (a row's true_cfg_scale is then an error)."""
    cfg_gate_step: float = 1.0
    """CFG gating fraction F in [0, 1]; 1.0 = off."""
    cfg_gate_steps: tuple[tuple[str, float], ...] = ()
    """Per auxiliary branch, its own F (a row's cfg_gate_step does not change these)."""
    num_frames: int | None = None
    """Video models: frames per video; None for image models."""
    images_per_prompt: int
    seed: int
    """Job seed, for rows without a ``seed``."""
    size_multiple: int
    """Height and width must be multiples of this (the model's VAE factor)."""
    image_input: bool = False
    """The model is conditioned on an input image: each row's ``image`` becomes its requests'
    ImageRef, and a row without one is an error. False: the column only passes through."""
    image_root: str | None = None
    """Directory relative ``image`` paths are resolved against: the manifest's."""


@dataclass(frozen=True)
class PlannedSample:
    """One image of one manifest row: what to generate, or why it cannot be."""

    row_index: int
    """0-based row in the manifest."""
    image_index: int
    request: SampleRequest
    error: str | None = None


def image_ref(value: Any, root: str | None) -> tuple[ImageRef | None, str | None]:
    """A row's ``image`` cell as an ImageRef, or why it has none.

    Args:
        value: a path string, a {"bytes", "path"} dict (struct<bytes, path>), or None.
        root: directory relative paths are resolved against.
    Returns:
        (ref, None), or (None, problem) for a null or empty cell. The file is not looked at
        here: it is read at generate time, where a bad one fails its row.
    """
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if data is not None:
            return (ImageRef(path=path, data=data), None) if data else (None, "image has empty bytes")
        value = path
    if value is None:
        return None, "image is null (this model generates from an input image)"
    if not value.strip():
        return None, "image path is empty"
    return ImageRef(path=value, root=root), None


def _check_row(row: dict[str, Any], d: GenerationDefaults) -> tuple[dict[str, Any], str | None]:
    def pick(col: str, default: Any) -> Any:
        value = row.get(col)
        return default if value is None else value

    v = {
        "height": pick("height", d.height),
        "width": pick("width", d.width),
        "num_inference_steps": pick("num_inference_steps", d.num_inference_steps),
        "guidance_scale": float(pick("guidance_scale", d.guidance_scale)),
        "num_images": pick("num_images", d.images_per_prompt),
        "cfg_gate_step": float(pick("cfg_gate_step", d.cfg_gate_step)),
        "true_cfg_scale": pick("true_cfg_scale", d.true_cfg_scale),
    }
    prompt = row.get("prompt")
    problems = []
    if prompt is None:
        problems.append("prompt is null")
    elif not prompt.strip():
        problems.append("prompt is empty")
    for key in ("height", "width"):
        if v[key] <= 0 or v[key] % d.size_multiple:
            problems.append(f"{key} {v[key]} is not a positive multiple of {d.size_multiple}")
    if v["num_inference_steps"] < 1:
        problems.append(f"num_inference_steps {v['num_inference_steps']} must be >= 1")
    if not (math.isfinite(v["guidance_scale"]) and v["guidance_scale"] >= 0):
        problems.append(f"guidance_scale {v['guidance_scale']} must be a finite number >= 0")
    if not 0.0 <= v["cfg_gate_step"] <= 1.0:  # also false for NaN
        problems.append(f"cfg_gate_step {v['cfg_gate_step']} must be in [0, 1]")
    tcs = v["true_cfg_scale"]
    if row.get("true_cfg_scale") is not None and d.true_cfg_scale is None:
        problems.append("true_cfg_scale is set, but this model's pipeline has no true CFG (it uses guidance_scale)")
    elif tcs is not None and not (math.isfinite(tcs) and tcs >= 0):
        problems.append(f"true_cfg_scale {tcs} must be a finite number >= 0")
    if v["num_images"] < 1:
        problems.append(f"num_images {v['num_images']} must be >= 1")
    if row.get("seed") is not None and not 0 <= row["seed"] < SEED_LIMIT:
        problems.append(f"seed {row['seed']} must be in [0, 2**63)")
    v["image"] = None
    if d.image_input:
        v["image"], problem = image_ref(row.get("image"), d.image_root)
        if problem:
            problems.append(problem)
    return v, ("; ".join(problems) or None)


def plan_rows(table: pa.Table, first_row: int, defaults: GenerationDefaults) -> list[PlannedSample]:
    """Expand manifest rows into samples, one per image, in (row, image) order.

    Args:
        table: manifest rows; row i of the table is manifest row first_row + i.
        first_row: manifest index of the table's first row.
        defaults: job-level generation values.
    Returns:
        Samples; those with ``error`` set are not to be generated.
    """
    samples: list[PlannedSample] = []
    for i, row in enumerate(table.to_pylist()):
        row_index = first_row + i
        v, error = _check_row(row, defaults)
        count = v["num_images"] if v["num_images"] >= 1 else 1
        for image_index in range(count):
            sid = sample_id(row.get("id"), row_index, image_index)
            seed_ok = row.get("seed") is not None and 0 <= row["seed"] < SEED_LIMIT
            if seed_ok:
                seed = image_seed(row["seed"], image_index)
            else:
                seed = derive_seed(defaults.seed, sid)
            request = SampleRequest(
                sample_id=sid,
                prompt=row.get("prompt") or "",
                negative_prompt=row.get("negative_prompt") or "",
                seed=seed,
                height=v["height"],
                width=v["width"],
                num_inference_steps=v["num_inference_steps"],
                guidance_scale=v["guidance_scale"],
                true_cfg_scale=None if v["true_cfg_scale"] is None or defaults.true_cfg_scale is None
                else float(v["true_cfg_scale"]),
                cfg_gate_step=v["cfg_gate_step"],
                cfg_gate_steps=defaults.cfg_gate_steps,
                num_frames=defaults.num_frames,
                image=v["image"],
            )
            samples.append(PlannedSample(row_index, image_index, request, error))
    return samples
