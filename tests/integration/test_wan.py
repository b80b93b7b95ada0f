"""The Wan family on the built-in tiny-wan22 (a Wan 2.2-shaped WanPipeline with two experts)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.families.wan import WanFamily
from pipeline.loading import load_pipeline, resolve_model

PROMPTS = ["a cat", "a lighthouse at dusk"]
SIZE = {"height": 32, "width": 48}  # not square: a swapped height / width shows


@pytest.fixture(scope="module")
def pipe():  # noqa: ANN201
    model = resolve_model("tiny-wan22")
    assert model.smoke_test
    return load_pipeline(model, dtype=torch.float32, device=torch.device("cpu"))


def _generators() -> list[torch.Generator]:
    return [torch.Generator().manual_seed(10 + i) for i in range(len(PROMPTS))]


def _record_calls(pipe, calls: list[tuple[str, tuple, dict]]) -> list:  # noqa: ANN001
    def hook(name: str):  # noqa: ANN202
        def pre(module, args, kwargs):  # noqa: ANN001, ANN202
            calls.append((name, args, kwargs))

        return pre

    return [getattr(pipe, n).register_forward_pre_hook(hook(n), with_kwargs=True)
            for n in WanFamily.convention.denoisers]  # fmt: skip


def test_tiny_wan22_loads_as_a_two_expert_wan_pipeline(pipe) -> None:  # noqa: ANN001
    assert type(pipe).__name__ == "WanPipeline"
    assert pipe.config.boundary_ratio == 0.875
    assert pipe.transformer is not None and pipe.transformer_2 is not None
    assert type(pipe.scheduler).__name__ == "UniPCMultistepScheduler"
    assert not pipe.text_encoder.training
    family = WanFamily(pipe)
    assert (family.size_multiple, family.default_size, family.default_num_frames) == (16, 64, 5)
    assert family.check_num_frames(5) is None and family.check_num_frames(1) is None
    assert "4k + 1" in family.check_num_frames(6)
    assert family.check_num_frames(0)


def test_stages_equal_the_stock_pipeline(pipe) -> None:  # noqa: ANN001
    """encode -> denoise -> decode gives the stock pipeline's frames byte for byte, and the
    denoise calls transformer (cond, uncond) for the high-noise steps, then transformer_2."""
    family = WanFamily(pipe)
    calls: list = []
    handles = _record_calls(pipe, calls)
    try:
        cond = family.encode(PROMPTS, ["", ""], guidance=True)
        latents = family.denoise(cond, _generators(), num_inference_steps=4, guidance_scale=4.0,
                                 guidance_rescale=0.0, num_frames=5, **SIZE)  # fmt: skip
    finally:
        for h in handles:
            h.remove()
    assert cond.cond["prompt_embeds"].shape == (2, 512, 32)
    assert latents.shape == (2, 16, 2, 4, 6) and latents.dtype == torch.float32

    def branch(kwargs: dict) -> str:
        embeds = kwargs["encoder_hidden_states"]
        if torch.equal(embeds, cond.cond["prompt_embeds"]):
            return "cond"
        assert torch.equal(embeds, cond.uncond["negative_prompt_embeds"])
        return "uncond"

    assert [(name, branch(kw)) for name, _, kw in calls] == (
        [("transformer", "cond"), ("transformer", "uncond")] * 2
        + [("transformer_2", "cond"), ("transformer_2", "uncond")] * 2
    )
    assert all(not args and set(kw) == {"hidden_states", "timestep", "encoder_hidden_states",
                                         "attention_kwargs", "return_dict"}
               for _, args, kw in calls)  # fmt: skip
    timesteps = [float(kw["timestep"][0]) for _, _, kw in calls[::2]]
    assert timesteps == [999.0, 900.0, 750.0, 500.0]  # boundary 875: 2 steps per expert

    videos = family.decode(latents, height=64, width=64)
    assert [(v.shape, v.dtype) for v in videos] == [((5, 32, 48, 3), np.uint8)] * 2
    stock = pipe(prompt=PROMPTS, negative_prompt=["", ""], num_frames=5, num_inference_steps=4,
                 guidance_scale=4.0, generator=_generators(), output_type="np", **SIZE).frames  # fmt: skip
    stock_u8 = (stock * 255).round().astype(np.uint8)
    for video, ref in zip(videos, stock_u8):
        assert video.tobytes() == ref.tobytes()
    # gen decodes one video per VAE call: equal to a batched decode here.
    alone = family.decode(latents[1:2], height=64, width=64)[0]
    assert np.abs(alone.astype(np.int16) - videos[1]).max() <= 1
    assert videos[0].tobytes() != videos[1].tobytes()


def test_without_guidance_only_the_cond_branch_runs(pipe) -> None:  # noqa: ANN001
    family = WanFamily(pipe)
    calls: list = []
    handles = _record_calls(pipe, calls)
    try:
        cond = family.encode(PROMPTS, ["", ""], guidance=False)
        latents = family.denoise(cond, _generators(), num_inference_steps=4, guidance_scale=1.0,
                                 guidance_rescale=0.0, **SIZE)  # fmt: skip
    finally:
        for h in handles:
            h.remove()
    assert cond.uncond is None
    assert latents.shape == (2, 16, 2, 4, 6)  # default_num_frames 5 -> 2 latent frames
    assert [name for name, _, _ in calls] == ["transformer"] * 2 + ["transformer_2"] * 2


def _requests(fraction: float) -> list:
    from pipeline.generate import SampleRequest

    return [
        SampleRequest(sample_id=f"w{i}", prompt=p, negative_prompt="", seed=10 + i,
                      num_inference_steps=4, guidance_scale=4.0, cfg_gate_step=fraction,
                      num_frames=5, **SIZE)  # fmt: skip
        for i, p in enumerate(PROMPTS)
    ]


def test_intercepted_two_call_pipeline_equals_stock(pipe) -> None:  # noqa: ANN001
    """Through the intercept with one forward per branch (cond first, as Wan calls them), the
    frames are the stock pipeline's, byte for byte; with cfg batching (cond and uncond in one
    forward) within 1/255."""
    from pipeline.generate import StageRunner

    stock = pipe(prompt=PROMPTS, negative_prompt=["", ""], num_frames=5, num_inference_steps=4,
                 guidance_scale=4.0, generator=_generators(), output_type="np", **SIZE).frames  # fmt: skip
    stock_u8 = (stock * 255).round().astype(np.uint8)
    separate = StageRunner(pipe, cfg_batching=False, guidance_rescale=0.0).run(_requests(1.0))
    batched = StageRunner(pipe, cfg_batching=True, guidance_rescale=0.0).run(_requests(1.0))
    for s, b, ref in zip(separate.results, batched.results, stock_u8):
        assert s.error is None and b.error is None
        assert [st.uncond for st in s.steps] == ["fresh"] * 4
        assert s.image.tobytes() == ref.tobytes()
        assert np.abs(b.image.astype(np.int16) - ref).max() <= 1


def test_gating_across_the_expert_switch(pipe) -> None:  # noqa: ANN001
    """4 steps, boundary after step 1, F = 0.25 (gate at step 1): step 0 fresh, step 1 reused,
    step 2 (transformer_2) fresh again with one invalidation, step 3 reused."""
    from pipeline.generate import StageRunner

    out = StageRunner(pipe, cfg_batching=True, guidance_rescale=0.0).run(_requests(0.25))
    for r in out.results:
        assert r.error is None
        assert [(s.denoiser, s.uncond) for s in r.steps] == [
            ("transformer", "fresh"), ("transformer", "reused"),
            ("transformer_2", "fresh"), ("transformer_2", "reused"),
        ]  # fmt: skip
        assert r.invalidations == 1 and r.gate_step == 1
