"""Out-of-memory backoff through the CLI: a real torch.OutOfMemoryError raised in the first
micro-batch's denoise stage (GEN_FAILPOINT=denoise@1:oom) makes it run again as two halves, and
the rest of the shard keeps the halved forward; every sample is ok, its ``forward_batch`` says 2,
and its bytes equal those of a run at --batch-size 2. Under CFG parallelism the OOM on one rank
reaches the other as the group's abort, and both halve alike."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import parti_manifest, run_gen

ENV = {"OMP_NUM_THREADS": "1"}
COMMON = ["--steps", "2", "--shard-size", "8"]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return parti_manifest(tmp_path_factory.mktemp("oom") / "m.parquet", 8)


def _run(manifest: Path, out: Path, *extra: str, env: dict | None = None) -> tuple[list[dict], list[dict]]:
    proc = run_gen("batch", str(manifest), "--out", str(out), *COMMON, *extra, env={**ENV, **(env or {})})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    samples = pq.read_table(out / "samples").drop_columns(["denoise_s"]).to_pylist()
    steps = pq.read_table(out / "steps").drop_columns(["step_s"]).to_pylist()
    return samples, steps


@pytest.mark.parametrize("layout", [["--gpus", "1"], ["--gpus", "2", "--cfg-parallel-size", "2"]],
                         ids=["1-rank", "cfg-2-oom-on-rank-1"])  # fmt: skip
def test_oom_halves_the_forward_for_the_rest_of_the_shard(manifest: Path, tmp_path: Path, layout: list[str]) -> None:
    oom = {"GEN_FAILPOINT": "denoise@1:oom", "GEN_FAILPOINT_RANK": "1" if "2" in layout else "0"}
    backed, backed_steps = _run(manifest, tmp_path / "oom", *layout, "--batch-size", "4", env=oom)
    assert [s["status"] for s in backed] == ["ok"] * 8
    assert [s["forward_batch"] for s in backed] == [2] * 8  # the first micro-batch's halves, then the cap
    small, small_steps = _run(manifest, tmp_path / "b2", *layout, "--batch-size", "2")
    assert [s["forward_batch"] for s in small] == [2] * 8
    assert backed == small and backed_steps == small_steps  # the bytes of the smaller batch
    if layout == ["--gpus", "1"]:
        full, _ = _run(manifest, tmp_path / "b4", *layout, "--batch-size", "4")
        assert [s["forward_batch"] for s in full] == [4] * 8  # without the OOM: the whole micro-batch
