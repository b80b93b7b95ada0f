"""A CFG group: the ranks that split one micro-batch's guidance branches, kept in lockstep.

Every rank of a group runs the same pipeline call on the same inputs, so the group must take
the same path through it, including when a rank fails. Two rules keep it so:

- ``agree(error)`` is the group's only control exchange: every rank says whether it failed
  since the last one (on the host it can ride with a gather: ``agree_and_gather``). If any did, every rank raises ``GroupAborted`` with the first failing
  rank's message at the same point, so a per-sample retry starts in step on every rank.
- A collective that itself fails or times out (a rank died or hung) raises ``CollectiveError``,
  which is not a per-sample error: the run stops, within ``--collective-timeout`` seconds.

Exchanges carry a sequence number, so ranks that fell out of step fail loudly instead of
pairing the wrong messages. They are CPU tensors (gloo, also on GPU nodes: see
``Platform.process_group_backend``), so reading them never waits for the device; only the
predictions travel on the device's backend.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

import torch


class CollectiveError(RuntimeError):
    """A collective failed or timed out: a rank of the group died, hung or fell out of step."""


class GroupAborted(RuntimeError):
    """A rank of the CFG group failed in this pipeline call; raised on every rank alike.

    Attributes:
        cfg_rank: the first failing rank (position in the group).
        reason: that rank's error, ``"Type: message"``.
    """

    def __init__(self, cfg_rank: int, reason: str) -> None:
        super().__init__(reason if cfg_rank == -1 else f"cfg rank {cfg_rank}: {reason}")
        self.cfg_rank = cfg_rank
        self.reason = reason


class Transport(Protocol):
    """All-gather within one group. Implemented on torch.distributed by ``parallel.group``;
    a CPU tensor goes through gloo, a device tensor through the device's backend."""

    size: int
    rank: int

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Each rank's ``tensor`` (equal shapes and dtypes), in rank order."""
        ...

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Each rank's picklable ``obj``, in rank order."""
        ...


# Header of an exchange: [sequence, failed, *payload]; payload is PAYLOAD ints.
PAYLOAD = 12


class CfgGroup:
    """This rank's view of its CFG group.

    Args:
        transport: collectives over the group's ranks, or None for a group of one (no
            collectives at all).
        device: the rank's device, where predictions are gathered (NCCL / HCCL need them there);
            control exchanges stay on the CPU.

    Attributes:
        exchanges: collectives this rank took part in (control exchanges and gathers).
        exchange_s: seconds spent in them, waiting for the slowest rank of the group included
            (on a GPU, a gather's seconds are those of enqueueing it: the wait lands on the next
            host sync).

    Example::

        group = CfgGroup(None)            # cfg = 1
        group.size, group.rank            # -> (1, 0)
    """

    def __init__(self, transport: Transport | None, device: torch.device | None = None) -> None:
        self.transport = transport
        self.size = transport.size if transport else 1
        self.rank = transport.rank if transport else 0
        self.device = device or torch.device("cpu")
        self._seq = 0
        self.exchanges = 0
        self.exchange_s = 0.0

    def _gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        start = time.perf_counter()
        try:
            return self.transport.all_gather(tensor)
        finally:
            self.exchanges += 1
            self.exchange_s += time.perf_counter() - start

    def owner(self, index: int) -> int:
        """Rank of the group that owns item ``index`` (a branch, a decoded image): round-robin."""
        return index % self.size

    def agree(self, error: str | None, payload: Sequence[int] = ()) -> list[list[int]]:
        """Exchange status (and up to PAYLOAD small ints) with every rank of the group.

        Args:
            error: this rank's failure since the last exchange, "Type: message", or None.
            payload: ints to share (shapes, dtype codes), at most PAYLOAD.
        Returns:
            Every rank's payload (padded with zeros), in rank order.
        Raises:
            GroupAborted: some rank reported an error (the first one's message).
            CollectiveError: the exchange failed, timed out, or the ranks are out of step.
        """
        if self.transport is None:
            if error is not None:
                raise GroupAborted(-1, error)
            return [list(payload) + [0] * (PAYLOAD - len(payload))]
        if len(payload) > PAYLOAD:
            raise ValueError(f"payload of {len(payload)} ints exceeds {PAYLOAD}")
        self._seq += 1
        header = [self._seq, int(error is not None), *payload] + [0] * (PAYLOAD - len(payload))
        rows = [
            t.tolist()
            for t in self._gather(torch.tensor(header, dtype=torch.int64))
        ]
        if any(r[0] != self._seq for r in rows):
            raise CollectiveError(
                f"CFG group out of step: exchange numbers {[r[0] for r in rows]} differ"
            )
        failed = [i for i, r in enumerate(rows) if r[1]]
        if failed:
            reasons = self.transport.all_gather_object(error)
            raise GroupAborted(failed[0], str(reasons[failed[0]]))
        return [r[2:] for r in rows]

    @contextmanager
    def lockstep(self) -> Iterator[None]:
        """Span of work the whole group does together (encode + denoise of one micro-batch).

        An exception on this rank is announced to the group and comes out as GroupAborted on
        every rank; leaving the block normally checks that no other rank failed in it.

        Raises:
            GroupAborted: this or another rank failed inside the block.
            CollectiveError: see ``agree``.
        """
        if self.transport is None:
            yield
            return
        try:
            yield
        except (GroupAborted, CollectiveError):
            raise  # already agreed, or the group is broken
        except Exception as exc:  # noqa: BLE001 - announced, then raised on every rank
            self.agree(f"{type(exc).__name__}: {exc}")
            raise AssertionError("agree() returned after a reported error") from exc
        self.agree(None)

    @property
    def carries_status(self) -> bool:
        """Whether a status can ride with a gather (``agree_and_gather``): the gather runs on
        the host (gloo on CPU), so reading its header costs no device sync."""
        return self.transport is not None and self.device.type == "cpu"

    def agree_and_gather(self, error: str | None, tensor: torch.Tensor, *, usable: bool) -> list[torch.Tensor] | None:
        """``agree`` and ``all_gather`` in one collective: a 16-byte header [sequence, status]
        rides in front of the tensor's bytes. For host gathers only (``carries_status``); on a
        device the header could only be read after a device sync, so there the control
        exchange stays apart, on the CPU.

        Args:
            error: this rank's failure, "Type: message", or None.
            tensor: what to gather, the same shape and dtype on every rank (zeros when this
                rank has nothing valid to send).
            usable: False when this rank's tensor does not fit what the group expected (the
                caller then falls back to ``agree`` + ``all_gather``).
        Returns:
            Every rank's tensor in rank order, or None when some rank was not ``usable``.
        Raises:
            GroupAborted: some rank reported an error (the first one's message).
            CollectiveError: the exchange failed, timed out, or the ranks are out of step.
        """
        self._seq += 1
        status = 1 if error is not None else (0 if usable else 2)
        header = torch.tensor([self._seq, status], dtype=torch.int64).view(torch.uint8)
        flat = torch.cat([header, tensor.contiguous().reshape(-1).view(torch.uint8)])
        rows = self._gather(flat)
        heads = [r[:16].clone().view(torch.int64).tolist() for r in rows]
        if any(h[0] != self._seq for h in heads):
            raise CollectiveError(f"CFG group out of step: exchange numbers {[h[0] for h in heads]} differ")
        failed = [i for i, h in enumerate(heads) if h[1] == 1]
        if failed:
            reasons = self.transport.all_gather_object(error)
            raise GroupAborted(failed[0], str(reasons[failed[0]]))
        if any(h[1] == 2 for h in heads):
            return None
        return [r[16:].view(tensor.dtype).reshape(tensor.shape) for r in rows]

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Bit-exact all-gather of equal-shaped tensors of any dtype (sent as bytes).

        Raises:
            CollectiveError: see ``agree``.
        """
        if self.transport is None:
            return [tensor]
        flat = tensor.contiguous().reshape(-1).view(torch.uint8)
        return [t.view(tensor.dtype).reshape(tensor.shape) for t in self._gather(flat)]
