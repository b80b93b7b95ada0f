"""Generate one micro-batch: encode -> denoise -> decode, with per-sample results.

A micro-batch shares height, width, num_inference_steps and guidance_scale (the pipeline takes
them per call). Each image has its own torch.Generator (on the CPU, so the initial noise does not
depend on the device). A micro-batch that raises is retried image by image, so only the images
that fail become error rows.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from parallel.branches import SerialBranchExecutor
from pipeline.denoiser import DenoiserHook, StepRecord
from pipeline.families import family_for


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

    @property
    def batch_key(self) -> tuple[int, int, int, float]:
        """Requests may share a pipeline call only when these are equal."""
        return (self.height, self.width, self.num_inference_steps, self.guidance_scale)


@dataclass
class SampleResult:
    """One generated image, or the error that prevented it."""

    request: SampleRequest
    image: Any = None
    """PIL image, or None on error."""
    error: str | None = None
    steps: list[StepRecord] = field(default_factory=list)
    denoise_s: float = 0.0
    """Wall seconds of the micro-batch's denoise stage (shared by its images)."""


@dataclass
class BatchOutput:
    """Results of a micro-batch plus the wall-clock span of its denoise..decode."""

    results: list[SampleResult]
    start_wall: float
    """time.time() when the denoise stage began."""
    end_wall: float
    """time.time() when the decode stage ended."""


class StageRunner:
    """Runs the three stages of a pipeline on micro-batches.

    Args:
        pipe: a loaded diffusers pipeline of a supported family.
        cfg_batching: run the CFG branches as one concatenated forward (True) or one forward
            per branch (False).
        guidance_rescale: diffusers' guidance_rescale in [0, 1].
    Raises:
        UnsupportedPipelineError: the pipeline class is not supported.
    """

    def __init__(self, pipe: Any, *, cfg_batching: bool, guidance_rescale: float) -> None:
        self.family = family_for(pipe)
        self.hook = DenoiserHook(
            pipe, self.family.convention, SerialBranchExecutor(batched=cfg_batching)
        )
        self.guidance_rescale = guidance_rescale

    def run(self, requests: Sequence[SampleRequest]) -> BatchOutput:
        """Generate a micro-batch; never raises for a per-sample failure.

        Args:
            requests: B >= 1 requests with equal ``batch_key``.
        Returns:
            B results in request order.
        """
        keys = {r.batch_key for r in requests}
        assert len(keys) == 1, f"micro-batch mixes generation settings: {keys}"
        start = time.time()
        try:
            results = self._run(requests)
        except Exception as exc:  # noqa: BLE001 - becomes error rows
            if len(requests) == 1:
                results = [SampleResult(requests[0], error=f"{type(exc).__name__}: {exc}")]
            else:
                results = [r for req in requests for r in self._retry_one(req)]
        return BatchOutput(results, start, time.time())

    def _retry_one(self, request: SampleRequest) -> list[SampleResult]:
        try:
            return self._run([request])
        except Exception as exc:  # noqa: BLE001
            return [SampleResult(request, error=f"{type(exc).__name__}: {exc}")]

    @torch.inference_mode()
    def _run(self, requests: Sequence[SampleRequest]) -> list[SampleResult]:
        first = requests[0]
        guidance = first.guidance_scale > 1.0
        # Encode each distinct (prompt, negative) once; images of one prompt share it.
        pairs = list(dict.fromkeys((r.prompt, r.negative_prompt) for r in requests))
        cond = self.family.encode(
            [p for p, _ in pairs], [n for _, n in pairs], guidance=guidance
        ).select([pairs.index((r.prompt, r.negative_prompt)) for r in requests])

        generators = [torch.Generator("cpu").manual_seed(r.seed) for r in requests]
        start = time.perf_counter()
        with self.hook.intercept(batch=len(requests), guidance=guidance) as steps:
            latents = self.family.denoise(
                cond,
                generators,
                height=first.height,
                width=first.width,
                num_inference_steps=first.num_inference_steps,
                guidance_scale=first.guidance_scale,
                guidance_rescale=self.guidance_rescale,
            )
        denoise_s = time.perf_counter() - start

        finite = torch.isfinite(latents.flatten(1)).all(dim=1).tolist()
        keep = [i for i, ok in enumerate(finite) if ok]
        images = self.family.decode(latents[keep]) if keep else []
        by_index = dict(zip(keep, images))
        return [
            SampleResult(
                request,
                image=by_index.get(i),
                error=None if i in by_index else "non-finite latents after denoising",
                steps=list(steps),
                denoise_s=denoise_s,
            )
            for i, request in enumerate(requests)
        ]
