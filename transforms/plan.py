"""The segmented planner as Beam transforms.

Flow (read top to bottom in :func:`build_plan_graph`)::

    PlanChunks       chunk = consecutive (path, row group) units of the
                     snapshot, ~SPILL_ROWS rows; each is read in segments of
                     <= segment_size rows and planned with
                     :func:`pipeline.plancore.plan_batch`.  The chunk's outputs
                     (its sorted key hashes and its sorted moves) are written
                     to ONE spill file in ``<staging>/spill/``; only small
                     *pointers* (file, byte offset, length) travel through
                     Beam: per hash partition and per (source, target, bucket)
                     group, plus the chunk's merged statistics.
    DetectDuplicates hash pointers grouped by partition -> each partition's
                     hashes read back, sorted, adjacent equals = candidate
                     collisions, confirmed by key bytes in a second pass that
                     re-reads the snapshot only when candidates exist
    WriteMoveFiles   move pointers grouped by (source, target, bucket) -> one
                     sorted Parquet file per group, written by us
                     (deterministic bytes), never by a sharded sink
    Finalize         stats.json / files.json / duplicates.json in the staging
                     dir; the spill directory is removed

With an explicit target (``target.snapshot``), PlanChunks and DetectDuplicates
are replaced by::

    PrepareSides     (side, chunk) of the snapshot and of the target -> canonical
                     keys, shard ids and hashes, spilled as one file per chunk
                     with one Arrow stream per hash partition (by the top
                     bits: 2**bits partitions of about JOIN_PARTITION_ROWS
                     rows, at most 2**SPILL_PARTITION_BITS); pointers only
    JoinTarget       per hash partition: both sides read back and joined
                     (a key and its duplicates always share a partition, so
                     duplicates are counted exactly there); its moves are
                     spilled again by (source, target, bucket) and go to
                     WriteMoveFiles as pointers

Why spill files: the in-memory runner (FnApiRunner) holds every GroupByKey
input in memory, and pickles each element; shuffling the hashes and moves
themselves made the planner's memory grow with the keyspace (and pickling a
sliced Arrow table pickles its whole parent buffers).  Through spill files
the planner's memory is bounded by one chunk (``SPILL_ROWS`` rows) and one
hash partition (rows / ``2**SPILL_PARTITION_BITS``), whatever the runner.
Spill names are deterministic (chunk index, spill index), so a retried
bundle rewrites the same bytes; only pointers that Beam committed are read.

Bulk data travels as Arrow tables, never per-key elements.  The launcher
(``shardmove/planner.py``) validates the stats and commits the manifest.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Tuple

# Output types are declared on this module's transforms (mostly Any): without
# them Beam infers each DoFn's output type by walking its bytecode, which cost
# ~1 s per plan, whatever its size.

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.windowed_value import WindowedValue

from pipeline import fs
from pipeline import plancore as core
from pipeline import workdir
from pipeline.errors import BadInput
from pipeline.keys import KeyType
from pipeline.names import group_id
from transforms import bulkio
from transforms.coders import Uint64

__all__ = [
    "PlanGraphSpec",
    "PlanChunks",
    "DetectDuplicates",
    "WriteMoveFiles",
    "build_plan_graph",
    "write_moves_bytes",
    "SPILL_ROWS",
    "SPILL_PARTITION_BITS",
]

#: Fixed Parquet row-group size of move files (not segment_size: file bytes
#: must not depend on tuning options).
MOVES_ROW_GROUP = 65536
#: Rows of snapshot planned per chunk before its hashes and moves are
#: spilled (bounds the planner's memory, with segment_size).
SPILL_ROWS = 1 << 20

#: A chunk marks its planning progress at most this often (and once at its end).
_MARK_EVERY_S = 0.5
#: Hash partitions of the duplicate check: 2**bits, by the top bits of the
#: stable hash.  One partition's hashes are held at once.
SPILL_PARTITION_BITS = 8
#: Rows per side an explicit-target join partition aims at: the join partitions are
#: 2**bits, bits = log2(rows / JOIN_PARTITION_ROWS) rounded up, at most
#: SPILL_PARTITION_BITS -- few partitions for small plans (each costs a join and
#: a spill of its moves per group), enough for bounded memory on big ones.
JOIN_PARTITION_ROWS = 1 << 17
SPILL_DIR = "spill"


def join_partition_bits(units: tuple, segment_size: int) -> int:
    """Partition bits of an explicit-target join, from the snapshot's estimated rows
    (row groups of about ``segment_size`` rows).  A pure function of the inputs."""
    rows = len(units) * max(1, segment_size)
    bits = 0
    while bits < SPILL_PARTITION_BITS and (rows >> bits) > JOIN_PARTITION_ROWS:
        bits += 1
    return bits


@dataclass(frozen=True)
class PlanGraphSpec:
    """Picklable description of one planning job."""

    sources: tuple  # ((path, row_group), ...) of the snapshot
    targets: tuple  # ((path, row_group), ...) of an explicit target, or ()
    ctx: core.PlanContext
    staging: str
    segment_size: int


# ---------------------------------------------------------------- reading

def _open(path: str):
    return bulkio.open_bulk(path)  # gs://: ranged reads, footers and row groups only


def _read_units(units, segment_size: int, columns: tuple, rows_counter=None):
    """Arrow tables of at most ``segment_size`` rows from (path, row group)
    units; each file is opened once for a run of its row groups."""
    i = 0
    units = list(units)
    while i < len(units):
        path = units[i][0]
        j = i
        while j < len(units) and units[j][0] == path:
            j += 1
        with _open(path) as f:
            # shard ids come back dictionary-encoded (as Parquet stores them):
            # the planner works on their codes, and no string column is built
            pf = pq.ParquetFile(f, read_dictionary=["shard_id"])
            names = pf.schema_arrow.names
            cols = [c for c in columns if c in names]
            for _p, rg in units[i:j]:
                try:
                    table = pf.read_row_group(rg, columns=cols)
                except (OSError, pa.ArrowException) as e:  # damaged data pages: bad input, not a bug
                    raise BadInput(f"snapshot: {path.rsplit('/', 1)[-1]}: row group {rg} is corrupted or "
                                   f"truncated ({type(e).__name__})") from None
                if rows_counter is not None:
                    rows_counter.inc(table.num_rows)
                for b in table.to_batches(max_chunksize=segment_size):
                    yield pa.Table.from_batches([b])
        i = j


def make_chunks(units: tuple, segment_size: int) -> list:
    """(chunk index, units) with about SPILL_ROWS rows each (row groups are
    assumed to hold about ``segment_size`` rows; bigger ones spill inside the
    chunk).  A pure function of the unit list: chunk names are stable."""
    per = max(1, SPILL_ROWS // max(1, segment_size))
    units = list(units)
    return [(i // per, tuple(units[i:i + per])) for i in range(0, len(units), per)]


# ---------------------------------------------------------------- spill files

def _spill_path(staging: str, chunk: int, k: int) -> str:
    return fs.join(staging, SPILL_DIR, f"chunk-{chunk:06d}-{k:04d}.bin")


def _write_spill(path: str, blobs: list) -> None:
    """Write the concatenated blobs.  Scratch data: atomic (rename) but not
    fsynced -- a crash discards the whole staging directory anyway."""
    if fs.is_gcs(path):
        bulkio.write_bulk(path, b"".join(blobs))  # one upload, finalised on close
        return
    d = os.path.dirname(path)
    os.makedirs(d, mode=0o700, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=d)
    try:
        os.fchmod(fd, 0o600)  # holds key values
        with os.fdopen(fd, "wb") as f:
            for b in blobs:
                f.write(b)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _read_range(path: str, offset: int, length: int) -> bytes:
    if fs.is_gcs(path):
        data = fs.read_range(path, offset, length)  # one ranged GET
    else:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(length)
    if len(data) != length:
        raise IOError(f"spill file {path.rsplit('/', 1)[-1]} is short ({len(data)} of {length} bytes)")
    return data


def _ipc_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


def _group_bounds(moves: pa.Table):
    """Start/end rows of each (source, target, bucket) run of sorted moves."""
    n = moves.num_rows
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    change = np.zeros(n, dtype=bool)
    change[0] = True
    for col in ("source", "target"):
        codes = pc.dictionary_encode(moves[col].combine_chunks()).indices.to_numpy(zero_copy_only=False)
        change[1:] |= codes[1:] != codes[:-1]
    b = moves["bucket"].combine_chunks().to_numpy(zero_copy_only=False)
    change[1:] |= b[1:] != b[:-1]
    starts = np.flatnonzero(change)
    ends = np.append(starts[1:], n)
    return starts, ends


def spill_chunk(staging: str, chunk: int, k: int, hashes: list, moves: list, *, path: str | None = None):
    """Write one spill file; return its pointers: ("hashes", partition, ptr) and ("moves", gid, ptr).

    Layout: the chunk's sorted hashes (uint64 LE), then one Arrow IPC stream
    per (source, target, bucket) group of its moves sorted in CONTRACTS order.
    A pointer is (path, byte offset, byte length)."""
    path = path or _spill_path(staging, chunk, k)
    h = np.sort(np.concatenate(hashes)) if hashes else np.zeros(0, np.uint64)
    blobs = [h.astype("<u8", copy=False).tobytes()]
    out = []
    nparts = 1 << SPILL_PARTITION_BITS
    shift = np.uint64(64 - SPILL_PARTITION_BITS)
    if len(h):
        edges = np.searchsorted(h >> shift, np.arange(nparts + 1, dtype=np.uint64), side="left")
        for p in range(nparts):
            s, e = int(edges[p]), int(edges[p + 1])
            if e > s:
                out.append(("hashes", p, (path, s * 8, (e - s) * 8)))
    offset = len(blobs[0])
    table = pa.concat_tables(moves) if moves else None
    if table is not None and table.num_rows:
        table = core.sort_moves(table.combine_chunks())
        starts, ends = _group_bounds(table)
        body = table.select(core.MOVES_SCHEMA.names)
        src_col, tgt_col, b_col = table["source"], table["target"], table["bucket"]
        for s, e in zip(starts.tolist(), ends.tolist()):
            blob = _ipc_bytes(body.slice(s, e - s))
            gid = group_id(src_col[s].as_py(), tgt_col[s].as_py(), int(b_col[s].as_py()))
            out.append(("moves", gid, (path, offset, len(blob))))
            blobs.append(blob)
            offset += len(blob)
    _write_spill(path, blobs)
    return out


# ---------------------------------------------------------------- planning

def _split_moves(moves: pa.Table):
    """(group id, compact sub-table) per (source, target, bucket) present in ``moves``."""
    if moves.num_rows == 0:
        return
    gid = pc.binary_join_element_wise(
        moves["source"], moves["target"], pc.cast(moves["bucket"], pa.string()), "\x1f"
    )
    enc = pc.dictionary_encode(gid).combine_chunks()
    idx = enc.indices.to_numpy(zero_copy_only=False)
    order = np.argsort(idx, kind="stable")
    sorted_idx = idx[order]
    bounds = np.flatnonzero(np.diff(sorted_idx)) + 1
    starts = np.concatenate([[0], bounds])
    ends = np.concatenate([bounds, [len(idx)]])
    body = moves.drop_columns(["bucket"])
    for s, e in zip(starts, ends):
        src, tgt, b = enc.dictionary[int(sorted_idx[s])].as_py().split("\x1f")
        # take(), not slice(): a pickled slice carries its parent's whole buffers
        yield group_id(src, tgt, int(b)), body.take(pa.array(order[s:e]))


def mark_progress(staging: str, chunk: int, segments: int, keys: int) -> None:
    """Planning progress for the driver (shardmove.planner polls it): an empty file whose
    name holds this chunk's cumulative counts; a retry recreates the same names."""
    try:
        fs.create_if_absent(workdir.planning_progress_mark(staging, chunk, segments, keys), b"")
    except Exception as e:  # noqa: BLE001 - progress is best effort
        logging.getLogger(__name__).debug("planning progress mark not written: %s", type(e).__name__)


class _PlanChunkFn(beam.DoFn):
    """(chunk index, units) -> tagged ``moves`` (gid, ptr), ``hashes`` (partition, ptr); main: Stats."""

    MOVES = "moves"
    HASHES = "hashes"

    def __init__(self, ctx: core.PlanContext, staging: str, segment_size: int):
        self._ctx = ctx
        self._staging = staging
        self._segment_size = segment_size
        self._rows = Metrics.counter("plan", "rows_read")
        self._moved = Metrics.counter("plan", "moves")
        self._examined = Metrics.counter("plan", "keys_examined")
        self._spills = Metrics.counter("plan", "spill_files")

    def process(self, element):
        chunk, units = element
        total = core.Stats()
        hashes, moves, buffered, k = [], [], 0, 0
        segments, marked = 0, time.monotonic()
        for table in _read_units(units, self._segment_size, ("key", "shard_id"), self._rows):
            mv, st, h = core.plan_batch(table, self._ctx)
            self._examined.inc(st.rows)
            self._moved.inc(st.moved)
            total.merge(st)
            segments += 1
            if time.monotonic() - marked >= _MARK_EVERY_S:
                marked = time.monotonic()
                self._mark(chunk, segments, total.rows)
            hashes.append(h)
            if mv.num_rows:
                moves.append(mv)
            buffered += len(h)
            if buffered >= SPILL_ROWS:
                yield from self._spill(chunk, k, hashes, moves)
                hashes, moves, buffered, k = [], [], 0, k + 1
        if buffered or moves:
            yield from self._spill(chunk, k, hashes, moves)
        self._mark(chunk, segments, total.rows)
        yield total

    def _mark(self, chunk: int, segments: int, keys: int) -> None:
        mark_progress(self._staging, chunk, segments, keys)

    def _spill(self, chunk, k, hashes, moves):
        self._spills.inc()
        for tag, key, ptr in spill_chunk(self._staging, chunk, k, hashes, moves):
            yield beam.pvalue.TaggedOutput(tag, (key, ptr))


class PlanChunks(beam.PTransform):
    """Plan the snapshot against the ring, one chunk at a time.

    Input: ``(chunk index, ((path, row group), ...))`` elements (:func:`make_chunks`).
    Outputs: main, one :class:`pipeline.plancore.Stats` per chunk; tagged ``moves``,
    ``(group id, (path, offset, length))`` pointers to the chunk's sorted moves of one
    (source, target, bucket) group; tagged ``hashes``, ``(partition, pointer)`` to the
    chunk's sorted stable hashes of one hash partition.
    Side effects: one spill file per chunk (and per SPILL_ROWS rows) under
    ``<staging>/spill/`` (0600: it holds keys), and planning-progress marks.
    Idempotent: spill and mark names are functions of the chunk, so a retried bundle
    rewrites the same bytes under the same names; only committed pointers are read."""

    def __init__(self, ctx: core.PlanContext, staging: str, segment_size: int):
        super().__init__()
        self._ctx = ctx
        self._staging = staging
        self._segment_size = segment_size

    def expand(self, chunks):
        return chunks | "PlanChunk" >> beam.ParDo(
            _PlanChunkFn(self._ctx, self._staging, self._segment_size)
        ).with_output_types(Any).with_outputs(_PlanChunkFn.MOVES, _PlanChunkFn.HASHES, main="stats")


_SIDE_SCHEMA = pa.schema([("key", pa.binary()), ("shard_id", pa.string()), ("key_hash", pa.uint64())])


def spill_side(staging: str, side: str, chunk: int, k: int, tables: list, bits: int) -> list:
    """Write one spill file of prepared rows of one side ("s" snapshot, "t" explicit target):
    one Arrow IPC stream per hash partition (the top ``bits`` bits of the stable hash);
    return the pointers (partition, (side, path, offset, length))."""
    path = fs.join(staging, SPILL_DIR, f"{side}-chunk-{chunk:06d}-{k:04d}.bin")
    t = pa.concat_tables(tables).combine_chunks() if tables else pa.table(
        {n: pa.array([], f.type) for n, f in zip(_SIDE_SCHEMA.names, _SIDE_SCHEMA)})
    if t.num_rows == 0:
        return []
    nparts = 1 << bits
    if nparts > 1:  # one stable radix pass on the partition number, one take
        part = (t["key_hash"].to_numpy() >> np.uint64(64 - bits)).astype(np.uint16)
        t = t.take(pa.array(np.argsort(part, kind="stable")))
        edges = np.searchsorted(np.sort(part), np.arange(nparts + 1), side="left")
    else:
        edges = np.array([0, t.num_rows])
    blobs, out, offset = [], [], 0
    for p in range(nparts):
        s, e = int(edges[p]), int(edges[p + 1])
        if e > s:
            blob = _ipc_bytes(t.slice(s, e - s))
            out.append((p, (side, path, offset, len(blob))))
            blobs.append(blob)
            offset += len(blob)
    _write_spill(path, blobs)
    return out


class _PrepareChunkFn(beam.DoFn):
    """Explicit target: (side, chunk index, units) -> canonical keys, shard ids and hashes,
    spilled by hash partition (:func:`spill_side`); main output: (partition, pointer);
    tagged ``stats``.  Memory: one chunk (SPILL_ROWS rows)."""

    def __init__(self, ctx: core.PlanContext, staging: str, segment_size: int, bits: int):
        self._ctx = ctx
        self._staging = staging
        self._segment_size = segment_size
        self._bits = bits
        self._rows = Metrics.counter("plan", "rows_read")
        self._spills = Metrics.counter("plan", "spill_files")

    def process(self, element):
        side, chunk, units = element
        is_target = side == "t"
        known = self._ctx.target_shards if is_target else self._ctx.known_shards
        st = core.Stats()
        tables, buffered, k = [], 0, 0
        segments, marked = 0, time.monotonic()
        for table in _read_units(units, self._segment_size, ("key", "shard_id"), self._rows):
            segments += 1
            canon, shard, hashes = core.prepare_batch(table, self._ctx.key_type, st, known, target_side=is_target)
            lanes = core.digest_lanes(hashes, core._shard_hash_array(shard))
            if is_target:
                st.target_rows += table.num_rows
                st.target_digest = core._add_digest(st.target_digest, lanes)
            else:
                st.rows += table.num_rows
                st.digest = core._add_digest(st.digest, lanes)
            tables.append(pa.table([canon, shard, pa.array(hashes, pa.uint64())], schema=_SIDE_SCHEMA))
            buffered += len(hashes)
            if not is_target and time.monotonic() - marked >= _MARK_EVERY_S:  # the snapshot's keys examined
                marked = time.monotonic()
                mark_progress(self._staging, chunk, segments, st.rows)
            if buffered >= SPILL_ROWS:
                self._spills.inc()
                yield from spill_side(self._staging, side, chunk, k, tables, self._bits)
                tables, buffered, k = [], 0, k + 1
        if tables:
            self._spills.inc()
            yield from spill_side(self._staging, side, chunk, k, tables, self._bits)
        if not is_target:
            mark_progress(self._staging, chunk, segments, st.rows)
        yield beam.pvalue.TaggedOutput("stats", st)


def _side_table(pointers: list) -> pa.Table:
    tables = [_moves_table(ptr) for ptr in pointers]
    if not tables:
        return pa.table({n: pa.array([], f.type) for n, f in zip(_SIDE_SCHEMA.names, _SIDE_SCHEMA)})
    return pa.concat_tables(tables)


class _JoinPartitionFn(beam.DoFn):
    """One hash partition: the snapshot's and the target's rows read back from their spill
    files, joined (:func:`pipeline.plancore.join_batch`), and the moves spilled again by
    (source, target, bucket) group; outputs: tagged ``moves`` (gid, pointer), ``dups``,
    main Stats.  Memory: one partition (rows / 2**SPILL_PARTITION_BITS of each side)."""

    MOVES = "moves"

    def __init__(self, ctx: core.PlanContext, staging: str):
        self._ctx = ctx
        self._staging = staging

    def process(self, element):
        part, items = element
        items = list(items)
        source = _side_table([(path, off, n) for side, path, off, n in items if side == "s"])
        target = _side_table([(path, off, n) for side, path, off, n in items if side == "t"])
        dups = _exact_duplicates(source) + _exact_duplicates(target)
        moves, stats = core.join_sorted(source, target, self._ctx)
        if moves.num_rows:
            path = fs.join(self._staging, SPILL_DIR, f"join-{int(part):04d}.bin")
            for tag, gid, ptr in spill_chunk(self._staging, 0, 0, [], [moves], path=path):
                if tag == "moves":
                    yield beam.pvalue.TaggedOutput(self.MOVES, (gid, ptr))
        yield beam.pvalue.TaggedOutput("dups", dups)
        yield stats


def _exact_duplicates(t: pa.Table) -> int:
    """Rows whose key appears earlier in ``t`` (key, key_hash columns): equal keys have equal
    hashes, so the key bytes are compared only when some hash repeats (rarely)."""
    if t.num_rows < 2:
        return 0
    h = np.sort(t["key_hash"].combine_chunks().to_numpy(zero_copy_only=False))
    if not np.any(h[1:] == h[:-1]):
        return 0
    return t.num_rows - len(pc.unique(t["key"].combine_chunks()))


# ---------------------------------------------------------------- duplicates

def _hash_array(value) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    path, offset, length = value
    return np.frombuffer(_read_range(path, offset, length), dtype="<u8").astype(np.uint64, copy=False)


def _candidate_hashes(element):
    _p, values = element
    arrays = [_hash_array(v) for v in values]
    if not arrays:
        return []
    h = np.sort(np.concatenate(arrays))
    if len(h) < 2:
        return []
    dup = h[1:][h[1:] == h[:-1]]
    return [int(x) for x in np.unique(dup)]


class _ConfirmDuplicatesFn(beam.DoFn):
    """Second pass, only when candidate hashes exist: emit (hash, key bytes).

    Input: chunks of (path, row group) units, read only if there are
    candidates (usually there are none, and nothing is read)."""

    def __init__(self, key_type: KeyType, segment_size: int):
        self._key_type = key_type
        self._segment_size = segment_size

    def process(self, element, candidates):
        if not candidates:
            return
        _chunk, units = element
        want_set = np.array(sorted(candidates), dtype=np.uint64)
        for table in _read_units(units, self._segment_size, ("key", "shard_id")):
            st = core.Stats()
            canon, _shard, hashes = core.prepare_batch(table, self._key_type, st, None)
            want = np.isin(hashes, want_set)
            for i in np.flatnonzero(want):
                yield int(hashes[i]), canon[int(i)].as_py()


def _count_true_duplicates(element):
    _h, keys = element
    keys = list(keys)
    return len(keys) - len(set(keys))


class DetectDuplicates(beam.PTransform):
    """Duplicate keys in the snapshot: hash collisions confirmed by key bytes.

    Input: hashes keyed by partition, each value an ndarray or a spill
    pointer.  ``chunks``: the planner's (chunk, units) PCollection, re-read
    only when candidates exist.  Output: duplicate counts (to be summed;
    usually empty).  Side effects: none (it only reads).  Idempotent: a pure
    function of its inputs."""

    def __init__(self, chunks, segment_size: int, key_type: KeyType):
        super().__init__()
        self._chunks = chunks
        self._segment_size = segment_size
        self._key_type = key_type

    def expand(self, hashes):
        candidates = (
            hashes
            | "GroupByPartition" >> beam.GroupByKey()
            | "CandidateHashes" >> beam.FlatMap(_candidate_hashes).with_output_types(Uint64)
        )
        return (
            self._chunks
            | "ConfirmByKeyBytes" >> beam.ParDo(
                _ConfirmDuplicatesFn(self._key_type, self._segment_size), beam.pvalue.AsList(candidates)
            ).with_output_types(Tuple[Uint64, bytes])
            | "GroupByHash" >> beam.GroupByKey()
            | "CountDuplicates" >> beam.Map(_count_true_duplicates).with_output_types(int)
        )


# ---------------------------------------------------------------- writing

def write_moves_bytes(table: pa.Table) -> bytes:
    """Deterministic Parquet bytes of one group's moves (sorted, fixed options)."""
    table = core.sort_moves(table.select(core.MOVES_SCHEMA.names).cast(core.MOVES_SCHEMA))
    sink = pa.BufferOutputStream()
    pq.write_table(
        table,
        sink,
        row_group_size=MOVES_ROW_GROUP,
        compression="zstd",
        use_dictionary=["source", "target"],
        write_statistics=True,
    )
    return sink.getvalue().to_pybytes()


def _moves_table(value) -> pa.Table:
    if isinstance(value, pa.Table):
        return value
    path, offset, length = value
    return pa.ipc.open_stream(pa.py_buffer(_read_range(path, offset, length))).read_all()


class _WriteGroupFn(beam.DoFn):
    """Write one group's file.  Idempotent: same inputs -> same bytes -> same name.

    Each file is committed with :func:`pipeline.fs.write_atomic` (write a
    temporary, fsync, rename, fsync the directory).  Those commits run on a
    few threads, up to ``WRITE_AHEAD`` in flight, so that the fsync latency of
    one file overlaps the encoding of the next (256 files of a 16 -> 17 shard
    plan spent more time in fsync than in encoding)."""

    WRITE_THREADS = 8
    WRITE_AHEAD = 16

    def __init__(self, staging: str):
        self._staging = staging
        self._files = Metrics.counter("plan", "move_files")

    def setup(self):
        self._made = False
        self._pool = ThreadPoolExecutor(self.WRITE_THREADS, thread_name_prefix="plan-write")

    def teardown(self):
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=True)

    def start_bundle(self):
        self._pending = []

    def _commit(self, path, data):
        fs.write_atomic(path, data)

    def process(self, element):
        try:
            yield from self._process(element)
        except BaseException:
            self._drain()
            raise

    def _drain(self):
        """After a failure: let in-flight commits end before the error propagates
        (the launcher then removes the staging directory; nothing may write
        into it afterwards)."""
        pending, self._pending = self._pending, []
        for fut, _record in pending:
            try:
                fut.result()
            except BaseException:
                pass

    def _process(self, element):
        gid, values = element
        table = pa.concat_tables([_moves_table(v) for v in values])
        data = write_moves_bytes(table)
        path = workdir.move_file(self._staging, gid)
        if not self._made:
            fs.makedirs(workdir.moves_dir(self._staging))
            self._made = True
        record = {
            "group": gid,
            "source": table["source"][0].as_py(),
            "target": table["target"][0].as_py(),
            "bucket": int(gid.rsplit("~", 1)[1]),
            "rows": table.num_rows,
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
        self._pending.append((self._pool.submit(self._commit, path, data), record))
        while len(self._pending) >= self.WRITE_AHEAD:
            yield self._settle(self._pending.pop(0))

    def _settle(self, item):
        fut, record = item
        fut.result()  # re-raises a failed commit: the bundle fails
        self._files.inc()
        return record

    def finish_bundle(self):
        try:
            while self._pending:
                record = self._settle(self._pending.pop(0))
                yield WindowedValue(record, GlobalWindow().max_timestamp(), [GlobalWindow()])
        except BaseException:
            self._drain()
            raise


class WriteMoveFiles(beam.PTransform):
    """One Parquet file per (source, target, bucket) group of moves.

    Input: ``(group id, moves)`` where moves is an Arrow table or a spill pointer; a group's
    values may come from many chunks or partitions.  Output: one record per file
    (``group``, ``source``, ``target``, ``bucket``, ``rows``, ``bytes``, ``sha256``).
    Side effects: ``<staging>/moves/<group>.parquet``, written atomically
    (:func:`pipeline.fs.write_atomic`).  Idempotent: the moves are sorted in CONTRACTS order
    and encoded with fixed options (:func:`write_moves_bytes`), so a retried bundle writes
    the same bytes under the same name."""

    def __init__(self, staging: str):
        super().__init__()
        self._staging = staging

    def expand(self, moves):
        return (
            moves
            | "GroupByWorkGroup" >> beam.GroupByKey()
            | "WriteGroupFiles" >> beam.ParDo(_WriteGroupFn(self._staging)).with_output_types(Any)
        )


class _StatsCombineFn(beam.CombineFn):
    def create_accumulator(self):
        return core.Stats()

    def add_input(self, acc, s):
        return acc.merge(s)

    def merge_accumulators(self, accs):
        out = core.Stats()
        for a in accs:
            out.merge(a)
        return out

    def extract_output(self, acc):
        d = dict(acc.__dict__)
        d["unknown_shard_ids"] = sorted(d["unknown_shard_ids"])
        d["digest"] = list(d["digest"])
        d["target_digest"] = list(d["target_digest"])
        return d


def _write_json(staging: str, name: str):
    def write(value):
        fs.makedirs(staging)
        fs.write_atomic(workdir.plan_output_path(staging, name), json.dumps(value, sort_keys=True).encode())
        return name

    return write


def _finalize(staging: str):
    """Runs once, after everything else: merges the statistics, writes
    stats.json / files.json / duplicates.json and removes the spill files.

    Side inputs instead of global combines: per-chunk statistics, one record
    per move file and the (usually empty) duplicate counts are few, and each
    CombineGlobally costs the in-memory runner several stages."""

    def finalize(_none, stats, files, dups):
        fn = _StatsCombineFn()
        acc = fn.create_accumulator()
        for s in stats:
            acc = fn.add_input(acc, s)
        _write_json(staging, workdir.PLAN_STATS)(fn.extract_output(acc))
        _write_json(staging, workdir.PLAN_FILES)(list(files))
        _write_json(staging, workdir.PLAN_DUPLICATES)(int(sum(dups)))
        fs.rmtree(fs.join(staging, SPILL_DIR))
        return None

    return finalize


def build_plan_graph(p: beam.Pipeline, spec: PlanGraphSpec) -> None:
    """The planner's flowchart.  Results land as JSON files in ``spec.staging``."""
    if not spec.targets:
        chunks = p | "ListChunks" >> beam.Create(make_chunks(spec.sources, spec.segment_size))
        planned = chunks | "PlanChunks" >> PlanChunks(spec.ctx, spec.staging, spec.segment_size)
        stats, moves, hashes = planned.stats, planned.moves, planned.hashes
        dups = hashes | "DetectDuplicates" >> DetectDuplicates(chunks, spec.segment_size, spec.ctx.key_type)
    else:
        # explicit target: both sides spilled by hash partition, then one sort-merge join per
        # partition; only pointers travel through Beam (bounded memory, as on the ring path)
        side_chunks = ([("s", i, units) for i, units in make_chunks(spec.sources, spec.segment_size)]
                       + [("t", i, units) for i, units in make_chunks(spec.targets, spec.segment_size)])
        prepared = (
            p
            | "ListSideChunks" >> beam.Create(side_chunks)
            | "PrepareSides" >> beam.ParDo(_PrepareChunkFn(spec.ctx, spec.staging, spec.segment_size,
                                                           join_partition_bits(spec.sources, spec.segment_size)))
            .with_output_types(Any).with_outputs("stats", main="pointers")
        )
        joined = (
            prepared.pointers
            | "GroupByPartition" >> beam.GroupByKey()
            | "JoinTarget" >> beam.ParDo(_JoinPartitionFn(spec.ctx, spec.staging))
            .with_output_types(Any).with_outputs("moves", "dups", main="stats")
        )
        stats = (prepared.stats, joined.stats) | "FlattenStats" >> beam.Flatten()
        moves = joined.moves
        dups = joined.dups
    files = moves | "WriteMoveFiles" >> WriteMoveFiles(spec.staging)
    (p | "FinalizeStart" >> beam.Create([None])
     | "Finalize" >> beam.Map(_finalize(spec.staging), beam.pvalue.AsList(stats), beam.pvalue.AsList(files),
                              beam.pvalue.AsList(dups)).with_output_types(Any))
