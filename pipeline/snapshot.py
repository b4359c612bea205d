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

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import fs
from pipeline import keys as K
from pipeline import plancore as core
from pipeline import workdir
from pipeline.errors import BadInput

__all__ = ["SnapshotInfo", "take_snapshot", "list_parts", "read_snapshot_info", "SNAPSHOT_FORMAT_VERSION"]

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


def _parquet_bytes_writer():
    sink = pa.BufferOutputStream()
    return sink


def take_snapshot(map_store, work_dir: str, segment_size: int, key_type: K.KeyType, log=None) -> SnapshotInfo:
    """Export the map store into ``<work>/snapshots/<digest>/``."""
    snaps = workdir.snapshots_dir(work_dir)
    staging = workdir.new_staging(snaps)
    lanes = (0, 0, 0)
    rows = 0
    files = []
    try:
        with map_store.snapshot(segment_size) as snap:
            part = 0
            writer = sink = None
            in_file = 0
            for batch in snap:
                if batch.num_rows == 0:
                    continue
                batch = batch.cast(core.SNAPSHOT_SCHEMA) if batch.schema != core.SNAPSHOT_SCHEMA else batch
                keys = batch.column(0)
                hashes = K.stable_hashes(keys.to_pylist(), len(keys))
                lanes = core._add_digest(lanes, core.digest_lanes(hashes, core._shard_hash_array(batch.column(1))))
                if writer is None:
                    sink = pa.BufferOutputStream()
                    writer = pq.ParquetWriter(sink, core.SNAPSHOT_SCHEMA, compression="zstd")
                writer.write_table(pa.Table.from_batches([batch]), row_group_size=segment_size)
                rows += batch.num_rows
                in_file += batch.num_rows
                if in_file >= ROWS_PER_FILE:
                    files.append(_commit_part(staging, part, writer, sink, in_file))
                    part += 1
                    writer = None
                    in_file = 0
            if writer is not None:
                files.append(_commit_part(staging, part, writer, sink, in_file))
            invalid = getattr(snap, "invalid_keys", 0)
            cutoff = getattr(snap, "cutoff", None)
            above = getattr(snap, "rows_above_cutoff", 0)
        if invalid:
            raise BadInput(
                f"snapshot: {invalid} keys in the map store cannot be represented as key_type {K.KeyType(key_type).value}"
            )
        digest = core.digest_hex(*lanes)
        meta = {
            "format_version": SNAPSHOT_FORMAT_VERSION,
            "digest": digest,
            "rows": rows,
            "cutoff": cutoff,
            "rows_above_cutoff": above,
            "key_type": K.KeyType(key_type).value,
            "files": files,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        fs.write_atomic(workdir.snapshot_meta_path(staging), json.dumps(meta, indent=1, sort_keys=True).encode())
        final = fs.join(snaps, digest)
        created = workdir.commit_staged(staging, final, workdir.SNAPSHOT_META)
        return SnapshotInfo(final, digest, rows, cutoff, above, created)
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
        except BadInput:
            raise
        except (OSError, pa.ArrowException) as e:
            bad += 1
    if bad:
        raise BadInput(f"{what}: {bad} of {len(files)} Parquet files in {location} are corrupted or truncated")
    return tuple(units)
