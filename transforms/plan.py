"""The segmented planner as Beam transforms.

Flow (read top to bottom in :func:`build_plan_graph`)::

    ReadAssignments  (path, row group) -> Arrow segments of <= segment_size rows
    PlanMoves        segment -> moves keyed by (source, target, bucket),
                     stats, key hashes keyed by hash partition
    DetectDuplicates hashes grouped by partition -> candidate collisions,
                     confirmed by key bytes in a second (usually empty) pass
    WriteMoveFiles   one sorted Parquet file per (source, target, bucket),
                     written by us (deterministic bytes), never by a sharded sink
    WriteStats       stats.json / files.json / duplicates.json in the staging dir

Bulk data travels as Arrow tables, never per-key elements.  The launcher
(``pipeline/planner.py``) validates the stats and commits the manifest.
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from typing import Iterable

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.metrics import Metrics

from pipeline import fs
from pipeline import plancore as core
from pipeline.keys import KeyType
from pipeline.names import group_id

__all__ = [
    "PlanGraphSpec",
    "ReadAssignments",
    "PlanMoves",
    "DetectDuplicates",
    "WriteMoveFiles",
    "build_plan_graph",
    "write_moves_bytes",
    "DUP_PARTITIONS",
]

#: Hash partitions for duplicate detection and explicit-target joins (top bits).
DUP_PARTITIONS = 16
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


# ---------------------------------------------------------------- reading

def _open(path: str):
    if fs.is_gcs(path):
        from apache_beam.io.filesystems import FileSystems

        return io.BytesIO(FileSystems.open(path).read())
    return open(path, "rb")


class _ReadSegmentsFn(beam.DoFn):
    """(path, row group) -> Arrow tables of at most ``segment_size`` rows."""

    def __init__(self, segment_size: int, columns: tuple):
        self._segment_size = segment_size
        self._columns = columns
        self._rows = Metrics.counter("plan", "rows_read")

    def process(self, element):
        path, rg = element
        with _open(path) as f:
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
            cols = [c for c in self._columns if c in names]
            table = pf.read_row_group(rg, columns=cols)
        self._rows.inc(table.num_rows)
        for b in table.to_batches(max_chunksize=self._segment_size):
            yield pa.Table.from_batches([b])


class ReadAssignments(beam.PTransform):
    def __init__(self, parts: tuple, segment_size: int, columns=("key", "shard_id")):
        super().__init__()
        self._parts = parts
        self._segment_size = segment_size
        self._columns = tuple(columns)

    def expand(self, pbegin):
        return (
            pbegin
            | "ListParts" >> beam.Create(list(self._parts))
            | "ReadSegments" >> beam.ParDo(_ReadSegmentsFn(self._segment_size, self._columns))
        )


# ---------------------------------------------------------------- planning

def _split_moves(moves: pa.Table):
    """(group id, sub-table) per (source, target, bucket) present in ``moves``."""
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
    body = moves.drop_columns(["bucket"]).take(pa.array(order))
    for s, e in zip(starts, ends):
        src, tgt, b = enc.dictionary[int(sorted_idx[s])].as_py().split("\x1f")
        yield group_id(src, tgt, int(b)), body.slice(int(s), int(e - s))


def _partition_hashes(hashes: np.ndarray):
    part = (hashes >> np.uint64(60)).astype(np.int32)  # top 4 bits: 16 partitions
    order = np.argsort(part, kind="stable")
    ps = part[order]
    hs = hashes[order]
    bounds = np.flatnonzero(np.diff(ps)) + 1
    for chunk_p, chunk_h in zip(np.split(ps, bounds), np.split(hs, bounds)):
        if len(chunk_p):
            yield int(chunk_p[0]), chunk_h


class _PlanSegmentFn(beam.DoFn):
    MOVES = "moves"
    HASHES = "hashes"

    def __init__(self, ctx: core.PlanContext):
        self._ctx = ctx
        self._moved = Metrics.counter("plan", "moves")
        self._examined = Metrics.counter("plan", "keys_examined")

    def process(self, table: pa.Table):
        moves, stats, hashes = core.plan_batch(table, self._ctx)
        self._examined.inc(stats.rows)
        self._moved.inc(stats.moved)
        for p, h in _partition_hashes(hashes):
            yield beam.pvalue.TaggedOutput(self.HASHES, (p, h))
        for gid, t in _split_moves(moves):
            yield beam.pvalue.TaggedOutput(self.MOVES, (gid, t))
        yield stats


class _PrepareSideFn(beam.DoFn):
    """Explicit target: canonical keys + hashes, keyed by hash partition."""

    def __init__(self, ctx: core.PlanContext, side: str):
        self._ctx = ctx
        self._side = side

    def process(self, table: pa.Table):
        st = core.Stats()
        is_target = self._side == "t"
        known = self._ctx.target_shards if is_target else self._ctx.known_shards
        canon, shard, hashes = core.prepare_batch(table, self._ctx.key_type, st, known, target_side=is_target)
        lanes = core.digest_lanes(hashes, core._shard_hash_array(shard))
        if is_target:
            st.target_rows = table.num_rows
            st.target_digest = lanes
        else:
            st.rows = table.num_rows
            st.digest = lanes
        yield beam.pvalue.TaggedOutput("stats", st)
        prepared = pa.table({"key": canon, "shard_id": shard, "key_hash": pa.array(hashes, pa.uint64())})
        part = (hashes >> np.uint64(60)).astype(np.int32)
        for p in np.unique(part):
            yield (int(p), (self._side, prepared.filter(pa.array(part == p))))


class _JoinPartitionFn(beam.DoFn):
    MOVES = "moves"

    def __init__(self, ctx: core.PlanContext):
        self._ctx = ctx

    def process(self, element):
        _p, items = element
        src = [t for side, t in items if side == "s"]
        tgt = [t for side, t in items if side == "t"]
        source = pa.concat_tables(src) if src else pa.table(
            {"key": pa.array([], pa.binary()), "shard_id": pa.array([], pa.string()), "key_hash": pa.array([], pa.uint64())})
        target = pa.concat_tables(tgt) if tgt else pa.table(
            {"key": pa.array([], pa.binary()), "shard_id": pa.array([], pa.string()), "key_hash": pa.array([], pa.uint64())})
        dups = _exact_duplicates(source) + _exact_duplicates(target)
        moves, stats = core.join_batch(source, target, self._ctx)
        for gid, t in _split_moves(moves):
            yield beam.pvalue.TaggedOutput(self.MOVES, (gid, t))
        yield beam.pvalue.TaggedOutput("dups", dups)
        yield stats


def _exact_duplicates(t: pa.Table) -> int:
    if t.num_rows < 2:
        return 0
    return t.num_rows - len(pc.unique(t["key"].combine_chunks()))


class PlanMoves(beam.PTransform):
    """Segments -> tagged outputs ``moves`` (gid, table), ``hashes`` (partition, ndarray), main: Stats."""

    def __init__(self, ctx: core.PlanContext):
        super().__init__()
        self._ctx = ctx

    def expand(self, segments):
        return segments | "PlanSegments" >> beam.ParDo(_PlanSegmentFn(self._ctx)).with_outputs(
            _PlanSegmentFn.MOVES, _PlanSegmentFn.HASHES, main="stats"
        )


# ---------------------------------------------------------------- duplicates

def _candidate_hashes(element):
    _p, arrays = element
    h = np.sort(np.concatenate(list(arrays)))
    if len(h) < 2:
        return []
    dup = h[1:][h[1:] == h[:-1]]
    return [int(x) for x in np.unique(dup)]


class _ConfirmDuplicatesFn(beam.DoFn):
    """Second pass, only when candidate hashes exist: emit (hash, key bytes)."""

    def __init__(self, key_type: KeyType):
        self._key_type = key_type

    def process(self, table: pa.Table, candidates):
        if not candidates:
            return
        st = core.Stats()
        canon, _shard, hashes = core.prepare_batch(table, self._key_type, st, None)
        want = np.isin(hashes, np.array(sorted(candidates), dtype=np.uint64))
        for i in np.flatnonzero(want):
            yield int(hashes[i]), canon[int(i)].as_py()


def _count_true_duplicates(element):
    _h, keys = element
    keys = list(keys)
    return len(keys) - len(set(keys))


class DetectDuplicates(beam.PTransform):
    """Duplicate keys in the snapshot: hash collisions confirmed by key bytes."""

    def __init__(self, parts: tuple, segment_size: int, key_type: KeyType):
        super().__init__()
        self._parts = parts
        self._segment_size = segment_size
        self._key_type = key_type

    def expand(self, hashes):
        candidates = (
            hashes
            | "GroupByPartition" >> beam.GroupByKey()
            | "CandidateHashes" >> beam.FlatMap(_candidate_hashes)
            | "CollectCandidates" >> beam.combiners.ToList()
        )
        return (
            hashes.pipeline
            | "ReReadForDuplicates" >> ReadAssignments(self._parts, self._segment_size)
            | "ConfirmByKeyBytes" >> beam.ParDo(
                _ConfirmDuplicatesFn(self._key_type), beam.pvalue.AsSingleton(candidates))
            | "GroupByHash" >> beam.GroupByKey()
            | "CountDuplicates" >> beam.Map(_count_true_duplicates)
            | "SumDuplicates" >> beam.CombineGlobally(sum)
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


class _WriteGroupFn(beam.DoFn):
    """Write one group's file.  Idempotent: same inputs -> same bytes -> same name."""

    def __init__(self, staging: str):
        self._staging = staging
        self._files = Metrics.counter("plan", "move_files")

    def process(self, element):
        gid, tables = element
        table = pa.concat_tables(list(tables))
        data = write_moves_bytes(table)
        path = fs.join(self._staging, "moves", gid + ".parquet")
        fs.makedirs(fs.join(self._staging, "moves"))
        fs.write_atomic(path, data)
        self._files.inc()
        src = table["source"][0].as_py()
        tgt = table["target"][0].as_py()
        yield {
            "group": gid,
            "source": src,
            "target": tgt,
            "bucket": int(gid.rsplit("~", 1)[1]),
            "rows": table.num_rows,
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }


class WriteMoveFiles(beam.PTransform):
    def __init__(self, staging: str):
        super().__init__()
        self._staging = staging

    def expand(self, moves):
        return (
            moves
            | "GroupByWorkGroup" >> beam.GroupByKey()
            | "WriteGroupFiles" >> beam.ParDo(_WriteGroupFn(self._staging))
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
        fs.write_atomic(fs.join(staging, name), json.dumps(value, sort_keys=True).encode())
        return name

    return write


def build_plan_graph(p: beam.Pipeline, spec: PlanGraphSpec) -> None:
    """The planner's flowchart.  Results land as JSON files in ``spec.staging``."""
    segments = p | "ReadAssignments" >> ReadAssignments(spec.sources, spec.segment_size)
    if not spec.targets:
        planned = segments | "PlanMoves" >> PlanMoves(spec.ctx)
        stats, moves, hashes = planned.stats, planned.moves, planned.hashes
        dups = hashes | "DetectDuplicates" >> DetectDuplicates(spec.sources, spec.segment_size, spec.ctx.key_type)
    else:
        src = segments | "PrepareSource" >> beam.ParDo(_PrepareSideFn(spec.ctx, "s")).with_outputs("stats", main="rows")
        tgt_segments = p | "ReadTarget" >> ReadAssignments(spec.targets, spec.segment_size)
        tgt = tgt_segments | "PrepareTarget" >> beam.ParDo(_PrepareSideFn(spec.ctx, "t")).with_outputs("stats", main="rows")
        joined = (
            (src.rows, tgt.rows)
            | "FlattenSides" >> beam.Flatten()
            | "GroupByPartition" >> beam.GroupByKey()
            | "JoinTarget" >> beam.ParDo(_JoinPartitionFn(spec.ctx)).with_outputs("moves", "dups", main="stats")
        )
        stats = (src.stats, tgt.stats, joined.stats) | "FlattenStats" >> beam.Flatten()
        moves = joined.moves
        dups = joined.dups | "SumDuplicates" >> beam.CombineGlobally(sum)
    files = moves | "WriteMoveFiles" >> WriteMoveFiles(spec.staging)
    (stats | "CombineStats" >> beam.CombineGlobally(_StatsCombineFn())
     | "WriteStats" >> beam.Map(_write_json(spec.staging, "stats.json")))
    (files | "CollectFiles" >> beam.combiners.ToList()
     | "WriteFileList" >> beam.Map(_write_json(spec.staging, "files.json")))
    dups | "WriteDuplicates" >> beam.Map(_write_json(spec.staging, "duplicates.json"))
