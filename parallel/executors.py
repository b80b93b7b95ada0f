"""Branch execution: run the guidance branches of one denoiser step, on this rank or across its
CFG group.

A step's branches (cond, uncond, ...) are independent forwards of the same denoiser on
different conditioning. How they run is this module's business; what they compute is not:
serial and CFG-parallel execution call the same per-branch forward, so with one branch per
forward (``batched=False`` serially, or one branch per rank) they give the same bits.

A prediction is one tensor, or a tuple of tensors for a denoiser with several outputs
(LTX-2: video and audio), each with the branch's samples on dim 0; every output is split,
gathered and returned together, in the structure the forward returned.

Shape legend: B = samples in the micro-batch, N = branches, K = ranks of the CFG group.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from parallel.branches import Branch, Forward, NotConcatenable, concat_branches
from parallel.cfg_group import PAYLOAD, CfgGroup

Prediction = torch.Tensor | tuple[torch.Tensor, ...]
"""A branch's prediction: (samples, ...), or a tuple of such (one per denoiser output)."""


def _forwards(branches: Sequence[Branch], batched: bool, max_forward: int | None = None,
              ) -> list[tuple[list[Branch], tuple[Any, ...], dict[str, Any]]]:  # fmt: skip
    """The forwards that run ``branches``, each (its branches, args, kwargs): with ``batched``,
    consecutive branches of the same call whose shared inputs agree form one forward (inputs
    concatenated once) while it holds at most ``max_forward`` samples (None: no cap); else one
    forward per branch."""
    out: list[tuple[list[Branch], tuple[Any, ...], dict[str, Any]]] = []
    for b in branches:
        if (batched and out and out[-1][0][-1].call == b.call
                and (max_forward is None or sum(x.size for x in out[-1][0]) + b.size <= max_forward)):  # fmt: skip
            group = [*out[-1][0], b]
            try:
                args, kwargs = concat_branches(group)
            except NotConcatenable:
                pass
            else:
                out[-1] = (group, args, kwargs)
                continue
        out.append(([b], b.args, b.kwargs))
    return out


def forward_groups(branches: Sequence[Branch], batched: bool, max_forward: int | None = None) -> list[list[Branch]]:
    """How ``branches`` run as forwards (see ``_forwards``): the branches of each forward."""
    return [group for group, _, _ in _forwards(branches, batched, max_forward)]


def _split(pred: Prediction, sizes: list[int]) -> list[Prediction]:
    """A batched forward's prediction cut back into its branches (every output alike)."""
    if isinstance(pred, torch.Tensor):
        return list(pred.split(sizes, dim=0))
    return list(zip(*(p.split(sizes, dim=0) for p in pred)))


def _run_local(branches: Sequence[Branch], forward: Forward, batched: bool,
               max_forward: int | None = None) -> list[Prediction]:  # fmt: skip
    preds: list[Prediction] = []
    for group, args, kwargs in _forwards(branches, batched, max_forward):
        if len(group) == 1:
            preds.append(forward(args, kwargs))
        else:
            preds += _split(forward(args, kwargs), [b.size for b in group])
    return preds


def _outputs(pred: Prediction) -> tuple[torch.Tensor, ...]:
    return (pred,) if isinstance(pred, torch.Tensor) else tuple(pred)


class SerialBranchExecutor:
    """Runs every branch on this rank.

    ``batched=True`` concatenates the branches into one forward (fewer, larger kernels: at batch 1
    ~25% faster than two forwards on a CPU); ``batched=False`` runs one forward per branch, the
    exact computation a CFG-parallel rank performs for its own branch. ``max_forward`` (the
    job's --max-forward-batch; None: no cap) stops concatenating branches once a forward would
    hold more samples.
    """

    def __init__(self, *, batched: bool, max_forward: int | None = None) -> None:
        self.batched = batched
        self.max_forward = max_forward
        self.last_layout: list[tuple[str, int]] = []
        """(branch name, CFG-group rank) of each forward input of the last step."""

    def run(self, branches: Sequence[Branch], forward: Forward) -> list[Prediction]:
        """Run the branches.

        Args:
            branches: N branches; branch i's tensors have ``branches[i].size`` samples.
            forward: the denoiser's own forward (a tensor, or a tuple of tensors).
        Returns:
            N predictions, prediction i of shape (branches[i].size, ...) (each output so), in
            branch order.
        """
        self.last_layout = [(b.name, 0) for b in branches]
        return _run_local(branches, forward, self.batched, self.max_forward)


_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _chunks(size: int, parts: int) -> list[list[int]]:
    """``range(size)`` cut into ``min(parts, size)`` contiguous chunks, larger ones first."""
    parts = min(parts, size)
    base, extra = divmod(size, parts)
    bounds = [0]
    for r in range(parts):
        bounds.append(bounds[-1] + base + (r < extra))
    return [list(range(bounds[r], bounds[r + 1])) for r in range(parts)]


class CfgParallelExecutor:
    """Runs a step's branches across the K ranks of a CFG group.

    Branch i runs on group rank ``i % K`` (round-robin: 2 branches on 2 ranks, 3 on 2, 1 or 2
    on 3 all work; a rank without a branch runs no forward). Each rank runs its own branches
    (concatenated when ``batched`` and it holds several), then the predictions are
    all-gathered as raw bytes, never pre-weighted and summed, so every rank hands the
    pipeline's own CFG combine exactly the tensors a serial run would (xDiT and sglang
    all-reduce ``s * cond`` and ``(1 - s) * uncond`` instead, which rounds differently and
    cancels badly in bf16 at large scales).

    A step with a single branch (after the CFG gate, or without guidance) is, when ``batched``,
    cut by samples into contiguous chunks, one per rank, so that no rank idles when the
    micro-batch has at least K samples. Smaller forwards round differently, so this is within
    float rounding of serial; with ``batched=False`` the branch runs whole on rank 0 and the
    output is byte-identical to serial ``--no-cfg-batching``.

    A branch forward that raises on one rank raises ``GroupAborted`` on every rank at the same
    step (see ``CfgGroup.agree``), so the group stays in lockstep.

    A step takes two collectives (the status and shapes, then the predictions) the first time
    its branch sizes occur; after that, on host (gloo) groups, one: the status rides with the
    predictions in the layout learnt (``CfgGroup.agree_and_gather``). On a device the status
    exchange stays a CPU one, which needs no device sync.

    Args:
        group: this rank's CFG group (size K >= 1).
        batched: concatenate a rank's own branches into one forward, and split a lone branch
            by samples.
        max_forward: most samples a rank's concatenated forward may hold (--max-forward-batch);
            None: no cap.
    """

    def __init__(self, group: CfgGroup, *, batched: bool, max_forward: int | None = None) -> None:
        self.group = group
        self.batched = batched
        self.max_forward = max_forward
        self.last_layout: list[tuple[str, int]] = []
        """(branch name, CFG-group rank) of each forward input of the last step; a branch cut
        by samples appears once per rank that ran a chunk of it."""
        self._specs: dict[tuple[int, ...], tuple[torch.dtype, list[tuple[int, ...]]]] = {}
        """(dtype, per-output sample shapes) of the predictions, by the step's branch sizes."""

    def run(self, branches: Sequence[Branch], forward: Forward) -> list[Prediction]:
        """Run this rank's share of the branches and gather everyone's predictions.

        Args:
            branches: the step's N >= 1 branches (identical on every rank of the group);
                branch i's tensors have ``branches[i].size`` samples.
            forward: the denoiser's own forward.
        Returns:
            N predictions, prediction i of shape (branches[i].size, ...) (each output so), in
            branch order, identical on every rank.
        Raises:
            GroupAborted: a branch forward raised on some rank.
            CollectiveError: a rank died, hung past the collective timeout, or fell out of step.
        """
        k = self.group.size
        if self.batched and len(branches) == 1 and k > 1 and branches[0].size > 1:
            whole = branches[0]
            parts = [whole.take(idx) for idx in _chunks(whole.size, k)]
            preds = self._run_dealt(parts, forward)
            if isinstance(preds[0], torch.Tensor):
                return [torch.cat(preds, dim=0)]
            return [tuple(torch.cat(outs, dim=0) for outs in zip(*preds))]
        return self._run_dealt(branches, forward)

    def _run_dealt(self, branches: Sequence[Branch], forward: Forward) -> list[Prediction]:
        me = self.group.rank
        self.last_layout = [(b.name, self.group.owner(i)) for i, b in enumerate(branches)]
        mine = [b for i, b in enumerate(branches) if self.group.owner(i) == me]
        error, local = None, []
        try:
            local = [_outputs(p) for p in _run_local(mine, forward, self.batched, self.max_forward)] if mine else []
            outs = local[0] if local else ()
            if any(len(p) != len(outs) or any(a.shape[1:] != b.shape[1:] or a.dtype != b.dtype
                                              for a, b in zip(p, outs)) for p in local):  # fmt: skip
                raise RuntimeError("branch predictions differ in sample shape or dtype")
            if any(o.dtype != outs[0].dtype for o in outs):
                raise RuntimeError(f"cannot gather outputs of different dtypes {[o.dtype for o in outs]}")
            if outs and outs[0].dtype not in _DTYPES:
                raise RuntimeError(f"cannot gather predictions of dtype {outs[0].dtype}")
            if outs and 3 + sum(o.dim() for o in outs) > PAYLOAD:
                raise RuntimeError(f"cannot gather predictions of shapes {[tuple(o.shape) for o in outs]}")
        except Exception as exc:  # noqa: BLE001 - announced to the group
            error = f"{type(exc).__name__}: {exc}"
        mine_spec = (outs[0].dtype, [tuple(o.shape[1:]) for o in outs]) if local and error is None else None
        key = tuple(b.size for b in branches)
        expected = self._specs.get(key)
        if expected is not None and self.group.carries_status:
            # One collective: the status rides with the predictions, in the layout of the
            # last step with these branch sizes; a rank whose predictions differ from it
            # makes every rank fall back to the two-exchange path below.
            usable = mine_spec is None or mine_spec == expected
            send = self._send(expected, branches, local if usable and error is None else [])
            gathered = self.group.agree_and_gather(error, send, usable=usable)
            if gathered is not None:
                return self._unpack(expected, branches, gathered)
            del self._specs[key]
        # header: [holds predictions, dtype, outputs, then per output: ndim of one sample, *its shape]
        meta = [0]
        if mine_spec is not None:
            meta = [1, _DTYPES.index(mine_spec[0]), len(outs)]
            for o in outs:
                meta += [o.dim() - 1, *o.shape[1:]]
        rows = self.group.agree(error, meta)  # rank 0 always holds branch 0
        holders = [r for r in rows if r[0]]
        specs = [_spec(r) for r in holders]
        if any(spec != specs[0] for spec in specs):
            raise RuntimeError(f"CFG group ranks predicted different shapes: {holders}")
        self._specs[key] = specs[0]
        gathered = self.group.all_gather(self._send(specs[0], branches, local))
        return self._unpack(specs[0], branches, gathered)

    def _send(self, spec: tuple[torch.dtype, list[tuple[int, ...]]], branches: Sequence[Branch],
              local: list[tuple[torch.Tensor, ...]]) -> torch.Tensor:  # fmt: skip
        """This rank's gather input: (slots, largest branch, flattened outputs), its branches'
        predictions in its slots, zeros elsewhere."""
        dtype, shapes = spec
        slots = -(-len(branches) // self.group.size)  # the most branches any rank holds
        rows_max = max(b.size for b in branches)  # every slot padded to the largest branch
        send = torch.zeros((slots, rows_max, sum(math.prod(s) for s in shapes)), dtype=dtype,
                           device=self.group.device)  # fmt: skip
        for j, outputs in enumerate(local):
            send[j, : outputs[0].shape[0]] = torch.cat([o.reshape(o.shape[0], -1) for o in outputs], dim=1)
        return send

    def _unpack(self, spec: tuple[torch.dtype, list[tuple[int, ...]]], branches: Sequence[Branch],
                gathered: list[torch.Tensor]) -> list[Prediction]:  # fmt: skip
        """The N predictions, in branch order, from every rank's gather input."""
        _, shapes = spec
        sizes = [math.prod(shape) for shape in shapes]
        preds: list[Prediction] = []
        for i, b in enumerate(branches):
            flat = gathered[self.group.owner(i)][i // self.group.size][: b.size]
            outputs = tuple(part.reshape(b.size, *shape) for part, shape in zip(flat.split(sizes, dim=1), shapes))
            preds.append(outputs[0] if len(outputs) == 1 else outputs)
        return preds


def _spec(row: list[int]) -> tuple[torch.dtype, list[tuple[int, ...]]]:
    """(dtype, per-output sample shapes) from a holder's header row."""
    dtype, count, shapes, at = _DTYPES[row[1]], row[2], [], 3
    for _ in range(count):
        ndim = row[at]
        shapes.append(tuple(row[at + 1 : at + 1 + ndim]))
        at += 1 + ndim
    return dtype, shapes
