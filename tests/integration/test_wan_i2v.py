"""The Wan image-to-video family in process, on tiny-wan-i2v (Wan 2.1 form) and tiny-wan22-ti2v
(Wan 2.2 TI2V form): what the pipeline hands its denoiser, and the stages against the stock call."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.families import family_for
from pipeline.families.wan_i2v import WanImageToVideoFamily
from pipeline.loading import load_pipeline, resolve_model
from pipeline.samples import ImageRef, SampleRequest

PROMPTS = ["a cat", "a lighthouse at dusk"]
SIZE = {"height": 32, "width": 32}


@pytest.fixture(scope="module", params=["tiny-wan-i2v", "tiny-wan22-ti2v"])
def pipe(request: pytest.FixtureRequest):  # noqa: ANN201
    model = resolve_model(request.param)
    return load_pipeline(model, dtype=torch.float32, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def image_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("i2v") / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(
        path
    )
    return path


def _generators() -> list[torch.Generator]:
    return [torch.Generator().manual_seed(10 + i) for i in range(len(PROMPTS))]


def _requests(image: Path) -> list[SampleRequest]:
    ref = ImageRef(path=image.name, root=str(image.parent))
    return [
        SampleRequest(
            sample_id=f"w{i}",
            prompt=p,
            negative_prompt="",
            seed=10 + i,
            num_inference_steps=2,
            guidance_scale=4.0,
            num_frames=5,
            image=ref,
            **SIZE,
        )
        for i, p in enumerate(PROMPTS)
    ]


def test_family_and_sizes(pipe) -> None:  # noqa: ANN001
    family = family_for(pipe)
    assert isinstance(family, WanImageToVideoFamily) and family.image_input
    ti2v = pipe.config.expand_timesteps
    assert (pipe.image_encoder is None) == ti2v
    # Wan 2.2's VAE is 16x spatial: patches of 2 make sizes multiples of 32.
    assert (family.size_multiple, family.default_size, family.default_num_frames) == (
        32 if ti2v else 16,
        32,
        5,
    )


def test_denoiser_gets_per_call_image_embeddings(pipe, image_file: Path) -> None:  # noqa: ANN001
    """Two calls per step, cond first; Wan 2.1's encoder_hidden_states_image is one (B, T, D)
    tensor in both calls (B, not 2B); Wan 2.2 TI2V has none, and per-token timesteps (B, seq)."""
    family = family_for(pipe)
    calls: list[dict] = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda m, a, k: calls.append(k), with_kwargs=True
    )
    try:
        cond = family.encode(PROMPTS, ["", ""], guidance=True)
        ref = ImageRef(path=str(image_file))
        latents = family.denoise(cond, _generators(), num_inference_steps=2, guidance_scale=4.0,
                                 guidance_rescale=0.0, num_frames=5, image=ref, **SIZE)  # fmt: skip
    finally:
        handle.remove()
    assert len(calls) == 4
    embeds = [torch.equal(k["encoder_hidden_states"], cond.cond["prompt_embeds"]) for k in calls]
    assert embeds == [True, False, True, False]
    image = [k["encoder_hidden_states_image"] for k in calls]
    if pipe.config.expand_timesteps:
        assert image == [None] * 4
        assert latents.shape == (2, 48, 2, 2, 2)
        assert calls[0]["hidden_states"].shape == (2, 48, 2, 2, 2)
        assert calls[0]["timestep"].shape == (2, 2 * 1 * 1)  # latent frames x (H' / 2) x (W' / 2)
        assert calls[0]["timestep"][0].tolist() == [0.0, 999.0]  # the image's frame: timestep 0
    else:
        assert image[0].shape == (2, 17, 32) and all(x is image[0] for x in image)
        assert torch.equal(image[0][0], image[0][1])  # one image for the micro-batch
        assert latents.shape == (2, 16, 2, 4, 4)
        assert calls[0]["hidden_states"].shape == (2, 36, 2, 4, 4)  # noise, mask, condition
    with pytest.raises(ValueError, match="needs an input image"):
        family.denoise(cond, _generators(), num_inference_steps=2, guidance_scale=4.0, guidance_rescale=0.0,
                       **SIZE)  # fmt: skip


def test_stages_through_the_intercept_equal_the_stock_pipeline(pipe, image_file: Path) -> None:  # noqa: ANN001
    """A micro-batch of two videos of one image: one forward per branch gives the stock frames
    (decoded one video per VAE call: diffusers' VAE slicing, as gen decodes) byte for byte; with
    cfg batching (cond and uncond in one forward) within 1/255."""
    from diffusers.utils import load_image

    from pipeline.generate import StageRunner

    pipe.vae.enable_slicing()
    try:
        stock = pipe(image=load_image(str(image_file)), prompt=PROMPTS, negative_prompt=["", ""], num_frames=5,
                     num_inference_steps=2, guidance_scale=4.0, generator=_generators(), output_type="np",
                     **SIZE).frames  # fmt: skip
    finally:
        pipe.vae.disable_slicing()
    stock_u8 = (stock * 255).round().astype(np.uint8)
    separate = StageRunner(pipe, cfg_batching=False, guidance_rescale=0.0).run(
        _requests(image_file)
    )
    batched = StageRunner(pipe, cfg_batching=True, guidance_rescale=0.0).run(_requests(image_file))
    for s, b, ref in zip(separate.results, batched.results, stock_u8):
        assert s.error is None and b.error is None
        assert s.image.shape == (5, 32, 32, 3)
        assert s.image.tobytes() == ref.tobytes()
        assert np.abs(b.image.astype(np.int16) - ref).max() <= 1


def test_an_unreadable_image_fails_its_rows_only(pipe, tmp_path: Path) -> None:  # noqa: ANN001
    from pipeline.generate import StageRunner

    (tmp_path / "bad.png").write_bytes(b"garbage")
    requests = _requests(tmp_path / "bad.png")
    out = StageRunner(pipe, cfg_batching=True, guidance_rescale=0.0).run(requests)
    assert [r.error for r in out.results] == [
        "ImageError: image 'bad.png': cannot read it: cannot identify image file "
        f"'{tmp_path / 'bad.png'}'"] * 2  # fmt: skip
