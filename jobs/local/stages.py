"""The ranks of one role of a split job (``--roles split``, ``--role R``): encoder, denoiser, decoder.

Every role plans the same shards and micro-batches as a monolithic run (jobs.plan), so each
forward sees the same batch and the bytes do not depend on the split:

- encoder: runs the encode stage of every micro-batch of its shards and writes
  OUT/stages/encoder/shard-NNNNN.parquet, then its done marker (jobs.output.stages);
- denoiser: starts a shard from the encoder's done marker; its CFG groups and gating as in a
  monolithic run; group rank 0 writes OUT/stages/denoiser/...;
- decoder: starts a shard from the denoiser's done marker, decodes, and writes the samples and
  steps parquet through the monolithic writer (parts, per-rank finish markers, commit), then
  removes the shard's stage files unless ``--keep-intermediates``.

Encoder and denoiser deal whole shards to their dp groups (shard k to group k % dp): a stage
file is written by one group. A role waits for its upstream's marker of each of its shards, in
shard order, while the upstream role runs (``wait_upstream``: the local launcher starts the three
roles together and leaves OUT/.gen/runs/SCOPE/roles/ROLE.ended when a role's ranks exit); a shard
whose marker never comes (its upstream failed on it) is left for the re-run. Without
``wait_upstream`` (``--role R`` alone, a SLURM task started by ``aftercorr``) a shard without
its upstream marker is skipped at once.

Failure paths: a micro-batch whose encode (or denoise) raises is retried one sample at a time in
that stage, and a sample that still fails becomes an error row; a monolithic run retries the whole
pipeline per sample instead, so only these retried samples may differ in bytes between the two.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from jobs.local.signals import StopRequest, stop_at_boundary
from jobs.manifest import read_rows
from jobs.output.failpoints import failpoint
from jobs.output.stages import (
    StageFiles,
    denoised_rows,
    encoded_from_rows,
    encoded_rows,
    result_from_row,  # fmt: skip
)
from jobs.output.store import OutputDir, write_json
from jobs.plan import Shard, micro_batches
from jobs.rows import PlannedSample, plan_rows
from parallel.cfg_group import CollectiveError
from pipeline.oom import free_device_memory, is_out_of_memory
from pipeline.roles import ROLES
from pipeline.samples import SampleResult

if TYPE_CHECKING:
    from jobs.config import BatchConfig
    from jobs.local.rank_stats import RankStats
    from pipeline.generate import StageRunner

POLL_S = 0.2
"""Seconds between looks for an upstream done marker."""


def role_ended(out: OutputDir, role: str) -> Path:
    """The marker the local launcher leaves when every rank of ``role`` has exited."""
    return out.run_dir / "roles" / f"{role}.ended"


def mark_role_ended(out: OutputDir, role: str, returncode: int) -> None:
    """Leave ``role``'s ended marker (its ranks' exit status in it)."""
    write_json(role_ended(out, role), {"role": role, "returncode": returncode, "time": time.time()})


def upstream_of(role: str) -> str | None:
    """The role whose stage files ``role`` starts from (None for the encoder)."""
    i = ROLES.index(role)
    return ROLES[i - 1] if i else None


def wait_for_upstream(out: OutputDir, stages: StageFiles, role: str, shard: Shard, wait: bool) -> bool:
    """Whether the upstream stage of ``shard`` is done, waiting for it while the upstream role
    runs (``wait``). The ended marker is read before the done marker: once the upstream has
    ended, the answer is final, so the ranks of a CFG group all give the same one."""
    upstream = upstream_of(role)
    if upstream is None:
        return True
    while True:
        ended = not wait or role_ended(out, upstream).exists()
        if stages.is_done(upstream, shard):
            return True
        if ended:
            return False
        time.sleep(POLL_S)


class StageRole:
    """The encoder or denoiser ranks of a split job, over their shards.

    Args:
        role: "encoder" or "denoiser".
        out: the job's output directory.
        config: the job's options (batch_size).
        runner: this rank's StageRunner (the role's modules loaded).
        manifest: the opened manifest.
        defaults: generation defaults resolved for the model.
        group: this rank's CFG group (size 1 for the encoder).
        dp_rank: this rank's dp group, in [0, dp_size).
        dp_size: dp groups of the role.
        stats: this rank's stats (first_denoise_wall is set by the denoiser).
        device: where tensors read from stage files go.
        wait_upstream: wait for the upstream role's markers (see the module docstring).
        stop: asks the rank to stop at its next micro-batch boundary (jobs.local.signals): the
            shard being worked on then gets no stage file (a re-run redoes it); None: never.
    """

    def __init__(self, role: str, *, out: OutputDir, config: BatchConfig, runner: StageRunner, manifest: Any,
                 defaults: Any, group: Any, dp_rank: int, dp_size: int, stats: RankStats,
                 device: torch.device, wait_upstream: bool, stop: StopRequest | None = None) -> None:  # fmt: skip
        assert role in ("encoder", "denoiser"), role
        self.role, self.out, self.config, self.runner = role, out, config, runner
        self.manifest, self.defaults, self.group = manifest, defaults, group
        self.dp_rank, self.dp_size, self.stats = dp_rank, dp_size, stats
        self.device, self.wait_upstream, self.stop = device, wait_upstream, stop
        self.stages = StageFiles(out)

    def run(self, shards: Sequence[Shard]) -> list[Shard]:
        """Run this rank's share of ``shards``; returns the shards it wrote (or helped write)."""
        done = []
        later = ROLES[ROLES.index(self.role):-1]  # this role's stage and the ones after it
        for shard in shards:
            if shard.index % self.dp_size != self.dp_rank:
                continue
            if self.out.is_done(shard) or any(self.stages.is_done(r, shard) for r in later):
                continue
            if not wait_for_upstream(self.out, self.stages, self.role, shard, self.wait_upstream):
                continue
            planned = plan_rows(read_rows(self.manifest, shard.start, shard.stop), shard.start, self.defaults)
            batches = [[p for p in b if p.error is None] for b in micro_batches(planned, self.config.batch_size)]
            batches = [b for b in batches if b]
            upstream = self.stages.read("encoder", shard) if self.role == "denoiser" else {}
            rows = []
            for batch in batches:
                if stop_at_boundary(self.stop, self.group):  # every rank of the CFG group at once
                    return done
                if self.role == "encoder":
                    rows += self._encode([p.request for p in batch])
                else:
                    rows += self._denoise(batch, upstream)
            if self.group.rank == 0:
                self.stages.write(self.role, shard, rows, {"role": self.role})
                failpoint(f"{self.role}-stage-written")
            done.append(shard)
        return done

    def _encode(self, requests: list) -> list[dict]:
        try:
            return encoded_rows(requests, self.runner.encode(requests))
        except Exception as exc:  # noqa: BLE001 - retried one by one, then error rows
            if len(requests) == 1:
                return encoded_rows(requests, None, f"{type(exc).__name__}: {exc}")
            return [row for r in requests for row in self._encode([r])]

    def _denoise(self, batch: list[PlannedSample], upstream: dict[str, dict]) -> list[dict]:
        """Denoiser stage rows of one micro-batch, in its order: samples whose encode failed (or
        whose row is missing) pass their error on; the others are denoised together."""
        requests = [p.request for p in batch]
        failed: dict[str, str] = {}
        for r in requests:
            row = upstream.get(r.sample_id)
            meta = json.loads(row["meta"]) if row is not None else {"error": "missing from the encoder stage"}
            if meta["error"]:
                failed[r.sample_id] = meta["error"]
        ok = [r for r in requests if r.sample_id not in failed]
        by_id: dict[str, dict] = {}
        if ok:
            for row in self._denoise_requests(ok, upstream):
                by_id[row["sample_id"]] = row
        for r in requests:
            if r.sample_id in failed:
                by_id[r.sample_id] = denoised_rows([SampleResult(r, error=failed[r.sample_id])], None)[0]
        return [by_id[r.sample_id] for r in requests]

    def _denoise_requests(self, requests: list, upstream: dict[str, dict]) -> list[dict]:
        encoded = encoded_from_rows([upstream[r.sample_id] for r in requests], self.device)
        if self.stats.first_denoise_wall is None:
            self.stats.first_denoise_wall = time.time()
        try:
            with self.group.lockstep():
                latents, results = self.runner.denoise(requests, encoded)
            for r in results:
                r.forward_batch = len(requests)
            return denoised_rows(results, latents)
        except CollectiveError:
            raise
        except Exception as exc:  # noqa: BLE001 - GroupAborted on every rank of the group alike
            if len(requests) > 1 and is_out_of_memory(exc):  # two halves (pipeline.oom)
                del exc
                free_device_memory()
                half = (len(requests) + 1) // 2
                return [*self._denoise_requests(requests[:half], upstream),
                        *self._denoise_requests(requests[half:], upstream)]  # fmt: skip
            if len(requests) == 1:
                return denoised_rows([SampleResult(requests[0], error=f"{type(exc).__name__}: {exc}")], None)
            return [row for r in requests for row in self._denoise_requests([r], upstream)]


class DecodeSource:
    """What the decoder ranks write: each sample's denoise result, decoded (the ``produce`` of
    the worker's shard writer, which writes the samples and steps parquet as a monolithic run).

    Args:
        out: the job's output directory.
        runner: this rank's StageRunner (decoder modules loaded).
        stats: this rank's stats (first_image_wall, last_decode_wall, sample counts).
        device: where latents go.
        wait_upstream: wait for the denoiser's markers (see the module docstring).
        keep_intermediates: keep a committed shard's stage files.
    """

    def __init__(self, *, out: OutputDir, runner: StageRunner, stats: RankStats, device: torch.device,
                 wait_upstream: bool, keep_intermediates: bool) -> None:  # fmt: skip
        self.out, self.runner, self.stats, self.device = out, runner, stats, device
        self.wait_upstream, self.keep_intermediates = wait_upstream, keep_intermediates
        self.stages = StageFiles(out)
        self.rows: dict[str, dict] = {}

    def ready(self, shard: Shard) -> bool:
        """Wait for the shard's denoiser stage and read it; False: not there (left for a re-run)."""
        if not wait_for_upstream(self.out, self.stages, "decoder", shard, self.wait_upstream):
            return False
        self.rows = self.stages.read("denoiser", shard)
        return True

    def produce(self, todo: list[PlannedSample], writes: set[str]) -> tuple[list[SampleResult | None], tuple | None]:
        """Results for ``todo`` in order (None for planning errors; only the samples in
        ``writes`` are decoded), and the (start, end) wall span of the decode."""
        start = time.time()
        results: list[SampleResult | None] = []
        for p in todo:
            sid = p.request.sample_id
            if p.error is not None or sid not in writes:
                results.append(None)
                continue
            row = self.rows.get(sid)
            if row is None:
                results.append(SampleResult(p.request, error="missing from the denoiser stage"))
                continue
            result, latents = result_from_row(p.request, row, self.device)
            results.append(self.runner.decode(result, latents))
        if not any(r is not None for r in results):
            return results, None
        end = time.time()
        if self.stats.first_image_wall is None:
            self.stats.first_image_wall = end
        self.stats.last_decode_wall = end
        return results, (start, end)

    def committed(self, shard: Shard) -> None:
        """The shard is committed: drop its stage files unless --keep-intermediates."""
        if not self.keep_intermediates:
            self.stages.remove(shard)
