"""Shared fixtures: real prompts as parquet, a per-session model cache, the CLI in a subprocess."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]
PARTI = REPO.parent / "shared" / "data" / "PartiPrompts.tsv"


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built-in models are built once per session into a fresh cache (inherited by subprocesses)."""
    cache = tmp_path_factory.mktemp("gen-cache")
    os.environ["GEN_CACHE_DIR"] = str(cache)
    return cache


def parti_prompts(n: int) -> list[dict[str, str]]:
    """The first n PartiPrompts rows (Prompt, Category, Challenge, Note)."""
    if not PARTI.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{PARTI} is missing")
        pytest.skip(f"{PARTI} not found (it sits beside the repo in CI)")
    with PARTI.open(newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return rows[:n]


def parti_manifest(path: Path, n: int) -> Path:
    """The first n PartiPrompts as a parquet manifest (prompt, category) at ``path``."""
    rows = parti_prompts(n)
    pq.write_table(pa.table({"prompt": [r["Prompt"] for r in rows],
                             "category": [r["Category"] for r in rows]}), path)  # fmt: skip
    return path


@pytest.fixture(scope="session")
def parti64(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64 PartiPrompts as a parquet manifest with passthrough columns, row groups of 16."""
    rows = parti_prompts(64)
    table = pa.table(
        {
            "prompt": [r["Prompt"] for r in rows],
            "category": [r["Category"] for r in rows],
            "challenge": [r["Challenge"] for r in rows],
            "note": [r["Note"] or None for r in rows],
        }
    )
    path = tmp_path_factory.mktemp("manifests") / "parti64.parquet"
    pq.write_table(table, path, row_group_size=16)
    return path


def run_gen(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run the installed `gen` console script in a subprocess."""
    exe = shutil.which("gen")
    assert exe, "the `gen` console script is not installed (pip install -e .)"
    return subprocess.run(
        [exe, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
