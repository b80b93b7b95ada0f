"""A platform's device rules (parallel.platform.DeviceRules) applied to a diffusers pipeline,
family-neutrally: on diffusers' shared building blocks, never on one family's code.

Once, after loading (``adapt_pipeline``):
- tensors of forbidden dtypes held by the pipeline's modules (buffers and plain tensor
  attributes: rotary tables built in __init__, e.g. Qwen-Image's complex pos_freqs) and by its
  scheduler (CogVideoX's DPM alphas_cumprod is float64) are converted (float64 -> float32,
  complex128 -> complex64);
- modules with a ``double_precision`` switch (diffusers' LTX-2 and Sana-WM rotary embeddings
  and LTX-2's text connectors) compute their rotary frequencies in float32;
- 5-D weights leave channels_last_3d where the device has none (npu);
- the attention backend is set through diffusers' attention dispatcher on every diffusers
  model (``set_attention_backend``) when it is not SDPA ("native", diffusers' default).

Around each pipeline call (``device_call``):
- ``get_1d_rotary_pos_embed`` (diffusers' shared rotary table: Flux, Lumina, Wan...) is asked
  for float32 where a caller asks float64, and gets float32 positions;
- under emulated rules (npu rules on a CPU), diffusers' own per-device dtype table
  (``maybe_adjust_dtype_for_device``: float64 -> float32, int64 -> int32 on mps / npu) treats
  this device as the emulated one, so the CPU run takes the paths the NPU would;
- the forbidden-dtype guard (parallel.dtype_guard) when the rules ask for it.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Iterator
from typing import Any

import torch

from parallel.dtype_guard import ForbiddenDtypeGuard
from parallel.platform import DOWNCAST, DeviceRules


def adapt_pipeline(pipe: Any, rules: DeviceRules | None) -> list[str]:
    """Apply the load-time rules to a loaded pipeline, in place.

    Args:
        pipe: a diffusers pipeline (components that are not torch modules, such as role stubs
            or tokenizers, are skipped; its scheduler is converted).
        rules: the platform's rules; None or inactive rules change nothing.
    Returns:
        What was changed, one line each ("transformer.rope.double_precision -> False").
    """
    if rules is None or not rules.active:
        return []
    changes: list[str] = []
    forbidden = set(rules.forbidden_dtypes)
    for name, component in _components(pipe):
        if isinstance(component, torch.nn.Module):
            if forbidden:
                changes += _demote_module(name, component, forbidden)
            if not rules.channels_last_3d:
                changes += _contiguous_3d(name, component)
            if rules.attention_backend != "native" and hasattr(component, "set_attention_backend"):
                component.set_attention_backend(rules.attention_backend)
                changes.append(f"{name}: attention backend {rules.attention_backend}")
        elif forbidden and hasattr(component, "config") and hasattr(component, "step"):  # a scheduler
            changes += _demote_attributes(name, component, forbidden)
    return changes


def _components(pipe: Any) -> list[tuple[str, Any]]:
    components = getattr(pipe, "components", None)
    if isinstance(components, dict):
        return [(n, getattr(pipe, n, c)) for n, c in components.items()]
    return [("pipe", pipe)]


def _demote_module(name: str, module: torch.nn.Module, forbidden: set[torch.dtype]) -> list[str]:
    changes = []
    for sub_name, sub in module.named_modules():
        where = f"{name}.{sub_name}" if sub_name else name
        for key, buf in list(sub._buffers.items()):
            if buf is not None and buf.dtype in forbidden:
                sub._buffers[key] = buf.to(DOWNCAST[buf.dtype])
                changes.append(f"{where}.{key}: {_short(buf.dtype)} -> {_short(DOWNCAST[buf.dtype])}")
        changes += _demote_attributes(where, sub, forbidden)
        if torch.float64 in forbidden and getattr(sub, "double_precision", None) is True:
            sub.double_precision = False
            changes.append(f"{where}.double_precision -> False")
    return changes


def _demote_attributes(where: str, obj: Any, forbidden: set[torch.dtype]) -> list[str]:
    """Plain tensor attributes (not parameters or buffers) in a forbidden dtype."""
    changes = []
    for key, value in list(vars(obj).items()):
        if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter) \
                and value.dtype in forbidden:  # fmt: skip
            setattr(obj, key, value.to(DOWNCAST[value.dtype]))
            changes.append(f"{where}.{key}: {_short(value.dtype)} -> {_short(DOWNCAST[value.dtype])}")
    return changes


def _contiguous_3d(name: str, module: torch.nn.Module) -> list[str]:
    changes = []
    for key, param in module.named_parameters():
        if param.dim() == 5 and not param.is_contiguous() and \
                param.is_contiguous(memory_format=torch.channels_last_3d):  # fmt: skip
            param.data = param.data.contiguous()
            changes.append(f"{name}.{key}: channels_last_3d -> contiguous")
    return changes


def _short(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@contextlib.contextmanager
def device_call(rules: DeviceRules | None) -> Iterator[ForbiddenDtypeGuard | None]:
    """Run a pipeline call under the call-time rules (see the module docstring).

    Args:
        rules: the platform's rules; None or inactive rules do nothing.
    Yields:
        The active guard, or None.
    Raises:
        parallel.dtype_guard.ForbiddenDtypeError: from an op in a forbidden dtype.
    """
    if rules is None or not rules.active:
        yield None
        return
    with contextlib.ExitStack() as stack:
        if torch.float64 in rules.forbidden_dtypes:
            stack.enter_context(_float32_rotary())
        if rules.emulated_device is not None:
            stack.enter_context(_emulated_dtype_table(rules.emulated_device))
        guard = None
        if rules.guard:
            guard = stack.enter_context(ForbiddenDtypeGuard(rules.forbidden_dtypes,
                                                            device=rules.emulated_device or "device"))  # fmt: skip
        yield guard


@contextlib.contextmanager
def _float32_rotary() -> Iterator[None]:
    """``get_1d_rotary_pos_embed`` in float32 in every diffusers module that holds it."""
    embeddings = sys.modules.get("diffusers.models.embeddings")
    original = getattr(embeddings, "get_1d_rotary_pos_embed", None)
    if original is None:
        yield
        return

    @functools.wraps(original)
    def float32_rotary(dim: int, pos: Any, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("freqs_dtype") is torch.float64:
            kwargs["freqs_dtype"] = torch.float32
        if isinstance(pos, torch.Tensor) and pos.dtype is torch.float64:
            pos = pos.float()
        elif hasattr(pos, "dtype") and str(pos.dtype) == "float64":  # numpy positions
            pos = pos.astype("float32")
        return original(dim, pos, *args, **kwargs)

    holders = [m for n, m in list(sys.modules.items())
               if n.startswith("diffusers.") and getattr(m, "get_1d_rotary_pos_embed", None) is original]  # fmt: skip
    for module in holders:
        module.get_1d_rotary_pos_embed = float32_rotary
    try:
        yield
    finally:
        for module in holders:
            module.get_1d_rotary_pos_embed = original


@contextlib.contextmanager
def _emulated_dtype_table(device_type: str) -> Iterator[None]:
    """diffusers' ``maybe_adjust_dtype_for_device`` treats every device as ``device_type``
    does (npu: float64 -> float32, int64 -> int32)."""
    torch_utils = sys.modules.get("diffusers.utils.torch_utils")
    table = getattr(torch_utils, "_DTYPE_UNSUPPORTED_DEVICES", None)
    if not isinstance(table, dict):
        yield
        return
    emulated = {dtype: frozenset(devices) | {"cpu", "cuda"} if device_type in devices else devices
                for dtype, devices in table.items()}  # fmt: skip
    torch_utils._DTYPE_UNSUPPORTED_DEVICES = emulated
    try:
        yield
    finally:
        torch_utils._DTYPE_UNSUPPORTED_DEVICES = table
