"""A stage's bounded window of chunks in flight.

A stage admits a chunk (its calls submitted to a thread pool) and returns at
once, so the pool works on the next chunks while the bundle thread records
transitions, emits finished chunks and runs the fused downstream stages.  A
chunk is emitted when all its calls have finished, oldest first (outputs keep
their input order); ``finish_bundle()`` drains the window.  The window holds up
to ``max_chunks`` chunks beyond the one admitted, and admission also waits
while more than 2 x the pool's size of calls are queued (8 chunks measured
slower than 2 with the SQLite mover: more source reads at once, all queueing
for the target file).

A chunk of many small calls (the copy stage's one key per call) is submitted
as a :class:`Calls`: a few pool tasks (at most the pool's size) pull the calls
from a shared queue, so a chunk costs O(pool size) futures, not O(calls), on
the bundle thread; the calls in flight are still counted one by one.

It also measures the stage's busy time (chunks in flight): ``<stage>_busy_ms``,
a throughput's denominator.
"""
from __future__ import annotations

import collections
import concurrent.futures
import threading
import time
from dataclasses import dataclass
from typing import Any

from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP, Timestamp
from apache_beam.utils.windowed_value import WindowedValue

from transforms.stages.common import NS, Chunk, StageMetrics

__all__ = ["Window", "InFlight", "Calls", "windowed"]


def windowed(value, window, timestamp) -> WindowedValue:
    """``value`` in the input element's window (the global window when the DoFn is
    called directly, outside a runner, as tests do)."""
    if not isinstance(timestamp, Timestamp):
        timestamp, window = MIN_TIMESTAMP, GlobalWindow()
    return WindowedValue(value, timestamp, (window,))


@dataclass
class InFlight:
    """A chunk admitted to a stage's window: its calls, what completes it, its output.

    ``futures``: the pool futures the chunk waits for -- or a :class:`Calls`, whose
    tasks' futures are waited for and whose calls' results ``finish`` receives."""

    chunk: Chunk
    futures: Any
    finish: Any  # callable(results) run on the bundle thread when every call is done
    output: Any


class Calls:
    """A chunk's calls ``fn(*args)``, run by a few pool tasks that pull them from a
    shared queue (:meth:`Window.submit_calls`).  ``results`` holds each call's
    result in call order once ``futures`` (the tasks') are done; a task's
    exception is its future's, and no further call of the chunk starts then."""

    __slots__ = ("fn", "queue", "results", "futures", "tasks_left", "cancelled")

    def __init__(self, fn, calls: list):
        self.fn = fn
        self.queue = collections.deque(enumerate(calls))  # popleft is atomic: no lock to pull
        self.results: list = [None] * len(calls)
        self.futures: list = []
        self.tasks_left = 0
        self.cancelled = False

    def __iter__(self):  # the futures the window waits for
        return iter(self.futures)

    def cancel(self) -> None:
        """Start no more of these calls (running ones finish)."""
        self.cancelled = True
        for f in self.futures:
            f.cancel()


class Window:
    """Chunks in flight of one stage DoFn, and the calls they wait for."""

    def __init__(self, stage: str, max_chunks: int, metrics: StageMetrics):
        self.max_chunks = max_chunks
        self._metrics = metrics
        self._entries: collections.deque = collections.deque()
        self._outstanding_calls = 0  # submitted and not finished (pool threads decrement)
        self._calls_done = threading.Condition()
        # wall time during which the stage had chunks in flight: copy_busy_ms, verify_busy_ms
        self._busy_ms = Metrics.counter(NS, f"{stage}_busy_ms")
        self._busy_s = 0.0
        self._busy_since = 0.0
        self._wake_below = 1 << 62  # a finished call wakes admission once this few are outstanding
        self._closed = False

    def start_bundle(self) -> None:
        self._entries = collections.deque()

    def submit(self, pool, fn, *args):
        """pool.submit, counted in the calls outstanding (admission waits on them)."""
        with self._calls_done:
            self._outstanding_calls += 1
        fut = pool.submit(fn, *args)
        fut.add_done_callback(self._call_done)  # runs once the future is done: no missed wake-up
        return fut

    def _call_done(self, _fut) -> None:
        with self._calls_done:
            self._outstanding_calls -= 1
            self._calls_done.notify()

    def submit_calls(self, pool, fn, calls: list, workers: int) -> Calls:
        """``fn(*args)`` for each ``args`` of ``calls``, by ``min(workers, len(calls))``
        pool tasks pulling from one queue; each call counted in the calls outstanding."""
        batch = Calls(fn, calls)
        n = len(calls)
        if not n:
            return batch
        tasks = max(1, min(int(workers), n))
        with self._calls_done:
            self._outstanding_calls += n
            batch.tasks_left = tasks
        done = lambda _f: self._task_done(batch)  # noqa: E731
        for _ in range(tasks):
            fut = pool.submit(self._run_calls, batch)
            batch.futures.append(fut)
            fut.add_done_callback(done)
        return batch

    def _run_calls(self, batch: Calls) -> None:
        """One pool task of a :class:`Calls`: pull and run calls until none is left.  Stopped
        by the window's close (teardown) with calls left, it raises CancelledError: the
        chunk's results are incomplete and must never reach its ``finish``."""
        pop, fn, results, cond = batch.queue.popleft, batch.fn, batch.results, self._calls_done
        while not (batch.cancelled or self._closed):
            try:
                i, args = pop()
            except IndexError:
                return
            try:
                results[i] = fn(*args)
            except BaseException:
                batch.cancelled = True  # the bundle fails: start no more calls of this chunk
                raise
            finally:
                with cond:
                    self._outstanding_calls -= 1
                    if self._outstanding_calls <= self._wake_below:
                        cond.notify()
        if self._closed and batch.queue:  # the calls left never ran (counted off by _task_done)
            raise concurrent.futures.CancelledError()
        # stopped by a failing call of the chunk: that call's task raises its error

    def _task_done(self, batch: Calls) -> None:
        with self._calls_done:
            batch.tasks_left -= 1
            if batch.tasks_left == 0:
                # calls never started (cancelled, or a task failed) are no longer outstanding
                self._outstanding_calls -= len(batch.queue)
                batch.queue.clear()
            self._calls_done.notify()

    def admit(self, entry: InFlight, pool_size: int):
        """Add a chunk to the window; emit what has finished, and wait while the
        window is full or the pool has plenty of queued calls."""
        if not self._entries:
            self._busy_since = time.perf_counter()
        self._entries.append(entry)
        self._wake_below = 2 * pool_size
        yield from self._retire(block=lambda: (len(self._entries) > self.max_chunks
                                               or self._outstanding_calls > 2 * pool_size))
        self._metrics.drain()

    def close(self) -> None:
        """Teardown: pool tasks start no further calls (running ones finish)."""
        self._closed = True

    def retire_all(self):
        """Emit every chunk in the window, waiting for their calls (bundle end)."""
        yield from self._retire(block=lambda: True)

    def _retire(self, block):
        """Emit the finished chunks at the head of the window; while ``block()``
        holds, wait for calls to finish (any call: the pool stays fed)."""
        while self._entries:
            head = self._entries[0]
            if all(f.done() for f in head.futures):
                self._entries.popleft()
                try:
                    results = [f.result() for f in head.futures]
                    if isinstance(head.futures, Calls):
                        results = head.futures.results
                except BaseException:
                    self._cancel()  # the bundle fails: start no more queued work of it
                    raise
                head.finish(results)
                if not self._entries:
                    self._busy_s += time.perf_counter() - self._busy_since
                if head.output is not None:
                    yield head.output
                continue
            if not block():
                break
            with self._calls_done:
                if not all(f.done() for f in head.futures) and block():
                    self._calls_done.wait(timeout=0.05)
        self._report_busy()

    def _cancel(self) -> None:
        for entry in self._entries:
            if isinstance(entry.futures, Calls):
                entry.futures.cancel()
                continue
            for f in entry.futures:
                f.cancel()  # only calls not yet started; running ones finish (idempotent)

    def _report_busy(self) -> None:
        ms = int(self._busy_s * 1000)
        if ms:
            self._busy_ms.inc(ms)
            self._busy_s -= ms / 1000.0
