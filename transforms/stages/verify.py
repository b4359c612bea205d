"""The verify stage: each copy checked against its source before any swap.

Modes (``verification``): ``full`` compares bytes with the source, ``hash``
compares the target's content hash with the hash the copy read, ``sampled``
checks a seeded sample fully and escalates to the whole batch on any mismatch.
A mismatch re-copies (bounded by ``max_retries``), then Failed(verify_mismatch)
-- or, only with ``force_swap_on_verification_failure``, Verified(forced).
Reads only; the re-copies are the copy stage's idempotent upserts.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor

import apache_beam as beam
import numpy as np
from apache_beam.utils.shared import Shared

from pipeline import states as S
from pipeline.errors import ConfigurationError, StoreError
from pipeline.plancore import _mix
from pipeline.retry import is_transient
from transforms.stages.base import StageDoFn
from transforms.stages.common import Chunk, ExecSpec, StageContext
from transforms.stages.copy import Copier
from transforms.stages.guard import MapGuard
from transforms.stages.window import InFlight, Window, windowed

__all__ = ["Verifier", "VerifyCopies", "sample_mask"]

LOG = logging.getLogger("shardmove.execute")

_TO_VERIFY = S.ranks(S.State.COPIED, S.State.VERIFYING)  # tested row by row


def sample_mask(hashes: list, fraction: float, seed: int) -> list:
    """Seeded, deterministic sample of a batch: at least one key per batch."""
    h = np.array(hashes, dtype=np.uint64)
    with np.errstate(over="ignore"):
        u = _mix(h ^ np.uint64(seed % 2**64))
    mask = u.astype(np.float64) / 2.0**64 < fraction
    if len(mask) and not mask.any():
        mask[int(np.argmin(u))] = True
    return list(mask)


class Verifier:
    """Checks copies (reads on a thread pool of ``verify_concurrency``) for one stage DoFn."""

    CHECK_PART = 500  # keys per verification read

    def __init__(self, ctx: StageContext, window: Window, copier: Copier, guard: MapGuard):
        self._ctx = ctx
        self._window = window
        self._copier = copier
        self._guard = guard
        self.pool_size = int(ctx.opts.verify_concurrency)
        self._pool = ThreadPoolExecutor(max_workers=self.pool_size, thread_name_prefix="verify")
        self._verified = ctx.metrics.counter("verified")
        self._forced = ctx.metrics.counter("forced_swaps")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def start_checks(self, ch: Chunk, rows: list, escalated: bool = False):
        """Submit one round of checks of ``rows``; returns (futures, combine(results) ->
        good by method, bad, errored).  ``sampled`` checks a seeded sample fully and
        escalates to the whole batch on any mismatch; after a mismatch and a re-copy
        (``escalated``) it verifies fully: never sample a suspect key."""
        opts = self._ctx.opts
        mode = opts.verification
        if mode == "sampled" and escalated:
            mode = "full"
        if mode != "sampled":
            return self._submit_checks(ch, rows, mode), lambda results: self._combine(results, mode)
        mask = sample_mask([ch.hashes[i] for i in rows], float(opts.sample_fraction), int(opts.sample_seed))
        sample = [i for i, m in zip(rows, mask) if m]
        rest = [i for i, m in zip(rows, mask) if not m]

        def combine(results):
            good, bad, errored = self._combine(results, "full")
            if self._ctx.halted:  # the sample was not (fully) checked: nothing is vouched for
                return {}, [], []
            if bad or errored:  # escalate: the whole batch fully
                g2, b2, e2 = self.check(ch, rest, "full")
                return {S.VERIFY_FULL: good.get("full", []) + g2.get("full", [])}, bad + b2, errored + e2
            return {S.VERIFY_SAMPLED: good.get("full", []), S.VERIFY_UNCHECKED: rest}, [], []

        return self._submit_checks(ch, sample, "full"), combine

    def complete(self, ch: Chunk, todo: list, first) -> None:
        """Record the first round's outcome; re-copy and re-verify mismatches (bounded)."""
        ctx = self._ctx
        max_retries = int(ctx.opts.max_retries)
        rounds = 0
        forced_any = False
        while todo and not ctx.halted:
            if first is not None:
                (good, bad, errored), first = first, None
            else:
                ctx.record(ch, todo, S.State.VERIFYING)
                futures, combine = self.start_checks(ch, todo, escalated=True)
                good, bad, errored = combine([f.result() for f in futures])
            for method, rows in good.items():
                ctx.record(ch, rows, S.State.VERIFIED, method=method)
                self._verified.inc(len(rows))
            if errored:
                ctx.fail(ch, errored, S.VERIFY_FAILED)
            bad = self._guard.spare_swapped(ch, bad)  # swapped meanwhile: the target is the application's
            if not bad:
                break
            if rounds >= max_retries:
                if ctx.opts.force_swap_on_verification_failure:
                    forced_any = True
                    ctx.record(ch, bad, S.State.VERIFIED, method=S.VERIFY_FORCED)
                    self._forced.inc(len(bad))
                else:
                    ctx.fail(ch, bad, S.VERIFY_MISMATCH)
                break
            rounds += 1
            ctx.metrics.count_retry()
            self._copier.copy_rows(ch, bad, recopy=True)  # re-copy, then verify again
            todo = [i for i in bad if ch.states[i] == S.State.COPIED]
        if forced_any:
            LOG.warning("FORCED SWAP: batch %s swaps keys that failed verification "
                        "(force_swap_on_verification_failure=true)", ch.batch_id[:40])

    def check(self, ch: Chunk, rows: list, mode: str):
        """Check ``rows`` now (later rounds, swap-time re-checks)."""
        if not rows:
            return {}, [], []
        return self._combine([f.result() for f in self._submit_checks(ch, rows, mode)], mode)

    def _submit_checks(self, ch: Chunk, rows: list, mode: str) -> list:
        return [self._window.submit(self._pool, self._check_part, ch, rows[a:a + self.CHECK_PART], mode)
                for a in range(0, len(rows), self.CHECK_PART)]

    @staticmethod
    def _combine(results: list, mode: str):
        good, bad, errored = [], [], []
        for g, b, e in results:
            good += g
            bad += b
            errored += e
        return {mode: good} if good else {}, bad, errored

    def _check_part(self, ch: Chunk, rows: list, mode: str):
        ctx = self._ctx
        keys = [ch.keys[i] for i in rows]
        attempt = 0
        while True:
            ctx.metrics.gauge(+1)
            t0 = time.perf_counter()
            try:
                if mode == "full":
                    src = ctx.data.read(keys, ch.source)
                    tgt = ctx.data.read(keys, ch.target)
                else:
                    tgt = ctx.data.hashes(keys, ch.target)
                    src = None
                break
            except Exception as e:  # noqa: BLE001 - filtered: transient retried, store errors reported
                if isinstance(e, ConfigurationError):  # the store's, not the keys': stop the run
                    ctx.halt(e)
                    return [], [], []  # the rows stay Verifying
                if is_transient(e):
                    if ctx.retry.exhausted(attempt):
                        return [], [], list(rows)
                elif isinstance(e, StoreError):
                    return [], [], list(rows)
                else:
                    raise
            finally:
                ctx.metrics.gauge(-1)
                ctx.metrics.sample("verify_ms", (time.perf_counter() - t0) * 1000, len(keys))
            ctx.metrics.count_retry()
            ctx.backoff(attempt)
            attempt += 1
        good, bad = [], []
        for i, k in zip(rows, keys):
            t = tgt.get(k)
            if mode == "full":
                s = src.get(k)
                same = t is not None and s is not None and t[0] == s[0]
            else:
                same = t is not None and t[0] == ch.chash[i]
            (good if same else bad).append(i)
        return good, bad, []


class _VerifyFn(StageDoFn):
    """Chunk -> the same chunk once its Copied/Verifying keys are Verified or Failed.

    The window is 0 chunks by default (each chunk completes before the next is
    admitted): verification reads the target shard the copies are writing, and
    reading it concurrently with them measured slower on SQLite
    (benchmarks/run_bench.py)."""

    STAGE = "verify"
    MAX_WINDOW_CHUNKS = 0

    def compose(self) -> list:
        self.guard = MapGuard(self.ctx)
        self.copier = Copier(self.ctx, self.window, self.guard)
        self.verifier = Verifier(self.ctx, self.window, self.copier, self.guard)
        return [self.guard, self.copier, self.verifier]

    def process(self, ch: Chunk, window=beam.DoFn.WindowParam, timestamp=beam.DoFn.TimestampParam):
        """The first round of checks is submitted and the chunk completes (further
        rounds, re-copies, transitions) when they have finished."""
        if self.ctx.should_stop():
            return
        todo = [i for i, s in enumerate(ch.states) if s in _TO_VERIFY]
        futures, finish = [], (lambda results: None)
        verifier = self.verifier
        if todo:
            self.ctx.record(ch, todo, S.State.VERIFYING)
            futures, combine = verifier.start_checks(ch, todo)
            finish = lambda results: verifier.complete(ch, todo, combine(results))  # noqa: E731
        yield from self.window.admit(InFlight(ch, futures, finish, windowed(ch, window, timestamp)),
                                     verifier.pool_size)


class VerifyCopies(beam.PTransform):
    """Verify each chunk's copies (``verification``: full | hash | sampled).

    Input: a PCollection of :class:`Chunk` (after :class:`CopyKeys`).  Output:
    the same chunks, each once verified; Copied/Verifying rows now Verified(method)
    or Failed(verify_mismatch | verify_failed).  Side effects: reads of both
    shards, bounded re-copies of mismatched keys (idempotent upserts), checkpoint
    transitions.  Idempotent: verifying again reads the same records; a key
    the map routes to its target is never failed for its data.
    """

    def __init__(self, spec: ExecSpec, shared: Shared | None = None):
        super().__init__()
        self._spec = spec
        self._shared = shared

    def expand(self, chunks):
        return chunks | "VerifyChunk" >> beam.ParDo(_VerifyFn(self._spec, self._shared))
