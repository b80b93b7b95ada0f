"""The public output tables: samples (one row per image) and steps (one row per sample per step).

Media are struct<bytes: binary, path: string>: ``image`` PNGs; for video models ``video`` mp4s;
for audio-video models (LTX-2) ``video`` mp4s with the sound muxed in and ``audio`` WAVs. The
schema carries Hugging Face ``datasets`` feature metadata so that ``load_dataset("parquet", ...)``
reads them as Image, Video and Audio features.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence

import pyarrow as pa

from jobs.output.media import mp4_bytes, wav_bytes
from jobs.rows import PlannedSample
from pipeline.samples import AudioVideo, SampleResult

IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
BRANCH_COUNTS_TYPE = pa.list_(pa.struct([("name", pa.string()), ("fresh", pa.int64()), ("reused", pa.int64()),
                                         ("gate_step", pa.int64()), ("invalidations", pa.int64())]))  # fmt: skip
"""Per auxiliary branch of a sample (uncond, stg, modality, cond_skip): its fresh and reused
steps, its first reused step (null if none) and its dropped deltas."""
BRANCH_COUNTS_FEATURE = {"feature": {"name": {"dtype": "string", "_type": "Value"},
                                     **{k: {"dtype": "int64", "_type": "Value"}
                                        for k in ("fresh", "reused", "gate_step", "invalidations")}},
                         "_type": "List"}  # fmt: skip
"""Storage of every media column (image, video, audio): datasets' Image / Video / Audio struct."""

MEDIA_KINDS = ("image", "video", "audio_video")
"""What a family's decode gives per sample (its ``output_kind``): a PIL image, (F, H, W, 3)
frames, or an AudioVideo."""

VIDEO_KINDS = ("video", "audio_video")
"""Media kinds with frames (and so ``num_frames``)."""

_FEATURES = {"image": {"_type": "Image"}, "video": {"_type": "Video"}, "audio": {"_type": "Audio"},
             "branch_counts": BRANCH_COUNTS_FEATURE}  # fmt: skip

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
    ("branch_counts", BRANCH_COUNTS_TYPE),
    ("invalidations", pa.int64()),
    ("gate_step", pa.int64()),
    ("denoise_s", pa.float64()),
    ("forward_batch", pa.int64()),
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
        # Per auxiliary branch of the family: "fresh", "reused" or "none" (not run this step).
        ("branch_states", pa.list_(pa.struct([("name", pa.string()), ("state", pa.string())]))),
    ]
)


def _hf_feature(t: pa.DataType) -> dict[str, str] | None:
    if pa.types.is_dictionary(t):  # a categorical passthrough column: its values' feature
        return _hf_feature(t.value_type)
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
    """The contract columns after the manifest's: media columns where ``image`` is, and the
    video kinds' counts between ``height`` and ``num_inference_steps``."""
    if media == "image":
        return _TAIL
    if media not in MEDIA_KINDS:
        raise ValueError(f"media {media!r} is not one of {', '.join(map(repr, MEDIA_KINDS))}")
    if media == "video":
        columns, counts = [("video", IMAGE_TYPE)], [("num_frames", pa.int64())]
    else:
        columns = [("video", IMAGE_TYPE), ("audio", IMAGE_TYPE)]
        counts = [("num_frames", pa.int64()), ("fps", pa.float64()),
                  ("sample_rate", pa.int64()), ("audio_s", pa.float64())]  # fmt: skip
    at = [name for name, _ in _TAIL].index("image")
    tail = [*_TAIL[:at], *columns, *_TAIL[at + 1 :]]
    at = [name for name, _ in tail].index("num_inference_steps")
    return [*tail[:at], *counts, *tail[at:]]


def _media(schema: pa.Schema) -> str:
    """The media kind whose contract columns end ``schema`` (a samples_schema)."""
    for media in MEDIA_KINDS:
        names = [name for name, _ in _tail(media)]
        if schema.names[-len(names) :] == names:
            return media
    raise ValueError("not a samples schema: its last columns are no media kind's")


def samples_schema(manifest_schema: pa.Schema, media: str = "image") -> pa.Schema:
    """Schema of the samples parquet for a manifest: contract columns + passthrough columns.

    Manifest columns keep their type and order, between ``image_index`` and ``seed``; the
    override columns in RESOLVED_COLUMNS are replaced by the resolved values at the end.

    Args:
        manifest_schema: the manifest's schema.
        media: one of MEDIA_KINDS: "image" (an ``image`` column, PNG), "video" (a ``video``
            column, mp4, and ``num_frames``) or "audio_video" (``video``, mp4 with an AAC
            track; ``audio``, 16-bit PCM WAV; ``num_frames``, ``fps``, ``sample_rate``,
            ``audio_s``).
    Raises:
        ValueError: an unknown media kind, or a manifest column named like one of the media
            kind's own columns (e.g. ``video`` or ``audio``).
    """
    tail = _tail(media)
    passthrough = [f for f in manifest_schema if f.name not in RESOLVED_COLUMNS]
    clash = sorted({f.name for f in passthrough} & {name for name, _ in [*_HEAD, *tail]})
    if clash:
        raise ValueError(f"manifest column(s) {', '.join(clash)} clash with {media} output "
                         "columns of the same name; rename them")  # fmt: skip
    schema = pa.schema([*_HEAD, *passthrough, *tail])
    features: dict[str, dict[str, str]] = {}
    kinds = {name: _FEATURES[name] for name, _ in tail if name in _FEATURES}
    for f in schema:
        feature = kinds.get(f.name)
        if feature is None and f.name == "image" and f.type == IMAGE_TYPE:
            feature = _FEATURES["image"]  # an input image passed through (video models)
        feature = feature or _hf_feature(f.type)
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

    An ok result's ``image`` is what the schema's media kind holds (see MEDIA_KINDS). For
    "audio_video", ``num_frames`` is the AudioVideo's frame count (the request's on error
    rows, as for "video"); ``fps``, ``sample_rate`` and ``audio_s`` are the AudioVideo's,
    null on error rows.

    Args:
        schema: from samples_schema.
        planned: the samples, in output order.
        results: one per planned sample; None where the sample was never generated (its
            ``error`` is set).
        manifest_rows: manifest rows that include every planned row.
        first_row: manifest index of manifest_rows' first row.
    Raises:
        ValueError: an ok result's media is not valid for mp4_bytes / wav_bytes (e.g. an
            audio sample rate that AAC lacks).
    """
    media = _media(schema)
    contract = {name for name, _ in (*_HEAD, *_tail(media))}
    taken = manifest_rows.take([p.row_index - first_row for p in planned])
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
        if media == "audio_video":
            _audio_video(cols, req.sample_id, r.image if ok else None, req.num_frames)
        elif media == "video":
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
        cols["branch_counts"].append(branch_counts(r) if r is not None else [])
        cols["invalidations"].append(r.invalidations if r is not None else 0)
        cols["gate_step"].append(r.gate_step if r is not None else None)
        cols["denoise_s"].append(r.denoise_s if r is not None else 0.0)
        cols["forward_batch"].append(r.forward_batch if r is not None else None)
    arrays = [
        pa.array(cols[f.name], type=f.type)
        if f.name in contract
        else taken.column(f.name).combine_chunks()
        for f in schema
    ]
    return pa.Table.from_arrays(arrays, schema=schema)


def branch_counts(result: SampleResult) -> list[dict]:
    """The ``branch_counts`` entries of a sample: each auxiliary branch that ran at least once,
    in the family's branch order."""
    gates = {name: (first, drops) for name, first, drops in result.branch_gates}
    out = []
    names = dict.fromkeys(n for s in result.steps for n, _ in s.branch_states)
    for name in names:
        states = [st for s in result.steps for n, st in s.branch_states if n == name]
        fresh, reused = states.count("fresh"), states.count("reused")
        if fresh or reused:
            first, drops = gates.get(name, (None, 0))
            out.append({"name": name, "fresh": fresh, "reused": reused, "gate_step": first, "invalidations": drops})
    return out


def _audio_video(cols: dict[str, list], sample_id: str, out: AudioVideo | None,
                 num_frames: int | None) -> None:  # fmt: skip
    """Append one row's audio-video columns: ``out`` is the ok sample's, None on error rows."""
    if out is None:
        for name in ("video", "audio", "fps", "sample_rate", "audio_s"):
            cols[name].append(None)
        cols["num_frames"].append(num_frames)
        return
    video = mp4_bytes(out.frames, out.fps, audio=out.audio, sample_rate=out.sample_rate)
    cols["video"].append({"bytes": video, "path": f"{sample_id}.mp4"})
    cols["audio"].append({"bytes": wav_bytes(out.audio, out.sample_rate),
                          "path": f"{sample_id}.wav"})  # fmt: skip
    cols["num_frames"].append(len(out.frames))
    cols["fps"].append(float(out.fps))
    cols["sample_rate"].append(int(out.sample_rate))
    cols["audio_s"].append(float(out.audio_s))


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
            "branch_states": [{"name": n, "state": st} for n, st in s.branch_states],
        }
        for r in results
        if r.image is not None
        for s in r.steps
    ]
    return pa.Table.from_pylist(rows, schema=STEPS_SCHEMA)
