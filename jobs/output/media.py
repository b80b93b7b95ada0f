"""Media bytes for the output columns: mp4 for ``video`` (H.264 / yuv420p with PyAV, whose wheels
bundle ffmpeg; AAC sound for audio-video models) and WAV for ``audio`` (16-bit PCM, stdlib wave).

Shape legend: F = frames, H/W = pixels, C = audio channels (1 or 2), S = audio samples.
"""

from __future__ import annotations

import io
import math
import wave
from fractions import Fraction
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import av

_ENCODERS = ("libx264", "h264", "mpeg4")
"""Tried in order: H.264 (x264) where the ffmpeg build has it, else MPEG-4 part 2."""

AAC_SAMPLE_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025,
                    8000, 7350)  # fmt: skip
"""Sample rates (Hz) that AAC (ISO/IEC 14496-3) and so ffmpeg's ``aac`` encoder accept."""

AAC_BIT_RATE_PER_CHANNEL = 96_000
"""Bits per second per channel of the mp4's AAC track (mono 96 kb/s, stereo 192 kb/s)."""

_LAYOUTS = {1: "mono", 2: "stereo"}


def _encoder() -> str:
    import av

    for name in _ENCODERS:
        try:
            av.codec.Codec(name, "w")
        except Exception:  # noqa: BLE001 - av raises UnknownCodecError (a ValueError) here
            continue
        return name
    raise RuntimeError(f"this PyAV build has none of the encoders {', '.join(_ENCODERS)}")


def _rate(fps: float | Fraction) -> Fraction:
    """fps as an exact rate: 16 -> 16, 24.0 -> 24, 23.976 -> 2997/125, Fraction(24000, 1001) kept."""
    return Fraction(fps).limit_denominator(1001)


def clip_audio(audio_CS: np.ndarray) -> np.ndarray:
    """Checked audio, as written to both the mp4 and the WAV: float32, NaN -> 0, clipped to [-1, 1].

    Args:
        audio_CS: (C, S) float samples, C in {1, 2}, S >= 1; nominally in [-1, 1].
    Returns:
        (C, S) float32, C-contiguous, in [-1, 1].
    Raises:
        ValueError: not a (C, S) float array with C in {1, 2} and S >= 1.
    """
    audio = np.asarray(audio_CS)
    if (audio.ndim != 2 or audio.shape[0] not in _LAYOUTS or not audio.shape[1]
            or not np.issubdtype(audio.dtype, np.floating)):  # fmt: skip
        raise ValueError(
            f"audio must be (C in {{1, 2}}, S >= 1) float, got {audio.shape} {audio.dtype}"
        )
    audio = np.nan_to_num(audio.astype(np.float32), nan=0.0, posinf=1.0, neginf=-1.0)
    return np.ascontiguousarray(np.clip(audio, -1.0, 1.0))


def mp4_bytes(
    frames_FHW3: np.ndarray,
    fps: float | Fraction = 16,
    *,
    crf: int = 18,
    audio: np.ndarray | None = None,
    sample_rate: int | None = None,
) -> bytes:
    """Encode RGB frames, and optionally a sound track, as an mp4 (H.264 yuv420p video, AAC audio:
    what browsers and ``datasets`` play).

    yuv420p subsamples chroma 2x2, so an odd height or width is padded by repeating the last
    row / column: the video is then one pixel taller / wider than the frames (sizes that are
    multiples of 16, as Wan's are, are never padded). The same input gives the same bytes.

    With ``audio``, the mp4 has a second stream: AAC-LC (ffmpeg's native ``aac`` encoder, as
    diffusers' LTX-2 ``encode_video`` uses) at AAC_BIT_RATE_PER_CHANNEL, mono or stereo as given,
    at ``sample_rate``. Audio is fed to the encoder up to the end of each video frame as the frame
    is encoded, so the muxer interleaves the two streams in time order. The encoder's 1024-sample
    priming delay and the last packet's padding are recorded in the mp4's edit list, so players
    (and mp4_audio) give back exactly S samples; the tracks' lengths are kept as they are (F / fps
    and S / sample_rate need not be equal).

    Args:
        frames_FHW3: (F, H, W, 3) uint8 RGB, F >= 1.
        fps: frames per second, >= 1 (Wan 2.1 / 2.2 generate at 16, LTX-2 at 24.0); a float is
            taken as the nearest fraction with denominator <= 1001 (29.97 -> 2997/100).
        crf: x264 constant rate factor, 0 (lossless) to 51; 18 is visually near-lossless.
            Ignored by the MPEG-4 fallback.
        audio: optional (C, S) float array, C in {1, 2} channels, samples in [-1, 1] (clipped
            there; NaN -> 0, see clip_audio).
        sample_rate: audio samples per second, one of AAC_SAMPLE_RATES; required with ``audio``.
    Returns:
        The mp4 file's bytes.
    Raises:
        ValueError: frames not (F, H, W, 3) uint8 with F >= 1; fps < 1 or not finite; audio not
            (C, S) float with C in {1, 2}; sample_rate missing, given without audio, or not an AAC
            rate.
    """
    import av

    frames = np.asarray(frames_FHW3)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or not len(frames):
        raise ValueError(
            f"frames must be (F >= 1, H, W, 3) uint8, got {frames.shape} {frames.dtype}"
        )
    if not math.isfinite(fps) or fps < 1:
        raise ValueError(f"fps {fps} must be >= 1")
    if audio is not None:
        audio = clip_audio(audio)
        if sample_rate not in AAC_SAMPLE_RATES:
            raise ValueError(f"sample_rate {sample_rate} is not an AAC rate "
                             f"({', '.join(map(str, AAC_SAMPLE_RATES))})")  # fmt: skip
    elif sample_rate is not None:
        raise ValueError(f"sample_rate {sample_rate} given without audio")
    _, height, width, _ = frames.shape
    pad = ((0, 0), (0, height % 2), (0, width % 2), (0, 0))
    if any(p[1] for p in pad):
        frames = np.pad(frames, pad, mode="edge")

    codec = _encoder()
    rate = _rate(fps)
    buf = io.BytesIO()
    # With sound, the movie's time scale is the sample rate, so that the edit list (which cuts
    # the AAC priming and padding) counts whole samples: the default, 1000, rounds it to ms.
    muxing = {} if audio is None else {"movie_timescale": str(sample_rate)}
    with av.open(buf, mode="w", format="mp4", options=muxing) as container:
        options = {"crf": str(crf)} if codec == "libx264" else {}
        stream = container.add_stream(codec, rate=rate, options=options)
        stream.width = frames.shape[2]
        stream.height = frames.shape[1]
        stream.pix_fmt = "yuv420p"
        sound = None if audio is None else _AudioTrack(container, audio, sample_rate)
        for i, frame in enumerate(frames):
            # Convert to yuv420p here, single-threaded: left to encode(), the conversion runs
            # on the codec's threads and the same frames now and then gave different bytes.
            yuv = av.VideoFrame.from_ndarray(frame, format="rgb24").reformat(format="yuv420p")
            for packet in stream.encode(yuv):
                container.mux(packet)
            if sound is not None:  # the audio under this frame; all that is left at the last
                sound.feed(None if i == len(frames) - 1 else (i + 1) / rate)
        for packet in stream.encode():  # flush the encoder's delayed frames
            container.mux(packet)
        if sound is not None:
            sound.flush()
    return buf.getvalue()


class _AudioTrack:
    """The AAC stream of mp4_bytes, fed in pieces as the video advances."""

    def __init__(
        self, container: av.container.OutputContainer, audio_CS: np.ndarray, sample_rate: int
    ) -> None:
        self.container = container
        self.audio = audio_CS
        self.sample_rate = sample_rate
        self.layout = _LAYOUTS[audio_CS.shape[0]]
        self.stream = container.add_stream("aac", rate=sample_rate)
        self.stream.layout = self.layout
        self.stream.bit_rate = AAC_BIT_RATE_PER_CHANNEL * audio_CS.shape[0]
        self.done = 0

    def feed(self, until_s: Fraction | None) -> None:
        """Encode the samples before ``until_s`` seconds (None: all that are left)."""
        import av

        total = self.audio.shape[1]
        stop = total if until_s is None else min(total, math.floor(until_s * self.sample_rate))
        if stop <= self.done:
            return
        # PyAV re-chunks the samples into the encoder's 1024-sample frames.
        frame = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(self.audio[:, self.done : stop]), format="fltp", layout=self.layout
        )
        frame.sample_rate = self.sample_rate
        frame.time_base = Fraction(1, self.sample_rate)
        frame.pts = self.done
        for packet in self.stream.encode(frame):
            self.container.mux(packet)
        self.done = stop

    def flush(self) -> None:
        """Encode what is left, then drain the encoder."""
        self.feed(None)
        for packet in self.stream.encode():
            self.container.mux(packet)


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


def mp4_audio(data: bytes) -> tuple[np.ndarray, int]:
    """Decode an mp4's first audio stream.

    The decoder drops the encoder's priming samples (the edit list's start); the last frame's
    padding is cut here at the stream's duration, so an mp4 from mp4_bytes gives back S samples.

    Args:
        data: an mp4 file's bytes.
    Returns:
        (audio, sample_rate): (C, S) float32 samples (lossy: close to, not equal to, what was
        encoded) and samples per second.
    Raises:
        ValueError: the mp4 has no audio stream.
    """
    import av

    with av.open(io.BytesIO(data), mode="r") as container:
        if not container.streams.audio:
            raise ValueError("the mp4 has no audio stream")
        stream = container.streams.audio[0]
        sample_rate = stream.sample_rate
        chunks = [_planar(f) for f in container.decode(audio=0)]
        samples = np.concatenate(chunks, axis=1).astype(np.float32)
        if stream.duration is not None and stream.time_base is not None:
            samples = samples[:, : round(stream.duration * stream.time_base * sample_rate)]
    return samples, sample_rate


def _planar(frame: av.AudioFrame) -> np.ndarray:
    """A decoded audio frame as (C, n): planar formats are so already, packed ones interleave."""
    samples = frame.to_ndarray()
    if frame.format.is_planar:
        return samples
    return samples.reshape(-1, len(frame.layout.channels)).T


def wav_bytes(audio_CS: np.ndarray, sample_rate: int) -> bytes:
    """Encode audio as a WAV file: 16-bit signed PCM, channels interleaved (stdlib ``wave``).

    Samples are clipped to [-1, 1] (NaN -> 0, see clip_audio), scaled by 32767 and rounded to
    the nearest integer (half to even), so full scale is +-32767 and -32768 is never written.
    The same input gives the same bytes.

    Args:
        audio_CS: (C, S) float samples, C in {1, 2}, S >= 1, in [-1, 1].
        sample_rate: samples per second, >= 1.
    Returns:
        The WAV file's bytes.
    Raises:
        ValueError: audio not (C, S) float with C in {1, 2}, or sample_rate < 1.
    """
    audio = clip_audio(audio_CS)
    if int(sample_rate) != sample_rate or sample_rate < 1:
        raise ValueError(f"sample_rate {sample_rate} must be an integer >= 1")
    pcm = np.rint(audio.T * 32767.0).astype("<i2")  # (S, C): interleaved, little-endian
    buf = io.BytesIO()
    with wave.open(buf, "wb") as out:
        out.setnchannels(audio.shape[0])
        out.setsampwidth(2)
        out.setframerate(int(sample_rate))
        out.writeframes(pcm.tobytes())
    return buf.getvalue()


def wav_audio(data: bytes) -> tuple[np.ndarray, int]:
    """Decode a 16-bit PCM WAV file (as wav_bytes writes) back to float samples.

    Args:
        data: the WAV file's bytes.
    Returns:
        (audio, sample_rate): (C, S) float32 samples, int16 / 32767 (so within 0.5 / 32767 of
        the clipped input of wav_bytes), and samples per second.
    Raises:
        ValueError: not 16-bit PCM.
    """
    with wave.open(io.BytesIO(data), "rb") as f:
        if f.getsampwidth() != 2:
            raise ValueError(f"expected 16-bit PCM, got {8 * f.getsampwidth()}-bit samples")
        channels, sample_rate = f.getnchannels(), f.getframerate()
        pcm = np.frombuffer(f.readframes(f.getnframes()), dtype="<i2")
    return (pcm.reshape(-1, channels).T / 32767.0).astype(np.float32), sample_rate
