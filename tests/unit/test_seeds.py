"""Sample ids and seeds."""

from __future__ import annotations

import pytest

from jobs.seeds import SEED_LIMIT, derive_seed, image_seed, sample_id


def test_sample_id_without_row_id() -> None:
    assert sample_id(None, 5, 1) == "000000005-1"
    assert sample_id(None, 123456789, 0) == "123456789-0"


def test_sample_id_with_row_id() -> None:
    assert sample_id("abc", 5, 0) == "abc-0"
    assert sample_id(42, 0, 3) == "42-3"


def test_sample_id_falsy_row_id_is_used() -> None:
    """Only None means "no id column": an id of 0 is a real id."""
    assert sample_id(0, 7, 1) == "0-1"


def test_derive_seed_deterministic_and_in_range() -> None:
    seeds = [derive_seed(j, f"{i:09d}-0") for j in (0, 1, 2**62) for i in range(200)]
    assert all(isinstance(s, int) for s in seeds)
    assert all(0 <= s < 2**63 for s in seeds)
    assert SEED_LIMIT == 2**63
    assert seeds == [derive_seed(j, f"{i:09d}-0") for j in (0, 1, 2**62) for i in range(200)]


def test_derive_seed_differs_between_sample_ids() -> None:
    ids = [sample_id(None, r, i) for r in range(100) for i in range(3)]
    seeds = {derive_seed(0, sid) for sid in ids}
    assert len(seeds) == len(ids)


def test_derive_seed_differs_between_job_seeds() -> None:
    assert derive_seed(0, "abc-0") != derive_seed(1, "abc-0")
    assert len({derive_seed(j, "000000000-0") for j in range(100)}) == 100


def test_derive_seed_uses_high_bits() -> None:
    """63-bit seeds: over many ids some exceed 2**32 (not a truncated 32-bit value)."""
    assert max(derive_seed(0, f"x-{i}") for i in range(50)) >= 2**32


@pytest.mark.parametrize(
    ("row_seed", "index", "expected"),
    [(10, 2, 12), (0, 0, 0), (100, 1, 101), (2**63 - 1, 1, 0), (2**63 - 2, 3, 1)],
)
def test_image_seed(row_seed: int, index: int, expected: int) -> None:
    assert image_seed(row_seed, index) == expected
