"""A guard against dtypes a device lacks: a torch dispatch mode that fails the first op that
takes or makes a forbidden tensor (float64 / complex128 under the npu rules).

Active during a pipeline call only: load-time CPU work (rotary tables built in __init__,
scheduler tables) is exempt, but a forbidden table that a call then uses is caught at its
first use. How host numbers enter a call is allowed: a tensor made from host data
(``torch.from_numpy`` / ``torch.tensor``: aten.lift_fresh, detach), a conversion out of a forbidden
dtype into an allowed one (``.to(torch.float32)``, ``copy_`` into a float32 tensor), and
reading a value back (``.item()``). Anything that computes in a forbidden dtype is not.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

NPU_FORBIDDEN = (torch.float64, torch.complex128)

_aten = torch.ops.aten
_HOST_ENTRY = {_aten.lift_fresh, _aten.lift_fresh_copy, _aten._local_scalar_dense, _aten.item, _aten.detach,
               _aten.detach_, _aten.alias}
"""Host data becoming a tensor (``torch.tensor`` lifts, then detaches), or a value going back
to the host: nothing is computed."""
_CASTS = {_aten.to, _aten._to_copy, _aten.copy_, _aten.copy}
"""Conversions: allowed out of a forbidden dtype, never into one."""


class ForbiddenDtypeError(RuntimeError):
    """An op took or made a tensor in a dtype the device has no kernels for."""


def _dtypes(tree: Any) -> set[torch.dtype]:
    return {t.dtype for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)}


class ForbiddenDtypeGuard(TorchDispatchMode):
    """Fail any op whose inputs or outputs hold a forbidden dtype (see the module docstring).

    Args:
        forbidden: dtypes no op may take or make; default float64 and complex128.
        device: the device whose rules these are, for the message ("npu").
    Raises (from the guarded op):
        ForbiddenDtypeError: naming the op, its dtypes and the Python line that called it.
    """

    ops_total: int = 0
    """Ops checked by every guard of this process (tests: the guard was there)."""

    def __init__(self, forbidden: Iterable[torch.dtype] = NPU_FORBIDDEN, *, device: str = "npu") -> None:
        super().__init__()
        self.forbidden = frozenset(forbidden)
        self.device = device
        self.ops_seen = 0
        """Ops dispatched while active (a guard that saw none checked nothing)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        self.ops_seen += 1
        ForbiddenDtypeGuard.ops_total += 1
        packet = func.overloadpacket
        inputs = _dtypes((args, kwargs)) & self.forbidden
        if inputs and packet not in _HOST_ENTRY and packet not in _CASTS:
            self._fail(func, inputs)
        out = func(*args, **kwargs)
        outputs = _dtypes(out) & self.forbidden
        if outputs and packet not in _HOST_ENTRY:
            self._fail(func, outputs)
        return out

    def _fail(self, func: Any, found: set[torch.dtype]) -> None:
        names = ", ".join(sorted(str(d).removeprefix("torch.") for d in found))
        raise ForbiddenDtypeError(
            f"{func} on {names} at {_caller()}: the {self.device} rules forbid "
            f"{', '.join(sorted(str(d).removeprefix('torch.') for d in self.forbidden))} "
            "(no such kernels on the device): compute in float32 / complex64"
        )


def _caller() -> str:
    """The innermost Python frame outside torch and this module: who ran the op."""
    import traceback

    for frame in reversed(traceback.extract_stack()):
        path = frame.filename.replace("\\", "/")
        if "/torch/" in path or path == __file__.replace("\\", "/"):
            continue
        short = path.split("site-packages/")[-1]
        return f"{short}:{frame.lineno} ({frame.name})"
    return "?"
