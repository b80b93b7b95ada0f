"""Platform policies: what a rank runs on and the rules that go with it.

A policy (``PlatformPolicy``) is one accelerator family's decisions: its device strings and
visibility variable, its collective backend (and the mixed host group ``"cpu:gloo,npu:hccl"``),
its default dtype, its attention backend in diffusers' attention dispatcher, per-job port
settings of its collectives, and the dtypes its kernels lack. Built in: ``cuda`` (nccl),
``npu`` (Ascend, torch_npu, hccl) and ``cpu`` (gloo); other packages add theirs through the
``gen.platforms`` entry point group (as sglang's and vLLM's platform plugins do). Detection
(``detect_platform``) returns a ``Platform``: the chosen policy, its devices, and why it was
chosen, or why the others were not.

Environment (read by ``detect_platform`` only):
- ``GEN_PLATFORM``: use this policy (its devices must be there), instead of detecting.
- ``GEN_PLATFORM_RULES``: apply another policy's dtype rules on this platform (``npu`` on a
  CPU machine: the "npu rules on CPU" runs), with the float64 guard on.
- ``GEN_DTYPE_GUARD=1``: run pipeline calls under the forbidden-dtype guard on real devices.

Nothing NPU-specific is imported unless CUDA is absent and torch_npu is installed; then any
exception from importing it (not only ImportError: a missing CANN toolkit raises others) makes
detection fall back, saying why.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import cache
from typing import ClassVar

import torch

from parallel.platform_env import (  # noqa: F401  (re-exported: the policies' environment rules)
    HCCL_PORT_BLOCK,
    HCCL_PORT_BLOCKS,
    HCCL_PORT_FIRST,
    hccl_base_port,
    parse_visible_devices,
)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
HALF_DTYPES = (torch.float16, torch.bfloat16)
ENTRY_POINT_GROUP = "gen.platforms"
"""Entry point group of platform plugins: each names a PlatformPolicy subclass (or instance)."""
DOWNCAST = {torch.float64: torch.float32, torch.complex128: torch.complex64}
"""What a forbidden dtype becomes under a policy's dtype rules."""

@dataclass(frozen=True)
class Probe:
    """What a policy found on this machine."""

    available: bool
    reason: str
    """Why it is usable (what was found), or why not."""
    num_devices: int = 0
    bf16_supported: bool = False
    visible: tuple[str, ...] | None = None
    """The parsed visibility variable; None when unset."""


class PlatformPolicy:
    """One accelerator family's decisions. Subclass it for a plugin platform.

    Class attributes name the family; ``probe`` looks for its devices.
    """

    name: ClassVar[str] = ""
    """Policy name, also the torch device type ("cuda", "npu", "cpu")."""
    backend: ClassVar[str] = "gloo"
    """torch.distributed backend of device tensors."""
    visibility_var: ClassVar[str | None] = None
    """Environment variable that restricts the devices a process sees."""
    fused_attention: ClassVar[str | None] = None
    """diffusers attention backend for float16 / bfloat16 (None: SDPA, "native")."""
    forbidden_dtypes: ClassVar[tuple[torch.dtype, ...]] = ()
    """Dtypes the device's kernels lack (npu: float64, complex128)."""
    channels_last_3d: ClassVar[bool] = True
    """Whether 5-D tensors may use torch.channels_last_3d."""

    def probe(self, environ: Mapping[str, str]) -> Probe:
        """Look for this family's devices.

        Args:
            environ: the process environment (visibility variables).
        Returns:
            What was found; never raises for a missing or broken runtime (the reason says it).
        Raises:
            ValueError: the visibility variable is malformed.
        """
        raise NotImplementedError

    def set_device(self, device: torch.device) -> None:
        """Make ``device`` this process's current device (collectives use it)."""

    def collective_env(self, *, rdzv_port: int | None, environ: Mapping[str, str]) -> dict[str, str]:
        """Environment the collective library needs for one job on a node shared with others.

        Args:
            rdzv_port: the job's rendezvous port (MASTER_PORT), unique among the jobs running
                on a node; None when unknown.
            environ: the process environment (settings the user made win).
        Returns:
            Variables to set; empty by default.
        """
        return {}

    def peak_memory_bytes(self, device: torch.device) -> int:
        """Peak memory allocated on ``device`` by this process; 0 where unknown."""
        return 0

    def device_name(self, index: int) -> str:
        """The product name of visible device ``index`` (for `gen env`)."""
        return self.name


class CpuPolicy(PlatformPolicy):
    """CPU ranks over gloo, float32 (bf16 matmuls are slow on most CPUs)."""

    name = "cpu"
    backend = "gloo"

    def probe(self, environ: Mapping[str, str]) -> Probe:
        return Probe(True, "CPU: always there", 0, False)


class CudaPolicy(PlatformPolicy):
    """NVIDIA GPUs: nccl, CUDA_VISIBLE_DEVICES, bf16 from Ampere on."""

    name = "cuda"
    backend = "nccl"
    visibility_var = "CUDA_VISIBLE_DEVICES"

    def probe(self, environ: Mapping[str, str]) -> Probe:
        if not torch.cuda.is_available():
            return Probe(False, "torch.cuda.is_available() is False")
        visible = parse_visible_devices(self.visibility_var, environ.get(self.visibility_var))
        count = torch.cuda.device_count()
        return Probe(True, f"{count} CUDA device(s)", count, _safe_bool(torch.cuda.is_bf16_supported), visible)

    def set_device(self, device: torch.device) -> None:
        torch.cuda.set_device(device)

    def peak_memory_bytes(self, device: torch.device) -> int:
        return torch.cuda.max_memory_allocated(device)

    def device_name(self, index: int) -> str:
        return torch.cuda.get_device_name(index)


class NpuPolicy(PlatformPolicy):
    """Ascend NPUs through torch_npu: hccl, ASCEND_RT_VISIBLE_DEVICES, no float64 / complex128
    kernels (complex128 falls back to slow AICPU), no channels_last_3d, bf16 only where
    ``torch.npu.is_bf16_supported()`` (910B yes, 310P no), fused attention ``_native_npu``
    (diffusers' npu_fusion_attention backend, fp16 / bf16 only)."""

    name = "npu"
    backend = "hccl"
    visibility_var = "ASCEND_RT_VISIBLE_DEVICES"
    fused_attention = "_native_npu"
    forbidden_dtypes = (torch.float64, torch.complex128)
    channels_last_3d = False

    def probe(self, environ: Mapping[str, str]) -> Probe:
        try:
            import torch_npu  # noqa: F401  (registers torch.npu and the hccl backend)
        except ModuleNotFoundError as exc:
            if exc.name == "torch_npu":
                return Probe(False, "torch_npu is not installed")
            return Probe(False, _broken(exc))
        except Exception as exc:  # noqa: BLE001 - CANN missing raises RuntimeError, OSError...
            return Probe(False, _broken(exc))
        visible = parse_visible_devices(self.visibility_var, environ.get(self.visibility_var))
        try:
            npu = torch.npu  # type: ignore[attr-defined]
            if not npu.is_available():
                return Probe(False, "torch_npu imports, but torch.npu.is_available() is False "
                                    "(no NPU, driver not loaded, or none visible)")  # fmt: skip
            count = npu.device_count()
        except Exception as exc:  # noqa: BLE001
            return Probe(False, f"torch_npu imports, but querying the NPUs failed: {type(exc).__name__}: {exc}")
        if visible is not None and count > len(visible):
            count = len(visible)
        return Probe(True, f"{count} Ascend NPU(s) through torch_npu", count,
                     _safe_bool(npu.is_bf16_supported), visible)  # fmt: skip

    def set_device(self, device: torch.device) -> None:
        torch.npu.set_device(device)  # type: ignore[attr-defined]

    def collective_env(self, *, rdzv_port: int | None, environ: Mapping[str, str]) -> dict[str, str]:
        if "HCCL_IF_BASE_PORT" in environ or rdzv_port is None:
            return {}
        return {"HCCL_IF_BASE_PORT": str(hccl_base_port(rdzv_port))}

    def peak_memory_bytes(self, device: torch.device) -> int:
        return torch.npu.max_memory_allocated(device)  # type: ignore[attr-defined]

    def device_name(self, index: int) -> str:
        return torch.npu.get_device_name(index)  # type: ignore[attr-defined]


def _broken(exc: BaseException) -> str:
    return (f"torch_npu is installed but does not import ({type(exc).__name__}: {exc}); "
            "is the CANN toolkit installed and its set_env.sh sourced?")  # fmt: skip


def _safe_bool(query) -> bool:  # noqa: ANN001
    """A capability query that may raise on a broken runtime: False then."""
    try:
        return bool(query())
    except Exception:  # noqa: BLE001
        return False


BUILTIN_POLICIES: dict[str, type[PlatformPolicy]] = {"cuda": CudaPolicy, "npu": NpuPolicy, "cpu": CpuPolicy}
DETECTION_ORDER = ("cuda", "npu")
"""Built-in accelerators in the order detection tries them; plugins follow; cpu is last."""


@cache
def platform_policies() -> dict[str, PlatformPolicy]:
    """Every policy by name: the built-in ones, then the ``gen.platforms`` plugins (by entry
    point name; one that fails to load is left out, and one may not replace a built-in)."""
    from importlib.metadata import entry_points

    found: dict[str, PlatformPolicy] = {name: cls() for name, cls in BUILTIN_POLICIES.items()}
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        try:
            obj = ep.load()
            policy = obj() if isinstance(obj, type) else obj
        except Exception:  # noqa: BLE001 - a broken plugin must not stop detection
            continue
        if isinstance(policy, PlatformPolicy) and policy.name and policy.name not in found:
            found[policy.name] = policy
    return found


def policy(name: str) -> PlatformPolicy:
    """The policy called ``name``.

    Raises:
        ValueError: no such policy; the message lists the known ones.
    """
    policies = platform_policies()
    if name not in policies:
        raise ValueError(f"platform {name!r} is unknown: one of {', '.join(policies)}")
    return policies[name]


@dataclass(frozen=True, kw_only=True)
class DeviceRules:
    """What a pipeline must respect on a platform (pipeline.device_rules applies them)."""

    forbidden_dtypes: tuple[torch.dtype, ...] = ()
    """Dtypes no op of a pipeline call may take or make (npu: float64, complex128); tensors
    of the loaded pipeline in them are converted with DOWNCAST."""
    attention_backend: str = "native"
    """diffusers attention dispatcher backend name; "native" is SDPA (diffusers' default)."""
    channels_last_3d: bool = True
    """False: 5-D weights in torch.channels_last_3d are made contiguous."""
    emulated_device: str | None = None
    """The device type whose rules run on another device (e.g. "npu" rules on "cpu"):
    diffusers' own per-device dtype checks are made to see this type."""
    guard: bool = False
    """Run pipeline calls under parallel.dtype_guard.ForbiddenDtypeGuard."""

    @property
    def active(self) -> bool:
        """Whether anything is to be done."""
        return bool(self.forbidden_dtypes) or self.attention_backend != "native" or \
            not self.channels_last_3d or self.guard  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class Platform:
    """The platform this process runs on, as detected."""

    name: str
    """Policy name: "cuda", "npu", "cpu" or a plugin's."""
    backend: str
    """torch.distributed backend: "nccl", "hccl" or "gloo"."""
    num_devices: int
    """Accelerators visible to this process; 0 on cpu."""
    bf16_supported: bool = True
    """Whether the device computes in bfloat16 (ignored on cpu)."""
    visible: tuple[str, ...] | None = None
    """Parsed visibility variable (CUDA_VISIBLE_DEVICES / ASCEND_RT_VISIBLE_DEVICES); None if unset."""
    reason: str = ""
    """Why this platform: what was found, or why the accelerators were not usable."""
    rules: str | None = None
    """Policy whose dtype rules apply (GEN_PLATFORM_RULES); None: this platform's own."""
    guard: bool = False
    """Run pipeline calls under the forbidden-dtype guard (on with emulated rules)."""

    @property
    def policy(self) -> PlatformPolicy:
        """This platform's policy."""
        return policy(self.name)

    @property
    def rules_policy(self) -> PlatformPolicy:
        """The policy whose dtype rules apply."""
        return policy(self.rules or self.name)

    def device(self, local_rank: int) -> torch.device:
        """The device a rank uses: index ``local_rank`` among the visible ones.

        Args:
            local_rank: rank within this node, >= 0.
        Returns:
            ``cuda:<local_rank>`` / ``npu:<local_rank>``, or ``cpu``.
        Raises:
            ValueError: local_rank >= the number of visible devices.
        """
        if self.name == "cpu":
            return torch.device("cpu")
        if not 0 <= local_rank < self.num_devices:
            raise ValueError(
                f"local rank {local_rank} has no {self.name} device: {self.num_devices} visible"
                + (f" ({self.policy.visibility_var}={','.join(self.visible)})" if self.visible is not None else "")
            )
        return _device(self.name, local_rank)

    def physical_device(self, local_rank: int) -> str:
        """The id the driver knows a rank's device by: entry ``local_rank`` of the visibility
        variable (ASCEND_RT_VISIBLE_DEVICES=4,5,6,7: rank 1 -> "5"), else the index itself."""
        self.device(local_rank)  # validates
        if self.name == "cpu":
            return "cpu"
        return self.visible[local_rank] if self.visible is not None else str(local_rank)

    def bind(self, local_rank: int) -> torch.device:
        """Pin this process to the device of ``local_rank`` and return it.

        Sets the current CUDA / NPU device (NCCL and HCCL collectives, and
        ``all_gather_object``, use it); on cpu there is nothing to pin.

        Raises:
            ValueError: local_rank >= the number of visible devices.
        """
        device = self.device(local_rank)
        if self.name != "cpu":
            self.policy.set_device(device)
        return device

    @property
    def process_group_backend(self) -> str:
        """Backend string for ``init_process_group``: the accelerator's backend for device
        tensors plus gloo for CPU tensors (``"cpu:gloo,cuda:nccl"``, ``"cpu:gloo,npu:hccl"``),
        so that small control exchanges stay on the host and never wait for the device stream."""
        if self.name == "cpu":
            return "gloo"
        return f"cpu:gloo,{self.name}:{self.backend}"

    @property
    def default_dtype(self) -> torch.dtype:
        """float32 on cpu; on accelerators bfloat16 where the device supports it, else float16."""
        if self.name == "cpu":
            return torch.float32
        return torch.bfloat16 if self.bf16_supported else torch.float16

    def attention_backend(self, dtype: torch.dtype) -> str:
        """diffusers attention backend for weights in ``dtype``: the device's fused kernel for
        float16 / bfloat16 where it has one (npu: "_native_npu"), else SDPA ("native")."""
        fused = self.policy.fused_attention
        return fused if fused and dtype in HALF_DTYPES else "native"

    def device_rules(self, dtype: torch.dtype) -> DeviceRules:
        """The rules a pipeline loaded in ``dtype`` follows here (pipeline.device_rules).

        Dtype and memory-format rules come from ``rules_policy`` (another platform's under
        GEN_PLATFORM_RULES); the attention backend from this platform's own devices.
        """
        rules = self.rules_policy
        emulated = rules.name if rules.name != self.name else None
        return DeviceRules(forbidden_dtypes=rules.forbidden_dtypes,
                           attention_backend=self.attention_backend(dtype),
                           channels_last_3d=rules.channels_last_3d, emulated_device=emulated,
                           guard=self.guard and bool(rules.forbidden_dtypes))  # fmt: skip

    def collective_env(self, *, rdzv_port: int | None, environ: Mapping[str, str]) -> dict[str, str]:
        """Variables the collectives of one job need (npu: HCCL_IF_BASE_PORT from the
        rendezvous port); see PlatformPolicy.collective_env."""
        return self.policy.collective_env(rdzv_port=rdzv_port, environ=environ)

    def peak_memory_bytes(self, device: torch.device) -> int:
        """Peak device memory this process allocated; 0 on cpu."""
        return 0 if self.name == "cpu" else self.policy.peak_memory_bytes(device)


def _device(kind: str, index: int) -> torch.device:
    """``torch.device(kind, index)``; "npu" exists once torch_npu has registered it."""
    return torch.device(kind, index)


def detect_platform(environ: Mapping[str, str] | None = None) -> Platform:
    """Detect the platform: GEN_PLATFORM if set, else CUDA, then Ascend NPU (if torch_npu
    imports), then plugins, else CPU; with GEN_PLATFORM_RULES' dtype rules if set.

    Args:
        environ: the environment to read (default os.environ).
    Returns:
        The platform, with ``reason`` saying why (and why the others were passed over).
    Raises:
        ValueError: GEN_PLATFORM / GEN_PLATFORM_RULES names an unknown policy, GEN_PLATFORM's
            devices are not there, or a visibility variable is malformed.
    """
    env = os.environ if environ is None else environ
    forced = env.get("GEN_PLATFORM") or None
    rules = env.get("GEN_PLATFORM_RULES") or None
    if rules is not None:
        policy(rules)  # validates the name
    policies = platform_policies()
    if forced is not None:
        chosen = policy(forced)
        found = chosen.probe(env)
        if not found.available:
            raise ValueError(f"GEN_PLATFORM={forced}: not usable here: {found.reason}")
        platform = _platform(chosen, found, f"{found.reason} (GEN_PLATFORM={forced})")
    else:
        order = [*DETECTION_ORDER, *(n for n in policies if n not in BUILTIN_POLICIES)]
        passed = []
        platform = None
        for name in order:
            found = policies[name].probe(env)
            if found.available:
                platform = _platform(policies[name], found, found.reason)
                break
            passed.append(f"{name}: {found.reason}")
        if platform is None:
            platform = _platform(policies["cpu"], policies["cpu"].probe(env),
                                 "no accelerator (" + "; ".join(passed) + ")")  # fmt: skip
        elif passed:
            platform = replace(platform, reason=f"{platform.reason} (passed over: {'; '.join(passed)})")
    guard = env.get("GEN_DTYPE_GUARD", "") not in ("", "0")
    if rules is not None and rules != platform.name:
        return replace(platform, rules=rules, guard=True,
                       reason=f"{platform.reason}; with the dtype rules of {rules} (GEN_PLATFORM_RULES)")  # fmt: skip
    return replace(platform, guard=guard)


def _platform(p: PlatformPolicy, found: Probe, reason: str) -> Platform:
    return Platform(name=p.name, backend=p.backend, num_devices=found.num_devices,
                    bf16_supported=found.bf16_supported, visible=found.visible, reason=reason)  # fmt: skip


def parse_dtype(name: str | None, platform: Platform) -> torch.dtype:
    """Resolve a ``--dtype`` value.

    Args:
        name: "float32", "float16", "bfloat16", or None / "auto" for the platform default.
        platform: the detected platform.
    Raises:
        ValueError: an unknown name; the message lists the allowed ones.
    """
    if name in (None, "auto"):
        return platform.default_dtype
    if name not in _DTYPES:
        raise ValueError(f"--dtype {name!r} is not one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]
