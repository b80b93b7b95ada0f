"""The LTX-2 family (LTX2Pipeline: LTX-2.0 / 2.3): text -> video with a sound track (diffusers
pipelines/ltx2/pipeline_ltx2.py, cited as :line).

LTX2Pipeline runs up to four guidance branches in three transformer calls per step, all by
keyword, and every call returns a **tuple** ``(video, audio)`` of velocity predictions:

1. ``cache_context("cond_uncond")``: [uncond; cond] under CFG (2B), else cond (B) (:1414-1437).
2. ``cache_context("uncond_stg")``: "stg", the cond inputs with
   ``spatio_temporal_guidance_blocks=<blocks>`` (self-attention of those blocks perturbed), B
   samples, when STG is on (:1485-1510).
3. ``cache_context("uncond_modality")``: "modality", the cond inputs with
   ``isolate_modalities=True`` (no audio <-> video cross-attention), B samples, when modality
   guidance is on (:1525-1550).

Calls 2 and 3 take the raw latents, the cond halves of the connector embeddings and mask
(``chunk(2)[1]``) and the first halves of the coordinates and timestep (``chunk(2)[0]``,
:1460-1471), which equal their cond halves (the coordinates are repeated, :1392-1394; the
timestep is ``t.expand``): exactly the cond branch's inputs, so the intercept may run them from
the cond branch plus ``branch_inputs``. The pipeline combines each modality in x0 space
(``x0 = sample - v sigma``, :851-858): ``c + (g - 1)(c - u) + s (c - c_stg) + (m - 1)(c - c_mod)``
(:1448, :1520, :1560, :1570), then ``rescale_noise_cfg`` when the rescale is > 0 (:1574-1587),
back to velocity (:1589) and a scheduler step; the audio uses a deep copy of the scheduler (:1354).

- Per sample (dim 0 = the call's batch): hidden_states (packed video latents, (n, F'H'W', C)),
  audio_hidden_states ((n, L, C_a M / 4)), encoder_hidden_states / audio_encoder_hidden_states
  (the connectors' outputs, (n, 1024, D_v) / (n, 1024, D_a)), encoder_attention_mask and
  audio_encoder_attention_mask (one (n, 1024) connector mask), timestep and sigma (one (n,)
  tensor), video_coords ((n, 3, F'H'W', 2)), audio_coords ((n, 1, L, 2)); and, None in
  LTX2Pipeline but per sample when given, audio_timestep, audio_sigma, perturbation_mask,
  video_self_attention_mask, video_keyframes_mask. Shared: num_frames, height, width (latent
  ints), fps, audio_num_frames, isolate_modalities, spatio_temporal_guidance_blocks (a list of
  block indices, not samples), use_cross_timestep, attention_kwargs, return_dict.
- The audio scales fall back to the video ones with ``or`` (:1157-1160): None *and 0.0* mean
  "the video value".

Shape legend: B = videos in the micro-batch, L_t = 1024 Gemma tokens, D_t = Gemma hidden x
(layers + 1) (every hidden state stacked, :354-355), C = video latent channels, F = frames,
F' = (F - 1) / 8 + 1 latent frames, H'/W' = H / 32, W / 32, C_a = audio latent channels,
L = audio latent frames, M = mel bins / 4.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from pipeline.families.base import Calls, CfgConvention, Conditioning, Family
from pipeline.prompts import truncation_warnings
from pipeline.samples import AudioVideo

MAX_SEQUENCE_LENGTH = 1024
"""Gemma tokens per prompt: LTX2Pipeline.__call__'s default (also encode_prompt's)."""
NATIVE_SIZE = 512
"""Pixels: the height of LTX2Pipeline's default 512 x 768; gen's default is square."""
NATIVE_NUM_FRAMES = 121
"""LTX2Pipeline's num_frames without a duration head (5 s at 24 fps)."""
NATIVE_STG_BLOCKS = (28,)
"""LTX2Pipeline.__call__'s spatio_temporal_guidance_blocks (LTX-2.3's block)."""
STG_BLOCKS_OPTION = "--spatio-temporal-guidance-blocks"


class LTX2Family(Family):
    """LTX2Pipeline: [uncond; cond], then the B-sized STG and modality calls; (video, audio)
    predictions from every call."""

    pipeline_classes = ("LTX2Pipeline",)
    role_components = {"connectors": ("denoiser",)}  # run inside __call__ (:1251), not by encode_prompt
    convention = CfgConvention(
        denoisers=("transformer",),
        calls=(("uncond", "cond"), ("stg",), ("modality",)),
        sample_keys=frozenset({
            "hidden_states", "audio_hidden_states", "encoder_hidden_states", "audio_encoder_hidden_states",
            "timestep", "audio_timestep", "sigma", "audio_sigma", "encoder_attention_mask",
            "audio_encoder_attention_mask", "video_coords", "audio_coords", "perturbation_mask",
            "video_self_attention_mask", "video_keyframes_mask",
        }),  # fmt: skip
        latents_key="hidden_states",
        merge_calls=False,  # the STG / modality kwargs differ from the cond call's
        outputs=2,  # the transformer returns (video, audio)
    )
    output_kind = "audio_video"
    call_defaults = {"num_inference_steps": 30, "guidance_scale": 3.0, "guidance_rescale": 0.7}
    guidance_defaults: dict[str, Any] = {
        "stg_scale": 1.0, "modality_scale": 3.0, "audio_guidance_scale": 7.0,
        "audio_stg_scale": 1.0, "audio_modality_scale": 3.0, "audio_guidance_rescale": 0.7, "frame_rate": 24.0,
    }  # fmt: skip
    """LTX2Pipeline.__call__'s own defaults of the options ``configure`` takes (besides
    spatio_temporal_guidance_blocks), checked against diffusers by a test."""

    def __init__(self, pipe: Any) -> None:
        super().__init__(pipe)
        self.options: dict[str, Any] = {**self.guidance_defaults, "spatio_temporal_guidance_blocks": None}

    def configure(self, **options: Any) -> None:
        """LTX-2's guidance options, diffusers' names and defaults: stg_scale (>= 0; > 0 runs
        the "stg" call), modality_scale (> 1 runs the "modality" call), audio_guidance_scale / audio_stg_scale /
        audio_modality_scale / audio_guidance_rescale (None or 0.0 = the video value, the
        pipeline's ``or``), spatio_temporal_guidance_blocks (transformer block indices; default
        the model's gen_defaults.json entry, else the pipeline's [28]) and frame_rate (frames per
        second > 0, what the positions are conditioned on and the video plays at).

        Raises:
            ValueError: another option, a negative or non-finite scale, a rescale outside
                [0, 1], a frame rate <= 0, or (with STG on) no blocks or a block the transformer
                does not have (the transformer would silently perturb nothing).
        """
        known = {*self.guidance_defaults, "spatio_temporal_guidance_blocks"}
        for name in options:
            if name not in known:
                super().configure(**{name: options[name]})
        merged = {**self.guidance_defaults, "spatio_temporal_guidance_blocks": None, **options}
        for name, value in merged.items():
            option = "--" + name.replace("_", "-")
            if name == "spatio_temporal_guidance_blocks" or (value is None and name.startswith("audio_")):
                continue
            if value is None or not math.isfinite(value) or value < 0:
                raise ValueError(f"{option} {value!r} is invalid: must be >= 0")
            if name.endswith("guidance_rescale") and value > 1:
                raise ValueError(f"{option} {value!r} is invalid: must be in [0, 1]")
            if name == "frame_rate" and value <= 0:
                raise ValueError(f"{option} {value!r} is invalid: must be > 0")
        if merged["spatio_temporal_guidance_blocks"] is not None:
            merged["spatio_temporal_guidance_blocks"] = list(merged["spatio_temporal_guidance_blocks"])
        self.options = merged
        self._check_stg_blocks()

    @property
    def stg_blocks(self) -> list[int]:
        """The STG call's ``spatio_temporal_guidance_blocks``: configured, else the model's
        gen_defaults.json entry, else the pipeline's [28]."""
        blocks = self.options["spatio_temporal_guidance_blocks"]
        if blocks is None:
            blocks = self.gen_defaults.get("spatio_temporal_guidance_blocks", NATIVE_STG_BLOCKS)
        return [int(i) for i in blocks]

    def _check_stg_blocks(self) -> None:
        """Raise ValueError when STG is on and its blocks are missing or not the transformer's."""
        if not self.do_spatio_temporal_guidance:
            return
        blocks = self.stg_blocks
        count = self.pipe.transformer.config.num_layers  # the config: a split job's encoder holds no blocks
        if not blocks or any(not 0 <= i < count for i in blocks):
            given = ",".join(map(str, blocks)) or "(none)"
            raise ValueError(f"{STG_BLOCKS_OPTION} {given} is invalid: the transformer has {count} blocks "
                             f"(0-{count - 1}); or turn STG off with --stg-scale 0 --audio-stg-scale 0")  # fmt: skip

    def _audio(self, name: str, video_value: float) -> float:
        """The pipeline's ``audio_x = audio_x or x`` (:1157-1160): None and 0.0 fall back."""
        return self.options[f"audio_{name}"] or video_value

    @property
    def do_spatio_temporal_guidance(self) -> bool:
        """STG on: stg_scale > 0 or the audio one > 0 (:906)."""
        stg = self.options["stg_scale"]
        return stg > 0 or self._audio("stg_scale", stg) > 0

    @property
    def do_modality_isolation_guidance(self) -> bool:
        """Modality guidance on: modality_scale > 1 or the audio one > 1 (:910)."""
        modality = self.options["modality_scale"]
        return modality > 1 or self._audio("modality_scale", modality) > 1

    def guided(self, guidance_scale: float, true_cfg_scale: float | None) -> bool:
        """Whether the pipeline runs an uncond branch: guidance_scale > 1 or the audio
        guidance scale > 1 (:902); the audio one falls back to guidance_scale when None or 0."""
        del true_cfg_scale
        return guidance_scale > 1 or self._audio("guidance_scale", guidance_scale) > 1

    def step_calls(self, step: int, num_steps: int, guidance: bool) -> Calls:
        """The calls the pipeline makes on every step: [uncond; cond] (``guidance``) or cond, then
        stg and modality when those are on, with or without CFG (:1485, :1525)."""
        del step, num_steps
        calls: list[tuple[str, ...]] = [("uncond", "cond") if guidance else ("cond",)]
        if self.do_spatio_temporal_guidance:
            calls.append(("stg",))
        if self.do_modality_isolation_guidance:
            calls.append(("modality",))
        return tuple(calls)

    def branch_inputs(self, cond: Conditioning) -> dict[str, dict[str, Any]]:
        """stg is the cond branch with the STG blocks, modality the cond branch with the audio
        <-> video cross-attention off (the pipeline's kwargs of calls 2 and 3)."""
        del cond
        inputs: dict[str, dict[str, Any]] = {}
        if self.do_spatio_temporal_guidance:
            inputs["stg"] = {"spatio_temporal_guidance_blocks": self.stg_blocks}
        if self.do_modality_isolation_guidance:
            inputs["modality"] = {"isolate_modalities": True}
        return inputs

    @property
    def size_multiple(self) -> int:
        """Pixels: 32 (check_inputs' own rule, :476) and the VAE's spatial ratio x the
        transformer's patch (32 x 1 for LTX-2)."""
        pipe = self.pipe
        return math.lcm(32, int(pipe.vae_spatial_compression_ratio) * int(pipe.transformer_spatial_patch_size))

    @property
    def default_size(self) -> int:
        """Pixels (square): ``default_size`` of the model's gen_defaults.json, else 512."""
        return int(self.gen_defaults.get("default_size", NATIVE_SIZE))

    @property
    def default_num_frames(self) -> int:
        """Frames: ``default_num_frames`` of the model's gen_defaults.json, else 121."""
        return int(self.gen_defaults.get("default_num_frames", NATIVE_NUM_FRAMES))

    def check_num_frames(self, num_frames: int) -> str | None:
        """Why ``num_frames`` is invalid, or None: it must be k x temporal ratio + 1 (8k + 1).

        The pipeline takes (F - 1) // 8 + 1 latent frames of any F and the VAE decodes them to
        8 (F' - 1) + 1 frames: other values silently come out shorter (e.g. 12 -> 9).
        """
        step = int(self.pipe.vae_temporal_compression_ratio) * int(self.pipe.transformer_temporal_patch_size)
        if num_frames < 1 or (num_frames - 1) % step:
            return f"must be {step}k + 1 (1, {step + 1}, {2 * step + 1}, ..., 121)"
        return None

    def prompt_warnings(self, prompts: Sequence[str], negative_prompts: Sequence[str]) -> list[str | None]:
        """Per prompt, a warning if Gemma's 1024 tokens truncate it or its negative prompt (the
        pipeline strips both first, :336). The quoted dropped text is approximate by a token at
        each end (Gemma adds no end token)."""
        return truncation_warnings(self.pipe.tokenizer, MAX_SEQUENCE_LENGTH, "Gemma", [p.strip() for p in prompts],
                                   [n.strip() for n in negative_prompts])  # fmt: skip

    @torch.no_grad()
    def encode(self, prompts: Sequence[str], negative_prompts: Sequence[str], *, guidance: bool) -> Conditioning:
        """Encode stage: text -> stacked Gemma hidden states, as LTX2Pipeline.__call__ encodes
        them (1024 tokens, left-padded; "" is the plain negative, as the pipeline's
        ``negative_prompt or ""``). The connectors run later, inside __call__ (:1251).

        Args:
            prompts: B prompts.
            negative_prompts: B negative prompts.
            guidance: whether negatives are needed (``guided``).
        Returns:
            Conditioning: prompt_embeds (B, 1024, D_t) in the text encoder's dtype and
            prompt_attention_mask (B, 1024) int64, and under guidance their negative_ twins.
        """
        pe, mask, npe, nmask = self.pipe.encode_prompt(
            prompt=list(prompts), negative_prompt=list(negative_prompts) if guidance else None,
            do_classifier_free_guidance=guidance, num_videos_per_prompt=1, max_sequence_length=MAX_SEQUENCE_LENGTH,
            device=self.pipe._execution_device,
        )  # fmt: skip
        uncond = {"negative_prompt_embeds": npe, "negative_prompt_attention_mask": nmask} if guidance else None
        return Conditioning({"prompt_embeds": pe, "prompt_attention_mask": mask}, uncond)

    def pipe_options(self, guidance_rescale: float) -> dict[str, Any]:
        """The guidance keyword arguments of the pipeline call: the configured options, the STG
        blocks, and the video rescale (``denoise``'s rule).

        Raises:
            ValueError: STG is on and its blocks are not the transformer's.
        """
        self._check_stg_blocks()
        options = dict(self.options)
        options["spatio_temporal_guidance_blocks"] = self.stg_blocks if self.do_spatio_temporal_guidance else None
        options["guidance_rescale"] = guidance_rescale
        return options

    def denoise(
        self,
        cond: Conditioning,
        generators: list[torch.Generator],
        *,
        height: int,
        width: int,
        num_inference_steps: int,
        guidance_scale: float,
        guidance_rescale: float,
        num_frames: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Denoise stage: the stock pipeline from noise to latents (output_type="latent") with
        the configured guidance options.

        Args:
            cond: (B, 1024, D_t) embeddings and (B, 1024) masks, one row per video.
            generators: B generators, one per video (the video noise, then the audio noise).
            height, width: pixels, multiples of ``size_multiple``.
            num_inference_steps: scheduler steps, >= 1.
            guidance_scale: the video CFG scale g (the audio one is configured; CFG runs while
                either is > 1).
            guidance_rescale: the video rescale phi in [0, 1] (gen's --guidance-rescale, whose
                default is call_defaults' 0.7, the pipeline's own; 0 = off). The audio rescale
                is configured alone (audio_guidance_rescale; None = this value).
            num_frames: 8k + 1 frames; None = ``default_num_frames``.
        Returns:
            (video latents (B, C, F', H', W'), audio latents (B, C_a, L, M)), float32, both
            denormalized (the VAEs' latents_mean / latents_std applied, :1623-1631).
        """
        video, audio = self.pipe(
            **cond.pipe_kwargs,
            height=height,
            width=width,
            num_frames=num_frames or self.default_num_frames,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            **self.pipe_options(guidance_rescale),
            generator=generators,
            output_type="latent",
            return_dict=False,
        )
        return video, audio

    @torch.no_grad()
    def decode(self, latents: tuple[torch.Tensor, torch.Tensor], *, height: int, width: int) -> list[AudioVideo]:
        """Decode stage, as the end of LTX2Pipeline.__call__ (:1634-1664): video latents to the
        VAE's dtype, ``vae.decode`` (timestep None, or 0 with ``timestep_conditioning``: the
        default decode_timestep 0.0 mixes in no noise), postprocess_video to floats in [0, 1],
        then ``(x * 255).round()`` to uint8 as diffusers' numpy_to_pil does; audio latents to the
        audio VAE's dtype, ``audio_vae.decode`` (a mel spectrogram), the vocoder (a waveform).

        Where the text encoder is not float32 (bf16 on GPU), the pipeline casts the still
        normalized latents to its dtype before denormalizing them there (:1635, :1654); this
        stage normalizes back in float32 and does the same.

        Args:
            latents: ``denoise``'s (video (B, C, F', H', W'), audio (B, C_a, L, M)).
        Returns:
            B AudioVideo: frames (F, H, W, 3) uint8, audio (2, S) float32 in [-1, 1] at the
            vocoder's output_sampling_rate, fps = the configured frame_rate.
        """
        del height, width  # follow from the latents
        pipe, vae, audio_vae = self.pipe, self.pipe.vae, self.pipe.audio_vae
        video_latents, audio_latents = latents
        video_latents = video_latents.to(next(vae.parameters()).device)
        dtype = pipe.text_encoder.dtype if pipe.text_encoder is not None else torch.float32
        if dtype != video_latents.dtype:  # redo the pipeline's denormalization in its dtype
            sf = vae.config.scaling_factor
            normalized = pipe._normalize_latents(video_latents, vae.latents_mean, vae.latents_std, sf)
            video_latents = pipe._denormalize_latents(normalized.to(dtype), vae.latents_mean, vae.latents_std, sf)
        timestep = None
        if vae.config.timestep_conditioning:
            timestep = torch.zeros(video_latents.shape[0], device=video_latents.device, dtype=video_latents.dtype)
        video = vae.decode(video_latents.to(vae.dtype), timestep, return_dict=False)[0]
        frames = pipe.video_processor.postprocess_video(video, output_type="np")
        audio_latents = audio_latents.to(next(audio_vae.parameters()).device, dtype=audio_vae.dtype)
        mel = audio_vae.decode(audio_latents, return_dict=False)[0]
        waveforms = pipe.vocoder(mel).float().cpu().numpy()
        sample_rate = int(pipe.vocoder.config.output_sampling_rate)
        fps = float(self.options["frame_rate"])
        return [AudioVideo(frames=(f * 255).round().astype(np.uint8), audio=w, sample_rate=sample_rate, fps=fps)
                for f, w in zip(frames, waveforms)]  # fmt: skip


FAMILY = LTX2Family
