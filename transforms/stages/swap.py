"""The swap stage: all-or-nothing compare-and-set batches, behind the write fence.

Write fence: where the map store can check source record versions inside the
swap transaction (``supports_fence``: SQLite with the shard attached,
PostgreSQL with map and shard in one database) it does; a key whose source
changed since its copy is re-copied and re-verified (bounded by
``max_retries``, then Failed(source_changing)).  Elsewhere the source versions
are re-checked just before the swap, with the same re-copy loop; the window
between that check and the swap commit is measured (``fence_window_ms``) and
closed only by fence-aware writers.

A configuration error (the map's or a shard's table gone, a permission
refused) stops the run (:meth:`StageContext.halt`): the batch's keys stay
Swapping -- a rerun repeats the compare-and-set -- and none is Failed.

The stage is fused with verification (no shuffle between them): each chunk's
swap runs on ONE swapper thread per DoFn instance, so map writes of a worker
stay one at a time on one connection (whose page cache stays warm), while the
bundle thread goes on copying and verifying the next chunks; at most
``MAX_WINDOW_CHUNKS`` chunks wait for the swapper, and bundle end waits for
all of them.  A retried bundle redoes its chunks' copies and verification
(idempotent; keys already swapped are found at their target and confirmed)
before their swaps.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor

import apache_beam as beam
from apache_beam.utils.shared import Shared

from pipeline import states as S
from pipeline.errors import ConfigurationError
from pipeline.retry import is_transient
from pipeline.stores.base import RunRegistry, WriteFencing
from transforms.stages.base import StageDoFn
from transforms.stages.common import Chunk, ExecSpec, StageContext
from transforms.stages.copy import Copier
from transforms.stages.guard import MapGuard
from transforms.stages.verify import Verifier
from transforms.stages.window import InFlight, Window

__all__ = ["Swapper", "SwapBatches"]

LOG = logging.getLogger("shardmove.execute")

_TO_SWAP = S.ranks(S.State.VERIFIED, S.State.SWAPPING)  # tested row by row


class Swapper:
    """Swaps chunks (on one swapper thread) for one stage DoFn."""

    def __init__(self, ctx: StageContext, window: Window, copier: Copier, verifier: Verifier, guard: MapGuard):
        self._ctx = ctx
        self._window = window
        self._copier = copier
        self._verifier = verifier
        self._guard = guard
        self._swapped = ctx.metrics.counter("swapped")
        self._source_changed = ctx.metrics.counter("source_changed_recopies")
        inner = getattr(ctx.data, "_inner", ctx.data)
        supports = getattr(ctx.map, "supports_fence", None)
        self._strict = bool(inner is not None and supports is not None and supports(inner)
                            and ctx.opts.write_fence == "auto")
        self._fence_store = inner if self._strict else None
        self._token = (ctx.spec.plan_id, ctx.spec.epoch) if isinstance(ctx.map, RunRegistry) else None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="swap")
        # the fence check of the next chunk, ahead of its swap and outside the map's lock
        # (SqliteMapStore.fence_precheck): the swapper thread -- the serial path -- then
        # holds the locks for the compare-and-set and the commit only
        self._precheck = getattr(ctx.map, "fence_precheck", None) if self._strict else None
        self._check_pool = (ThreadPoolExecutor(max_workers=1, thread_name_prefix="swap-check")
                            if self._precheck is not None else None)
        self._prechecks_stood = ctx.metrics.counter("fence_prechecks_stood")

    def close(self) -> None:
        # a swap in progress finishes (Done only after its commit); queued ones never start
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._check_pool is not None:
            self._check_pool.shutdown(wait=True, cancel_futures=True)

    def submit(self, ch: Chunk, rows: list):
        ahead = None
        if self._check_pool is not None:
            items = self._items(ch, rows)
            ahead = (items, self._check_pool.submit(self._fence_precheck, items))
        fut = self._window.submit(self._pool, self.swap_chunk, ch, rows, ahead)
        if ahead is not None:  # the pre-check's connection goes back once the swap is done, ran or cancelled
            fut.add_done_callback(lambda _f: ahead[1].add_done_callback(_close_precheck))
        return fut

    @staticmethod
    def _items(ch: Chunk, rows: list) -> list:
        # a forced key's target differs from its source by definition: the fence checks its version only
        return [(ch.keys[i], ch.source, ch.target, ch.sver[i], ch.method[i] != S.VERIFY_FORCED) for i in rows]

    def _fence_precheck(self, items: list):
        try:
            return self._precheck(items, fence=self._fence_store)
        except Exception as e:  # noqa: BLE001 - an optimisation: the swap checks inside its lock
            LOG.debug("fence pre-check failed (%s); the swap checks inside its lock", type(e).__name__)
            return None

    def swap_chunk(self, ch: Chunk, rows: list, ahead=None) -> None:
        """One chunk's swap (on the swapper thread): CAS batches until every row is
        Done or Failed, re-copying rows whose source changed since their copy.
        ``ahead``: (the first attempt's items, a future of their fence pre-check); its
        connection goes back once this swap's future is done, used or not (:meth:`submit`)."""
        ctx = self._ctx
        ctx.record(ch, rows, S.State.SWAPPING)
        attempt = 0
        changes: dict = {}
        while rows and not ctx.halted:
            try:
                res, changed = self.swap_once(ch, rows, ahead)
            except ConfigurationError as e:  # the stores', not the keys': stop the run
                ctx.halt(e)
                break
            ahead = None  # only the first attempt is of the items checked ahead
            if changed:  # sources changed since their copy: re-copy outside the fence, then again
                rows = self._recopy_changed(ch, rows, changed, changes)
                continue
            if res is None:  # transient
                if ctx.retry.exhausted(attempt):
                    ctx.fail(ch, rows, S.SWAP_FAILED)
                    break
                ctx.metrics.count_retry()
                ctx.backoff(attempt)
                attempt += 1
                continue
            if res.committed:
                done = [rows[j] for j in list(res.applied) + list(res.already)]
                ctx.record(ch, sorted(done), S.State.DONE)
                self._swapped.inc(len(done))
                # Done follows the flush policy like every other transition: a Done lost
                # to a crash costs the rerun one lookup (the key is found at its target)
                break
            conflicts = {rows[j] for j in res.conflicts}
            if conflicts:
                LOG.warning("swap batch %s: %d keys no longer at their expected source (map_changed)",
                            ch.batch_id[:40], len(conflicts))
                ctx.fail(ch, sorted(conflicts), S.MAP_CHANGED)
            changed = sorted(rows[j] for j in res.source_changed)
            rows = [i for i in rows if i not in conflicts]
            if changed:
                rows = self._recopy_changed(ch, rows, changed, changes)
        # transitions follow the flush policy (count, interval) and bundle end

    def swap_once(self, ch: Chunk, rows: list, ahead=None):
        """One fenced swap attempt: (SwapResult | None if transient, changed rows).
        ``ahead``: (these rows' items, a future of their fence pre-check)."""
        ctx = self._ctx
        data = ctx.data
        fence_cm = None
        if not self._strict and isinstance(data, WriteFencing):
            fence_cm = data.write_fence(ch.source)
        try:
            versions = fence_cm.__enter__() if fence_cm is not None else None
        except Exception as e:  # noqa: BLE001 - filtered
            if is_transient(e):
                return None, []
            raise
        try:
            t_check = time.perf_counter()
            if not self._strict and data is not None:
                changed = self._recheck_sources(ch, rows, versions)
                if changed:
                    return None, changed
            kw = {}
            pre = None
            if ahead is not None:
                items, fut = ahead
                pre = fut.result()
                if pre is not None:
                    kw["precheck"] = pre
            else:
                items = self._items(ch, rows)
            if self._strict:
                kw["fence"] = self._fence_store
            if self._token is not None:
                kw["token"] = self._token
            t0 = time.perf_counter()
            try:
                ctx.fence()
                res = ctx.map.swap_batch(items, **kw)
            except Exception as e:  # noqa: BLE001 - filtered
                if is_transient(e):
                    return None, []
                raise
            finally:
                ctx.metrics.sample("swap_batch_ms", (time.perf_counter() - t0) * 1000, len(items))
                if pre is not None:
                    if pre.stood:
                        self._prechecks_stood.inc()
                    pre.close()
            if res.committed and not self._strict:
                # the window in which a fence-unaware writer could still change a source
                ctx.metrics.sample("fence_window_ms", (time.perf_counter() - t_check) * 1000, len(items))
            return res, []
        finally:
            if fence_cm is not None:
                fence_cm.__exit__(None, None, None)

    def _recheck_sources(self, ch: Chunk, rows: list, versions=None) -> list:
        """Rows whose source record changed (or vanished) since the copy read it."""
        ctx = self._ctx
        rows = [i for i in rows if ch.method[i] != S.VERIFY_ALREADY]  # applied in an earlier run
        if not rows:
            return []
        keys = [ch.keys[i] for i in rows]
        try:
            if versions is not None:  # read under the source's write lock: (content hash, version)
                current = versions(keys)
            else:  # stores whose every write changes the version (object generations)
                current = {k: (None, v) for k, (_h, v) in
                           ctx.retry_io(ctx.data.hashes, keys, ch.source).items()}
        except Exception as e:  # noqa: BLE001 - filtered
            if is_transient(e):
                return []  # cannot tell: the swap's own checks still apply
            raise
        # the version and the content: an application may rewrite a record and keep its
        # version (SQLite shards: the version is the application's to stamp)
        return [i for i, k in zip(rows, keys)
                if k not in current
                or (ch.sver[i] is not None and current[k][1] != ch.sver[i])
                or (ch.chash[i] is not None and current[k][0] is not None and current[k][0] != ch.chash[i])]

    def _recopy_changed(self, ch: Chunk, rows: list, changed: list, changes: dict) -> list:
        """Re-copy and re-verify keys whose source changed; give up after max_retries."""
        ctx = self._ctx
        limit = int(ctx.opts.max_retries)
        again, give_up = [], []
        for i in changed:
            changes[i] = changes.get(i, 0) + 1
            (give_up if changes[i] > limit else again).append(i)
        if give_up:
            ctx.fail(ch, give_up, S.SOURCE_CHANGING)
        if again:
            self._source_changed.inc(len(again))
            # the swap of these keys did not happen (rolled back, or not attempted): back to
            # Verified, whose source then changed -> re-copy, re-verify, swap again
            ctx.record(ch, [i for i in again if ch.states[i] == S.State.SWAPPING], S.State.VERIFIED)
            self._copier.copy_rows(ch, again, recopy=True)
            copied = [i for i in again if ch.states[i] == S.State.COPIED]
            ctx.record(ch, copied, S.State.VERIFYING)
            good, bad, errored = self._verifier.check(ch, copied, "hash")
            for method, ok_rows in good.items():
                ctx.record(ch, ok_rows, S.State.VERIFIED, method=method)
            if bad:
                ctx.fail(ch, self._guard.spare_swapped(ch, bad), S.VERIFY_MISMATCH)
            if errored:
                ctx.fail(ch, errored, S.VERIFY_FAILED)
            # verified again (or found at the target meanwhile): swap them again
            ctx.record(ch, [i for i in again if ch.states[i] == S.State.VERIFIED], S.State.SWAPPING)
        changed_set = set(changed)
        return [i for i in rows if i not in changed_set or ch.states[i] == S.State.SWAPPING]


def _close_precheck(fut) -> None:
    if not fut.cancelled() and fut.exception() is None and fut.result() is not None:
        fut.result().close()


class _SwapFn(StageDoFn):
    """Chunk -> nothing: Verified/Swapping keys swapped in the map (Done) or Failed."""

    STAGE = "swap"
    MAX_WINDOW_CHUNKS = 2

    def compose(self) -> list:
        self.guard = MapGuard(self.ctx)
        self.copier = Copier(self.ctx, self.window, self.guard)
        self.verifier = Verifier(self.ctx, self.window, self.copier, self.guard)
        self.swapper = Swapper(self.ctx, self.window, self.copier, self.verifier, self.guard)
        return [self.guard, self.copier, self.verifier, self.swapper]

    def process(self, ch: Chunk, window=beam.DoFn.WindowParam, timestamp=beam.DoFn.TimestampParam):
        if self.ctx.should_stop():
            return
        rows = [i for i, s in enumerate(ch.states) if s in _TO_SWAP]
        if not rows:
            return
        fut = self.swapper.submit(ch, rows)
        # emits nothing: the window only bounds the chunks waiting for the swapper
        yield from self.window.admit(InFlight(ch, [fut], lambda results: None, None), pool_size=1)


class SwapBatches(beam.PTransform):
    """Swap each chunk's verified keys in the map: one all-or-nothing CAS batch per chunk.

    Input: a PCollection of :class:`Chunk` (after :class:`VerifyCopies`).
    Output: an empty PCollection (the run's outcome is its checkpoints).  Side
    effects: map writes (compare-and-set from source to target, behind the write
    fence and the run's lease/claim token), checkpoint transitions (Swapping,
    Done, Failed(map_changed | source_changing | swap_failed)), re-copies of
    keys whose source changed.  Idempotent: a key already at its target counts
    as applied, so a retried or duplicated batch changes nothing twice.
    """

    def __init__(self, spec: ExecSpec, shared: Shared | None = None):
        super().__init__()
        self._spec = spec
        self._shared = shared

    def expand(self, chunks):
        return chunks | "SwapChunk" >> beam.ParDo(_SwapFn(self._spec, self._shared))
