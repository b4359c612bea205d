"""Checkpoint files: the schema, the names, and one file's bytes.

Never imports Beam.  Part of :mod:`pipeline.checkpoint`.

Layout
------
Under a plan directory (local path or ``gs://...``)::

    <plan>/checkpoints/<group_id>/part-<epoch:08d>-<uuid hex>.parquet   parts
    <plan>/checkpoints/<group_id>/compacted.parquet                    compacted

A group is one (source, target, hash bucket) work group of the plan
(:func:`pipeline.names.group_id`).  Directories are created 0700 and files
0600: checkpoints hold key values.

Records
-------
One row per transition, in :data:`CHECKPOINT_SCHEMA`: ``key`` (canonical
bytes), ``key_hash`` (xxh3-64 of the key), ``state`` (the
:class:`~pipeline.states.State` rank), ``attempts`` (copy attempts so far,
re-copies after a verify mismatch included), ``reason``, ``content_hash``
(xxh3-128 of what the copy wrote), ``source_version`` (source record version
read at copy), ``verify_method`` (:data:`pipeline.states.VERIFY_METHODS`:
full | hash | sampled | forced | unchecked | already_swapped), ``epoch``
(the run epoch = lease epoch, higher on every run) and ``time_ms`` (wall
clock).  Each file's Parquet key-value metadata holds ``format_version``,
``plan_id``, ``group_id``, ``epoch``, ``kind`` (part | compacted), for
parts ``state_counts`` (JSON: rows per state rank; progress reads it from the
footer) and any free-form extras of the writer (e.g. ``{"active_copy": "12"}``); it is
readable from the footer without reading rows (:func:`read_file_metadata`).
Data pages carry CRC checksums, verified on read.
"""
from __future__ import annotations

import re
import uuid
from typing import Any, Mapping, NamedTuple

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import fs
from pipeline import workdir
from pipeline.errors import BadInput
from pipeline.states import State

__all__ = [
    "CHECKPOINT_SCHEMA",
    "FORMAT_VERSION",
    "COMPACTED_NAME",
    "CheckpointError",
    "UnreadablePart",
    "SkippedFile",
    "checkpoints_dir",
    "group_dir",
    "part_name",
    "list_groups",
    "serialize_table",
    "parse_part",
    "read_file_metadata",
]

FORMAT_VERSION = 1

CHECKPOINT_SCHEMA = pa.schema([
    pa.field("key", pa.binary(), nullable=False),
    pa.field("key_hash", pa.uint64(), nullable=False),
    pa.field("state", pa.int8(), nullable=False),
    pa.field("attempts", pa.int32(), nullable=False),
    pa.field("reason", pa.string()),
    pa.field("content_hash", pa.binary(16)),
    pa.field("source_version", pa.int64()),
    pa.field("verify_method", pa.string()),
    pa.field("epoch", pa.int64(), nullable=False),
    pa.field("time_ms", pa.int64(), nullable=False),
])

#: Columns a buffer holds before the epoch is stamped on at flush.
_BUFFER_SCHEMA = pa.schema([f for f in CHECKPOINT_SCHEMA if f.name != "epoch"])
_NOT_NULL = tuple(f.name for f in CHECKPOINT_SCHEMA if not f.nullable)

COMPACTED_NAME = "compacted.parquet"
_PART_RE = re.compile(r"\Apart-(\d{8,})-([0-9a-f]{32})\.parquet\Z")
_GROUP_RE = re.compile(r"\A[A-Za-z0-9_%~\-]+\Z")

# metadata keys written by this package; writer extras may not use them
_RESERVED = frozenset({
    "format_version", "plan_id", "group_id", "epoch", "kind", "compaction_id",
    "folded_parts", "ARROW:schema", "state_counts",
})


class CheckpointError(BadInput):
    """A checkpoint file that is not this plan's / group's, or unreadable on request (exit 2)."""


class UnreadablePart(CheckpointError):
    """A checkpoint file that cannot be read as data (``reason`` says why)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class SkippedFile(NamedTuple):
    name: str     # file name only
    reason: str   # empty | truncated | not a Parquet file | bad footer | ...


# ------------------------------------------------------------------- paths

def checkpoints_dir(plan_dir: str) -> str:
    return workdir.checkpoints_dir(plan_dir)


def group_dir(plan_dir: str, group_id: str) -> str:
    _check_group_id(group_id)
    return fs.join(workdir.checkpoints_dir(plan_dir), group_id)


def part_name(epoch: int) -> str:
    """A fresh, unique part file name for ``epoch``."""
    return f"part-{int(epoch):08d}-{uuid.uuid4().hex}.parquet"


def _check_group_id(group_id: str) -> None:
    if not isinstance(group_id, str) or not _GROUP_RE.match(group_id):
        raise ValueError("group_id must be a file-name-safe id from pipeline.names.group_id")


def list_groups(plan_dir: str) -> list[str]:
    """Group ids that have a checkpoint directory, sorted."""
    out = []
    for name in fs.listdir(checkpoints_dir(plan_dir)):
        name = name.rstrip("/")
        if _GROUP_RE.match(name) and "~" in name:
            out.append(name)
    return sorted(set(out))


# -------------------------------------------------------------- file format

def _conform(table: pa.Table) -> pa.Table:
    """``table`` in exactly :data:`CHECKPOINT_SCHEMA` (column order, types), no metadata."""
    if table.schema.names != CHECKPOINT_SCHEMA.names:
        raise ValueError(f"checkpoint table columns must be {CHECKPOINT_SCHEMA.names}")
    if not table.schema.remove_metadata().equals(CHECKPOINT_SCHEMA):
        table = table.cast(CHECKPOINT_SCHEMA)
    return table.replace_schema_metadata(None)


def serialize_table(table: pa.Table, metadata: Mapping[str, Any]) -> bytes:
    """Parquet bytes of a checkpoint table with ``metadata`` as file key-value metadata.

    zstd-compressed, one row group per 1M rows, strings dictionary-encoded,
    CRC checksums on every data page.
    """
    table = _conform(table)
    md = {str(k): str(v) for k, v in metadata.items()}
    table = table.replace_schema_metadata(md)
    sink = pa.BufferOutputStream()
    pq.write_table(
        table, sink,
        compression="zstd",
        use_dictionary=["reason", "verify_method"],
        write_statistics=["key_hash", "state", "attempts", "epoch", "time_ms"],
        write_page_checksum=True,
        row_group_size=1 << 20,
    )
    return sink.getvalue().to_pybytes()


def _decode_metadata(raw: Mapping[bytes, bytes] | None) -> dict[str, str]:
    if not raw:
        return {}
    out = {}
    for k, v in raw.items():
        k = k.decode("utf-8", "replace")
        if k == "ARROW:schema":
            continue
        out[k] = v.decode("utf-8", "replace")
    return out


def _open_parquet(data: bytes) -> pq.ParquetFile:
    if len(data) == 0:
        raise UnreadablePart("empty")
    if data[:4] != b"PAR1":
        raise UnreadablePart("not a Parquet file")
    if len(data) < 12 or data[-4:] != b"PAR1":
        raise UnreadablePart("truncated")
    try:
        return pq.ParquetFile(pa.BufferReader(data), page_checksum_verification=True)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise UnreadablePart("bad footer") from e


def parse_part(data: bytes) -> tuple[pa.Table, dict[str, str]]:
    """Read a checkpoint file's bytes: ``(table, metadata)``.

    Raises :class:`UnreadablePart` when the bytes are not a whole, valid
    checkpoint file (nothing of it is returned as data).  Does not check
    whose file it is: see :func:`read_group`.
    """
    pf = _open_parquet(data)
    metadata = _decode_metadata(pf.metadata.metadata)
    if not pf.schema_arrow.remove_metadata().equals(CHECKPOINT_SCHEMA):
        raise UnreadablePart("schema mismatch")
    try:
        table = pf.read(use_threads=False)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise UnreadablePart("unreadable data") from e
    for name in _NOT_NULL:
        if table.column(name).null_count:
            raise UnreadablePart("invalid values")
    if table.num_rows:
        smin, smax = pc.min_max(table.column("state")).values()
        if smin.as_py() < 0 or smax.as_py() > max(State) or pc.min(table.column("attempts")).as_py() < 0:
            raise UnreadablePart("invalid values")
    return table.replace_schema_metadata(None), metadata


def read_file_metadata(path: str) -> dict[str, str]:
    """A checkpoint file's key-value metadata, read from its footer only."""
    with fs.open_input(path) as f:
        try:
            md = pq.read_metadata(f)
        except (pa.ArrowException, OSError, ValueError) as e:
            raise UnreadablePart("bad footer") from e
    return _decode_metadata(md.metadata)


def _short(plan_id: str) -> str:
    return str(plan_id)[:12]


def _check_identity(label: str, meta: Mapping[str, str], plan_id: str, group_id: str) -> None:
    if "plan_id" not in meta or "format_version" not in meta:
        raise UnreadablePart("not a checkpoint file")
    try:
        version = int(meta["format_version"])
    except ValueError:
        raise UnreadablePart("not a checkpoint file") from None
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{label} has format_version {version}; this build reads format_version "
            f"{FORMAT_VERSION} or lower")
    if meta["plan_id"] != plan_id:
        raise CheckpointError(
            f"{label} belongs to plan {_short(meta['plan_id'])}, not {_short(plan_id)}")
    if meta.get("group_id") != group_id:
        raise CheckpointError(
            f"{label} belongs to group {meta.get('group_id')}, not {group_id}")
