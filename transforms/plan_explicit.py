"""The explicit-target planner (``target.snapshot``): both sides spilled by hash partition,
then one join per partition (:func:`pipeline.plancore.join_counted`), its moves spilled
again by (source, target, bucket) group for :class:`transforms.plan.WriteMoveFiles`.

Memory: ``SIDE_SPILL_ROWS`` rows of one side while preparing, one partition of both
sides (about ``JOIN_PARTITION_ROWS`` rows each) while joining -- flat in the keyspace size.
With ``threads`` (``plan_threads``, :mod:`transforms.planpool`): a few row groups per
thread, one chunk being prepared and one being spilled, and one partition per thread.
Idempotent as the ring path: spill names are functions of (side, chunk, spill) and partition.
"""
from __future__ import annotations

import time

import apache_beam as beam
import numpy as np
import pyarrow as pa

from pipeline import fs
from pipeline import plancore as core
from transforms.planio import (_MARK_EVERY_S, SPILL_DIR, SPILL_PARTITION_BITS, SPILL_ROWS, _ipc_bytes,
                               _moves_table, _write_spill, mark_progress, partition_order, spill_chunk)
from transforms.planpool import ChunkPoolFn, GroupPoolFn, _in_global_window, release_thread_memory

__all__ = ["JOIN_PARTITION_ROWS", "join_partition_bits", "spill_side", "PrepareChunkFn", "JoinPartitionFn"]

#: Rows per side an explicit-target join partition aims at: the join partitions are
#: 2**bits, bits = log2(rows / JOIN_PARTITION_ROWS) rounded up, at most
#: SPILL_PARTITION_BITS -- few partitions for small plans (each costs a join and
#: a spill of its moves per group), enough for bounded memory on big ones.
JOIN_PARTITION_ROWS = 1 << 17

#: Prepared rows of one side spilled at once: the keys are spilled too (the ring path
#: spills hashes and moves only), so half ``SPILL_ROWS``; with threads one spill
#: is being written while the next is prepared.
SIDE_SPILL_ROWS = SPILL_ROWS // 2


def join_partition_bits(units: tuple, segment_size: int) -> int:
    """Partition bits of an explicit-target join, from the snapshot's estimated rows
    (row groups of about ``segment_size`` rows).  A pure function of the inputs."""
    rows = len(units) * max(1, segment_size)
    bits = 0
    while bits < SPILL_PARTITION_BITS and (rows >> bits) > JOIN_PARTITION_ROWS:
        bits += 1
    return bits


_SIDE_SCHEMA = pa.schema([("key", pa.binary()), ("shard_id", pa.dictionary(pa.int32(), pa.string())),
                          ("key_hash", pa.uint64())])


def spill_side(staging: str, side: str, chunk: int, k: int, segments: list, bits: int) -> list:
    """Write one spill file of prepared rows of one side ("s" snapshot, "t" explicit target):
    ``segments`` are :func:`pipeline.plancore.prepare_side`'s (keys, shard names, shard codes,
    hashes), in order, and are consumed (the list is emptied: memory is freed as soon as
    possible); the file holds one Arrow IPC stream per hash partition (the top ``bits``
    bits of the stable hash; key, shard id dictionary-encoded, hash), rows in input order
    within one; return the pointers (partition, (side, path, offset, length))."""
    path = fs.join(staging, SPILL_DIR, f"{side}-chunk-{chunk:06d}-{k:04d}.bin")
    if not sum(len(seg[3]) for seg in segments):
        segments.clear()
        return []
    code_of: dict = {}  # the spill's shard ids in the order met: one dictionary
    codes = []
    for _keys, names, c, _h in segments:
        remap = np.array([code_of.setdefault(name, len(code_of)) for name in names], np.int32)
        codes.append(remap[c] if len(remap) else np.zeros(len(c), np.int32))
    code = np.concatenate(codes)
    h = np.concatenate([seg[3] for seg in segments])
    keys = pa.concat_arrays([seg[0] for seg in segments])
    del codes
    segments.clear()
    order, edges = partition_order(h, bits)
    if bits:  # one radix pass on the partition number, one take
        keys, code, h = keys.take(pa.array(order)), code[order], h[order]
    del order
    shard = pa.DictionaryArray.from_arrays(pa.array(code, pa.int32()), pa.array(list(code_of), pa.string()))
    out: list = []
    _write_spill(path, _partition_blobs(pa.table([keys, shard, pa.array(h, pa.uint64())], schema=_SIDE_SCHEMA),
                                        edges, (side, path), out))
    del keys, shard, code, h
    release_thread_memory()
    return out


def _partition_blobs(t: pa.Table, edges: np.ndarray, where: tuple, out: list):
    """One Arrow IPC stream per non-empty partition of ``t`` (rows ``edges[p]:edges[p + 1]``),
    each encoded when the writer takes it; its pointer (partition, where + (offset, length))
    appended to ``out``."""
    offset = 0
    for p in range(len(edges) - 1):
        s, e = int(edges[p]), int(edges[p + 1])
        if e > s:
            blob = _ipc_bytes(t.slice(s, e - s))
            out.append((p, where + (offset, len(blob))))
            offset += len(blob)
            yield blob


class _PrepareChunkFn(ChunkPoolFn):
    """Explicit target: (side, chunk index, units) -> canonical keys, shard ids and hashes
    (:func:`pipeline.plancore.prepare_side`), spilled by hash partition (:func:`spill_side`);
    main output: (partition, pointer); tagged ``stats``.  With threads, row groups are
    prepared on a pool and spills written on a thread of their own
    (:class:`transforms.planpool.ChunkPoolFn`).
    Memory: SIDE_SPILL_ROWS prepared rows, and (with threads) as many being spilled."""

    THREAD_NAME = "plan-prepare"

    def __init__(self, ctx: core.PlanContext, staging: str, segment_size: int, bits: int, threads: int = 1):
        super().__init__(segment_size, threads)
        self._ctx = ctx
        self._staging = staging
        self._bits = bits

    def _prepare_target(self, table):
        st = core.Stats()
        return core.prepare_side(table, self._ctx.key_type, st, self._ctx.target_shards, target_side=True), st

    def _prepare_source(self, table):
        st = core.Stats()
        return core.prepare_side(table, self._ctx.key_type, st, self._ctx.known_shards), st

    def _process(self, element):
        side, chunk, units = element
        is_target = side == "t"
        total = core.Stats()
        prepared, buffered, k = [], 0, 0
        segments, marked = 0, time.monotonic()
        for seg, st in self._worked(units, self._prepare_target if is_target else self._prepare_source):
            segments += 1
            total.merge(st)
            prepared.append(seg)
            buffered += len(seg[3])
            if not is_target and time.monotonic() - marked >= _MARK_EVERY_S:  # the snapshot's keys examined
                marked = time.monotonic()
                mark_progress(self._staging, chunk, segments, total.rows)
            if buffered >= SIDE_SPILL_ROWS:
                yield from self._spill(spill_side, self._staging, side, chunk, k, prepared, self._bits)
                prepared, buffered, k = [], 0, k + 1
        if prepared:
            yield from self._spill(spill_side, self._staging, side, chunk, k, prepared, self._bits)
        if not is_target:
            mark_progress(self._staging, chunk, segments, total.rows)
        yield beam.pvalue.TaggedOutput("stats", total)

    @staticmethod
    def _outputs(pointers, windowed: bool):
        for value in pointers:
            yield _in_global_window(value) if windowed else value


def _side_table(pointers: list) -> pa.Table:
    tables = [_moves_table(ptr) for ptr in pointers]
    return pa.concat_tables(tables) if tables else _SIDE_SCHEMA.empty_table()


class _JoinPartitionFn(GroupPoolFn):
    """One hash partition: the snapshot's and the target's rows read back from their spill
    files, joined and their duplicates counted (:func:`pipeline.plancore.join_counted`), and
    the moves spilled again by (source, target, bucket) group; outputs: tagged ``moves``
    (gid, pointer), ``dups``, main Stats.  With threads, partitions are joined on a pool,
    one per thread at a time, outputs in input order (:class:`transforms.planpool.GroupPoolFn`).
    Memory: one partition (about JOIN_PARTITION_ROWS rows of each side) per thread."""

    MOVES = "moves"
    THREAD_NAME = "plan-join"

    def __init__(self, ctx: core.PlanContext, staging: str, threads: int = 1):
        super().__init__(threads)
        self._ctx = ctx
        self._staging = staging

    def _work(self, part, items):
        items = sorted(items)  # the pieces in (side, file, offset) order, whatever the shuffle's
        source = _side_table([(path, off, n) for side, path, off, n in items if side == "s"])
        target = _side_table([(path, off, n) for side, path, off, n in items if side == "t"])
        moves, stats, dups = core.join_counted(source, target, self._ctx)
        pointers = []
        if moves.num_rows:
            path = fs.join(self._staging, SPILL_DIR, f"join-{int(part):04d}.bin")
            pointers = [(gid, ptr) for tag, gid, ptr in spill_chunk(self._staging, 0, 0, [], [moves], path=path)
                        if tag == "moves"]
        release_thread_memory()
        return pointers, dups, stats

    def _outputs(self, result, windowed: bool):
        pointers, dups, stats = result
        wrap = _in_global_window if windowed else (lambda v: v)
        for value in pointers:
            yield beam.pvalue.TaggedOutput(self.MOVES, wrap(value))
        yield beam.pvalue.TaggedOutput("dups", wrap(dups))
        yield wrap(stats)


PrepareChunkFn = _PrepareChunkFn
JoinPartitionFn = _JoinPartitionFn
