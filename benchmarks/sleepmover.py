"""A latency-only data mover that every Beam worker process can load (run_bench.py (b)).

``run_bench.py`` hands an instance to ``shardmove.api.run(data_store=...)``: an
in-process runner uses that very object, and each SDK worker process of
``--direct_running_mode=multi_processing`` unpickles a copy of it (this module
must be importable there: the parent puts ``benchmarks/`` on ``PYTHONPATH``).

A copy call sleeps ``latency_ms`` (the GIL is free meanwhile) and reports every
key copied; verification reads what the copies reported, so no record is read
or written.  Each process records the start and end of every call and writes
them, once its stages close the store, to ``<stats_dir>/calls-<pid>-<object>.npy``: the
parent merges the files of all processes into the wall time during which any
call was in flight.  Keys are never written anywhere.
"""
from __future__ import annotations

import os
import threading
import time

import numpy as np

from pipeline.stores.base import CopyOutcome

__all__ = ["SleepMover", "busy_seconds"]


class SleepMover:
    """Latency-only mover of ``keys_per_call`` keys per call; picklable (configuration only)."""

    in_process_only = False

    def __init__(self, real, latency_ms: float, keys_per_call: int, stats_dir: str):
        self._real = real  # the configured store: asked only which shards exist
        self.key_type = real.key_type
        self.latency_ms = float(latency_ms)
        self.keys_per_call = int(keys_per_call)
        self.stats_dir = stats_dir
        self._init_local()

    def _init_local(self) -> None:
        self._lock = threading.Lock()
        self._calls: list = []

    def __getstate__(self) -> dict:
        return {"real": self._real, "latency_ms": self.latency_ms, "keys_per_call": self.keys_per_call,
                "stats_dir": self.stats_dir}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def shard_exists(self, shard: str) -> bool:
        return self._real.shard_exists(shard)

    # the rest of the DataStore protocol, from the configured store (a run does not call
    # them); never its write fence: the swap must not check the records this mover never read
    def count(self, *a, **kw):
        return self._real.count(*a, **kw)

    def delete(self, *a, **kw):
        return self._real.delete(*a, **kw)

    def key_sizes(self, *a, **kw):
        return self._real.key_sizes(*a, **kw)

    def put_many(self, *a, **kw):
        return self._real.put_many(*a, **kw)

    def shard_bytes(self, *a, **kw):
        return self._real.shard_bytes(*a, **kw)

    def copy(self, keys, source, target):
        t0 = time.perf_counter()
        time.sleep(self.latency_ms / 1000.0)
        out = [CopyOutcome(k, content_hash=b"\0" * 16, source_version=0, written=True) for k in keys]
        t1 = time.perf_counter()
        with self._lock:
            self._calls.append((t0, t1))
        return out

    def hashes(self, keys, shard):
        return {k: (b"\0" * 16, 0) for k in keys}

    def read(self, keys, shard):
        return {k: (b"", 0) for k in keys}

    def close(self) -> None:
        """Called at each stage's teardown: write this object's calls so far (one file per
        object and process, rewritten whole: several stages close the same store)."""
        with self._lock:
            calls = np.array(self._calls, dtype=np.float64).reshape(-1, 2)
        if len(calls):
            path = os.path.join(self.stats_dir, f"calls-{os.getpid()}-{id(self):x}.npy")
            tmp = os.path.join(self.stats_dir, f".tmp-{os.getpid()}-{id(self):x}-{threading.get_ident()}.npy")
            np.save(tmp, calls)
            os.replace(tmp, path)


def busy_seconds(stats_dir: str) -> tuple[float, int]:
    """(seconds during which at least one call was in flight in any process, calls), from
    the files the processes wrote.  ``perf_counter`` is CLOCK_MONOTONIC on Linux: one
    clock for every process of the machine."""
    arrays = [np.load(os.path.join(stats_dir, f)) for f in os.listdir(stats_dir)
              if f.startswith("calls-") and f.endswith(".npy")]
    if not arrays:
        return 0.0, 0
    calls = np.concatenate(arrays)
    calls = calls[np.argsort(calls[:, 0])]
    busy, end = 0.0, -np.inf
    for s, e in calls:  # union of the intervals
        if s > end:
            busy += e - s
            end = e
        elif e > end:
            busy += e - end
            end = e
    return float(busy), len(calls)
