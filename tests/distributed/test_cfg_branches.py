"""CFG-parallel branch execution on real gloo ranks (one process per rank, env:// rendezvous)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("cfg_rank_main.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp: Path, world: int, cfg: int, scenario: str, timeout_s: float = 60) -> tuple[list[dict], float]:
    """Run WORLD ranks of cfg_rank_main.py; their reports (by rank) and the wall seconds."""
    port = _free_port()
    procs = []
    start = time.monotonic()
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "PYTHONPATH": str(REPO)}  # fmt: skip
        procs.append(subprocess.Popen(
            [sys.executable, str(SCRIPT), str(tmp), str(cfg), scenario, str(timeout_s)],
            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        ))  # fmt: skip
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=120)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"ranks of {scenario} did not finish in 120 s (a hang)")
    wall = time.monotonic() - start
    reports = []
    for rank in range(world):
        path = tmp / f"rank-{rank}.json"
        assert path.exists(), f"rank {rank} wrote no report:\n{logs[rank]}"
        reports.append(json.loads(path.read_text()))
    return reports, wall


@pytest.mark.parametrize(("world", "cfg"), [(2, 2), (3, 3), (4, 2)])
def test_any_branch_count_on_any_group(tmp_path: Path, world: int, cfg: int) -> None:
    reports, _ = launch(tmp_path, world, cfg, "steps")
    for r in reports:
        assert r["group_size"] == cfg
        for n in (1, 2, 3, 4):
            for mode in ("separate", "batched"):
                case = r[f"n{n}-{mode}"]
                own = len(range(r["cfg_rank"], n, cfg))
                # the rank ran exactly its own branches: none at all when idle; a lone branch
                # is cut by samples when batching (2 samples: one each on ranks 0 and 1)
                if n == 1 and mode == "batched":
                    expected_batches = [1] if r["cfg_rank"] < 2 else []
                else:
                    expected_batches = [] if own == 0 else [2 * own] if mode == "batched" else [2] * own
                assert case["forward_batches"] == expected_batches, (r["rank"], n, mode)
                exact = case["one_per_forward"] and not (n == 1 and mode == "batched")
                assert case["exact"] if exact else case["close"], (r["rank"], n, mode)
        assert r["failure"] == ["ok", "cfg rank 1: ValueError: boom", "ok"]


@pytest.mark.parametrize(("world", "cfg"), [(2, 2), (3, 3)])
def test_a_hung_rank_fails_the_group_within_the_timeout(tmp_path: Path, world: int, cfg: int) -> None:
    timeout_s = 3.0
    reports, wall = launch(tmp_path, world, cfg, "hang", timeout_s)
    assert reports[1].get("hung")
    for r in (reports[0], *reports[2:]):
        assert r["error"] and "--collective-timeout 3 s" in r["error"], r
        assert r["failed_after_s"] < timeout_s + 5, r
    assert wall < 3 * timeout_s + 30


def test_a_dead_rank_fails_the_group(tmp_path: Path) -> None:
    reports, _ = launch(tmp_path, 2, 2, "die", timeout_s=60)
    assert reports[1].get("died")
    assert reports[0]["error"] and "CFG group of ranks [0, 1]" in reports[0]["error"]
    assert reports[0]["failed_after_s"] < 30  # the peer's closed connection, not the 60 s timeout
