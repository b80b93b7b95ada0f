"""Role-based loading (pipeline.roles), stage files (jobs.output.stages) and the split options."""

from __future__ import annotations

import pytest
import torch

from jobs.config import BatchConfig, parse_role_gpus
from jobs.errors import JobError
from jobs.output.stages import cell_tensor, tensor_cell
from pipeline.loading import resolve_model
from pipeline.roles import ROLES, component_roles, load_role_pipeline, role_modules

# model -> {module component: the roles that load it}
EXPECTED = {
    "tiny-sd": {"text_encoder": "encoder", "unet": "denoiser", "vae": "decoder"},
    "tiny-sdxl": {"text_encoder": "encoder", "text_encoder_2": "encoder", "unet": "denoiser", "vae": "decoder"},
    "tiny-flux": {"text_encoder": "encoder", "text_encoder_2": "encoder", "transformer": "denoiser", "vae": "decoder"},
    "tiny-wan22": {"text_encoder": "encoder", "transformer": "denoiser", "transformer_2": "denoiser",
                   "vae": "decoder"},
    # Wan I2V's denoise encodes the conditioning image: CLIP image encoder and the VAE's encoder
    "tiny-wan-i2v": {"text_encoder": "encoder", "image_encoder": "denoiser", "transformer": "denoiser",
                     "vae": "denoiser decoder"},
    # LTX-2's denoise runs the text connectors
    "tiny-ltx2": {"text_encoder": "encoder", "connectors": "denoiser", "transformer": "denoiser",
                  "vae": "decoder", "audio_vae": "decoder", "vocoder": "decoder"},
}  # fmt: skip


@pytest.mark.parametrize("name", list(EXPECTED))
def test_each_role_loads_only_its_modules(name: str) -> None:
    path = resolve_model(name).path
    loads = {role: role_modules(path, role) for role in ROLES}
    found = {c: " ".join(r for r in ROLES if loads[r][c]) for c in loads["encoder"]}
    found = {c: r for c, r in found.items() if r}
    assert found == EXPECTED[name]


def test_a_role_pipeline_holds_stubs_for_the_other_modules() -> None:
    model = resolve_model("tiny-sdxl")
    pipe = load_role_pipeline(model, "denoiser", dtype=torch.float32, device=torch.device("cpu"))
    assert isinstance(pipe.unet, torch.nn.Module) and pipe.unet.device.type == "cpu"
    assert not isinstance(pipe.vae, torch.nn.Module)  # a stub: config, dtype, no weights
    assert pipe.vae.config.scaling_factor == pipe.vae.config["scaling_factor"]
    with pytest.raises(RuntimeError, match="the denoiser role does not load vae"):
        pipe.vae.decode(torch.zeros(1, 4, 8, 8))
    assert pipe.vae_scale_factor == 2 ** (len(pipe.vae.config.block_out_channels) - 1)


def test_unknown_components_load_in_every_role() -> None:
    assert component_roles("something_new") == ROLES
    assert component_roles("text_encoder_3") == ("encoder",)
    assert component_roles("vae", {"vae": ("denoiser", "decoder")}) == ("denoiser", "decoder")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.int64, torch.bool])
def test_stage_tensors_cross_losslessly(dtype: torch.dtype) -> None:
    t = (torch.randn(2, 3, 5) * 100).to(dtype)
    back = cell_tensor(tensor_cell("x", t))
    assert back.dtype == dtype and back.shape == t.shape
    assert torch.equal(back.view(torch.uint8) if dtype != torch.bool else back, t.view(torch.uint8) if dtype != torch.bool else t)
    assert cell_tensor(tensor_cell("none", None)) is None
    assert cell_tensor(tensor_cell("empty", torch.empty(0, 4))).shape == (0, 4)


def test_role_gpus_and_the_denoiser_grid() -> None:
    assert parse_role_gpus("encoder=1, denoiser=6,decoder=1") == (("encoder", 1), ("denoiser", 6), ("decoder", 1))
    for bad in ("gpu=1", "denoiser=0", "denoiser", "denoiser=2,denoiser=3"):
        with pytest.raises(JobError, match="--role-gpus"):
            parse_role_gpus(bad)
    config = BatchConfig(manifest="m", out="o", gpus=8, roles="split", role_gpus=(("denoiser", 6),),
                         cfg_parallel_size=2)  # fmt: skip
    assert dict(config.role_gpus) == {"encoder": 1, "denoiser": 6, "decoder": 1}
    assert config.cfg_parallel_size == 2 and config.dims.dp_size == 3
    from jobs.layout import resolve_layout

    auto = BatchConfig(manifest="m", out="o", roles="split", role_gpus=(("denoiser", 6),), batch_size=2)
    assert resolve_layout(auto, 4)[0].dims.describe().startswith("6 rank(s) = dp 3 x cfg 2")  # 2 micro-batches
    assert resolve_layout(auto, 12)[0].dims.dp_size == 6
    assert config.role_dims("encoder").cfg == 1 and config.role_dims("decoder").world_size == 1
    alone = BatchConfig(manifest="m", out="o", gpus=2, role="decoder")
    assert alone.role_ranks("decoder") == 2 and alone.split
    with pytest.raises(JobError, match="--role-gpus denoiser=3 --cfg-parallel-size 2"):
        BatchConfig(manifest="m", out="o", roles="split", role_gpus=(("denoiser", 3),), cfg_parallel_size=2)
    with pytest.raises(JobError, match="needs --roles split"):
        BatchConfig(manifest="m", out="o", role_gpus=(("denoiser", 3),))
    assert "roles" not in BatchConfig(manifest="m", out="o", roles="split").generation_options()
