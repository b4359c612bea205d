"""The planner's scratch IO: reading the snapshot in (path, row group) units, spill files
(written once, read back by pointer), and planning-progress marks.

Spill files hold key values: they are 0600 and live under the plan's staging directory,
which is removed after the commit.  Spill and mark names are functions of the chunk and
spill index, so a retried bundle rewrites the same bytes under the same names; only
pointers ``(path, offset, length)`` that Beam committed are read.
"""
from __future__ import annotations

import logging
import os
import tempfile
import threading

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import fs
from pipeline import plancore as core
from pipeline import workdir
from pipeline.errors import BadInput
from pipeline.names import group_id
from transforms import bulkio

__all__ = ["SPILL_ROWS", "SPILL_PARTITION_BITS", "SPILL_DIR", "make_chunks", "read_units", "UnitReader", "spill_chunk",
           "partition_order", "sorted_partition_edges", "read_pointer", "mark_progress"]

#: Rows of snapshot planned per chunk before its hashes and moves are
#: spilled (bounds the planner's memory, with segment_size).
SPILL_ROWS = 1 << 20

#: A chunk marks its planning progress at most this often (and once at its end).
_MARK_EVERY_S = 0.5
#: Hash partitions of the duplicate check: 2**bits, by the top bits of the
#: stable hash.  One partition's hashes are held at once.
SPILL_PARTITION_BITS = 8
SPILL_DIR = "spill"


# ---------------------------------------------------------------- reading

def _open(path: str):
    if not fs.is_gcs(path):
        # a native file: Arrow reads it without the GIL (a Python file object would take
        # the GIL for every read), so planning threads overlap their reads
        return pa.OSFile(path, "rb")
    return bulkio.open_bulk(path)  # gs://: ranged reads, footers and row groups only


def _parquet(f, columns: tuple, metadata=None):
    """``(ParquetFile, the columns of `columns` it has)``.  Shard ids come back
    dictionary-encoded (as Parquet stores them): the planner works on their codes, and
    no string column is built."""
    pf = pq.ParquetFile(f, read_dictionary=["shard_id"], metadata=metadata)
    names = pf.schema_arrow.names
    return pf, [c for c in columns if c in names]


def _read_row_group(pf, path: str, rg: int, cols: list, use_threads: bool = True) -> pa.Table:
    try:
        return pf.read_row_group(rg, columns=cols, use_threads=use_threads)
    except (OSError, pa.ArrowException) as e:  # damaged data pages: bad input, not a bug
        raise BadInput(f"snapshot: {path.rsplit('/', 1)[-1]}: row group {rg} is corrupted or "
                       f"truncated ({type(e).__name__})") from None


def _segments(table: pa.Table, segment_size: int):
    for b in table.to_batches(max_chunksize=segment_size):
        yield pa.Table.from_batches([b])


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
            pf, cols = _parquet(f, columns)
            for _p, rg in units[i:j]:
                table = _read_row_group(pf, path, rg, cols)
                if rows_counter is not None:
                    rows_counter.inc(table.num_rows)
                yield from _segments(table, segment_size)
        i = j


class UnitReader:
    """Reads single (path, row group) units, from any thread.  Each thread keeps its own
    file open for its next unit of the same file (no shared file position; a ``gs://``
    object is not reopened for every row group), and each file's footer is parsed once
    and reused (``ParquetFile(metadata=...)``).  :meth:`close` closes every thread's
    file (a thread then reopens on its next unit).  For the planning threads of
    :class:`transforms.planpool.ChunkPoolFn`."""

    def __init__(self, columns: tuple):
        self._columns = columns
        self._meta: dict = {}
        self._local = threading.local()
        self._lock = threading.Lock()
        self._files: list = []
        self._generation = 0

    def read(self, path: str, rg: int) -> pa.Table:
        held = getattr(self._local, "held", None)
        if held is None or held[0] != path or held[1] != self._generation:
            if held is not None and held[1] == self._generation:
                self._forget(held[2])
            f = _open(path)
            try:
                pf, cols = _parquet(f, self._columns, metadata=self._meta.get(path))
            except BaseException:
                f.close()
                raise
            if path not in self._meta:
                if len(self._meta) >= 64:
                    self._meta.clear()
                self._meta[path] = pf.metadata
            with self._lock:
                self._files.append(f)
                held = self._local.held = (path, self._generation, f, pf, cols)
        # one unit per planning thread: Arrow's own column threads would only compete
        return _read_row_group(held[3], path, rg, held[4], use_threads=False)

    def _forget(self, f) -> None:
        with self._lock:
            if f in self._files:
                self._files.remove(f)
        f.close()

    def close(self) -> None:
        """Close every thread's file; call when no read is running (between chunks)."""
        with self._lock:
            files, self._files = self._files, []
            self._generation += 1
        for f in files:
            try:
                f.close()
            except OSError:
                pass


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


def _write_spill(path: str, blobs) -> None:
    """Write the concatenated blobs (any iterable: a local file takes each as it comes).
    Scratch data: atomic (rename) but not fsynced -- a crash discards the whole staging
    directory anyway."""
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
        # a raw descriptor and pread (3 system calls, no buffered file object): a partition or
        # a group reads one range from every chunk's spill file, and each call that releases
        # the GIL may wait for it again
        fd = os.open(path, os.O_RDONLY)
        try:
            data = os.pread(fd, length, offset)
            while 0 < len(data) < length:  # a short read (signals, some file systems)
                more = os.pread(fd, length - len(data), offset + len(data))
                if not more:
                    break
                data += more
        finally:
            os.close(fd)
    if len(data) != length:
        raise IOError(f"spill file {path.rsplit('/', 1)[-1]} is short ({len(data)} of {length} bytes)")
    return data


#: explicit IPC options: without them each stream writer reads two environment variables
#: (pyarrow's legacy-format switches), ~20 us for every one of a chunk's 256 group streams
_IPC_OPTIONS = pa.ipc.IpcWriteOptions()


def _ipc_bytes(table: pa.Table) -> pa.Buffer:
    """One Arrow IPC stream of ``table``, as a bytes-like Arrow buffer (not copied into a
    ``bytes``: it is only written to a spill file)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema, options=_IPC_OPTIONS) as w:
        w.write_table(table)
    return sink.getvalue()


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


def partition_order(hashes: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """``(order, edges)``: the rows' order grouped by hash partition (the top ``bits`` bits
    of the stable hash; rows of one partition in their input order) and where partition
    ``p`` starts and ends in it (``edges[p]:edges[p + 1]``).  A stable sort of 8- or
    16-bit codes: numpy's radix sort, O(n)."""
    nparts = 1 << bits
    if bits == 0:
        return np.arange(len(hashes)), np.array([0, len(hashes)], np.int64)
    top = (hashes >> np.uint64(64 - bits)).astype(np.uint8 if bits <= 8 else np.uint16)
    edges = np.zeros(nparts + 1, np.int64)
    np.cumsum(np.bincount(top, minlength=nparts), out=edges[1:])
    return np.argsort(top, kind="stable"), edges


def sorted_partition_edges(hashes: np.ndarray, bits: int) -> np.ndarray:
    """Sort ``hashes`` in place and return where hash partition ``p`` (the top ``bits`` bits)
    starts and ends in them (``edges[p]:edges[p + 1]``), as :func:`partition_order` does for
    its order."""
    hashes.sort()
    bounds = np.arange(1, 1 << bits, dtype=np.uint64) << np.uint64(64 - bits) if bits else np.zeros(0, np.uint64)
    edges = np.empty((1 << bits) + 1, np.int64)
    edges[0], edges[-1] = 0, len(hashes)
    edges[1:-1] = np.searchsorted(hashes, bounds, side="left")
    return edges


def spill_chunk(staging: str, chunk: int, k: int, hashes: list, moves: list, *, path: str | None = None):
    """Write one spill file; return its pointers: ("hashes", partition, ptr) and ("moves", gid, ptr).

    Layout: the chunk's hashes (uint64 LE), sorted (so grouped by hash partition, in
    partition order), then one Arrow IPC stream
    per (source, target, bucket) group of its moves sorted in CONTRACTS order.
    A pointer is (path, byte offset, byte length)."""
    path = path or _spill_path(staging, chunk, k)
    h = np.concatenate(hashes).astype(np.uint64, copy=False) if hashes else np.zeros(0, np.uint64)
    out = []
    if len(h):
        # sorted (numpy's vectorised sort, in place: cheaper than grouping by partition with
        # a radix pass and a gather), so each partition is a contiguous, sorted run
        edges = sorted_partition_edges(h, SPILL_PARTITION_BITS)
    blobs = [h.astype("<u8", copy=False).tobytes()]
    if len(h):
        for p in range(1 << SPILL_PARTITION_BITS):
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


def mark_progress(staging: str, chunk: int, segments: int, keys: int) -> None:
    """Planning progress for the driver (shardmove.planner polls it): an empty file whose
    name holds this chunk's cumulative counts; a retry recreates the same names."""
    try:
        path = workdir.planning_progress_mark(staging, chunk, segments, keys)
        if fs.is_gcs(path):
            fs.create_if_absent(path, b"")
        else:  # an empty local file, not synced: progress only (a commit's fsyncs took 14 ms a mark)
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            try:
                os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            except FileExistsError:
                pass  # a retried bundle's same mark
    except Exception as e:  # noqa: BLE001 - progress is best effort
        logging.getLogger(__name__).debug("planning progress mark not written: %s", type(e).__name__)


def _moves_table(value) -> pa.Table:
    if isinstance(value, pa.Table):
        return value
    path, offset, length = value
    return pa.ipc.open_stream(pa.py_buffer(_read_range(path, offset, length))).read_all()


read_units = _read_units
read_pointer = _moves_table
