"""`gen env`: the platform gen detects here and why, its devices, backend, dtype and attention
backend, the library versions and the SLURM visibility variables. Imports torch (detection
needs it) but no diffusers, transformers or model."""

from __future__ import annotations

import os
import platform as pyplatform
from collections.abc import Mapping
from importlib import metadata
from typing import Any

from jobs import __version__

PACKAGES = {"torch": "torch", "diffusers": "diffusers", "transformers": "transformers",
            "torch_npu": "torch-npu"}  # fmt: skip
"""Reported name -> distribution name (read from the installed metadata, never imported)."""
VISIBILITY_VARS = ("CUDA_VISIBLE_DEVICES", "ASCEND_RT_VISIBLE_DEVICES", "SLURM_JOB_ID",
                   "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_LOCALID", "SLURM_JOB_GPUS",
                   "SLURM_STEP_GPUS", "SLURM_GPUS_ON_NODE", "SLURM_JOB_GRES", "SLURM_CPUS_PER_TASK")  # fmt: skip
"""Device visibility as SLURM (or the user) set it, shown when set."""
SETTINGS = ("GEN_PLATFORM", "GEN_PLATFORM_RULES", "GEN_DTYPE_GUARD", "TORCH_DEVICE_BACKEND_AUTOLOAD",
            "HCCL_IF_BASE_PORT")  # fmt: skip


def versions() -> dict[str, str | None]:
    """gen, Python and the libraries' installed versions (None: not installed)."""
    found: dict[str, str | None] = {"gen": __version__, "python": pyplatform.python_version()}
    for name, dist in PACKAGES.items():
        try:
            found[name] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def collect_env(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """What `gen env` reports, as one JSON-ready dict.

    Args:
        environ: the environment to read (default os.environ).
    Returns:
        platform, reason, rules, devices, backend, dtype, attention_backend, forbidden_dtypes,
        collective_env, versions, visibility, settings; ``error`` (and platform None) when
        detection refused (e.g. a malformed ASCEND_RT_VISIBLE_DEVICES).
    """
    from parallel.platform import detect_platform, platform_policies

    env = os.environ if environ is None else environ
    report: dict[str, Any] = {
        "versions": versions(),
        "visibility": {k: env[k] for k in VISIBILITY_VARS if k in env},
        "settings": {k: env[k] for k in SETTINGS if k in env},
        "policies": list(platform_policies()),
    }
    try:
        platform = detect_platform(env)
    except ValueError as exc:
        return {"platform": None, "error": str(exc), **report}
    dtype = platform.default_dtype
    rules = platform.device_rules(dtype)
    names = []
    for i in range(platform.num_devices):
        try:
            names.append(platform.policy.device_name(i))
        except Exception as exc:  # noqa: BLE001 - a report, not a check
            names.append(f"? ({type(exc).__name__})")
    port = env.get("MASTER_PORT", "")
    collective = platform.collective_env(rdzv_port=int(port) if port.isdigit() else None, environ=env)
    if platform.name == "npu" and not collective and "HCCL_IF_BASE_PORT" not in env:
        collective = {"HCCL_IF_BASE_PORT": "derived per job from its rendezvous port (MASTER_PORT)"}
    return {
        "platform": platform.name,
        "reason": platform.reason,
        "rules": platform.rules or platform.name,
        "guard": rules.guard,
        "devices": {"count": platform.num_devices, "names": names,
                    "visibility_var": platform.policy.visibility_var,
                    "visible": None if platform.visible is None else list(platform.visible)},  # fmt: skip
        "backend": platform.process_group_backend,
        "dtype": _short(dtype),
        "bf16_supported": platform.bf16_supported if platform.name != "cpu" else None,
        "attention_backend": rules.attention_backend,
        "forbidden_dtypes": [_short(d) for d in rules.forbidden_dtypes],
        "collective_env": collective,
        **report,
    }


def _short(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def format_env(report: dict[str, Any]) -> list[str]:
    """The report as printable lines (what `gen env` prints)."""
    v = report["versions"]
    lines = []
    if report["platform"] is None:
        lines.append(f"platform: none: {report['error']}")
    else:
        d = report["devices"]
        rules = "" if report["rules"] == report["platform"] else f"; dtype rules of {report['rules']} (guarded)"
        lines += [
            f"platform: {report['platform']}{rules}",
            f"  why: {report['reason']}",
            f"devices: {d['count']}" + (f" ({', '.join(d['names'])})" if d["names"] else "")
            + (f"; {d['visibility_var']}={','.join(d['visible'])}" if d["visible"] is not None else ""),
            f"backend: {report['backend']}",
            f"dtype (--dtype auto): {report['dtype']}"
            + ("" if report["bf16_supported"] is None else f" (bf16 supported: {report['bf16_supported']})"),
            f"attention backend: {report['attention_backend']}",
            f"forbidden dtypes: {', '.join(report['forbidden_dtypes']) or 'none'}",
        ]
        for key, value in report["collective_env"].items():
            lines.append(f"collective: {key}={value}")
    lines.append("versions: " + ", ".join(f"{k} {v[k] or 'not installed'}" for k in v))
    vis = report["visibility"]
    lines.append("visibility: " + (", ".join(f"{k}={vis[k]}" for k in vis) if vis else "no SLURM or visibility variables set"))
    if report["settings"]:
        lines.append("settings: " + ", ".join(f"{k}={val}" for k, val in report["settings"].items()))
    lines.append(f"platform policies: {', '.join(report['policies'])}")
    return lines
