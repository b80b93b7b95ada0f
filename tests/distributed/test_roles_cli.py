"""``--roles split`` through the CLI (OMP_NUM_THREADS=1): encoder, denoiser and decoder ranks
under their own torchrun, each loading only its modules, give the same samples and steps parquet
(images / videos / audio byte for byte) as a monolithic ``--gpus 1`` run; a denoiser killed
mid-job resumes; ``--role R`` run one by one gives the same; stage files are removed unless
``--keep-intermediates``."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import parti_prompts, run_gen

ONE_THREAD = {"OMP_NUM_THREADS": "1"}
COMMON = ["--steps", "2", "--batch-size", "2", "--shard-size", "2"]
TIMING = {"denoise_s"}  # seconds: the only columns that may differ


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rows = parti_prompts(4)
    path = tmp_path_factory.mktemp("roles") / "m.parquet"
    pq.write_table(pa.table({"prompt": [r["Prompt"] for r in rows],
                             "negative_prompt": ["blurry", None, "text, watermark", None]}), path)  # fmt: skip
    return path


def _gen(manifest: Path, out: Path, *extra: str, env: dict | None = None, ok: bool = True):  # noqa: ANN202
    proc = run_gen("batch", str(manifest), "--out", str(out), *COMMON, *extra, env={**ONE_THREAD, **(env or {})})
    if ok:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def _tables(out: Path) -> tuple[pa.Table, pa.Table]:
    samples = pq.read_table(out / "samples").sort_by("sample_id")
    steps = pq.read_table(out / "steps").sort_by([("sample_id", "ascending"), ("step_index", "ascending")])
    return samples, steps


def assert_same(a: Path, b: Path) -> None:
    (sa, ta), (sb, tb) = _tables(a), _tables(b)
    assert sa.num_rows == sb.num_rows and set(sa.column("status").to_pylist()) == {"ok"}
    for name in sa.column_names:
        if name not in TIMING:
            assert sa.column(name).to_pylist() == sb.column(name).to_pylist(), name
    keep = [n for n in ta.column_names if n != "step_s"]
    assert ta.select(keep).equals(tb.select(keep))


@pytest.fixture(scope="module")
def mono_sd(manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mono") / "out"
    _gen(manifest, out)
    return out


def test_split_equals_monolithic_and_a_killed_denoiser_resumes(manifest: Path, mono_sd: Path, tmp_path: Path) -> None:
    out = tmp_path / "split"
    proc = _gen(manifest, out, "--roles", "split", env={"GEN_FAILPOINT": "denoiser-stage-written"}, ok=False)
    assert proc.returncode != 0
    assert "denoiser role: " in proc.stderr and "re-run the same command to resume" in proc.stderr
    assert "Traceback" not in proc.stderr
    # the encoder finished every shard; the decoder committed the one the denoiser finished
    # (and removed its stage files); shard 1 waits in its encoder stage file
    assert [p.name for p in (out / "done").glob("*.json")] == ["shard-00000.json"]
    assert [p.name for p in (out / "stages" / "encoder" / "done").glob("*.json")] == ["shard-00001.json"]
    assert not list((out / "stages" / "denoiser").glob("*.parquet"))
    proc = _gen(manifest, out, "--roles", "split")
    assert "layout: roles encoder 1 rank(s), denoiser 1 rank(s)" in proc.stdout
    assert "done: 4 ok, 0 error (2/2 shards)" in proc.stdout
    assert_same(out, mono_sd)
    assert not (out / "stages").exists()  # removed once committed
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["roles"]) == {"denoiser", "decoder"}  # the encoder had nothing left: not started
    assert all(r["peak_rss_bytes"] > 0 for r in summary["roles"].values())
    status = run_gen("status", str(out)).stdout
    assert "roles: encoder 2/2, denoiser 2/2, decoder 2/2 shards" in status


def test_roles_run_one_at_a_time(manifest: Path, mono_sd: Path, tmp_path: Path) -> None:
    out = tmp_path / "by-role"
    _gen(manifest, out, "--role", "encoder")
    assert not (out / "done").exists() and len(list((out / "stages" / "encoder").glob("*.parquet"))) == 2
    proc = _gen(manifest, out, "--role", "decoder")  # nothing to decode yet: skipped, not failed
    assert "done: 0 ok" in proc.stdout
    _gen(manifest, out, "--role", "denoiser")
    _gen(manifest, out, "--role", "decoder", "--keep-intermediates")
    assert_same(out, mono_sd)
    assert len(list((out / "stages" / "denoiser").glob("*.parquet"))) == 2  # kept


@pytest.mark.parametrize("model", ["tiny-sdxl", "tiny-flux", "tiny-wan22", "tiny-ltx2"])
def test_split_equals_monolithic_per_family(model: str, manifest: Path, tmp_path: Path) -> None:
    frames = {"tiny-wan22": ["--num-frames", "5"], "tiny-ltx2": ["--num-frames", "9"]}
    extra = ["--model", model, *frames.get(model, [])]
    _gen(manifest, tmp_path / "mono", *extra)
    _gen(manifest, tmp_path / "split", *extra, "--roles", "split")
    assert_same(tmp_path / "split", tmp_path / "mono")


def test_ctrl_c_of_a_split_job_stops_every_role_then_resumes(manifest: Path, mono_sd: Path, tmp_path: Path) -> None:
    """SIGINT to the process group of a ``--roles split`` run (three torchruns): the denoiser,
    paused after its first shard's stage file, stops at its next boundary; the decoder commits
    shard 0 and stops waiting; one ``interrupted:`` line, exit 130, no traceback; the re-run
    resumes (the encoder has nothing left) and equals the monolithic run."""
    import os
    import signal
    import subprocess
    import time

    out = tmp_path / "split"
    exe = subprocess.run(["which", "gen"], capture_output=True, text=True).stdout.strip()
    env = {**os.environ, **ONE_THREAD, "GEN_FAILPOINT": "denoiser-stage-written@1:sleep4"}
    gen = subprocess.Popen([exe, "batch", str(manifest), "--out", str(out), *COMMON, "--roles", "split"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                           env=env)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not (out / "done" / "shard-00000.json").exists():
            assert gen.poll() is None and time.monotonic() < deadline, gen.communicate()[1][-3000:]
            time.sleep(0.05)
        os.killpg(gen.pid, signal.SIGINT)
        stdout, stderr = gen.communicate(timeout=120)
    finally:
        gen.kill()
    assert gen.returncode == 130, stdout[-2000:] + stderr[-3000:]
    assert "Traceback" not in stdout + stderr and "SignalException" not in stderr, stderr[-3000:]
    lines = [line for line in (stdout + stderr).splitlines() if line.startswith("interrupted:")]
    assert lines == ["interrupted: 1/2 shards done, 0 samples flushed in 0 unfinished shards; "
                     "re-run the same command to resume"], stdout[-2000:] + stderr[-3000:]  # fmt: skip
    assert not (out / "stages" / "denoiser" / "done" / "shard-00001.json").exists()
    proc = _gen(manifest, out, "--roles", "split")
    assert "done: 4 ok, 0 error (2/2 shards)" in proc.stdout
    assert_same(out, mono_sd)
