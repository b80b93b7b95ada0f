"""The family registry: one file per family, each pipeline class served once, defaults that
match diffusers' own ``__call__``, and SD3's skip-layer window as the pipeline computes it."""

from __future__ import annotations

import inspect

import pytest

from pipeline.families import UnsupportedPipelineError, families, family_class
from pipeline.families.sd3 import StableDiffusion3Family
from pipeline.smoke import smoke_models

CLASSES = {"StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusion3Pipeline", "FluxPipeline",
           "PixArtSigmaPipeline", "QwenImagePipeline", "WanPipeline", "WanImageToVideoPipeline",
           "CogVideoXPipeline", "LTX2Pipeline"}  # fmt: skip


def test_every_family_file_is_registered_once() -> None:
    found = families()
    assert set(found) == CLASSES
    for cls, family in found.items():
        assert cls in family.pipeline_classes
        conv = family.convention
        assert conv.latents_key in conv.sample_keys
        assert "cond" in conv.branch_order and len(set(conv.branch_order)) == len(conv.branch_order)
        # Branches other than cond / uncond (LTX-2's stg, modality) come in later calls of their own.
        assert set(conv.calls[0]) <= {"cond", "uncond"}


def test_unknown_class_lists_the_supported_ones() -> None:
    with pytest.raises(UnsupportedPipelineError, match="AudioLDMPipeline is not supported; supported: CogVideoXPipeline, Flux"):
        family_class("AudioLDMPipeline")


@pytest.mark.parametrize("cls", sorted(CLASSES))
def test_defaults_are_the_pipelines_own(cls: str) -> None:
    """call_defaults equal the defaults of diffusers' __call__ (where diffusers has one: Qwen-Image's
    guidance_scale is None, only used by guidance-distilled transformers)."""
    import diffusers

    signature = inspect.signature(getattr(diffusers, cls).__call__)
    for key, value in family_class(cls).call_defaults.items():
        default = signature.parameters[key].default
        if default is not None:
            assert value == default, (cls, key)


def test_each_new_family_has_a_built_in_model() -> None:
    assert {"tiny-sd", "small-sd", "tiny-wan22", "tiny-sdxl", "tiny-sd3", "tiny-flux", "tiny-pixart-sigma",
            "tiny-qwenimage", "tiny-cogvideox", "tiny-ltx2", "tiny-wan-i2v",
            "tiny-wan22-ti2v"} <= set(smoke_models())  # fmt: skip


class _Pipe:
    class transformer:  # noqa: N801
        transformer_blocks = [None] * 4


def test_sd3_skip_layer_window_is_the_pipelines() -> None:
    """``i > N * start and i < N * stop`` (strict): 10 steps with the defaults -> step 1 only;
    nothing at 5 steps; start 0, stop 1 -> every step but the first."""
    family = StableDiffusion3Family(_Pipe())
    family.configure(skip_guidance_layers=(1, 2))
    with_skip = [i for i in range(10) if ("cond_skip",) in family.step_calls(i, 10, True)]
    assert with_skip == [1]
    assert not [i for i in range(5) if len(family.step_calls(i, 5, True)) > 1]
    assert family.step_calls(1, 10, False) == (("cond",),)  # no CFG: the pipeline drops SLG too
    family.configure(skip_guidance_layers=(1,), skip_layer_guidance_start=0.0, skip_layer_guidance_stop=1.0)
    assert [len(family.step_calls(i, 4, True)) for i in range(4)] == [1, 2, 2, 2]
    assert family.branch_inputs(None) == {"cond_skip": {"skip_layers": [1]}}  # type: ignore[arg-type]


def test_sd3_refuses_what_it_cannot_do() -> None:
    family = StableDiffusion3Family(_Pipe())
    with pytest.raises(ValueError, match="the transformer has 4 blocks"):
        family.configure(skip_guidance_layers=(4,))
    with pytest.raises(ValueError, match="needs --skip-guidance-layers"):
        family.configure(skip_layer_guidance_scale=3.0)


def test_other_families_refuse_family_options() -> None:
    family = family_class("StableDiffusionXLPipeline")(object())
    with pytest.raises(ValueError, match="--skip-guidance-layers: object does not take it"):
        family.configure(skip_guidance_layers=(1,))
