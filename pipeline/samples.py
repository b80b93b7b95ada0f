"""What to generate and what came back, per image: SampleRequest, SampleResult, StepRecord.

Plain records with no torch in them, so that the job layer (jobs.rows, jobs.output.schema) plans
rows and writes results without importing torch or diffusers; the stages that fill them are in
pipeline.generate and pipeline.denoiser.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class StepRecord:
    """One denoiser step of a micro-batch."""

    step_index: int
    """0-based position in the scheduler's timesteps."""
    timestep: float
    """The scheduler timestep passed to the denoiser."""
    denoiser: str
    """Pipeline attribute of the module that ran ("unet", "transformer", "transformer_2")."""
    uncond: str
    """"fresh" (computed this step), "reused" (from a cached delta) or "none" (no guidance)."""
    step_s: float
    """Wall seconds in the denoiser for this step on this rank: its branch forwards and, under
    CFG parallelism, the gather of the other ranks' predictions."""
    branches: tuple[tuple[str, int], ...] = ()
    """(branch name, CFG-group rank that ran it), in the pipeline's branch order; a branch cut
    by samples across the group appears once per rank."""
    unconds: tuple[str, ...] = ()
    """Per sample of the micro-batch: "fresh", "reused" or "none" (``uncond`` is the
    sample's own value once results are split per sample)."""
    sample_states: tuple[tuple[str, tuple[str, ...]], ...] = ()
    """Per auxiliary branch of the family (uncond, stg, modality, cond_skip): (name, per sample
    of the micro-batch "fresh", "reused" or "none" (not run at this step))."""
    branch_states: tuple[tuple[str, str], ...] = ()
    """Once results are split per sample: (auxiliary branch, this sample's state) of each."""

    def for_sample(self, i: int) -> StepRecord:
        """This step as sample ``i`` of the micro-batch saw it (its own uncond and branch states)."""
        return replace(self, uncond=self.unconds[i] if self.unconds else self.uncond,
                       branch_states=tuple((n, st[i]) for n, st in self.sample_states))  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class AudioVideo:
    """A generated video with its sound track (LTX-2): what an audio-video family's decode
    returns per sample, and what the writer turns into the ``video`` (mp4 with the audio
    muxed in) and ``audio`` (WAV) columns."""

    frames: Any
    """(F, H, W, 3) uint8 RGB numpy array."""
    audio: Any
    """(C, S) float32 numpy array in [-1, 1]: C channels (1 or 2) of S samples."""
    sample_rate: int
    """Audio samples per second (the vocoder's output rate, e.g. 24000)."""
    fps: float
    """Video frames per second (the frame_rate the pipeline conditioned on, e.g. 24)."""

    @property
    def audio_s(self) -> float:
        """Seconds of audio: S / sample_rate."""
        return self.audio.shape[-1] / self.sample_rate


@dataclass(frozen=True, kw_only=True)
class ImageRef:
    """An input image of a manifest row (the ``image`` column), not yet read: a file, or the
    encoded bytes of one (Hugging Face ``datasets``' Image storage, struct<bytes, path>). It is
    opened at generate time (pipeline.images), so that an unreadable one fails its row only."""

    path: str | None = None
    """The path as the manifest gives it (named in error messages); with ``data``, only a name."""
    data: bytes | None = field(default=None, repr=False)
    """Encoded image bytes (PNG, JPEG, ...); when set, ``path`` is not read."""
    root: str | None = None
    """Directory a relative ``path`` is resolved against: the manifest's."""

    @property
    def file(self) -> str | None:
        """The file to read: ``path`` resolved against ``root``; None when ``data`` is set."""
        if self.data is not None or self.path is None:
            return None
        return os.path.join(self.root, self.path) if self.root else self.path

    @property
    def label(self) -> str:
        """How messages name it: ``'imgs/cat.png'``, or ``'cat.png' (N bytes)`` for bytes."""
        if self.data is None:
            return repr(self.path)
        return (
            f"{self.path!r} ({len(self.data)} bytes)" if self.path else f"({len(self.data)} bytes)"
        )


@dataclass(frozen=True, kw_only=True)
class SampleRequest:
    """One image to generate."""

    sample_id: str
    prompt: str
    negative_prompt: str
    """"" for the plain unconditional embedding."""
    seed: int
    """Seed of this image's generator, in [0, 2**63)."""
    height: int
    width: int
    num_inference_steps: int
    guidance_scale: float
    true_cfg_scale: float | None = None
    """diffusers' true_cfg_scale of families with real CFG beside a distilled guidance (Flux,
    Qwen-Image); None for the others."""
    cfg_gate_step: float = 1.0
    """CFG gating fraction F in [0, 1]: from step int(steps * F) on, uncond is rebuilt from the
    cached delta (pipeline.gating); 1.0 = off."""
    cfg_gate_steps: tuple[tuple[str, float], ...] = ()
    """Per auxiliary branch, its own gating fraction, overriding cfg_gate_step for it
    (``--cfg-gate-step uncond=0.6,stg=0.3``); () = cfg_gate_step for every branch."""
    num_frames: int | None = None
    """Video models: frames to generate; None for image models."""
    image: ImageRef | None = None
    """The input image of image-conditioned models (Wan I2V); None for the others."""

    @property
    def batch_key(self) -> tuple[Any, ...]:
        """Requests may share a pipeline call only when these are equal. The input image is
        part of it: WanImageToVideoPipeline takes one image per call (shared by its videos)."""
        return (self.height, self.width, self.num_inference_steps, self.guidance_scale,
                self.true_cfg_scale, self.cfg_gate_step, self.cfg_gate_steps, self.num_frames,
                self.image)  # fmt: skip


@dataclass
class SampleResult:
    """One generated image, or the error that prevented it."""

    request: SampleRequest
    image: Any = None
    """PIL image, (F, H, W, 3) uint8 frames for video models, or an AudioVideo for
    audio-video models (LTX-2); None on error, or when
    another rank of the CFG group decodes it."""
    error: str | None = None
    warning: str | None = None
    """A note on a generated sample, e.g. its prompt was truncated by the text encoder."""
    steps: list[StepRecord] = field(default_factory=list)
    invalidations: int = 0
    """Cached guidance deltas dropped on a denoiser switch, over every auxiliary branch
    (shared by the micro-batch)."""
    gate_step: int | None = None
    """First step whose uncond was reused, or None if every uncond was fresh."""
    branch_gates: tuple[tuple[str, int | None, int], ...] = ()
    """Per auxiliary branch that ran: (name, first step it was reused or None, its
    invalidations)."""
    denoise_s: float = 0.0
    """Wall seconds of the micro-batch's denoise stage (shared by its images)."""
    forward_batch: int | None = None
    """Samples denoised together with this one: the micro-batch, or a part of it after an
    out-of-memory backoff (pipeline.oom); None where it was not denoised here."""
