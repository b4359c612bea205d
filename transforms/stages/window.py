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

It also measures the stage's busy time (chunks in flight): ``<stage>_busy_ms``,
a throughput's denominator.
"""
from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass
from typing import Any

from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP, Timestamp
from apache_beam.utils.windowed_value import WindowedValue

from transforms.stages.common import NS, Chunk, StageMetrics

__all__ = ["Window", "InFlight", "windowed"]


def windowed(value, window, timestamp) -> WindowedValue:
    """``value`` in the input element's window (the global window when the DoFn is
    called directly, outside a runner, as tests do)."""
    if not isinstance(timestamp, Timestamp):
        timestamp, window = MIN_TIMESTAMP, GlobalWindow()
    return WindowedValue(value, timestamp, (window,))


@dataclass
class InFlight:
    """A chunk admitted to a stage's window: its calls, what completes it, its output."""

    chunk: Chunk
    futures: list
    finish: Any  # callable(results) run on the bundle thread when every call is done
    output: Any


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

    def admit(self, entry: InFlight, pool_size: int):
        """Add a chunk to the window; emit what has finished, and wait while the
        window is full or the pool has plenty of queued calls."""
        if not self._entries:
            self._busy_since = time.perf_counter()
        self._entries.append(entry)
        yield from self._retire(block=lambda: (len(self._entries) > self.max_chunks
                                               or self._outstanding_calls > 2 * pool_size))
        self._metrics.drain()

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
            for f in entry.futures:
                f.cancel()  # only calls not yet started; running ones finish (idempotent)

    def _report_busy(self) -> None:
        ms = int(self._busy_s * 1000)
        if ms:
            self._busy_ms.inc(ms)
            self._busy_s -= ms / 1000.0
