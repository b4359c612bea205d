"""The segmented planner as Beam transforms.

Flow (read top to bottom in :func:`build_plan_graph`)::

    PlanChunks       chunk = consecutive (path, row group) units of the
                     snapshot, ~SPILL_ROWS rows; each is read in segments of
                     <= segment_size rows and planned with
                     :func:`pipeline.plancore.plan_batch`.  The chunk's outputs
                     (its key hashes by hash partition and its sorted moves) are written
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
                     keys, shard ids and hashes, spilled as files of about
                     SIDE_SPILL_ROWS rows with one Arrow stream per hash
                     partition (by the top bits: 2**bits partitions of about
                     JOIN_PARTITION_ROWS rows, at most 2**SPILL_PARTITION_BITS);
                     pointers only
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
hash partition (rows / ``2**SPILL_PARTITION_BITS``), whatever the runner; with
``threads`` (``plan_threads``), by a few row groups and one partition per thread,
one chunk being planned and one being spilled, and ``_WriteGroupFn.WRITE_AHEAD_BYTES``.
Spill names are deterministic (chunk index, spill index), so a retried
bundle rewrites the same bytes; only pointers that Beam committed are read.

Bulk data travels as Arrow tables, never per-key elements.  The launcher
(``shardmove/planner.py``) validates the stats and commits the manifest.
Reading units, spill files and progress marks are :mod:`transforms.planio`; the
explicit-target join is :mod:`transforms.plan_explicit`.
"""
from __future__ import annotations

import hashlib
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

# Output types are declared on this module's transforms (mostly Any): without
# them Beam infers each DoFn's output type by walking its bytecode, which cost
# ~1 s per plan, whatever its size.

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.metrics import Metrics

from pipeline import fs
from pipeline import plancore as core
from pipeline import workdir
from pipeline.keys import KeyType
from transforms.plan_explicit import JoinPartitionFn, PrepareChunkFn, join_partition_bits
from transforms.planio import (_MARK_EVERY_S, SPILL_DIR, SPILL_PARTITION_BITS, SPILL_ROWS, _moves_table, _read_range,
                               _read_units, make_chunks, mark_progress, spill_chunk)
from transforms.planpool import ChunkPoolFn, GroupPoolFn, _in_global_window, _wait_quietly, release_thread_memory

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

@dataclass(frozen=True)
class PlanGraphSpec:
    """Picklable description of one planning job."""

    sources: tuple  # ((path, row_group), ...) of the snapshot
    targets: tuple  # ((path, row_group), ...) of an explicit target, or ()
    ctx: core.PlanContext
    staging: str
    segment_size: int
    #: planning threads per worker process (``plan_threads``, resolved by the launcher):
    #: > 1 plans (or, with an explicit target, prepares) a chunk's units and joins partitions
    #: on that many threads; the plan's bytes are the same
    threads: int = 1
    #: redistribute the chunk list (``beam.Create``'s reshuffle) so that workers share the
    #: chunks; False for the in-process engine, which runs one bundle at a time anyway (the
    #: reshuffle only cost it a stage)
    reshuffle: bool = True


# ---------------------------------------------------------------- planning

class _PlanChunkFn(ChunkPoolFn):
    """(chunk index, units) -> tagged ``moves`` (gid, ptr), ``hashes`` (partition, ptr); main: Stats.

    With threads, each (path, row group) unit is read and planned by a pool thread
    (:class:`transforms.planpool.ChunkPoolFn`): Parquet decoding, hashing
    (:func:`pipeline.keys.stable_hashes_array`), the ring lookup and the Arrow kernels
    release the GIL, so the threads overlap; spills are written on the pool too."""

    MOVES = "moves"
    HASHES = "hashes"

    def __init__(self, ctx: core.PlanContext, staging: str, segment_size: int, threads: int = 1):
        super().__init__(segment_size, threads)
        self._ctx = ctx
        self._staging = staging
        self._moved = Metrics.counter("plan", "moves")
        self._examined = Metrics.counter("plan", "keys_examined")

    def _plan(self, table):
        return core.plan_batch(table, self._ctx)

    def _process(self, element):
        chunk, units = element
        total = core.Stats()
        hashes, moves, buffered, k = [], [], 0, 0
        segments, marked = 0, time.monotonic()
        for mv, st, h in self._worked(units, self._plan):
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
                yield from self._spill(spill_chunk, self._staging, chunk, k, hashes, moves)
                hashes, moves, buffered, k = [], [], 0, k + 1
        if buffered or moves:
            yield from self._spill(spill_chunk, self._staging, chunk, k, hashes, moves)
        self._mark(chunk, segments, total.rows)
        yield total

    def _mark(self, chunk: int, segments: int, keys: int) -> None:
        mark_progress(self._staging, chunk, segments, keys)

    @staticmethod
    def _outputs(pointers, windowed: bool):
        for tag, key, ptr in pointers:
            value = (key, ptr)
            yield beam.pvalue.TaggedOutput(tag, _in_global_window(value) if windowed else value)


class PlanChunks(beam.PTransform):
    """Plan the snapshot against the ring, one chunk at a time.

    Input: ``(chunk index, ((path, row group), ...))`` elements (:func:`make_chunks`).
    Outputs: main, one :class:`pipeline.plancore.Stats` per chunk; tagged ``moves``,
    ``(group id, (path, offset, length))`` pointers to the chunk's sorted moves of one
    (source, target, bucket) group; tagged ``hashes``, ``(partition, pointer)`` to the
    chunk's stable hashes of one hash partition (unsorted).
    Side effects: one spill file per chunk (and per SPILL_ROWS rows) under
    ``<staging>/spill/`` (0600: it holds keys), and planning-progress marks.
    Idempotent: spill and mark names are functions of the chunk, so a retried bundle
    rewrites the same bytes under the same names; only committed pointers are read."""

    def __init__(self, ctx: core.PlanContext, staging: str, segment_size: int, threads: int = 1):
        super().__init__()
        self._ctx = ctx
        self._staging = staging
        self._segment_size = segment_size
        self._threads = threads

    def expand(self, chunks):
        return chunks | "PlanChunk" >> beam.ParDo(
            _PlanChunkFn(self._ctx, self._staging, self._segment_size, self._threads)
        ).with_output_types(Any).with_outputs(_PlanChunkFn.MOVES, _PlanChunkFn.HASHES, main="stats")


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
    h = np.concatenate(arrays)
    del arrays
    h.sort()  # in place: one copy of the partition, not two
    if len(h) < 2:
        return []
    dup = h[1:][h[1:] == h[:-1]]
    return [int(x) for x in np.unique(dup)]


class _DuplicatesFn(GroupPoolFn):
    """(partition, hash pointers) -> the number of duplicate keys among the bundle's
    partitions; nothing when there are none (the usual case).

    Each partition's hashes are read back and sorted; equal neighbours are candidate
    duplicates.  With threads, partitions are read and sorted on a pool (file reads and
    ``np.sort`` release the GIL), one per thread at a time
    (:class:`transforms.planpool.GroupPoolFn`); without, one at a time here.
    At the bundle's end, if there are candidates, the snapshot (``chunks``, a side input:
    its (chunk, units) list) is read once and the candidates' key bytes confirm them: a
    hash shared by different keys is a collision, not a duplicate.  A key and its
    duplicates share a hash, hence a partition: bundles count disjoint duplicates, and the
    counts add up."""

    THREAD_NAME = "plan-dups"

    def __init__(self, key_type: KeyType, segment_size: int, threads: int = 1):
        super().__init__(threads)
        self._key_type = key_type
        self._segment_size = segment_size

    @staticmethod
    def _work(part, values):
        return _candidate_hashes((part, values))

    def start_bundle(self):
        super().start_bundle()
        self._candidates: set = set()
        self._chunks = None

    def process(self, element, chunks):
        self._chunks = chunks
        yield from super().process(element)

    def _outputs(self, hashes, windowed: bool):
        self._candidates.update(hashes)  # a set: the order partitions finish in does not matter
        return ()

    def finish_bundle(self):
        yield from super().finish_bundle()
        if self._candidates:
            n = self._confirm(sorted(self._candidates))
            if n:
                yield _in_global_window(n)

    def _confirm(self, candidates: list) -> int:
        """Duplicate keys among the candidate hashes, by key bytes (one read of the snapshot)."""
        want = np.array(candidates, dtype=np.uint64)
        found = []  # the candidates' key bytes, as Arrow arrays (no Python object per key)
        for _chunk, units in self._chunks:
            for table in _read_units(units, self._segment_size, ("key", "shard_id")):
                canon, _shard, hashes = core.prepare_batch(table, self._key_type, core.Stats(), None)
                mask = np.isin(hashes, want)
                if mask.any():
                    hit = canon.filter(pa.array(mask))
                    found.extend(hit.chunks if isinstance(hit, pa.ChunkedArray) else [hit])
        if not found:
            return 0
        keys = pa.chunked_array(found)
        # a key has one hash: the keys beyond the first of each distinct key are the duplicates
        return len(keys) - pc.count_distinct(keys, mode="all").as_py()


class DetectDuplicates(beam.PTransform):
    """Duplicate keys in the snapshot: hash collisions confirmed by key bytes.

    Input: hashes keyed by partition, each value an ndarray or a spill
    pointer.  ``chunks``: the planner's (chunk, units) PCollection (a side input), re-read
    only when candidates exist.  Output: duplicate counts (to be summed;
    usually empty).  Side effects: none (it only reads).  Idempotent: a pure
    function of its inputs.  One ParDo after the grouping (the confirmation, usually
    not needed, is its bundle's end): no stages of its own for the usual case."""

    def __init__(self, chunks, segment_size: int, key_type: KeyType, threads: int = 1):
        super().__init__()
        self._chunks = chunks
        self._segment_size = segment_size
        self._key_type = key_type
        self._threads = threads

    def expand(self, hashes):
        return (
            hashes
            | "GroupByPartition" >> beam.GroupByKey()
            | "CountDuplicates" >> beam.ParDo(_DuplicatesFn(self._key_type, self._segment_size, self._threads),
                                              beam.pvalue.AsList(self._chunks)).with_output_types(int)
        )


# ---------------------------------------------------------------- writing

def write_moves_bytes(table: pa.Table, one_pair: bool = False) -> bytes:
    """Deterministic Parquet bytes of one group's moves (sorted, fixed options).
    ``one_pair``: every row has the same source and target (a group of the planner), so
    :func:`pipeline.plancore.sort_pair_moves` sorts them (the same order, less work)."""
    table = table.select(core.MOVES_SCHEMA.names).cast(core.MOVES_SCHEMA)
    table = core.sort_pair_moves(table) if one_pair else core.sort_moves(table)
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


class _WriteGroupFn(beam.DoFn):
    """Write one group's file.  Idempotent: same inputs -> same bytes -> same name.

    Each group is read back from its spill pointers, sorted, encoded and committed
    with :func:`pipeline.fs.write_atomic` (write a temporary, fsync, rename, fsync the
    directory) on a few threads, up to ``WRITE_AHEAD`` groups and ``WRITE_AHEAD_BYTES``
    spilled bytes in flight: the fsync
    latency of one file overlaps the encoding of the next (256 files of a 16 -> 17 shard
    plan spent more time in fsync than in encoding), and the sorts and Parquet encoding
    (Arrow, without the GIL) of several groups overlap.  Records are emitted in input
    order."""

    WRITE_THREADS = 8
    WRITE_AHEAD = 16
    #: ... and at most this many spilled bytes of moves in flight (always at least one
    #: group): a group grows with the keyspace, so the count alone would not bound memory
    WRITE_AHEAD_BYTES = 8 << 20

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
        # atomic (temp + fsync + rename); the renames are made durable by one sync of the
        # moves directory at the bundle's end (finish_bundle), before its records count
        fs.write_atomic(path, data, sync_dir=False)

    def process(self, element):
        try:
            yield from self._process(element)
        except BaseException:
            self._drain()
            raise

    def _drain(self):
        """After a failure: commits in flight end first (:func:`_wait_quietly`)."""
        pending, self._pending = self._pending, []
        _wait_quietly(fut for fut, _size in pending)

    def _write_group(self, gid: str, values: list) -> dict:
        table = pa.concat_tables([_moves_table(v) for v in values])
        source, target = table["source"][0].as_py(), table["target"][0].as_py()
        data = write_moves_bytes(table, one_pair=True)
        record = {
            "group": gid,
            "source": source,
            "target": target,
            "bucket": int(gid.rsplit("~", 1)[1]),
            "rows": table.num_rows,
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
        self._commit(workdir.move_file(self._staging, gid), data)
        del table, data
        release_thread_memory()  # on the writer thread: its freed Arrow memory back to the system
        return record

    def _process(self, element):
        gid, values = element
        if not self._made:
            fs.makedirs(workdir.moves_dir(self._staging))
            self._made = True
        values = list(values)
        size = sum(v[2] if isinstance(v, tuple) else v.nbytes for v in values)
        while self._pending and (len(self._pending) >= self.WRITE_AHEAD
                                 or sum(b for _f, b in self._pending) + size > self.WRITE_AHEAD_BYTES):
            yield self._settle(self._pending.pop(0))
        self._pending.append((self._pool.submit(self._write_group, gid, values), size))

    def _settle(self, item):
        record = item[0].result()  # re-raises a failed read, encoding or commit: the bundle fails
        self._files.inc()
        return record

    def finish_bundle(self):
        try:
            records = []
            while self._pending:
                records.append(self._settle(self._pending.pop(0)))
        except BaseException:
            self._drain()
            raise
        if self._made:
            fs.sync_dir(workdir.moves_dir(self._staging))  # every rename of this bundle, durable
        for record in records:
            yield _in_global_window(record)


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


class _EmitFn(beam.DoFn):
    """Impulse -> ``values``, in order."""

    def __init__(self, values: list):
        self._values = values

    def process(self, _impulse):
        yield from self._values


class _Values(beam.PTransform):
    """A PCollection of a few small values: ``beam.Create`` (with its reshuffle) when
    ``reshuffle``, else one DoFn after an Impulse -- what Create is without its reshuffle,
    in one transform instead of two (a FlatMap and a decoding Map)."""

    def __init__(self, values, reshuffle: bool):
        super().__init__()
        self._values = list(values)
        self._reshuffle = reshuffle

    def expand(self, pbegin):
        if self._reshuffle:
            return pbegin | beam.Create(self._values)
        return pbegin | beam.Impulse() | beam.ParDo(_EmitFn(self._values)).with_output_types(Any)


def _write_json(staging: str, name: str):
    def write(value):
        fs.makedirs(staging)
        # scratch for the launcher, removed before the plan is committed: atomic, not
        # fsynced (a crash discards the staging directory; six fsyncs a plan saved)
        fs.write_atomic(workdir.plan_output_path(staging, name), json.dumps(value, sort_keys=True).encode(),
                        durable=False)
        return name

    return write


class _FinalizeFn(beam.DoFn):
    """Runs once (on the Impulse), after everything else: merges the statistics, writes
    stats.json / files.json / duplicates.json and removes the spill files.  No output.

    Side inputs instead of global combines: per-chunk statistics, one record
    per move file and the (usually empty) duplicate counts are few, and each
    CombineGlobally costs the in-memory runner several stages."""

    def __init__(self, staging: str):
        self._staging = staging

    def process(self, _impulse, stats, files, dups):
        staging = self._staging
        fn = _StatsCombineFn()
        acc = fn.create_accumulator()
        for s in stats:
            acc = fn.add_input(acc, s)
        _write_json(staging, workdir.PLAN_STATS)(fn.extract_output(acc))
        _write_json(staging, workdir.PLAN_FILES)(list(files))
        _write_json(staging, workdir.PLAN_DUPLICATES)(int(sum(dups)))
        fs.rmtree(fs.join(staging, SPILL_DIR))
        return ()


def build_plan_graph(p: beam.Pipeline, spec: PlanGraphSpec) -> None:
    """The planner's flowchart.  Results land as JSON files in ``spec.staging``."""
    if not spec.targets:
        chunks = p | "ListChunks" >> _Values(make_chunks(spec.sources, spec.segment_size), spec.reshuffle)
        planned = chunks | "PlanChunks" >> PlanChunks(spec.ctx, spec.staging, spec.segment_size, spec.threads)
        stats, moves, hashes = planned.stats, planned.moves, planned.hashes
        dups = hashes | "DetectDuplicates" >> DetectDuplicates(chunks, spec.segment_size, spec.ctx.key_type,
                                                               spec.threads)
    else:
        # explicit target: both sides spilled by hash partition, then one sort-merge join per
        # partition; only pointers travel through Beam (bounded memory, as on the ring path)
        side_chunks = ([("s", i, units) for i, units in make_chunks(spec.sources, spec.segment_size)]
                       + [("t", i, units) for i, units in make_chunks(spec.targets, spec.segment_size)])
        prepared = (
            p
            | "ListSideChunks" >> _Values(side_chunks, spec.reshuffle)
            | "PrepareSides" >> beam.ParDo(PrepareChunkFn(spec.ctx, spec.staging, spec.segment_size,
                                                           join_partition_bits(spec.sources, spec.segment_size),
                                                           spec.threads))
            .with_output_types(Any).with_outputs("stats", main="pointers")
        )
        joined = (
            prepared.pointers
            | "GroupByPartition" >> beam.GroupByKey()
            | "JoinTarget" >> beam.ParDo(JoinPartitionFn(spec.ctx, spec.staging, spec.threads))
            .with_output_types(Any).with_outputs("moves", "dups", main="stats")
        )
        stats = (prepared.stats, joined.stats) | "FlattenStats" >> beam.Flatten()
        moves = joined.moves
        dups = joined.dups
    files = moves | "WriteMoveFiles" >> WriteMoveFiles(spec.staging)
    (p | "FinalizeStart" >> beam.Impulse()
     | "Finalize" >> beam.ParDo(_FinalizeFn(spec.staging), beam.pvalue.AsList(stats), beam.pvalue.AsList(files),
                                beam.pvalue.AsList(dups)).with_output_types(Any))
