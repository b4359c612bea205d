"""Per-shard throttling and adaptive concurrency for mover calls.

Built on Beam's own client-side throttling utilities
(``apache_beam.io.components``):

- ``AdaptiveThrottler`` -- the SRE book's client-side throttling: when the
  share of successful calls falls below ``1 / overload_ratio`` over a moving
  window, new calls are delayed (``throttle_delay_s``) with a probability
  that grows with the failure rate (applied only while the shard has failed
  calls in that window: a burst of calls in flight is not a failure);
- ``util.MovingSum`` -- the moving windows of latency, keys and errors from
  which the concurrency controller decides;
- ``ThrottlingSignaler`` -- the ``cumulativeThrottlingSeconds`` counter that
  Dataflow's autoscaler reads (the caller signals it from the bundle thread:
  pool threads have no metrics context).

On top of them, per shard:

- **caps**: at most ``max_in_flight`` calls in flight and ``max_keys_per_s``
  keys per second (a virtual-time token bucket, so a call of any size is
  admitted, and a burst is paid for by the calls after it);
- **adaptive concurrency** (``adaptive=True``): an AIMD limit on calls in
  flight.  It starts low (the first ``min_samples`` calls are a warm-up,
  ignored) and doubles while the shard is healthy, deciding every few call
  latencies (slow start: the no-load latency is measured before load is
  applied, and a fresh shard still reaches its ceiling within tens of calls).
  After a back-off it rises x1.5 per interval while the latency stays within
  ``fast_ramp_below`` x the baseline, else by 1, 2, 4, ... the longer the
  shard keeps up.  When the shard's latency per key exceeds
  ``latency_tolerance`` x its no-load baseline over two decision intervals
  in a row (one slow interval only holds the limit: a pause of the worker
  process itself looks the same), or its error rate over the last interval
  exceeds ``error_ratio``, the limit drops to ``decrease`` x the calls
  actually in flight.  The baseline is the lowest interval average seen,
  drifting up slowly (``baseline_drift`` per healthy interval), and by 10%
  per interval while even one call at a time is too slow, so a store that
  became slower for good is not throttled forever.  Only calls started since
  the limit last changed count towards a decision.

A call that touches two shards (a copy reads its source and writes its
target) holds a slot on both, taken in a fixed order (no deadlock), and
counts against the caps of both.  Its latency can only be attributed to one
of them: the adaptive limit applies to, and learns from, the shards the
caller names as ``judged`` (for a copy: its target, the side that writes --
in a rebalance every copy of a pair lands on the same new shard, while the
reads spread over the sources).

Limits are per worker process: :class:`ShardThrottles` is meant to be shared
by all DoFn instances of a process (``apache_beam.utils.shared.Shared``).
With W worker processes a shard sees at most W x the caps; divide a global
budget by the number of worker processes.

Thread-safe; imports only Beam's throttling utilities; never sleeps while
holding a lock; clock and sleep are injectable.
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable

from apache_beam.io.components.adaptive_throttler import AdaptiveThrottler
from apache_beam.io.components.util import MovingSum

__all__ = ["ThrottleConfig", "ShardLimiter", "ShardThrottles", "Permit"]


@dataclass(frozen=True)
class ThrottleConfig:
    """Picklable throttling settings (per shard, per worker process)."""

    max_in_flight: int = 0          # 0 = no cap
    max_keys_per_s: float = 0.0     # 0 = no cap
    adaptive: bool = True
    initial_limit: int = 4          # slow start from here
    latency_tolerance: float = 2.0  # back off above this x the no-load latency
    error_ratio: float = 0.5        # back off above this share of failed calls
    decrease: float = 0.7           # multiplicative decrease of the calls in flight
    fast_ramp_below: float = 1.25   # ramp up x1.5 while latency is below this x the baseline
    interval_s: float = 0.25        # one decision per interval (after slow start) ...
    min_samples: int = 8            # ... once this many calls completed in it
    baseline_drift: float = 0.001   # the baseline rises 0.1% per healthy interval (forgets lucky lows)
    overload_ratio: float = 2.0     # AdaptiveThrottler's K
    throttler_window_s: float = 10.0
    throttle_delay_s: float = 0.1   # a delay decided by the AdaptiveThrottler

    @property
    def active(self) -> bool:
        return bool(self.max_in_flight or self.max_keys_per_s or self.adaptive)


class ShardLimiter:
    """One shard's caps, adaptive limit and statistics."""

    def __init__(self, cfg: ThrottleConfig, clock: Callable[[], float] = time.monotonic):
        self.cfg = cfg
        self._clock = clock
        # a plain lock (entered in C, not through Condition.__enter__), its condition for the
        # callers waiting for a slot, and their number: a call that frees a slot notifies
        # only when someone waits
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._waiting = 0
        self.in_flight = 0
        self.ceiling = cfg.max_in_flight or math.inf
        if cfg.adaptive:
            self.limit = float(min(self.ceiling, max(1, cfg.initial_limit)))
        else:
            self.limit = float(self.ceiling)
        self._slow_start = True
        self._streak = 0  # healthy intervals in a row since the last back-off
        self._warming = True  # the first interval is a warm-up: measured, not used
        self._slow_before = False  # the previous decision saw latency above the tolerance
        self._next_free = 0.0  # token bucket in virtual time
        ms = int(cfg.throttler_window_s * 1000)
        self._throttler = AdaptiveThrottler(window_ms=ms, bucket_ms=max(1, ms // 10),
                                            overload_ratio=cfg.overload_ratio)
        self._last_error_ms = -math.inf
        self._throttler_window_ms = cfg.throttler_window_s * 1000
        self._gen = 0  # bumped whenever the limit changes
        self._reset_interval(self._clock())
        self.baseline = None  # ms per key at no load
        self.backoffs = 0
        self.rampups = 0
        self.min_limit_seen = self.limit
        self.history: list = []  # (time, limit, in_flight peak, ms per key) per decision

    # -- admission
    def _reset_interval(self, now: float, call_s: float = 0.0) -> None:
        # fresh windows after each decision: a decision sees only calls made at
        # the current limit; a window spans several intervals (and several
        # calls when calls are slow), in 16 buckets
        w = max(16, int(1000 * max(4 * self.cfg.interval_s, 8 * call_s)))
        # calls are _lat's samples (its count); _keys holds the keys beyond one per call and
        # _errors only the failed calls, so a healthy single-key call adds to one moving sum
        self._lat = MovingSum(w, w // 16)
        self._keys = MovingSum(w, w // 16)
        self._errors = MovingSum(w, w // 16)
        self._interval_start = now
        self._peak = self.in_flight

    def _can_enter(self, adaptive: bool) -> bool:
        cap = min(self.ceiling, max(1, int(self.limit))) if adaptive else self.ceiling
        return self.in_flight < cap

    def enter(self, keys: int, adaptive: bool = True) -> int:
        """Block until a slot is free (under the adaptive limit too, if ``adaptive``);
        returns the controller's generation the call starts in."""
        adaptive = adaptive and self.cfg.adaptive
        with self._lock:
            while not self._can_enter(adaptive):
                self._waiting += 1
                try:
                    self._cond.wait(0.05)
                finally:
                    self._waiting -= 1
            self.in_flight += 1
            self._peak = max(self._peak, self.in_flight)
            return self._gen

    def rate_delay(self, keys: int) -> float:
        """Seconds this call must wait to stay under max_keys_per_s (reserves its keys)."""
        rate = self.cfg.max_keys_per_s
        if not rate:
            return 0.0
        with self._lock:
            now = self._clock()
            start = max(now, self._next_free)
            self._next_free = start + keys / rate
            return start - now

    def should_delay(self, now_ms: float) -> bool:
        """Beam's AdaptiveThrottler decision for one call attempt.

        The throttler is consulted and fed (attempts here, successes in
        :meth:`leave`) only while the shard has failed calls in the
        throttler's window -- an error episode: it counts a call in flight as
        not (yet) successful, so a burst of concurrent calls to a healthy
        shard would otherwise look like failures, and skipping it on healthy
        shards saves its moving sums on every call."""
        if now_ms - self._last_error_ms >= self._throttler_window_ms:
            return False  # no failed call in the window: nothing to decide, nothing to feed (read unlocked: a float)
        with self._lock:
            if now_ms - self._last_error_ms >= self._throttler_window_ms:
                return False
            return self._throttler.throttle_request(now_ms)

    def cancel(self) -> None:
        """Give a slot back without a sample (the call never ran)."""
        with self._lock:
            self.in_flight -= 1
            if self._waiting:
                self._cond.notify()  # one slot freed: wake one waiter (not a herd)

    def leave(self, ok: bool, elapsed_s: float, keys: int, learn: bool = True, gen: int | None = None,
              now: float | None = None) -> None:
        """A call ended; with ``learn``, its outcome and latency feed the controller --
        unless it started before the controller's last decision (``gen``): such a
        call ran at the old limit, and counting it again would repeat the decision."""
        if now is None:
            now = self._clock()
        with self._lock:
            self.in_flight -= 1
            if not ok:
                self._last_error_ms = now * 1000
            if not learn or (gen is not None and gen != self._gen):
                if self._waiting:
                    self._cond.notify()
                return
            now_ms = now * 1000
            if ok and now_ms - self._last_error_ms < self._throttler_window_ms:
                self._throttler.successful_request(now_ms)  # fed during error episodes only
            if not ok:
                self._errors.add(now_ms, 1)
            self._lat.add(now_ms, elapsed_s * 1000)
            if keys > 1:
                self._keys.add(now_ms, keys - 1)
            if self.cfg.adaptive:
                self._maybe_adjust(now)
            if self._waiting:
                self._cond.notify()

    # -- the controller (called with the lock held)
    def _maybe_adjust(self, now: float) -> None:
        cfg = self.cfg
        if not self._slow_start and now - self._interval_start < cfg.interval_s:
            return  # no decision due (checked before the moving sums: this runs after every call)
        now_ms = now * 1000
        calls = self._lat.count(now_ms)
        if calls < cfg.min_samples:
            return
        lat = self._lat.sum(now_ms)
        # slow start decides as soon as the calls made at the new limit are in
        # (a few call latencies), so a fresh shard reaches its ceiling quickly
        span = min(cfg.interval_s, 2 * lat / calls / 1000) if self._slow_start else cfg.interval_s
        if now - self._interval_start < span:
            return
        per_key = lat / max(1, calls + self._keys.sum(now_ms))
        err = self._errors.sum(now_ms) / calls
        if self._warming:  # the first calls open connections, create tables: not the no-load latency
            self._warming = False
            self.history.append((round(now, 3), self.limit, self._peak, round(per_key, 3)))
            self._reset_interval(now, lat / calls / 1000)
            return
        if self.baseline is None or per_key < self.baseline:
            self.baseline = per_key
        slow = per_key > cfg.latency_tolerance * self.baseline
        overloaded = err > cfg.error_ratio or (slow and self._slow_before)
        before = self.limit
        if slow and not overloaded:
            # one slow interval is not yet overload: a pause of this process (a GC pass, a
            # long step on another thread) looks the same for ~20 ms.  Hold the limit and
            # decide again on the next interval's calls.
            self._slow_before = True
            self.history.append((round(now, 3), before, self._peak, round(per_key, 3)))
            self._reset_interval(now, lat / calls / 1000)
            return
        self._slow_before = False
        if overloaded and self.limit <= 1:
            # slow even one call at a time: the store got slower for good; follow it
            self.baseline *= 1.1
        if overloaded:
            self.limit = max(1.0, math.floor(min(self.limit, self._peak) * cfg.decrease))
            self._slow_start = False
            self._streak = 0
            self.backoffs += 1
        elif self._slow_start and self._peak < int(self.limit):
            self._slow_start = False  # the limit no longer binds: slow start is over
        elif self._peak >= int(self.limit) and self.limit < self.ceiling:
            # the limit was binding and the shard kept up: ramp up -- multiplicatively while
            # the latency is close to the baseline (far from overload), else additively,
            # faster the longer it keeps up
            if self._slow_start:
                grown = self.limit * 2
            elif per_key <= cfg.fast_ramp_below * self.baseline:
                grown = math.ceil(self.limit * 1.5)
            else:
                grown = self.limit + (1 << min(4, self._streak // 3))
            self.limit = min(self.ceiling, grown)
            self._streak += 1
            self.rampups += 1
        if not overloaded:
            self.baseline *= 1.0 + cfg.baseline_drift
        if self.limit != before:
            self._gen += 1
            if self.limit > before and self._waiting:
                self._cond.notify_all()  # room for more than one waiter
        self.min_limit_seen = min(self.min_limit_seen, self.limit)
        self.history.append((round(now, 3), before, self._peak, round(per_key, 3)))
        if len(self.history) > 1000:
            del self.history[:500]
        self._reset_interval(now, lat / calls / 1000)


@dataclass
class Permit:
    shards: tuple
    judged: tuple
    gens: tuple
    keys: int
    waited_s: float
    t0: float
    lims: tuple = ()   # the limiters entered, in ``shards`` order
    learn: tuple = ()  # per shard: is it judged (its adaptive limit learns from the call)


class ShardThrottles:
    """Per-shard limiters of one worker process (share it with ``Shared``)."""

    def __init__(self, cfg: ThrottleConfig, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.cfg = cfg
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._shards: dict = {}
        self._routes: dict = {}  # (shard_ids, judged) as given -> _route(...)

    def shard(self, shard_id: str) -> ShardLimiter:
        with self._lock:
            lim = self._shards.get(shard_id)
            if lim is None:
                lim = self._shards[shard_id] = ShardLimiter(self.cfg, self._clock)
            return lim

    def shards(self) -> dict:
        with self._lock:
            return dict(self._shards)

    def _route(self, shard_ids, judged) -> tuple:
        """(ids in lock order, judged ids, their limiters, judged flags, judged limiters);
        memoized per (shard_ids, judged) when both are hashable (a copy names the
        same pair for every call of a chunk)."""
        try:
            key = (shard_ids, judged)
            route = self._routes.get(key)
        except TypeError:  # a list: not memoized
            key = route = None
        if route is None:
            ids = tuple(sorted(set(shard_ids), key=lambda s: s.encode()))
            judged_set = set(ids if judged is None else judged)
            jids = tuple(s for s in ids if s in judged_set)
            lims = tuple(self.shard(s) for s in ids)
            route = (ids, jids, lims, tuple(s in judged_set for s in ids),
                     tuple(lim for s, lim in zip(ids, lims) if s in judged_set))
            if key is not None:
                with self._lock:
                    if len(self._routes) > 4096:
                        self._routes.clear()
                    self._routes[key] = route
        return route

    def acquire(self, shard_ids: Iterable[str], keys: int, judged: Iterable[str] | None = None) -> Permit:
        """Take a slot on every shard (fixed order) and wait out the rate caps.

        ``judged``: the shards whose adaptive limit applies to this call and
        learns from its latency and outcome (default: all of ``shard_ids``).
        Returns a :class:`Permit` whose ``waited_s`` is the time this call was
        held back (slots, keys per second, adaptive delays)."""
        ids, jids, lims, learn, jlims = self._route(shard_ids, judged)
        cfg = self.cfg
        if not cfg.active:
            return Permit(ids, jids, (), keys, 0.0, self._clock())
        clock = self._clock
        t0 = clock()
        if cfg.adaptive:  # Beam's client-side throttling on the error rate
            for lim in jlims:
                if lim.should_delay(clock() * 1000):
                    self._sleep(cfg.throttle_delay_s)
        entered, gens = [], []
        try:
            for lim, adaptive in zip(lims, learn):
                gens.append(lim.enter(keys, adaptive=adaptive))
                entered.append(lim)
            if cfg.max_keys_per_s:
                delay = max((lim.rate_delay(keys) for lim in lims), default=0.0)
                if delay > 0:
                    self._sleep(delay)
        except BaseException:
            for lim in entered:
                lim.cancel()
            raise
        now = clock()
        return Permit(ids, jids, tuple(gens), keys, now - t0, now, lims, learn)

    def release(self, permit: Permit, ok: bool) -> None:
        if not self.cfg.active:
            return
        now = self._clock()
        elapsed = now - permit.t0
        lims = permit.lims or tuple(self.shard(s) for s in permit.shards)
        learn = permit.learn or tuple(s in permit.judged for s in permit.shards)
        for lim, gen, judged in zip(lims, permit.gens, learn):
            lim.leave(ok, elapsed, permit.keys, learn=judged, gen=gen, now=now)

    def snapshot(self) -> dict:
        """{shard: {limit, in_flight, backoffs, rampups, min_limit, baseline_ms_per_key}}."""
        out = {}
        for s, lim in self.shards().items():
            with lim._cond:
                out[s] = {"limit": lim.limit, "in_flight": lim.in_flight, "backoffs": lim.backoffs,
                          "rampups": lim.rampups, "min_limit": lim.min_limit_seen,
                          "baseline_ms_per_key": lim.baseline}
        return out
