"""BatchConfig: the resolved options of one `gen batch` job (saved in OUT/job.json)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from jobs.errors import JobError
from parallel.dims import ParallelDims

DEFAULT_SHARD_ROWS = 1000
ROLE_MODES = ("monolithic", "split")
ROLE_NAMES = ("encoder", "denoiser", "decoder")
"""pipeline.roles.ROLES (not imported here: the CLI checks options before torch is imported)."""
DTYPES = ("auto", "float32", "float16", "bfloat16")


@dataclass(frozen=True, kw_only=True)
class BatchConfig:
    """Options of `gen batch`. Per-row manifest columns override the generation defaults."""

    manifest: str
    """Path of the parquet manifest."""
    out: str
    """Output directory."""
    model: str | None = None
    """Built-in name, local diffusers directory or hub id; None = tiny-sd."""
    dtype: str = "auto"
    """auto = bfloat16 on GPU, float32 on CPU."""
    num_inference_steps: int | None = None
    """Scheduler steps, >= 1; None = the pipeline's own default (SD 50, Flux 28, PixArt 20...)."""
    guidance_scale: float | None = None
    """CFG scale s >= 0; <= 1 disables guidance (no unconditional forward); None = the
    pipeline's own default (SD 7.5, SDXL 5, Flux's distilled guidance 3.5...)."""
    true_cfg_scale: float | None = None
    """diffusers' true_cfg_scale >= 0 of pipelines with real CFG over a negative prompt beside a
    distilled guidance (Flux, Qwen-Image); None = the pipeline's default."""
    skip_guidance_layers: tuple[int, ...] | None = None
    """SD3's skip-layer guidance: transformer blocks skipped in the "cond_skip" branch, >= 0."""
    skip_layer_guidance_scale: float | None = None
    """SD3: scale of the skip-layer term, >= 0; None = the pipeline's default (2.8)."""
    skip_layer_guidance_start: float | None = None
    """SD3: fraction of the steps in [0, 1] where skip-layer guidance starts (default 0.01)."""
    skip_layer_guidance_stop: float | None = None
    """SD3: fraction of the steps in [0, 1] where it stops (default 0.2)."""
    cfg_gate_step: float = 1.0
    """CFG gating fraction F in [0, 1] (sglang's cfg_gate_step): from step int(steps * F) on,
    the uncond forward is skipped and rebuilt from the cached cond - uncond delta; 1.0 = off."""
    cfg_gate_steps: tuple[tuple[str, float], ...] = ()
    """Per auxiliary branch (uncond, stg, modality, cond_skip), its own gating fraction in
    [0, 1], overriding cfg_gate_step for it (``--cfg-gate-step uncond=0.6,stg=0.3``)."""
    cfg_gate_cosine: float | None = None
    """Adaptive gating: a sample stops running uncond once cos(cond, uncond) >= this, in
    [-1, 1]; None = off."""
    guidance_rescale: float | None = None
    """diffusers' guidance_rescale in [0, 1]; 0 = off; None = the pipeline's own (0, LTX-2 0.7)."""
    stg_scale: float | None = None
    """LTX-2: spatio-temporal guidance scale >= 0 (0 = no stg branch); None = the pipeline's (1)."""
    modality_scale: float | None = None
    """LTX-2: modality-isolation guidance scale >= 0 (<= 1 = no modality branch, unless the
    audio one is > 1); None = the pipeline's (3)."""
    audio_guidance_scale: float | None = None
    """LTX-2: CFG scale of the audio prediction; None = the pipeline's (7)."""
    audio_stg_scale: float | None = None
    """LTX-2: stg scale of the audio prediction; None = the pipeline's (1)."""
    audio_modality_scale: float | None = None
    """LTX-2: modality scale of the audio prediction; None = the pipeline's (3)."""
    audio_guidance_rescale: float | None = None
    """LTX-2: guidance_rescale of the audio prediction in [0, 1]; None = the pipeline's (0.7)."""
    spatio_temporal_guidance_blocks: tuple[int, ...] | None = None
    """LTX-2: transformer blocks perturbed in the stg branch, >= 0; None = the pipeline's ([28],
    or the model's gen_defaults.json for built-in models)."""
    frame_rate: float | None = None
    """LTX-2: frames per second the video is conditioned on and written at, > 0; None = 24."""
    height: int | None = None
    """Pixels, > 0, multiple of 8; None = the model's native size."""
    width: int | None = None
    """Pixels, > 0, multiple of 8; None = the model's native size."""
    num_frames: int | None = None
    """Video models: frames per video, >= 1 (Wan: 4k + 1); None = the model's default."""
    images_per_prompt: int = 1
    """Images per manifest row, >= 1 (diffusers' num_images_per_prompt)."""
    batch_size: int = 4
    """Prompts per denoiser forward, >= 1."""
    seed: int = 0
    """Job seed: rows without a `seed` get one derived from (seed, sample id)."""
    shard_size: int | None = None
    """Manifest rows per shard, a multiple of batch_size; None = ~1000 rounded up to one."""
    gpus: int = 1
    """Ranks on this node (one per GPU; CPU ranks when there is no GPU), >= 1."""
    cfg_parallel_size: int | None = None
    """Ranks of a CFG group (sglang's --cfg-parallel-size); gpus = dp x cfg. None = auto: data
    parallel first, CFG groups only where ranks would idle (jobs.layout resolves it against the
    manifest before anything runs; until then ``dims`` counts it as 1)."""
    cfg_batching: bool = True
    """Run a rank's CFG branches as one concatenated forward (False: one forward per branch)."""
    max_forward_batch: int | None = None
    """Most samples one denoiser forward may hold, >= batch_size (a micro-batch's cond branch is
    one forward); branches are concatenated only up to it (auto layout does not change for it:
    jobs.layout.resolve_layout). None: no cap."""
    compile: bool = False
    """torch.compile the denoisers (pipeline.compile: their repeated blocks where the model
    declares them, dynamic shapes); compiled kernels round differently, so it is a generation option."""
    overlap_writes: bool = True
    """Encode media and write part files on a background thread while the next micro-batch runs
    (jobs.local.writer); False writes them between micro-batches. Bytes are the same."""
    collective_timeout_s: float = 300.0
    """Seconds a collective may wait before the run fails instead of hanging, > 0."""
    roles: str = "monolithic"
    """"monolithic" (each rank runs the whole pipeline) or "split" (encoder, denoiser and decoder
    ranks, each loading only its own modules: jobs.local.stages)."""
    role: str | None = None
    """Run one role alone ("encoder", "denoiser", "decoder") on --gpus ranks; None = all."""
    role_gpus: tuple[tuple[str, int], ...] = ()
    """Ranks per role of a split job, e.g. (("encoder", 1), ("denoiser", 6), ("decoder", 1));
    resolved on construction to all three (default encoder 1, denoiser --gpus, decoder 1;
    ``role`` alone: that role --gpus). Roles share the node's devices round-robin."""
    keep_intermediates: bool = False
    """Keep OUT/stages/ (the encoder and denoiser stage files) after a shard is committed."""

    def __post_init__(self) -> None:
        def need(ok: bool, option: str, value: Any, allowed: str) -> None:
            if not ok:
                raise JobError(f"{option} {value!r} is invalid: {allowed}")

        need(self.dtype in DTYPES, "--dtype", self.dtype, f"one of {', '.join(DTYPES)}")
        need(self.num_inference_steps is None or self.num_inference_steps >= 1, "--steps",
             self.num_inference_steps, "must be >= 1")  # fmt: skip
        for option, value in (("--guidance-scale", self.guidance_scale), ("--true-cfg-scale", self.true_cfg_scale),
                              ("--skip-layer-guidance-scale", self.skip_layer_guidance_scale)):  # fmt: skip
            need(value is None or (math.isfinite(value) and value >= 0), option, value, "must be >= 0")
        for option, value in (("--skip-layer-guidance-start", self.skip_layer_guidance_start),
                              ("--skip-layer-guidance-stop", self.skip_layer_guidance_stop)):  # fmt: skip
            need(value is None or 0 <= value <= 1, option, value, "must be in [0, 1]")
        if self.skip_guidance_layers is not None:
            layers = tuple(self.skip_guidance_layers)
            need(bool(layers) and all(isinstance(i, int) and i >= 0 for i in layers), "--skip-guidance-layers",
                 ",".join(map(str, layers)), "comma-separated block indices >= 0")  # fmt: skip
            object.__setattr__(self, "skip_guidance_layers", layers)
        need(0 <= self.cfg_gate_step <= 1, "--cfg-gate-step", self.cfg_gate_step, "must be in [0, 1]")
        steps = tuple((str(n), float(f)) for n, f in self.cfg_gate_steps)
        for n, f in steps:
            need(n.isidentifier() and 0 <= f <= 1, "--cfg-gate-step", f"{n}={f:g}",
                 "BRANCH=F with F in [0, 1]")  # fmt: skip
        object.__setattr__(self, "cfg_gate_steps", steps)
        need(self.cfg_gate_cosine is None or -1 <= self.cfg_gate_cosine <= 1, "--cfg-gate-cosine",
             self.cfg_gate_cosine, "must be in [-1, 1]")  # fmt: skip
        for option, value in (("--guidance-rescale", self.guidance_rescale),
                              ("--audio-guidance-rescale", self.audio_guidance_rescale)):  # fmt: skip
            need(value is None or 0 <= value <= 1, option, value, "must be in [0, 1]")
        for option, value in (("--stg-scale", self.stg_scale), ("--modality-scale", self.modality_scale),
                              ("--audio-guidance-scale", self.audio_guidance_scale),
                              ("--audio-stg-scale", self.audio_stg_scale),
                              ("--audio-modality-scale", self.audio_modality_scale)):  # fmt: skip
            need(value is None or (math.isfinite(value) and value >= 0), option, value, "must be >= 0")
        need(self.frame_rate is None or (math.isfinite(self.frame_rate) and self.frame_rate > 0), "--frame-rate",
             self.frame_rate, "must be > 0")  # fmt: skip
        if self.spatio_temporal_guidance_blocks is not None:
            blocks = tuple(self.spatio_temporal_guidance_blocks)
            need(bool(blocks) and all(isinstance(i, int) and i >= 0 for i in blocks),
                 "--spatio-temporal-guidance-blocks", ",".join(map(str, blocks)),
                 "comma-separated block indices >= 0")  # fmt: skip
            object.__setattr__(self, "spatio_temporal_guidance_blocks", blocks)
        for option, value in (("--height", self.height), ("--width", self.width)):
            need(
                value is None or (value > 0 and value % 8 == 0),
                option,
                value,
                "must be a positive multiple of 8",
            )
        need(self.num_frames is None or self.num_frames >= 1, "--num-frames", self.num_frames, ">= 1")
        need(self.images_per_prompt >= 1, "--images-per-prompt", self.images_per_prompt, ">= 1")
        need(self.batch_size >= 1, "--batch-size", self.batch_size, "must be >= 1")
        need(self.max_forward_batch is None or self.max_forward_batch >= self.batch_size, "--max-forward-batch",
             self.max_forward_batch, f"must be >= --batch-size ({self.batch_size}): a micro-batch's cond branch "
             "is one forward")  # fmt: skip
        need(0 <= self.seed < 2**63, "--seed", self.seed, "must be in [0, 2**63)")
        need(self.gpus >= 1, "--gpus", self.gpus, "must be >= 1")
        need(self.roles in ROLE_MODES, "--roles", self.roles, f"one of {', '.join(ROLE_MODES)}")
        need(self.role is None or self.role in ROLE_NAMES, "--role", self.role, f"one of {', '.join(ROLE_NAMES)}")
        object.__setattr__(self, "role_gpus", tuple((str(r), n) for r, n in self.role_gpus))  # JSON lists
        if self.split:
            object.__setattr__(self, "role_gpus", self._resolve_role_gpus())
        elif self.role_gpus:
            raise JobError("--role-gpus needs --roles split (or --role)")
        need(self.cfg_parallel_size is None or self.cfg_parallel_size >= 1, "--cfg-parallel-size",
             self.cfg_parallel_size, "auto or an integer >= 1")  # fmt: skip
        try:
            _ = self.dims
        except ValueError as exc:
            ranks = f"--role-gpus denoiser={self.role_ranks('denoiser')}" if self.split else f"--gpus {self.gpus}"
            raise JobError(f"{ranks} --cfg-parallel-size {self.cfg_parallel_size}: {exc}") from None
        need(self.collective_timeout_s > 0, "--collective-timeout", self.collective_timeout_s, "> 0")
        if self.shard_size is None:
            rows = math.ceil(DEFAULT_SHARD_ROWS / self.batch_size) * self.batch_size
            object.__setattr__(self, "shard_size", rows)
        elif self.shard_size < 1 or self.shard_size % self.batch_size:
            raise JobError(
                f"--shard-size {self.shard_size} is invalid: must be a positive multiple of "
                f"--batch-size ({self.batch_size}), so that micro-batches, and therefore images, "
                "do not depend on sharding"
            )

    @property
    def dims(self) -> ParallelDims:
        """The rank grid: gpus = dp x cfg_parallel_size, cfg innermost (a split job: its
        denoiser ranks')."""
        if self.split:
            return self.role_dims("denoiser")
        return ParallelDims(dp=-1, cfg=self.cfg_parallel_size or 1, world_size=self.gpus)

    @property
    def split(self) -> bool:
        """The job runs as roles (``--roles split`` or ``--role R``)."""
        return self.roles == "split" or self.role is not None

    def role_ranks(self, role: str) -> int:
        """Ranks of ``role`` in a split job (resolved role_gpus)."""
        return dict(self.role_gpus)[role]

    def role_dims(self, role: str) -> ParallelDims:
        """The rank grid of one role: CFG groups only in the denoiser (the others run no step).

        Raises:
            ValueError: cfg_parallel_size does not divide the denoiser's ranks.
        """
        cfg = (self.cfg_parallel_size or 1) if role == "denoiser" else 1
        return ParallelDims(dp=-1, cfg=cfg, world_size=self.role_ranks(role))

    def _resolve_role_gpus(self) -> tuple[tuple[str, int], ...]:
        given = dict(self.role_gpus)
        for name, n in given.items():
            if name not in ROLE_NAMES or not isinstance(n, int) or n < 1:
                raise JobError(f"--role-gpus {name}={n} is invalid: ROLE=N items with ROLE one of "
                               f"{', '.join(ROLE_NAMES)} and N >= 1")  # fmt: skip
        defaults = {"encoder": 1, "denoiser": self.gpus, "decoder": 1}
        if self.role is not None:
            defaults[self.role] = self.gpus
        return tuple((name, given.get(name, defaults[name])) for name in ROLE_NAMES)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (for job.json)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BatchConfig:
        """Inverse of to_dict."""
        return cls(**data)

    def generation_options(self) -> dict[str, Any]:
        """The options that change what is generated (compared when re-running into an OUT)."""
        keep = (
            "model", "dtype", "num_inference_steps", "num_frames", "guidance_scale", "guidance_rescale",
            "height", "width", "images_per_prompt", "batch_size", "seed", "shard_size",
            "cfg_batching", "max_forward_batch", "compile", "cfg_gate_step", "cfg_gate_steps", "cfg_gate_cosine", "true_cfg_scale", "skip_guidance_layers",
            "skip_layer_guidance_scale", "skip_layer_guidance_start", "skip_layer_guidance_stop",
            *LTX2_OPTIONS,
        )  # fmt: skip
        return {k: _lists(v) for k, v in self.to_dict().items() if k in keep}

    def family_options(self) -> dict[str, Any]:
        """Options only some pipeline families take (diffusers' names), those that are set: the
        ranks hand them to the family, which refuses those it does not take."""
        names = ("skip_guidance_layers", "skip_layer_guidance_scale", "skip_layer_guidance_start",
                 "skip_layer_guidance_stop", *LTX2_OPTIONS)  # fmt: skip
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}


LTX2_OPTIONS = ("stg_scale", "modality_scale", "audio_guidance_scale", "audio_stg_scale", "audio_modality_scale",
                "audio_guidance_rescale", "spatio_temporal_guidance_blocks", "frame_rate")  # fmt: skip
"""LTX2Pipeline's own guidance and frame-rate arguments (its family takes them)."""


def _lists(value: Any) -> Any:
    """Tuples (nested too) as lists, as they read back from JSON."""
    return [_lists(v) for v in value] if isinstance(value, (tuple, list)) else value


def parse_role_gpus(text: str | None) -> tuple[tuple[str, int], ...]:
    """``--role-gpus encoder=1,denoiser=6,decoder=1`` (roles not named keep their default).

    Raises:
        JobError: an item that is not ROLE=N with a known role and N >= 1, or a role twice.
    """
    found: dict[str, int] = {}
    for item in (part.strip() for part in (text or "").split(",")):
        if not item:
            continue
        name, _, value = item.partition("=")
        name = name.strip()
        if name not in ROLE_NAMES or not value.strip().isdigit() or int(value) < 1 or name in found:
            raise JobError(f"--role-gpus {text!r} is invalid: ROLE=N items, ROLE one of {', '.join(ROLE_NAMES)} "
                           "(each once), N >= 1, e.g. encoder=1,denoiser=6,decoder=1")  # fmt: skip
        found[name] = int(value)
    return tuple(found.items())


def parse_cfg_gate_step(text: object) -> tuple[float, tuple[tuple[str, float], ...]]:
    """``--cfg-gate-step``: ``F`` for every auxiliary branch, ``BRANCH=F,...`` per branch, or
    both (``0.5,stg=0.3``: stg at 0.3, every other auxiliary branch at 0.5).

    Returns:
        (F of the branches not named (1.0 = off when only named ones are given), the named ones).
    Raises:
        JobError: an item that is neither a number nor BRANCH=number, or a branch twice.
    """
    default, named = 1.0, {}
    for item in (part.strip() for part in str(text).split(",")):
        if not item:
            continue
        name, eq, value = item.rpartition("=")
        try:
            fraction = float(value)
        except ValueError:
            fraction = None
        if fraction is None or (eq and not name.strip()):
            raise JobError(f"--cfg-gate-step {text!r} is invalid: F, or BRANCH=F items (uncond=0.6,stg=0.3), "
                           "F in [0, 1]")  # fmt: skip
        if not eq:
            default = fraction
        elif name.strip() in named:
            raise JobError(f"--cfg-gate-step {text!r}: branch {name.strip()} given twice")
        else:
            named[name.strip()] = fraction
    return default, tuple(named.items())
