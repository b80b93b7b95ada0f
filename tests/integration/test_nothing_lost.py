"""Nothing lost, through the installed CLI: kill -9 at several points then a re-run, one writer
per shard, --retry-errors, --fail-on-error, non-finite and truncated rows.

Every run uses tiny-sd, 2 steps, OMP_NUM_THREADS=1 (same kernels in every run, see README), and
12 PartiPrompts in 3 shards of 4 rows, micro-batches of 2 rows: 6 parts, 3 commits.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from tests.conftest import parti_manifest, run_gen

ENV = {"OMP_NUM_THREADS": "1"}
ARGS = ["--steps", "2", "--shard-size", "4", "--batch-size", "2"]
TIMING = {"denoise_s", "step_s"}


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return parti_manifest(tmp_path_factory.mktemp("lost") / "m.parquet", 12)


@pytest.fixture(scope="module")
def clean(manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run: what every interrupted-and-resumed run must equal."""
    out = tmp_path_factory.mktemp("clean") / "o"
    proc = run_gen("batch", str(manifest), "--out", str(out), *ARGS, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _rows(out: Path, kind: str) -> list[dict]:
    """Rows of samples/ or steps/, timings left out, in file order."""
    table = pq.read_table(out / kind)
    return table.drop_columns([c for c in table.column_names if c in TIMING]).to_pylist()


def _assert_same_as_clean(out: Path, clean: Path) -> None:
    samples = _rows(out, "samples")
    ids = [s["sample_id"] for s in samples]
    assert len(ids) == len(set(ids)) == 12, "each sample exactly once"
    assert samples == _rows(clean, "samples"), "same rows and image bytes as an uninterrupted run"
    assert _rows(out, "steps") == _rows(clean, "steps")
    assert len(list((out / "done").glob("shard-*.json"))) == 3
    assert not list((out / ".gen" / "shards").glob("*/part-*")), "parts left behind"


def _digest(out: Path, shard: str) -> dict[str, tuple[str, int]]:
    """sha256 and mtime of a done shard's three files."""
    files = [out / "samples" / f"{shard}.parquet", out / "steps" / f"{shard}.parquet",
             out / "done" / f"{shard}.json"]  # fmt: skip
    return {f.name + f.parent.name: (hashlib.sha256(f.read_bytes()).hexdigest(), f.stat().st_mtime_ns)
            for f in files}  # fmt: skip


@pytest.mark.parametrize(
    ("failpoint", "done_before"),
    [
        ("loaded", 0),  # model loaded, nothing generated
        ("part@3", 1),  # shard 0 committed, shard 1 half flushed
        ("commit-samples@2", 1),  # shard 1's samples file written, no done marker
        ("commit-done@1", 1),  # shard 0's done marker written, its parts not yet removed
        ("rank-finished@2", 1),  # shard 1 fully flushed, not committed
    ],
)
def test_kill_9_then_rerun_loses_and_duplicates_nothing(
    manifest: Path, clean: Path, tmp_path: Path, failpoint: str, done_before: int
) -> None:
    out = tmp_path / "o"
    killed = run_gen("batch", str(manifest), "--out", str(out), *ARGS,
                     env={**ENV, "GEN_FAILPOINT": failpoint})  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    done = sorted(p.stem for p in (out / "done").glob("shard-*.json"))
    assert len(done) == done_before
    before = {name: _digest(out, name) for name in done}
    # The killed run's lock files remain, their flock gone with the process.
    assert list((out / ".gen" / "locks").glob("shard-*.lock"))

    proc = run_gen("batch", str(manifest), "--out", str(out), *ARGS, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "took over the stale lock of run" in proc.stdout
    assert "12 ok, 0 error" in proc.stdout
    assert {name: _digest(out, name) for name in done} == before, "finished shards untouched"
    _assert_same_as_clean(out, clean)
    if failpoint.startswith("part"):  # samples flushed before the kill were not generated again
        assert json.loads((out / "summary.json").read_text())["run_samples_skipped"] > 0
    assert not list((out / ".gen" / "locks").glob("*.lock")), "the re-run released its locks"


def _processes_of(out: Path) -> list[int]:
    """Pids whose command line names ``out`` (the launcher, torchrun and its ranks)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(out).encode() in cmdline.read_bytes():
                pids.append(int(cmdline.parent.name))
        except OSError:
            continue
    return pids


def _start(manifest: Path, out: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    exe = subprocess.run(["which", "gen"], capture_output=True, text=True).stdout.strip()
    return subprocess.Popen([exe, "batch", str(manifest), "--out", str(out), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **ENV, **(env or {})})  # fmt: skip


def _wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 120) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, (what, proc.communicate())
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_kill_9_of_the_launcher_takes_its_ranks_down(manifest: Path, clean: Path, tmp_path: Path) -> None:
    """`gen` killed with SIGKILL mid-run (2 torchrun ranks): the kernel kills torchrun and the
    ranks (no orphan keeps writing), and a re-run resumes."""
    out = tmp_path / "o"
    gen = _start(manifest, out, *ARGS, "--gpus", "2", "--cfg-parallel-size", "1")
    _wait_for(lambda: list((out / ".gen" / "shards").glob("*/part-*.samples.parquet")), gen,
              "a flushed part")  # fmt: skip
    gen.send_signal(signal.SIGKILL)
    gen.wait()
    deadline = time.monotonic() + 30
    while _processes_of(out) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _processes_of(out) == [], "ranks outlived their launcher"
    proc = run_gen("batch", str(manifest), "--out", str(out), *ARGS, "--gpus", "2",
                   "--cfg-parallel-size", "1", env=ENV)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same_as_clean(out, clean)


def test_second_run_on_the_same_out_is_refused_while_the_first_writes(manifest: Path, clean: Path,
                                                                      tmp_path: Path) -> None:  # fmt: skip
    out = tmp_path / "o"
    first = _start(manifest, out, *ARGS)
    _wait_for(lambda: list((out / ".gen" / "locks").glob("*.lock")), first, "the first run's locks")
    first.send_signal(signal.SIGSTOP)  # holding its locks, writing nothing
    try:
        second = run_gen("batch", str(manifest), "--out", str(out), *ARGS, env=ENV)
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 2, second.stdout + second.stderr
    assert "are being written by another run" in second.stderr
    assert f"pid {first.pid} on" in second.stderr
    assert "Traceback" not in second.stderr
    _, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr[-3000:]
    _assert_same_as_clean(out, clean)


def test_overwrite_is_refused_while_a_run_writes(manifest: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    first = _start(manifest, out, *ARGS)
    _wait_for(lambda: list((out / ".gen" / "locks").glob("*.lock")), first, "the first run's locks")
    first.send_signal(signal.SIGSTOP)
    try:
        other = run_gen("batch", str(manifest), "--out", str(out), "--steps", "3", "--overwrite", env=ENV)
    finally:
        first.send_signal(signal.SIGCONT)
    assert other.returncode == 2 and "being written by another run" in other.stderr, other.stderr
    first.communicate(timeout=120)
    assert first.returncode == 0


def test_retry_errors_regenerates_only_error_rows(manifest: Path, clean: Path, tmp_path: Path) -> None:
    """A transient failure (an OOM, say) left rows 1 and 6 as error rows; --retry-errors makes
    exactly those again, with the bytes they would have had, and keeps every other row."""
    out = tmp_path / "o"
    proc = run_gen("batch", str(manifest), "--out", str(out), *ARGS, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for shard, row in (("shard-00000", 1), ("shard-00001", 6)):  # what a failed sample leaves
        path = out / "samples" / f"{shard}.parquet"
        table = pq.read_table(path)
        hit = pc.equal(table.column("row_index"), row)
        table = table.set_column(table.schema.get_field_index("status"), "status",
                                 pc.if_else(hit, "error", table.column("status")))  # fmt: skip
        table = table.set_column(table.schema.get_field_index("error"), "error",
                                 pc.if_else(hit, "RuntimeError: CUDA out of memory", table.column("error")))  # fmt: skip
        image = table.schema.get_field_index("image")
        table = table.set_column(image, table.schema.field(image),
                                 pc.if_else(hit, pa.scalar(None, table.schema.field(image).type),
                                            table.column("image")))  # fmt: skip
        pq.write_table(table, path)
        steps = pq.read_table(out / "steps" / f"{shard}.parquet")
        sid = f"{row:09d}-0"
        pq.write_table(steps.filter(pc.not_equal(steps.column("sample_id"), sid)),
                       out / "steps" / f"{shard}.parquet")  # fmt: skip
        marker = json.loads((out / "done" / f"{shard}.json").read_text())
        marker.update(samples_ok=marker["samples_ok"] - 1, samples_error=1)
        (out / "done" / f"{shard}.json").write_text(json.dumps(marker))
    untouched = _digest(out, "shard-00002")

    failing = run_gen("batch", str(manifest), "--out", str(out), *ARGS, "--fail-on-error", env=ENV)
    assert failing.returncode == 1, failing.stdout + failing.stderr
    assert "errors: 2 error row(s)" in failing.stdout
    assert "row 1 (000000001-0): RuntimeError: CUDA out of memory" in failing.stdout
    assert "2 error row(s) (--fail-on-error)" in failing.stderr

    proc = run_gen("batch", str(manifest), "--out", str(out), *ARGS, "--retry-errors", env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "retry-errors: 2 error sample(s) in 2 shard(s) will be generated again" in proc.stdout
    assert "12 ok, 0 error" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["run_samples_ok"] == 2, "only the error rows were written again"
    assert _digest(out, "shard-00002") == untouched
    _assert_same_as_clean(out, clean)


def test_row_errors_fail_on_error_nonfinite_truncation_unicode(tmp_path: Path) -> None:
    prompts = ["a cat", None, "ünïcödé 猫 🐱 שלום ❤️\u200d🔥 e\u0301", "a red cube " * 40, "a dog",
               "a cow"]  # fmt: skip
    guidance = [None, None, None, None, 1e300, None]  # row 4: predictions overflow to inf
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"prompt": prompts, "guidance_scale": pa.array(guidance, pa.float64())}),
                   manifest)  # fmt: skip
    proc = run_gen("batch", str(manifest), "--out", str(tmp_path / "o"), "--steps", "2", env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = pq.read_table(tmp_path / "o" / "samples").to_pylist()
    assert [r["status"] for r in rows] == ["ok", "error", "ok", "ok", "error", "ok"]
    assert rows[1]["error"] == "prompt is null"
    assert rows[4]["error"].startswith("non-finite"), rows[4]["error"]
    assert rows[4]["image"] is None
    assert rows[2]["prompt"] == prompts[2] and rows[2]["warning"] is None
    assert rows[3]["warning"].startswith("prompt truncated to 77 CLIP tokens")
    assert "done: 4 ok, 2 error" in proc.stdout
    assert "warnings: 1 sample(s) carry a warning" in proc.stdout
    assert "errors: 2 error row(s)" in proc.stdout
    again = run_gen("batch", str(manifest), "--out", str(tmp_path / "o"), "--steps", "2",
                    "--fail-on-error", env=ENV)  # fmt: skip
    assert again.returncode == 1 and "2 error row(s) (--fail-on-error)" in again.stderr
    assert "Traceback" not in again.stderr


# -- stops and faults: one line, the right exit status, and a re-run that resumes (issue 17) --------

NOISE = ("Traceback", "SignalException", "death signal", "torch.distributed", "gen: rank")


@pytest.fixture(scope="module")
def clean_cfg2(manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted --gpus 2 --cfg-parallel-size 2 run (CFG-parallel bytes, which differ from
    the batched serial run's by a rounding in a few pixels)."""
    out = tmp_path_factory.mktemp("clean2") / "o"
    proc = run_gen("batch", str(manifest), "--out", str(out), *ARGS, "--gpus", "2", "--cfg-parallel-size", "2",
                   env=ENV)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _one_line(proc_output: str, prefix: str) -> str:
    """The only line of the output that starts with ``prefix`` (tqdm's \\r-separated frames
    count as lines)."""
    lines = [line for line in proc_output.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, proc_output[-3000:]
    return lines[0]


@pytest.mark.parametrize(
    ("signame", "gpus", "times"),
    [("SIGINT", "2", 1), ("SIGTERM", "1", 1), ("SIGINT", "1", 2)],
    ids=["ctrl-c-2-ranks", "sigterm-1-rank", "ctrl-c-twice-1-rank"],
)  # ranks under torchrun take SIGINT and SIGTERM alike (the launcher's stop file): 3 cases cover both
def test_stop_on_a_signal_then_rerun(manifest: Path, clean: Path, clean_cfg2: Path, tmp_path: Path,
                                     signame: str, gpus: str, times: int) -> None:  # fmt: skip
    """A signal to `gen`'s process group (what Ctrl-C does) mid-run: the ranks stop at the next
    micro-batch boundary, or at once on a second Ctrl-C; one line, exit 128 + the signal, no
    traceback; the re-run resumes and its output equals an uninterrupted run's byte for byte.
    The failpoint only pauses the rank at its second micro-batch (the first one's part is
    written meanwhile, on the writer thread), so the signal lands mid-run: 2 s, or 20 s where a
    second Ctrl-C must stop well before that boundary."""
    sig = getattr(signal, signame)
    pause = 20 if times == 2 else 2
    out = tmp_path / "o"
    exe = subprocess.run(["which", "gen"], capture_output=True, text=True).stdout.strip()
    layout = ["--gpus", gpus, "--cfg-parallel-size", gpus]  # 2 ranks: one CFG group, which must agree
    gen = subprocess.Popen([exe, "batch", str(manifest), "--out", str(out), *ARGS, *layout],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                           env={**os.environ, **ENV, "GEN_FAILPOINT": f"micro-batch@2:sleep{pause}"})  # fmt: skip
    try:
        _wait_for(lambda: list((out / ".gen" / "shards").glob("*/part-*.samples.parquet")), gen,
                  "a flushed part")  # fmt: skip
        for _ in range(times):
            os.killpg(gen.pid, sig)
            time.sleep(0.1)
        signalled = time.monotonic()
        stdout, stderr = gen.communicate(timeout=120)
    finally:
        gen.kill()
    assert gen.returncode == 128 + sig, stdout[-2000:] + stderr[-3000:]
    if times == 2:  # at once: well before the paused rank's next boundary, 20 s away
        assert time.monotonic() - signalled < pause / 2, "a second Ctrl-C stops at once"
    for noise in NOISE:
        assert noise not in stderr + stdout, stderr[-3000:]
    line = _one_line(stdout + stderr, "interrupted:")
    assert line.endswith("; re-run the same command to resume"), line
    assert line.startswith("interrupted: 0/3 shards done, 2 samples flushed in 1 unfinished shard"), line
    assert "done:" not in stdout
    assert not list((out / "done").glob("*.json"))
    deadline = time.monotonic() + 30
    while _processes_of(out) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _processes_of(out) == [], "ranks outlived the stop"

    proc = run_gen("batch", str(manifest), "--out", str(out), *ARGS, *layout, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "12 ok, 0 error" in proc.stdout
    assert json.loads((out / "summary.json").read_text())["run_samples_skipped"] == 2
    _assert_same_as_clean(out, clean_cfg2 if gpus == "2" else clean)


def _mount_tmpfs(path: Path, *options: str) -> bool:
    """Mount a tmpfs at ``path`` (root only; False where that is not allowed)."""
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(path)],
                          capture_output=True)  # fmt: skip
    return proc.returncode == 0


def test_full_disk_one_line_exit_2_then_resume(manifest: Path, clean: Path, tmp_path: Path) -> None:
    """OUT on a 200 KB tmpfs fills up mid-run (where mounting is not allowed: the failpoint that
    raises the same OSError(ENOSPC) inside the parquet writer): one line naming the file, exit 2;
    with space again, the same command resumes and equals the uninterrupted run."""
    disk = tmp_path / "disk"
    mounted = os.geteuid() == 0 and _mount_tmpfs(disk, "size=200k")
    env = ENV if mounted else {**ENV, "GEN_FAILPOINT": "write-parquet@5:enospc"}
    out = disk / "o"
    try:
        full = run_gen("batch", str(manifest), "--out", str(out), *ARGS, env=env)
        assert full.returncode == 2, full.stdout[-2000:] + full.stderr[-3000:]
        line = _one_line(full.stderr, "Error: no space left on device: cannot write ")
        path = Path(line.split("cannot write ")[1].split(";")[0])
        assert out in path.parents, line
        assert line.endswith("then re-run the same command to resume (finished shards and flushed samples are kept)")
        assert "Traceback" not in full.stderr
        assert not list(out.rglob("*.tmp")), "a half-written file was left"
        assert len(list((out / "done").glob("*.json"))) < 3
        if mounted:  # free space
            subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)
        proc = run_gen("batch", str(manifest), "--out", str(out), *ARGS, env=ENV)
        assert proc.returncode == 0, proc.stderr[-3000:]
        _assert_same_as_clean(out, clean)
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)], check=False)


def test_unwritable_out_one_line_exit_2(manifest: Path, tmp_path: Path) -> None:
    """An --out on a read-only file system (root: a read-only tmpfs; others: a directory without
    write permission): one line naming it, exit 2, no traceback."""
    ro = tmp_path / "ro"
    if os.geteuid() == 0:
        if not _mount_tmpfs(ro, "ro", "size=64k"):
            pytest.skip("root here cannot mount a read-only tmpfs, and permissions do not stop root")
    else:
        ro.mkdir()
        ro.chmod(0o555)
    try:
        proc = run_gen("batch", str(manifest), "--out", str(ro / "o"), *ARGS, env=ENV)
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(ro)], check=False)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    line = _one_line(proc.stderr, f"Error: --out {ro / 'o'} is not writable (")
    assert line.endswith("make it writable and re-run the same command, or use another --out"), line
    assert "Traceback" not in proc.stderr


def test_manifest_gone_mid_run_then_resume_dictionary_columns(manifest: Path, clean: Path, tmp_path: Path) -> None:
    """A manifest whose columns are dictionary-encoded (pandas' category dtype) generates the same
    images as the plain one; removed mid-run, the run ends with one line naming it (exit 2), and
    once it is back the same command resumes. ``prompt`` comes out as a string, the passthrough
    ``category`` keeps its dictionary type."""
    table = pq.read_table(manifest)
    encoded = tmp_path / "m.parquet"
    pq.write_table(pa.table({name: pc.dictionary_encode(table.column(name)) for name in table.column_names}), encoded)
    out = tmp_path / "o"
    gen = _start(encoded, out, *ARGS, env={"GEN_FAILPOINT": "micro-batch@2:sleep2"})
    _wait_for(lambda: list((out / ".gen" / "shards").glob("*/part-*.samples.parquet")), gen, "a flushed part")
    encoded.rename(tmp_path / "away.parquet")
    _, stderr = gen.communicate(timeout=120)
    assert gen.returncode == 2, stderr[-3000:]
    line = _one_line(stderr, f"Error: manifest {encoded}: disappeared during the run; put the same file back, ")
    assert "Traceback" not in stderr, line
    (tmp_path / "away.parquet").rename(encoded)
    proc = run_gen("batch", str(encoded), "--out", str(out), *ARGS, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same_as_clean(out, clean)
    schema = pq.read_schema(out / "samples" / "shard-00000.parquet")
    assert schema.field("prompt").type == pa.string()
    assert pa.types.is_dictionary(schema.field("category").type)
