"""ParallelDims: the rank grid world = dp x cfg, cfg innermost (picotron / torchtitan style).

A CFG group is ``cfg`` adjacent ranks (adjacent GPUs of one node); dp groups split the data.
The mapping is pure: tests use it without a process group.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, kw_only=True)
class ParallelDims:
    """Sizes of the dp and cfg axes.

    Example::

        dims = ParallelDims(dp=-1, cfg=2, world_size=8)   # dp resolves to 4
        dims.coords(rank=5)                                # -> (2, 1)
    """

    dp: int
    """Data-parallel size; -1 means world_size // cfg."""
    cfg: int = 1
    """CFG-parallel size: ranks that split one step's guidance branches; 1 = no CFG parallelism."""
    world_size: int
    """Total ranks, >= 1."""
    _dp: int = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"world size must be >= 1, got {self.world_size}")
        if self.cfg < 1:
            raise ValueError(f"cfg must be >= 1, got {self.cfg}")
        dp = self.world_size // self.cfg if self.dp == -1 else self.dp
        if dp < 1 or dp * self.cfg != self.world_size:
            raise ValueError(
                f"dp({self.dp}) * cfg({self.cfg}) != world size ({self.world_size})"
            )
        object.__setattr__(self, "_dp", dp)

    @property
    def dp_size(self) -> int:
        """Resolved data-parallel size."""
        return self._dp

    def coords(self, rank: int) -> tuple[int, int]:
        """(dp_rank, cfg_rank) of a global rank; cfg is the innermost axis.

        Raises:
            ValueError: rank outside [0, world_size).
        """
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside [0, {self.world_size})")
        return rank // self.cfg, rank % self.cfg

    def cfg_group(self, dp_rank: int) -> list[int]:
        """Global ranks of the CFG group of one dp rank, in cfg_rank order."""
        return [dp_rank * self.cfg + c for c in range(self.cfg)]
