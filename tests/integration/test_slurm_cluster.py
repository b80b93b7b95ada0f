"""`gen batch --slurm` on a real one-node SLURM cluster (slurm/cluster.sh up --gpus 4 --cpus 4).

CI starts the cluster and sets GEN_REQUIRE_SLURM=1: there these tests fail, not skip, when no
cluster answers. Each test compares its output with a local run of the same job, byte for byte.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO, parti_manifest, run_gen

ENV = {"OMP_NUM_THREADS": "1"}  # same threads per rank locally and in tasks: same bytes


@pytest.fixture(scope="module", autouse=True)
def slurm_cluster() -> None:
    """A cluster that answers sinfo with a usable node; fail in CI (GEN_REQUIRE_SLURM=1), else skip."""
    problem = None
    if shutil.which("sinfo") is None:
        problem = "sinfo not found"
    else:
        proc = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
        states = proc.stdout.split()
        if proc.returncode != 0 or not any(s.rstrip("*") in ("idle", "mixed", "allocated") for s in states):
            problem = f"no usable SLURM node: {proc.stdout.strip() or proc.stderr.strip()}"
    if problem:
        message = f"{problem}; start one with `{REPO}/slurm/cluster.sh up --gpus 4 --cpus 4`"
        if os.environ.get("GEN_REQUIRE_SLURM"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def m12(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return parti_manifest(tmp_path_factory.mktemp("slurm") / "m.parquet", 12)


def gen_ok(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    proc = run_gen(*args, env=ENV, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def status(out: Path, env: dict[str, str] | None = None) -> dict:
    proc = run_gen("status", str(out), "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.25) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def queue_state(job_id: str) -> str:
    proc = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True)
    return proc.stdout.strip()


def wait_requeued(job_id: str) -> None:
    """Wait until the requeued job is PENDING again. It then waits out its credential
    (cred_expire + 1 = 11 s on the test cluster). Forcing ``StartTime=now`` races slurmd's
    credential revocation: the relaunch can be killed at once ("Killing non-startable batch
    JobId=N: Job credential revoked") and the job leaves the queue for good."""
    wait_for(lambda: queue_state(job_id) == "PENDING", 60, f"{job_id} to be PENDING again")


def flushed_parts(out: Path) -> int:
    return len(list(out.glob(".gen/shards/*/part-*.samples.parquet")))


def samples(out: Path) -> pa.Table:
    return pq.read_table(out / "samples").sort_by([("row_index", "ascending"), ("image_index", "ascending")])


def assert_same_output(a: Path, b: Path) -> None:
    ta, tb = samples(a), samples(b)
    assert ta.column("sample_id").to_pylist() == tb.column("sample_id").to_pylist()
    assert ta.column("image").to_pylist() == tb.column("image").to_pylist()
    steps = ("sample_id", "step_index", "timestep", "uncond")
    sa, sb = pq.read_table(a / "steps", columns=list(steps)), pq.read_table(b / "steps", columns=list(steps))
    assert sa.sort_by([("sample_id", "ascending"), ("step_index", "ascending")]).equals(
        sb.sort_by([("sample_id", "ascending"), ("step_index", "ascending")]))  # fmt: skip


def only_job_id(out: Path) -> str:
    (submission,) = json.loads((out / "slurm" / "submissions.json").read_text())
    (task,) = submission["tasks"]
    return task["job_id"]


def test_array_of_three_tasks_matches_the_local_run(m12: Path, tmp_path: Path) -> None:
    # --cfg-parallel-size pinned: auto counts a task's micro-batches (1 here: cfg 2) and a local
    # run the job's (3: dp 2), and the two layouts round differently
    opts = ["--steps", "4", "--shard-size", "4", "--gpus", "2", "--cfg-parallel-size", "2"]
    proc = gen_ok("batch", str(m12), "--out", str(tmp_path / "slurm"), *opts, "--slurm", "--wait")
    gen_ok("batch", str(m12), "--out", str(tmp_path / "local"), *opts)
    out = tmp_path / "slurm"
    assert "submitted 3 task(s) as SLURM array job(s)" in proc.stdout
    assert "submit-to-first-image" in proc.stdout and "done: 12 ok, 0 error (3/3 shards)" in proc.stdout
    markers = sorted((out / "done").glob("shard-*.json"))
    assert [p.name for p in markers] == ["shard-00000.json", "shard-00001.json", "shard-00002.json"]
    table = samples(out)
    assert table.num_rows == 12 and set(table.column("status").to_pylist()) == {"ok"}
    assert_same_output(out, tmp_path / "local")
    summary = json.loads((out / "summary.json").read_text())
    assert 0 < summary["time_to_first_image_s"] <= summary["time_to_done_s"]

    # Each task ran torchrun with 2 CPU ranks on the GPUs SLURM gave it; with 4 GPUs on the node
    # two tasks ran at once, so their torchrun rendezvous shared the node without colliding.
    tasks = [json.loads(p.read_text()) for p in sorted(out.glob(".gen/runs/task-*/task.json"))]
    assert [t["shards"] for t in tasks] == [[0], [1], [2]]
    spans = []
    for t in tasks:
        (attempt,) = t["attempts"]
        assert len(attempt["cuda_visible_devices"].split(",")) == 2
        spans.append((attempt["started_at"], attempt["finished_at"]))
    assert any(a[0] < b[1] and b[0] < a[1] for i, a in enumerate(spans) for b in spans[i + 1:]), spans
    assert list((out / "slurm").glob("*/*_log.out")), "submitit's task logs under OUT/slurm/"


def test_status_before_during_after_and_resubmit(m12: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = ["batch", str(m12), "--out", str(out), "--steps", "100", "--shard-size", "4",
           "--slurm", "--array-parallelism", "1"]  # fmt: skip
    gen_ok(*cmd)
    before = status(out)
    assert before["shards_total"] == 3 and before["shards_done"] == 0
    assert before["tasks"]["submitted"] == 3
    assert before["tasks"]["pending"] + before["tasks"]["running"] == 3

    again = gen_ok(*cmd)  # the same command while its tasks are queued submits nothing
    done = re.search(r"(\d) done, (\d) held by queued tasks, 0 to submit as 0 task\(s\)", again.stdout)
    assert done and int(done[1]) + int(done[2]) == 3, again.stdout

    def midway() -> dict | None:
        s = status(out)
        return s if 0 < s["shards_done"] < 3 else None

    during = wait_for(midway, 240, "a status with some shards done")
    tasks = during["tasks"]
    assert tasks["running"] <= 1  # --array-parallelism 1
    assert tasks["pending"] + tasks["running"] >= 3 - during["shards_done"]
    assert during["samples_ok"] == 4 * during["shards_done"]

    proc = gen_ok(*cmd, "--wait")  # follows the queued tasks to the end
    assert "nothing to submit" not in proc.stdout and "done: 12 ok, 0 error (3/3 shards)" in proc.stdout
    after = status(out)
    assert (after["shards_done"], after["samples_ok"], after["samples_error"]) == (3, 12, 0)
    # --wait returns at the last done marker; the last task leaves the queue once its process
    # has exited (ranks, torchrun, submitit's result), which takes SLURM a moment longer.
    def queue_empty() -> dict | None:
        found = status(out)
        return found if (found["tasks"]["pending"], found["tasks"]["running"]) == (0, 0) else None

    drained = wait_for(queue_empty, 60, "the last task to leave the queue")
    assert drained["restarts"]["total"] == 0 and drained["last_errors"] == []

    # SLURM gone (no squeue on PATH): everything but the queue is still known
    no_slurm = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if not (Path(p) / "squeue").exists())
    gone = status(out, env={"PATH": no_slurm})
    assert gone["shards_done"] == 3 and gone["tasks"]["pending"] is None
    text = run_gen("status", str(out), env={"PATH": no_slurm}).stdout
    assert "shards: 3 / 3 done" in text and "queue unknown (squeue unavailable)" in text

    # Re-running submits only the shards that are not done
    kept = samples(out).select(["sample_id", "status", "image", "seed"])
    for sub in ("done/shard-00001.json", "samples/shard-00001.parquet", "steps/shard-00001.parquet"):
        (out / sub).unlink()
    proc = gen_ok(*cmd, "--wait")
    assert "2 done, 0 held by queued tasks, 1 to submit as 1 task(s)" in proc.stdout
    assert samples(out).select(["sample_id", "status", "image", "seed"]).equals(kept)


# Long enough that the task cannot finish within SLURM's KillWait after the requeue (it
# ignores the SIGTERM, as submitit does, and would otherwise complete as attempt 0).
LONG = ["--steps", "200", "--batch-size", "1", "--shard-size", "12"]


@pytest.fixture(scope="module")
def long_local(m12: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The LONG job run locally on 1 rank: the bytes of any dp layout (12 micro-batches)."""
    out = tmp_path_factory.mktemp("long") / "local"
    gen_ok("batch", str(m12), "--out", str(out), *LONG, "--gpus", "1")
    return out


@pytest.mark.parametrize(
    ("how", "gpus"), [("scontrol requeue", "1"), ("scancel --signal=USR2", "2")], ids=["requeue", "usr2"]
)
def test_interrupted_task_is_requeued_and_loses_nothing(m12: Path, long_local: Path, tmp_path: Path, how: str,
                                                        gpus: str) -> None:  # fmt: skip
    out = tmp_path / "out"
    opts = [*LONG, "--gpus", gpus]
    follower = subprocess.Popen([shutil.which("gen"), "batch", str(m12), "--out", str(out), *opts,
                                 "--slurm", "--wait"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env={**os.environ, **ENV})  # fmt: skip
    try:
        wait_for(lambda: (out / "slurm" / "submissions.json").exists(), 120, "the submission")
        job_id = only_job_id(out)
        wait_for(lambda: flushed_parts(out) >= 3, 240, "3 flushed samples")
        if how == "scontrol requeue":
            subprocess.run(["scontrol", "requeue", job_id], check=True)
        else:  # preemption: submitit checkpoints on USR2 and requeues itself
            subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
        wait_requeued(job_id)
        stdout, stderr = follower.communicate(timeout=300)
    finally:
        follower.kill()
    assert follower.returncode == 0, stdout[-2000:] + stderr[-3000:]
    assert "done: 12 ok, 0 error (1/1 shards)" in stdout

    table = samples(out)
    ids = table.column("sample_id").to_pylist()
    assert len(ids) == len(set(ids)) == 12  # nothing lost, nothing duplicated
    task = json.loads((out / ".gen" / "runs" / "task-00000" / "task.json").read_text())
    assert [a["restart_count"] for a in task["attempts"]] == [0, 1]
    assert status(out)["restarts"] == {"total": 1, "by_task": {"task-00000": 1}}
    ranks = [json.loads(p.read_text()) for p in out.glob(".gen/runs/task-00000/ranks/rank-*[0-9].json")]
    assert sum(r["samples_skipped"] for r in ranks) >= 3  # resumed at the first unfinished sample
    logs = "".join(p.read_text() for p in out.glob("slurm/*/*_log.err"))
    assert "Traceback" not in logs, logs[-3000:]
    signame = "SIGUSR2" if how.startswith("scancel") else "SIGTERM"
    stopped = [line for line in logs.splitlines() if line.startswith(f"interrupted ({signame}): 0/1 shards done, ")]
    assert len(stopped) == 1, logs[-3000:]  # the ranks flushed and stopped at a boundary: one line
    if how.startswith("scancel"):
        assert "Caught signal SIGUSR2" in logs and "preempted" in logs
        assert stopped[0].endswith("; requeueing the task: it resumes at its first unfinished sample")

    assert_same_output(out, long_local)


def test_failed_tasks_end_wait_with_a_clear_message_and_resume(m12: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = ["batch", str(m12), "--out", str(out), "--steps", "4", "--shard-size", "4", "--slurm", "--wait"]
    proc = run_gen(*cmd, "--slurm-setup", "echo module not found >&2; exit 3", env=ENV, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "3 shard(s) unfinished and no task of this job is queued" in proc.stderr
    assert re.search(r"\(tasks (\d+)_0, \1_1, \1_2: FAILED \(exit 3:0, reason NonZeroExitCode\)\)\. Logs", proc.stderr), proc.stderr
    assert "re-run the same command to resume" in proc.stderr and "Traceback" not in proc.stderr
    failed = status(out)
    assert (failed["shards_done"], failed["tasks"]["pending"], failed["tasks"]["running"]) == (0, 0, 0)
    proc = gen_ok(*cmd)
    assert "0 done, 0 held by queued tasks, 3 to submit as 3 task(s)" in proc.stdout
    assert "done: 12 ok, 0 error (3/3 shards)" in proc.stdout


def test_split_roles_as_three_chained_arrays_match_the_local_run(m12: Path, tmp_path: Path) -> None:
    """--roles split on SLURM: encoder, denoiser, decoder arrays chained task by task with
    aftercorr (visible in scontrol while pending); an encoder task that fails has its
    partners cancelled (kill_on_invalid_dep), not left pending, while the other chain runs;
    the re-run submits only the failed shard's chain; same output as a local monolithic run."""
    opts = ["--steps", "2", "--batch-size", "3", "--shard-size", "6", "--gpus", "1"]
    out = tmp_path / "split"
    fail_task_0 = ["--slurm-setup", '[ "$SLURM_ARRAY_TASK_ID" != 0 ] || exit 3']
    failed = run_gen("batch", str(m12), "--out", str(out), *opts, "--slurm", "--roles", "split", "--wait",
                     *fail_task_0, env=ENV, timeout=300)  # fmt: skip
    assert failed.returncode == 1, failed.stdout[-2000:] + failed.stderr[-3000:]
    (first,) = json.loads((out / "slurm" / "submissions.json").read_text())
    enc, den, dec = (a["job_id"] for a in first["arrays"])
    assert (f"1 shard(s) unfinished and no task of this job is queued (tasks {enc}_0: FAILED (exit 3:0, "
            f"reason NonZeroExitCode); {den}_0, {dec}_0: CANCELLED (exit 0:0, reason DependencyNeverSatisfied))"
            ) in failed.stderr, failed.stderr[-3000:]  # fmt: skip
    assert "Traceback" not in failed.stderr
    shard_1 = out / "samples" / "shard-00001.parquet"
    kept = shard_1.read_bytes(), shard_1.stat().st_mtime_ns
    proc = gen_ok("batch", str(m12), "--out", str(out), *opts, "--slurm", "--roles", "split",
                  "--role-slurm-extra", "decoder:comment=decoder-array")  # fmt: skip
    assert "1 done, 0 held by queued tasks, 1 to submit as 1 task(s)" in proc.stdout, proc.stdout
    _, submission = json.loads((out / "slurm" / "submissions.json").read_text())
    arrays = {a["role"]: a for a in submission["arrays"]}
    assert list(arrays) == ["encoder", "denoiser", "decoder"]
    assert arrays["denoiser"]["dependency"] == f"aftercorr:{arrays['encoder']['job_id']}"
    assert f"decoder {arrays['decoder']['job_id']} (aftercorr:{arrays['denoiser']['job_id']})" in proc.stdout
    shown = subprocess.run(["scontrol", "show", "job", arrays["decoder"]["job_id"]], capture_output=True,
                           text=True).stdout  # fmt: skip
    assert "Comment=decoder-array" in shown
    assert f"aftercorr:{arrays['denoiser']['job_id']}" in shown or "JobState=COMPLETED" in shown, shown
    wait_for(lambda: status(out)["shards_done"] == 2, 300, "both shards done")
    assert (shard_1.read_bytes(), shard_1.stat().st_mtime_ns) == kept  # the finished shard untouched
    gen_ok("batch", str(m12), "--out", str(tmp_path / "local"), *opts)
    assert_same_output(out, tmp_path / "local")
    shown = run_gen("status", str(out)).stdout
    assert all(f"{role} 2/2 (0 pending, 0 running)" in shown for role in ("encoder", "denoiser", "decoder")), shown
    # re-running submits nothing: decided from the files on disk
    again = gen_ok("batch", str(m12), "--out", str(out), *opts, "--slurm", "--roles", "split")
    assert "nothing to submit: every shard is done" in again.stdout


def _media(out: Path) -> dict[str, list]:
    table = samples(out)
    return {c: table.column(c).to_pylist() for c in ("sample_id", "image", "video", "audio") if c in table.column_names}


@pytest.mark.parametrize("model", ["tiny-sdxl", "tiny-flux", "tiny-wan22", "tiny-ltx2"])
def test_split_roles_on_slurm_per_family(model: str, tmp_path: Path) -> None:
    """Every family through SLURM's three chained arrays (encoder, denoiser, decoder tasks on
    the cluster) gives the local monolithic bytes: images, or videos and audio, and steps."""
    manifest = parti_manifest(tmp_path / "m.parquet", 2)
    frames = {"tiny-wan22": ["--num-frames", "5"], "tiny-ltx2": ["--num-frames", "9"]}
    opts = ["--model", model, "--steps", "2", "--batch-size", "2", "--gpus", "1", *frames.get(model, [])]
    proc = gen_ok("batch", str(manifest), "--out", str(tmp_path / "split"), *opts, "--slurm", "--roles", "split",
                  "--wait", timeout=600)  # fmt: skip
    assert "done: 2 ok, 0 error (1/1 shards)" in proc.stdout, proc.stdout[-2000:]
    (submission,) = json.loads((tmp_path / "split" / "slurm" / "submissions.json").read_text())
    assert [a["role"] for a in submission["arrays"]] == ["encoder", "denoiser", "decoder"]
    gen_ok("batch", str(manifest), "--out", str(tmp_path / "mono"), *opts, timeout=600)
    split, mono = _media(tmp_path / "split"), _media(tmp_path / "mono")
    assert set(split) == set(mono) and len(split) >= 2
    assert split == mono
    steps = ["sample_id", "step_index", "timestep", "uncond"]
    assert pq.read_table(tmp_path / "split" / "steps", columns=steps).equals(
        pq.read_table(tmp_path / "mono" / "steps", columns=steps))  # fmt: skip
