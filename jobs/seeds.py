"""Sample ids and seeds: stable whatever the sharding, the ranks or the tasks."""

from __future__ import annotations

import hashlib

SEED_LIMIT = 2**63
"""Seeds are in [0, 2**63)."""


def sample_id(row_id: object | None, row_index: int, image_index: int) -> str:
    """Stable id of one image: ``<id>-<image_index>``, or ``<row_index:09d>-<image_index>``.

    Args:
        row_id: the manifest's ``id`` value (unique), or None when there is no id column.
        row_index: 0-based row in the manifest.
        image_index: 0-based image of the row.
    """
    base = f"{row_index:09d}" if row_id is None else str(row_id)
    return f"{base}-{image_index}"


def derive_seed(job_seed: int, sid: str) -> int:
    """Seed of a sample without a manifest seed: sha256(job seed, sample id) as 63 bits.

    Independent of where the sample runs; different for every sample id.
    """
    digest = hashlib.sha256(f"{job_seed}:{sid}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % SEED_LIMIT


def image_seed(row_seed: int, image_index: int) -> int:
    """Seed of image ``image_index`` of a row with a manifest seed: row seed + image index."""
    return (row_seed + image_index) % SEED_LIMIT
