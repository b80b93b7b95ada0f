"""The public output tables: samples (one row per image) and steps (one row per sample per step).

Images are struct<bytes: binary, path: string> PNGs, and the schema carries Hugging Face
``datasets`` feature metadata so that ``load_dataset("parquet", ...)`` reads ``image`` as an
Image feature.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence

import pyarrow as pa

from jobs.output.media import mp4_bytes
from jobs.rows import PlannedSample
from pipeline.samples import SampleResult

IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])

RESOLVED_COLUMNS = ("seed", "width", "height", "num_inference_steps", "guidance_scale", "true_cfg_scale",
                    "cfg_gate_step", "num_frames")  # fmt: skip
"""Manifest override columns replaced in the output by the values actually used."""

_HEAD = [("sample_id", pa.string()), ("row_index", pa.int64()), ("image_index", pa.int64())]
_TAIL = [
    ("seed", pa.int64()),
    ("status", pa.string()),
    ("error", pa.string()),
    ("warning", pa.string()),
    ("image", IMAGE_TYPE),
    ("width", pa.int64()),
    ("height", pa.int64()),
    ("num_inference_steps", pa.int64()),
    ("guidance_scale", pa.float64()),
    ("true_cfg_scale", pa.float64()),
    ("cfg_gate_step", pa.float64()),
    ("fresh_uncond", pa.int64()),
    ("reused_uncond", pa.int64()),
    ("invalidations", pa.int64()),
    ("gate_step", pa.int64()),
    ("denoise_s", pa.float64()),
]

STEPS_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("step_index", pa.int64()),
        ("timestep", pa.float64()),
        ("denoiser", pa.string()),
        ("uncond", pa.string()),
        ("step_s", pa.float64()),
        # CFG layout: which rank of the sample's CFG group ran each branch, in branch order.
        ("branches", pa.list_(pa.struct([("name", pa.string()), ("cfg_rank", pa.int32())]))),
    ]
)


def _hf_feature(t: pa.DataType) -> dict[str, str] | None:
    if pa.types.is_large_string(t):
        return {"dtype": "large_string", "_type": "Value"}
    if pa.types.is_string(t):
        return {"dtype": "string", "_type": "Value"}
    if pa.types.is_boolean(t):
        return {"dtype": "bool", "_type": "Value"}
    if pa.types.is_integer(t):
        return {"dtype": str(t), "_type": "Value"}
    if pa.types.is_floating(t):
        names = {"halffloat": "float16", "float": "float32", "double": "float64"}
        return {"dtype": names[str(t)], "_type": "Value"}
    if pa.types.is_binary(t):
        return {"dtype": "binary", "_type": "Value"}
    return None


def _tail(media: str) -> list[tuple[str, pa.DataType]]:
    if media == "image":
        return _TAIL
    if media != "video":
        raise ValueError(f"media {media!r} is not 'image' or 'video'")
    tail = [("video", IMAGE_TYPE) if name == "image" else (name, t) for name, t in _TAIL]
    at = [name for name, _ in tail].index("num_inference_steps")
    return [*tail[:at], ("num_frames", pa.int64()), *tail[at:]]


_CONTRACT = {media: {name for name, _ in (*_HEAD, *_tail(media))} for media in ("image", "video")}
"""Per media kind, the columns samples_table fills itself; the rest come from the manifest (a
video model's input ``image`` among them)."""


def samples_schema(manifest_schema: pa.Schema, media: str = "image") -> pa.Schema:
    """Schema of the samples parquet for a manifest: contract columns + passthrough columns.

    Manifest columns keep their type and order, between ``image_index`` and ``seed``; the
    override columns in RESOLVED_COLUMNS are replaced by the resolved values at the end.

    Args:
        manifest_schema: the manifest's schema.
        media: "image" (an ``image`` column, PNG) or "video" (a ``video`` column, mp4, and
            ``num_frames``).
    Raises:
        ValueError: an unknown media kind.
    """
    passthrough = [f for f in manifest_schema if f.name not in RESOLVED_COLUMNS]
    schema = pa.schema([*_HEAD, *passthrough, *_tail(media)])
    features: dict[str, dict[str, str]] = {}
    kinds = {"image": {"_type": "Image"}, "video": {"_type": "Video"}}
    for f in schema:
        # An input image passed through (video models) is an Image feature when stored as one.
        media_column = f.name == media or (f.name in kinds and f.type == IMAGE_TYPE)
        feature = (kinds[f.name] if media_column else None) or _hf_feature(f.type)
        if feature is None:  # nested passthrough: let datasets infer everything
            return schema
        features[f.name] = feature
    meta = {"info": {"features": features}}
    return schema.with_metadata({b"huggingface": json.dumps(meta).encode()})


def png_bytes(image) -> bytes:  # image: PIL.Image.Image
    """Encode a PIL image as PNG (deterministic bytes for the same pixels)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def samples_table(
    schema: pa.Schema,
    planned: Sequence[PlannedSample],
    results: Sequence[SampleResult | None],
    manifest_rows: pa.Table,
    first_row: int,
) -> pa.Table:
    """Samples rows for planned samples and their results.

    Args:
        schema: from samples_schema.
        planned: the samples, in output order.
        results: one per planned sample; None where the sample was never generated (its
            ``error`` is set).
        manifest_rows: manifest rows that include every planned row.
        first_row: manifest index of manifest_rows' first row.
    """
    taken = manifest_rows.take([p.row_index - first_row for p in planned])
    contract = _CONTRACT["video" if "video" in schema.names else "image"]
    cols: dict[str, list] = {name: [] for name in schema.names if name in contract}
    for p, r in zip(planned, results):
        req = p.request
        ok = p.error is None and r is not None and r.error is None and r.image is not None
        error = None if ok else (p.error or (r.error if r is not None else None) or "no image")
        cols["sample_id"].append(req.sample_id)
        cols["row_index"].append(p.row_index)
        cols["image_index"].append(p.image_index)
        cols["seed"].append(req.seed)
        cols["status"].append("ok" if ok else "error")
        cols["error"].append(None if ok else error)
        cols["warning"].append(r.warning if r is not None else None)
        if "video" in cols:
            cols["video"].append(
                {"bytes": mp4_bytes(r.image), "path": f"{req.sample_id}.mp4"} if ok else None
            )
            cols["num_frames"].append(req.num_frames)
        else:
            cols["image"].append(
                {"bytes": png_bytes(r.image), "path": f"{req.sample_id}.png"} if ok else None
            )
        cols["width"].append(req.width)
        cols["height"].append(req.height)
        cols["num_inference_steps"].append(req.num_inference_steps)
        cols["guidance_scale"].append(req.guidance_scale)
        cols["true_cfg_scale"].append(req.true_cfg_scale)
        cols["cfg_gate_step"].append(req.cfg_gate_step)
        steps = r.steps if r is not None else []
        cols["fresh_uncond"].append(sum(s.uncond == "fresh" for s in steps))
        cols["reused_uncond"].append(sum(s.uncond == "reused" for s in steps))
        cols["invalidations"].append(r.invalidations if r is not None else 0)
        cols["gate_step"].append(r.gate_step if r is not None else None)
        cols["denoise_s"].append(r.denoise_s if r is not None else 0.0)
    arrays = [
        pa.array(cols[f.name], type=f.type)
        if f.name in contract
        else taken.column(f.name).combine_chunks()
        for f in schema
    ]
    return pa.Table.from_arrays(arrays, schema=schema)


def steps_table(results: Sequence[SampleResult]) -> pa.Table:
    """Steps rows: one per sample per denoiser step, in (sample, step) order."""
    rows = [
        {
            "sample_id": r.request.sample_id,
            "step_index": s.step_index,
            "timestep": s.timestep,
            "denoiser": s.denoiser,
            "uncond": s.uncond,
            "step_s": s.step_s,
            "branches": [{"name": n, "cfg_rank": k} for n, k in s.branches],
        }
        for r in results
        if r.image is not None
        for s in r.steps
    ]
    return pa.Table.from_pylist(rows, schema=STEPS_SCHEMA)
