"""The explicit-target planner (``target.snapshot``): both sides spilled by hash partition,
then one merge join per partition (:func:`pipeline.plancore.join_sorted`), its moves spilled
again by (source, target, bucket) group for :class:`transforms.plan.WriteMoveFiles`.

Memory: one chunk of one side (``SPILL_ROWS`` rows) while preparing, one partition of both
sides (about ``JOIN_PARTITION_ROWS`` rows each) while joining -- flat in the keyspace size.
Idempotent as the ring path: spill names are functions of (side, chunk, spill) and partition.
"""
from __future__ import annotations

import time

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.metrics import Metrics

from pipeline import fs
from pipeline import plancore as core
from transforms.planio import (_MARK_EVERY_S, SPILL_DIR, SPILL_PARTITION_BITS, SPILL_ROWS, _ipc_bytes,
                               _moves_table, _read_units, _write_spill, mark_progress, spill_chunk)

__all__ = ["JOIN_PARTITION_ROWS", "join_partition_bits", "spill_side", "PrepareChunkFn", "JoinPartitionFn"]

#: Rows per side an explicit-target join partition aims at: the join partitions are
#: 2**bits, bits = log2(rows / JOIN_PARTITION_ROWS) rounded up, at most
#: SPILL_PARTITION_BITS -- few partitions for small plans (each costs a join and
#: a spill of its moves per group), enough for bounded memory on big ones.
JOIN_PARTITION_ROWS = 1 << 17


def join_partition_bits(units: tuple, segment_size: int) -> int:
    """Partition bits of an explicit-target join, from the snapshot's estimated rows
    (row groups of about ``segment_size`` rows).  A pure function of the inputs."""
    rows = len(units) * max(1, segment_size)
    bits = 0
    while bits < SPILL_PARTITION_BITS and (rows >> bits) > JOIN_PARTITION_ROWS:
        bits += 1
    return bits


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


PrepareChunkFn = _PrepareChunkFn
JoinPartitionFn = _JoinPartitionFn
