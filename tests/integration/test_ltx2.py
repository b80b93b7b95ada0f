"""The LTX-2 family on the built-in tiny-ltx2 (an LTX-2.3-shaped LTX2Pipeline): the stages give
the stock pipeline's frames and sound, the pipeline makes the calls ``step_calls`` says, and the
later calls take exactly the cond branch's inputs plus ``branch_inputs``."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pipeline.families.ltx2 import LTX2Family
from pipeline.loading import load_pipeline, resolve_model
from pipeline.samples import AudioVideo
from pipeline.smoke.ltx2 import STG_BLOCK, build

PROMPTS = ["a cat", "a dog"]
SIZE = {"height": 64, "width": 64, "num_frames": 9}
VOCODER_BATCH_ATOL = 1e-6
"""The vocoder's convolutions round differently for 1 and 2 samples (measured: 1.2e-7 at most,
one float32 ulp of the [-1, 1] waveform); gen decodes one sample per call."""


@pytest.fixture(scope="module")
def pipe():  # noqa: ANN201
    model = resolve_model("tiny-ltx2")
    assert model.smoke_test
    return load_pipeline(model, dtype=torch.float32, device=torch.device("cpu"))


def _generators() -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in (1, 2)]


def _stock(pipe, **kwargs: Any) -> tuple[Any, Any]:  # noqa: ANN001
    """The stock call on PROMPTS with every branch on (the pipeline's defaults), 2 steps."""
    kwargs = {"num_inference_steps": 2, **kwargs}
    return pipe(prompt=PROMPTS, negative_prompt=["", ""], generator=_generators(),
                spatio_temporal_guidance_blocks=[STG_BLOCK], return_dict=False, **SIZE, **kwargs)  # fmt: skip


def _record(pipe, fn):  # noqa: ANN001, ANN202
    """fn()'s result and the transformer's keyword arguments of every call it made."""
    calls: list[dict[str, Any]] = []
    handle = pipe.transformer.register_forward_pre_hook(lambda m, a, k: calls.append(dict(k)), with_kwargs=True)
    try:
        return fn(), calls
    finally:
        handle.remove()


def test_tiny_ltx2_loads_with_the_models_defaults(pipe) -> None:  # noqa: ANN001
    assert type(pipe).__name__ == "LTX2Pipeline"
    assert type(pipe.text_encoder).__name__ == "Gemma3ForConditionalGeneration"
    assert not pipe.text_encoder.training
    family = LTX2Family(pipe)
    family.configure()
    assert (family.size_multiple, family.default_size, family.default_num_frames) == (32, 64, 9)
    assert family.stg_blocks == [STG_BLOCK] and len(pipe.transformer.transformer_blocks) == 2
    assert family.step_calls(0, 2, family.guided(3.0, None)) == (("uncond", "cond"), ("stg",), ("modality",))


def test_stages_equal_the_stock_pipeline(pipe) -> None:  # noqa: ANN001
    """encode -> denoise -> decode gives the stock frames byte for byte and its waveform: bytes
    when decoded as a batch, within the vocoder's batch rounding one sample at a time."""
    family = LTX2Family(pipe)
    family.configure()
    cond = family.encode(PROMPTS, ["", ""], guidance=True)
    assert cond.cond["prompt_embeds"].shape == (2, 1024, 32 * 3)
    assert cond.uncond["negative_prompt_attention_mask"].shape == (2, 1024)
    latents = family.denoise(cond, _generators(), num_inference_steps=2, guidance_scale=3.0, guidance_rescale=0.7,
                             **SIZE)  # fmt: skip
    assert [tuple(x.shape) for x in latents] == [(2, 8, 2, 2, 2), (2, 2, 9, 4)]
    stock_latents = _stock(pipe, output_type="latent")
    assert all(torch.equal(a, b) for a, b in zip(latents, stock_latents))

    video, audio = _stock(pipe, output_type="np")
    batched = family.decode(latents, height=64, width=64)
    for i, sample in enumerate(batched):
        assert isinstance(sample, AudioVideo)
        assert sample.frames.dtype == np.uint8 and sample.frames.shape == (9, 64, 64, 3)
        assert np.array_equal(sample.frames, (video[i] * 255).round().astype(np.uint8))
        assert sample.audio.dtype == np.float32 and sample.audio.shape == (2, 7920)
        assert np.array_equal(sample.audio, audio[i].numpy())
        assert (sample.sample_rate, sample.fps, sample.audio_s) == (24000, 24.0, 0.33)
        assert np.isfinite(sample.audio).all() and np.abs(sample.audio).max() <= 1

    pipe.vae.enable_slicing()  # one sample per VAE call, as gen decodes
    pipe.audio_vae.enable_slicing()
    try:
        video, audio = _stock(pipe, output_type="np")
    finally:
        pipe.vae.disable_slicing()
        pipe.audio_vae.disable_slicing()
    for i in range(2):
        (sample,) = family.decode((latents[0][i : i + 1], latents[1][i : i + 1]), height=64, width=64)
        assert np.array_equal(sample.frames, (video[i] * 255).round().astype(np.uint8))
        np.testing.assert_allclose(sample.audio, audio[i].numpy(), rtol=0, atol=VOCODER_BATCH_ATOL)


def test_later_calls_take_the_cond_branchs_inputs(pipe) -> None:  # noqa: ANN001
    """Per step: [uncond; cond] (2B), then stg and modality (B each), whose inputs are the cond
    half of the first call's per-sample inputs and its shared ones, but for branch_inputs."""
    family = LTX2Family(pipe)
    family.configure()
    _, calls = _record(pipe, lambda: _stock(pipe, output_type="latent"))
    assert len(calls) == 2 * len(family.step_calls(0, 2, True)) == 6
    overrides = family.branch_inputs(None)  # type: ignore[arg-type]
    for step in range(2):
        first, *later = calls[3 * step : 3 * step + 3]
        assert first["hidden_states"].shape == (4, 8, 8) and first["audio_hidden_states"].shape == (4, 9, 8)
        assert first["encoder_hidden_states"].shape == (4, 1024, 16)
        assert first["audio_encoder_hidden_states"].shape == (4, 1024, 8)
        assert first["video_coords"].shape == (4, 3, 8, 2) and first["audio_coords"].shape == (4, 1, 9, 2)
        for name, call in zip(("stg", "modality"), later):
            assert call.keys() == first.keys()
            for key, value in call.items():
                if key in overrides[name]:
                    assert value == overrides[name][key]
                elif isinstance(value, torch.Tensor):
                    assert key in family.convention.sample_keys, key
                    assert torch.equal(value, first[key][2:]), (name, key)  # the cond half
                else:
                    assert value == first[key], (name, key)
                    assert first[key] is None or key not in family.convention.sample_keys


def test_the_stg_and_modality_branches_change_the_prediction(pipe) -> None:  # noqa: ANN001
    """The tiny transformer makes every branch count: its STG blocks perturb self-attention
    (perturbed_attn) and isolating the modalities drops the audio <-> video cross-attention."""
    family = LTX2Family(pipe)
    family.configure()
    _, calls = _record(pipe, lambda: _stock(pipe, output_type="latent", num_inference_steps=1))
    with torch.no_grad():
        cond = pipe.transformer(**{**calls[1], "spatio_temporal_guidance_blocks": None})
        for call in calls[1:]:
            other = pipe.transformer(**call)
            assert not torch.equal(cond[0], other[0]) and not torch.equal(cond[1], other[1])


@pytest.mark.parametrize(
    ("options", "guidance_scale"),
    [({"audio_guidance_scale": 1.0}, 1.0), ({"stg_scale": 0.0, "audio_stg_scale": 0.0}, 3.0),
     ({"modality_scale": 1.0, "audio_modality_scale": 1.0, "stg_scale": 0.0, "audio_stg_scale": 0.0}, 1.0)],
)  # fmt: skip
def test_step_calls_are_the_pipelines_calls(pipe, options: dict, guidance_scale: float) -> None:  # noqa: ANN001
    family = LTX2Family(pipe)
    family.configure(**options)
    expected = family.step_calls(0, 1, family.guided(guidance_scale, None))

    def run() -> Any:
        cond = family.encode(PROMPTS, ["", ""], guidance=family.guided(guidance_scale, None))
        return family.denoise(cond, _generators(), num_inference_steps=1, guidance_scale=guidance_scale,
                              guidance_rescale=0.7, **SIZE)  # fmt: skip

    _, calls = _record(pipe, run)
    assert [c["hidden_states"].shape[0] for c in calls] == [2 * len(names) for names in expected]
    assert [(c["isolate_modalities"], c["spatio_temporal_guidance_blocks"]) for c in calls][1:] == [
        {"stg": (False, [STG_BLOCK]), "modality": (True, None)}[names[0]] for names in expected[1:]
    ]


def test_guidance_rescale_reaches_the_pipeline(pipe) -> None:  # noqa: ANN001
    family = LTX2Family(pipe)
    family.configure()
    cond = family.encode(PROMPTS, ["", ""], guidance=True)

    def denoise(rescale: float) -> torch.Tensor:
        return family.denoise(cond, _generators(), num_inference_steps=2, guidance_scale=3.0,
                              guidance_rescale=rescale, **SIZE)[0]  # fmt: skip

    assert torch.equal(denoise(0.7), _stock(pipe, output_type="latent")[0])  # the pipeline's own
    assert torch.equal(denoise(0.3), _stock(pipe, output_type="latent", guidance_rescale=0.3)[0])
    assert not torch.equal(denoise(0.3), denoise(0.7))


def test_build_is_byte_deterministic(tmp_path: Path) -> None:
    def digest(root: Path) -> dict[str, str]:
        return {str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest()
                for f in sorted(root.rglob("*")) if f.is_file()}  # fmt: skip

    build(tmp_path / "a")
    build(tmp_path / "b")
    files = digest(tmp_path / "a")
    assert files == digest(tmp_path / "b")
    assert sum((tmp_path / "a" / f).stat().st_size for f in files) < 4_000_000
