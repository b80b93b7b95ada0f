"""The plan: fixed-size shards of contiguous rows, and micro-batches dealt to dp ranks.

Micro-batches are cut on a grid of ``batch_size`` manifest rows counted from row 0 (never from a
shard's start), then split where generation settings differ. Shard sizes are multiples of
batch_size, so a micro-batch never straddles shards: its composition, and therefore every image
(CPU and GPU kernels give batch-size-dependent rounding), is the same whatever the shard size,
the number of ranks or the number of SLURM tasks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from jobs.rows import PlannedSample


@dataclass(frozen=True)
class Shard:
    """Rows [start, stop) of the manifest."""

    index: int
    start: int
    stop: int

    @property
    def name(self) -> str:
        """Zero-padded file stem: ``shard-00042``."""
        return f"shard-{self.index:05d}"


def plan_shards(num_rows: int, shard_size: int) -> list[Shard]:
    """Cut ``num_rows`` into shards of ``shard_size`` rows (the last may be shorter).

    Raises:
        ValueError: num_rows < 0 or shard_size < 1.
    """
    if num_rows < 0 or shard_size < 1:
        raise ValueError(f"cannot shard {num_rows} rows by {shard_size}")
    return [
        Shard(i, start, min(start + shard_size, num_rows))
        for i, start in enumerate(range(0, num_rows, shard_size))
    ]


def num_shards(num_rows: int, shard_size: int) -> int:
    """Shards of ``plan_shards(num_rows, shard_size)``, without building them.

    Raises:
        ValueError: num_rows < 0 or shard_size < 1.
    """
    if num_rows < 0 or shard_size < 1:
        raise ValueError(f"cannot shard {num_rows} rows by {shard_size}")
    return -(-num_rows // shard_size)


def shard_at(num_rows: int, shard_size: int, index: int) -> Shard:
    """Shard ``index`` of ``plan_shards(num_rows, shard_size)``, without building the others
    (a rank of a SLURM task holds a few shards of a plan that may have millions).

    Raises:
        IndexError: index outside [0, num_shards).
    """
    if not 0 <= index < num_shards(num_rows, shard_size):
        raise IndexError(f"shard {index} of {num_shards(num_rows, shard_size)}")
    start = index * shard_size
    return Shard(index, start, min(start + shard_size, num_rows))


def select_shards(num_rows: int, shard_size: int, indices: Sequence[int] | None) -> list[Shard]:
    """Shards ``indices`` of the plan (sorted, once each), or the whole plan for None. Only the
    selected shards are built: a SLURM task holds a few of a plan that may have millions.

    Raises:
        IndexError: an index outside [0, num_shards).
    """
    if indices is None:
        return plan_shards(num_rows, shard_size)
    return [shard_at(num_rows, shard_size, i) for i in sorted(set(indices))]


def micro_batches(samples: Sequence[PlannedSample], batch_size: int) -> list[list[PlannedSample]]:
    """Group samples into micro-batches.

    Rows ``[k * batch_size, (k + 1) * batch_size)`` form cell k; within a cell, samples that can
    share one pipeline call (equal height, width, steps, guidance scale) form one micro-batch, in
    order of first appearance. Error samples form their own micro-batch per cell.

    Args:
        samples: planned samples in (row, image) order.
        batch_size: prompts (rows) per cell, >= 1.
    Returns:
        Micro-batches in order; each is non-empty.
    """
    batches: list[list[PlannedSample]] = []
    cell = None
    groups: dict[object, list[PlannedSample]] = {}
    for s in samples:
        k = s.row_index // batch_size
        if k != cell:
            batches.extend(groups.values())
            cell, groups = k, {}
        key = "error" if s.error else s.request.batch_key
        groups.setdefault(key, []).append(s)
    batches.extend(groups.values())
    return batches


def deal(batches: Sequence[list[PlannedSample]], dp_rank: int, dp_size: int) -> list[list[PlannedSample]]:
    """Micro-batches of one dp rank: round-robin, batch j goes to rank j % dp_size."""
    return [b for j, b in enumerate(batches) if j % dp_size == dp_rank]
