"""SLURM submission pieces without a cluster: time limits, sbatch text (submitit's own
generator), array splitting, shard grouping, and the CLI's option checks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from submitit.slurm.slurm import _make_sbatch_string

from jobs.errors import JobError
from jobs.slurm.params import (
    DEFAULT_MAX_ARRAY_SIZE,
    SlurmOptions,
    group_shards,
    max_array_size,
    parse_extra,
    parse_slurm_time,
    sbatch_parameters,
    split_arrays,
)
from jobs.slurm.task import ShardTask
from tests.conftest import run_gen


@pytest.mark.parametrize(
    ("text", "minutes"),
    [("90", 90), ("1:30", 2), ("0:59", 1), ("2:00:00", 120), ("1-0", 1440), ("1-2:30", 1590),
     ("1-00:00:01", 1441), (" 45 ", 45)],
)  # fmt: skip
def test_slurm_time_formats(text: str, minutes: int) -> None:
    assert parse_slurm_time(text) == minutes


@pytest.mark.parametrize("text", ["", "abc", "1h", "1:2:3:4", "-5", "0", "0:00"])
def test_bad_slurm_time_names_the_option(text: str) -> None:
    with pytest.raises(JobError, match="--time"):
        parse_slurm_time(text)


def test_extra_options() -> None:
    assert parse_extra(["constraint=a100", "exclusive", "--gres=gpu:a100:8", "comment=a=b"]) == (
        ("constraint", "a100"), ("exclusive", ""), ("gres", "gpu:a100:8"), ("comment", "a=b"),
    )  # fmt: skip
    with pytest.raises(JobError, match="--slurm-extra '=x'"):
        parse_extra(["=x"])
    with pytest.raises(JobError, match="--slurm-extra"):
        parse_extra(["a b=1"])


def _sbatch_lines(options: SlurmOptions, gpus: int, tasks: int, tmp_path: Path) -> list[str]:
    params = sbatch_parameters(options, gpus=gpus, job_name="gen-out")
    text = _make_sbatch_string(command="python -m x", folder=tmp_path / "%j", map_count=tasks, **params)
    return text.splitlines()


def test_sbatch_script_of_an_array(tmp_path: Path) -> None:
    options = SlurmOptions(partition="gpu", time="1-00:00", account="proj", qos="high",
                           cpus_per_task=16, mem="64G", array_parallelism=2,
                           setup=("module load cuda/12.4", "source ~/env/bin/activate"),
                           extra=(("constraint", "h100"), ("exclusive", "")))  # fmt: skip
    lines = _sbatch_lines(options, 8, 3, tmp_path)
    for expected in ["#SBATCH --partition=gpu", "#SBATCH --time=1440", "#SBATCH --account=proj",
                     "#SBATCH --qos=high", "#SBATCH --cpus-per-task=16", "#SBATCH --mem=64G",
                     "#SBATCH --gpus-per-node=8", "#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1",
                     "#SBATCH --array=0-2%2", "#SBATCH --requeue", "#SBATCH --signal=USR2@90",
                     "#SBATCH --constraint=h100", "#SBATCH --exclusive", "#SBATCH --job-name=gen-out",
                     "module load cuda/12.4", "source ~/env/bin/activate"]:  # fmt: skip
        assert expected in lines, expected
    # setup lines run before the task's srun command
    assert lines.index("module load cuda/12.4") < next(i for i, x in enumerate(lines) if x.startswith("srun"))
    assert any(f"{tmp_path}/%A_%a" in x for x in lines if x.startswith("#SBATCH --output"))


def test_sbatch_defaults_and_overrides(tmp_path: Path) -> None:
    lines = _sbatch_lines(SlurmOptions(), 2, 5, tmp_path)
    assert "#SBATCH --array=0-4%5" in lines  # all at once by default
    assert "#SBATCH --time=60" in lines and "#SBATCH --requeue" in lines
    assert not any(x.startswith(("#SBATCH --partition", "#SBATCH --mem", "#SBATCH --account")) for x in lines)
    # --slurm-extra wins over gen's own settings (CPU-only clusters: no GPU GRES)
    lines = _sbatch_lines(SlurmOptions(extra=(("gpus-per-node", "0"),), requeue=False), 2, 2, tmp_path)
    assert [x for x in lines if "gpus-per-node" in x] == ["#SBATCH --gpus-per-node=0"]
    assert "#SBATCH --requeue" not in lines


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"time": "soon"}, "--time"), ({"cpus_per_task": 0}, "--cpus-per-task"),
     ({"array_parallelism": 0}, "--array-parallelism"), ({"shards_per_task": 0}, "--shards-per-task"),
     ({"mem": "lots"}, "--mem")],
)  # fmt: skip
def test_bad_slurm_options(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(JobError, match=match):
        SlurmOptions(**kwargs)  # type: ignore[arg-type]


def test_arrays_respect_max_array_size() -> None:
    arrays = split_arrays(2500, 1001)
    assert [(a.start, a.stop) for a in arrays] == [(0, 1001), (1001, 2002), (2002, 2500)]
    assert all(len(a) <= 1001 for a in arrays)  # indices 0 .. len - 1 < MaxArraySize
    assert [len(a) for a in split_arrays(1001, 1001)] == [1001]
    assert [len(a) for a in split_arrays(1002, 1001)] == [1001, 1]
    assert split_arrays(0, 1001) == []
    assert [len(a) for a in split_arrays(5, 1)] == [1] * 5
    with pytest.raises(ValueError):
        split_arrays(3, 0)


def test_shard_grouping() -> None:
    assert group_shards([0, 1, 2, 3, 4], 2) == [[0, 1], [2, 3], [4]]
    assert group_shards([1, 4, 7], 1) == [[1], [4], [7]]
    assert group_shards([], 3) == []


def test_only_a_small_task_is_pickled_by_reference() -> None:
    import cloudpickle
    from submitit.helpers import DelayedSubmission

    task = ShardTask("/data/run-gen", (7, 8), 8)
    blob = cloudpickle.dumps(DelayedSubmission(task))
    assert len(blob) < 1024 and b"jobs.slurm.task" in blob and b"ShardTask" in blob
    assert task.scope == "task-00007"
    again = task.checkpoint()  # submitit's USR2 hook requeues the very same task
    assert isinstance(again, DelayedSubmission) and again.function == task and again.args == ()


def test_max_array_size_without_slurm(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol here
    assert max_array_size() == DEFAULT_MAX_ARRAY_SIZE


def test_slurm_options_need_slurm(tmp_path: Path) -> None:
    proc = run_gen("batch", str(tmp_path / "m.parquet"), "--partition", "gpu")
    assert proc.returncode == 2
    assert "--partition needs --slurm" in proc.stderr and "Traceback" not in proc.stderr


def test_slurm_without_sbatch_is_one_clear_line(tmp_path: Path) -> None:
    exe_dir = Path(os.environ.get("VIRTUAL_ENV", "")) / "bin"
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep)
                           if not (Path(p) / "sbatch").exists())  # fmt: skip
    proc = run_gen("batch", str(tmp_path / "m.parquet"), "--slurm", env={"PATH": path or str(exe_dir)})
    assert proc.returncode == 2, proc.stderr
    assert "`sbatch` is not on PATH" in proc.stderr and "slurm/cluster.sh up" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_status_of_a_directory_without_a_job(tmp_path: Path) -> None:
    proc = run_gen("status", str(tmp_path))
    assert proc.returncode == 2
    assert "not a gen output directory (no job.json)" in proc.stderr and "Traceback" not in proc.stderr


def test_how_tasks_ended_groups_tasks_by_their_slurm_state(monkeypatch: pytest.MonkeyPatch) -> None:
    import jobs.slurm.wait as wait

    states = {"7_0": "FAILED (exit 3:0, reason NonZeroExitCode)", "7_1": "TIMEOUT (exit 0:15)",
              "7_2": "FAILED (exit 3:0, reason NonZeroExitCode)"}  # fmt: skip
    asked: list[str] = []
    monkeypatch.setattr(wait, "ended_state", lambda j: asked.append(j) or states.get(j))
    assert wait._how_tasks_ended(["7_0", "7_1", "7_2", "7_3"]) == (
        "tasks 7_0, 7_2: FAILED (exit 3:0, reason NonZeroExitCode); 7_1: TIMEOUT (exit 0:15); 7_3")
    ids = [f"9_{i}" for i in range(25)]
    asked.clear()
    assert wait._how_tasks_ended(ids, ask=10) == "tasks " + ", ".join(ids[:10]) + " and 15 more"
    assert asked == ids[:10]  # SLURM is asked about the first 10 only
    assert wait._how_tasks_ended([]) == "tasks ?"


def test_npu_accelerator_asks_for_npu_gres(tmp_path: Path) -> None:
    """--accelerator npu: --gpus becomes the GRES of Ascend clusters, not --gpus-per-node."""
    lines = _sbatch_lines(SlurmOptions(accelerator="npu"), 8, 2, tmp_path)
    assert "#SBATCH --gres=npu:8" in lines
    assert not any("gpus-per-node" in x for x in lines)
    # a typed GRES (or another name) through --slurm-extra still wins
    lines = _sbatch_lines(SlurmOptions(accelerator="npu", extra=(("gres", "npu:910b:8"),)), 8, 2, tmp_path)
    assert [x for x in lines if "gres" in x] == ["#SBATCH --gres=npu:910b:8"]
    assert "#SBATCH --gpus-per-node=8" in _sbatch_lines(SlurmOptions(), 8, 2, tmp_path)
    with pytest.raises(JobError, match="--accelerator 'tpu' is invalid: one of gpu, npu"):
        SlurmOptions(accelerator="tpu")


def test_accelerator_through_the_cli(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"]}), manifest)
    proc = run_gen("batch", str(manifest), "--accelerator", "npu")
    assert proc.returncode == 2 and "--accelerator needs --slurm" in proc.stderr
    proc = run_gen("batch", str(manifest), "--dry-run", "--slurm", "--gpus", "8", "--accelerator", "npu")
    assert proc.returncode == 0, proc.stderr
    assert "each task: 1 node, --gres=npu:8," in proc.stdout
