"""Hugging Face ``datasets`` reads the samples parquet's media columns as Image, Video and Audio.

Decoding them through ``datasets`` needs torchcodec (datasets >= 4 decodes Audio and Video with
it), which gen does not depend on: the round trip reads the features, then the stored bytes with
decode=False, decoded here with PyAV and stdlib wave; a decode through ``datasets`` runs only
where torchcodec is installed.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from jobs.output.media import mp4_audio, mp4_frames, wav_audio
from jobs.output.schema import samples_schema, samples_table
from jobs.rows import plan_rows
from pipeline.samples import AudioVideo, SampleResult
from tests.unit.test_schema import DEFAULTS, MANIFEST_SCHEMA, _rows

datasets = pytest.importorskip("datasets")


def _write_audio_video(tmp_path: Path) -> tuple[Path, list[AudioVideo | None]]:
    rows = _rows()
    planned = plan_rows(rows, 0, replace(DEFAULTS, num_frames=3))
    rng = np.random.default_rng(0)
    outs = [
        AudioVideo(frames=rng.integers(0, 256, (3, 16, 24, 3), dtype=np.uint8),
                   audio=rng.uniform(-0.5, 0.5, (channels, 2400)).astype(np.float32),
                   sample_rate=24000, fps=24.0)
        if p.error is None else None
        for p, channels in zip(planned, (2, 2, 1))
    ]  # fmt: skip
    results = [SampleResult(p.request, image=o) if o is not None else None
               for p, o in zip(planned, outs)]  # fmt: skip
    table = samples_table(samples_schema(MANIFEST_SCHEMA, "audio_video"), planned, results, rows, 0)
    path = tmp_path / "shard-00000.parquet"
    pq.write_table(table, path)
    return path, outs


def _load(path: Path, tmp_path: Path):  # -> datasets.Dataset
    return datasets.load_dataset("parquet", data_files=str(path), split="train",
                                 cache_dir=str(tmp_path / "cache"))  # fmt: skip


def test_datasets_reads_audio_and_video_features(tmp_path: Path) -> None:
    path, outs = _write_audio_video(tmp_path)
    ds = _load(path, tmp_path)
    assert isinstance(ds.features["video"], datasets.Video)
    assert isinstance(ds.features["audio"], datasets.Audio)
    assert ds.features["fps"] == datasets.Value("float64")
    assert ds.features["sample_rate"] == datasets.Value("int64")
    assert ds["status"] == ["ok", "error", "ok"]
    assert ds["num_frames"] == [3, 3, 3] and ds["fps"] == [24.0, None, 24.0]
    raw = ds.cast_column("video", datasets.Video(decode=False))
    raw = raw.cast_column("audio", datasets.Audio(decode=False))
    for row, out in zip(raw, outs):
        if out is None:
            assert row["video"] is None and row["audio"] is None
            continue
        assert row["audio"]["path"].endswith(".wav") and row["video"]["path"].endswith(".mp4")
        wav, rate = wav_audio(row["audio"]["bytes"])
        assert rate == 24000 and np.abs(wav - out.audio).max() <= 0.5 / 32767 + 1e-7
        assert mp4_frames(row["video"]["bytes"]).shape == out.frames.shape
        assert mp4_audio(row["video"]["bytes"])[0].shape == out.audio.shape


def test_datasets_decodes_audio_and_video(tmp_path: Path) -> None:
    pytest.importorskip("torchcodec", reason="datasets decodes Audio and Video with torchcodec")
    path, outs = _write_audio_video(tmp_path)
    ds = _load(path, tmp_path)
    for i in (0, 2):  # stereo, mono; datasets' "array" is the channels' mean, shape (S,)
        audio = ds[i]["audio"]
        assert audio["sampling_rate"] == 24000
        assert np.abs(np.asarray(audio["array"]) - outs[i].audio.mean(axis=0)).max() < 1e-3
        assert len(ds[i]["video"]) == 3
