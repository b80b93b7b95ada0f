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
