"""Snapshots: the current assignments exported at a version cutoff.

``take_snapshot`` reads the map store in ONE read transaction at a cutoff,
streams segments of ``segment_size`` rows into Parquet parts (bounded
memory), computes the order-independent digest on the way, and commits the
directory ``<work>/snapshots/<digest>/`` with ``snapshot.json`` written last.
A second snapshot of unchanged assignments lands in the same directory.

Parquet schema of a snapshot part: ``key: binary`` (canonical key bytes),
``shard_id: string``, ``version: int64``.  A user-supplied snapshot may
instead hold ``key`` as text (the key type's text form) or, for int64 keys,
as integers; ``version`` is optional there.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import fs
from pipeline import keys as K
from pipeline import plancore as core
from pipeline import workdir
from pipeline.errors import BadInput

__all__ = ["SnapshotInfo", "take_snapshot", "write_snapshot", "list_parts", "snapshot_parts", "read_snapshot_info",
           "SNAPSHOT_FORMAT_VERSION"]

SNAPSHOT_FORMAT_VERSION = 1
ROWS_PER_FILE = 1_000_000


@dataclass(frozen=True)
class SnapshotInfo:
    location: str  # directory or single file
    digest: str | None  # known for snapshots we took; None for user files
    rows: int
    cutoff: int | None
    rows_above_cutoff: int
    created: bool = True


class _Parts:
    """Snapshot parts being written into a staging directory: canonical batches in,
    Parquet parts of at most :data:`ROWS_PER_FILE` rows out, the content digest on the way."""

    def __init__(self, staging: str, segment_size: int):
        self.staging, self.segment_size = staging, segment_size
        self.lanes = (0, 0, 0)
        self.rows = 0
        self.files: list = []
        self._writer = self._sink = None
        self._in_file = 0

    def add(self, batch: pa.RecordBatch, hashes: np.ndarray | None = None) -> None:
        """``batch``: canonical rows (``SNAPSHOT_SCHEMA``); ``hashes``: their stable hashes, if known."""
        if batch.num_rows == 0:
            return
        batch = batch.cast(core.SNAPSHOT_SCHEMA) if batch.schema != core.SNAPSHOT_SCHEMA else batch
        if hashes is None:
            keys = batch.column(0)
            hashes = K.stable_hashes(keys.to_pylist(), len(keys))
        self.lanes = core._add_digest(self.lanes, core.digest_lanes(hashes, core._shard_hash_array(batch.column(1))))
        if self._writer is None:
            self._sink = pa.BufferOutputStream()
            self._writer = pq.ParquetWriter(self._sink, core.SNAPSHOT_SCHEMA, compression="zstd")
        self._writer.write_table(pa.Table.from_batches([batch]), row_group_size=self.segment_size)
        self.rows += batch.num_rows
        self._in_file += batch.num_rows
        if self._in_file >= ROWS_PER_FILE:
            self._flush()

    def _flush(self) -> None:
        if self._writer is not None:
            self.files.append(_commit_part(self.staging, len(self.files), self._writer, self._sink, self._in_file))
            self._writer = self._sink = None
            self._in_file = 0

    def commit(self, snaps: str, key_type, cutoff, above: int, **extra) -> SnapshotInfo:
        self._flush()
        digest = core.digest_hex(*self.lanes)
        meta = {
            "format_version": SNAPSHOT_FORMAT_VERSION,
            "digest": digest,
            "rows": self.rows,
            "cutoff": cutoff,
            "rows_above_cutoff": above,
            "key_type": K.KeyType(key_type).value,
            "files": self.files,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **extra,
        }
        fs.write_atomic(workdir.snapshot_meta_path(self.staging), json.dumps(meta, indent=1, sort_keys=True).encode())
        final = fs.join(snaps, digest)
        created = workdir.commit_staged(self.staging, final, workdir.SNAPSHOT_META)
        return SnapshotInfo(final, digest, self.rows, cutoff, above, created)


def take_snapshot(map_store, work_dir: str, segment_size: int, key_type: K.KeyType, log=None, *,
                  cutoff: int | None = None) -> SnapshotInfo:
    """Export the map store into ``<work>/snapshots/<digest>/``.

    ``cutoff``: export the rows with ``version <= cutoff`` instead of the
    store's current version; one above the current version is refused
    (BadInput, nothing written).  The cutoff reaches the digest -- and so the
    plan id -- only through the rows it selects: two cutoffs that select the
    same rows give the same snapshot directory (its ``snapshot.json`` keeps
    the first one's cutoff)."""
    snaps = workdir.snapshots_dir(work_dir)
    staging = workdir.new_staging(snaps)
    try:
        parts = _Parts(staging, segment_size)
        opened = map_store.snapshot(segment_size) if cutoff is None else map_store.snapshot(segment_size, cutoff=cutoff)
        with opened as snap:
            for batch in snap:
                parts.add(batch)
            invalid = getattr(snap, "invalid_keys", 0)
            cutoff = getattr(snap, "cutoff", None)
            above = getattr(snap, "rows_above_cutoff", 0)
        if invalid:
            raise BadInput(
                f"snapshot: {invalid} keys in the map store cannot be represented as key_type {K.KeyType(key_type).value}"
            )
        if not parts.rows:  # a wrong table, prefix or path, or a Redis map seeded without its clock
            raise BadInput("snapshot: the map store holds no rows to export" + (
                f" ({above} rows have a version above the cutoff {cutoff}; `shardmove validate` says more)"
                if above else " (is the map store's table, prefix or path the right one?)"))
        return parts.commit(snaps, key_type, cutoff, above)
    except BaseException:
        fs.rmtree(staging)
        raise


def _input_batches(rows, segment_size: int, key_type, what: str):
    """Record batches of at most ``segment_size`` rows (columns ``key``, ``shard_id`` and,
    if given, ``version``) from an Arrow table, a record batch reader, or an iterable of
    ``(key, shard_id)`` / ``(key, shard_id, version)`` tuples."""
    if isinstance(rows, (pa.Table, pa.RecordBatchReader, pa.RecordBatch)):
        schema = rows.schema
        if "key" not in schema.names or "shard_id" not in schema.names:
            raise BadInput(f"{what}: the table lacks the key and shard_id columns")
        why = _column_types_ok(schema, key_type)
        if why:
            raise BadInput(f"{what}: {why}")
        if isinstance(rows, pa.RecordBatch):
            rows = pa.Table.from_batches([rows])
        source = rows.to_batches() if isinstance(rows, pa.Table) else rows
        for batch in source:
            for off in range(0, batch.num_rows, segment_size):
                yield batch.slice(off, segment_size)
        return
    if isinstance(rows, (str, bytes)) or not hasattr(rows, "__iter__"):
        raise BadInput(f"{what}: expected a Parquet path, an Arrow table, a record batch reader or an iterable "
                       f"of (key, shard_id) pairs, got {type(rows).__name__}")
    chunk: list = []
    width = None
    for n, row in enumerate(rows):
        if not isinstance(row, (tuple, list)) or len(row) not in (2, 3) or (width is not None and len(row) != width):
            raise BadInput(f"{what}: row {n + 1} is not a (key, shard_id) or (key, shard_id, version) tuple")
        width = len(row)
        chunk.append(row)
        if len(chunk) >= segment_size:
            yield _tuples_batch(chunk, key_type, what)
            chunk = []
    if chunk:
        yield _tuples_batch(chunk, key_type, what)


def _tuples_batch(chunk: list, key_type, what: str = "snapshot") -> pa.RecordBatch:
    bad = 0
    keys = []
    for row in chunk:  # python values (str, int, bytes, uuid.UUID) to canonical bytes; invalid ones null
        try:
            keys.append(K.canonical_bytes(row[0], key_type))
        except (K.InvalidKeyError, ValueError, TypeError, AttributeError):
            keys.append(None)
            bad += 1
    not_text = sum(1 for r in chunk if not isinstance(r[1], str))
    if not_text:
        raise BadInput(f"{what}: {not_text} rows have a shard_id that is not text")
    cols = {"key": pa.array(keys, pa.binary()), "shard_id": pa.array([r[1] for r in chunk], pa.string())}
    if len(chunk[0]) == 3:
        not_int = sum(1 for r in chunk if isinstance(r[2], bool) or not isinstance(r[2], int)
                      or not -(1 << 63) <= r[2] < (1 << 63))
        if not_int:
            raise BadInput(f"{what}: {not_int} rows have a version that is not a 64-bit integer")
        cols["version"] = pa.array([r[2] for r in chunk], pa.int64())
    return pa.RecordBatch.from_pydict(cols)


def write_snapshot(rows, work_dir: str, segment_size: int, key_type: K.KeyType, *, what: str = "snapshot"
                   ) -> SnapshotInfo:
    """Stream in-memory assignments into ``<work>/snapshots/<digest>/`` (owner-only, as
    :func:`take_snapshot` writes one), ``segment_size`` rows at a time.

    ``rows``: an Arrow table, a record batch reader, or an iterable of ``(key, shard_id)``
    (or ``(key, shard_id, version)``) tuples; keys in any form the planner reads from a
    Parquet file (canonical bytes, text, or integers for int64 keys).  Rows the planner
    would refuse (invalid or over-long keys, a missing shard id) are refused here with the
    planner's own message (:func:`pipeline.plancore.input_error`), and nothing is written;
    the rest (duplicates, unknown shards) the planner checks on the snapshot exactly as it
    does on the equivalent Parquet file -- so the digest, and the plan id, are the same.
    """
    snaps = workdir.snapshots_dir(work_dir)
    staging = workdir.new_staging(snaps)
    try:
        parts = _Parts(staging, segment_size)
        stats = core.Stats()
        for batch in _input_batches(rows, segment_size, key_type, what):
            canon, shard_col, hashes = core.prepare_batch(batch, key_type, stats, None)
            version = (batch.column(batch.schema.get_field_index("version")).cast(pa.int64())
                       if "version" in batch.schema.names and len(canon) == batch.num_rows else None)
            if version is None:
                version = pa.nulls(len(canon), pa.int64())
            parts.add(pa.RecordBatch.from_arrays([canon, shard_col, version], schema=core.SNAPSHOT_SCHEMA), hashes)
        err = core.input_error(stats.invalid_keys, stats.oversize_keys, key_type, what=what)
        if err:
            raise BadInput(err)
        return parts.commit(snaps, key_type, None, 0, source="in-memory")
    except BaseException:
        fs.rmtree(staging)
        raise


def _commit_part(staging, part, writer, sink, rows):
    writer.close()
    data = sink.getvalue().to_pybytes()
    name = f"part-{part:05d}.parquet"
    fs.write_atomic(fs.join(staging, name), data)
    return {"name": name, "rows": rows}


def read_snapshot_info(location: str) -> dict | None:
    meta = workdir.snapshot_meta_path(location)
    if not fs.is_gcs(location) and not _isdir(location):
        return None
    if not fs.exists(meta):
        return None
    try:
        return json.loads(fs.read_bytes(meta))
    except ValueError as e:
        raise BadInput("snapshot.json is not valid JSON") from e


def _isdir(path):
    return os.path.isdir(path)


def _column_types_ok(schema: pa.Schema, key_type) -> str | None:
    """Why the key / shard_id columns cannot be read as ``key_type`` keys, or None."""
    def base(t):
        return t.value_type if pa.types.is_dictionary(t) else t

    k, s = base(schema.field("key").type), base(schema.field("shard_id").type)
    kt = K.KeyType(key_type) if key_type is not None else None
    key_ok = (pa.types.is_binary(k) or pa.types.is_large_binary(k) or pa.types.is_fixed_size_binary(k)
              or pa.types.is_string(k) or pa.types.is_large_string(k)
              or (pa.types.is_integer(k) and (kt is None or kt is K.KeyType.INT64)))
    if not key_ok:
        return f"column key of type {k} cannot hold {kt.value if kt else 'shardmove'} keys"
    if not (pa.types.is_string(s) or pa.types.is_large_string(s)):
        return f"column shard_id is of type {s}, expected string"
    return None


def list_parts(location: str, what: str = "snapshot", key_type=None) -> tuple[tuple[str, int], ...]:
    """(path, row group) units of a Parquet file or a directory of them.

    Reads only footers.  A corrupted or truncated file, or one whose key or
    shard_id column has a type that cannot hold keys / shard ids, is bad input
    (exit 2).
    """
    return snapshot_parts(location, what, key_type)[0]


def snapshot_parts(location: str, what: str = "snapshot", key_type=None) -> tuple[tuple[tuple[str, int], ...], int]:
    """``(units, rows)``: :func:`list_parts`'s units and the rows their footers count
    (read with the units: no further IO)."""
    if fs.is_gcs(location):
        files = [f for f in fs.walk_files(location) if f.endswith(".parquet")] or (
            [location] if location.endswith(".parquet") else [])
    elif _isdir(location):
        files = [f for f in fs.walk_files(location) if f.endswith(".parquet") and "/." not in f[len(location):]]
    elif fs.exists(location):
        files = [location]
    else:
        raise BadInput(f"{what}: no such file or directory: {location}")
    if not files:
        raise BadInput(f"{what}: no Parquet files in {location}")
    units = []
    rows = 0
    bad = 0
    for f in files:
        try:
            with fs.open_input(f) as fh:
                pf = pq.ParquetFile(fh)
                names = pf.schema_arrow.names
                if "key" not in names or "shard_id" not in names:
                    raise BadInput(f"{what}: {f.rsplit('/', 1)[-1]} lacks the key and shard_id columns")
                why = _column_types_ok(pf.schema_arrow, key_type)
                if why:
                    raise BadInput(f"{what}: {f.rsplit('/', 1)[-1]}: {why}")
                units.extend((f, i) for i in range(pf.num_row_groups))
                rows += pf.metadata.num_rows
        except BadInput:
            raise
        except (OSError, pa.ArrowException) as e:
            bad += 1
    if bad:
        raise BadInput(f"{what}: {bad} of {len(files)} Parquet files in {location} are corrupted or truncated")
    return tuple(units), rows
