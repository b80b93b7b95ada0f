"""--cfg-parallel-size auto (jobs.layout): counted from the manifest's size, per SLURM task with
--slurm; an explicit size wins; no guidance, no CFG groups."""

from __future__ import annotations

from jobs.config import BatchConfig
from jobs.layout import guidance_branches, micro_batches, resolve_layout


def _config(**options: object) -> BatchConfig:
    return BatchConfig(manifest="m.parquet", out="o", **options)  # type: ignore[arg-type]


def test_micro_batches_per_shard_and_per_task() -> None:
    config = _config(batch_size=4, shard_size=8, images_per_prompt=3)
    # 20 rows -> shards of 8, 8, 4 rows -> 24, 24, 12 samples -> 6 + 6 + 3 micro-batches
    assert micro_batches(20, config) == 15
    assert micro_batches(20, config, shards=1) == 6 and micro_batches(20, config, shards=9) == 15
    assert micro_batches(0, config) == 0


def test_auto_picks_dp_for_many_micro_batches_and_cfg_for_one() -> None:
    many, why = resolve_layout(_config(gpus=2), 64)
    assert many.cfg_parallel_size == 1 and many.dims.dp_size == 2 and "data parallel" in why
    one, why = resolve_layout(_config(gpus=2), 1)
    assert one.cfg_parallel_size == 2 and one.dims.dp_size == 1 and "CFG groups of 2" in why
    # per SLURM task: 8 ranks, 1 shard of 4 rows per task = 1 micro-batch, though the job has 16
    task, _ = resolve_layout(_config(gpus=8, shard_size=4), 64, shards_per_task=1)
    assert task.dims.describe().startswith("8 rank(s) = dp 4 x cfg 2")


def test_explicit_size_wins_and_no_guidance_means_no_groups() -> None:
    given = _config(gpus=2, cfg_parallel_size=2)
    assert resolve_layout(given, 64) == (given, None)
    assert guidance_branches(_config(guidance_scale=1.0)) == 1
    assert guidance_branches(_config(guidance_scale=1.0, true_cfg_scale=4.0)) == 2
    assert guidance_branches(_config()) == 2  # the model's default guidance
    assert resolve_layout(_config(gpus=2, guidance_scale=1.0), 1)[0].cfg_parallel_size == 1


def test_max_forward_batch_keeps_data_parallel_and_says_how_the_cap_is_honoured() -> None:
    """Under the cap each branch is its own forward of batch_size on either layout, so many
    micro-batches still go data parallel; the reason names the cap."""
    capped, why = resolve_layout(_config(gpus=2, batch_size=4, max_forward_batch=4), 64)
    assert capped.cfg_parallel_size == 1
    assert why.endswith("; --max-forward-batch 4: each branch its own forward of 4")
    room, why = resolve_layout(_config(gpus=2, batch_size=4, max_forward_batch=8), 64)
    assert "--max-forward-batch" not in why
    one, why = resolve_layout(_config(gpus=2, batch_size=4, max_forward_batch=4), 1)
    assert one.cfg_parallel_size == 2 and "--max-forward-batch" not in why  # one branch per rank fits
