"""The LTX-2 family's pure logic: which calls a step makes for given scales (the pipeline's own
rules, with the audio scales' ``or`` fallback), option checks, and defaults that match
LTX2Pipeline.__call__. The real pipeline is tested in tests/integration/test_ltx2.py."""

from __future__ import annotations

import inspect

import pytest

from pipeline.families import family_class
from pipeline.families.ltx2 import LTX2Family


class _Pipe:
    """What the family reads of a pipeline without running it."""

    class transformer:  # noqa: N801
        class config:  # noqa: N801
            num_layers = 4  # the family reads the config: a split job's encoder role holds no blocks

    vae_spatial_compression_ratio = 32
    vae_temporal_compression_ratio = 8
    transformer_spatial_patch_size = 1
    transformer_temporal_patch_size = 1


def _family(**options: object) -> LTX2Family:
    family = LTX2Family(_Pipe())
    family.configure(**options)
    return family


FULL = (("uncond", "cond"), ("stg",), ("modality",))


def test_registered_with_the_pipelines_defaults() -> None:
    """call_defaults and guidance_defaults are LTX2Pipeline.__call__'s; STG blocks default to its [28]."""
    import diffusers

    assert family_class("LTX2Pipeline") is LTX2Family
    params = inspect.signature(diffusers.LTX2Pipeline.__call__).parameters
    for key, value in {**LTX2Family.call_defaults, **LTX2Family.guidance_defaults}.items():
        assert params[key].default == value, key
    assert LTX2Family(_Pipe()).stg_blocks == list(params["spatio_temporal_guidance_blocks"].default) == [28]
    conv = LTX2Family.convention
    assert conv.outputs == 2 and conv.latents_key in conv.sample_keys and not conv.merge_calls
    assert conv.branch_order == ("uncond", "cond", "stg", "modality")
    assert not {"spatio_temporal_guidance_blocks", "isolate_modalities", "fps", "num_frames"} & conv.sample_keys


def test_defaults_run_all_four_branches_in_three_calls() -> None:
    family = _family(spatio_temporal_guidance_blocks=[3])
    assert family.guided(3.0, None)
    assert family.step_calls(0, 30, True) == FULL
    assert family.branch_inputs(None) == {"stg": {"spatio_temporal_guidance_blocks": [3]},  # type: ignore[arg-type]
                                          "modality": {"isolate_modalities": True}}  # fmt: skip


@pytest.mark.parametrize(
    ("guidance_scale", "audio_guidance_scale", "guided"),
    [(3.0, 7.0, True), (1.0, 7.0, True), (1.0, 1.0, False), (3.0, 1.0, True),
     (1.0, None, False), (1.0, 0.0, False), (4.0, 0.0, True), (0.5, 0.0, False)],
)  # fmt: skip
def test_uncond_runs_when_either_scale_is_above_one(guidance_scale: float, audio_guidance_scale: float | None,
                                                    guided: bool) -> None:  # fmt: skip
    """The pipeline's ``audio_guidance_scale or guidance_scale``: None and 0.0 take the video value."""
    family = _family(audio_guidance_scale=audio_guidance_scale, spatio_temporal_guidance_blocks=[0])
    assert family.guided(guidance_scale, None) is guided


@pytest.mark.parametrize(
    ("options", "calls"),
    [
        ({"stg_scale": 0.0, "audio_stg_scale": 0.0}, (("uncond", "cond"), ("modality",))),
        ({"stg_scale": 0.0, "audio_stg_scale": None}, (("uncond", "cond"), ("modality",))),
        ({"stg_scale": 0.0, "audio_stg_scale": 0.5}, FULL),
        ({"modality_scale": 1.0, "audio_modality_scale": 1.0}, (("uncond", "cond"), ("stg",))),
        ({"modality_scale": 1.0, "audio_modality_scale": 0.0}, (("uncond", "cond"), ("stg",))),
        ({"modality_scale": 0.5, "audio_modality_scale": 2.0}, FULL),
        ({"stg_scale": 0.0, "audio_stg_scale": 0.0, "modality_scale": 1.0, "audio_modality_scale": 1.0},
         (("uncond", "cond"),)),
    ],
)  # fmt: skip
def test_stg_and_modality_calls_follow_their_scales(options: dict, calls: tuple) -> None:
    family = _family(spatio_temporal_guidance_blocks=[0], **options)
    assert family.step_calls(5, 10, True) == calls
    assert set(family.branch_inputs(None)) == {c[0] for c in calls[1:]}  # type: ignore[arg-type]


def test_stg_and_modality_run_without_cfg_too() -> None:
    """With CFG off the pipeline still makes the B-sized STG and modality calls (:1472-1483)."""
    family = _family(audio_guidance_scale=1.0, spatio_temporal_guidance_blocks=[0])
    assert not family.guided(1.0, None)
    assert family.step_calls(0, 2, False) == (("cond",), ("stg",), ("modality",))


def test_every_step_has_the_same_calls() -> None:
    family = _family(spatio_temporal_guidance_blocks=[1, 2])
    assert {family.step_calls(i, 7, True) for i in range(7)} == {FULL}


def test_bad_stg_blocks_name_the_option_and_the_range() -> None:
    with pytest.raises(ValueError, match=r"--spatio-temporal-guidance-blocks 4 is invalid: the transformer has "
                                         r"4 blocks \(0-3\)"):  # fmt: skip
        _family(spatio_temporal_guidance_blocks=[4])
    with pytest.raises(ValueError, match=r"--spatio-temporal-guidance-blocks 28 is invalid"):
        _family()  # the pipeline's [28] on a 4-block transformer
    with pytest.raises(ValueError, match=r"--spatio-temporal-guidance-blocks \(none\) is invalid"):
        _family(spatio_temporal_guidance_blocks=[])
    with pytest.raises(ValueError, match="--spatio-temporal-guidance-blocks -1 is invalid"):
        _family(spatio_temporal_guidance_blocks=[-1])
    family = _family(stg_scale=0.0, audio_stg_scale=0.0)  # STG off: no blocks needed
    assert family.pipe_options(0.0)["spatio_temporal_guidance_blocks"] is None


def test_bad_scales_and_unknown_options_are_refused() -> None:
    with pytest.raises(ValueError, match="--stg-scale -1.0 is invalid: must be >= 0"):
        _family(stg_scale=-1.0, spatio_temporal_guidance_blocks=[0])
    with pytest.raises(ValueError, match=r"--audio-guidance-rescale 1.5 is invalid: must be in \[0, 1\]"):
        _family(audio_guidance_rescale=1.5, spatio_temporal_guidance_blocks=[0])
    with pytest.raises(ValueError, match="--frame-rate 0 is invalid: must be > 0"):
        _family(frame_rate=0, spatio_temporal_guidance_blocks=[0])
    with pytest.raises(ValueError, match="--modality-scale nan is invalid"):
        _family(modality_scale=float("nan"), spatio_temporal_guidance_blocks=[0])
    with pytest.raises(ValueError, match="--skip-guidance-layers: _Pipe does not take it"):
        _family(skip_guidance_layers=(1,))


def test_pipe_options_and_the_guidance_rescale_rule() -> None:
    """gen's --guidance-rescale (default: call_defaults' 0.7, the pipeline's) is the video
    rescale; the audio one is configured alone."""
    family = _family(spatio_temporal_guidance_blocks=(2,), frame_rate=25.0)
    options = family.pipe_options(0.7)
    assert options == {**LTX2Family.guidance_defaults, "frame_rate": 25.0, "spatio_temporal_guidance_blocks": [2],
                       "guidance_rescale": 0.7}  # fmt: skip
    assert LTX2Family.call_defaults["guidance_rescale"] == 0.7
    assert family.pipe_options(0.3)["guidance_rescale"] == 0.3
    assert family.pipe_options(0.3)["audio_guidance_rescale"] == 0.7
    assert family.pipe_options(0.0)["guidance_rescale"] == 0.0


def test_sizes_and_frames() -> None:
    family = LTX2Family(_Pipe())
    assert (family.size_multiple, family.default_size, family.default_num_frames) == (32, 512, 121)
    assert family.check_num_frames(9) is None and family.check_num_frames(1) is None
    assert family.check_num_frames(121) is None
    assert "8k + 1" in family.check_num_frames(12)
    assert family.check_num_frames(0)
