"""The executor as Beam transforms: copy -> verify -> grouped swap, checkpointed.

Flow (read top to bottom in :func:`build_run_graph`)::

    LoadWork         group file + merged checkpoints -> chunks of <= swap_batch_size
                     keys in plan order (chunk ids derived from plan order);
                     terminal keys are skipped
    StableInput      Reshuffle of chunks (Dataflow's stable-input idiom)
    CopyKeys         every key not yet verified is looked up in the map (one at
                     its target is confirmed by the swap, never copied, verified
                     or failed); Planned/Copying keys: idempotent batched copies, up to
                     copy_concurrency calls in flight, transient retries with
                     exponential backoff, permanent errors -> Failed(reason)
    VerifyCopies     Copied/Verifying keys: full | hash | sampled; a mismatch
                     re-copies (bounded) then Failed(verify_mismatch)
    SwapBatches      Verified/Swapping keys: one all-or-nothing compare-and-set
                     batch per chunk; conflicts -> Failed(map_changed) and the
                     rest retried as a new batch; Done only after commit

Copy, verify and swap are fused (one shuffle, before the copy); inside a
worker they overlap: the copy stage keeps a window of chunks whose mover
calls run on a thread pool, checkpoint parts are encoded and committed by a
background thread, and swaps run on one swapper thread per worker while the
bundle thread copies and verifies the next chunks.

Mover calls (copies and re-copies) pass through per-shard throttles
(:mod:`transforms.throttle`, built on Beam's ``AdaptiveThrottler``): caps on
calls in flight and keys per second per shard, and an adaptive concurrency
limit that backs off when a shard's latency or error rate rises.  The
throttles are shared by every DoFn of a worker process
(``apache_beam.utils.shared.Shared``); time spent throttled is reported as
the ``throttled_ms`` counter and Beam's ``cumulativeThrottlingSeconds``
(what Dataflow's autoscaler reads).

Every stage records its transitions through a :class:`CheckpointWriter` per
work group (flushed by count, by interval -- a timer thread per stage -- and
always at bundle end), so a rerun resumes each key from its last committed
state.  Each record names the state its keys leave, and the writer refuses
any transition the state machine (``pipeline/states.py``) does not allow.  Every side effect is
idempotent (copy = upsert that never clobbers a newer record; swap = CAS that
treats "already at target" as applied), so a retried or duplicated bundle
changes nothing twice.  Keys never appear in logs: only short hash prefixes.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Mapping

import apache_beam as beam
import numpy as np
import pyarrow.parquet as pq
from apache_beam.io.components.adaptive_throttler import ThrottlingSignaler
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.shared import Shared
from apache_beam.utils.timestamp import MIN_TIMESTAMP, Timestamp
from apache_beam.utils.windowed_value import WindowedValue

from pipeline import checkpoint as ckpt
from pipeline import fs
from pipeline import states as S
from pipeline import workdir
from pipeline.errors import PermanentError, StoreError, TransientError
from pipeline.faults import Crasher, checkpoint_fault, wrap_stores
from pipeline.keys import KeyType
from pipeline.lease import LeaseLost
from pipeline.logsafe import cap_beam_loggers
from pipeline.names import parse_group_id
from pipeline.plancore import _mix
from pipeline.stores import data_store_from_spec, map_store_from_spec
from pipeline.stores.base import RunRegistry, WriteFencing
from transforms.throttle import ShardThrottles, ThrottleConfig

__all__ = ["ExecSpec", "Chunk", "LoadWork", "CopyKeys", "VerifyCopies", "SwapBatches", "build_run_graph",
           "throttle_config"]

LOG = logging.getLogger("shardmove.execute")
NS = "shardmove"
MAX_BACKOFF_S = 30.0


@dataclass(frozen=True)
class ExecSpec:
    """Picklable description of one run (one epoch) of a plan."""

    plan_dir: str
    plan_id: str
    epoch: int
    key_type: KeyType
    map_store: Mapping[str, Any]
    data_store: Mapping[str, Any]
    options: Mapping[str, Any]
    groups: tuple  # ((group id, rows), ...)
    retry_failed: bool = False
    faults: Mapping[str, Any] = field(default_factory=dict)
    stop_path: str = ""
    lease_path: str = ""


@dataclass(repr=False)
class Chunk:
    """Up to swap_batch_size keys of one work group, in plan order.

    Its repr names the batch and its size, never its keys (a Beam element's
    repr can reach a log)."""

    gid: str
    index: int
    source: str
    target: str
    keys: list
    hashes: list
    states: list
    attempts: list
    chash: list
    sver: list
    method: list
    reason: list

    @property
    def batch_id(self) -> str:
        return f"{self.gid}#{self.index:06d}"

    def __len__(self):
        return len(self.keys)

    def __repr__(self) -> str:
        return f"Chunk({self.batch_id}, {len(self.keys)} keys)"


def throttle_config(options: Mapping[str, Any]) -> ThrottleConfig:
    """The per-shard throttling settings of a run's options (0 = no cap)."""
    return ThrottleConfig(
        max_in_flight=int(options.get("shard_max_in_flight", 0) or 0),
        max_keys_per_s=float(options.get("shard_max_keys_per_s", 0) or 0),
        adaptive=bool(options.get("adaptive_throttling", True)),
        initial_limit=min(4, int(options.get("copy_concurrency", 4) or 4)),
    )


_IN_PROGRESS = frozenset({int(S.State.COPYING), int(S.State.VERIFYING), int(S.State.SWAPPING)})


# ------------------------------------------------------------- shared base

_COUNTER_LOCK = threading.Lock()


class _DeferredCounter:
    """A Beam counter that any thread may increment: Beam metrics live in the
    bundle thread's context (elsewhere an increment is silently lost), so the
    increments are summed here and pushed by ``_StageFn._drain()`` on the
    bundle thread."""

    def __init__(self, counter):
        self._counter = counter
        self._pending = 0

    def inc(self, n: int = 1) -> None:
        with _COUNTER_LOCK:
            self._pending += n

    def flush(self) -> None:
        with _COUNTER_LOCK:
            n, self._pending = self._pending, 0
        if n:
            self._counter.inc(n)


class _StageFn(beam.DoFn):
    """Opens stores in setup(), keeps one checkpoint writer per group, flushes
    at bundle end, and honours the stop marker (graceful SIGINT/SIGTERM)."""

    STAGE = "stage"

    def __init__(self, spec: ExecSpec, shared: Shared | None = None):
        self._spec = spec
        # one handle for every stage of a run: the throttles are per process
        self._shared = shared if shared is not None else Shared()
        self._throttled_ms = Metrics.counter(NS, "throttled_ms")
        self._signaler = ThrottlingSignaler(NS)  # cumulativeThrottlingSeconds
        self._retries = Metrics.counter(NS, "retries")
        self._deferred: list = []  # counters incremented on any thread, pushed by _drain()
        self._failed = self._counter("failed")
        self._active = Metrics.gauge(NS, f"active_{self.STAGE}")
        self._dists = {n: Metrics.distribution(NS, n) for n in ("copy_ms", "verify_ms", "swap_batch_ms", "fence_window_ms")}

    # -- lifecycle
    def setup(self):
        cap_beam_loggers()  # this worker's Beam loggers never print elements (keys)
        spec = self._spec
        ms = map_store_from_spec(spec.map_store, spec.key_type)
        ds = data_store_from_spec(spec.data_store, spec.key_type)
        self._map, self._data, self._faults = wrap_stores(ms, ds, spec.faults)
        self._crasher = Crasher(int((spec.faults or {}).get("crash_after_transitions", 0) or 0))
        self._writers: dict = {}
        self._stop_checked = 0.0
        self._stopped = False
        self._gauge_lock = threading.Lock()
        self._in_flight = 0
        self._peak = 0
        self._timings: list = []
        self._opts = dict(spec.options)
        self._tally_lock = threading.Lock()
        self._tally = {"retries": 0, "throttled_s": 0.0}
        self._throttle_carry = 0.0
        self._samples: dict = {}
        # one thread per DoFn encodes and commits checkpoint parts while the stage works on;
        # bundle end and stop wait for it (CheckpointWriter.flush)
        self._committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"ckpt-{self.STAGE}")
        tcfg = throttle_config(self._opts)
        self._throttles = self._shared.acquire(lambda: ShardThrottles(tcfg),
                                               tag=(spec.plan_id, spec.epoch, tcfg))
        # checkpoint_flush_interval is honoured by a timer: a group's transitions often come
        # in one burst (a group smaller than a chunk), after which no record would check it
        self._timer_stop = threading.Event()
        self._timer = threading.Thread(target=self._flush_timer, name=f"ckpt-timer-{self.STAGE}", daemon=True)
        self._timer.start()

    def _flush_timer(self):
        interval = float(self._opts["checkpoint_flush_interval"])
        period = min(max(interval / 4, 0.01), 0.5)
        while not self._timer_stop.wait(period):
            for w in list(self._writers.values()):
                try:
                    w.flush_if_due()
                except Exception as e:  # noqa: BLE001 - kept as pending: the bundle's next waiting flush raises it
                    LOG.debug("%s: timed checkpoint flush failed (%s)", self.STAGE, type(e).__name__)

    def teardown(self):
        stop = getattr(self, "_timer_stop", None)
        if stop is not None:
            stop.set()
            self._timer.join(timeout=5)
        committer = getattr(self, "_committer", None)
        if committer is not None:
            committer.shutdown(wait=True)  # a part being committed finishes (it holds only facts)
        for s in (getattr(self, "_map", None), getattr(self, "_data", None)):
            try:
                if s is not None and hasattr(s, "close"):
                    s.close()
            except Exception:  # best effort only
                pass

    def start_bundle(self):
        self._writers = {}

    def finish_bundle(self):
        self._flush_all()
        self._drain()

    # -- helpers
    def _fence(self):
        path = self._spec.lease_path
        if not path:
            return
        import json

        try:
            cur = json.loads(fs.read_bytes(path))
        except (OSError, ValueError):
            return
        if cur.get("epoch") != self._spec.epoch:
            raise LeaseLost(f"lease lost: plan is now held by epoch {cur.get('epoch')}")

    def _writer(self, gid: str) -> ckpt.CheckpointWriter:
        w = self._writers.get(gid)
        if w is None:
            o = self._opts
            w = ckpt.CheckpointWriter(
                self._spec.plan_dir, self._spec.plan_id, gid, self._spec.epoch,
                flush_every=int(o["checkpoint_flush_every_transitions"]),
                flush_interval_s=float(o["checkpoint_flush_interval"]),
                extras_fn=self._extras,
                fence=self._checkpoint_fence,
                committer=self._committer,  # count/interval flushes commit in the background
                check_transitions=True,  # every record names the state it leaves (the state machine)
            )
            self._writers[gid] = w
        return w

    def _checkpoint_fence(self):
        checkpoint_fault(self._faults, self.STAGE)
        self._fence()

    def _extras(self):
        with self._gauge_lock:  # the in-flight peak since the previous part
            peak, self._peak = self._peak, self._in_flight
        with self._tally_lock:
            timings, self._timings = self._timings, []
        import json


        return {"stage": self.STAGE, f"active_{self.STAGE}": str(peak), "timings": json.dumps(timings)}

    def _flush_all(self):
        for w in self._writers.values():
            self._retry_io(w.flush)

    def _retry_io(self, fn, *args):
        delay = float(self._opts["retry_base_delay"])
        for attempt in range(int(self._opts["max_retries"]) + 1):
            try:
                return fn(*args)
            except TransientError:
                if attempt >= int(self._opts["max_retries"]):
                    raise
                self._count_retry()
                time.sleep(min(MAX_BACKOFF_S, delay * 2 ** attempt))

    def _record(self, ch: Chunk, idx, state, **cols):
        """Record transitions of chunk rows ``idx`` to ``state``; update the chunk."""
        if not idx:
            return
        w = self._writer(ch.gid)
        prev = [ch.states[i] for i in idx]
        for i in idx:
            ch.states[i] = int(state)
            for name, values in cols.items():
                getattr(ch, name)[i] = values[i] if isinstance(values, dict) else values
        w.record_many(
            [ch.keys[i] for i in idx],
            np.array([ch.hashes[i] for i in idx], dtype=np.uint64),
            int(state),
            [ch.attempts[i] for i in idx],
            [ch.reason[i] for i in idx],
            [ch.chash[i] for i in idx],
            [ch.sver[i] for i in idx],
            [ch.method[i] for i in idx],
            # in-progress markers ride along with the next flush instead of forcing one:
            # losing one only makes a resume redo idempotent work
            may_flush=int(state) not in _IN_PROGRESS,
            prev=prev,  # the writer refuses a transition the state machine does not allow
        )
        self._crasher.tick(len(idx))

    def _fail(self, ch: Chunk, idx, reasons):
        """reasons: a code for all, or {row: code}."""
        if not idx:
            return
        self._record(ch, idx, S.State.FAILED, reason=reasons)
        self._failed.inc(len(idx))

    def _should_stop(self) -> bool:
        if self._stopped:
            return True
        now = time.monotonic()
        if self._spec.stop_path and now - self._stop_checked > 0.25:
            self._stop_checked = now
            if fs.exists(self._spec.stop_path):
                self._stopped = True
                LOG.warning("%s: stop requested; flushing checkpoints", self.STAGE)
        return self._stopped

    def _gauge(self, delta: int):
        with self._gauge_lock:
            self._in_flight += delta
            if self._in_flight > self._peak:
                self._peak = self._in_flight

    def _count_retry(self, n: int = 1):
        """Thread-safe: pool threads have no Beam metrics context; see _drain()."""
        with self._tally_lock:
            self._tally["retries"] += n

    def _count_throttled(self, seconds: float):
        """Thread-safe, like _count_retry."""
        if seconds > 0:
            with self._tally_lock:
                self._tally["throttled_s"] += seconds

    def _sample(self, name: str, ms: float, keys: int):
        with self._tally_lock:
            self._samples.setdefault(name, []).append(int(ms))
            self._timings.append([name.split("_")[0], round(ms, 3), keys])

    def _counter(self, name: str) -> "_DeferredCounter":
        c = _DeferredCounter(Metrics.counter(NS, name))
        self._deferred.append(c)
        return c

    def _drain(self):
        """Push what pool threads tallied into Beam metrics (on the bundle thread)."""
        for c in self._deferred:
            c.flush()
        with self._gauge_lock:
            if self._peak:
                self._active.set(self._peak)
        with self._tally_lock:
            tally, self._tally = self._tally, {"retries": 0, "throttled_s": 0.0}
            samples, self._samples = self._samples, {}
        if tally["retries"]:
            self._retries.inc(tally["retries"])
        if tally["throttled_s"]:
            self._throttled_ms.inc(int(round(tally["throttled_s"] * 1000)))
            # Beam's counter takes whole seconds: carry the fraction over
            self._throttle_carry += tally["throttled_s"]
            whole = int(self._throttle_carry)
            if whole:
                self._signaler.signal_throttled(whole)
                self._throttle_carry -= whole
        for name, values in samples.items():
            dist = self._dists.get(name)
            if dist is not None:
                for v in values:
                    dist.update(v)

    def _backoff(self, attempt: int):
        base = float(self._opts["retry_base_delay"])
        time.sleep(min(MAX_BACKOFF_S, base * 2 ** attempt))


# ------------------------------------------------------------------ load

class _LoadWorkFn(beam.DoFn):
    """group id -> Chunks of its non-terminal keys, in plan order."""

    def __init__(self, spec: ExecSpec):
        self._spec = spec
        self._planned = Metrics.counter(NS, "planned")
        self._skipped = Metrics.counter(NS, "skipped_terminal")

    def process(self, element):
        gid, _rows = element
        spec = self._spec
        source, target, _bucket = parse_group_id(gid)
        path = workdir.move_file(spec.plan_dir, gid)
        with fs.open_input(path) as f:
            plan = pq.read_table(f, columns=["key", "key_hash"])
        n = plan.num_rows
        self._planned.inc(n)
        keys = plan.column("key").to_pylist()
        hashes = plan.column("key_hash").to_numpy().tolist()
        state = ckpt.read_group(spec.plan_dir, spec.plan_id, gid).table
        known = {}
        if state.num_rows:
            sk = state.column("key").to_pylist()
            cols = {c: state.column(c).to_pylist() for c in
                    ("state", "attempts", "content_hash", "source_version", "verify_method", "reason")}
            for j, k in enumerate(sk):
                known[k] = j
        B = int(spec.options["swap_batch_size"])
        for start in range(0, n, B):
            ch = Chunk(gid, start // B, source, target, [], [], [], [], [], [], [], [])
            for i in range(start, min(n, start + B)):
                k = keys[i]
                j = known.get(k)
                if j is None:
                    st, att, chh, sv, vm, rs = int(S.State.PLANNED), 0, None, None, None, None
                else:
                    st = cols["state"][j]
                    att = cols["attempts"][j]
                    chh, sv = cols["content_hash"][j], cols["source_version"][j]
                    vm, rs = cols["verify_method"][j], cols["reason"][j]
                if st == S.State.DONE or (st == S.State.FAILED and not spec.retry_failed):
                    self._skipped.inc()
                    continue
                if st == S.State.FAILED:  # --retry-failed: start over in this epoch
                    st, chh, sv, vm, rs = int(S.State.PLANNED), None, None, None, None
                ch.keys.append(k)
                ch.hashes.append(hashes[i])
                ch.states.append(st)
                ch.attempts.append(att)
                ch.chash.append(chh)
                ch.sver.append(sv)
                ch.method.append(vm)
                ch.reason.append(rs)
            if ch.keys:
                yield ch


class LoadWork(beam.PTransform):
    def __init__(self, spec: ExecSpec):
        super().__init__()
        self._spec = spec

    def expand(self, pbegin):
        return (
            pbegin
            | "ListGroups" >> beam.Create(list(self._spec.groups))
            | "ReadGroupWork" >> beam.ParDo(_LoadWorkFn(self._spec))
        )


# ------------------------------------------------------------------ copy

class _CopyFn(_StageFn):
    STAGE = "copy"

    def __init__(self, spec: ExecSpec, shared: Shared | None = None):
        super().__init__(spec, shared)
        self._copied = self._counter("copied")
        self._recopied = self._counter("recopied")
        # wall time during which the stage had chunks in flight (its throughput's denominator):
        # copy_busy_ms, verify_busy_ms
        self._busy_ms = Metrics.counter(NS, f"{self.STAGE}_busy_ms")

    def setup(self):
        super().setup()
        self._pool_size = int(self._opts["copy_concurrency"])
        self._pool = ThreadPoolExecutor(max_workers=self._pool_size, thread_name_prefix="copy")
        self._window = collections.deque()
        self._outstanding_calls = 0  # submitted and not finished (pool threads decrement)
        self._calls_done = threading.Condition()
        self._busy_s = 0.0
        self._busy_since = 0.0

    def teardown(self):
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        super().teardown()

    # The copy stage keeps a bounded window of chunks in flight: process()
    # admits a chunk (guard lookup, Copying markers, mover calls submitted to
    # the pool) and returns at once, so the pool works on the next chunks
    # while this thread records transitions, emits finished chunks and runs
    # the fused downstream stages.  A chunk is emitted when all its calls have
    # finished, oldest first; finish_bundle() drains the window.  The window
    # holds up to MAX_WINDOW_CHUNKS chunks beyond the one admitted, and admission
    # also waits while more than 2 x copy_concurrency calls are queued (8 chunks
    # measured slower than 2 with the SQLite mover: more source reads at once,
    # all queueing for the target file).
    MAX_WINDOW_CHUNKS = 2

    def start_bundle(self):
        super().start_bundle()
        self._window: collections.deque = collections.deque()

    def process(self, ch: Chunk, window=beam.DoFn.WindowParam, timestamp=beam.DoFn.TimestampParam):
        if self._should_stop():
            return
        # every key not yet verified is looked up first: one already at its target (an
        # earlier run swapped it) is confirmed by the swap, never copied or verified again
        # against a copy-time hash the application has since overwritten on the target
        pending = [i for i, s in enumerate(ch.states)
                   if s in (S.State.PLANNED, S.State.COPYING, S.State.COPIED, S.State.VERIFYING)]
        if pending:
            self._guard(ch, pending)
        # copied keys without the hash their copy read (not written by this executor) cannot
        # be verified: they go through a failed verification to a re-copy
        todo = [i for i in pending if ch.states[i] in (S.State.PLANNED, S.State.COPYING)
                or (ch.states[i] in (S.State.COPIED, S.State.VERIFYING) and ch.chash[i] is None)]
        self._record(ch, [i for i in todo if ch.states[i] == S.State.COPIED], S.State.VERIFYING)
        futures = self._start_copies(ch, todo) if todo else []
        yield from self._admit(_InFlight(ch, futures, lambda results: self._finish_copies(ch, todo, results),
                                         _windowed(ch, window, timestamp)), self._pool_size)

    def _admit(self, entry: "_InFlight", pool_size: int):
        """Add a chunk to the window; emit what has finished, and wait while the
        window is full or the pool has plenty of queued calls."""
        if not self._window:
            self._busy_since = time.perf_counter()
        self._window.append(entry)
        yield from self._retire(block=lambda: (len(self._window) > self.MAX_WINDOW_CHUNKS
                                               or self._outstanding_calls > 2 * pool_size))
        self._drain()

    def finish_bundle(self):
        yield from self._retire(block=lambda: True)
        super().finish_bundle()

    def _retire(self, block):
        """Emit the finished chunks at the head of the window; while ``block()``
        holds, wait for calls to finish (any call: the pool stays fed)."""
        while self._window:
            head = self._window[0]
            if all(f.done() for f in head.futures):
                self._window.popleft()
                try:
                    results = [f.result() for f in head.futures]
                except BaseException:
                    self._cancel_window()  # the bundle fails: start no more queued work of it
                    raise
                head.finish(results)
                if not self._window:
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

    def _cancel_window(self) -> None:
        for entry in self._window:
            for f in entry.futures:
                f.cancel()  # only calls not yet started; running ones finish (idempotent)

    def _report_busy(self):
        ms = int(self._busy_s * 1000)
        if ms:
            self._busy_ms.inc(ms)
            self._busy_s -= ms / 1000.0

    def _guard(self, ch: Chunk, todo: list) -> list:
        """Only copy keys still mapped to their source: a late (duplicated) copy
        after the swap must never overwrite writes made on the target.  Keys
        already at their target (a lost Done) go to the swap, which confirms them.

        Fails closed: when the map cannot be read (after the retries) nothing is
        copied and the error fails the bundle -- a retried bundle may follow its
        own swaps, so copying unchecked could overwrite the target's newer writes."""
        current = self._retry_io(self._map.lookup, [ch.keys[i] for i in todo])
        at_target = [i for i in todo if current.get(ch.keys[i], (None,))[0] == ch.target]
        self._confirm_at_target(ch, at_target)
        gone = set(at_target)
        return [i for i in todo if i not in gone]

    def _confirm_at_target(self, ch: Chunk, rows: list) -> None:
        """Rows found at their target: Verified(already_swapped), for the swap to confirm
        (a Copied key gets there through Verifying, as the state machine has it)."""
        if not rows:
            return
        self._record(ch, [i for i in rows if ch.states[i] == S.State.COPIED], S.State.VERIFYING)
        self._record(ch, rows, S.State.VERIFIED, method=S.VERIFY_ALREADY)

    def _spare_swapped(self, ch: Chunk, rows: list) -> list:
        """Of ``rows`` about to be Failed for their data (copy or verification), those the
        map already routes to their target are migrated: the map is the truth, and the
        target holds the application's newer writes.  They become Verified(already_swapped),
        never Failed; the rest are returned.  A map that cannot be read spares nothing."""
        if not rows:
            return rows
        try:
            current = self._retry_io(self._map.lookup, [ch.keys[i] for i in rows])
        except StoreError:
            return rows
        at_target = [i for i in rows if current.get(ch.keys[i], (None,))[0] == ch.target]
        self._confirm_at_target(ch, at_target)
        gone = set(at_target)
        return [i for i in rows if i not in gone]

    def copy_rows(self, ch: Chunk, todo: list, recopy: bool = False):
        """Copy rows ``todo`` of ``ch`` now (re-copies): concurrent calls, retries, transitions."""
        if not todo:
            return
        futures = self._start_copies(ch, todo)
        results = [f.result() for f in futures]
        self._finish_copies(ch, todo, results, recopy)

    def _start_copies(self, ch: Chunk, todo: list) -> list:
        for i in todo:
            ch.attempts[i] += 1
        self._record(ch, todo, S.State.COPYING)
        per_call = int(getattr(self._data, "keys_per_call", 0) or len(todo))
        calls = [todo[a:a + per_call] for a in range(0, len(todo), per_call)]
        return [self._submit(self._pool, self._copy_call, ch, rows) for rows in calls]

    def _submit(self, pool, fn, *args):
        """pool.submit, counted in _outstanding_calls (the window waits on it)."""
        with self._calls_done:
            self._outstanding_calls += 1
        fut = pool.submit(fn, *args)
        fut.add_done_callback(self._call_done)  # runs once the future is done: no missed wake-up
        return fut

    def _call_done(self, _fut) -> None:
        with self._calls_done:
            self._outstanding_calls -= 1
            self._calls_done.notify()

    def _finish_copies(self, ch: Chunk, todo: list, results: list, recopy: bool = False):
        if not todo:
            return
        ok, failed = {}, {}
        for r_ok, r_failed in results:
            ok.update(r_ok)
            failed.update(r_failed)
        if ok:
            rows = sorted(ok)
            self._record(ch, rows, S.State.COPIED,
                         chash={i: ok[i][0] for i in rows}, sver={i: ok[i][1] for i in rows},
                         method={i: None for i in rows}, reason={i: None for i in rows})
            # counted once per key: re-copies after a verify mismatch are counted apart
            (self._recopied if recopy else self._copied).inc(len(rows))
        if failed:
            rows = self._spare_swapped(ch, sorted(failed))
            self._fail(ch, rows, {i: failed[i] for i in rows})

    def _copy_call(self, ch: Chunk, rows: list):
        """One mover call with retries; returns ({row: (hash, version)}, {row: reason})."""
        ok, failed = {}, {}
        pending = list(rows)
        max_retries = int(self._opts["max_retries"])
        attempt = 0
        while pending:
            keys = [ch.keys[i] for i in pending]
            # caps count on both shards; the adaptive limit judges the target (the writes)
            permit = self._throttles.acquire((ch.source, ch.target), len(keys), judged=(ch.target,))
            self._count_throttled(permit.waited_s)
            healthy = False
            self._gauge(+1)
            t0 = time.perf_counter()
            try:
                outcomes = self._data.copy(keys, ch.source, ch.target)
                err = None
                # a load signal for the throttles: most keys of the call failed transiently
                transient = sum(1 for o in outcomes if isinstance(o.error, TransientError))
                healthy = 2 * transient <= len(outcomes)
            except TransientError as e:
                outcomes, err = None, e
            except PermanentError as e:
                outcomes, err = None, e
                healthy = True  # the store answered: not a load signal
            finally:
                self._gauge(-1)
                self._throttles.release(permit, healthy)
                self._sample("copy_ms", (time.perf_counter() - t0) * 1000, len(keys))
            if outcomes is None:
                if isinstance(err, PermanentError):
                    for i in pending:
                        failed[i] = err.reason
                    return ok, failed
                if attempt >= max_retries:
                    for i in pending:
                        failed[i] = S.COPY_FAILED
                    return ok, failed
                self._count_retry()
                self._backoff(attempt)
                attempt += 1
                for i in pending:
                    ch.attempts[i] += 1
                continue
            retry = []
            for i, out in zip(pending, outcomes):
                if out.error is None:
                    ok[i] = (out.content_hash, out.source_version)
                elif isinstance(out.error, TransientError):
                    retry.append(i)
                else:
                    failed[i] = getattr(out.error, "reason", S.PERMANENT) or S.PERMANENT
            if retry and attempt >= max_retries:
                for i in retry:
                    failed[i] = S.COPY_FAILED
                retry = []
            if retry:
                self._count_retry()
                self._backoff(attempt)
                attempt += 1
                for i in retry:
                    ch.attempts[i] += 1
            pending = retry
        return ok, failed


def _windowed(value, window, timestamp) -> WindowedValue:
    """``value`` in the input element's window (the global window when the DoFn is
    called directly, outside a runner, as tests do)."""
    if not isinstance(timestamp, Timestamp):
        timestamp, window = MIN_TIMESTAMP, GlobalWindow()
    return WindowedValue(value, timestamp, (window,))


@dataclass
class _InFlight:
    """A chunk admitted to a stage's window: its calls, what completes it, its output."""

    chunk: Chunk
    futures: list
    finish: Any  # callable(results) run on the bundle thread when every call is done
    output: Any


class CopyKeys(beam.PTransform):
    def __init__(self, spec: ExecSpec, shared: Shared | None = None):
        super().__init__()
        self._spec = spec
        self._shared = shared

    def expand(self, chunks):
        return chunks | "CopyChunk" >> beam.ParDo(_CopyFn(self._spec, self._shared))


# ---------------------------------------------------------------- verify

def _sample_mask(hashes: list, fraction: float, seed: int) -> list:
    """Seeded, deterministic sample of a batch: at least one key per batch."""
    h = np.array(hashes, dtype=np.uint64)
    with np.errstate(over="ignore"):
        u = _mix(h ^ np.uint64(seed % 2**64))
    mask = u.astype(np.float64) / 2.0**64 < fraction
    if len(mask) and not mask.any():
        mask[int(np.argmin(u))] = True
    return list(mask)


class _VerifyFn(_CopyFn):
    STAGE = "verify"
    MAX_WINDOW_CHUNKS = 0

    def __init__(self, spec: ExecSpec, shared: Shared | None = None):
        super().__init__(spec, shared)
        self._verified = self._counter("verified")
        self._forced = self._counter("forced_swaps")

    def setup(self):
        super().setup()
        self._vpool_size = int(self._opts["verify_concurrency"])
        self._vpool = ThreadPoolExecutor(max_workers=self._vpool_size, thread_name_prefix="verify")

    def process(self, ch: Chunk, window=beam.DoFn.WindowParam, timestamp=beam.DoFn.TimestampParam):
        """The first round of checks is submitted and the chunk completes (further
        rounds, re-copies, transitions) when they have finished.  The window is 0
        chunks by default (each chunk completes before the next is admitted):
        verification reads the target shard the copies are writing, and reading
        it concurrently with them measured slower on SQLite (benchmarks/run_bench.py)."""
        if self._should_stop():
            return
        todo = [i for i, s in enumerate(ch.states) if s in (S.State.COPIED, S.State.VERIFYING)]
        futures, finish = [], (lambda results: None)
        if todo:
            self._record(ch, todo, S.State.VERIFYING)
            futures, combine = self._start_checks(ch, todo)
            finish = lambda results: self._complete(ch, todo, combine(results))  # noqa: E731
        yield from self._admit(_InFlight(ch, futures, finish, _windowed(ch, window, timestamp)),
                               self._vpool_size)

    def teardown(self):
        pool = getattr(self, "_vpool", None)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        super().teardown()

    def _start_checks(self, ch: Chunk, rows: list, escalated: bool = False):
        """Submit one round of checks of ``rows``; returns (futures, combine(results) ->
        good by method, bad, errored).  ``sampled`` checks a seeded sample fully and
        escalates to the whole batch on any mismatch; after a mismatch and a re-copy
        (``escalated``) it verifies fully: never sample a suspect key."""
        mode = self._opts["verification"]
        if mode == "sampled" and escalated:
            mode = "full"
        if mode != "sampled":
            return self._submit_checks(ch, rows, mode), lambda results: self._combine(results, mode)
        mask = _sample_mask([ch.hashes[i] for i in rows], float(self._opts["sample_fraction"]),
                            int(self._opts["sample_seed"]))
        sample = [i for i, m in zip(rows, mask) if m]
        rest = [i for i, m in zip(rows, mask) if not m]

        def combine(results):
            good, bad, errored = self._combine(results, "full")
            if bad or errored:  # escalate: the whole batch fully
                g2, b2, e2 = self._check(ch, rest, "full")
                return {S.VERIFY_FULL: good.get("full", []) + g2.get("full", [])}, bad + b2, errored + e2
            return {S.VERIFY_SAMPLED: good.get("full", []), S.VERIFY_UNCHECKED: rest}, [], []

        return self._submit_checks(ch, sample, "full"), combine

    def _complete(self, ch: Chunk, todo: list, first) -> None:
        """Record the first round's outcome; re-copy and re-verify mismatches (bounded)."""
        max_retries = int(self._opts["max_retries"])
        rounds = 0
        forced_any = False
        while todo:
            if first is not None:
                (good, bad, errored), first = first, None
            else:
                self._record(ch, todo, S.State.VERIFYING)
                futures, combine = self._start_checks(ch, todo, escalated=True)
                good, bad, errored = combine([f.result() for f in futures])
            for method, rows in good.items():
                self._record(ch, rows, S.State.VERIFIED, method=method)
                self._verified.inc(len(rows))
            if errored:
                self._fail(ch, errored, S.VERIFY_FAILED)
            bad = self._spare_swapped(ch, bad)  # swapped meanwhile: the target is the application's
            if not bad:
                break
            if rounds >= max_retries:
                if self._opts["force_swap_on_verification_failure"]:
                    forced_any = True
                    self._record(ch, bad, S.State.VERIFIED, method=S.VERIFY_FORCED)
                    self._forced.inc(len(bad))
                else:
                    self._fail(ch, bad, S.VERIFY_MISMATCH)
                break
            rounds += 1
            self._count_retry()
            self.copy_rows(ch, bad, recopy=True)  # re-copy, then verify again
            todo = [i for i in bad if ch.states[i] == S.State.COPIED]
        if forced_any:
            LOG.warning("FORCED SWAP: batch %s swaps keys that failed verification "
                        "(force_swap_on_verification_failure=true)", ch.batch_id[:40])

    CHECK_PART = 500  # keys per verification read

    def _submit_checks(self, ch: Chunk, rows: list, mode: str) -> list:
        return [self._submit(self._vpool, self._check_part, ch, rows[a:a + self.CHECK_PART], mode)
                for a in range(0, len(rows), self.CHECK_PART)]

    @staticmethod
    def _combine(results: list, mode: str):
        good, bad, errored = [], [], []
        for g, b, e in results:
            good += g
            bad += b
            errored += e
        return {mode: good} if good else {}, bad, errored

    def _check(self, ch: Chunk, rows: list, mode: str):
        """Check ``rows`` now (later rounds, swap-time re-checks)."""
        if not rows:
            return {}, [], []
        return self._combine([f.result() for f in self._submit_checks(ch, rows, mode)], mode)

    def _check_part(self, ch: Chunk, rows: list, mode: str):
        keys = [ch.keys[i] for i in rows]
        max_retries = int(self._opts["max_retries"])
        for attempt in range(max_retries + 1):
            self._gauge(+1)
            t0 = time.perf_counter()
            try:
                if mode == "full":
                    src = self._data.read(keys, ch.source)
                    tgt = self._data.read(keys, ch.target)
                else:
                    tgt = self._data.hashes(keys, ch.target)
                    src = None
                break
            except TransientError:
                if attempt >= max_retries:
                    return [], [], list(rows)
                self._count_retry()
                self._backoff(attempt)
            except StoreError:
                return [], [], list(rows)
            finally:
                self._gauge(-1)
                self._sample("verify_ms", (time.perf_counter() - t0) * 1000, len(keys))
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


class VerifyCopies(beam.PTransform):
    def __init__(self, spec: ExecSpec, shared: Shared | None = None):
        super().__init__()
        self._spec = spec
        self._shared = shared

    def expand(self, chunks):
        return chunks | "VerifyChunk" >> beam.ParDo(_VerifyFn(self._spec, self._shared))


# ------------------------------------------------------------------ swap

class _SwapFn(_VerifyFn):
    """All-or-nothing compare-and-set batches, behind the write fence.

    Write fence: where the map store can check source record versions inside
    the swap transaction (``supports_fence``: SQLite with the shard attached,
    PostgreSQL with map and shard in one database) it does; a key whose
    source changed since its copy is re-copied and re-verified (bounded by
    ``max_retries``, then Failed(source_changing)).  Elsewhere the source
    versions are re-checked just before the swap, with the same re-copy loop;
    the window between that check and the swap commit is measured
    (``fence_window_ms``) and closed only by fence-aware writers.

    The stage is fused with verification (no shuffle between them): each
    chunk's swap runs on ONE swapper thread per DoFn instance, so map writes
    of a worker stay one at a time on one connection (whose page cache stays
    warm), while the bundle thread goes on copying and verifying the next
    chunks; at most ``MAX_WINDOW_CHUNKS`` chunks wait for the swapper, and
    bundle end waits for all of them.  A retried bundle redoes its chunks'
    copies and verification (idempotent; keys already swapped are found at
    their target and confirmed) before their swaps.
    """

    STAGE = "swap"
    MAX_WINDOW_CHUNKS = 2

    def __init__(self, spec: ExecSpec, shared: Shared | None = None):
        super().__init__(spec, shared)
        self._swapped = self._counter("swapped")
        self._source_changed = self._counter("source_changed_recopies")

    def setup(self):
        super().setup()
        inner = getattr(self._data, "_inner", self._data)
        supports = getattr(self._map, "supports_fence", None)
        self._strict = bool(inner is not None and supports is not None and supports(inner)
                            and self._opts.get("write_fence", "auto") == "auto")
        self._fence_store = inner if self._strict else None
        self._token = (self._spec.plan_id, self._spec.epoch) if isinstance(self._map, RunRegistry) else None
        self._swapper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="swap")

    def teardown(self):
        swapper = getattr(self, "_swapper", None)
        if swapper is not None:
            # a swap in progress finishes (Done only after its commit); queued ones never start
            swapper.shutdown(wait=True, cancel_futures=True)
        super().teardown()

    def process(self, ch: Chunk, window=beam.DoFn.WindowParam, timestamp=beam.DoFn.TimestampParam):
        if self._should_stop():
            return
        rows = [i for i, s in enumerate(ch.states) if s in (S.State.VERIFIED, S.State.SWAPPING)]
        if not rows:
            return
        fut = self._submit(self._swapper, self._swap_chunk, ch, rows)
        # emits nothing: the window only bounds the chunks waiting for the swapper
        yield from self._admit(_InFlight(ch, [fut], lambda results: None, None), pool_size=1)

    def _swap_chunk(self, ch: Chunk, rows: list) -> None:
        """One chunk's swap (on the swapper thread): CAS batches until every row is
        Done or Failed, re-copying rows whose source changed since their copy."""
        self._record(ch, rows, S.State.SWAPPING)
        max_retries = int(self._opts["max_retries"])
        attempt = 0
        changes: dict = {}
        while rows:
            res, changed = self._swap_once(ch, rows)
            if changed:  # sources changed since their copy: re-copy outside the fence, then again
                rows = self._recopy_changed(ch, rows, changed, changes)
                continue
            if res is None:  # transient
                if attempt >= max_retries:
                    self._fail(ch, rows, S.SWAP_FAILED)
                    break
                self._count_retry()
                self._backoff(attempt)
                attempt += 1
                continue
            if res.committed:
                done = [rows[j] for j in list(res.applied) + list(res.already)]
                self._record(ch, sorted(done), S.State.DONE)
                self._swapped.inc(len(done))
                # Done follows the flush policy like every other transition: a Done lost
                # to a crash costs the rerun one lookup (the key is found at its target)
                break
            conflicts = {rows[j] for j in res.conflicts}
            if conflicts:
                LOG.warning("swap batch %s: %d keys no longer at their expected source (map_changed)",
                            ch.batch_id[:40], len(conflicts))
                self._fail(ch, sorted(conflicts), S.MAP_CHANGED)
            changed = sorted(rows[j] for j in res.source_changed)
            rows = [i for i in rows if i not in conflicts]
            if changed:
                rows = self._recopy_changed(ch, rows, changed, changes)
        # transitions follow the flush policy (count, interval) and bundle end

    def _swap_once(self, ch: Chunk, rows: list):
        """One fenced swap attempt: (SwapResult | None if transient, changed rows)."""
        fence_cm = None
        if not self._strict and isinstance(self._data, WriteFencing):
            fence_cm = self._data.write_fence(ch.source)
        try:
            versions = fence_cm.__enter__() if fence_cm is not None else None
        except TransientError:
            return None, []
        try:
            t_check = time.perf_counter()
            if not self._strict and self._data is not None:
                changed = self._recheck_sources(ch, rows, versions)
                if changed:
                    return None, changed
            # a forced key's target differs from its source by definition: the fence checks its version only
            items = [(ch.keys[i], ch.source, ch.target, ch.sver[i], ch.method[i] != S.VERIFY_FORCED)
                     for i in rows]
            kw = {}
            if self._strict:
                kw["fence"] = self._fence_store
            if self._token is not None:
                kw["token"] = self._token
            t0 = time.perf_counter()
            try:
                self._fence()
                res = self._map.swap_batch(items, **kw)
            except TransientError:
                return None, []
            finally:
                self._sample("swap_batch_ms", (time.perf_counter() - t0) * 1000, len(items))
            if res.committed and not self._strict:
                # the window in which a fence-unaware writer could still change a source
                self._sample("fence_window_ms", (time.perf_counter() - t_check) * 1000, len(items))
            return res, []
        finally:
            if fence_cm is not None:
                fence_cm.__exit__(None, None, None)

    def _recheck_sources(self, ch: Chunk, rows: list, versions=None) -> list:
        """Rows whose source record changed (or vanished) since the copy read it."""
        rows = [i for i in rows if ch.method[i] != S.VERIFY_ALREADY]  # applied in an earlier run
        if not rows:
            return []
        keys = [ch.keys[i] for i in rows]
        try:
            if versions is not None:  # read under the source's write lock: (content hash, version)
                current = versions(keys)
            else:  # stores whose every write changes the version (object generations)
                current = {k: (None, v) for k, (_h, v) in
                           self._retry_io(self._data.hashes, keys, ch.source).items()}
        except TransientError:
            return []  # cannot tell: the swap's own checks still apply
        # the version and the content: an application may rewrite a record and keep its
        # version (SQLite shards: the version is the application's to stamp)
        return [i for i, k in zip(rows, keys)
                if k not in current
                or (ch.sver[i] is not None and current[k][1] != ch.sver[i])
                or (ch.chash[i] is not None and current[k][0] is not None and current[k][0] != ch.chash[i])]

    def _recopy_changed(self, ch: Chunk, rows: list, changed: list, changes: dict) -> list:
        """Re-copy and re-verify keys whose source changed; give up after max_retries."""
        limit = int(self._opts["max_retries"])
        again, give_up = [], []
        for i in changed:
            changes[i] = changes.get(i, 0) + 1
            (give_up if changes[i] > limit else again).append(i)
        if give_up:
            self._fail(ch, give_up, S.SOURCE_CHANGING)
        if again:
            self._source_changed.inc(len(again))
            # the swap of these keys did not happen (rolled back, or not attempted): back to
            # Verified, whose source then changed -> re-copy, re-verify, swap again
            self._record(ch, [i for i in again if ch.states[i] == S.State.SWAPPING], S.State.VERIFIED)
            self.copy_rows(ch, again, recopy=True)
            copied = [i for i in again if ch.states[i] == S.State.COPIED]
            self._record(ch, copied, S.State.VERIFYING)
            good, bad, errored = self._check(ch, copied, "hash")
            for method, ok_rows in good.items():
                self._record(ch, ok_rows, S.State.VERIFIED, method=method)
            if bad:
                self._fail(ch, self._spare_swapped(ch, bad), S.VERIFY_MISMATCH)
            if errored:
                self._fail(ch, errored, S.VERIFY_FAILED)
            # verified again (or found at the target meanwhile): swap them again
            self._record(ch, [i for i in again if ch.states[i] == S.State.VERIFIED], S.State.SWAPPING)
        changed_set = set(changed)
        return [i for i in rows if i not in changed_set or ch.states[i] == S.State.SWAPPING]


class SwapBatches(beam.PTransform):
    def __init__(self, spec: ExecSpec, shared: Shared | None = None):
        super().__init__()
        self._spec = spec
        self._shared = shared

    def expand(self, chunks):
        return chunks | "SwapChunk" >> beam.ParDo(_SwapFn(self._spec, self._shared))


# ----------------------------------------------------------------- graph

def build_run_graph(p: beam.Pipeline, spec: ExecSpec) -> None:
    """The executor's flowchart (see the module docstring)."""
    throttles = Shared()  # one per-process throttle registry for all stages
    chunks = (
        p
        | "LoadWork" >> LoadWork(spec)
        | "StableInput" >> beam.Reshuffle()
    )
    copied = chunks | "CopyKeys" >> CopyKeys(spec, throttles)
    if not spec.options["interleave_copy_and_verify"]:
        # a barrier: every copy finishes before any verification starts
        copied = (
            copied
            | "KeyForBarrier" >> beam.Map(lambda ch: (0, ch))
            | "CopyBarrier" >> beam.GroupByKey()
            | "Unbarrier" >> beam.FlatMap(lambda kv: kv[1])
        )
    verified = copied | "VerifyCopies" >> VerifyCopies(spec, throttles)
    verified | "SwapBatches" >> SwapBatches(spec, throttles)
