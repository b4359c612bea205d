"""Per-key state transitions, checkpointed as Arrow Parquet files.

Never imports Beam: ``transforms/`` wraps the writer in a DoFn.

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

Writes are idempotent
---------------------
A flush never touches an existing file: it serialises the buffered rows to
Parquet in memory and commits them under a fresh unique part name with
create-if-absent (:func:`pipeline.fs.create_if_absent`: temp file + fsync +
link locally, generation precondition 0 on GCS).  A reader therefore sees a
part either whole or not at all.  Re-writing the same transitions (a retried
bundle) only adds rows that the merge collapses.

Merge rule
----------
Per key, the winning record is the maximum of all its records under the
total order on

    (epoch, attempts, state rank, time_ms, content_hash, reason,
     verify_method, source_version)

compared left to right; integers numerically, ``content_hash``/strings as
unsigned bytes, and a null below every value.  Records equal in all of these
(and in ``key``) are identical, so which copy is kept does not matter.
Because it is a maximum under a total order, the merged result does not
depend on how files are listed, read or concatenated, is idempotent
(merging a merged table with its inputs changes nothing) and associative
(merging the merge of some parts with the rest equals merging everything),
which is what makes compaction safe.  Within one epoch a key's transitions
are monotone in (attempts, rank): a re-copy (``verifying -> copying``,
``verified -> copying``) raises ``attempts``, so it outranks the records
before it, and repeated records of one state (retry loops) are ordered by
``time_ms``.  The one exception is a rolled-back swap (``swapping ->
verified``, same attempts): the merge keeps showing Swapping until the key
moves on, which is safe because a resumed Swapping key repeats the swap's
compare-and-set -- exactly what a Verified key does next.  A later epoch (a
rerun) supersedes everything earlier, which is how ``--retry-failed`` resets
Failed keys, and why a stale executor that lost its lease can never
overwrite a newer run's records.

The merged table has one row per key, sorted by (key_hash, key) -- the
order of moves within a group.

Damaged files
-------------
A truncated, empty or garbage file, a bad footer, a failed page checksum, a
schema other than :data:`CHECKPOINT_SCHEMA` or out-of-range values are
detected and the file is skipped (never read as data); it is reported by
file name in :attr:`GroupRead.skipped` and one warning line.  A file that
belongs to another plan or group, or was written by a newer format version,
raises :class:`CheckpointError` instead: that is a misconfiguration, not
damage.

Compaction
----------
:func:`compact_group` merges the parts it listed with the existing
``compacted.parquet`` into a new ``compacted.parquet`` committed by atomic
replace, then deletes exactly the parts it folded -- never a part that
appeared after the listing, nor an unreadable one.  It is crash-safe at every
point: before the replace the old state is intact; after the replace but
before (or during) the deletions the folded parts are still there and merge
idempotently with the new compacted file (the next compaction deletes them).
Readers read the parts first and ``compacted.parquet`` last, so a part that
vanishes mid-read (folded by a concurrent compaction) is found in the newer
compacted file.  Compaction is meant to be run by the holder of the plan
lease (one compactor per group at a time); as a second line of defence it
re-reads the compacted file's ``compaction_id`` before the replace and after
it, and raises :class:`pipeline.fs.CommitConflict` (deleting nothing) when
another compaction got in between.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import json
import re
import threading
import time
import uuid
from typing import Any, Callable, Iterable, Iterator, Mapping, NamedTuple, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import fs
from pipeline import keys as _keys
from pipeline import workdir
from pipeline.errors import BadInput, TransientError
from pipeline.states import VERIFY_METHODS, State, check_transitions

__all__ = [
    "CHECKPOINT_SCHEMA",
    "FORMAT_VERSION",
    "COMPACTED_NAME",
    "CheckpointError",
    "UnreadablePart",
    "Transitions",
    "CheckpointWriter",
    "WriterStats",
    "GroupRead",
    "SkippedFile",
    "CompactionResult",
    "checkpoints_dir",
    "group_dir",
    "part_name",
    "list_groups",
    "serialize_table",
    "parse_part",
    "read_file_metadata",
    "merge",
    "read_group",
    "iter_groups",
    "read_all",
    "compact_group",
    "compact_all",
    "state_counts",
    "failed_reasons",
    "done_verify_methods",
]

_log = logging.getLogger(__name__)

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

CHECKPOINTS = workdir.CHECKPOINTS
COMPACTED_NAME = "compacted.parquet"
_PART_RE = re.compile(r"\Apart-(\d{8,})-([0-9a-f]{32})\.parquet\Z")
_GROUP_RE = re.compile(r"\A[A-Za-z0-9_%~\-]+\Z")

# metadata keys written by this module; writer extras may not use them
_RESERVED = frozenset({
    "format_version", "plan_id", "group_id", "epoch", "kind", "compaction_id",
    "folded_parts", "ARROW:schema", "state_counts",
})

# Merge order (see the module docstring): most significant first, all
# compared descending, nulls lowest.
_ORDER = ("epoch", "attempts", "state", "time_ms", "content_hash", "reason",
          "verify_method", "source_version")
_NUMERIC_ORDER = ("epoch", "attempts", "state", "time_ms")


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


# ------------------------------------------------------------ transitions

def _as_binary_array(values) -> pa.Array:
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if isinstance(values, pa.Array):
        if not (pa.types.is_binary(values.type) or pa.types.is_large_binary(values.type)
                or pa.types.is_fixed_size_binary(values.type)):
            raise TypeError(f"keys must be a binary column (got {values.type})")
        return values.cast(pa.binary())
    return pa.array([bytes(v) for v in values], pa.binary())


def _column(values, n: int, typ: pa.DataType, name: str) -> pa.Array:
    """An array of ``n`` values of ``typ`` from an array-like or a scalar (broadcast)."""
    if values is None:
        return pa.nulls(n, typ)
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if isinstance(values, pa.Array):
        arr = values
    elif isinstance(values, np.ndarray):
        if pa.types.is_fixed_size_binary(typ) and values.ndim == 2:
            if values.shape[1] != typ.byte_width:
                raise ValueError(f"{name} must have {typ.byte_width} bytes per row")
            buf = np.ascontiguousarray(values, dtype=np.uint8).tobytes()
            arr = pa.FixedSizeBinaryArray.from_buffers(typ, len(values), [None, pa.py_buffer(buf)])
        else:
            arr = pa.array(values)
    elif isinstance(values, (str, bytes, int, np.integer)) or isinstance(values, State):
        if isinstance(values, bytes) and pa.types.is_fixed_size_binary(typ) and len(values) != typ.byte_width:
            raise ValueError(f"{name} must be {typ.byte_width} bytes")
        v = int(values) if isinstance(values, (int, np.integer)) else values
        return pa.array([v] * n, typ) if n else pa.array([], typ)
    else:
        arr = pa.array(list(values), typ)
    if len(arr) != n:
        raise ValueError(f"{name} has {len(arr)} values for {n} keys")
    if arr.type != typ:
        try:
            arr = arr.cast(typ)  # safe cast: overflow raises
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise ValueError(f"{name} cannot be stored as {typ}") from e
    return arr


class Transitions:
    """A columnar buffer of transitions, built row by row or batch by batch.

    ``time_ms`` is stamped from ``clock`` when a row is added (one stamp per
    :meth:`add_many` batch) unless given; the epoch is stamped by
    :meth:`to_table`.  Not thread-safe (:class:`CheckpointWriter` locks).
    """

    def __init__(self, clock: Callable[[], float] = time.time):
        self._clock = clock
        self._batches: list[pa.RecordBatch] = []
        self._batch_rows = 0
        self._rows: dict[str, list] = {f.name: [] for f in _BUFFER_SCHEMA}

    def __len__(self) -> int:
        return self._batch_rows + len(self._rows["key"])

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def add(self, key: bytes, key_hash: int | None, state: "State | int", attempts: int,
            reason: str | None = None, content_hash: bytes | None = None,
            source_version: int | None = None, verify_method: str | None = None,
            *, time_ms: int | None = None) -> None:
        """Buffer one transition.  ``key_hash=None`` computes it from ``key``."""
        if not isinstance(key, (bytes, bytearray, memoryview)):
            raise TypeError("key must be canonical bytes")
        key = bytes(key)
        if key_hash is None:
            key_hash = _keys.stable_hash(key)
        key_hash = int(key_hash)
        if not 0 <= key_hash < 1 << 64:
            raise ValueError("key_hash must be an unsigned 64-bit integer")
        state = State.parse(int(state) if isinstance(state, (int, np.integer)) else state)
        attempts = int(attempts)
        if not 0 <= attempts < 1 << 31:
            raise ValueError(f"attempts must be a non-negative int32 (got {attempts})")
        if content_hash is not None:
            content_hash = bytes(content_hash)
            if len(content_hash) != 16:
                raise ValueError(f"content_hash must be 16 bytes (got {len(content_hash)})")
        if verify_method is not None and verify_method not in VERIFY_METHODS:
            raise ValueError(f"verify_method must be one of {sorted(VERIFY_METHODS)} (got {verify_method!r})")
        r = self._rows
        r["key"].append(key)
        r["key_hash"].append(key_hash)
        r["state"].append(int(state))
        r["attempts"].append(attempts)
        r["reason"].append(None if reason is None else str(reason))
        r["content_hash"].append(content_hash)
        r["source_version"].append(None if source_version is None else int(source_version))
        r["verify_method"].append(verify_method)
        r["time_ms"].append(self._now_ms() if time_ms is None else int(time_ms))

    def add_many(self, keys, key_hashes=None, states=None, attempts=None, reasons=None,
                 content_hashes=None, source_versions=None, verify_methods=None,
                 *, time_ms=None) -> None:
        """Buffer a batch: each argument an array-like of len(keys) or a scalar.

        ``keys`` is a binary array (or a sequence of bytes); ``key_hashes``
        a uint64 array, or None to compute them; ``content_hashes`` a
        ``binary(16)`` array, a sequence of 16-byte values or an (n, 16)
        uint8 array.  ``states`` and ``attempts`` are required.
        """
        if states is None or attempts is None:
            raise TypeError("add_many needs states and attempts")
        key_arr = _as_binary_array(keys)
        n = len(key_arr)
        if n == 0:
            return
        if key_hashes is None:
            kh = pa.array(_keys.stable_hashes(key_arr.to_pylist(), n), pa.uint64())
        else:
            kh = _column(key_hashes, n, pa.uint64(), "key_hashes")
        st = _column(int(states) if isinstance(states, State) else states, n, pa.int8(), "states")
        at = _column(attempts, n, pa.int32(), "attempts")
        if st.null_count or at.null_count or kh.null_count or key_arr.null_count:
            raise ValueError("keys, key_hashes, states and attempts may not be null")
        smin, smax = pc.min_max(st).values()
        if smin.as_py() < 0 or smax.as_py() > max(State):
            raise ValueError(f"states must be ranks 0..{int(max(State))}")
        if pc.min(at).as_py() < 0:
            raise ValueError("attempts must be non-negative")
        vm = _column(verify_methods, n, pa.string(), "verify_methods")
        if vm.null_count < n:
            bad = pc.invert(pc.is_in(vm.drop_null(), value_set=pa.array(sorted(VERIFY_METHODS))))
            if pc.any(bad).as_py():
                raise ValueError(f"verify_methods must be among {sorted(VERIFY_METHODS)}")
        tm = _column(self._now_ms() if time_ms is None else time_ms, n, pa.int64(), "time_ms")
        if tm.null_count:
            raise ValueError("time_ms may not be null")
        batch = pa.RecordBatch.from_arrays([
            key_arr, kh, st, at,
            _column(reasons, n, pa.string(), "reasons"),
            _column(content_hashes, n, pa.binary(16), "content_hashes"),
            _column(source_versions, n, pa.int64(), "source_versions"),
            vm, tm,
        ], schema=_BUFFER_SCHEMA)
        self._seal()  # keep call order
        self._batches.append(batch)
        self._batch_rows += n

    def add_table(self, table: "pa.Table | pa.RecordBatch") -> None:
        """Buffer rows given as a table with (a subset of) the checkpoint columns.

        ``key``, ``state`` and ``attempts`` are required; missing nullable
        columns are null, a missing ``key_hash`` is computed, a missing
        ``time_ms`` is stamped now.  An ``epoch`` column is ignored here (the
        epoch is stamped by :meth:`to_table`).
        """
        names = set(table.schema.names)
        for required in ("key", "state", "attempts"):
            if required not in names:
                raise ValueError(f"transition table lacks column {required!r}")
        unknown = names - set(CHECKPOINT_SCHEMA.names)
        if unknown:
            raise ValueError(f"transition table has unknown columns {sorted(unknown)}")
        col = lambda name: table.column(name) if name in names else None  # noqa: E731
        self.add_many(col("key"), col("key_hash"), col("state"), col("attempts"),
                      col("reason"), col("content_hash"), col("source_version"),
                      col("verify_method"), time_ms=col("time_ms"))

    def _seal(self) -> None:
        r = self._rows
        if not r["key"]:
            return
        batch = pa.RecordBatch.from_arrays(
            [pa.array(r[f.name], f.type) for f in _BUFFER_SCHEMA], schema=_BUFFER_SCHEMA)
        self._batches.append(batch)
        self._batch_rows += batch.num_rows
        for v in r.values():
            v.clear()

    def to_table(self, epoch: int) -> pa.Table:
        """The buffered transitions in :data:`CHECKPOINT_SCHEMA`, stamped with ``epoch``."""
        self._seal()
        n = self._batch_rows
        body = pa.Table.from_batches(self._batches, schema=_BUFFER_SCHEMA)
        epochs = pa.array(np.full(n, int(epoch), dtype=np.int64), pa.int64())
        cols = [epochs if f.name == "epoch" else body.column(f.name) for f in CHECKPOINT_SCHEMA]
        return pa.Table.from_arrays(cols, schema=CHECKPOINT_SCHEMA)

    def clear(self) -> None:
        self._batches = []
        self._batch_rows = 0
        for v in self._rows.values():
            v.clear()


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


# ------------------------------------------------------------------- merge

def _sort_indices(table: pa.Table, keys: Sequence[tuple[str, str]]) -> pa.Array:
    try:
        return pc.sort_indices(table, sort_keys=[(k, o, "at_end") for k, o in keys])
    except (TypeError, ValueError, pa.ArrowInvalid):  # pyarrow without per-key null placement
        return pc.sort_indices(table, sort_keys=list(keys), null_placement="at_end")


_REFERENCE_KEYS = [("key_hash", "ascending"), ("key", "ascending")] + [(c, "descending") for c in _ORDER]


def _first_per_key(kh_sorted: np.ndarray, keys_sorted: pa.Array) -> np.ndarray:
    """Boolean mask of the rows that start a new (key_hash, key) run."""
    n = len(kh_sorted)
    first = np.ones(n, dtype=bool)
    if n > 1:
        same_hash = kh_sorted[1:] == kh_sorted[:-1]
        same_key = pc.equal(keys_sorted.slice(1), keys_sorted.slice(0, n - 1))
        first[1:] = ~(same_hash & same_key.to_numpy(zero_copy_only=False))
    return first


def _reference_winners(table: pa.Table) -> np.ndarray:
    """Winner row indices, in (key_hash, key) order, by one full comparison sort."""
    if table.num_rows == 0:
        return np.empty(0, dtype=np.int64)
    order = _sort_indices(table, _REFERENCE_KEYS).to_numpy()
    kh = table.column("key_hash").to_numpy()[order]
    ks = table.column("key").take(order)
    if isinstance(ks, pa.ChunkedArray):
        ks = ks.combine_chunks()
    return order[_first_per_key(kh, ks)]


def _winners(table: pa.Table) -> np.ndarray:
    """Winner row indices, in (key_hash, key) order (fast path of :func:`merge`).

    Sorts only the uint64 key hashes, narrows each run of equal hashes to
    its maximum on the numeric order columns with segment reductions, and
    sends only the groups still tied after that (identical or near-identical
    duplicates) through the full comparison sort.  Distinct keys sharing a
    hash (a 64-bit collision) make the whole table take the full sort.
    """
    n = table.num_rows
    if n == 0:
        return np.empty(0, dtype=np.int64)
    kh = table.column("key_hash").to_numpy()
    order = np.argsort(kh)  # ties are reduced per group below, so stability is moot
    kh_s = kh[order]
    new_hash = np.ones(n, dtype=bool)
    new_hash[1:] = kh_s[1:] != kh_s[:-1]
    if not new_hash.all():
        ks = table.column("key").take(order)
        if isinstance(ks, pa.ChunkedArray):
            ks = ks.combine_chunks()
        if not np.array_equal(_first_per_key(kh_s, ks), new_hash):
            return _reference_winners(table)  # a hash collision between distinct keys
    else:
        return order  # every key has exactly one record

    starts = np.flatnonzero(new_hash)
    gid = np.cumsum(new_hash) - 1
    cand = np.ones(n, dtype=bool)
    floor = np.iinfo(np.int64).min
    for name in _NUMERIC_ORDER:
        v = table.column(name).to_numpy().astype(np.int64, copy=False)[order]
        v = np.where(cand, v, floor)
        cand &= v == np.maximum.reduceat(v, starts)[gid]
    pos = np.flatnonzero(cand)
    first = np.ones(len(pos), dtype=bool)
    first[1:] = gid[pos[1:]] != gid[pos[:-1]]
    winner_pos = pos[first]                      # one per group, in group order
    per_group = np.add.reduceat(cand.astype(np.int64), starts)
    tied = np.flatnonzero(per_group > 1)
    if len(tied):
        # rows still in the running in tied groups: decide by the full order
        in_tied = np.zeros(len(starts), dtype=bool)
        in_tied[tied] = True
        sub_pos = pos[in_tied[gid[pos]]]
        sub_rows = order[sub_pos]
        sub_win = _reference_winners(table.take(sub_rows))   # (key_hash, key) order == group order
        winner_pos[tied] = sub_pos[sub_win]
    return order[winner_pos]


def merge(tables: Iterable[pa.Table]) -> pa.Table:
    """One row per key: the winner under the merge rule, sorted by (key_hash, key)."""
    tables = [_conform(t) for t in tables]
    if not tables:
        return CHECKPOINT_SCHEMA.empty_table()
    table = pa.concat_tables(tables).combine_chunks() if len(tables) > 1 else tables[0]
    return table.take(_winners(table))


def _merge_reference(tables: Iterable[pa.Table]) -> pa.Table:
    """:func:`merge` by one full comparison sort (for tests)."""
    tables = [_conform(t) for t in tables]
    if not tables:
        return CHECKPOINT_SCHEMA.empty_table()
    table = pa.concat_tables(tables).combine_chunks()
    return table.take(_reference_winners(table))


# -------------------------------------------------------------------- read

@dataclasses.dataclass(frozen=True)
class GroupRead:
    """The merged state of one group and what was read to get it."""

    group_id: str
    table: pa.Table                      # one row per key (the winner), sorted by (key_hash, key)
    files: tuple[str, ...]               # file names merged (parts, then compacted.parquet)
    skipped: tuple[SkippedFile, ...]     # unreadable files, not merged
    rows_read: int                       # transition rows read before merging
    metadata: Mapping[str, Mapping[str, str]]  # file name -> key-value metadata (extras)


@dataclasses.dataclass
class _Listing:
    parts: list[str]
    has_compacted: bool
    foreign: list[str]


def _list(gdir: str) -> _Listing:
    parts, foreign, has_compacted = [], [], False
    for name in fs.listdir(gdir):
        name = name.rstrip("/")
        if name == COMPACTED_NAME:
            has_compacted = True
        elif _PART_RE.match(name):
            parts.append(name)
        elif name.startswith(".tmp-"):
            continue  # an uncommitted write (in flight, or left by a crash)
        else:
            foreign.append(name)
    return _Listing(sorted(parts), has_compacted, sorted(foreign))


_VANISHED = object()


def _load(gdir: str, name: str, plan_id: str, group_id: str):
    """(table, metadata) | SkippedFile | _VANISHED.  Raises CheckpointError for foreign files."""
    try:
        data = fs.read_bytes(fs.join(gdir, name))
    except FileNotFoundError:
        return _VANISHED
    try:
        table, meta = parse_part(data)
        kind = "checkpoint file" if name == COMPACTED_NAME else "checkpoint part"
        _check_identity(f"{kind} {group_id}/{name}", meta, plan_id, group_id)
    except UnreadablePart as e:
        return SkippedFile(name, e.reason)
    return table, meta


def _load_group(gdir: str, plan_id: str, group_id: str, max_workers: int,
                listing: _Listing | None = None):
    """Read every part, then compacted.parquet (see "Compaction" for why in that order)."""
    listing = _list(gdir) if listing is None else listing
    loaded: dict[str, tuple[pa.Table, dict]] = {}
    skipped = [SkippedFile(n, "unexpected file name") for n in listing.foreign]
    vanished = []

    def collect(name, result):
        if result is _VANISHED:
            vanished.append(name)
        elif isinstance(result, SkippedFile):
            skipped.append(result)
        else:
            loaded[name] = result

    if len(listing.parts) > 1 and max_workers > 1:
        with concurrent.futures.ThreadPoolExecutor(max_workers=max_workers) as pool:
            results = list(pool.map(lambda n: _load(gdir, n, plan_id, group_id), listing.parts))
        for name, result in zip(listing.parts, results):
            collect(name, result)
    else:
        for name in listing.parts:
            collect(name, _load(gdir, name, plan_id, group_id))
    compacted = None
    if listing.has_compacted or vanished:
        result = _load(gdir, COMPACTED_NAME, plan_id, group_id)
        if isinstance(result, SkippedFile):
            skipped.append(result)
            compacted = result
        elif result is not _VANISHED:
            compacted = result
    return listing, loaded, compacted, sorted(skipped)


def _warn_skipped(group_id: str, skipped: Sequence[SkippedFile]) -> None:
    if skipped:
        _log.warning(
            "checkpoint group %s: skipped %d unreadable file(s): %s", group_id, len(skipped),
            ", ".join(f"{s.name} ({s.reason})" for s in skipped))


def read_group(plan_dir: str, plan_id: str, group_id: str, *, max_workers: int = 8) -> GroupRead:
    """Merge a group's parts and compacted file into one row per key.

    Unreadable files are skipped, named in ``GroupRead.skipped`` and in one
    warning line.  Raises :class:`CheckpointError` for a file of another
    plan or group or of a newer format.  A group without checkpoints gives
    an empty table.
    """
    gdir = group_dir(plan_dir, group_id)
    _listing, loaded, compacted, skipped = _load_group(gdir, plan_id, group_id, max_workers)
    tables, files, metadata = [], [], {}
    for name in sorted(loaded):
        table, meta = loaded[name]
        tables.append(table)
        files.append(name)
        metadata[name] = meta
    if isinstance(compacted, tuple):
        tables.append(compacted[0])
        files.append(COMPACTED_NAME)
        metadata[COMPACTED_NAME] = compacted[1]
    _warn_skipped(group_id, skipped)
    return GroupRead(
        group_id=group_id,
        table=merge(tables),
        files=tuple(files),
        skipped=tuple(skipped),
        rows_read=sum(t.num_rows for t in tables),
        metadata=metadata,
    )


def iter_groups(plan_dir: str, plan_id: str, *, max_workers: int = 8) -> Iterator[GroupRead]:
    """:func:`read_group` for every group with checkpoints, in group id order."""
    for gid in list_groups(plan_dir):
        yield read_group(plan_dir, plan_id, gid, max_workers=max_workers)


def read_all(plan_dir: str, plan_id: str) -> dict[str, pa.Table]:
    """group id -> merged table, for every group with checkpoints."""
    return {g.group_id: g.table for g in iter_groups(plan_dir, plan_id)}


# ------------------------------------------------------------------ writer

@dataclasses.dataclass
class WriterStats:
    parts: int = 0          # part files committed
    bytes: int = 0          # bytes committed
    rows: int = 0           # transitions committed
    last_part: str | None = None


class _BackgroundCommitFailed(Exception):
    def __init__(self, part, cause: BaseException):
        super().__init__("background checkpoint commit failed")
        self.part = part
        self.cause = cause


class CheckpointWriter:
    """Buffers one group's transitions and commits them as new part files.

    Flushes when the buffer holds ``flush_every`` transitions or
    ``flush_interval_s`` has passed since the last flush (checked by
    :meth:`maybe_flush`, which :meth:`record`/:meth:`record_table` call, and
    by :meth:`flush_if_due`, which a timer calls: the interval holds even when
    no further transition arrives), and always on :meth:`flush` (call it at
    bundle end).  Every flush writes one
    new part, committed atomically under a fresh unique name -- never an
    in-place overwrite -- so re-running a bundle only adds rows the merge
    collapses.  ``fence`` (optional) is called right before each commit and
    should raise if this executor lost its lease; ``extras_fn`` (optional)
    returns extra key-value metadata for each part.  Thread-safe.

    The state machine is enforced here: a record given ``prev`` (the states
    its keys leave) is refused with :class:`~pipeline.states.TransitionError`
    unless every transition is in :data:`pipeline.states.TRANSITIONS`, and a
    writer made with ``check_transitions=True`` (the executor's) refuses any
    record without ``prev``.  Nothing refused is buffered.

    If a commit fails, its bytes are kept and retried under the same name on
    the next flush (an object already present with the same content counts
    as committed).

    With a ``committer`` (an executor, e.g. one thread), the flushes that
    :meth:`maybe_flush` triggers serialize and commit in the background, so
    the caller goes on working while Parquet is encoded and fsynced; an
    explicit :meth:`flush` (bundle end, stop) waits for them all, retries any
    that failed and raises what still fails.  Parts only ever hold
    transitions that happened, so a background part lost to a crash costs a
    resume only redone idempotent work.
    """

    def __init__(self, plan_dir: str, plan_id: str, group_id: str, epoch: int,
                 flush_every: int = 1000, flush_interval_s: float = 2.0,
                 clock: Callable[[], float] = time.time,
                 extras_fn: Callable[[], Mapping[str, Any]] | None = None,
                 fence: Callable[[], None] | None = None,
                 committer: "concurrent.futures.Executor | None" = None,
                 check_transitions: bool = False):
        if not isinstance(plan_id, str) or not plan_id:
            raise ValueError("plan_id must be a non-empty string")
        _check_group_id(group_id)
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative integer (got {epoch!r})")
        if isinstance(flush_every, bool) or not isinstance(flush_every, int) or flush_every < 1:
            raise ValueError(
                f"checkpoint_flush_every_transitions must be a positive integer (got {flush_every!r})")
        if not isinstance(flush_interval_s, (int, float)) or flush_interval_s < 0:
            raise ValueError(
                f"checkpoint_flush_interval must be a non-negative number of seconds "
                f"(got {flush_interval_s!r})")
        self.plan_dir = plan_dir
        self.plan_id = plan_id
        self.group_id = group_id
        self.epoch = int(epoch)
        self.flush_every = flush_every
        self.flush_interval_s = float(flush_interval_s)
        self._clock = clock
        self._extras_fn = extras_fn
        self._fence = fence
        self._dir = group_dir(plan_dir, group_id)
        self._buffer = Transitions(clock)
        self._riders = 0  # buffered transitions that do not count toward flush_every
        self._pending: list[tuple[str, bytes, int]] = []  # parts whose commit failed
        self._committer = committer
        self._check_transitions = bool(check_transitions)
        self._inflight: list = []  # futures of background commits
        self._last_flush = clock()
        self._lock = threading.RLock()
        self._dirs_made = False
        self._stats = WriterStats()

    def __len__(self) -> int:
        return len(self._buffer)

    @property
    def stats(self) -> WriterStats:
        with self._lock:
            return dataclasses.replace(self._stats)

    def _check(self, prev, state, n: int) -> None:
        """The state machine guards what is written: with ``prev`` (the states the keys
        were in) every ``prev -> state`` must be allowed (:data:`pipeline.states.TRANSITIONS`);
        a writer made with ``check_transitions`` requires ``prev`` on every record."""
        if prev is None:
            if self._check_transitions:
                raise TypeError("this checkpoint writer checks transitions: pass prev (the states left)")
            return
        if isinstance(prev, (int, np.integer, State)):
            prev = [prev] * n
        elif len(prev) != n:
            raise ValueError(f"prev has {len(prev)} states for {n} transitions")
        check_transitions(prev, state if isinstance(state, (int, np.integer, State)) else State.parse(state))

    def record(self, key: bytes, key_hash: int | None, state: "State | int", attempts: int,
               reason: str | None = None, content_hash: bytes | None = None,
               source_version: int | None = None, verify_method: str | None = None,
               *, prev: "State | int | None" = None) -> str | None:
        """Buffer one transition (from ``prev``, checked: :meth:`_check`); returns the part
        name if this triggered a flush."""
        self._check(prev, state, 1)
        with self._lock:
            self._buffer.add(key, key_hash, state, attempts, reason, content_hash,
                             source_version, verify_method)
            return self.maybe_flush()

    def record_many(self, keys, key_hashes=None, states=None, attempts=None, reasons=None,
                    content_hashes=None, source_versions=None, verify_methods=None,
                    *, may_flush: bool = True, prev=None) -> str | None:
        """:meth:`Transitions.add_many`, then :meth:`maybe_flush` (unless ``may_flush`` is
        False: they ride along with the next flush and do not count toward ``flush_every``).

        ``prev``: the state each key leaves (a sequence, or one state for all); every
        ``prev -> states`` must be allowed, else :class:`~pipeline.states.TransitionError`
        and nothing is buffered.  ``states`` is then a single state."""
        if prev is not None or self._check_transitions:
            if not isinstance(states, (int, np.integer, State, str)):
                raise TypeError("checked transitions need one target state per call")
            self._check(prev, states, len(keys))
        with self._lock:
            self._buffer.add_many(keys, key_hashes, states, attempts, reasons,
                                  content_hashes, source_versions, verify_methods)
            if not may_flush:
                self._riders += len(keys)
                return None
            return self.maybe_flush()

    def record_table(self, table: "pa.Table | pa.RecordBatch") -> str | None:
        """Buffer a table of transitions (:meth:`Transitions.add_table`), then :meth:`maybe_flush`.

        An ``epoch`` column, if present, must equal this writer's epoch.
        """
        if "epoch" in table.schema.names and table.num_rows:
            lo, hi = pc.min_max(table.column("epoch")).values()
            if lo.as_py() != self.epoch or hi.as_py() != self.epoch:
                raise ValueError(f"transition table has epochs other than this writer's {self.epoch}")
            table = table.drop_columns(["epoch"]) if isinstance(table, pa.Table) else \
                pa.Table.from_batches([table]).drop_columns(["epoch"])
        if self._check_transitions:
            raise TypeError("this checkpoint writer checks transitions: use record_many with prev")
        with self._lock:
            self._buffer.add_table(table)
            return self.maybe_flush()

    def maybe_flush(self) -> str | None:
        """Flush if the buffer is full or the flush interval has elapsed (in the
        background when the writer has a ``committer``)."""
        with self._lock:
            n = len(self._buffer)
            if n - self._riders >= self.flush_every or (
                    (n or self._pending) and self._clock() - self._last_flush >= self.flush_interval_s):
                return self.flush(wait=self._committer is None)
            return None

    def flush_if_due(self) -> None:
        """The flush timer's entry (call it periodically from another thread): once
        ``flush_interval_s`` has passed since the last flush, commit whatever is buffered,
        in-progress markers included -- in the background with a ``committer``.  Without
        it, a group whose transitions came in one burst (a group smaller than a chunk)
        would be committed only at bundle end.  A commit that fails here is retried, and
        raised, by the next waiting flush."""
        with self._lock:
            if len(self._buffer) and self._clock() - self._last_flush >= self.flush_interval_s:
                self.flush(wait=self._committer is None)

    def flush(self, wait: bool = True) -> str | None:
        """Commit the buffer as one new part; the part name, or None if nothing was
        buffered.  ``wait=False`` (only with a ``committer``): hand the part to the
        committer and return None at once; the next waiting flush waits for it,
        retries it if it failed and raises what still fails."""
        with self._lock:
            written = None
            if wait:
                self._settle_background()
                written = self._retry_pending()
            if len(self._buffer):
                background = not wait and self._committer is not None
                if background:  # settle earlier commits first: if that raises, the buffer is kept
                    self._reap_background()
                    while len(self._inflight) >= self.MAX_IN_FLIGHT:
                        self._settle_one()
                    if len(self._pending) >= self.MAX_IN_FLIGHT:  # commits keep failing: retry now, raise
                        self._retry_pending()
                table = self._buffer.to_table(self.epoch)
                meta = self._metadata()
                self._buffer.clear()
                self._riders = 0
                if not background:
                    written = self._serialize_and_commit(table, meta)
                else:
                    self._inflight.append(self._committer.submit(self._serialize_and_commit, table, meta, True))
                    written = None
            self._last_flush = self._clock()
            return written

    #: parts handed to the committer and not yet settled (bounds memory and lag)
    MAX_IN_FLIGHT = 4

    def _serialize_and_commit(self, table: pa.Table, meta: dict, background: bool = False) -> str:
        # rows per state, so progress can be read from the footer alone
        ranks = np.bincount(table.column("state").to_numpy(zero_copy_only=False).astype(np.int64),
                            minlength=len(State))
        meta["state_counts"] = json.dumps({str(r): int(n) for r, n in enumerate(ranks) if n})
        part = (part_name(self.epoch), serialize_table(table, meta), table.num_rows)
        try:
            return self._commit(*part)
        except BaseException as e:
            if background:  # the waiting flush keeps it (no lock taken here: it may be held)
                raise _BackgroundCommitFailed(part, e) from e
            self._pending.append(part)  # retried under the same name by the next flush
            raise

    def _settle_one(self) -> None:
        fut = self._inflight.pop(0)
        try:
            fut.result()
        except _BackgroundCommitFailed as e:
            self._pending.append(e.part)  # retried under the same name by the next waiting flush
            if not isinstance(e.cause, TransientError):
                raise e.cause from None  # a lost lease, a foreign part...: the caller stops now

    def _retry_pending(self) -> str | None:
        """Commit the parts whose commit failed (same name, same bytes); raises what still
        fails.  Returns the last part name committed, if any."""
        written = None
        while self._pending:
            written = self._commit(*self._pending[0])
            self._pending.pop(0)
        return written

    def _reap_background(self) -> None:
        """Settle the background commits that have finished (never waits)."""
        while self._inflight and self._inflight[0].done():
            self._settle_one()

    def _settle_background(self) -> None:
        while self._inflight:
            self._settle_one()

    close = flush

    def __enter__(self) -> "CheckpointWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.flush()
            return
        try:  # the transitions recorded so far are facts: keep them, but never mask exc
            self.flush()
        except Exception:  # noqa: BLE001
            _log.warning("checkpoint group %s: final flush failed while handling %s",
                         self.group_id, exc_type.__name__)

    def _metadata(self) -> dict[str, str]:
        meta = {
            "format_version": str(FORMAT_VERSION),
            "plan_id": self.plan_id,
            "group_id": self.group_id,
            "epoch": str(self.epoch),
            "kind": "part",
        }
        if self._extras_fn is not None:
            for k, v in (self._extras_fn() or {}).items():
                k = str(k)
                if k in _RESERVED:
                    raise ValueError(f"checkpoint metadata extra {k!r} is a reserved name")
                meta[k] = str(v)
        return meta

    def _commit(self, name: str, data: bytes, rows: int) -> str:
        if not self._dirs_made:
            fs.makedirs(checkpoints_dir(self.plan_dir))
            fs.makedirs(self._dir)
            self._dirs_made = True
        if self._fence is not None:
            self._fence()
        fs.create_if_absent(fs.join(self._dir, name), data)
        s = self._stats
        s.parts += 1
        s.bytes += len(data)
        s.rows += rows
        s.last_part = name
        return name


# -------------------------------------------------------------- compaction

@dataclasses.dataclass(frozen=True)
class CompactionResult:
    group_id: str
    written: bool                        # a new compacted.parquet was committed
    parts_folded: int                    # parts merged into it
    parts_deleted: int                   # of those, deleted afterwards
    rows_in: int                         # transition rows read (parts + old compacted)
    keys_out: int                        # rows of the new compacted file
    bytes_written: int
    skipped: tuple[SkippedFile, ...]     # unreadable parts, left in place


def _compaction_id(path: str) -> str | None:
    """The ``compaction_id`` of the compacted file now at ``path`` (None if absent)."""
    try:
        return read_file_metadata(path).get("compaction_id", "")
    except FileNotFoundError:
        return None


def compact_group(plan_dir: str, plan_id: str, group_id: str, *,
                  fence: Callable[[], None] | None = None, min_parts: int = 1) -> CompactionResult:
    """Fold a group's parts into ``compacted.parquet``, then delete the folded parts.

    Crash-safe (see the module docstring): the new compacted file is
    committed by atomic replace before any part is deleted, and only the
    parts read from the initial listing are deleted.  Unreadable parts are
    left in place and reported.  Does nothing when fewer than ``min_parts``
    parts are listed.  Raises :class:`CheckpointError` if the existing
    compacted file is unreadable (it is never overwritten then) and
    :class:`pipeline.fs.CommitConflict` if another compaction of the group
    committed meanwhile.  ``fence`` is called before the replace and before
    the deletions.
    """
    return _compact(plan_dir, plan_id, group_id, fence=fence, min_parts=min_parts,
                    remove=fs.remove)


def _compact(plan_dir, plan_id, group_id, *, fence, min_parts, remove) -> CompactionResult:
    gdir = group_dir(plan_dir, group_id)
    listing = _list(gdir)
    nothing = CompactionResult(group_id, False, 0, 0, 0, 0, 0, ())
    if not listing.parts or len(listing.parts) < min_parts:
        return nothing
    _listing, loaded, compacted, skipped = _load_group(gdir, plan_id, group_id, max_workers=8,
                                                       listing=listing)
    skipped = tuple(s for s in skipped if s.name != COMPACTED_NAME)
    if isinstance(compacted, SkippedFile):
        raise CheckpointError(
            f"checkpoint file {group_id}/{COMPACTED_NAME} is unreadable ({compacted.reason}); "
            f"move it aside to compact this group again")
    _warn_skipped(group_id, skipped)
    folded = sorted(loaded)
    if not folded:
        return dataclasses.replace(nothing, skipped=skipped)
    tables = [loaded[n][0] for n in folded]
    old_token = None
    if compacted is not None:
        tables.append(compacted[0])
        old_token = compacted[1].get("compaction_id", "")
    rows_in = sum(t.num_rows for t in tables)
    table = merge(tables)
    token = uuid.uuid4().hex
    epoch = pc.max(table.column("epoch")).as_py() if table.num_rows else 0
    data = serialize_table(table, {
        "format_version": FORMAT_VERSION,
        "plan_id": plan_id,
        "group_id": group_id,
        "epoch": epoch,
        "kind": "compacted",
        "compaction_id": token,
        "folded_parts": len(folded),
    })
    cpath = fs.join(gdir, COMPACTED_NAME)
    if fence is not None:
        fence()
    if _compaction_id(cpath) != old_token:
        raise fs.CommitConflict(
            f"{group_id}/{COMPACTED_NAME} changed during compaction; nothing was replaced or deleted")
    fs.write_atomic(cpath, data)
    if _compaction_id(cpath) != token:
        raise fs.CommitConflict(
            f"{group_id}/{COMPACTED_NAME} was replaced by another compaction; no part was deleted")
    if fence is not None:
        fence()
    deleted = 0
    for name in folded:
        remove(fs.join(gdir, name))
        deleted += 1
    _log.info("checkpoint group %s: compacted %d part(s), %d rows into %d keys (%d bytes)",
              group_id, len(folded), rows_in, table.num_rows, len(data))
    return CompactionResult(group_id, True, len(folded), deleted, rows_in, table.num_rows,
                            len(data), skipped)


def compact_all(plan_dir: str, plan_id: str, *, fence: Callable[[], None] | None = None,
                min_parts: int = 1) -> list[CompactionResult]:
    """:func:`compact_group` for every group with checkpoints."""
    return [compact_group(plan_dir, plan_id, gid, fence=fence, min_parts=min_parts)
            for gid in list_groups(plan_dir)]


# ----------------------------------------------------------------- summaries

def _value_counts(arr) -> dict:
    out = {}
    for item in pc.value_counts(arr).to_pylist():
        out[item["values"]] = item["counts"]
    return out


def state_counts(table: pa.Table) -> dict[str, int]:
    """Rows of a merged table per state, by lowercase state name (every state present)."""
    counts = _value_counts(table.column("state")) if table.num_rows else {}
    return {str(s): int(counts.get(int(s), 0)) for s in State}


def failed_reasons(table: pa.Table) -> dict[str, int]:
    """Failed keys per reason code (a missing reason counts as ``"unspecified"``), sorted."""
    failed = table.filter(pc.equal(table.column("state"), int(State.FAILED)))
    counts = _value_counts(failed.column("reason")) if failed.num_rows else {}
    return {("unspecified" if k is None else k): int(v) for k, v in
            sorted(counts.items(), key=lambda kv: (kv[0] is not None, kv[0] or ""))}


def done_verify_methods(table: pa.Table) -> dict[str, int]:
    """Done keys per verification method (missing: ``"unspecified"``), sorted."""
    done = table.filter(pc.equal(table.column("state"), int(State.DONE)))
    counts = _value_counts(done.column("verify_method")) if done.num_rows else {}
    return {("unspecified" if k is None else k): int(v) for k, v in
            sorted(counts.items(), key=lambda kv: (kv[0] is not None, kv[0] or ""))}
