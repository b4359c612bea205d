"""In-memory map and data stores (``kind: memory``): for experiments, tests and examples.

NOT DURABLE.  Everything lives in the memory of the process that created it
and is lost when that process exits; nothing is shared with other processes.
Use them with the in-process runner (``FnApiRunner``, the default, in its
``in_memory`` or ``multi_threading`` mode): a runner whose workers are other
processes is refused by the preflight, and a store unpickled in another
process refuses every call (it would otherwise start empty and diverge).

Never imports Beam.  A store is named (``{kind: memory, name: demo}``, default
``default``): every store object of one name and role in a process shares one
state (the driver's and the in-process workers').  A store pickles as its name
(configuration only), like every store here.

* :class:`MemoryMapStore`: canonical key -> (shard id, version); every write
  call stamps one new change number (a ``put_many`` call, a swap batch);
  snapshots are point in time (the rows are copied when it opens, under the
  store's lock); swaps are all-or-nothing compare-and-set batches; it keeps a
  run registry (:class:`~pipeline.stores.base.RunRegistry`) under the one claim
  rule.
* :class:`MemoryDataStore`: per shard, canonical key -> (value, version); a
  copy carries the source version and never replaces a newer target record;
  ``write_fence(shard)`` holds the shard's writers off
  (:class:`~pipeline.stores.base.WriteFencing`).  Its canonical record bytes
  are the value bytes, as in the SQLite data store.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from typing import Any, Iterable, Iterator, Mapping, Sequence

import pyarrow as pa

from pipeline.errors import BadInput, PermanentError, SourceMissing
from pipeline.keys import KeyType
from pipeline.lease import LeaseLost
from pipeline.stores.base import (SNAPSHOT_SCHEMA, CopyOutcome, SnapshotStats, SwapResult, check_cutoff,
                                  content_hash, swap_item)
from pipeline.stores.claims import ClaimRow, decide_claim, raise_for, renew_holds

__all__ = ["MemoryMapStore", "MemoryDataStore", "NOT_DURABLE", "forget"]

#: The warning the command line prints when a configuration uses a memory store.
NOT_DURABLE = ("{what} kind memory is not durable: its contents live in this process only and are lost "
               "when it exits (use it for experiments)")

_SPACES: dict[tuple[str, str], Any] = {}
_SPACES_LOCK = threading.Lock()


class _Space:
    def __init__(self, key_type: KeyType):
        self.key_type = key_type
        self.lock = threading.RLock()
        self.clock = 0


class _MapSpace(_Space):
    def __init__(self, key_type: KeyType):
        super().__init__(key_type)
        self.rows: dict[bytes, tuple[str, int]] = {}
        self.runs: dict[str, ClaimRow] = {}


class _DataSpace(_Space):
    def __init__(self, key_type: KeyType):
        super().__init__(key_type)
        self.shards: dict[str, dict[bytes, tuple[bytes, int]]] = {}


def _space(role: str, name: str, key_type: KeyType, pid: int, make):
    if pid != os.getpid():
        raise PermanentError(f"memory {role} store {name!r} lives in process {pid}, not in this one: memory stores "
                             f"are not durable and not shared with other processes; use the in-process runner "
                             f"(FnApiRunner, the default)", reason="not_shared")
    with _SPACES_LOCK:
        space = _SPACES.get((role, name))
        if space is None:
            space = _SPACES[(role, name)] = make(key_type)
    if space.key_type is not key_type:
        raise BadInput(f"memory {role} store {name!r} holds {space.key_type.value} keys, not {key_type.value}")
    return space


def forget(name: str | None = None) -> None:
    """Drop the memory stores of ``name`` (every one if None) from this process."""
    with _SPACES_LOCK:
        for k in [k for k in _SPACES if name is None or k[1] == name]:
            del _SPACES[k]


def _check_spec(spec: Mapping[str, Any], what: str) -> str:
    unknown = sorted(set(spec) - {"kind", "name"})
    if unknown:
        raise BadInput(f"config {what}: unknown field {unknown[0]} for kind memory")
    name = spec.get("name", "default")
    if not isinstance(name, str) or not name:
        raise BadInput(f"config {what}.name: expected a non-empty name, got {name!r}")
    return name


class _MemoryStore:
    in_process_only = True  # the preflight refuses runners whose workers are other processes
    _ROLE = ""

    def __init__(self, name: str = "default", key_type: KeyType = KeyType.STRING, *, _pid: int | None = None):
        self.name = name
        self.key_type = KeyType(key_type)
        self._pid = os.getpid() if _pid is None else _pid
        if self._pid == os.getpid():
            self._s  # create (or join) the named state now

    @property
    def _s(self):
        return _space(self._ROLE, self.name, self.key_type, self._pid, self._make)

    def __reduce__(self):  # configuration only: the name (and the process that holds the state)
        return _reopen, (type(self), self.name, self.key_type.value, self._pid)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.key_type.value!r})"

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _reopen(cls, name: str, key_type: str, pid: int):
    return cls(name, KeyType(key_type), _pid=pid)


# ------------------------------------------------------------------ map store


class MemoryMapSnapshot:
    """A point-in-time export of a memory map (see :class:`base.MapSnapshot`): the rows
    with ``version <= cutoff`` are copied when it opens; rows above the cutoff are
    counted when the iteration ends."""

    def __init__(self, store: "MemoryMapStore", segment_size: int, cutoff: int | None = None):
        if isinstance(segment_size, bool) or not isinstance(segment_size, int) or segment_size < 1:
            raise ValueError(f"segment_size must be a positive integer, got {segment_size!r}")
        self.segment_size = segment_size
        self._store = store
        s = store._s
        with s.lock:
            self.cutoff = check_cutoff(cutoff, s.clock)
            self._rows_at = [(k, sh, v) for k, (sh, v) in s.rows.items() if v <= self.cutoff]
        self._above: int | None = None
        self._started = self._closed = False

    rows = property(lambda self: len(self._rows_at))
    invalid_keys = 0
    rows_above_cutoff = property(lambda self: self._above)

    def __iter__(self) -> Iterator[pa.RecordBatch]:
        if self._started:
            raise RuntimeError("a map snapshot can be iterated only once")
        if self._closed:
            raise RuntimeError("map snapshot already closed")
        self._started = True
        return self._batches()

    def _batches(self) -> Iterator[pa.RecordBatch]:
        n = self.segment_size
        for off in range(0, len(self._rows_at), n):
            k, sh, v = zip(*self._rows_at[off:off + n])
            yield pa.RecordBatch.from_arrays([pa.array(k, pa.binary()), pa.array(sh, pa.string()),
                                              pa.array(v, pa.int64())], schema=SNAPSHOT_SCHEMA)
        self._above = self._store.count_above(self.cutoff)
        self._closed = True

    def stats(self) -> SnapshotStats:
        if self._above is None:
            raise RuntimeError("map snapshot not read to the end: its statistics are incomplete")
        return SnapshotStats(self.cutoff, len(self._rows_at), 0, self._above)

    def close(self) -> None:
        self._closed = True

    def __enter__(self) -> "MemoryMapSnapshot":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class MemoryMapStore(_MemoryStore):
    """A shard map in this process's memory -- NOT durable (see the module docstring)."""

    _ROLE = "map"
    _make = _MapSpace
    cheap_counts = True  # count() and count_above() are cheap: the executor's drift check may use them

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], key_type: KeyType) -> "MemoryMapStore":
        """``{kind: memory, name?}``."""
        return cls(_check_spec(spec, "map_store"), key_type)

    # -- change numbers
    def max_version(self) -> int:
        s = self._s
        with s.lock:
            return s.clock

    def count_above(self, version: int) -> int:
        s = self._s
        with s.lock:
            return sum(1 for _, v in s.rows.values() if v > version)

    def count(self) -> int:
        s = self._s
        with s.lock:
            return len(s.rows)

    # -- reads
    def snapshot(self, segment_size: int = 20000, cutoff: int | None = None) -> MemoryMapSnapshot:
        return MemoryMapSnapshot(self, segment_size, cutoff)

    def lookup(self, keys: Sequence[bytes]) -> dict[bytes, tuple[str, int]]:
        s = self._s
        with s.lock:
            return {k: s.rows[k] for k in keys if k in s.rows}

    # -- writes
    def put_many(self, rows: Iterable[tuple[bytes, str]]) -> int:
        """Upsert ``(key, shard_id)`` rows, all stamped with one new change number."""
        rows = [(bytes(k), str(sh)) for k, sh in rows]
        s = self._s
        with s.lock:
            if rows:
                s.clock += 1
                for k, sh in rows:
                    s.rows[k] = (sh, s.clock)
        return len(rows)

    def supports_fence(self, data_store: object) -> bool:
        return False

    def swap_batch(self, items, *, fence: object | None = None, token: tuple[str, int] | None = None) -> SwapResult:
        """All or nothing, under the store's lock: a key at its target is ``already``,
        one at its source is applied, anything else (or one key asked to go to two
        targets) is a conflict that applies nothing."""
        if fence is not None:
            raise ValueError("memory map store: no in-transaction fence (supports_fence is False)")
        items = [swap_item(it) for it in items]
        s = self._s
        with s.lock:
            if token is not None:
                row = s.runs.get(token[0])
                if not renew_holds(row, token[1]):
                    raise LeaseLost(f"plan {token[0][:12]}: epoch {token[1]} no longer holds the map store "
                                    f"(now {row.epoch if row else 'none'}); nothing applied")
            moves: dict[bytes, set] = {}
            for it in items:
                moves.setdefault(it.key, set()).add((it.source, it.target))
            applied, already, conflicts = [], [], []
            for i, it in enumerate(items):
                cur = s.rows.get(it.key)
                if cur is None or len(moves[it.key]) > 1:
                    conflicts.append(i)
                elif cur[0] == it.target:
                    already.append(i)
                elif cur[0] == it.source:
                    applied.append(i)
                else:
                    conflicts.append(i)
            if conflicts:
                return SwapResult(already=tuple(already), conflicts=tuple(conflicts))
            if not applied:
                return SwapResult(already=tuple(already))
            s.clock += 1
            for i in applied:
                s.rows[items[i].key] = (items[i].target, s.clock)
            return SwapResult(applied=tuple(applied), already=tuple(already), version=s.clock)

    # -- run registry
    def claim_run(self, plan_id: str, epoch: int, window: tuple[int, int], holder: str, ttl: float,
                  now: float) -> None:
        s = self._s
        with s.lock:
            raise_for(decide_claim(plan_id, epoch, window, now, list(s.runs.values())), plan_id)
            s.runs[plan_id] = ClaimRow(plan_id, int(epoch), int(window[0]), int(window[1]), holder, now + ttl)

    def renew_run(self, plan_id: str, epoch: int, ttl: float, now: float) -> None:
        s = self._s
        with s.lock:
            row = s.runs.get(plan_id)
            if not renew_holds(row, int(epoch)):
                raise LeaseLost(f"plan {plan_id[:12]}: this executor's claim on the map store was taken over")
            s.runs[plan_id] = dataclasses.replace(row, expires_at=now + ttl)

    def release_run(self, plan_id: str, epoch: int) -> None:
        s = self._s
        with s.lock:
            row = s.runs.get(plan_id)
            if row is not None and row.epoch == int(epoch):
                s.runs[plan_id] = dataclasses.replace(row, expires_at=0.0)


# ----------------------------------------------------------------- data store


class MemoryDataStore(_MemoryStore):
    """Records in this process's memory -- NOT durable (see the module docstring)."""

    _ROLE = "data"
    _make = _DataSpace

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], key_type: KeyType) -> "MemoryDataStore":
        """``{kind: memory, name?}``."""
        return cls(_check_spec(spec, "data_store"), key_type)

    def _shard(self, s: _DataSpace, shard: str, create: bool = False) -> dict:
        if create:
            return s.shards.setdefault(shard, {})
        return s.shards.get(shard, {})

    # -- shard inventory
    def shard_exists(self, shard: str) -> bool:
        s = self._s
        with s.lock:
            return shard in s.shards

    def shard_bytes(self, shard: str) -> int:
        s = self._s
        with s.lock:
            return sum(len(v) for v, _ in self._shard(s, shard).values())

    def count(self, shard: str) -> int:
        s = self._s
        with s.lock:
            return len(self._shard(s, shard))

    # -- records
    def read(self, keys: Sequence[bytes], shard: str) -> dict[bytes, tuple[bytes, int]]:
        s = self._s
        with s.lock:
            recs = self._shard(s, shard)
            return {k: recs[k] for k in keys if k in recs}

    def hashes(self, keys: Sequence[bytes], shard: str) -> dict[bytes, tuple[bytes, int]]:
        return {k: (content_hash(v), ver) for k, (v, ver) in self.read(keys, shard).items()}

    def key_sizes(self, keys: Sequence[bytes], shard: str) -> dict[bytes, int]:
        return {k: len(v) for k, (v, _) in self.read(keys, shard).items()}

    def put_many(self, shard: str, rows: Iterable[tuple[bytes, bytes]]) -> int:
        """Upsert ``(key, value)`` records, stamped with one new version (creates the shard)."""
        rows = [(bytes(k), bytes(v)) for k, v in rows]
        s = self._s
        with s.lock:
            s.clock += 1
            recs = self._shard(s, shard, create=True)
            for k, v in rows:
                recs[k] = (v, s.clock)
        return len(rows)

    def copy(self, keys: Sequence[bytes], source: str, target: str) -> list[CopyOutcome]:
        """One step under the store's lock: the source records, with their versions, upserted
        on ``target`` unless it holds a newer one (idempotent)."""
        if source == target:
            raise ValueError("copy: source and target are the same shard")
        s = self._s
        out = []
        with s.lock:
            src = self._shard(s, source)
            tgt = self._shard(s, target, create=bool(keys))
            for k in keys:
                rec = src.get(k)
                if rec is None:
                    out.append(CopyOutcome(k, error=SourceMissing(f"record missing on source shard {source}")))
                    continue
                have = tgt.get(k)
                write = have is None or have[1] <= rec[1]
                if write:
                    tgt[k] = rec
                out.append(CopyOutcome(k, content_hash(rec[0]), rec[1], written=write))
        return out

    def delete(self, keys: Sequence[bytes], shard: str, *, versions: Sequence[int] | None = None) -> int:
        s = self._s
        n = 0
        with s.lock:
            recs = self._shard(s, shard)
            for i, k in enumerate(keys):
                if k in recs and (versions is None or recs[k][1] == versions[i]):
                    del recs[k]
                    n += 1
        return n

    @contextlib.contextmanager
    def write_fence(self, shard: str):
        """Hold every writer of this store off (its lock) and yield
        ``versions(keys) -> {key: (content hash, version)}`` of ``shard``."""
        s = self._s
        with s.lock:
            yield lambda keys: self.hashes(keys, shard)
