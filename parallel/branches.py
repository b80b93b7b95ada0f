"""Branch execution: run the guidance branches of one denoiser step.

A step's branches (cond, uncond, ...) are independent forwards of the same denoiser on
different conditioning. How they run is this module's business; what they compute is not:
serial and CFG-parallel execution call the same per-branch forward, so with one branch per
forward (``batched=False`` serially, or one branch per rank) they give the same bits.

Shape legend: B = samples in the micro-batch, N = branches, K = ranks of the CFG group.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from parallel.cfg_group import PAYLOAD, CfgGroup

# A branch forward takes (args, kwargs) whose tensors have batch dim B and returns (B, ...).
Forward = Callable[[tuple[Any, ...], dict[str, Any]], torch.Tensor]


@dataclass(frozen=True)
class Branch:
    """One guidance branch of a step: its name and the denoiser inputs for it."""

    name: str
    """"cond", "uncond", ... (the pipeline's own branch order is kept by the caller)."""
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


def map_batch(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor], batch: int) -> Any:
    """Apply ``fn`` to every tensor in ``obj`` (nested tuples, lists, dicts) whose dim 0 is ``batch``.

    Scalars, 0-d tensors and tensors of another leading size (a shared timestep) pass unchanged.
    """
    if isinstance(obj, torch.Tensor):
        return fn(obj) if obj.dim() > 0 and obj.shape[0] == batch else obj
    if isinstance(obj, dict):
        return {k: map_batch(v, fn, batch) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(map_batch(v, fn, batch) for v in obj)
    return obj


def split_branches(
    names: Sequence[str], args: tuple[Any, ...], kwargs: dict[str, Any], total_batch: int
) -> list[Branch]:
    """Split one concatenated denoiser call into its branches.

    Args:
        names: branch names in the order they are concatenated on dim 0 (diffusers SD:
            ("uncond", "cond")).
        args, kwargs: the call; tensors with dim 0 == total_batch are split evenly.
        total_batch: N * B.
    Raises:
        ValueError: total_batch is not divisible by the number of branches.
    """
    n = len(names)
    if total_batch % n:
        raise ValueError(f"batch {total_batch} does not split into {n} branches")
    b = total_batch // n
    return [
        Branch(
            name,
            map_batch(args, lambda t, i=i: t[i * b : (i + 1) * b], total_batch),
            map_batch(kwargs, lambda t, i=i: t[i * b : (i + 1) * b], total_batch),
        )
        for i, name in enumerate(names)
    ]


def concat_branches(branches: Sequence[Branch], batch: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Inverse of split_branches: one call whose tensors hold every branch on dim 0."""
    first = branches[0]
    if len(branches) == 1:
        return first.args, first.kwargs
    flat_args = [b.args for b in branches]
    flat_kwargs = [b.kwargs for b in branches]

    def cat_at(path_values: list[Any]) -> Any:
        head = path_values[0]
        if all(v is head for v in path_values):  # shared by the branches, never split
            return head
        if isinstance(head, torch.Tensor):
            if head.dim() > 0 and head.shape[0] == batch:
                return torch.cat(path_values, dim=0)
            return head
        if isinstance(head, dict):
            return {k: cat_at([v[k] for v in path_values]) for k in head}
        if isinstance(head, (tuple, list)):
            return type(head)(cat_at([v[i] for v in path_values]) for i in range(len(head)))
        return head

    return cat_at(flat_args), cat_at(flat_kwargs)


def _run_local(branches: Sequence[Branch], forward: Forward, batch: int, batched: bool) -> list[torch.Tensor]:
    if batched and len(branches) > 1:
        args, kwargs = concat_branches(branches, batch)
        return list(forward(args, kwargs).split(batch, dim=0))
    return [forward(b.args, b.kwargs) for b in branches]


class SerialBranchExecutor:
    """Runs every branch on this rank.

    ``batched=True`` concatenates the branches into one forward (fewer, larger kernels: at batch 1
    ~25% faster than two forwards on a CPU); ``batched=False`` runs one forward per branch, the
    exact computation a CFG-parallel rank performs for its own branch.
    """

    def __init__(self, *, batched: bool) -> None:
        self.batched = batched

    def run(self, branches: Sequence[Branch], forward: Forward, batch: int) -> list[torch.Tensor]:
        """Run the branches.

        Args:
            branches: N branches, each with inputs of batch dim ``batch``.
            forward: the denoiser's own forward.
            batch: B, samples per branch.
        Returns:
            N predictions, each (B, ...), in branch order.
        """
        return _run_local(branches, forward, batch, self.batched)

    def ranks_for(self, num_branches: int) -> list[int]:
        """CFG-group rank that runs each branch: all on this one."""
        return [0] * num_branches


_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


class CfgParallelExecutor:
    """Runs a step's branches across the K ranks of a CFG group.

    Branch i runs on group rank ``i % K`` (round-robin: 2 branches on 2 ranks, 3 on 2, 1 or 2
    on 3 all work; a rank without a branch runs no forward). Each rank runs its own branches
    (concatenated when ``batched`` and it holds several), then the predictions are
    all-gathered as raw bytes, never pre-weighted and summed, so every rank hands the
    pipeline's own CFG combine exactly the tensors a serial run would (xDiT and sglang
    all-reduce ``s * cond`` and ``(1 - s) * uncond`` instead, which rounds differently and
    cancels badly in bf16 at large scales).

    A branch forward that raises on one rank raises ``GroupAborted`` on every rank at the same
    step (see ``CfgGroup.agree``), so the group stays in lockstep.

    Args:
        group: this rank's CFG group (size K >= 1).
        batched: concatenate a rank's own branches into one forward.
    """

    def __init__(self, group: CfgGroup, *, batched: bool) -> None:
        self.group = group
        self.batched = batched

    def ranks_for(self, num_branches: int) -> list[int]:
        """CFG-group rank that runs each branch, in branch order."""
        return [self.group.owner(i) for i in range(num_branches)]

    def run(self, branches: Sequence[Branch], forward: Forward, batch: int) -> list[torch.Tensor]:
        """Run this rank's share of the branches and gather everyone's predictions.

        Args:
            branches: the step's N >= 1 branches (identical on every rank of the group).
            forward: the denoiser's own forward.
            batch: B, samples per branch.
        Returns:
            N predictions, each (B, ...), in branch order, identical on every rank.
        Raises:
            GroupAborted: a branch forward raised on some rank.
            CollectiveError: a rank died, hung past the collective timeout, or fell out of step.
        """
        n, k, me = len(branches), self.group.size, self.group.rank
        mine = [b for i, b in enumerate(branches) if self.group.owner(i) == me]
        error, local = None, []
        try:
            local = _run_local(mine, forward, batch, self.batched) if mine else []
            if any(p.shape != local[0].shape or p.dtype != local[0].dtype for p in local):
                raise RuntimeError("branch predictions differ in shape or dtype")
            if local and local[0].dtype not in _DTYPES:
                raise RuntimeError(f"cannot gather predictions of dtype {local[0].dtype}")
            if local and 3 + local[0].dim() > PAYLOAD:
                raise RuntimeError(f"cannot gather {local[0].dim()}-d predictions")
        except Exception as exc:  # noqa: BLE001 - announced to the group
            error = f"{type(exc).__name__}: {exc}"
        meta = (
            [1, _DTYPES.index(local[0].dtype), local[0].dim(), *local[0].shape]
            if local and error is None
            else [0]
        )
        rows = self.group.agree(error, meta)  # rank 0 always holds branch 0
        holders = [r for r in rows if r[0]]
        if any(r[: 3 + r[2]] != holders[0][: 3 + holders[0][2]] for r in holders):
            raise RuntimeError(f"CFG group ranks predicted different shapes: {holders}")
        dtype, ndim = _DTYPES[holders[0][1]], holders[0][2]
        shape = tuple(holders[0][3 : 3 + ndim])
        slots = -(-n // k)  # the most branches any rank holds
        send = torch.zeros((slots, *shape), dtype=dtype, device=self.group.device)
        for j, p in enumerate(local):
            send[j] = p
        gathered = self.group.all_gather(send)
        return [gathered[self.group.owner(i)][i // k] for i in range(n)]
