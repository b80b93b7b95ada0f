"""CfgParallelExecutor and CfgGroup with synthetic predictors, K ranks as K threads.

The threads exchange through an in-memory all-gather (the same Transport protocol the
torch.distributed groups implement); tests/distributed/test_cfgmake_branches.py runs the same
cases on real gloo ranks.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch

from parallel.cfg_group import CfgGroup, CollectiveError, GroupAborted
from parallel.executors import CfgParallelExecutor, SerialBranchExecutor
from tests.synthetic import B, Predictor, make_branches, serial_predictions


class _Board:
    """Shared by the K threads of one simulated group."""

    def __init__(self, k: int) -> None:
        self.barrier = threading.Barrier(k, timeout=10)
        self.slots: list[Any] = [None] * k


class ThreadTransport:
    """In-memory all-gather between threads; a rank that never arrives breaks the barrier."""

    def __init__(self, board: _Board, rank: int) -> None:
        self.board, self.rank, self.size = board, rank, len(board.slots)
        self.gathers = 0

    def _gather(self, obj: Any) -> list[Any]:
        self.gathers += 1
        try:
            self.board.slots[self.rank] = obj
            self.board.barrier.wait()
            out = list(self.board.slots)
            self.board.barrier.wait()
        except threading.BrokenBarrierError as exc:
            raise CollectiveError("a rank did not arrive") from exc
        return out

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        return [t.clone() for t in self._gather(tensor)]

    def all_gather_object(self, obj: Any) -> list[Any]:
        return self._gather(obj)


def run_group(k: int, fn: Callable[[CfgGroup], Any]) -> list[Any]:
    """fn(group) on K threads; each rank's return value, or the exception it raised."""
    board = _Board(k)
    results: list[Any] = [None] * k

    def target(rank: int) -> None:
        try:
            results[rank] = fn(CfgGroup(ThreadTransport(board, rank)))
        except Exception as exc:  # noqa: BLE001 - returned to the test
            results[rank] = exc

    threads = [threading.Thread(target=target, args=(r,)) for r in range(k)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads), "a rank hung"
    return results


@pytest.mark.parametrize(("n", "k"), [(2, 2), (3, 2), (2, 3), (1, 2), (3, 3), (4, 2), (5, 3)])
@pytest.mark.parametrize("batched", [False, True])
def test_every_rank_gets_the_serial_predictions(n: int, k: int, batched: bool) -> None:
    expected = serial_predictions(n)

    def step(group: CfgGroup) -> tuple[list[torch.Tensor], list[int]]:
        predictor = Predictor()
        preds = CfgParallelExecutor(group, batched=batched).run(make_branches(n), predictor)
        return preds, predictor.calls

    split = batched and n == 1  # a lone branch is cut by samples, one chunk per rank
    for rank, (preds, calls) in enumerate(run_group(k, step)):
        assert len(preds) == n
        if not split and (not batched or len(calls) <= 1):  # one branch per forward: serial bits
            assert all(torch.equal(p, e) for p, e in zip(preds, expected)), f"rank {rank}"
        else:
            assert all(torch.allclose(p, e, atol=1e-6) for p, e in zip(preds, expected))
        own = len(range(rank, n, k))  # branches i with i % k == rank
        if split:
            assert calls == ([1] if rank < B else []), f"rank {rank} runs one sample of the cond"
        elif own == 0:
            assert calls == [], f"idle rank {rank} ran a forward"
        elif batched:
            assert calls == [own * B], f"rank {rank} should run its {own} branches in one forward"
        else:
            assert calls == [B] * own


def test_layout_is_round_robin() -> None:
    def layout(group: CfgGroup, batched: bool, n: int) -> list[tuple[str, int]]:
        executor = CfgParallelExecutor(group, batched=batched)
        executor.run(make_branches(n), Predictor())
        return executor.last_layout

    assert run_group(2, lambda g: layout(g, True, 3)) == [[("b0", 0), ("b1", 1), ("b2", 0)]] * 2
    assert run_group(2, lambda g: layout(g, True, 1)) == [[("b0", 0), ("b0", 1)]] * 2  # cut by samples
    assert run_group(2, lambda g: layout(g, False, 1)) == [[("b0", 0)]] * 2  # whole, on rank 0
    serial = SerialBranchExecutor(batched=True)
    serial.run(make_branches(2), Predictor())
    assert serial.last_layout == [("b0", 0), ("b1", 0)]


def test_bf16_predictions_gathered_bit_exact() -> None:
    expected = serial_predictions(2, torch.bfloat16)
    results = run_group(
        2, lambda g: CfgParallelExecutor(g, batched=False).run(make_branches(2, torch.bfloat16), Predictor())
    )
    for preds in results:
        assert all(p.dtype == torch.bfloat16 and torch.equal(p, e) for p, e in zip(preds, expected))


def test_failing_branch_aborts_every_rank_then_the_group_goes_on() -> None:
    """Rank 1's forward raises at step 2: both ranks raise GroupAborted there, and step 3
    runs normally on both (the per-sample retry depends on this)."""
    expected = serial_predictions(2)

    def steps(group: CfgGroup) -> list[Any]:
        executor = CfgParallelExecutor(group, batched=True)
        predictor = Predictor(fail_on=2 if group.rank == 1 else None)
        outcomes: list[Any] = []
        for _ in range(3):
            try:
                outcomes.append(executor.run(make_branches(2), predictor))
            except GroupAborted as exc:
                outcomes.append(exc)
        return outcomes

    for outcomes in run_group(2, steps):
        assert isinstance(outcomes[1], GroupAborted)
        assert str(outcomes[1]) == "cfg rank 1: ValueError: boom"
        assert outcomes[1].cfg_rank == 1
        for ok in (outcomes[0], outcomes[2]):
            assert all(torch.equal(p, e) for p, e in zip(ok, expected))


def test_lockstep_failure_outside_the_denoiser() -> None:
    """Rank 0 fails before its first step (say, in text encoding) while rank 1 is already in
    the step: both leave with GroupAborted, and the next lockstep block works."""

    def call(group: CfgGroup) -> list[Any]:
        executor = CfgParallelExecutor(group, batched=True)
        outcomes: list[Any] = []
        for attempt in range(2):
            try:
                with group.lockstep():
                    if group.rank == 0 and attempt == 0:
                        raise RuntimeError("encode failed")
                    outcomes.append(executor.run(make_branches(2), Predictor()))
            except GroupAborted as exc:
                outcomes.append(exc)
        return outcomes

    for outcomes in run_group(2, call):
        assert [type(o) for o in outcomes] == [GroupAborted, list]
        assert str(outcomes[0]) == "cfg rank 0: RuntimeError: encode failed"


def test_lockstep_failure_after_the_last_step() -> None:
    """A rank failing after its last collective is still caught when the block ends."""

    def call(group: CfgGroup) -> Any:
        try:
            with group.lockstep():
                CfgParallelExecutor(group, batched=True).run(make_branches(2), Predictor())
                if group.rank == 1:
                    raise KeyError("late")
        except GroupAborted as exc:
            return exc
        return "ok"

    results = run_group(2, call)
    assert all(isinstance(r, GroupAborted) and r.cfg_rank == 1 for r in results)


def test_lockstep_group_of_one_passes_errors_through() -> None:
    group = CfgGroup(None)
    with pytest.raises(ValueError, match="plain"):
        with group.lockstep():
            raise ValueError("plain")
    assert group.agree(None, [1, 2]) == [[1, 2] + [0] * 10]


def test_out_of_step_ranks_fail_loudly() -> None:
    def call(group: CfgGroup) -> Any:
        if group.rank == 1:
            group._seq += 1  # as if rank 1 had skipped an exchange
        try:
            group.agree(None)
        except CollectiveError as exc:
            return exc
        return "ok"

    results = run_group(2, call)
    assert all(isinstance(r, CollectiveError) and "out of step" in str(r) for r in results)


def test_collective_error_is_not_turned_into_a_group_abort() -> None:
    """A broken group (a rank that never arrives) stays a CollectiveError in lockstep."""
    board = _Board(2)
    board.barrier = threading.Barrier(2, timeout=0.2)
    group = CfgGroup(ThreadTransport(board, 0))  # rank 1 never shows up
    with pytest.raises(CollectiveError):
        with group.lockstep():
            CfgParallelExecutor(group, batched=True).run(make_branches(2), Predictor())


def test_one_collective_per_step_once_the_layout_is_known() -> None:
    """The first step with given branch sizes takes the control exchange and the gather; later
    ones a single gather carrying the status, with the same predictions; none for a group of
    one. The seconds inside them include waiting for the slowest rank."""
    import time

    expected = serial_predictions(2)

    def steps(group: CfgGroup) -> tuple[int, float, list[list[torch.Tensor]]]:
        slow = Predictor()
        forward = slow if group.rank == 0 else (lambda *a, **kw: (time.sleep(0.2), slow(*a, **kw))[1])
        executor = CfgParallelExecutor(group, batched=False)
        preds = [executor.run(make_branches(2), forward) for _ in range(3)]
        return group.exchanges, group.exchange_s, preds

    (n0, s0, p0), (n1, s1, p1) = run_group(2, steps)
    assert n0 == n1 == 2 + 1 + 1
    assert s0 >= 0.5 > s1, "rank 0 waited for the slow rank 1 at every step"
    for preds in p0 + p1:
        assert all(torch.equal(p, e) for p, e in zip(preds, expected))
    alone = CfgGroup(None)
    CfgParallelExecutor(alone, batched=True).run(make_branches(2), Predictor())
    assert alone.exchanges == 0 and alone.exchange_s == 0.0


def test_predictions_that_change_layout_fall_back_to_two_exchanges() -> None:
    """At step 2 the predictions come back in bfloat16 on both ranks: the one-collective step
    sees that the learnt layout no longer fits, every rank falls back to the control exchange
    and gathers the new layout exactly; step 3 is one collective again."""

    class Switching(Predictor):
        step = 0

        def __call__(self, args, kwargs):  # noqa: ANN001, ANN204
            out = super().__call__(args, kwargs)
            return out.to(torch.bfloat16) if self.step >= 1 else out

    def steps(group: CfgGroup) -> tuple[list[int], list[list[torch.Tensor]]]:
        executor, predictor, counts, preds = CfgParallelExecutor(group, batched=False), Switching(), [], []
        for predictor.step in range(3):
            before = group.exchanges
            preds.append(executor.run(make_branches(2), predictor))
            counts.append(group.exchanges - before)
        return counts, preds

    reference, serial, expected = Switching(), SerialBranchExecutor(batched=False), []
    for reference.step in range(3):
        expected.append(serial.run(make_branches(2), reference))
    assert expected[1][0].dtype == torch.bfloat16
    for counts, preds in run_group(2, steps):
        assert counts == [2, 3, 1]  # step 2: the failed one-collective try, then both exchanges
        for got, want in zip(preds, expected):
            assert all(p.dtype == w.dtype and torch.equal(p, w) for p, w in zip(got, want))
