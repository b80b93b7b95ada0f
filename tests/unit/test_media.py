"""mp4 encoding of generated frames (PyAV, H.264 / yuv420p)."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest

from jobs.output.media import mp4_bytes, mp4_frame_count, mp4_frames


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
