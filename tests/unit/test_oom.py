"""pipeline.oom: which errors count as a device out-of-memory, on this rank or another rank of
the CFG group (a GroupAborted carries its "Type: message")."""

from __future__ import annotations

import torch

from parallel.cfg_group import GroupAborted
from pipeline.oom import is_out_of_memory


def test_oom_errors_are_recognised_here_and_from_a_peer() -> None:
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("NPU out of memory. Tried to allocate 1.00 GiB"))  # torch_npu
    assert is_out_of_memory(GroupAborted(1, "OutOfMemoryError: CUDA out of memory."))
    assert is_out_of_memory(GroupAborted(0, "RuntimeError: NPU out of memory."))


def test_other_errors_are_not() -> None:
    assert not is_out_of_memory(RuntimeError("expected scalar type Float"))
    assert not is_out_of_memory(ValueError("out of memory"))  # not a device error type
    assert not is_out_of_memory(GroupAborted(1, "ValueError: bad prompt"))
    assert not is_out_of_memory(GroupAborted(1, "KeyError: 'out of memory'"))
