"""Fault injection: seeded wrappers around the mover, verifier reads, swapper
and checkpoint commits, configured by the ``faults:`` section.

    faults:
      seed: 7
      copy:       {transient_rate: 0.05, permanent_rate: 0.001, latency_ms: 2,
                   transient_first: 0, keys_per_call: 0}
      verify:     {transient_rate: 0.02, mismatch_rate: 0.0, mismatch_first: 0, latency_ms: 0}
      swap:       {transient_rate: 0.1, transient_first: 0, latency_ms: 0}
      checkpoint: {transient_rate: 0.0}
      crash_after_transitions: 0      # os._exit(137) after N transitions recorded by one stage (DoFn instance)

Decisions are deterministic: a pseudo-random number from xxh3 of (seed,
operation, key or batch, call number), so a run under faults is
reproducible.  ``*_first: N`` fails the first N calls per key (per batch for
swap) -- useful to prove a retry path.  ``permanent_rate`` and
``mismatch_rate`` select keys by hash, so the same keys fail on every
attempt.  Fakes exist for fault injection only; the stores underneath are
real.
"""
from __future__ import annotations

import os
import threading
import time
from typing import Any, Mapping, Sequence

import xxhash

from pipeline.errors import BadInput, PermanentError, TransientError
from pipeline.stores.base import CopyOutcome

__all__ = ["FaultPlan", "FaultyDataStore", "FaultyMapStore", "wrap_stores", "validate_faults"]

_OPS = {
    "copy": {"transient_rate", "permanent_rate", "latency_ms", "transient_first", "keys_per_call"},
    "verify": {"transient_rate", "mismatch_rate", "mismatch_first", "latency_ms"},
    "swap": {"transient_rate", "transient_first", "latency_ms"},
    "checkpoint": {"transient_rate"},
}


def validate_faults(faults: Mapping[str, Any]) -> dict:
    out: dict = {}
    for k, v in (faults or {}).items():
        if k == "seed" or k == "crash_after_transitions":
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise BadInput(f"config faults.{k}: expected a non-negative integer, got {v!r}")
            out[k] = v
            continue
        if k not in _OPS:
            raise BadInput(f"config faults: unknown operation {k}")
        if not isinstance(v, Mapping):
            raise BadInput(f"config faults.{k}: expected a mapping")
        sec = {}
        for f, x in v.items():
            if f not in _OPS[k]:
                raise BadInput(f"config faults.{k}: unknown field {f}")
            if isinstance(x, bool) or not isinstance(x, (int, float)) or x < 0:
                raise BadInput(f"config faults.{k}.{f}: expected a non-negative number, got {x!r}")
            if f.endswith("_rate") and x > 1:
                raise BadInput(f"config faults.{k}.{f}: a rate must be within 0..1, got {x!r}")
            sec[f] = x
        out[k] = sec
    return out


class FaultPlan:
    """Deterministic fault decisions and per-process counters."""

    def __init__(self, faults: Mapping[str, Any]):
        self.cfg = validate_faults(faults)
        self.seed = int(self.cfg.get("seed", 0))
        self._calls: dict = {}
        self._lock = threading.Lock()
        self.injected = {"transient": 0, "permanent": 0, "mismatch": 0}

    def op(self, name: str) -> dict:
        return self.cfg.get(name, {})

    def u(self, *parts) -> float:
        h = xxhash.xxh3_64_intdigest(repr((self.seed,) + parts).encode())
        return h / 2.0**64

    def call_no(self, *ident) -> int:
        with self._lock:
            n = self._calls.get(ident, 0) + 1
            self._calls[ident] = n
            return n

    def count(self, kind: str, n: int = 1) -> None:
        with self._lock:
            self.injected[kind] += n

    def sleep(self, op: str) -> None:
        ms = self.op(op).get("latency_ms", 0)
        if ms:
            time.sleep(ms / 1000.0)


# The optional capabilities (pipeline.stores.base's Protocols) of a wrapped store
# become the wrapper's own attributes: isinstance checks against those Protocols
# look at attributes statically on Python >= 3.12, never through __getattr__.
_CAPABILITIES = ("claim_run", "renew_run", "release_run", "max_version", "count_above", "supports_fence",
                 "write_fence", "check_keys", "max_key_bytes", "shard_exists", "shard_bytes", "count")


def _forward_capabilities(wrapper, inner) -> None:
    for name in _CAPABILITIES:
        if name not in type(wrapper).__dict__ and hasattr(inner, name):
            setattr(wrapper, name, getattr(inner, name))


class FaultyDataStore:
    """Wraps a DataStore: injected copy and verification-read faults."""

    def __init__(self, inner, plan: FaultPlan):
        self._inner = inner
        self._plan = plan
        self.key_type = inner.key_type
        _forward_capabilities(self, inner)
        kpc = int(plan.op("copy").get("keys_per_call", 0) or 0)
        if kpc:
            self.keys_per_call = kpc

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def copy(self, keys: Sequence[bytes], source: str, target: str) -> list:
        p = self._plan
        c = p.op("copy")
        ms = c.get("latency_ms", 0)
        if ms:
            time.sleep(ms / 1000.0)  # releases the GIL; no lock taken
        if c.get("transient_rate") and p.u("copy-batch", tuple(keys[:1]),
                                           p.call_no("copy-batch", tuple(keys[:1]), len(keys))) < c["transient_rate"]:
            p.count("transient")
            raise TransientError("injected transient copy failure")
        first = int(c.get("transient_first", 0))
        if first:
            # fail the whole call while any key in it is still within its first N calls
            counts = [p.call_no("copy", k) for k in keys]
            if min(counts) <= first:
                p.count("transient")
                raise TransientError("injected transient copy failure")
        perm = c.get("permanent_rate", 0)
        if not perm:
            return self._inner.copy(keys, source, target)
        bad = {i for i, k in enumerate(keys) if p.u("copy-permanent", k) < perm}
        good_keys = [k for i, k in enumerate(keys) if i not in bad]
        res = iter(self._inner.copy(good_keys, source, target)) if good_keys else iter(())
        out = []
        for i, k in enumerate(keys):
            if i in bad:
                p.count("permanent")
                out.append(CopyOutcome(key=k, error=PermanentError("injected permanent copy failure", reason="permanent")))
            else:
                out.append(next(res))
        return out

    def _verify_fault(self, keys, shard, result: dict) -> dict:
        p = self._plan
        v = p.op("verify")
        p.sleep("verify")
        if v.get("transient_rate") and p.u("verify", tuple(keys[:1]), p.call_no("verify-batch", tuple(keys[:1]))) < v["transient_rate"]:
            p.count("transient")
            raise TransientError("injected transient verification failure")
        rate = v.get("mismatch_rate", 0)
        first = int(v.get("mismatch_first", 0))
        if not rate and not first:
            return result
        out = dict(result)
        for k in keys:
            if k not in out:
                continue
            corrupt = rate and p.u("mismatch", k) < rate
            if not corrupt and first and p.call_no("verify", k, shard) <= first:
                corrupt = True
            if corrupt:
                value, version = out[k]
                # a shard-dependent flip, so corrupted source and target reads never agree
                flip = 1 + xxhash.xxh3_64_intdigest(shard.encode()) % 255
                out[k] = ((bytes([value[0] ^ flip]) + value[1:]) if value else b"x", version)
                p.count("mismatch")
        return out

    def hashes(self, keys, shard):
        return self._verify_fault(keys, shard, self._inner.hashes(keys, shard))

    def read(self, keys, shard):
        return self._verify_fault(keys, shard, self._inner.read(keys, shard))


class FaultyMapStore:
    """Wraps a MapStore: injected transient swap failures (before the transaction)."""

    def __init__(self, inner, plan: FaultPlan):
        self._inner = inner
        self._plan = plan
        self.key_type = inner.key_type
        _forward_capabilities(self, inner)

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def swap_batch(self, items, **kw):
        p = self._plan
        s = p.op("swap")
        p.sleep("swap")
        ident = tuple(i[0] for i in items[:1])
        n = p.call_no("swap", ident)
        if n <= int(s.get("transient_first", 0)) or (s.get("transient_rate") and p.u("swap", ident, n) < s["transient_rate"]):
            p.count("transient")
            raise TransientError("injected transient swap failure")
        return self._inner.swap_batch(items, **kw)


def checkpoint_fault(plan: FaultPlan | None, ident: str) -> None:
    """Called before a checkpoint commit: may raise an injected transient error."""
    if plan is None:
        return
    r = plan.op("checkpoint").get("transient_rate", 0)
    if r and plan.u("checkpoint", ident, plan.call_no("checkpoint", ident)) < r:
        plan.count("transient")
        raise TransientError("injected transient checkpoint failure")


class Crasher:
    """``crash_after_transitions``: die like SIGKILL after N transitions in this process."""

    def __init__(self, n: int):
        self.n = n
        self.seen = 0
        self._lock = threading.Lock()

    def tick(self, k: int = 1) -> None:
        if not self.n:
            return
        with self._lock:
            self.seen += k
            if self.seen >= self.n:
                os._exit(137)


def wrap_stores(map_store, data_store, faults: Mapping[str, Any] | None):
    if not faults:
        return map_store, data_store, None
    plan = FaultPlan(faults)
    ms = FaultyMapStore(map_store, plan) if map_store is not None else None
    ds = FaultyDataStore(data_store, plan) if data_store is not None else None
    return ms, ds, plan


def hold_point(phase: str, until=None, timeout_s: float = 120.0) -> None:
    """Test hook: pause at a named phase of ``run`` so a test can land a signal there.

    Active only when the environment names the phase: ``SHARDMOVE_TEST_HOLD=<phase>``.
    The process then creates the file ``SHARDMOVE_TEST_HOLD_FILE`` (the test waits for
    it) and waits until ``until()`` holds (e.g. a signal arrived) or the test removes that
    file (the run goes on), at most ``timeout_s``.
    Phases: ``startup``, ``lease``, ``compaction``, ``summary``."""
    if not phase or os.environ.get("SHARDMOVE_TEST_HOLD") != phase:
        return
    path = os.environ.get("SHARDMOVE_TEST_HOLD_FILE")
    if path:
        with open(path, "w") as f:
            f.write(phase)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not (until is not None and until()):
        if path and not os.path.exists(path):
            return
        time.sleep(0.01)
