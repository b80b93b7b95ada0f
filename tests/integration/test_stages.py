"""The stages on a real diffusers pipeline: the intercept changes nothing that diffusers computes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.generate import SampleRequest, StageRunner
from pipeline.loading import load_pipeline, resolve_model

PROMPTS = ["a red bicycle", "a lighthouse at dusk", "ünïcödé 猫"]


@pytest.fixture(scope="module")
def pipe():  # noqa: ANN201
    return load_pipeline(resolve_model("tiny-sd"), dtype=torch.float32, device=torch.device("cpu"))


def _requests(guidance_scale: float) -> list[SampleRequest]:
    return [
        SampleRequest(sample_id=f"s{i}", prompt=p, negative_prompt="", seed=100 + i, height=64,
                      width=64, num_inference_steps=4, guidance_scale=guidance_scale)  # fmt: skip
        for i, p in enumerate(PROMPTS)
    ]


@pytest.mark.parametrize("guidance_scale", [5.0, 1.0])
def test_batched_cfg_equals_stock_pipeline(pipe, guidance_scale: float) -> None:  # noqa: ANN001
    out = StageRunner(pipe, cfg_batching=True, guidance_rescale=0.0).run(_requests(guidance_scale))
    generators = [torch.Generator().manual_seed(100 + i) for i in range(len(PROMPTS))]
    pipe.vae.enable_slicing()  # gen decodes one image per VAE call, as diffusers' VAE slicing does
    try:
        stock = pipe(PROMPTS, negative_prompt=[""] * 3, height=64, width=64, num_inference_steps=4,
                     guidance_scale=guidance_scale, generator=generators).images  # fmt: skip
    finally:
        pipe.vae.disable_slicing()
    for result, image in zip(out.results, stock):
        assert result.error is None
        assert result.image.tobytes() == image.tobytes()
        assert [s.uncond for s in result.steps] == ["fresh" if guidance_scale > 1 else "none"] * 4


def test_separate_branch_forwards_match_within_rounding(pipe) -> None:  # noqa: ANN001
    batched = StageRunner(pipe, cfg_batching=True, guidance_rescale=0.0).run(_requests(5.0))
    separate = StageRunner(pipe, cfg_batching=False, guidance_rescale=0.0).run(_requests(5.0))
    for a, b in zip(batched.results, separate.results):
        diff = np.abs(np.asarray(a.image, np.int16) - np.asarray(b.image, np.int16))
        assert diff.max() <= 1  # at most 1/255 per pixel
    # --max-forward-batch 3 < 2 branches x 3 samples: each branch its own forward, the same bits
    capped = StageRunner(pipe, cfg_batching=True, guidance_rescale=0.0, max_forward_batch=3).run(_requests(5.0))
    assert [a.image.tobytes() for a in capped.results] == [b.image.tobytes() for b in separate.results]


def test_decode_mask_decodes_only_this_ranks_images(pipe) -> None:  # noqa: ANN001
    """Under CFG parallelism each rank decodes its own images; the rest come back empty."""
    runner = StageRunner(pipe, cfg_batching=False, guidance_rescale=0.0)
    full = runner.run(_requests(5.0)).results
    part = runner.run(_requests(5.0), decode=[False, True, False]).results
    assert [r.image is None for r in part] == [True, False, True]
    assert all(r.error is None and len(r.steps) == 4 for r in part)
    assert part[1].image.tobytes() == full[1].image.tobytes()


def test_guidance_rescale_reaches_the_pipeline(pipe) -> None:  # noqa: ANN001
    plain = StageRunner(pipe, cfg_batching=True, guidance_rescale=0.0).run(_requests(5.0))
    rescaled = StageRunner(pipe, cfg_batching=True, guidance_rescale=0.7).run(_requests(5.0))
    assert plain.results[0].image.tobytes() != rescaled.results[0].image.tobytes()


def test_one_image_per_generator_is_batch_independent_in_noise(pipe) -> None:  # noqa: ANN001
    """Each image's initial noise comes from its own generator: same seed, same noise."""
    runner = StageRunner(pipe, cfg_batching=True, guidance_rescale=0.0)
    three = runner.run(_requests(5.0)).results
    alone = runner.run(_requests(5.0)[1:2]).results
    diff = np.abs(np.asarray(three[1].image, np.int16) - np.asarray(alone[0].image, np.int16))
    assert diff.max() <= 1  # only batch-size rounding differs


def _gated(steps: int, fraction: float, guidance_scale: float = 5.0) -> list[SampleRequest]:
    return [
        SampleRequest(sample_id=f"g{i}", prompt=p, negative_prompt="", seed=7 + i, height=64,
                      width=64, num_inference_steps=steps, guidance_scale=guidance_scale,
                      cfg_gate_step=fraction)  # fmt: skip
        for i, p in enumerate(PROMPTS)
    ]


def test_cfg_gating_on_tiny_sd(pipe) -> None:  # noqa: ANN001
    """8 steps, F = 0.5: 4 fresh and 4 reused uncond per sample; the UNet then runs the cond
    half only; F = 1.0 is exactly no gating."""
    runner = StageRunner(pipe, cfg_batching=True, guidance_rescale=0.0)
    calls: list[int] = []
    forward = pipe.unet.forward

    def counting(sample, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        calls.append(sample.shape[0])
        return forward(sample, *args, **kwargs)

    pipe.unet.forward = counting  # the intercept wraps this, the UNet's real forward inside
    try:
        gated = runner.run(_gated(8, 0.5)).results
    finally:
        del pipe.unet.forward
    assert calls == [6] * 4 + [3] * 4  # 2 x 3 images while fresh, 3 after the gate
    for r in gated:
        assert r.error is None
        assert [s.uncond for s in r.steps] == ["fresh"] * 4 + ["reused"] * 4
        assert r.gate_step == 4 and r.invalidations == 0
    plain = runner.run(_gated(8, 1.0)).results
    ungated = StageRunner(pipe, cfg_batching=True, guidance_rescale=0.0).run(
        [SampleRequest(**{**r.request.__dict__, "cfg_gate_step": 1.0}) for r in plain]
    ).results
    assert all(a.image.tobytes() == b.image.tobytes() for a, b in zip(plain, ungated))
    assert all(r.gate_step is None for r in plain)
    assert any(a.image.tobytes() != b.image.tobytes() for a, b in zip(gated, plain))


def test_cfg_gating_without_guidance_is_inert(pipe) -> None:  # noqa: ANN001
    out = StageRunner(pipe, cfg_batching=True, guidance_rescale=0.0).run(_gated(4, 0.0, 1.0))
    assert all([s.uncond for s in r.steps] == ["none"] * 4 for r in out.results)


@pytest.mark.parametrize(("threshold", "expected"), [(-1.0, ["fresh"] + ["reused"] * 3), (1.01, ["fresh"] * 4)])
def test_adaptive_cosine_gating_on_tiny_sd(pipe, threshold: float, expected: list[str]) -> None:  # noqa: ANN001
    """G = -1 fires at the first fresh step for every sample; G above 1 never fires."""
    runner = StageRunner(pipe, cfg_batching=True, guidance_rescale=0.0, cfg_gate_cosine=threshold)
    for r in runner.run(_gated(4, 1.0)).results:
        assert r.error is None
        assert [s.uncond for s in r.steps] == expected
        assert r.gate_step == (1 if threshold < 1 else None)
