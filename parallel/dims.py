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
        if self.dp == -1:
            if self.world_size % self.cfg:
                raise ValueError(
                    f"dp * cfg must equal {self.world_size} (the world size), but cfg "
                    f"{self.cfg} does not divide {self.world_size}"
                )
            dp = self.world_size // self.cfg
        else:
            dp = self.dp
            if dp < 1 or dp * self.cfg != self.world_size:
                raise ValueError(
                    f"dp * cfg must equal {self.world_size} (the world size), but dp {dp} * "
                    f"cfg {self.cfg} = {dp * self.cfg}"
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

    def describe(self) -> str:
        """One line for logs: ``4 ranks = dp 2 x cfg 2; CFG groups [0, 1] [2, 3]``."""
        head = f"{self.world_size} rank(s) = dp {self.dp_size} x cfg {self.cfg}"
        if self.cfg == 1:
            return head + " (no CFG parallelism)"
        groups = " ".join(str(self.cfg_group(d)) for d in range(self.dp_size))
        return f"{head}; CFG groups {groups}"


def default_cfg_size(world_size: int, *, guidance: bool) -> int:
    """Default CFG-parallel size: 2 when the world is even and the job uses guidance, else 1.

    Two branches (cond, uncond) fill a group of 2; a job without guidance has one branch.
    """
    return 2 if guidance and world_size % 2 == 0 else 1
