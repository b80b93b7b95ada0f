"""Shards, micro-batches and dealing them to dp ranks."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pytest

from jobs.plan import Shard, deal, micro_batches, plan_shards
from jobs.rows import GenerationDefaults, PlannedSample, plan_rows

DEFAULTS = GenerationDefaults(
    height=64, width=64, num_inference_steps=4, guidance_scale=5.0,
    images_per_prompt=1, seed=0, size_multiple=8,
)  # fmt: skip


def _plan(columns: dict[str, list[Any]], first_row: int = 0) -> list[PlannedSample]:
    return plan_rows(pa.table(columns), first_row, DEFAULTS)


def _ids(batches: list[list[PlannedSample]]) -> list[list[tuple[int, int]]]:
    return [[(s.row_index, s.image_index) for s in b] for b in batches]


# -- shards ----------------------------------------------------------------------------------


def test_plan_shards() -> None:
    shards = plan_shards(10, 4)
    assert [(s.index, s.start, s.stop) for s in shards] == [(0, 0, 4), (1, 4, 8), (2, 8, 10)]
    assert [s.name for s in shards] == ["shard-00000", "shard-00001", "shard-00002"]


def test_plan_shards_exact_and_single() -> None:
    assert plan_shards(8, 4) == [Shard(0, 0, 4), Shard(1, 4, 8)]
    assert plan_shards(3, 1000) == [Shard(0, 0, 3)]
    assert plan_shards(0, 4) == []


def test_shard_name_padding() -> None:
    assert Shard(42, 0, 1).name == "shard-00042"
    assert Shard(123456, 0, 1).name == "shard-123456"


@pytest.mark.parametrize(("num_rows", "shard_size"), [(-1, 4), (10, 0), (10, -3)])
def test_plan_shards_bad_args(num_rows: int, shard_size: int) -> None:
    with pytest.raises(ValueError):
        plan_shards(num_rows, shard_size)


# -- micro-batches ---------------------------------------------------------------------------


def test_cells_counted_from_manifest_row_zero() -> None:
    samples = _plan({"prompt": [f"p{i}" for i in range(7)]}, first_row=3)  # rows 3..9
    assert _ids(micro_batches(samples, 4)) == [
        [(3, 0)],
        [(4, 0), (5, 0), (6, 0), (7, 0)],
        [(8, 0), (9, 0)],
    ]


def test_same_batches_from_one_or_two_shards() -> None:
    heights = [64, 128, 64, 64, 128, 128, 64, 64]
    table = {"prompt": [f"p{i}" for i in range(8)], "height": heights}
    for batch_size in (4, 2):
        one = micro_batches(_plan(table), batch_size)
        first = {k: v[:4] for k, v in table.items()}
        second = {k: v[4:] for k, v in table.items()}
        two = micro_batches(_plan(first), batch_size) + micro_batches(_plan(second, 4), batch_size)
        assert one == two
    assert _ids(micro_batches(_plan(table), 4)) == [
        [(0, 0), (2, 0), (3, 0)],
        [(1, 0)],
        [(4, 0), (5, 0)],
        [(6, 0), (7, 0)],
    ]


def test_split_by_settings_in_first_appearance_order() -> None:
    samples = _plan(
        {
            "prompt": list("abcd"),
            "height": [128, 64, 128, 64],
            "guidance_scale": [None, None, None, 1.0],
        }
    )
    batches = micro_batches(samples, 4)
    assert _ids(batches) == [[(0, 0), (2, 0)], [(1, 0)], [(3, 0)]]
    for b in batches:
        assert len({s.request.batch_key for s in b}) == 1


def test_error_samples_in_their_own_batch() -> None:
    samples = _plan(
        {"prompt": ["a", None, "c", "  ", "e", "f"], "height": [64, 64, 64, 64, 64, 65]}
    )
    batches = micro_batches(samples, 4)
    assert _ids(batches) == [[(0, 0), (2, 0)], [(1, 0), (3, 0)], [(4, 0)], [(5, 0)]]
    assert [all(s.error for s in b) for b in batches] == [False, True, False, True]


def test_images_of_a_row_stay_together() -> None:
    samples = _plan({"prompt": list("abc"), "num_images": [2, 3, 1], "height": [64, 128, 64]})
    batches = micro_batches(samples, 4)
    assert _ids(batches) == [[(0, 0), (0, 1), (2, 0)], [(1, 0), (1, 1), (1, 2)]]


def test_micro_batches_cover_all_samples_once() -> None:
    samples = _plan(
        {
            "prompt": [f"p{i}" if i % 5 else None for i in range(11)],
            "height": [64 if i % 3 else 128 for i in range(11)],
            "num_images": [1 + i % 3 for i in range(11)],
        }
    )
    batches = micro_batches(samples, 3)
    flat = [s for b in batches for s in b]
    assert sorted(flat, key=lambda s: (s.row_index, s.image_index)) == samples
    assert all(b for b in batches)
    for b in batches:
        assert len({s.row_index // 3 for s in b}) == 1


# -- deal ------------------------------------------------------------------------------------


def test_deal_round_robin() -> None:
    samples = _plan({"prompt": [f"p{i}" for i in range(5)]})
    batches = micro_batches(samples, 1)
    assert len(batches) == 5
    assert _ids(deal(batches, 0, 2)) == [[(0, 0)], [(2, 0)], [(4, 0)]]
    assert _ids(deal(batches, 1, 2)) == [[(1, 0)], [(3, 0)]]
    assert deal(batches, 0, 1) == batches
    assert deal(batches, 5, 6) == []


@pytest.mark.parametrize("dp_size", [1, 2, 3, 4, 7])
def test_deal_partitions(dp_size: int) -> None:
    samples = _plan({"prompt": [f"p{i}" for i in range(13)], "height": [64, 128] * 6 + [64]})
    batches = micro_batches(samples, 2)
    shares = [deal(batches, r, dp_size) for r in range(dp_size)]
    ids = [id(b) for share in shares for b in share]
    assert len(ids) == len(set(ids)) == len(batches)
    assert set(ids) == {id(b) for b in batches}
