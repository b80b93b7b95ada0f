"""Device out-of-memory errors, as a micro-batch's backoff sees them.

A micro-batch whose encode + denoise runs out of device memory is retried as two halves (down
to batch 1) by pipeline.generate.StageRunner, which then keeps the smaller forward batch for
the rest of the shard. Under CFG parallelism the failing rank's error reaches the other ranks
of the group as a GroupAborted carrying its ``"Type: message"``, so every rank of the group
recognises the same OOM and halves alike.
"""

from __future__ import annotations

import gc

import torch

from parallel.cfg_group import GroupAborted

_OOM_TYPES = ("OutOfMemoryError",)
"""torch.OutOfMemoryError (CUDA: torch.cuda.OutOfMemoryError is the same class)."""
_OOM_TEXT = "out of memory"
"""torch_npu raises RuntimeError("NPU out of memory. Tried to allocate ..."); CUDA's messages
say "CUDA out of memory" as well."""


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` (on this rank, or another rank's error in a GroupAborted) is a device
    out-of-memory error: torch.OutOfMemoryError, or a RuntimeError whose message says "out of
    memory" (torch_npu, older CUDA builds)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = exc.reason if isinstance(exc, GroupAborted) else f"{type(exc).__name__}: {exc}"
    kind = text.split(":", 1)[0].strip()
    return kind in _OOM_TYPES or (kind == "RuntimeError" and _OOM_TEXT in text.lower())


def free_device_memory() -> None:
    """Release what the failed forward left cached (the tensors are garbage once the exception
    is handled), so that the halves start from free memory."""
    gc.collect()
    for backend in ("cuda", "npu"):
        module = getattr(torch, backend, None)
        if module is not None and getattr(module, "is_available", lambda: False)():
            module.empty_cache()
