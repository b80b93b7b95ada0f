"""Stable Diffusion 3 / 3.5 (StableDiffusion3Pipeline): one transformer call per step on
[uncond; cond], uncond first; with skip-layer guidance a second call on the steps of its window,
cond only, with ``skip_layers`` (diffusers pipelines/stable_diffusion_3/pipeline_stable_diffusion_3.py
:1074-1109).

- Per sample (2B in the batched call): hidden_states, timestep (t.expand), encoder_hidden_states
  (B, 77 + 256, D: CLIP padded to T5's width, then T5), pooled_projections (B, D_clip1 +
  D_clip2). Shared: joint_attention_kwargs (copied by the transformer, not mutated), return_dict.
- Skip-layer guidance (SLG) is a third branch, "cond_skip": the cond branch's inputs plus
  ``skip_layers``; the pipeline runs it on step i when ``i > N * start and i < N * stop``
  (strict: never step 0 unless start < 0; nothing at N <= 5 with the default 0.01 / 0.2) and
  only under CFG. It cannot share a forward with the other branches (a different
  ``skip_layers``), so it is its own forward, as in the stock pipeline, and goes to its own
  rank of a CFG group. The pipeline combines: ``u + g (c - u)``, then ``+ (c - c_skip) s``.
  CFG gating treats cond_skip as any auxiliary branch: past its gate step (``--cfg-gate-step``,
  or its own ``cond_skip=F``) it is rebuilt from the cached delta ``cond - cond_skip``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from pipeline.families.base import Calls, CfgConvention, Conditioning, Family
from pipeline.prompts import truncation_warnings

MAX_SEQUENCE_LENGTH = 256
"""T5 tokens per prompt: StableDiffusion3Pipeline.__call__'s default."""


class StableDiffusion3Family(Family):
    """StableDiffusion3Pipeline: batched [uncond; cond], and SLG's cond_skip call in its window."""

    pipeline_classes = ("StableDiffusion3Pipeline",)
    convention = CfgConvention(
        denoisers=("transformer",),
        calls=(("uncond", "cond"),),
        sample_keys=frozenset({"hidden_states", "timestep", "encoder_hidden_states", "pooled_projections"}),
        latents_key="hidden_states",
    )
    call_defaults = {"num_inference_steps": 28, "guidance_scale": 7.0}
    extra_branches = ("cond_skip",)
    slg_defaults = {"skip_layer_guidance_scale": 2.8, "skip_layer_guidance_start": 0.01,
                    "skip_layer_guidance_stop": 0.2}  # fmt: skip
    """StableDiffusion3Pipeline.__call__'s skip-layer guidance defaults."""

    def __init__(self, pipe: Any) -> None:
        super().__init__(pipe)
        self.slg: dict[str, Any] = {}

    def configure(self, **options: Any) -> None:
        """Skip-layer guidance: ``skip_guidance_layers`` (block indices, each < the number of
        transformer blocks) and its scale / start / stop; nothing else.

        Raises:
            ValueError: another option, scale / start / stop without layers, or a block index
                the transformer does not have (diffusers would silently skip nothing).
        """
        known = {"skip_guidance_layers", *self.slg_defaults}
        for name in options:
            if name not in known:
                super().configure(**{name: options[name]})
        layers = options.get("skip_guidance_layers")
        if layers is None:
            if options:
                raise ValueError(f"--{next(iter(options)).replace('_', '-')} needs --skip-guidance-layers")
            self.slg = {}
            return
        blocks = len(self.pipe.transformer.transformer_blocks)
        if any(i >= blocks for i in layers):
            raise ValueError(f"--skip-guidance-layers {','.join(map(str, layers))}: the transformer has "
                             f"{blocks} blocks (0-{blocks - 1})")  # fmt: skip
        self.slg = {**self.slg_defaults, **options, "skip_guidance_layers": list(layers)}

    def step_calls(self, step: int, num_steps: int, guidance: bool) -> Calls:
        """With SLG, the steps of its window have a second call: cond_skip."""
        calls = super().step_calls(step, num_steps, guidance)
        if guidance and self.slg:
            start, stop = self.slg["skip_layer_guidance_start"], self.slg["skip_layer_guidance_stop"]
            if step > num_steps * start and step < num_steps * stop:  # the pipeline's own test
                return (*calls, ("cond_skip",))
        return calls

    def branch_inputs(self, cond: Conditioning) -> dict[str, dict[str, Any]]:
        """cond_skip is the cond branch with the blocks to skip."""
        return {"cond_skip": {"skip_layers": self.slg["skip_guidance_layers"]}} if self.slg else {}

    @property
    def size_multiple(self) -> int:
        """Pixels: VAE scale factor x transformer patch size (16 for SD3)."""
        return int(self.pipe.vae_scale_factor * self.pipe.transformer.config.patch_size)

    @property
    def default_size(self) -> int:
        """Pixels: transformer sample_size x VAE scale factor, the pipeline's own default."""
        return int(self.pipe.transformer.config.sample_size * self.pipe.vae_scale_factor)

    def prompt_warnings(self, prompts: Sequence[str], negative_prompts: Sequence[str]) -> list[str | None]:
        """Per prompt, a warning if CLIP's 77 or T5's 256 tokens truncate it or its negative."""
        clip = truncation_warnings(self.pipe.tokenizer, self.pipe.tokenizer_max_length, "CLIP", prompts,
                                   negative_prompts)  # fmt: skip
        t5 = truncation_warnings(self.pipe.tokenizer_3, MAX_SEQUENCE_LENGTH, "T5", prompts, negative_prompts) \
            if self.pipe.tokenizer_3 is not None else [None] * len(prompts)  # fmt: skip
        return ["; ".join(w for w in pair if w) or None for pair in zip(clip, t5)]

    @torch.no_grad()
    def encode(self, prompts: Sequence[str], negative_prompts: Sequence[str], *, guidance: bool) -> Conditioning:
        """Encode stage, as StableDiffusion3Pipeline.__call__ encodes (256 T5 tokens; "" is the
        plain negative).

        Returns:
            Conditioning: prompt_embeds (B, 77 + 256, D), pooled_prompt_embeds (B, D_pool), and
            under guidance their negative_ twins.
        """
        pe, npe, pooled, npooled = self.pipe.encode_prompt(
            prompt=list(prompts), prompt_2=None, prompt_3=None,
            negative_prompt=list(negative_prompts) if guidance else None, negative_prompt_2=None,
            negative_prompt_3=None, do_classifier_free_guidance=guidance, device=self.pipe._execution_device,
            clip_skip=None, num_images_per_prompt=1, max_sequence_length=MAX_SEQUENCE_LENGTH, lora_scale=None,
        )  # fmt: skip
        uncond = {"negative_prompt_embeds": npe, "negative_pooled_prompt_embeds": npooled} if guidance else None
        return Conditioning({"prompt_embeds": pe, "pooled_prompt_embeds": pooled}, uncond)

    def denoise(self, cond: Conditioning, generators: list[torch.Generator], *, height: int, width: int,
                num_inference_steps: int, guidance_scale: float, guidance_rescale: float) -> torch.Tensor:  # fmt: skip
        """Denoise stage: the stock pipeline from noise to latents (output_type="latent"), with
        skip-layer guidance when configured.

        Args:
            guidance_rescale: not an SD3 argument; ignored.
        Returns:
            Latents (B, 16, H/8, W/8), scaled.
        """
        del guidance_rescale
        return self.pipe(
            **cond.pipe_kwargs, height=height, width=width, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, generator=generators, output_type="latent", return_dict=False,
            **self.slg,
        )[0]  # fmt: skip

    @torch.no_grad()
    def decode(self, latents_BCHW: torch.Tensor, *, height: int, width: int) -> list[Any]:
        """Decode stage, as the end of __call__: ``latents / scaling + shift``, VAE, PIL."""
        del height, width
        vae = self.pipe.vae
        latents = latents_BCHW / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        return self.pipe.image_processor.postprocess(image, output_type="pil")


FAMILY = StableDiffusion3Family
