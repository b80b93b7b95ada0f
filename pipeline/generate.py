"""Generate one micro-batch: encode -> denoise -> decode, with per-sample results.

A micro-batch shares height, width, num_inference_steps, guidance_scale and cfg_gate_step (the
pipeline and the gate take them per call). Each image has its own torch.Generator (on the CPU, so the initial noise does not
depend on the device). A micro-batch that raises is retried image by image, so only the images
that fail become error rows.

Under CFG parallelism every rank of the group runs encode + denoise of the same micro-batch in
lockstep (same generators, so the same latents; the scheduler steps on identical predictions),
and the decode is split: image i is decoded by group rank i % K, which also writes its row.
Images are decoded one at a time (diffusers' VAE slicing), so an image's bytes do not depend on
K or on its batch mates at decode, and a decode failure costs only that image. Text encoding is
not split: it is ~0.2% of a micro-batch (see the closing note of issue 3) and splitting it would
make embeddings depend on K.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from parallel.cfg_group import CfgGroup, CollectiveError
from parallel.executors import CfgParallelExecutor, SerialBranchExecutor
from pipeline.denoiser import DenoiserHook
from pipeline.families import family_for
from pipeline.samples import SampleRequest, SampleResult


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
        cfg_batching: run a rank's CFG branches as one concatenated forward (True) or one
            forward per branch (False).
        guidance_rescale: diffusers' guidance_rescale in [0, 1]; None = the family's own
            (call_defaults, else 0).
        group: this rank's CFG group; None or size 1 runs every branch here.
        cfg_gate_cosine: adaptive CFG gating threshold G in [-1, 1], or None (pipeline.gating).
    Raises:
        UnsupportedPipelineError: the pipeline class is not supported.
    """

    def __init__(self, pipe: Any, *, cfg_batching: bool, guidance_rescale: float | None,
                 group: CfgGroup | None = None, cfg_gate_cosine: float | None = None) -> None:  # fmt: skip
        self.family = family_for(pipe)
        self.group = group or CfgGroup(None)
        executor = (
            CfgParallelExecutor(self.group, batched=cfg_batching)
            if self.group.size > 1
            else SerialBranchExecutor(batched=cfg_batching)
        )
        self.hook = DenoiserHook(pipe, self.family.convention, executor, self.family.step_calls,
                                 self.family.auxiliary_branches)  # fmt: skip
        own = self.family.call_defaults.get("guidance_rescale", 0.0)
        self.guidance_rescale = own if guidance_rescale is None else guidance_rescale
        self.cfg_gate_cosine = cfg_gate_cosine

    def run(self, requests: Sequence[SampleRequest], decode: Sequence[bool] | None = None) -> BatchOutput:
        """Generate a micro-batch; never raises for a per-sample failure.

        Every rank of the CFG group must call it with the same requests.

        Args:
            requests: B >= 1 requests with equal ``batch_key``.
            decode: per request, whether this rank decodes it (default: all). Others come back
                with image None and no error.
        Returns:
            B results in request order.
        Raises:
            CollectiveError: the CFG group is broken (a rank died or hung); not a sample error.
        """
        keys = {r.batch_key for r in requests}
        assert len(keys) == 1, f"micro-batch mixes generation settings: {keys}"
        decode = list(decode) if decode is not None else [True] * len(requests)
        start = time.time()
        try:
            results = self._run(requests, decode)
        except CollectiveError:
            raise
        except Exception as exc:  # noqa: BLE001 - becomes error rows
            if len(requests) == 1:
                results = [SampleResult(requests[0], error=f"{type(exc).__name__}: {exc}")]
            else:  # the whole group takes this path: GroupAborted is raised on every rank
                results = [
                    r for req, mine in zip(requests, decode) for r in self._retry_one(req, mine)
                ]
        return BatchOutput(results, start, time.time())

    def _retry_one(self, request: SampleRequest, decode: bool) -> list[SampleResult]:
        try:
            return self._run([request], [decode])
        except CollectiveError:
            raise
        except Exception as exc:  # noqa: BLE001
            return [SampleResult(request, error=f"{type(exc).__name__}: {exc}")]

    @torch.inference_mode()
    def _run(self, requests: Sequence[SampleRequest], decode: Sequence[bool]) -> list[SampleResult]:
        first = requests[0]
        guidance = self.family.guided(first.guidance_scale, first.true_cfg_scale)
        with self.group.lockstep():
            # Encode each distinct (prompt, negative) once; images of one prompt share it.
            pairs = list(dict.fromkeys((r.prompt, r.negative_prompt) for r in requests))
            cond = self.family.encode(
                [p for p, _ in pairs], [n for _, n in pairs], guidance=guidance
            ).select([pairs.index((r.prompt, r.negative_prompt)) for r in requests])
            warnings = self.family.prompt_warnings(
                [r.prompt for r in requests],
                [r.negative_prompt if guidance else "" for r in requests],
            )
            if not guidance and first.true_cfg_scale is not None:  # a family with true CFG, off
                ignored = "negative_prompt ignored: true CFG is off (true_cfg_scale <= 1)"
                warnings = [("; ".join(w for w in (warn, ignored) if w) if r.negative_prompt else warn)
                            for warn, r in zip(warnings, requests)]  # fmt: skip

            generators = [torch.Generator("cpu").manual_seed(r.seed) for r in requests]
            start = time.perf_counter()
            with self.hook.intercept(batch=len(requests), guidance=guidance,
                                     cfg_gate_step=first.cfg_gate_step,
                                     cfg_gate_steps=dict(first.cfg_gate_steps),
                                     cfg_gate_cosine=self.cfg_gate_cosine,
                                     branch_inputs=self.family.branch_inputs(cond)) as trace:  # fmt: skip
                latents = self.family.denoise(
                    cond,
                    generators,
                    height=first.height,
                    width=first.width,
                    num_inference_steps=first.num_inference_steps,
                    guidance_scale=first.guidance_scale,
                    guidance_rescale=self.guidance_rescale,
                    **({"num_frames": first.num_frames} if first.num_frames else {}),
                    **({"image": first.image} if first.image is not None else {}),  # one per batch_key
                    **({"true_cfg_scale": first.true_cfg_scale} if first.true_cfg_scale is not None else {}),
                )
            denoise_s = time.perf_counter() - start

        results = []
        nonfinite = trace.nonfinite_errors(len(requests))
        parts = latents if isinstance(latents, tuple) else (latents,)  # LTX-2: (video, audio)
        gates = {n: g for n, g in trace.gates.items() if g.active}
        for i, request in enumerate(requests):
            result = SampleResult(
                request,
                warning=warnings[i],
                steps=[s.for_sample(i) for s in trace.steps],
                denoise_s=denoise_s,
                invalidations=sum(g.invalidations for g in gates.values()),
                gate_step=trace.gate.first_reused[i],
                branch_gates=tuple((n, g.first_reused[i], g.invalidations) for n, g in gates.items()),
            )
            mine = tuple(p[i : i + 1] for p in parts)
            if nonfinite[i]:
                result.error = nonfinite[i]
            elif not all(torch.isfinite(p).all() for p in mine):
                result.error = "non-finite latents after denoising"
            elif decode[i]:
                try:  # one image per VAE call (diffusers' VAE slicing)
                    result.image = self.family.decode(mine if isinstance(latents, tuple) else mine[0],
                                                      height=request.height, width=request.width)[0]  # fmt: skip
                except Exception as exc:  # noqa: BLE001 - only this image is lost
                    result.error = f"decode: {type(exc).__name__}: {exc}"
            results.append(result)
        return results
