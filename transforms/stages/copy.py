"""The copy stage: idempotent batched copies of a chunk's keys.

Every key not yet verified is looked up in the map first (:class:`MapGuard`):
one already at its target is confirmed by the swap, never copied.  Planned and
Copying keys are copied by mover calls on a thread pool (``copy_concurrency``
per worker) through the per-shard throttles; transient failures are retried on
the run's schedule (:mod:`pipeline.retry`), permanent ones become
Failed(reason) -- except configuration errors (a missing table, a refused
permission: :class:`~pipeline.errors.ConfigurationError`), which stop the run
and fail no key (:meth:`StageContext.halt`).  A copy is an upsert that never clobbers a newer record, so a
retried or duplicated bundle changes nothing twice.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor

import apache_beam as beam
from apache_beam.utils.shared import Shared

from pipeline import states as S
from pipeline.errors import ConfigurationError, PermanentError
from pipeline.retry import is_transient
from transforms.stages.base import StageDoFn
from transforms.stages.common import Chunk, ExecSpec, StageContext
from transforms.stages.guard import MapGuard
from transforms.stages.window import Calls, InFlight, Window, windowed

__all__ = ["Copier", "CopyKeys"]

LOG = logging.getLogger("shardmove.execute")

# states as plain int ranks (:func:`pipeline.states.ranks`): a chunk's rows are tested one by one
_NOT_VERIFIED = S.ranks(S.State.PLANNED, S.State.COPYING, S.State.COPIED, S.State.VERIFYING)
_UNCOPIED = S.ranks(S.State.PLANNED, S.State.COPYING)
_COPIED = S.ranks(S.State.COPIED, S.State.VERIFYING)


class Copier:
    """Copies (and re-copies) rows of chunks for one stage DoFn."""

    def __init__(self, ctx: StageContext, window: Window, guard: MapGuard):
        self._ctx = ctx
        self._window = window
        self._guard = guard
        self.pool_size = int(ctx.opts.copy_concurrency)
        self._pool = ThreadPoolExecutor(max_workers=self.pool_size, thread_name_prefix="copy")
        self._copied = ctx.metrics.counter("copied")
        self._recopied = ctx.metrics.counter("recopied")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def copy_rows(self, ch: Chunk, todo: list, recopy: bool = False) -> None:
        """Copy rows ``todo`` of ``ch`` now (re-copies): concurrent calls, retries, transitions."""
        if not todo:
            return
        calls = self.start_copies(ch, todo)
        for f in calls.futures:
            f.result()
        self.finish_copies(ch, todo, calls.results, recopy)

    def start_copies(self, ch: Chunk, todo: list) -> Calls:
        """Copying markers, then the mover calls submitted (a few pool tasks pull them:
        :meth:`Window.submit_calls`); returns them (their results once their futures are done)."""
        for i in todo:
            ch.attempts[i] += 1
        self._ctx.record(ch, todo, S.State.COPYING)
        per_call = int(getattr(self._ctx.data, "keys_per_call", 0) or len(todo))
        calls = [(ch, todo[a:a + per_call]) for a in range(0, len(todo), per_call)]
        return self._window.submit_calls(self._pool, self._copy_call, calls, self.pool_size)

    def finish_copies(self, ch: Chunk, todo: list, results: list, recopy: bool = False) -> None:
        """Record the calls' outcomes: Copied (hash and version read), or Failed."""
        if not todo:
            return
        ok, failed = {}, {}
        for r_ok, r_failed in results:
            ok.update(r_ok)
            failed.update(r_failed)
        if ok:
            rows = sorted(ok)
            self._ctx.record(ch, rows, S.State.COPIED,
                             chash={i: ok[i][0] for i in rows}, sver={i: ok[i][1] for i in rows},
                             method=None, reason=None)
            # counted once per key: re-copies after a verify mismatch are counted apart
            (self._recopied if recopy else self._copied).inc(len(rows))
        if failed:
            rows = self._guard.spare_swapped(ch, sorted(failed))
            self._ctx.fail(ch, rows, {i: failed[i] for i in rows})

    def _copy_call(self, ch: Chunk, rows: list):
        """One mover call with retries; returns ({row: (hash, version)}, {row: reason})."""
        ctx = self._ctx
        metrics, throttles, data = ctx.metrics, ctx.throttles, ctx.data
        source, target, chunk_keys = ch.source, ch.target, ch.keys
        shards, judged = (source, target), (target,)
        perf_counter = time.perf_counter
        ok, failed = {}, {}
        pending = list(rows)
        attempt = 0
        while pending and not ctx.halted:  # halted: the rest keep their state (Copying)
            keys = [chunk_keys[i] for i in pending]
            # caps count on both shards; the adaptive limit judges the target (the writes)
            permit = throttles.acquire(shards, len(keys), judged=judged)
            healthy = False
            metrics.call_started(permit.waited_s)  # the gauge, the time throttled
            t0 = perf_counter()
            try:
                outcomes = data.copy(keys, source, target)
                err = None
                # a load signal for the throttles: most keys of the call failed transiently
                errors = [o.error for o in outcomes if o.error is not None]
                healthy = not errors or 2 * sum(1 for e in errors if is_transient(e)) <= len(outcomes)
            except PermanentError as e:
                outcomes, err = None, e
                healthy = True  # the store answered: not a load signal
            except Exception as e:  # noqa: BLE001 - filtered: only transient errors are retried
                if not is_transient(e):
                    raise
                outcomes, err = None, e
            finally:
                throttles.release(permit, healthy)
                metrics.call_ended("copy_ms", (perf_counter() - t0) * 1000, len(keys))  # the gauge, a sample
            if outcomes is None:
                if isinstance(err, ConfigurationError):  # the store's, not the keys': stop the run
                    ctx.halt(err)
                    return ok, failed
                if isinstance(err, PermanentError):
                    LOG.warning("copy: batch %s: %d keys Failed(%s): %s", ch.batch_id[:40], len(pending),
                                S.failure_reason(err.reason), err)
                    for i in pending:
                        failed[i] = S.failure_reason(err.reason)
                    return ok, failed
                if ctx.retry.exhausted(attempt):
                    for i in pending:
                        failed[i] = S.COPY_FAILED
                    return ok, failed
                metrics.count_retry()
                ctx.backoff(attempt)
                attempt += 1
                for i in pending:
                    ch.attempts[i] += 1
                continue
            retry = []
            halt = None
            for i, out in zip(pending, outcomes):
                if out.error is None:
                    ok[i] = (out.content_hash, out.source_version)
                elif is_transient(out.error):
                    retry.append(i)
                elif isinstance(out.error, ConfigurationError):
                    halt = out.error  # e.g. a write refused on the target: the key keeps its state
                else:
                    failed[i] = S.failure_reason(getattr(out.error, "reason", None))
            if halt is not None:
                ctx.halt(halt)
                return ok, failed
            if retry and ctx.retry.exhausted(attempt):
                for i in retry:
                    failed[i] = S.COPY_FAILED
                retry = []
            if retry:
                metrics.count_retry()
                ctx.backoff(attempt)
                attempt += 1
                for i in retry:
                    ch.attempts[i] += 1
            pending = retry
        return ok, failed


class _CopyFn(StageDoFn):
    """Chunk -> the same chunk once its copies finished (Copied, Verified(already_swapped)
    or Failed keys); a bounded window of chunks in flight (:mod:`transforms.stages.window`)."""

    STAGE = "copy"
    MAX_WINDOW_CHUNKS = 2

    def compose(self) -> list:
        self.guard = MapGuard(self.ctx)
        self.copier = Copier(self.ctx, self.window, self.guard)
        return [self.guard, self.copier]

    def process(self, ch: Chunk, window=beam.DoFn.WindowParam, timestamp=beam.DoFn.TimestampParam):
        if self.ctx.should_stop():
            return
        # every key not yet verified is looked up first: one already at its target (an
        # earlier run swapped it) is confirmed by the swap, never copied or verified again
        # against a copy-time hash the application has since overwritten on the target
        pending = [i for i, s in enumerate(ch.states) if s in _NOT_VERIFIED]
        if pending:
            self.guard.keep_at_source(ch, pending)
            if self.ctx.halted:  # the map could not be read: a configuration error stopped the run
                return
        # copied keys without the hash their copy read (not written by this executor) cannot
        # be verified: they go through a failed verification to a re-copy
        states, chash = ch.states, ch.chash
        todo = [i for i in pending if states[i] in _UNCOPIED or (states[i] in _COPIED and chash[i] is None)]
        self.ctx.record(ch, [i for i in todo if ch.states[i] == S.State.COPIED], S.State.VERIFYING)
        copier = self.copier
        calls = copier.start_copies(ch, todo) if todo else []
        yield from self.window.admit(InFlight(ch, calls, lambda results: copier.finish_copies(ch, todo, results),
                                              windowed(ch, window, timestamp)), copier.pool_size)


class CopyKeys(beam.PTransform):
    """Copy the chunks' keys from their source shard to their target shard.

    Input: a PCollection of :class:`Chunk`.  Output: the same chunks, each once
    its copies have finished, in input order per bundle; rows now Copied (with
    the content hash and source version the copy read), Verified(already_swapped)
    (found at their target in the map) or Failed(reason).  Side effects:
    upserts on the target shard (never clobbering a newer record), checkpoint
    transitions (Copying, Copied, Failed).  Idempotent: a key the map routes to
    its target is never copied; a repeated copy writes the same record again.
    """

    def __init__(self, spec: ExecSpec, shared: Shared | None = None):
        super().__init__()
        self._spec = spec
        self._shared = shared

    def expand(self, chunks):
        return chunks | "CopyChunk" >> beam.ParDo(_CopyFn(self._spec, self._shared))
