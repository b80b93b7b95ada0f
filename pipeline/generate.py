"""Generate one micro-batch: encode -> denoise -> decode, with per-sample results.

A micro-batch shares height, width, num_inference_steps, guidance_scale and cfg_gate_step (the
pipeline and the gate take them per call). Each image has its own torch.Generator (on the CPU, so the initial noise does not
depend on the device). A micro-batch that raises is retried image by image, so only the images
that fail become error rows; one that runs out of device memory is retried as two halves (down
to batch 1), and the smaller forward batch is kept for the rest of the shard (each sample's
``forward_batch`` records the forward it was denoised in: its bytes are those of that batch).

Under CFG parallelism every rank of the group runs encode + denoise of the same micro-batch in
lockstep (same generators, so the same latents; the scheduler steps on identical predictions),
and the decode is split: image i is decoded by group rank i % K, which also writes its row.
Images are decoded one at a time (diffusers' VAE slicing), so an image's bytes do not depend on
K or on its batch mates at decode, and a decode failure costs only that image. Text encoding is
not split: it is ~0.2% of a micro-batch (see the closing note of issue 3) and splitting it would
make embeddings depend on K.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from parallel.cfg_group import CfgGroup, CollectiveError
from parallel.executors import CfgParallelExecutor, SerialBranchExecutor
from parallel.platform import DeviceRules
from pipeline.denoiser import DenoiserHook
from pipeline.device_rules import adapt_pipeline, device_call
from pipeline.families import Conditioning, family_for
from pipeline.oom import free_device_memory, is_out_of_memory
from pipeline.samples import SampleRequest, SampleResult


@dataclass
class BatchOutput:
    """Results of a micro-batch plus the wall-clock span of its denoise..decode."""

    results: list[SampleResult]
    start_wall: float
    """time.time() when the denoise stage began."""
    end_wall: float
    """time.time() when the decode stage ended."""


@dataclass
class Encoded:
    """Encode stage output of a micro-batch: what the denoise stage takes (and what the encoder
    role hands the denoiser role)."""

    cond: Conditioning
    """One row per request."""
    warnings: list[str | None]
    """Per request: e.g. a truncated prompt."""


F = TypeVar("F", bound=Callable[..., Any])


def _device_rules(stage: F) -> F:
    """Run a stage under the runner's call-time device rules (pipeline.device_rules)."""
    @functools.wraps(stage)
    def run(self: StageRunner, *args: Any, **kwargs: Any) -> Any:
        with device_call(self.rules):
            return stage(self, *args, **kwargs)

    return run  # type: ignore[return-value]


class StageRunner:
    """Runs the three stages of a pipeline on micro-batches.

    Args:
        pipe: a loaded diffusers pipeline of a supported family.
        cfg_batching: run a rank's CFG branches as one concatenated forward (True) or one
            forward per branch (False).
        guidance_rescale: diffusers' guidance_rescale in [0, 1]; None = the family's own
            (call_defaults, else 0).
        group: this rank's CFG group; None or size 1 runs every branch here.
        max_forward_batch: most samples one denoiser forward may hold (--max-forward-batch):
            branches are concatenated only up to it; None: no cap.
        cfg_gate_cosine: adaptive CFG gating threshold G in [-1, 1], or None (pipeline.gating).
        rules: the platform's device rules (``Platform.device_rules``): applied to ``pipe`` here,
            and around every stage call (with the forbidden-dtype guard when they ask for it);
            None: none.
        fault: called with "denoise" as each denoise stage starts (jobs.output.failpoints, so
            that a test raises a real torch.OutOfMemoryError there); None: nothing.
    Raises:
        UnsupportedPipelineError: the pipeline class is not supported.
    """

    def __init__(self, pipe: Any, *, cfg_batching: bool, guidance_rescale: float | None,
                 group: CfgGroup | None = None, cfg_gate_cosine: float | None = None,
                 rules: DeviceRules | None = None, fault: Callable[[str], None] | None = None,
                 max_forward_batch: int | None = None) -> None:  # fmt: skip
        self.family = family_for(pipe)
        self.rules = rules
        self.device_changes = adapt_pipeline(pipe, rules)
        self.group = group or CfgGroup(None)
        executor = (
            CfgParallelExecutor(self.group, batched=cfg_batching, max_forward=max_forward_batch)
            if self.group.size > 1
            else SerialBranchExecutor(batched=cfg_batching, max_forward=max_forward_batch)
        )
        self.hook = DenoiserHook(pipe, self.family.convention, executor, self.family.step_calls,
                                 self.family.auxiliary_branches)  # fmt: skip
        own = self.family.call_defaults.get("guidance_rescale", 0.0)
        self.guidance_rescale = own if guidance_rescale is None else guidance_rescale
        self.cfg_gate_cosine = cfg_gate_cosine
        self.forward_batch: int | None = None
        """Largest forward after an out-of-memory backoff in this shard (None: the micro-batch)."""
        self.fault = fault

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
        results = self._run_within(list(requests), decode)
        return BatchOutput(results, start, time.time())

    def new_shard(self) -> None:
        """Forget the forward batch an out-of-memory backoff lowered (it holds for one shard)."""
        self.forward_batch = None

    def _run_within(self, requests: list[SampleRequest], decode: list[bool]) -> list[SampleResult]:
        """Run ``requests`` in forwards of at most ``forward_batch``; a forward that runs out of
        device memory lowers it to half its size (rounded up) and runs again, down to 1."""
        cap = self.forward_batch
        if cap is not None and len(requests) > cap:
            return [r for i in range(0, len(requests), cap)
                    for r in self._run_within(requests[i : i + cap], decode[i : i + cap])]  # fmt: skip
        try:
            results = self._run(requests, decode)
        except CollectiveError:
            raise
        except Exception as exc:  # noqa: BLE001 - becomes error rows
            if len(requests) > 1 and is_out_of_memory(exc):  # every rank of the group alike
                del exc
                free_device_memory()
                self.forward_batch = (len(requests) + 1) // 2
                return self._run_within(requests, decode)
            if len(requests) == 1:
                results = [SampleResult(requests[0], error=f"{type(exc).__name__}: {exc}")]
            else:  # the whole group takes this path: GroupAborted is raised on every rank
                results = [
                    r for req, mine in zip(requests, decode) for r in self._retry_one(req, mine)
                ]
        for r in results:
            r.forward_batch = len(requests)
        return results

    def _retry_one(self, request: SampleRequest, decode: bool) -> list[SampleResult]:
        try:
            return self._run([request], [decode])
        except CollectiveError:
            raise
        except Exception as exc:  # noqa: BLE001
            return [SampleResult(request, error=f"{type(exc).__name__}: {exc}")]

    @torch.inference_mode()
    def _run(self, requests: Sequence[SampleRequest], decode: Sequence[bool]) -> list[SampleResult]:
        with self.group.lockstep():
            encoded = self.encode(requests)
            latents, results = self.denoise(requests, encoded)
        return [self.decode(result, latents[i], decode[i]) for i, result in enumerate(results)]

    @_device_rules
    @torch.inference_mode()
    def encode(self, requests: Sequence[SampleRequest]) -> Encoded:
        """Encode stage of a micro-batch (the encoder role's work): each distinct (prompt,
        negative prompt) once, then one row per request.

        Args:
            requests: B >= 1 requests with equal ``batch_key``.
        Returns:
            The B rows of conditioning and per-request warnings.
        Raises:
            Exception: whatever the text encoders raise (the caller retries one by one).
        """
        first = requests[0]
        guidance = self.family.guided(first.guidance_scale, first.true_cfg_scale)
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
        return Encoded(cond, list(warnings))

    @_device_rules
    @torch.inference_mode()
    def denoise(
        self, requests: Sequence[SampleRequest], encoded: Encoded
    ) -> tuple[list[tuple[torch.Tensor, ...]], list[SampleResult]]:
        """Denoise stage of a micro-batch (the denoiser role's work): noise to latents under the
        intercept, every rank of the CFG group together.

        Args:
            requests: B >= 1 requests with equal ``batch_key``, in ``encoded``'s row order.
            encoded: their encode stage.
        Returns:
            Per request, its latents (one (1, ...) tensor per denoiser output: two for LTX-2's
            video and audio), and its result without an image: steps, gating, warnings, and
            the error "non-finite latents after denoising" where that happened.
        Raises:
            Exception: whatever the pipeline raises (the caller retries one by one).
        """
        if self.fault is not None:
            self.fault("denoise")
        first = requests[0]
        guidance = self.family.guided(first.guidance_scale, first.true_cfg_scale)
        cond = encoded.cond
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
        parts = latents if isinstance(latents, tuple) else (latents,)  # LTX-2: (video, audio)
        nonfinite = trace.nonfinite_errors(len(requests))
        gates = {n: g for n, g in trace.gates.items() if g.active}
        mine_all, results = [], []
        for i, request in enumerate(requests):
            result = SampleResult(
                request,
                warning=encoded.warnings[i],
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
            mine_all.append(mine)
            results.append(result)
        return mine_all, results

    @_device_rules
    @torch.inference_mode()
    def decode(self, result: SampleResult, latents: tuple[torch.Tensor, ...], decode: bool = True) -> SampleResult:
        """Decode stage of one sample (the decoder role's work), one sample per VAE call
        (diffusers' VAE slicing), so its bytes depend on nothing else in its micro-batch.

        Args:
            result: the sample's denoise result; an error result is returned as it is.
            latents: its latents, one (1, ...) tensor per denoiser output.
            decode: False where another rank of the CFG group decodes it (returned as it is).
        Returns:
            ``result`` with its image, or with the decode error (only this sample is lost).
        """
        if result.error is None and decode:
            request = result.request
            try:
                tuple_output = self.family.convention.outputs > 1  # LTX-2: (video, audio)
                result.image = self.family.decode(latents if tuple_output else latents[0],
                                                  height=request.height, width=request.width)[0]  # fmt: skip
            except Exception as exc:  # noqa: BLE001 - only this image is lost
                result.error = f"decode: {type(exc).__name__}: {exc}"
        return result
