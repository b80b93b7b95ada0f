"""Intermediate results between the roles of a split job (``--roles split``).

    OUT/stages/encoder/shard-00000.parquet    embeddings of every sample of the shard
    OUT/stages/encoder/done/shard-00000.json  written last: the denoiser may start the shard
    OUT/stages/denoiser/shard-00000.parquet   latents and denoise results of every sample
    OUT/stages/denoiser/done/shard-00000.json written last: the decoder may start the shard

One row per sample: ``sample_id``, ``tensors`` (list of struct<key, data, shape, dtype>: the
tensor's raw bytes in its own dtype, so bf16 crosses losslessly; ../shared/NOTES.md, "Roles":
binary + shape + dtype is lossless and fast, pyarrow's fixed_shape_tensor has no bf16) and
``meta`` (JSON: warnings, errors, step records, gating). A stage file is written whole, by the
one rank (group) that ran the shard, then its done marker; a role killed mid-shard leaves
neither, and its re-run does the shard again. The decoder removes a committed shard's stage
files unless ``--keep-intermediates``.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from jobs.output.store import OutputDir, write_json, write_parquet
from jobs.plan import Shard

if TYPE_CHECKING:
    import torch

    from pipeline.generate import Encoded
    from pipeline.samples import SampleRequest, SampleResult

STAGE_ROLES = ("encoder", "denoiser")
"""Roles that hand a stage file to the next one (the decoder writes OUT/samples)."""

TENSOR_TYPE = pa.struct([("key", pa.string()), ("data", pa.binary()), ("shape", pa.list_(pa.int64())),
                         ("dtype", pa.string())])  # fmt: skip
STAGE_SCHEMA = pa.schema([("sample_id", pa.string()), ("tensors", pa.list_(TENSOR_TYPE)), ("meta", pa.string())])


def tensor_cell(key: str, tensor: torch.Tensor | None) -> dict[str, Any]:
    """A tensor as a ``tensors`` item: its bytes (CPU, contiguous), shape and dtype name
    ("bfloat16", ...); None as data null, dtype "none"."""
    if tensor is None:
        return {"key": key, "data": None, "shape": [], "dtype": "none"}
    import torch

    t = tensor.detach().to("cpu").contiguous()
    data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return {"key": key, "data": data, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}


def cell_tensor(cell: dict[str, Any], device: torch.device | None = None) -> torch.Tensor | None:
    """Inverse of tensor_cell (on ``device``, default CPU): the same dtype, shape and bytes."""
    if cell["dtype"] == "none":
        return None
    import torch

    dtype = getattr(torch, cell["dtype"])
    raw = torch.frombuffer(bytearray(cell["data"]), dtype=torch.uint8) if cell["data"] else torch.empty(0, dtype=torch.uint8)
    t = raw.view(dtype).reshape(cell["shape"])
    return t if device is None else t.to(device)


def encoded_rows(requests: list[SampleRequest], encoded: Encoded | None, error: str | None = None) -> list[dict]:
    """Encoder stage rows of a micro-batch: per request its conditioning row ("cond.<name>",
    "uncond.<name>" tensors, (1, ...) each) and its warning; or, with ``error``, the error."""
    rows = []
    for i, r in enumerate(requests):
        tensors = []
        if encoded is not None:
            c = encoded.cond.select([i])
            tensors = [tensor_cell(f"cond.{k}", v) for k, v in c.cond.items()]
            tensors += [tensor_cell(f"uncond.{k}", v) for k, v in (c.uncond or {}).items()]
        meta = {"warning": encoded.warnings[i] if encoded is not None else None, "error": error,
                "guided": encoded is not None and encoded.cond.uncond is not None}  # fmt: skip
        rows.append({"sample_id": r.sample_id, "tensors": tensors, "meta": json.dumps(meta)})
    return rows


def encoded_from_rows(rows: list[dict], device: torch.device) -> Encoded:
    """The Encoded of a micro-batch from its encoder stage rows (in micro-batch order): every
    tensor concatenated over the rows, so the same (B, ...) tensors as the encode stage made."""
    import torch

    from pipeline.families import Conditioning
    from pipeline.generate import Encoded

    parts: dict[str, dict[str, list]] = {"cond": {}, "uncond": {}}
    for row in rows:
        for cell in row["tensors"]:
            side, _, name = cell["key"].partition(".")
            parts[side].setdefault(name, []).append(cell_tensor(cell, device))

    def cat(d: dict[str, list]) -> dict[str, torch.Tensor | None]:
        return {k: None if v[0] is None else torch.cat(v) for k, v in d.items()}

    metas = [json.loads(row["meta"]) for row in rows]
    uncond = cat(parts["uncond"]) if metas[0]["guided"] else None
    return Encoded(Conditioning(cat(parts["cond"]), uncond), [m["warning"] for m in metas])


def denoised_rows(results: list[SampleResult], latents: list[tuple[torch.Tensor, ...]] | None) -> list[dict]:
    """Denoiser stage rows: per result its latents ("latents.0", "latents.1" for LTX-2's
    video and audio; none for an error) and everything of the result but the image."""
    rows = []
    for i, r in enumerate(results):
        tensors = [] if latents is None or r.error else [tensor_cell(f"latents.{j}", t) for j, t in enumerate(latents[i])]
        meta = {"warning": r.warning, "error": r.error, "steps": [asdict(s) for s in r.steps],
                "invalidations": r.invalidations, "gate_step": r.gate_step,
                "branch_gates": r.branch_gates, "denoise_s": r.denoise_s,
                "forward_batch": r.forward_batch}  # fmt: skip
        rows.append({"sample_id": r.request.sample_id, "tensors": tensors, "meta": json.dumps(meta)})
    return rows


def result_from_row(request: SampleRequest, row: dict, device: torch.device) -> tuple[SampleResult, tuple]:
    """The denoise result (no image) and latents ((1, ...) tensors on ``device``) of one
    denoiser stage row; inverse of denoised_rows."""
    from pipeline.samples import SampleResult, StepRecord

    meta = json.loads(row["meta"])
    steps = [
        StepRecord(**{**s, "branches": tuple(map(tuple, s["branches"])), "unconds": tuple(s["unconds"]),
                      "sample_states": tuple((n, tuple(st)) for n, st in s["sample_states"]),
                      "branch_states": tuple(map(tuple, s["branch_states"]))})
        for s in meta["steps"]
    ]  # fmt: skip
    result = SampleResult(request, error=meta["error"], warning=meta["warning"], steps=steps,
                          invalidations=meta["invalidations"], gate_step=meta["gate_step"],
                          branch_gates=tuple(map(tuple, meta["branch_gates"])), denoise_s=meta["denoise_s"],
                          forward_batch=meta.get("forward_batch"))  # fmt: skip
    cells = sorted(row["tensors"], key=lambda c: int(c["key"].rpartition(".")[2]))
    return result, tuple(cell_tensor(c, device) for c in cells)


class StageFiles:
    """The stage files and done markers of one job's output directory."""

    def __init__(self, out: OutputDir) -> None:
        self.root = out.root / "stages"

    def path(self, role: str, shard: Shard) -> Path:
        return self.root / role / f"{shard.name}.parquet"

    def done(self, role: str, shard: Shard) -> Path:
        return self.root / role / "done" / f"{shard.name}.json"

    def is_done(self, role: str, shard: Shard) -> bool:
        return self.done(role, shard).exists()

    def write(self, role: str, shard: Shard, rows: list[dict], info: dict[str, Any]) -> None:
        """The shard's stage file of ``role``, then its done marker (last)."""
        write_parquet(self.path(role, shard), pa.Table.from_pylist(rows, schema=STAGE_SCHEMA))
        write_json(self.done(role, shard), {"shard": shard.index, "samples": len(rows), **info})

    def read(self, role: str, shard: Shard) -> dict[str, dict]:
        """The shard's rows of ``role`` by sample_id."""
        table = pq.read_table(self.path(role, shard))
        return {row["sample_id"]: row for row in table.to_pylist()}

    def remove(self, shard: Shard) -> None:
        """Drop a committed shard's stage files (done markers first: no role starts from a
        marker whose file is gone)."""
        for role in STAGE_ROLES:
            self.done(role, shard).unlink(missing_ok=True)
            self.path(role, shard).unlink(missing_ok=True)
        for d in [*(self.root / r / "done" for r in STAGE_ROLES), *(self.root / r for r in STAGE_ROLES), self.root]:
            with contextlib.suppress(OSError):  # not empty (other shards), or gone
                d.rmdir()

    def clear(self) -> None:
        """Remove every stage file (--overwrite)."""
        shutil.rmtree(self.root, ignore_errors=True)
