"""The parquet manifest: schema checks, fingerprint, and reading one row range.

Columns: ``prompt`` (string, required); optional ``id``, ``negative_prompt``, ``seed``, the
per-row overrides ``guidance_scale``, ``num_inference_steps``, ``height``, ``width``,
``num_images``, ``cfg_gate_step``, and ``image``, the input image of image-conditioned models: a
path (relative to the manifest's directory, or absolute) or struct<bytes, path> as Hugging Face
``datasets`` stores an Image feature. Every column passes through to the samples parquet.

Known columns may be dictionary-encoded (pandas' ``category`` dtype) and text ones large_string:
``prompt``, ``negative_prompt`` and ``id`` are read as plain strings (an integer ``id`` as
integers), the other known columns as their dictionary's value type. Other columns keep their
type, dictionary-encoded ones included.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs.errors import JobError
from jobs.faults import with_path

_is_str: Callable[[pa.DataType], bool] = lambda t: pa.types.is_string(t) or pa.types.is_large_string(t)  # noqa: E731
_is_int: Callable[[pa.DataType], bool] = pa.types.is_integer
_is_num: Callable[[pa.DataType], bool] = lambda t: pa.types.is_integer(t) or pa.types.is_floating(t)  # noqa: E731


def _is_image(t: pa.DataType) -> bool:
    """A path string, or struct<bytes: binary, path: string> (either order; large types too)."""
    if _is_str(t):
        return True
    if not pa.types.is_struct(t) or {t.field(i).name for i in range(t.num_fields)} != {"bytes", "path"}:
        return False
    data, path = t.field("bytes").type, t.field("path").type
    return (pa.types.is_binary(data) or pa.types.is_large_binary(data)) and _is_str(path)


KNOWN_COLUMNS: dict[str, tuple[Callable[[pa.DataType], bool], str]] = {
    "prompt": (_is_str, "string"),
    "negative_prompt": (_is_str, "string"),
    "id": (lambda t: _is_str(t) or _is_int(t), "string or integer"),
    "seed": (_is_int, "integer"),
    "guidance_scale": (_is_num, "number"),
    "num_inference_steps": (_is_int, "integer"),
    "height": (_is_int, "integer"),
    "width": (_is_int, "integer"),
    "num_images": (_is_int, "integer"),
    "cfg_gate_step": (_is_num, "number in [0, 1]"),
    "true_cfg_scale": (_is_num, "number"),
    "image": (_is_image, "string (a path relative to the manifest) or struct<bytes: binary, path: string>"),
}

TEXT_COLUMNS = ("prompt", "negative_prompt", "id")
"""Known columns read as plain ``string`` (from large_string or a dictionary of strings)."""


def _read_type(name: str, t: pa.DataType) -> pa.DataType:
    """The type a known column is read as: its dictionary's value type, and for TEXT_COLUMNS
    string rather than large_string; other columns keep ``t``."""
    if name not in KNOWN_COLUMNS:
        return t
    if pa.types.is_dictionary(t):
        t = t.value_type
    if name in TEXT_COLUMNS and pa.types.is_large_string(t):
        t = pa.string()
    return t


def read_schema(schema: pa.Schema) -> pa.Schema:
    """The schema ``read_rows`` gives for a file's ``schema`` (see _read_type)."""
    fields = [f.with_type(_read_type(f.name, f.type)) for f in schema]
    return pa.schema(fields, metadata=schema.metadata)


def _as_read(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` (a file's rows) with its known columns cast to ``schema``'s types."""
    for i, f in enumerate(table.schema):
        want = schema.field(f.name).type
        if f.type != want:
            table = table.set_column(i, f.name, table.column(i).cast(want))
    return table


RESERVED_COLUMNS = (
    "sample_id", "row_index", "image_index", "status", "error", "warning", "fresh_uncond",
    "reused_uncond", "invalidations", "gate_step", "denoise_s", "forward_batch",
)  # fmt: skip
"""Output columns a manifest may not carry (they would be overwritten). ``image`` is an input
column, refused only for models whose output column it is (check_image_column)."""


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """An opened, schema-checked manifest. Holds no rows."""

    path: str
    num_rows: int
    schema: pa.Schema
    """The columns as read_rows gives them (known dictionary / large_string columns decoded)."""
    row_group_offsets: tuple[int, ...]
    """First row of each row group, then num_rows."""
    fingerprint: str
    """sha256 of the file's bytes (about 1 s per GB)."""


def _fingerprint(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def open_manifest(path: str | os.PathLike[str], *, check_ids: bool = True) -> Manifest:
    """Open a manifest and check its schema (reads the footer and the ``id`` column only).

    Args:
        path: the parquet file.
        check_ids: read the ``id`` column to reject duplicates (the launcher does; ranks skip it).

    Raises:
        JobError: missing file, a directory, not parquet or truncated, no rows, no ``prompt``
            column, a known column of the wrong type, a reserved column name, duplicate ``id``s.
    """
    p = Path(path)
    if not p.exists():
        raise JobError(f"manifest {p}: no such file")
    if p.is_dir():
        raise JobError(f"manifest {p}: is a directory, expected a .parquet file")
    try:
        pf = pq.ParquetFile(p)
    except (pa.ArrowInvalid, OSError) as exc:
        raise JobError(f"manifest {p}: not a readable parquet file ({exc})") from None
    file_schema = pf.schema_arrow
    schema = read_schema(file_schema)
    if "prompt" not in schema.names:
        raise JobError(
            f"manifest {p}: no 'prompt' column (columns: {', '.join(schema.names) or 'none'})"
        )
    for name, (ok, allowed) in KNOWN_COLUMNS.items():
        if name in schema.names and not ok(schema.field(name).type):
            raise JobError(
                f"manifest {p}: column '{name}' has type {file_schema.field(name).type}, "
                f"expected {allowed}"
            )
    for name in RESERVED_COLUMNS:
        if name in schema.names:
            raise JobError(f"manifest {p}: column '{name}' is reserved for the output; rename it")
    num_rows = pf.metadata.num_rows
    if num_rows == 0:
        raise JobError(f"manifest {p}: has no rows")
    offsets = [0]
    for i in range(pf.metadata.num_row_groups):
        offsets.append(offsets[-1] + pf.metadata.row_group(i).num_rows)
    if check_ids and "id" in schema.names:
        ids = _as_read(pf.read(columns=["id"]), schema).column("id")
        if ids.null_count:
            raise JobError(f"manifest {p}: column 'id' has {ids.null_count} null values")
        counts = pc.value_counts(ids)
        dup = counts.filter(pc.greater(counts.field("counts"), 1))
        if len(dup):
            example = dup[0]["values"].as_py()
            raise JobError(
                f"manifest {p}: column 'id' has {len(dup)} duplicated values (e.g. {example!r})"
            )
    return Manifest(
        path=str(p.resolve()),
        num_rows=num_rows,
        schema=schema,
        row_group_offsets=tuple(offsets),
        fingerprint=_fingerprint(p),
    )


def check_image_column(manifest: Manifest, *, model: str, image_input: bool, output_kind: str) -> str | None:
    """Check the manifest's ``image`` column against the model, once its family is known.

    Args:
        manifest: an opened manifest.
        model: the model as --model names it (for messages).
        image_input: the model is conditioned on an input image (Family.image_input).
        output_kind: "image" (the samples' output column is ``image``) or "video".
    Returns:
        A notice to print when the column passes through unused (a video model that takes no
        image), else None.
    Raises:
        JobError: the model needs an image and there is no ``image`` column; or the column
            would clash with the output ``image`` column of a model that takes no image.
    """
    has = "image" in manifest.schema.names
    if image_input and not has:
        raise JobError(f"manifest {manifest.path}: no 'image' column, but --model {model} generates from an "
                       "input image per row (a path relative to the manifest, or struct<bytes, path>)")  # fmt: skip
    if has and not image_input:
        if output_kind == "image":
            raise JobError(f"manifest {manifest.path}: column 'image' is the output column of --model {model}, "
                           "which takes no input image; rename it")  # fmt: skip
        return f"warning: --model {model} takes no input image: column 'image' only passes through"
    return None


STREAM_ROWS = 8192
"""Rows per batch when a shard's rows sit in a much larger row group (read_rows streams it)."""


def read_rows(
    manifest: Manifest, start: int, stop: int, columns: list[str] | None = None
) -> pa.Table:
    """Rows [start, stop) of the manifest, reading only the row groups that overlap them.

    Args:
        manifest: an opened manifest.
        start, stop: 0 <= start < stop <= num_rows.
        columns: columns to read; None = all.
    Returns:
        A table of stop - start rows, of the manifest's ``schema`` (known columns decoded).
    Raises:
        OSError: the file is gone or unreadable (with its path: see jobs.faults).
    """
    assert 0 <= start < stop <= manifest.num_rows, (start, stop, manifest.num_rows)
    offsets = manifest.row_group_offsets
    groups = [
        g for g in range(len(offsets) - 1) if offsets[g] < stop and offsets[g + 1] > start
    ]
    try:
        pf = pq.ParquetFile(manifest.path)
    except OSError as exc:  # gone (or unreadable) since the job started: jobs.faults says so
        raise with_path(exc, manifest.path) from None
    first = offsets[groups[0]]
    if offsets[groups[-1] + 1] - first <= max(2 * (stop - start), STREAM_ROWS):
        table = pf.read_row_groups(groups, columns=columns).slice(start - first, stop - start)
        return _as_read(table, manifest.schema)
    # Row groups much larger than the range: stream them in batches and keep the range only,
    # so that memory follows the range, not the row group (time still does).
    kept, row = [], first
    for batch in pf.iter_batches(batch_size=STREAM_ROWS, row_groups=groups, columns=columns):
        lo, hi = max(start, row), min(stop, row + batch.num_rows)
        if lo < hi:
            kept.append(batch.slice(lo - row, hi - lo))
        row += batch.num_rows
        if row >= stop:
            break
    table = pa.Table.from_batches(kept)
    return _as_read(table.replace_schema_metadata(pf.schema_arrow.metadata), manifest.schema)


def total_images(manifest: Manifest, start: int, stop: int, images_per_prompt: int) -> int:
    """Images that rows [start, stop) ask for (``num_images`` column, else images_per_prompt)."""
    if "num_images" not in manifest.schema.names:
        return (stop - start) * images_per_prompt
    col = read_rows(manifest, start, stop, ["num_images"]).column("num_images")
    return sum(images_per_prompt if v is None else max(1, v) for v in col.to_pylist())
