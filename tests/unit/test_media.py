"""mp4 encoding of generated frames (PyAV, H.264 / yuv420p, AAC sound) and WAV sound."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import wave
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from jobs.output.media import (
    mp4_audio,
    mp4_bytes,
    mp4_frame_count,
    mp4_frames,
    wav_audio,
    wav_bytes,
)


def _frames(num_frames: int, height: int, width: int) -> np.ndarray:
    """Smooth moving gradients: what a lossy codec keeps close."""
    y, x = np.mgrid[0:height, 0:width]
    frames = [np.stack([(x * 255 // max(width - 1, 1) + 8 * t) % 256,
                        np.broadcast_to(y * 255 // max(height - 1, 1), (height, width)),
                        np.full((height, width), 40 * t % 256)], axis=-1)
              for t in range(num_frames)]  # fmt: skip
    return np.stack(frames).astype(np.uint8)


@pytest.mark.parametrize("num_frames", [1, 5, 9])
def test_round_trip_keeps_frames_and_size(num_frames: int) -> None:
    frames = _frames(num_frames, 32, 48)
    data = mp4_bytes(frames)
    assert data[4:8] == b"ftyp"  # an ISO base media (mp4) file
    assert mp4_frame_count(data) == num_frames
    back = mp4_frames(data)
    assert back.shape == frames.shape and back.dtype == np.uint8
    assert np.abs(back.astype(np.int16) - frames).mean() < 4  # lossy, but close


def test_same_frames_same_bytes() -> None:
    frames = _frames(5, 64, 64)
    assert mp4_bytes(frames) == mp4_bytes(frames.copy())
    assert mp4_bytes(frames) != mp4_bytes(frames[::-1].copy())


@pytest.mark.parametrize(("height", "width"), [(33, 48), (32, 47), (17, 33)])
def test_odd_sizes_are_padded_to_even(height: int, width: int) -> None:
    frames = _frames(5, height, width)
    back = mp4_frames(mp4_bytes(frames))
    assert back.shape == (5, height + height % 2, width + width % 2, 3)
    diff = np.abs(back[:, :height, :width].astype(np.int16) - frames)
    assert diff.mean() < 6


def test_fps_is_recorded() -> None:
    with av.open(io.BytesIO(mp4_bytes(_frames(3, 16, 16), fps=24))) as container:
        assert container.streams.video[0].average_rate == 24


@pytest.mark.parametrize(
    "frames",
    [
        np.zeros((0, 16, 16, 3), np.uint8),
        np.zeros((2, 16, 16), np.uint8),
        np.zeros((2, 16, 16, 3), np.float32),
    ],
)
def test_bad_frames_are_rejected(frames: np.ndarray) -> None:
    with pytest.raises(ValueError, match="uint8"):
        mp4_bytes(frames)


# --- sound: mp4 with an AAC track, WAV ------------------------------------------------------


def _tone(channels: int, num_samples: int, sample_rate: int) -> np.ndarray:
    """(C, S) float32 sines, a different pitch per channel, amplitude 0.5."""
    t = np.arange(num_samples) / sample_rate
    return np.stack(
        [0.5 * np.sin(2 * np.pi * (440 + 220 * c) * t) for c in range(channels)]
    ).astype(np.float32)


def _streams(data: bytes) -> list[tuple[str, str]]:
    with av.open(io.BytesIO(data)) as container:
        return [(s.type, s.codec_context.name) for s in container.streams]


@pytest.mark.parametrize(
    ("channels", "num_frames", "sample_rate", "num_samples"),
    [(2, 9, 24000, 9000), (1, 9, 24000, 9000), (2, 5, 48000, 7777), (1, 1, 16000, 100)],
)
def test_mp4_with_audio_has_both_streams(
    channels: int, num_frames: int, sample_rate: int, num_samples: int
) -> None:
    frames = _frames(num_frames, 32, 48)
    audio = _tone(channels, num_samples, sample_rate)
    data = mp4_bytes(frames, 24.0, audio=audio, sample_rate=sample_rate)
    assert data[4:8] == b"ftyp"
    assert _streams(data) == [("video", "h264"), ("audio", "aac")]
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        assert (stream.channels, stream.sample_rate) == (channels, sample_rate)
        assert container.streams.video[0].average_rate == 24
        assert float(stream.duration * stream.time_base) == pytest.approx(num_samples / sample_rate)
    assert mp4_frame_count(data) == num_frames
    assert np.abs(mp4_frames(data).astype(np.int16) - frames).mean() < 4
    back, rate = mp4_audio(data)
    assert rate == sample_rate
    # The edit list cuts AAC's priming and padding: exactly the samples given, in step.
    assert back.shape == audio.shape and back.dtype == np.float32
    if num_samples >= 1024:  # AAC is perceptual, not waveform-exact: each channel in step
        for c in range(channels):  # and in place (the channels' pitches differ)
            assert np.corrcoef(back[c], audio[c])[0, 1] > 0.98


def test_mp4_audio_and_video_are_interleaved() -> None:
    data = mp4_bytes(_frames(24, 16, 16), 24.0, audio=_tone(2, 24000, 24000), sample_rate=24000)
    with av.open(io.BytesIO(data)) as container:
        order = "".join(p.stream.type[0] for p in container.demux() if p.size)
    assert order.count("v") == 24 and order.count("a") >= 24000 // 1024
    # In file order, not one stream after the other: each half of the video has audio beside it.
    assert "a" in order[: order.index("v") + 4] and order.rindex("a") > order.rindex("v") - 4


def test_mp4_with_audio_same_input_same_bytes() -> None:
    frames, audio = _frames(9, 32, 32), _tone(2, 9000, 24000)
    data = mp4_bytes(frames, 24.0, audio=audio, sample_rate=24000)
    assert data == mp4_bytes(frames.copy(), 24.0, audio=audio.copy(), sample_rate=24000)
    louder = mp4_bytes(frames, 24.0, audio=audio * 1.5, sample_rate=24000)
    assert louder != data
    assert mp4_bytes(frames, 24.0) != data


_DIGEST = """
import hashlib
import numpy as np
from jobs.output.media import mp4_bytes
rng = np.random.default_rng(7)
frames = rng.integers(0, 256, (9, 32, 32, 3), dtype=np.uint8)
audio = rng.uniform(-0.5, 0.5, (2, 9000)).astype(np.float32)
digest = hashlib.sha256(mp4_bytes(frames, 24.0, audio=audio, sample_rate=24000)).hexdigest()
"""


def test_mp4_with_audio_same_bytes_in_another_process() -> None:
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    other = subprocess.run([sys.executable, "-c", _DIGEST + "print(digest, end='')"], cwd=root,
                           env=env, check=True, capture_output=True, text=True).stdout  # fmt: skip
    here: dict = {}
    exec(_DIGEST, here)
    assert other == here["digest"]


@pytest.mark.parametrize(("height", "width"), [(33, 48), (17, 33)])
def test_mp4_with_audio_odd_sizes_are_padded(height: int, width: int) -> None:
    frames = _frames(5, height, width)
    data = mp4_bytes(frames, 24.0, audio=_tone(1, 5000, 24000), sample_rate=24000)
    back = mp4_frames(data)
    assert back.shape == (5, height + height % 2, width + width % 2, 3)
    assert np.abs(back[:, :height, :width].astype(np.int16) - frames).mean() < 6
    assert mp4_audio(data)[0].shape == (1, 5000)


@pytest.mark.parametrize(("fps", "rate"), [(24.0, Fraction(24)), (16, Fraction(16)),
                                           (23.976, Fraction(2997, 125)),
                                           (Fraction(30000, 1001), Fraction(30000, 1001))])  # fmt: skip
def test_float_fps_is_an_exact_rate(fps: float, rate: Fraction) -> None:
    for audio in (None, _tone(1, 2000, 24000)):
        data = mp4_bytes(_frames(3, 16, 16), fps, audio=audio,
                         sample_rate=None if audio is None else 24000)  # fmt: skip
        with av.open(io.BytesIO(data)) as container:
            assert container.streams.video[0].average_rate == rate


def test_mp4_without_audio_has_one_stream() -> None:
    data = mp4_bytes(_frames(3, 16, 16))
    assert _streams(data) == [("video", "h264")]
    with pytest.raises(ValueError, match="no audio stream"):
        mp4_audio(data)


@pytest.mark.parametrize(
    ("audio", "sample_rate", "match"),
    [
        (np.zeros((3, 100), np.float32), 24000, "C in"),
        (np.zeros(100, np.float32), 24000, "C in"),
        (np.zeros((1, 0), np.float32), 24000, "C in"),
        (np.zeros((2, 100), np.int16), 24000, "float"),
        (np.zeros((2, 100), np.float32), 23000, "not an AAC rate"),
        (np.zeros((2, 100), np.float32), None, "not an AAC rate"),
        (None, 24000, "without audio"),
    ],
)
def test_bad_audio_is_rejected(
    audio: np.ndarray | None, sample_rate: int | None, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        mp4_bytes(_frames(2, 16, 16), 24.0, audio=audio, sample_rate=sample_rate)


@pytest.mark.parametrize("channels", [1, 2])
def test_wav_round_trip(channels: int) -> None:
    audio = _tone(channels, 1234, 24000)
    data = wav_bytes(audio, 24000)
    assert data[:4] == b"RIFF" and data[8:12] == b"WAVE"
    with wave.open(io.BytesIO(data)) as f:
        assert (f.getnchannels(), f.getsampwidth(), f.getframerate(), f.getnframes()) == (
            channels, 2, 24000, 1234,
        )  # fmt: skip
    back, rate = wav_audio(data)
    assert rate == 24000 and back.shape == audio.shape and back.dtype == np.float32
    assert np.abs(back - audio).max() <= 0.5 / 32767 + 1e-7
    assert data == wav_bytes(audio.copy(), 24000)


def test_wav_clips_scales_and_rounds() -> None:
    audio = np.array([[0.0, 1.0, -1.0, 1.5, -2.0, np.nan, 0.5, 1 / 32767 * 0.5, np.inf]])
    data = wav_bytes(audio, 8000)
    with wave.open(io.BytesIO(data)) as f:
        pcm = np.frombuffer(f.readframes(f.getnframes()), "<i2")
    # 0.5 * 32767 = 16383.5 and 0.5 round half to even: 16384 and 0.
    assert pcm.tolist() == [0, 32767, -32767, 32767, -32767, 0, 16384, 0, 32767]


def test_wav_stereo_is_interleaved() -> None:
    audio = np.array([[0.25, 0.5], [-0.25, -0.5]], np.float32)  # (C=2, S=2)
    with wave.open(io.BytesIO(wav_bytes(audio, 16000))) as f:
        pcm = np.frombuffer(f.readframes(2), "<i2")
    assert pcm.tolist() == [8192, -8192, 16384, -16384]  # L0 R0 L1 R1


@pytest.mark.parametrize("sample_rate", [0, 24000.5])
def test_wav_bad_sample_rate(sample_rate: float) -> None:
    with pytest.raises(ValueError, match="sample_rate"):
        wav_bytes(np.zeros((1, 10), np.float32), sample_rate)  # type: ignore[arg-type]
