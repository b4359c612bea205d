"""The planning DoFns' worker threads (``plan_threads``), in two shapes:

* :class:`ChunkPoolFn` -- a chunk of (path, row group) units: each unit read and worked
  on a pool thread, at most two units per thread ahead of the one consumed, results taken
  in unit and segment order; the chunk's spills written on a thread of their own, one at a
  time, their pointers emitted at the next spill or at the bundle's end.  The ring path's
  ``_PlanChunkFn`` and the explicit target's ``_PrepareChunkFn``.
* :class:`GroupPoolFn` -- the ``(key, values)`` groups of a GroupByKey, each worked on a
  pool thread, one group per thread in flight, results taken in input order.  The
  duplicate check's ``_DuplicatesFn`` and the explicit target's ``_JoinPartitionFn``.

Results are taken in order, so spill files and outputs are the same whatever the thread
count.  With one thread there is no pool: everything runs on the bundle's thread.  The
work on the pool is Parquet decoding, numpy and Arrow kernels and file IO, which release
the GIL, so the threads overlap.  Metrics are counted on the bundle's thread.
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor

import apache_beam as beam
import pyarrow as pa
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.windowed_value import WindowedValue

from transforms.planio import UnitReader, _read_units, _segments

__all__ = ["ChunkPoolFn", "GroupPoolFn", "release_thread_memory"]


_GLOBAL_WINDOWS = (GlobalWindow(),)
_GLOBAL_MAX_TIMESTAMP = _GLOBAL_WINDOWS[0].max_timestamp()


def _in_global_window(value) -> WindowedValue:
    """An output of ``finish_bundle``, which has no input element's window to inherit
    (the window and timestamp are immutable: made once, not per output)."""
    return WindowedValue(value, _GLOBAL_MAX_TIMESTAMP, _GLOBAL_WINDOWS)


def _wait_quietly(futures) -> None:
    """After a failure: let work in flight end (its own errors dropped) before the first
    error propagates -- the launcher then removes the staging directory, and nothing may
    write into it afterwards."""
    for fut in futures:
        try:
            fut.result()
        except BaseException:
            pass


def release_thread_memory() -> None:
    """Return the calling thread's freed Arrow memory to the system.  Arrow's default
    allocator (mimalloc) keeps freed pages in per-thread heaps, so each pool thread's own
    peak would stay resident (an explicit-target plan of 10M keys, 4 threads: about 60 MB
    more peak RSS); called after each spill or partition, on the thread that did it."""
    pa.default_memory_pool().release_unused()


class _InOrderFn(beam.DoFn):
    """Futures taken in submission order: ``self._pending``, and the subclass's
    ``_outputs(result, windowed)`` (a result -> outputs; ``windowed`` in ``finish_bundle``,
    see :func:`_in_global_window`)."""

    def start_bundle(self):
        self._pending: deque = deque()

    def _take(self, keep: int, windowed: bool = False):
        """The outputs of the oldest results, until at most ``keep`` are pending; after a
        failure, work in flight ends first (:func:`_wait_quietly`)."""
        try:
            while len(self._pending) > keep:
                yield from self._outputs(self._pending.popleft().result(), windowed)
        except BaseException:
            self._drain()
            raise

    def finish_bundle(self):
        yield from self._take(0, True)

    def _drain(self):
        pending, self._pending = self._pending, deque()
        _wait_quietly(pending)


class ChunkPoolFn(_InOrderFn):
    """Base of the DoFns that read a chunk's units (:meth:`_worked`) and spill
    (:meth:`_spill`).  Subclasses define ``_process(element)`` (the body of ``process``)
    and ``_outputs(result, windowed)`` (a spill's result -> outputs).  With threads,
    units are worked on a pool of ``threads``, spills written on one more thread."""

    THREAD_NAME = "plan-chunk"

    def __init__(self, segment_size: int, threads: int = 1, columns: tuple = ("key", "shard_id")):
        self._segment_size = segment_size
        self._threads = max(1, int(threads))
        self._columns = columns
        self._rows = Metrics.counter("plan", "rows_read")
        self._spills = Metrics.counter("plan", "spill_files")

    def setup(self):
        self._pool = None
        if self._threads > 1:
            self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix=self.THREAD_NAME)
            self._spiller = ThreadPoolExecutor(1, thread_name_prefix=self.THREAD_NAME + "-spill")
            self._reader = UnitReader(self._columns)

    def teardown(self):
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=True)
            self._spiller.shutdown(wait=True)
            self._reader.close()

    def _work_unit(self, work, path: str, rg: int) -> list:
        table = self._reader.read(path, rg)
        return [(t.num_rows, work(t)) for t in _segments(table, self._segment_size)]

    def _worked(self, units, work):
        """``work(segment)`` of every segment (at most ``segment_size`` rows) of ``units``,
        in unit and segment order whatever the thread count.  ``work`` runs on the pool
        threads: it must not touch the DoFn's state or metrics."""
        if self._pool is None:
            for table in _read_units(units, self._segment_size, self._columns, self._rows):
                yield work(table)
            return
        window: deque = deque()
        try:
            for path, rg in units:
                window.append(self._pool.submit(self._work_unit, work, path, rg))
                if len(window) > 2 * self._threads:
                    yield from self._collect(window.popleft())
            while window:
                yield from self._collect(window.popleft())
        finally:
            for fut in window:  # after a failure: the units not yet started are dropped
                fut.cancel()
            _wait_quietly(window)
            self._reader.close()  # no read is running now: the chunk's files are closed

    def _collect(self, fut):
        for rows, res in fut.result():  # re-raises the unit's error (e.g. a corrupted row group)
            self._rows.inc(rows)
            yield res

    def process(self, element):
        try:
            yield from self._process(element)
        except BaseException:
            self._drain()  # spills in flight end first
            raise

    def _spill(self, write, *args):
        """``write(*args)`` (a spill file) and its outputs.  With threads, the write (sorts,
        encoding, the file) runs on its own thread while the next units are worked, one
        spill at a time (its memory then stays on one thread: see
        :func:`release_thread_memory`); its outputs are emitted at the next spill or at the
        bundle's end."""
        self._spills.inc()
        if self._pool is None:
            yield from self._outputs(write(*args), False)
            return
        self._pending.append(self._spiller.submit(write, *args))
        yield from self._take(1)


class GroupPoolFn(_InOrderFn):
    """Base of the DoFns that work on ``(key, values)`` groups: ``_work(key, values)`` (on a
    pool thread with threads: it must not touch the DoFn's state or metrics) and
    ``_outputs(result, windowed)`` (on the bundle's thread).  One group per thread in
    flight: memory stays that of ``threads`` groups."""

    THREAD_NAME = "plan-group"

    def __init__(self, threads: int = 1):
        self._threads = max(1, int(threads))

    def setup(self):
        self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix=self.THREAD_NAME) \
            if self._threads > 1 else None

    def teardown(self):
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=True)

    def process(self, element):
        key, values = element
        if self._pool is None:
            yield from self._outputs(self._work(key, list(values)), False)
            return
        yield from self._take(self._threads - 1)
        self._pending.append(self._pool.submit(self._work, key, list(values)))
