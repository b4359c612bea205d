"""Writing transitions: a columnar buffer and the writer that commits it as parts.

Never imports Beam: ``transforms/`` wraps the writer in a DoFn.  Part of
:mod:`pipeline.checkpoint`.

Writes are idempotent
---------------------
A flush never touches an existing file: it serialises the buffered rows to
Parquet in memory and commits them under a fresh unique part name with
create-if-absent (:func:`pipeline.fs.create_if_absent`: temp file + fsync +
link locally, generation precondition 0 on GCS).  A reader therefore sees a
part either whole or not at all.  Re-writing the same transitions (a retried
bundle) only adds rows that the merge collapses.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import threading
import time
from typing import Any, Callable, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import fs
from pipeline import keys as _keys
from pipeline.checkpoint.schema import (_BUFFER_SCHEMA, _RESERVED, CHECKPOINT_SCHEMA, FORMAT_VERSION,
                                        _check_group_id, checkpoints_dir, group_dir, part_name,
                                        serialize_table)
from pipeline.errors import TransientError
from pipeline.states import VERIFY_METHODS, State, check_transitions

__all__ = ["Transitions", "CheckpointWriter", "WriterStats"]

_log = logging.getLogger("pipeline.checkpoint")  # one logger for the package, as before the split


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


def _trusted_column(values, n: int, typ: pa.DataType) -> pa.Array:
    """None (all null), a list of ``n`` values, or one value for all rows, as ``typ``."""
    if values is None:
        return pa.nulls(n, typ)
    if isinstance(values, list):
        if len(values) != n:
            raise ValueError(f"a column has {len(values)} values for {n} keys")
        return pa.array(values, typ)
    return pa.repeat(pa.scalar(values, typ), n)


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
        self._append(batch)

    def add_trusted(self, keys: pa.Array, key_hashes: np.ndarray, state: int, attempts: list,
                    reasons=None, content_hashes=None, source_versions=None, verify_methods=None) -> None:
        """Buffer a batch from a caller that guarantees the types (the executor's recorder,
        through :meth:`CheckpointWriter.record_chunk`): ``keys`` a binary array,
        ``key_hashes`` a uint64 array, ``state`` a state rank, ``attempts`` non-negative
        ints; each nullable column None (all null), one value for all, or a list.  What
        the types do not guarantee is still checked, in C or on one value: the state
        rank, content hashes of 16 bytes, the verify methods, the lengths."""
        n = len(keys)
        if n == 0:
            return
        if not 0 <= state <= int(max(State)):
            raise ValueError(f"states must be ranks 0..{int(max(State))}")
        if len(key_hashes) != n or len(attempts) != n:
            raise ValueError("key_hashes and attempts must have one value per key")
        if min(attempts) < 0:
            raise ValueError("attempts must be non-negative")
        if verify_methods is not None:
            found = {verify_methods} if isinstance(verify_methods, str) else set(verify_methods)
            found.discard(None)
            if not found <= VERIFY_METHODS:
                raise ValueError(f"verify_methods must be among {sorted(VERIFY_METHODS)}")
        batch = pa.RecordBatch.from_arrays([
            keys,
            pa.array(key_hashes, pa.uint64()),
            pa.array(np.full(n, state, dtype=np.int8)),
            pa.array(attempts, pa.int32()),  # an oversized count raises
            _trusted_column(reasons, n, pa.string()),
            _trusted_column(content_hashes, n, pa.binary(16)),  # a hash of another length raises
            _trusted_column(source_versions, n, pa.int64()),
            _trusted_column(verify_methods, n, pa.string()),
            pa.array(np.full(n, self._now_ms(), dtype=np.int64)),
        ], schema=_BUFFER_SCHEMA)
        self._append(batch)

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

    def _append(self, batch: pa.RecordBatch) -> None:
        self._seal()  # rows added one by one before it come first: call order is kept
        self._batches.append(batch)
        self._batch_rows += batch.num_rows

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
    resume only redone idempotent work.  For the same reason a background
    part's bytes are fsynced before its name appears (a part present is
    whole), but the directory is fsynced -- its names made durable across a
    power loss -- once per ``flush_interval_s`` at most, and by every waiting
    flush before it returns: one directory fsync instead of one per part.
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
        self._dir_synced_at = time.monotonic()
        self._dir_unsynced = False  # a background part's name not yet fsynced in its directory
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
        return self._buffered(len(keys), may_flush, self._buffer.add_many, keys, key_hashes, states, attempts,
                              reasons, content_hashes, source_versions, verify_methods)

    def record_chunk(self, keys: pa.Array, key_hashes: np.ndarray, state: int, attempts: list,
                     reasons=None, content_hashes=None, source_versions=None, verify_methods=None,
                     *, prev, may_flush: bool = True) -> str | None:
        """The executor's fast path (private to :class:`transforms.stages.common.CheckpointRecorder`):
        :meth:`record_many` with the types its caller guarantees (see
        :meth:`Transitions.add_trusted`).  ``prev`` is required and every ``prev -> state``
        is checked against the state machine as by :meth:`record_many`."""
        if prev is None:
            raise TypeError("record_chunk checks transitions: pass prev (the states left)")
        self._check(prev, state, len(keys))
        return self._buffered(len(keys), may_flush, self._buffer.add_trusted, keys, key_hashes, int(state),
                              attempts, reasons, content_hashes, source_versions, verify_methods)

    def _buffered(self, n: int, may_flush: bool, add, *columns) -> str | None:
        """``add(*columns)`` (``n`` transitions) under the lock, then :meth:`maybe_flush` --
        or, unless ``may_flush``, count them as riders of the next flush."""
        with self._lock:
            add(*columns)
            if not may_flush:
                self._riders += n
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
        raised, by the next waiting flush.  With nothing buffered, once the interval has
        passed and the background commits are done, it makes their names durable (one
        directory fsync) instead of leaving that to the bundle's end."""
        with self._lock:
            if len(self._buffer) and self._clock() - self._last_flush >= self.flush_interval_s:
                self.flush(wait=self._committer is None)
            elif (self._dir_unsynced and time.monotonic() - self._dir_synced_at >= self.flush_interval_s
                  and all(f.done() for f in self._inflight)):
                self._sync_dir()  # nothing more came: the last background parts' names, durable

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
                self._sync_dir()
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
            return self._commit(*part, background=background)
        except BaseException as e:
            if background:  # the waiting flush keeps it (no lock taken here: it may be held)
                raise _BackgroundCommitFailed(part, e) from e
            self._pending.append(part)  # retried under the same name by the next flush
            raise

    def _sync_dir(self) -> None:
        """Make the names of the background parts committed so far durable (one fsync)."""
        if self._dir_unsynced:
            self._dir_unsynced = False
            self._dir_synced_at = time.monotonic()
            fs.sync_dir(self._dir)

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

    def _commit(self, name: str, data: bytes, rows: int, background: bool = False) -> str:
        if not self._dirs_made:
            fs.makedirs(checkpoints_dir(self.plan_dir))
            fs.makedirs(self._dir)
            self._dirs_made = True
        if self._fence is not None:
            self._fence()
        if background and time.monotonic() - self._dir_synced_at < self.flush_interval_s:
            fs.create_if_absent(fs.join(self._dir, name), data, sync_dir=False)
            self._dir_unsynced = True
        else:
            fs.create_if_absent(fs.join(self._dir, name), data)
            self._dir_synced_at = time.monotonic()
        s = self._stats
        s.parts += 1
        s.bytes += len(data)
        s.rows += rows
        s.last_part = name
        return name
