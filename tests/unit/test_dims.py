"""ParallelDims: the dp x cfg rank grid."""

from __future__ import annotations

import pytest

from parallel.dims import ParallelDims, auto_cfg_size


def test_dp_resolved_from_world_size() -> None:
    dims = ParallelDims(dp=-1, cfg=2, world_size=8)
    assert dims.dp_size == 4
    assert dims.coords(5) == (2, 1)
    assert dims.cfg_group(1) == [2, 3]


def test_explicit_dp() -> None:
    dims = ParallelDims(dp=4, cfg=2, world_size=8)
    assert dims.dp_size == 4
    assert dims.coords(0) == (0, 0)
    assert dims.coords(7) == (3, 1)


def test_cfg_default_is_one() -> None:
    dims = ParallelDims(dp=-1, world_size=3)
    assert dims.dp_size == 3
    assert [dims.coords(r) for r in range(3)] == [(0, 0), (1, 0), (2, 0)]
    assert dims.cfg_group(2) == [2]


def test_mismatch_message() -> None:
    with pytest.raises(ValueError) as info:
        ParallelDims(dp=3, cfg=2, world_size=8)
    assert str(info.value) == "dp * cfg must equal 8 (the world size), but dp 3 * cfg 2 = 6"


def test_indivisible_world_message() -> None:
    with pytest.raises(ValueError) as info:
        ParallelDims(dp=-1, cfg=2, world_size=3)
    assert str(info.value) == "dp * cfg must equal 3 (the world size), but cfg 2 does not divide 3"


@pytest.mark.parametrize(
    ("world_size", "micro_batches", "branches", "expected"),
    [(1, 1, 2, 1), (2, 64, 2, 1), (2, 2, 2, 1), (2, 1, 2, 2), (2, 1, 1, 1), (3, 1, 2, 1),
     (4, 3, 2, 2), (4, 2, 2, 2), (4, 1, 2, 2), (4, 1, 4, 4), (4, 2, 4, 2), (8, 1, 4, 4), (6, 2, 4, 3),
     (8, 8, 4, 1), (4, 0, 2, 2)],
)  # fmt: skip
def test_auto_cfg_size(world_size: int, micro_batches: int, branches: int, expected: int) -> None:
    """Data parallel while every dp group gets a micro-batch; else the smallest CFG group that
    feeds every dp group (at most ``branches``, a divisor of the world)."""
    k, reason = auto_cfg_size(world_size, micro_batches=micro_batches, branches=branches)
    assert k == expected and reason.startswith("auto: ")
    assert world_size % k == 0 and k <= max(branches, 1)


def test_describe() -> None:
    assert ParallelDims(dp=-1, cfg=2, world_size=4).describe() == (
        "4 rank(s) = dp 2 x cfg 2; CFG groups [0, 1] [2, 3]"
    )
    assert ParallelDims(dp=-1, world_size=2).describe() == "2 rank(s) = dp 2 x cfg 1 (no CFG parallelism)"


@pytest.mark.parametrize(
    ("dp", "cfg", "world_size"), [(-1, 3, 8), (-1, 2, 1), (0, 1, 1), (-1, 0, 4), (-1, 1, 0)]
)
def test_invalid_grids(dp: int, cfg: int, world_size: int) -> None:
    with pytest.raises(ValueError):
        ParallelDims(dp=dp, cfg=cfg, world_size=world_size)


@pytest.mark.parametrize("rank", [-1, 8, 100])
def test_rank_out_of_range(rank: int) -> None:
    with pytest.raises(ValueError) as info:
        ParallelDims(dp=-1, cfg=2, world_size=8).coords(rank)
    assert str(rank) in str(info.value)


@pytest.mark.parametrize(("cfg", "world_size"), [(1, 4), (2, 8), (4, 8), (3, 6)])
def test_groups_partition_the_world(cfg: int, world_size: int) -> None:
    dims = ParallelDims(dp=-1, cfg=cfg, world_size=world_size)
    seen: list[int] = []
    for dp_rank in range(dims.dp_size):
        group = dims.cfg_group(dp_rank)
        assert len(group) == cfg
        assert group == list(range(group[0], group[0] + cfg))  # adjacent ranks
        for cfg_rank, rank in enumerate(group):
            assert dims.coords(rank) == (dp_rank, cfg_rank)
        seen += group
    assert sorted(seen) == list(range(world_size))
