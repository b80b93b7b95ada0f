"""Guidance branches of one denoiser step: their inputs, split from a pipeline's call and
concatenated back (the executors that run them: parallel.executors).

A step's branches (cond, uncond, ...) are independent forwards of the same denoiser on
different conditioning. How they run is this module's business; what they compute is not:
serial and CFG-parallel execution call the same per-branch forward, so with one branch per
forward (``batched=False`` serially, or one branch per rank) they give the same bits.

Shape legend: B = samples in the micro-batch, N = branches, K = ranks of the CFG group. A
branch may hold fewer than B samples (an uncond branch restricted to the samples that still
need it under adaptive gating).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any

import torch

# A branch forward takes (args, kwargs) whose per-sample inputs have dim 0 = the branch's
# samples, and returns a (samples, ...) prediction.
Forward = Callable[[tuple[Any, ...], dict[str, Any]], torch.Tensor]


class NotConcatenable(ValueError):
    """Branches whose shared inputs differ (e.g. SD3's skip-layer call, or text of different
    lengths) cannot run as one forward."""


@dataclass(frozen=True)
class Branch:
    """One guidance branch of a step: its name and the denoiser inputs for it.

    Which inputs are per sample is declared, never guessed from shapes (a shared tensor whose
    dim 0 happens to equal the batch, such as CogVideoX's rotary embeddings, would fool a
    guess): ``sample_keys`` holds their paths, a keyword name (``"encoder_hidden_states"``), a
    key of a nested dict (``"added_cond_kwargs.text_embeds"``) or a positional index (``"0"``).
    A per-sample value is a tensor whose dim 0 is the sample, or a list with one entry per
    sample (Qwen-Image's ``img_shapes``); None values are left alone. Everything else is shared.
    """

    name: str
    """"cond", "uncond", "cond_skip", ... (the pipeline's own branch order is kept by the caller)."""
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    size: int
    """Samples in this branch: the leading size of its per-sample inputs."""
    sample_keys: frozenset[str] = frozenset()
    """Paths of the per-sample inputs (see the class docstring)."""
    call: int = 0
    """Which of the step's denoiser calls the pipeline makes it in: with cfg batching, only
    branches of the same call run as one forward, so a batched run makes the pipeline's own
    forwards."""
    origin: _Call | None = field(default=None, repr=False, compare=False)
    """The call this branch was split from, while it is unchanged: when every branch of that
    call runs as one forward, the call's own inputs are used instead of concatenating the
    branches back (the same values, without the copies)."""

    def take(self, index: Sequence[int]) -> Branch:
        """The branch restricted to samples ``index`` (ascending); shared inputs unchanged."""
        index = list(index)
        if index == list(range(self.size)):
            return self
        lo, hi = (index[0], index[-1] + 1) if index else (0, 0)
        if index == list(range(lo, hi)):  # contiguous: views, no copy
            fn: Callable[[Any], Any] = lambda v: v[lo:hi]
        else:
            fn = lambda v: (v.index_select(0, torch.as_tensor(index, device=v.device))
                            if isinstance(v, torch.Tensor) else type(v)(v[i] for i in index))  # fmt: skip
        args, kwargs = map_samples(self.args, self.kwargs, self.sample_keys, fn, self.size)
        return replace(self, args=args, kwargs=kwargs, size=len(index), origin=None)

    def with_inputs(self, name: str, call: int, **inputs: Any) -> Branch:
        """A sibling branch that the pipeline computes in another call of the step (Wan's and
        Flux's uncond, SD3's skip-layer cond): the same inputs but ``inputs`` (keyword
        replacements, e.g. the negative embeddings), per-sample values as fresh views."""
        view = lambda v: v[:]
        args, kwargs = map_samples(self.args, self.kwargs, self.sample_keys, view, self.size)
        return replace(self, name=name, args=args, kwargs={**kwargs, **inputs}, call=call, origin=None)


def _at(obj: Any, key: str) -> tuple[bool, Any]:
    if isinstance(obj, dict):
        return (key in obj, obj.get(key))
    if isinstance(obj, (list, tuple)) and key.isdigit() and int(key) < len(obj):
        return True, obj[int(key)]
    return False, None


def _apply(obj: Any, parts: list[str], fn: Callable[[Any, str], Any], where: str, size: int) -> Any:
    """``obj`` with ``fn(value, where)`` applied at path ``parts`` (containers on the way copied)."""
    if not parts:
        if obj is None:
            return None
        n = obj.shape[0] if isinstance(obj, torch.Tensor) and obj.dim() > 0 else (
            len(obj) if isinstance(obj, (list, tuple)) else None)  # fmt: skip
        if n != size:
            raise ValueError(f"per-sample input {where} has leading size {n}, expected {size}")
        return fn(obj, where)
    found, child = _at(obj, parts[0])
    if not found or child is None:
        return obj
    new_child = _apply(child, parts[1:], fn, where, size)
    if isinstance(obj, dict):
        return {**obj, parts[0]: new_child}
    items = list(obj)
    items[int(parts[0])] = new_child
    return type(obj)(items)


def map_samples(args: tuple[Any, ...], kwargs: dict[str, Any], sample_keys: frozenset[str],
                fn: Callable[[Any], Any], size: int) -> tuple[tuple[Any, ...], dict[str, Any]]:  # fmt: skip
    """Apply ``fn`` to every per-sample input (tensor or list) named by ``sample_keys``.

    Raises:
        ValueError: a per-sample input whose leading size is not ``size`` (the family's
            argument map is wrong for this call).
    """
    return _map_keyed(args, kwargs, sample_keys, lambda v, _key: fn(v), size)


@lru_cache(maxsize=64)
def _paths(sample_keys: frozenset[str]) -> tuple[tuple[str, str, list[str]], ...]:
    """(key, head, rest) of each per-sample path, in a fixed order."""
    return tuple((key, *_split(key)) for key in sorted(sample_keys))


def _split(key: str) -> tuple[str, list[str]]:
    head, *rest = key.split(".")
    return head, rest


def _map_keyed(args: tuple[Any, ...], kwargs: dict[str, Any], sample_keys: frozenset[str],
               fn: Callable[[Any, str], Any], size: int) -> tuple[tuple[Any, ...], dict[str, Any]]:  # fmt: skip
    for key, head, rest in _paths(sample_keys):
        if head.isdigit():
            if int(head) < len(args):
                items = list(args)
                items[int(head)] = _apply(items[int(head)], rest, fn, key, size)
                args = tuple(items)
        elif head in kwargs:
            kwargs = {**kwargs, head: _apply(kwargs[head], rest, fn, key, size)}
    return args, kwargs


def split_branches(names: Sequence[str], args: tuple[Any, ...], kwargs: dict[str, Any],
                   total_batch: int, sample_keys: frozenset[str], call: int = 0) -> list[Branch]:  # fmt: skip
    """Split one concatenated denoiser call into its branches.

    Args:
        names: branch names in the order they are concatenated on dim 0 (diffusers SD:
            ("uncond", "cond")).
        args, kwargs: the call; the per-sample inputs (``sample_keys``) have dim 0 total_batch
            and are split evenly, the rest is shared.
        total_batch: N * B.
        sample_keys: paths of the per-sample inputs (see ``Branch``).
        call: the call's index in its step.
    Raises:
        ValueError: total_batch is not divisible by the number of branches, or a per-sample
            input's leading size is not total_batch.
    """
    n = len(names)
    if total_batch % n:
        raise ValueError(f"batch {total_batch} does not split into {n} branches")
    b = total_batch // n
    origin = _Call(tuple(names), args, kwargs)
    out = []
    for i, name in enumerate(names):
        a, k = map_samples(args, kwargs, sample_keys, lambda v, i=i: v[i * b : (i + 1) * b], total_batch)
        out.append(Branch(name, a, k, b, sample_keys, call, origin))
    return out


@dataclass(frozen=True, eq=False)
class _Call:
    """One denoiser call as the pipeline made it, before it was split into ``names``."""

    names: tuple[str, ...]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


def _same(values: list[Any], path: str, sample_keys: frozenset[str]) -> bool:
    """Whether the branches' values at ``path`` are one shared input (per-sample ones skipped)."""
    if path in sample_keys:
        return True
    head = values[0]
    if all(v is head for v in values):
        return True
    if isinstance(head, dict):
        return all(isinstance(v, dict) and v.keys() == head.keys() for v in values) and all(
            _same([v[k] for v in values], f"{path}.{k}" if path else k, sample_keys) for k in head)
    if isinstance(head, (list, tuple)):
        return all(type(v) is type(head) and len(v) == len(head) for v in values) and all(
            _same([v[i] for v in values], f"{path}.{i}" if path else str(i), sample_keys)
            for i in range(len(head)))  # fmt: skip
    if isinstance(head, torch.Tensor):
        return all(isinstance(v, torch.Tensor) and v.shape == head.shape and v.dtype == head.dtype
                   and torch.equal(v, head) for v in values)  # fmt: skip
    try:
        return all(bool(v == head) for v in values)
    except Exception:  # noqa: BLE001 - incomparable: not shared
        return False


def concat_branches(branches: Sequence[Branch]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Inverse of split_branches: one call whose per-sample inputs hold every branch on dim 0.

    Raises:
        NotConcatenable: the branches' shared inputs differ, or their per-sample inputs differ
            in anything but dim 0 (shape, dtype, presence).
    """
    first = branches[0]
    if len(branches) == 1:
        return first.args, first.kwargs
    origin = first.origin
    if origin is not None and tuple(b.name for b in branches) == origin.names and all(
            b.origin is origin for b in branches):  # fmt: skip
        return origin.args, origin.kwargs  # the whole call, unchanged
    keys = first.sample_keys
    if any(b.sample_keys != keys for b in branches):
        raise NotConcatenable("branches declare different per-sample inputs")
    roots = [(b.args, b.kwargs) for b in branches]
    if not (_same([list(a) for a, _ in roots], "", keys) and _same([k for _, k in roots], "", keys)):
        raise NotConcatenable("branches differ in a shared input")
    parts: dict[str, list[Any]] = {key: [] for key in keys}
    for b in branches:
        for key in keys:
            head, *rest = key.split(".")
            found, value = (_at(list(b.args), head) if head.isdigit() else _at(b.kwargs, head))
            for part in rest:
                found, value = _at(value, part) if found else (False, None)
            parts[key].append(value if found else None)

    def cat(values: list[Any], key: str) -> Any:
        if all(v is None for v in values):
            return None
        if any(v is None for v in values):
            raise NotConcatenable(f"{key} is None in some branches only")
        if isinstance(values[0], torch.Tensor):
            if any(v.shape[1:] != values[0].shape[1:] or v.dtype != values[0].dtype for v in values):
                raise NotConcatenable(f"{key} differs in shape or dtype between branches")
            return torch.cat(values, dim=0)
        return type(values[0])(x for v in values for x in v)

    joined = {key: cat(values, key) for key, values in parts.items()}
    return _map_keyed(first.args, first.kwargs, keys, lambda _v, key: joined[key], first.size)
