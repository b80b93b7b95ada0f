"""The samples and steps tables: columns, HF metadata, rows for results and errors."""

from __future__ import annotations

import io
import json
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from jobs.output.media import mp4_audio, mp4_bytes, mp4_frames, wav_audio
from jobs.output.schema import IMAGE_TYPE, STEPS_SCHEMA, samples_schema, samples_table, steps_table
from jobs.rows import GenerationDefaults, PlannedSample, plan_rows
from pipeline.denoiser import StepRecord
from pipeline.generate import SampleRequest, SampleResult
from pipeline.samples import AudioVideo

MANIFEST_SCHEMA = pa.schema(
    [("prompt", pa.string()), ("id", pa.string()), ("category", pa.string()), ("seed", pa.int32())]
)
DEFAULTS = GenerationDefaults(
    height=16, width=24, num_inference_steps=3, guidance_scale=5.0,
    images_per_prompt=1, seed=0, size_multiple=8,
)  # fmt: skip


def _rows() -> pa.Table:
    return pa.table(
        {
            "prompt": ["a cat", None, "a dog"],
            "id": ["cat", "bad", "dog"],
            "category": ["animal", "none", "pet"],
            "seed": pa.array([5, None, None], pa.int32()),
        },
        schema=MANIFEST_SCHEMA,
    )


def _steps(*unconds: str) -> list[StepRecord]:
    return [
        StepRecord(i, 900.0 - 100 * i, "unet", u, 0.01 * (i + 1),
                   (("uncond", 0), ("cond", 1)) if u == "fresh" else (("cond", 0),),
                   branch_states=(("uncond", u),))
        for i, u in enumerate(unconds)
    ]  # fmt: skip


def _image(p: PlannedSample, color: tuple[int, int, int] = (10, 20, 30)) -> Image.Image:
    return Image.new("RGB", (p.request.width, p.request.height), color)


def test_samples_schema_columns() -> None:
    schema = samples_schema(MANIFEST_SCHEMA)
    assert schema.names[:3] == ["sample_id", "row_index", "image_index"]
    assert schema.names[3:6] == ["prompt", "id", "category"]
    assert schema.names.count("seed") == 1
    assert schema.field("seed").type == pa.int64()
    assert schema.field("prompt").type == pa.string()
    assert schema.field("image").type == IMAGE_TYPE
    assert schema.field("image").type == pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    for name in ("status", "error", "width", "height", "num_inference_steps", "guidance_scale",
                 "fresh_uncond", "reused_uncond", "invalidations", "denoise_s"):  # fmt: skip
        assert name in schema.names
    assert len(set(schema.names)) == len(schema.names)


def test_samples_schema_resolved_overrides_not_duplicated() -> None:
    manifest = pa.schema(
        [("width", pa.int32()), ("prompt", pa.string()), ("height", pa.int16()),
         ("guidance_scale", pa.float32()), ("num_inference_steps", pa.int8()), ("extra", pa.bool_())]
    )  # fmt: skip
    schema = samples_schema(manifest)
    for name in ("width", "height", "guidance_scale", "num_inference_steps", "seed"):
        assert schema.names.count(name) == 1
    assert schema.field("width").type == pa.int64()
    assert schema.field("guidance_scale").type == pa.float64()
    assert schema.names[3:5] == ["prompt", "extra"]


def test_hf_metadata() -> None:
    schema = samples_schema(MANIFEST_SCHEMA)
    meta = json.loads(schema.metadata[b"huggingface"])
    features = meta["info"]["features"]
    assert features["image"] == {"_type": "Image"}
    assert set(features) == set(schema.names)
    assert list(features) == schema.names
    assert features["prompt"] == {"dtype": "string", "_type": "Value"}
    assert features["row_index"] == {"dtype": "int64", "_type": "Value"}
    assert features["guidance_scale"] == {"dtype": "float64", "_type": "Value"}


def test_samples_table_ok_and_error_rows() -> None:
    rows = _rows()
    planned = plan_rows(rows, 10, DEFAULTS)
    assert [p.error is None for p in planned] == [True, False, True]
    schema = samples_schema(MANIFEST_SCHEMA)
    results = [
        SampleResult(planned[0].request, image=_image(planned[0]),
                     steps=_steps("fresh", "fresh", "reused"), denoise_s=1.5),
        None,
        SampleResult(planned[2].request, image=_image(planned[2], (200, 0, 0)),
                     steps=_steps("none", "none", "none"), denoise_s=1.5),
    ]  # fmt: skip
    table = samples_table(schema, planned, results, rows, 10)
    assert table.schema == schema
    assert table.schema.metadata == schema.metadata
    t = table.to_pylist()
    assert [r["sample_id"] for r in t] == ["cat-0", "bad-0", "dog-0"]
    assert [r["row_index"] for r in t] == [10, 11, 12]
    assert [r["image_index"] for r in t] == [0, 0, 0]
    assert [r["status"] for r in t] == ["ok", "error", "ok"]
    assert [r["prompt"] for r in t] == ["a cat", None, "a dog"]
    assert [r["category"] for r in t] == ["animal", "none", "pet"]
    assert t[0]["seed"] == 5
    assert t[2]["seed"] == planned[2].request.seed
    assert [r["fresh_uncond"] for r in t] == [2, 0, 0]
    assert [r["reused_uncond"] for r in t] == [1, 0, 0]
    assert [r["denoise_s"] for r in t] == [1.5, 0.0, 1.5]
    assert [(r["width"], r["height"], r["num_inference_steps"]) for r in t] == [(24, 16, 3)] * 3
    assert [r["guidance_scale"] for r in t] == [5.0] * 3

    ok = t[0]
    assert ok["error"] is None
    assert ok["image"]["path"] == "cat-0.png"
    img = Image.open(io.BytesIO(ok["image"]["bytes"]))
    assert img.format == "PNG"
    assert img.size == (24, 16)
    assert img.convert("RGB").getpixel((3, 5)) == (10, 20, 30)
    assert Image.open(io.BytesIO(t[2]["image"]["bytes"])).convert("RGB").getpixel((0, 0)) == (
        200,
        0,
        0,
    )

    bad = t[1]
    assert bad["image"] is None
    assert bad["error"] is not None and "prompt" in bad["error"]
    assert bad["error"] == planned[1].error


def test_samples_table_generation_error() -> None:
    rows = _rows().slice(0, 1)
    planned = plan_rows(rows, 0, DEFAULTS)
    schema = samples_schema(MANIFEST_SCHEMA)
    failed = SampleResult(planned[0].request, error="non-finite latents after denoising",
                          steps=_steps("fresh"))  # fmt: skip
    (row,) = samples_table(schema, planned, [failed], rows, 0).to_pylist()
    assert row["status"] == "error"
    assert row["image"] is None
    assert row["error"] == "non-finite latents after denoising"


def test_samples_table_subset_of_rows() -> None:
    """Planned samples may be any subset of the manifest rows given (a rank's share)."""
    rows = _rows()
    planned = [p for p in plan_rows(rows, 0, DEFAULTS) if p.error is None][::-1]
    schema = samples_schema(MANIFEST_SCHEMA)
    results = [SampleResult(p.request, image=_image(p)) for p in planned]
    t = samples_table(schema, planned, results, rows, 0).to_pylist()
    assert [(r["sample_id"], r["prompt"], r["category"]) for r in t] == [
        ("dog-0", "a dog", "pet"), ("cat-0", "a cat", "animal"),
    ]  # fmt: skip


def _request(sid: str) -> SampleRequest:
    return SampleRequest(sample_id=sid, prompt="p", negative_prompt="", seed=1, height=8,
                         width=8, num_inference_steps=2, guidance_scale=5.0)  # fmt: skip


def test_steps_table() -> None:
    ok = SampleResult(
        _request("a-0"), image=Image.new("RGB", (8, 8)), steps=_steps("fresh", "fresh")
    )
    ok2 = SampleResult(_request("b-0"), image=Image.new("RGB", (8, 8)), steps=_steps("none"))
    failed = SampleResult(_request("c-0"), error="boom", steps=_steps("fresh", "fresh"))
    table = steps_table([ok, failed, ok2])
    assert table.schema == STEPS_SCHEMA
    both = [{"name": "uncond", "cfg_rank": 0}, {"name": "cond", "cfg_rank": 1}]
    assert table.to_pylist() == [
        {"sample_id": "a-0", "step_index": 0, "timestep": 900.0, "denoiser": "unet",
         "uncond": "fresh", "step_s": pytest.approx(0.01), "branches": both,
         "branch_states": [{"name": "uncond", "state": "fresh"}]},
        {"sample_id": "a-0", "step_index": 1, "timestep": 800.0, "denoiser": "unet",
         "uncond": "fresh", "step_s": pytest.approx(0.02), "branches": both,
         "branch_states": [{"name": "uncond", "state": "fresh"}]},
        {"sample_id": "b-0", "step_index": 0, "timestep": 900.0, "denoiser": "unet",
         "uncond": "none", "step_s": pytest.approx(0.01),
         "branches": [{"name": "cond", "cfg_rank": 0}], "branch_states": [{"name": "uncond", "state": "none"}]},
    ]  # fmt: skip


def test_steps_table_empty() -> None:
    failed = SampleResult(_request("c-0"), error="boom", steps=_steps("fresh"))
    table = steps_table([failed])
    assert table.num_rows == 0
    assert table.schema == STEPS_SCHEMA


# --- audio-video models (LTX-2): video mp4 with sound, audio WAV -----------------------------

AV_TAIL = ["seed", "status", "error", "warning", "video", "audio", "width", "height", "num_frames",
           "fps", "sample_rate", "audio_s", "num_inference_steps", "guidance_scale",
           "true_cfg_scale", "cfg_gate_step", "fresh_uncond", "reused_uncond", "branch_counts", "invalidations",
           "gate_step", "denoise_s", "forward_batch"]  # fmt: skip


AV_DEFAULTS = replace(DEFAULTS, num_frames=3)


def _audio_video(p: PlannedSample, channels: int = 2, num_samples: int = 3000) -> AudioVideo:
    rng = np.random.default_rng(p.row_index)
    frames = rng.integers(0, 256, (3, p.request.height, p.request.width, 3), dtype=np.uint8)
    audio = rng.uniform(-0.5, 0.5, (channels, num_samples)).astype(np.float32)
    return AudioVideo(frames=frames, audio=audio, sample_rate=24000, fps=24.0)


def test_audio_video_schema_columns() -> None:
    schema = samples_schema(MANIFEST_SCHEMA, "audio_video")
    assert schema.names == ["sample_id", "row_index", "image_index", "prompt", "id", "category",
                            *AV_TAIL]  # fmt: skip
    for name in ("video", "audio"):
        assert schema.field(name).type == IMAGE_TYPE
    types = {
        name: schema.field(name).type for name in ("num_frames", "fps", "sample_rate", "audio_s")
    }
    assert types == {"num_frames": pa.int64(), "fps": pa.float64(), "sample_rate": pa.int64(),
                     "audio_s": pa.float64()}  # fmt: skip
    features = json.loads(schema.metadata[b"huggingface"])["info"]["features"]
    assert list(features) == schema.names
    assert features["video"] == {"_type": "Video"}
    assert features["audio"] == {"_type": "Audio"}
    assert features["fps"] == {"dtype": "float64", "_type": "Value"}
    assert features["sample_rate"] == {"dtype": "int64", "_type": "Value"}


def test_video_schema_unchanged_by_audio_video() -> None:
    names = samples_schema(MANIFEST_SCHEMA, "video").names
    assert names[6:] == [n for n in AV_TAIL if n not in ("audio", "fps", "sample_rate", "audio_s")]


def test_unknown_media_is_rejected() -> None:
    with pytest.raises(ValueError, match="'image', 'video', 'audio_video'"):
        samples_schema(MANIFEST_SCHEMA, "audio")


@pytest.mark.parametrize(("media", "column"), [("audio_video", "audio"), ("audio_video", "fps"),
                                               ("video", "video")])  # fmt: skip
def test_manifest_column_clashing_with_media_column(media: str, column: str) -> None:
    manifest = pa.schema([("prompt", pa.string()), (column, pa.string())])
    with pytest.raises(ValueError, match=f"column\\(s\\) {column} clash"):
        samples_schema(manifest, media)


def test_other_kinds_pass_an_audio_column_through() -> None:
    """Only the media kind's own columns are media features; a manifest's ``audio`` text stays."""
    manifest = pa.schema([("prompt", pa.string()), ("audio", pa.string())])
    rows = pa.table({"prompt": ["a cat"], "audio": ["purring"]}, schema=manifest)
    schema = samples_schema(manifest, "image")
    features = json.loads(schema.metadata[b"huggingface"])["info"]["features"]
    assert features["audio"] == {"dtype": "string", "_type": "Value"}
    planned = plan_rows(rows, 0, DEFAULTS)
    (row,) = samples_table(schema, planned, [SampleResult(planned[0].request,
                           image=_image(planned[0]))], rows, 0).to_pylist()  # fmt: skip
    assert row["audio"] == "purring" and row["status"] == "ok"


def test_samples_table_audio_video_rows() -> None:
    rows = _rows()
    planned = plan_rows(rows, 0, AV_DEFAULTS)
    schema = samples_schema(MANIFEST_SCHEMA, "audio_video")
    outs = [_audio_video(planned[0], channels=2), None, _audio_video(planned[2], channels=1)]
    results = [SampleResult(p.request, image=o) if o is not None else None
               for p, o in zip(planned, outs)]  # fmt: skip
    table = samples_table(schema, planned, results, rows, 0)
    assert table.schema == schema and table.schema.metadata == schema.metadata
    t = table.to_pylist()
    assert [r["status"] for r in t] == ["ok", "error", "ok"]
    for row, out, channels in ((t[0], outs[0], 2), (t[2], outs[2], 1)):
        sid = row["sample_id"]
        assert row["video"]["path"] == f"{sid}.mp4" and row["audio"]["path"] == f"{sid}.wav"
        assert (row["num_frames"], row["fps"], row["sample_rate"]) == (3, 24.0, 24000)
        assert row["audio_s"] == pytest.approx(3000 / 24000)
        mp4 = row["video"]["bytes"]
        assert mp4 == mp4_bytes(out.frames, 24.0, audio=out.audio, sample_rate=24000)
        assert mp4_frames(mp4).shape == (3, 16, 24, 3)
        sound, rate = mp4_audio(mp4)
        assert sound.shape == (channels, 3000) and rate == 24000
        wav, rate = wav_audio(row["audio"]["bytes"])
        assert rate == 24000 and np.abs(wav - out.audio).max() <= 0.5 / 32767 + 1e-7
    bad = t[1]
    assert bad["error"] == planned[1].error
    assert [bad[n] for n in ("video", "audio", "fps", "sample_rate", "audio_s")] == [None] * 5


def test_samples_table_audio_video_generation_error() -> None:
    rows = _rows().slice(0, 1)
    planned = plan_rows(rows, 0, AV_DEFAULTS)
    schema = samples_schema(MANIFEST_SCHEMA, "audio_video")
    failed = SampleResult(planned[0].request, error="non-finite latents after denoising")
    (row,) = samples_table(schema, planned, [failed], rows, 0).to_pylist()
    assert row["status"] == "error" and row["error"] == "non-finite latents after denoising"
    assert [row[n] for n in ("video", "audio", "fps", "sample_rate", "audio_s")] == [None] * 5
    assert row["num_frames"] == 3  # the request's, as for video


@pytest.mark.parametrize("stored", ["struct", "string"])
def test_video_samples_pass_an_input_image_column_through(stored: str) -> None:
    """A video model's input ``image`` column is a passthrough column beside ``video``: an Image
    feature when stored as datasets stores one, a string otherwise; its cells are the manifest's."""
    import numpy as np

    cells = (
        [{"bytes": b"\x89PNG-a", "path": "a.png"}, None]
        if stored == "struct"
        else ["imgs/a.png", None]
    )
    rows = pa.table({"prompt": ["a cat", "a dog"],
                     "image": pa.array(cells, IMAGE_TYPE if stored == "struct" else pa.string())})  # fmt: skip
    schema = samples_schema(rows.schema, "video")
    assert schema.names.count("image") == 1 and "video" in schema.names
    features = json.loads(schema.metadata[b"huggingface"])["info"]["features"]
    assert features["video"] == {"_type": "Video"}
    assert features["image"] == (
        {"_type": "Image"} if stored == "struct" else {"dtype": "string", "_type": "Value"}
    )
    defaults = GenerationDefaults(**{**DEFAULTS.__dict__, "num_frames": 1, "height": 16, "width": 16,
                                     "image_input": True, "image_root": "/m"})  # fmt: skip
    planned = plan_rows(rows, 0, defaults)
    assert planned[0].error is None and planned[1].error is not None  # no image: an error row
    frames = np.zeros((1, 16, 16, 3), np.uint8)
    table = samples_table(
        schema, planned, [SampleResult(planned[0].request, image=frames), None], rows, 0
    )
    assert table.column("image").to_pylist() == cells
    assert table.column("status").to_pylist() == ["ok", "error"]
    assert table.column("video").to_pylist()[0]["path"] == f"{planned[0].request.sample_id}.mp4"
