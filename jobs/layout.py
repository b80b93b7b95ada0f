"""``--cfg-parallel-size auto`` (the default): the rank grid that finishes the job first.

Resolved once per job, before job.json is written, from the manifest's size alone (not from
what is left to run: a resumed job keeps the layout, and so the bytes, of its first run). A
local run counts the whole job's micro-batches; a SLURM submission counts those of one task
(each task runs its own ranks over its ``--shards-per-task`` shards).
"""

from __future__ import annotations

import dataclasses
import math

from jobs.config import BatchConfig
from parallel.dims import auto_cfg_size


def guidance_branches(config: BatchConfig) -> int:
    """Guidance branches a step of this job runs, as far as the options tell: 2 (cond, uncond)
    when guidance is on (``guidance_scale`` None, i.e. the model's default, or > 1, or
    ``true_cfg_scale`` > 1), else 1. Models with more branches (SD3's skip-layer guidance,
    LTX-2's STG and modality terms) get a larger group with an explicit --cfg-parallel-size."""
    guided = config.guidance_scale is None or config.guidance_scale > 1 or (config.true_cfg_scale or 0) > 1
    return 2 if guided else 1


def micro_batches(num_rows: int, config: BatchConfig, shards: int | None = None) -> int:
    """Micro-batches of the first ``shards`` shards of a ``num_rows`` manifest (None: all):
    each shard's ``rows x images_per_prompt`` samples in batches of ``batch_size``."""
    size = config.shard_size or num_rows or 1
    count = math.ceil(num_rows / size)
    total = 0
    for i in range(count if shards is None else min(shards, count)):
        rows = min(size, num_rows - i * size)
        total += math.ceil(rows * config.images_per_prompt / config.batch_size)
    return total


def resolve_layout(config: BatchConfig, num_rows: int, *, shards_per_task: int | None = None,
                   ) -> tuple[BatchConfig, str | None]:  # fmt: skip
    """The config with ``cfg_parallel_size`` resolved, and why (None: the user chose it).

    Args:
        config: the job's options (``cfg_parallel_size`` None: auto).
        num_rows: the manifest's rows.
        shards_per_task: a SLURM submission's shards per task (None: a local run).
    Returns:
        (config, reason): ``config`` itself when --cfg-parallel-size was given.

    ``--max-forward-batch`` below a batched step's samples (branches x batch_size) does not by
    itself call for CFG groups: under the cap each branch is its own forward of batch_size
    samples either way, and data parallelism runs as many such forwards per step as CFG groups
    would, without the per-step exchange; the reason says how the cap is honoured.
    """
    if config.cfg_parallel_size is not None:
        return config, None
    world = config.role_ranks("denoiser") if config.split else config.gpus
    branches = guidance_branches(config)
    k, reason = auto_cfg_size(world, micro_batches=micro_batches(num_rows, config, shards_per_task),
                              branches=branches)  # fmt: skip
    cap = config.max_forward_batch
    if cap is not None and config.cfg_batching and math.ceil(branches / k) * config.batch_size > cap:
        reason += f"; --max-forward-batch {cap}: each branch its own forward of {config.batch_size}"
    return dataclasses.replace(config, cfg_parallel_size=k), reason
