"""What every stage of a run shares, as small collaborators a stage DoFn composes.

- :class:`ExecSpec` -- the picklable description of one run (one epoch) of a plan;
  its ``options`` are one typed, frozen :class:`~pipeline.config.RunOptions`.
- :class:`Chunk` -- the unit of work: up to ``swap_batch_size`` keys of one group.
- :class:`StageMetrics` -- a stage's Beam metrics, fed from any thread, pushed on
  the bundle thread.
- :class:`CheckpointRecorder` -- one checkpoint writer per work group; records
  transitions (refusing any the state machine does not allow) and flushes them
  by count, by interval (a timer thread) and at bundle end.
- :class:`StageContext` -- what a stage DoFn holds from ``setup()`` to
  ``teardown()``: its stores, the per-process throttles, the retry schedule
  (:mod:`pipeline.retry`), its metrics and recorder, and the run's guards (the
  stop marker, the lease, and :meth:`StageContext.halt` for a configuration
  error: the run stops, no key is Failed for it).

Every side effect here is idempotent: a checkpoint part is committed once
whatever the retries, and a record only names a state its keys leave.
"""
from __future__ import annotations

import json
import logging
import operator
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
from apache_beam.io.components.adaptive_throttler import ThrottlingSignaler
from apache_beam.metrics import Metrics
from apache_beam.utils.shared import Shared

from pipeline import checkpoint as ckpt
from pipeline import fs
from pipeline import states as S
from pipeline import workdir
from pipeline.config import RunOptions
from pipeline.errors import CommitConflict, ConfigurationError
from pipeline.faults import Crasher, checkpoint_fault, wrap_stores
from pipeline.keys import KeyType
from pipeline.lease import LeaseLost
from pipeline.logsafe import cap_beam_loggers
from pipeline.retry import RetrySchedule
from pipeline.stores import data_store_from_spec, map_store_from_spec
from transforms.throttle import ShardThrottles, ThrottleConfig

__all__ = ["ExecSpec", "Chunk", "throttle_config", "StageMetrics", "CheckpointRecorder", "StageContext", "NS"]

LOG = logging.getLogger("shardmove.execute")
NS = "shardmove"


@dataclass(frozen=True)
class ExecSpec:
    """Picklable description of one run (one epoch) of a plan.

    ``options`` is a :class:`RunOptions`; a mapping given instead is turned into
    one (unnamed options take OPTIONS' defaults)."""

    plan_dir: str
    plan_id: str
    epoch: int
    key_type: KeyType
    map_store: Mapping[str, Any]
    data_store: Mapping[str, Any]
    options: RunOptions
    groups: tuple  # ((group id, rows), ...)
    retry_failed: bool = False
    faults: Mapping[str, Any] = field(default_factory=dict)
    stop_path: str = ""
    lease_path: str = ""

    def __post_init__(self):
        if not isinstance(self.options, RunOptions):
            object.__setattr__(self, "options", RunOptions.from_mapping(self.options))


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
    # per-process cache of the columns that never change once the chunk is built
    # (keys as an Arrow array, key hashes as uint64): never pickled, never compared
    _fixed: Any = field(default=None, init=False, repr=False, compare=False)

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_fixed"] = None
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)

    def fixed_columns(self) -> tuple:
        """``(keys as a binary Arrow array, key hashes as a uint64 numpy array)``, built once
        per chunk and process: the keys and their hashes never change after loading (a
        chunk whose key list has changed length is rebuilt)."""
        f = self._fixed
        if f is None or len(f[1]) != len(self.keys):
            f = self._fixed = (pa.array(self.keys, pa.binary()),
                               np.fromiter(self.hashes, dtype=np.uint64, count=len(self.hashes)))
        return f

    @property
    def batch_id(self) -> str:
        return f"{self.gid}#{self.index:06d}"

    def __len__(self):
        return len(self.keys)

    def __repr__(self) -> str:
        return f"Chunk({self.batch_id}, {len(self.keys)} keys)"


def throttle_config(options: RunOptions) -> ThrottleConfig:
    """The per-shard throttling settings of a run's options (0 = no cap)."""
    return ThrottleConfig(
        max_in_flight=int(options.shard_max_in_flight),
        max_keys_per_s=float(options.shard_max_keys_per_s),
        adaptive=bool(options.adaptive_throttling),
        initial_limit=min(4, int(options.copy_concurrency)),
    )


_IN_PROGRESS = S.ranks(S.State.COPYING, S.State.VERIFYING, S.State.SWAPPING)

def _gather(values: list, idx) -> list:
    """``[values[i] for i in idx]``, gathered in C."""
    if len(idx) == 1:
        return [values[idx[0]]]
    return list(operator.itemgetter(*idx)(values))


_RANGES: dict = {}


def _is_range(idx) -> bool:
    """``idx == [0, 1, ..., len(idx) - 1]`` (compared in C against a cached range)."""
    n = len(idx)
    r = _RANGES.get(n)
    if r is None:
        r = list(range(n))
        if len(_RANGES) < 4096:
            _RANGES[n] = r
    return (idx if isinstance(idx, list) else list(idx)) == r


# ------------------------------------------------------------------ metrics

_COUNTER_LOCK = threading.Lock()


class _DeferredCounter:
    """A Beam counter that any thread may increment: Beam metrics live in the
    bundle thread's context (elsewhere an increment is silently lost), so the
    increments are summed here and pushed by :meth:`StageMetrics.drain` on the
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


_SAMPLE_KINDS: dict = {}  # sample name -> its kind in the checkpoints' timings ("copy_ms" -> "copy")


class StageMetrics:
    """One stage's metrics: counters, the calls-in-flight gauge, timing samples,
    retries and throttled time.  Thread-safe; pool threads have no Beam metrics
    context, so what they count is pushed by :meth:`drain` on the bundle thread."""

    def __init__(self, stage: str):
        self.stage = stage
        self.throttled_ms = Metrics.counter(NS, "throttled_ms")
        self.signaler = ThrottlingSignaler(NS)  # cumulativeThrottlingSeconds
        self.retries = Metrics.counter(NS, "retries")
        self._deferred: list = []
        self.failed = self.counter("failed")
        self.active = Metrics.gauge(NS, f"active_{stage}")
        self.dists = {n: Metrics.distribution(NS, n)
                      for n in ("copy_ms", "verify_ms", "swap_batch_ms", "fence_window_ms")}
        self._gauge_lock = threading.Lock()
        self._in_flight = 0
        self._peak = 0
        self._tally_lock = self._gauge_lock  # one lock: a call's start and end take it once each
        self._tally = {"retries": 0, "throttled_s": 0.0}
        self._timings: list = []
        self._samples: dict = {}
        self._throttle_carry = 0.0

    def counter(self, name: str) -> _DeferredCounter:
        c = _DeferredCounter(Metrics.counter(NS, name))
        self._deferred.append(c)
        return c

    def gauge(self, delta: int) -> None:
        with self._gauge_lock:
            self._in_flight += delta
            if self._in_flight > self._peak:
                self._peak = self._in_flight

    def call_started(self, throttled_s: float) -> None:
        """A store call starts after ``throttled_s`` waiting for its permit: ``gauge(+1)``
        and ``count_throttled`` under one lock."""
        with self._gauge_lock:
            self._in_flight += 1
            if self._in_flight > self._peak:
                self._peak = self._in_flight
            if throttled_s > 0:
                self._tally["throttled_s"] += throttled_s

    def call_ended(self, name: str, ms: float, keys: int) -> None:
        """A store call ended after ``ms``: ``gauge(-1)`` and ``sample`` under one lock."""
        kind = _SAMPLE_KINDS.get(name) or _SAMPLE_KINDS.setdefault(name, name.split("_")[0])
        with self._gauge_lock:
            self._in_flight -= 1
            values = self._samples.get(name)
            if values is None:
                values = self._samples[name] = []
            values.append(int(ms))
            self._timings.append([kind, round(ms, 3), keys])

    def count_retry(self, n: int = 1) -> None:
        with self._tally_lock:
            self._tally["retries"] += n

    def count_throttled(self, seconds: float) -> None:
        if seconds > 0:
            with self._tally_lock:
                self._tally["throttled_s"] += seconds

    def sample(self, name: str, ms: float, keys: int) -> None:
        with self._tally_lock:
            self._samples.setdefault(name, []).append(int(ms))
            self._timings.append([name.split("_")[0], round(ms, 3), keys])

    def checkpoint_extras(self) -> dict:
        """What each checkpoint part carries: the stage, its in-flight peak since the
        previous part, and the timings sampled since."""
        with self._gauge_lock:
            peak, self._peak = self._peak, self._in_flight
        with self._tally_lock:
            timings, self._timings = self._timings, []
        return {"stage": self.stage, f"active_{self.stage}": str(peak), "timings": json.dumps(timings)}

    def drain(self) -> None:
        """Push what pool threads tallied into Beam metrics (on the bundle thread)."""
        for c in self._deferred:
            c.flush()
        with self._gauge_lock:
            if self._peak:
                self.active.set(self._peak)
        with self._tally_lock:
            tally, self._tally = self._tally, {"retries": 0, "throttled_s": 0.0}
            samples, self._samples = self._samples, {}
        if tally["retries"]:
            self.retries.inc(tally["retries"])
        if tally["throttled_s"]:
            self.throttled_ms.inc(int(round(tally["throttled_s"] * 1000)))
            # Beam's counter takes whole seconds: carry the fraction over
            self._throttle_carry += tally["throttled_s"]
            whole = int(self._throttle_carry)
            if whole:
                self.signaler.signal_throttled(whole)
                self._throttle_carry -= whole
        for name, values in samples.items():
            dist = self.dists.get(name)
            if dist is not None:
                for v in values:
                    dist.update(v)


# --------------------------------------------------------------- checkpoints

class CheckpointRecorder:
    """A stage's checkpoint writers, one per work group of the bundle.

    Each record names the state its keys leave (the writer refuses a transition
    the state machine does not allow).  Parts are encoded and committed by one
    background thread; ``checkpoint_flush_interval`` is honoured by a timer
    thread (a group's transitions often come in one burst, after which no record
    would check it), and :meth:`flush_all` -- bundle end, stop -- waits for them."""

    def __init__(self, ctx: "StageContext"):
        self._ctx = ctx
        self._writers: dict = {}
        self._committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"ckpt-{ctx.stage}")
        self._timer_stop = threading.Event()
        self._timer = threading.Thread(target=self._flush_timer, name=f"ckpt-timer-{ctx.stage}", daemon=True)
        self._timer.start()

    def _flush_timer(self):
        interval = float(self._ctx.opts.checkpoint_flush_interval)
        period = min(max(interval / 4, 0.01), 0.5)
        while not self._timer_stop.wait(period):
            for w in list(self._writers.values()):
                try:
                    w.flush_if_due()
                except Exception as e:  # noqa: BLE001 - kept as pending: the bundle's next waiting flush raises it
                    LOG.debug("%s: timed checkpoint flush failed (%s)", self._ctx.stage, type(e).__name__)

    def start_bundle(self) -> None:
        self._writers = {}

    def writer(self, gid: str) -> ckpt.CheckpointWriter:
        w = self._writers.get(gid)
        if w is None:
            ctx, o = self._ctx, self._ctx.opts
            w = ckpt.CheckpointWriter(
                ctx.spec.plan_dir, ctx.spec.plan_id, gid, ctx.spec.epoch,
                flush_every=int(o.checkpoint_flush_every_transitions),
                flush_interval_s=float(o.checkpoint_flush_interval),
                extras_fn=ctx.metrics.checkpoint_extras,
                fence=ctx.checkpoint_fence,
                committer=self._committer,  # count/interval flushes commit in the background
                check_transitions=True,  # every record names the state it leaves (the state machine)
            )
            self._writers[gid] = w
        return w

    #: writers flushed side by side at bundle end (their fsyncs overlap)
    FLUSH_ALL_THREADS = 8

    def flush_all(self) -> None:
        """Every writer's buffer committed and its background commits settled, the writers
        side by side: each flush ends in fsyncs (the part, its directory), and one after the
        other they made the end of a run wait ~0.2 s for 48 writers.  Each writer is flushed
        by one thread (a writer is never flushed twice at once); the first error is raised
        once every writer has had its flush."""
        writers = list(self._writers.values())
        if len(writers) <= 1:
            for w in writers:
                self._ctx.retry_io(w.flush)
            return
        with ThreadPoolExecutor(max_workers=min(self.FLUSH_ALL_THREADS, len(writers)),
                                thread_name_prefix=f"ckpt-flush-{self._ctx.stage}") as pool:
            futures = [pool.submit(self._ctx.retry_io, w.flush) for w in writers]
        errors = [e for e in (f.exception() for f in futures) if e is not None]
        if errors:
            # what must stop the run wins over what a rerun retries: a lost lease, then a
            # configuration error, then the first; the others are named in the log (no keys)
            first = min(errors, key=lambda e: (not isinstance(e, LeaseLost),
                                               not isinstance(e, ConfigurationError)))
            for e in errors:
                if e is not first:
                    LOG.warning("%s: another checkpoint flush failed too (%s)", self._ctx.stage, type(e).__name__)
            raise first

    def record(self, ch: Chunk, idx, state, **cols) -> None:
        """Record transitions of chunk rows ``idx`` to ``state``; update the chunk.

        ``cols``: chunk columns to set with the transition (``reason``, ``chash``,
        ``sver``, ``method``): one value for all rows, or ``{row: value}``.  The
        columns are gathered once per call (no per-row Python work beyond the
        gathers), and the writer checks every ``prev -> state`` in one table look-up."""
        if not isinstance(idx, (list, tuple)):
            idx = list(idx)
        n = len(idx)
        if n == 0:
            return
        w = self.writer(ch.gid)
        s = int(state)
        states = ch.states
        # the whole chunk (the usual case): whole-list copies and slice assignments, in C
        whole = n == len(ch.keys) and idx[0] == 0 and idx[-1] == n - 1 and _is_range(idx)
        gather = (lambda values, _idx: list(values)) if whole else _gather
        prev = gather(states, idx)
        if whole:
            states[:] = [s] * n
        else:
            for i in idx:
                states[i] = s
        given = {}
        for name, values in cols.items():
            column = getattr(ch, name)
            if isinstance(values, dict):
                if whole:
                    column[:] = [values[i] for i in idx]
                else:
                    for i in idx:
                        column[i] = values[i]
            else:
                if whole:
                    column[:] = [values] * n
                else:
                    for i in idx:
                        column[i] = values
                given[name] = values  # one value for every row: no gather, no list
        key_arr, hash_arr = ch.fixed_columns()
        if not whole:
            pos = np.fromiter(idx, dtype=np.intp, count=n)
            key_arr, hash_arr = key_arr.take(pos), hash_arr[pos]

        def column(name):
            if name in given:
                return given[name]
            # a nullable column's rows, or None when all are null (the writer then writes a
            # null column without converting a list of Nones)
            out = gather(getattr(ch, name), idx)
            return None if out.count(None) == n else out

        w.record_chunk(
            key_arr, hash_arr, s, gather(ch.attempts, idx),
            column("reason"), column("chash"), column("sver"), column("method"),
            # in-progress markers ride along with the next flush instead of forcing one:
            # losing one only makes a resume redo idempotent work
            may_flush=s not in _IN_PROGRESS,
            prev=prev,  # the writer refuses a transition the state machine does not allow
        )
        self._ctx.crasher.tick(len(idx))

    def fail(self, ch: Chunk, idx, reasons) -> None:
        """Failed(reason) for rows ``idx``; reasons: a code for all, or {row: code}."""
        if not idx:
            return
        self.record(ch, idx, S.State.FAILED, reason=reasons)
        self._ctx.metrics.failed.inc(len(idx))

    def close(self) -> None:
        self._timer_stop.set()
        self._timer.join(timeout=5)
        self._committer.shutdown(wait=True)  # a part being committed finishes (it holds only facts)


# ------------------------------------------------------------------ context

class StageContext:
    """What one stage DoFn holds from ``setup()`` to ``teardown()``.

    ``map`` and ``data`` are read at each use (tests put stand-ins there)."""

    def __init__(self, spec: ExecSpec, stage: str, shared: Shared):
        cap_beam_loggers()  # this worker's Beam loggers never print elements (keys)
        self.spec = spec
        self.stage = stage
        self.opts: RunOptions = spec.options
        ms = map_store_from_spec(spec.map_store, spec.key_type)
        ds = data_store_from_spec(spec.data_store, spec.key_type)
        self.map, self.data, self.faults = wrap_stores(ms, ds, spec.faults)
        self.crasher = Crasher(int((spec.faults or {}).get("crash_after_transitions", 0) or 0))
        self.retry = RetrySchedule(float(self.opts.retry_base_delay), int(self.opts.max_retries))
        self.metrics = StageMetrics(stage)
        # read before each swap batch and each checkpoint part: one stat while unchanged
        self._lease = fs.WatchedFile(spec.lease_path) if spec.lease_path else None
        self._stop_checked = 0.0
        self._stopped = False
        self._halted = False
        tcfg = throttle_config(self.opts)
        self.throttles = shared.acquire(lambda: ShardThrottles(tcfg), tag=(spec.plan_id, spec.epoch, tcfg))
        self.recorder = CheckpointRecorder(self)

    # -- shortcuts every stage uses
    def record(self, ch: Chunk, idx, state, **cols) -> None:
        self.recorder.record(ch, idx, state, **cols)

    def fail(self, ch: Chunk, idx, reasons) -> None:
        self.recorder.fail(ch, idx, reasons)

    def retry_io(self, fn, *args):
        """``fn(*args)`` with transient errors retried on the run's schedule (each retry counted)."""
        return self.retry.call(fn, *args, on_retry=lambda _e, _a: self.metrics.count_retry())

    def backoff(self, attempt: int) -> None:
        """Wait before retry ``attempt`` (0-based) of a loop that retries by itself."""
        self.retry.wait(attempt)

    # -- the run's guards
    def fence(self) -> None:
        """Raise LeaseLost when another executor (a newer epoch) holds the plan's lease."""
        if self._lease is None:
            return
        try:
            cur = json.loads(self._lease.read())
        except (OSError, ValueError):
            return
        if cur.get("epoch") != self.spec.epoch:
            raise LeaseLost(f"lease lost: plan is now held by epoch {cur.get('epoch')}")

    @property
    def halted(self) -> bool:
        """A configuration error stopped the run (:meth:`halt`)."""
        return self._halted

    def halt(self, err: ConfigurationError) -> None:
        """Stop the run for a configuration error (a missing table, schema or database, a
        refused permission): it is no key's fault, so no key is Failed for it.

        Callers leave the keys of the failed call in the state they recorded (Copying,
        Verifying, Swapping: a rerun repeats those idempotent steps).  The first finding
        of the run is kept in ``halt.json`` (create-if-absent) for the launcher to report;
        the stop marker makes every stage return at its next chunk, their checkpoints
        flushed as at any bundle end."""
        first = not self._halted
        self._halted = self._stopped = True
        if first:
            # the launcher prints the one error line; workers' logs keep the finding too
            LOG.info("%s: configuration error, stopping the run (no key is failed for it): %s", self.stage, err)
        if self.spec.plan_dir:
            doc = {"stage": self.stage, "epoch": self.spec.epoch, "reason": err.reason, "message": str(err)}
            try:
                fs.create_if_absent(workdir.halt_path(self.spec.plan_dir), json.dumps(doc).encode())
            except CommitConflict:
                pass  # another stage's finding came first
            except Exception as e:  # noqa: BLE001 - the stop marker below still stops the run
                LOG.warning("%s: halt record not written (%s)", self.stage, type(e).__name__)
        if self.spec.stop_path:
            try:
                fs.write_atomic(self.spec.stop_path, b"halt\n")
            except Exception as e:  # noqa: BLE001 - this stage stops anyway; the others at their next error
                LOG.warning("%s: stop marker not written (%s)", self.stage, type(e).__name__)

    def checkpoint_fence(self) -> None:
        checkpoint_fault(self.faults, self.stage)
        self.fence()

    def should_stop(self) -> bool:
        """The stop marker (graceful SIGINT/SIGTERM), looked at most every 0.25 s."""
        if self._stopped:
            return True
        now = time.monotonic()
        if self.spec.stop_path and now - self._stop_checked > 0.25:
            self._stop_checked = now
            if fs.exists(self.spec.stop_path):
                self._stopped = True
                LOG.warning("%s: stop requested; flushing checkpoints", self.stage)
        return self._stopped

    # -- lifecycle
    def start_bundle(self) -> None:
        self.recorder.start_bundle()

    def finish_bundle(self) -> None:
        self.recorder.flush_all()
        self.metrics.drain()

    def close(self) -> None:
        self.recorder.close()
        if self._lease is not None:
            self._lease.close()
        for s in (self.map, self.data):
            try:
                if s is not None and hasattr(s, "close"):
                    s.close()
            except Exception:  # best effort only
                pass
