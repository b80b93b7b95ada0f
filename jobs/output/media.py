"""Videos as mp4 bytes for the ``video`` column: H.264 / yuv420p with PyAV (its wheels bundle ffmpeg).

Shape legend: F = frames, H/W = pixels.
"""

from __future__ import annotations

import io
from fractions import Fraction

import numpy as np

_ENCODERS = ("libx264", "h264", "mpeg4")
"""Tried in order: H.264 (x264) where the ffmpeg build has it, else MPEG-4 part 2."""


def _encoder() -> str:
    import av

    for name in _ENCODERS:
        try:
            av.codec.Codec(name, "w")
        except Exception:  # noqa: BLE001 - av raises UnknownCodecError (a ValueError) here
            continue
        return name
    raise RuntimeError(f"this PyAV build has none of the encoders {', '.join(_ENCODERS)}")


def mp4_bytes(frames_FHW3: np.ndarray, fps: int = 16, *, crf: int = 18) -> bytes:
    """Encode RGB frames as an mp4 (H.264, yuv420p, as browsers and ``datasets`` play it).

    yuv420p subsamples chroma 2x2, so an odd height or width is padded by repeating the last
    row / column: the video is then one pixel taller / wider than the frames (sizes that are
    multiples of 16, as Wan's are, are never padded). The same frames give the same bytes.

    Args:
        frames_FHW3: (F, H, W, 3) uint8 RGB, F >= 1.
        fps: frames per second (Wan 2.1 / 2.2 generate at 16).
        crf: x264 constant rate factor, 0 (lossless) to 51; 18 is visually near-lossless.
            Ignored by the MPEG-4 fallback.
    Returns:
        The mp4 file's bytes.
    Raises:
        ValueError: frames not (F, H, W, 3) uint8 with F >= 1, or fps < 1.
    """
    import av

    frames = np.asarray(frames_FHW3)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or not len(frames):
        raise ValueError(
            f"frames must be (F >= 1, H, W, 3) uint8, got {frames.shape} {frames.dtype}"
        )
    if fps < 1:
        raise ValueError(f"fps {fps} must be >= 1")
    _, height, width, _ = frames.shape
    pad = ((0, 0), (0, height % 2), (0, width % 2), (0, 0))
    if any(p[1] for p in pad):
        frames = np.pad(frames, pad, mode="edge")

    codec = _encoder()
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        options = {"crf": str(crf)} if codec == "libx264" else {}
        stream = container.add_stream(codec, rate=Fraction(fps), options=options)
        stream.width = frames.shape[2]
        stream.height = frames.shape[1]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            # Convert to yuv420p here, single-threaded: left to encode(), the conversion runs
            # on the codec's threads and the same frames now and then gave different bytes.
            yuv = av.VideoFrame.from_ndarray(frame, format="rgb24").reformat(format="yuv420p")
            for packet in stream.encode(yuv):
                container.mux(packet)
        for packet in stream.encode():  # flush the encoder's delayed frames
            container.mux(packet)
    return buf.getvalue()


def mp4_frames(data: bytes) -> np.ndarray:
    """Decode an mp4's first video stream back to RGB frames.

    Args:
        data: an mp4 file's bytes.
    Returns:
        (F, H, W, 3) uint8 RGB.
    """
    import av

    with av.open(io.BytesIO(data), mode="r") as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    return np.stack(frames)


def mp4_frame_count(data: bytes) -> int:
    """Frames in an mp4's first video stream, counted by decoding it."""
    return len(mp4_frames(data))
