"""Splitting a CFG call into branches, concatenating them back, and running them."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from parallel.branches import Branch, NotConcatenable, concat_branches, split_branches
from parallel.executors import SerialBranchExecutor, forward_groups

NAMES = ("uncond", "cond")
KEYS = frozenset({"0", "encoder_hidden_states", "added.a"})
"""The per-sample inputs of ``_inputs``: latents (positional 0), embeddings, a nested tensor."""


def _inputs() -> tuple[tuple[Any, ...], dict[str, Any]]:
    x = torch.arange(4 * 3, dtype=torch.float32).reshape(4, 3)
    t = torch.tensor(7.0)
    e = torch.arange(4 * 2 * 5, dtype=torch.float32).reshape(4, 2, 5) / 10
    a = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    return (x, t), {"encoder_hidden_states": e, "added": {"a": a}, "return_dict": False}


def test_split_branches() -> None:
    args, kwargs = _inputs()
    x, t = args
    branches = split_branches(NAMES, args, kwargs, 4, KEYS)
    assert [b.name for b in branches] == ["uncond", "cond"]
    for i, b in enumerate(branches):
        bx, bt = b.args
        assert isinstance(b.args, tuple)
        assert torch.equal(bx, x[2 * i : 2 * i + 2])
        assert bt is t  # a scalar timestep is shared, untouched
        assert torch.equal(
            b.kwargs["encoder_hidden_states"], kwargs["encoder_hidden_states"][2 * i : 2 * i + 2]
        )
        assert torch.equal(b.kwargs["added"]["a"], kwargs["added"]["a"][2 * i : 2 * i + 2])
        assert b.kwargs["return_dict"] is False
    assert branches[1].kwargs["added"]["a"].flatten().tolist() == [3.0, 4.0]


def test_split_three_branches() -> None:
    x = torch.arange(6.0)
    branches = split_branches(("a", "b", "c"), (x,), {}, 6, frozenset({"0"}))
    assert [b.args[0].tolist() for b in branches] == [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]


def test_split_indivisible_batch() -> None:
    with pytest.raises(ValueError):
        split_branches(NAMES, (torch.zeros(3),), {}, 3, frozenset({"0"}))


def test_only_declared_inputs_are_split() -> None:
    """A shared tensor whose dim 0 happens to equal the batch (CogVideoX's rotary embeddings)
    stays whole; a per-sample list (Qwen-Image's img_shapes) is split; None is left alone."""
    x = torch.arange(4.0)
    rotary = torch.ones(4, 8)
    branches = split_branches(NAMES, (x,), {"rotary": rotary, "shapes": [1, 2, 3, 4], "mask": None}, 4,
                              frozenset({"0", "shapes", "mask"}))  # fmt: skip
    assert [b.kwargs["shapes"] for b in branches] == [[1, 2], [3, 4]]
    assert all(b.kwargs["rotary"] is rotary and b.kwargs["mask"] is None for b in branches)
    assert branches[1].take([1]).kwargs["shapes"] == [4]


def test_a_wrong_argument_map_is_an_error() -> None:
    with pytest.raises(ValueError, match="encoder_hidden_states has leading size 3, expected 4"):
        split_branches(NAMES, (torch.zeros(4),), {"encoder_hidden_states": torch.zeros(3, 2)}, 4,
                       frozenset({"0", "encoder_hidden_states"}))  # fmt: skip


def test_branches_with_different_shared_inputs_do_not_concatenate() -> None:
    """SD3's skip-layer call (skip_layers) and Qwen-Image's texts of other lengths run alone."""
    args, kwargs = _inputs()
    uncond, cond = split_branches(NAMES, args, kwargs, 4, KEYS)
    skip = cond.with_inputs("cond_skip", 1, skip_layers=[1, 2])
    with pytest.raises(NotConcatenable):
        concat_branches([cond, skip])
    longer = cond.with_inputs("uncond", 0, encoder_hidden_states=torch.zeros(2, 3, 5))
    with pytest.raises(NotConcatenable):
        concat_branches([cond, longer])
    assert [[b.name for b in g] for g in forward_groups([uncond, cond, skip], batched=True)] == [
        ["uncond", "cond"], ["cond_skip"]]
    assert len(forward_groups([uncond, cond, skip], batched=False)) == 3
    other_call = cond.with_inputs("uncond", 1, encoder_hidden_states=torch.zeros(2, 2, 5))
    assert len(forward_groups([cond, other_call], batched=True)) == 2  # the pipeline's own calls


def test_max_forward_caps_concatenation() -> None:
    """--max-forward-batch: branches are concatenated only while a forward holds at most that
    many samples; each branch is its own forward below their sum."""
    args, kwargs = _inputs()
    branches = split_branches(NAMES, args, kwargs, 4, KEYS)  # 2 samples per branch
    assert len(forward_groups(branches, batched=True, max_forward=4)) == 1
    assert len(forward_groups(branches, batched=True, max_forward=3)) == 2
    calls: list[torch.Tensor] = []
    capped = SerialBranchExecutor(batched=True, max_forward=2).run(branches, _elementwise(calls))
    assert [c.shape[0] for c in calls] == [2, 2]
    unbatched = SerialBranchExecutor(batched=False).run(branches, _elementwise([]))
    assert all(torch.equal(a, b) for a, b in zip(capped, unbatched))


def test_concat_inverts_split() -> None:
    args, kwargs = _inputs()
    branches = split_branches(NAMES, args, kwargs, 4, KEYS)
    cargs, ckwargs = concat_branches(branches)
    assert torch.equal(cargs[0], args[0])
    assert torch.equal(cargs[1], args[1])
    assert torch.equal(ckwargs["encoder_hidden_states"], kwargs["encoder_hidden_states"])
    assert torch.equal(ckwargs["added"]["a"], kwargs["added"]["a"])
    assert ckwargs["return_dict"] is False
    assert set(ckwargs) == set(kwargs)


def test_concat_single_branch_is_identity() -> None:
    b = Branch("cond", (torch.ones(2),), {"k": torch.zeros(2)}, 2, frozenset({"0", "k"}))
    args, kwargs = concat_branches([b])
    assert args is b.args and kwargs is b.kwargs


def test_concat_inverts_split_with_shared_leading_dim_one_tensor() -> None:
    """B = 1: a shared (1,)-shaped timestep is not split, so it must not be concatenated."""
    x = torch.arange(2.0).reshape(2, 1)
    t = torch.tensor([5.0])
    args, _ = concat_branches(split_branches(NAMES, (x, t), {}, 2, frozenset({"0"})))
    assert torch.equal(args[0], x)
    assert args[1].shape == t.shape


def _elementwise(calls: list[torch.Tensor]):  # noqa: ANN202
    def forward(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        x, t = args
        calls.append(x)
        return x * 3 + t + kwargs["encoder_hidden_states"].sum(dim=(1, 2))[:, None]

    return forward


def test_serial_batched_one_forward() -> None:
    args, kwargs = _inputs()
    calls: list[torch.Tensor] = []
    out = SerialBranchExecutor(batched=True).run(
        split_branches(NAMES, args, kwargs, 4, KEYS), _elementwise(calls)
    )
    assert len(calls) == 1
    assert calls[0].shape[0] == 4
    assert torch.equal(calls[0], args[0])
    full = _elementwise([])(args, kwargs)
    assert len(out) == 2
    assert torch.equal(out[0], full[:2]) and torch.equal(out[1], full[2:])


def test_serial_unbatched_one_forward_per_branch() -> None:
    args, kwargs = _inputs()
    calls: list[torch.Tensor] = []
    out = SerialBranchExecutor(batched=False).run(
        split_branches(NAMES, args, kwargs, 4, KEYS), _elementwise(calls)
    )
    assert len(calls) == 2
    assert torch.equal(calls[0], args[0][:2]) and torch.equal(calls[1], args[0][2:])
    full = _elementwise([])(args, kwargs)
    assert torch.equal(out[0], full[:2]) and torch.equal(out[1], full[2:])


def test_batched_and_unbatched_agree() -> None:
    args, kwargs = _inputs()
    batched = SerialBranchExecutor(batched=True).run(
        split_branches(NAMES, args, kwargs, 4, KEYS), _elementwise([])
    )
    serial = SerialBranchExecutor(batched=False).run(
        split_branches(NAMES, args, kwargs, 4, KEYS), _elementwise([])
    )
    assert len(batched) == len(serial) == 2
    for a, b in zip(batched, serial):
        assert torch.equal(a, b)


def test_batched_single_branch_calls_once() -> None:
    x = torch.arange(3.0).reshape(3, 1)
    calls: list[torch.Tensor] = []
    branches = split_branches(
        ("cond",), (x, torch.tensor(1.0)), {"encoder_hidden_states": torch.zeros(3, 1, 1)}, 3, KEYS
    )
    (out,) = SerialBranchExecutor(batched=True).run(branches, _elementwise(calls))
    assert len(calls) == 1
    assert torch.equal(out, x * 3 + 1)


def test_uneven_branches_concatenate_and_split_back() -> None:
    """An uncond branch restricted to some samples, next to a full cond branch."""
    args, kwargs = _inputs()
    cond = split_branches(NAMES, args, kwargs, 4, KEYS)[1]
    uncond = split_branches(NAMES, args, kwargs, 4, KEYS)[0].take([1])
    assert uncond.size == 1 and torch.equal(uncond.args[0], args[0][1:2])
    calls: list[torch.Tensor] = []
    out = SerialBranchExecutor(batched=True).run([uncond, cond], _elementwise(calls))
    assert [c.shape[0] for c in calls] == [3]
    full = _elementwise([])(args, kwargs)
    assert torch.equal(out[0], full[1:2]) and torch.equal(out[1], full[2:])


def test_two_call_sibling_branch_concatenates_shared_inputs() -> None:
    """Two-call pipelines pass the same latents object to both calls: still per-branch data."""
    x = torch.arange(4.0).reshape(2, 2)
    cond = Branch("cond", (x, torch.tensor(1.0)), {"encoder_hidden_states": torch.ones(2, 1, 1)}, 2, KEYS)
    uncond = cond.with_inputs("uncond", 0, encoder_hidden_states=torch.zeros(2, 1, 1))
    args, kwargs = concat_branches([cond, uncond])
    assert torch.equal(args[0], torch.cat([x, x]))
    assert torch.equal(kwargs["encoder_hidden_states"].flatten(), torch.tensor([1.0, 1, 0, 0]))


def test_a_whole_unchanged_call_is_not_copied_back() -> None:
    """All branches of a split, unchanged and in order: the call's own inputs, not a copy; a
    branch restricted to some samples, or reordered branches, are concatenated."""
    args, kwargs = _inputs()
    branches = split_branches(NAMES, args, kwargs, 4, KEYS)
    cargs, ckwargs = concat_branches(branches)
    assert cargs is args and ckwargs is kwargs
    partial = [branches[0].take([1]), branches[1]]
    pargs, _ = concat_branches(partial)
    assert pargs is not args and torch.equal(pargs[0], args[0][1:])
    swapped_args, _ = concat_branches(branches[::-1])
    assert torch.equal(swapped_args[0], torch.cat([args[0][2:], args[0][:2]]))
