"""Object-store data mover: one object per key, shards are URI prefixes.

Never imports Beam.  Configuration (``data_store`` section)::

    data_store:
      kind: objects
      shards:                     # every shard id the plan touches
        s0: gs://bucket/prefix0   # a gs:// prefix ...
        s1: /srv/shard1           # ... or an absolute local directory
      io_concurrency: 32          # optional: object requests in flight per process
      keys_per_call: 64           # optional: keys per copy call of the executor

Object names
------------
A key's record is ONE object, ``<shard location>/<name>``, whose name is a
reversible, prefix-safe encoding of the key's canonical bytes
(CONTRACTS "Keys")::

    k/<hh>/<b32>

* ``hh``: two lowercase hex digits, the top byte of the stable key hash
  (xxh3-64 of the canonical bytes): a 256-way fan-out (small local
  directories; spreads GCS's key-range load);
* ``b32``: base32hex (RFC 4648 section 7, alphabet ``0-9a-v``) of the
  canonical bytes, lowercase, without padding.  A ``b32`` longer than 200
  characters is cut into 200-character components, every component but the
  last followed by ``_`` (``k/hh/<200>_/<200>_/<rest>``), so a name never
  has a component over 201 bytes and a file never shares its name with a
  directory.

Names use only ``0-9a-v``, ``_`` and ``/``: no ``.`` or ``..`` component,
no NUL, newline or backslash, so no key -- ``../../etc/passwd``, one with
``/`` or NUL -- can escape its shard's prefix.  Decoding is strict (fan-out,
component lengths, canonical base32hex are all checked), so keys and names
are in one-to-one correspondence.  Empty keys have no name (the planner
rejects them).  Names of a ``n``-byte key are ``5 + ceil(8n/5)`` bytes plus 2
per extra component.

Limits (:meth:`ObjectDataStore.max_key_bytes`): on GCS the whole object name
(prefix inside the bucket + ``/`` + name) is at most 1024 bytes; locally the
name is at most 1024 bytes too (so that a local rehearsal refuses what GCS
would) and the whole path at most 4095.  A 1024-byte name holds a key of at
most 630 bytes, well below the planner's 4096: base32hex spends 8 characters
on 5 bytes, and even the 4095-byte path limit could not hold a 4096-byte key
(6554 characters).  Longer keys are rejected at plan time
(:meth:`ObjectDataStore.check_keys`), with the limit in bytes; a copy of one
fails the key with reason ``key_too_long``.

Record bytes, content hash, versions
------------------------------------
The canonical record bytes are the object's bytes, whole; the content hash
is xxh3-128 of them (:func:`pipeline.stores.base.content_hash`).

A record's **version** (``CopyOutcome.source_version``, the versions of
:meth:`read`/:meth:`hashes`, ``delete(versions=)``) is its change token:

* GCS: the object **generation** (a new one on every write of the object);
* local: the file's ``st_mtime_ns``.  Every write by this store is a new
  file renamed into place whose mtime is set explicitly: ``put_many`` stamps
  ``max(now_ns, previous + 1)``, a copy stamps the source's write time (like
  ``cp -p``).  Writers outside this store change it too (the kernel sets
  mtime on every write), but at the file system's timestamp granularity.

A record's **write time** (nanoseconds since the epoch) orders writes
across shards: GCS -- the ``shardmove-written-ns`` custom metadata this store
sets (``put_many``: now; copy: the source's write time), else the object's
``updated`` time (a foreign writer); local -- ``st_mtime_ns``.

Copy
----
``copy(keys, source, target)`` reads one consistent generation of each
source object and writes the target atomically (GCS: one upload, with a
generation precondition; local: temp file + fsync + rename/link + directory
fsync).  Idempotent upsert keyed by the key:

* target absent -> created (create-if-absent: GCS ``if_generation_match=0``,
  local ``link``);
* target holding the same bytes -> nothing written;
* target holding other bytes written no later than the source's write time
  (a stale or damaged earlier copy) -> replaced, only if it still has the
  generation just read (GCS) / the mtime just read (local, checked right
  before the rename -- not atomic against another process);
* target written after the source -> a newer record (an application write
  after the swap): never overwritten; ``written=False``, and verification
  then fails the key (``verify_mismatch``) rather than losing that write.

Missing source object -> ``SourceMissing``; transient storage failures
(429/5xx/connection, busy local I/O) -> ``TransientError`` outcomes (the
executor retries those keys); others -> ``PermanentError`` with a short
reason (``key_too_long``, ``forbidden``, ``shard_missing``, ``io_error``,
``storage_error``).  No message carries a key value.  Requests run on a
thread pool of ``io_concurrency``; ``keys_per_call`` lets the executor's
``copy_concurrency`` pool run several copy calls at once.

Picklable (configuration only); clients and the pool are opened lazily.
Files created locally are owner-only (0600; directories 0700).

The key <-> name encoding is :mod:`pipeline.stores.objects_names`; shard
locations, error mapping and the one-object operations on GCS and local
files are :mod:`pipeline.stores.objects_io`.  This module is the store, and
names the public parts of all three.
"""
from __future__ import annotations

import concurrent.futures
import os
import threading
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import gcs
from pipeline.errors import BadInput, ConfigurationError, SourceMissing, StoreError, TransientError
from pipeline.keys import KeyType, short_hash_of_key
from pipeline.stores.base import CopyOutcome, content_hash
from pipeline.stores.objects_io import (
    _contains,
    _gcs_get,
    _gcs_head,
    _gcs_write,
    _Head,
    _local_get,
    _local_head,
    _local_write,
    _normalise_location,
    _Shard,
    _store_error,
)
from pipeline.stores.objects_names import (
    GCS_MAX_NAME_BYTES,
    LOCAL_MAX_NAME_BYTES,
    LOCAL_MAX_PATH_BYTES,
    NAMESPACE,
    SEGMENT_CHARS,
    WRITTEN_NS_METADATA,
    KeyTooLong,
    decode_name,
    encode_key,
    name_length,
)

__all__ = [
    "ObjectDataStore",
    "encode_key",
    "decode_name",
    "name_length",
    "KeyTooLong",
    "NAMESPACE",
    "SEGMENT_CHARS",
    "GCS_MAX_NAME_BYTES",
    "LOCAL_MAX_NAME_BYTES",
    "LOCAL_MAX_PATH_BYTES",
    "WRITTEN_NS_METADATA",
]


# ------------------------------------------------------------------ store


class ObjectDataStore:
    """Records as one object per key under per-shard prefixes (see the module docstring)."""

    def __init__(self, shards: Mapping[str, str], key_type: KeyType = KeyType.STRING, *,
                 io_concurrency: int = 32, keys_per_call: int = 64):
        if not shards:
            raise BadInput("config data_store.shards: expected a mapping of shard id to location")
        norm: dict[str, _Shard] = {}
        for sid, loc in shards.items():
            if not isinstance(sid, str) or not sid:
                raise BadInput("config data_store.shards: shard ids must be non-empty strings")
            norm[sid] = _Shard(sid, _normalise_location(sid, loc))
        ids = sorted(norm)
        for i, a in enumerate(ids):
            for b in ids[i + 1:]:
                la, lb = norm[a].location, norm[b].location
                if _contains(la, lb) or _contains(lb, la):
                    raise BadInput(f"config data_store.shards: the locations of {a} and {b} overlap")
        self.key_type = KeyType(key_type)
        self.io_concurrency = int(io_concurrency)
        self.keys_per_call = int(keys_per_call)
        self._shards = norm
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], key_type: KeyType) -> "ObjectDataStore":
        """Build from a ``data_store`` section (``kind: objects``); BadInput names the bad field."""
        unknown = sorted(set(spec) - {"kind", "shards", "io_concurrency", "keys_per_call"})
        if unknown:
            raise BadInput(f"config data_store: unknown field {unknown[0]} for kind objects")
        shards = spec.get("shards")
        if not isinstance(shards, Mapping) or not shards:
            raise BadInput("config data_store.shards: expected a mapping of shard id to location")
        kw = {}
        for name, lo, hi in (("io_concurrency", 1, 1024), ("keys_per_call", 1, 100_000)):
            if name in spec:
                v = spec[name]
                if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                    raise BadInput(f"config data_store.{name}: expected an integer {lo}..{hi}, got {v!r}")
                kw[name] = v
        return cls(dict(shards), key_type, **kw)

    # -- pickling: configuration only
    def __getstate__(self):
        d = dict(self.__dict__)
        d["_pool"] = None
        d["_lock"] = None
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"ObjectDataStore({len(self._shards)} shards, {self.key_type.value!r})"

    # ------------------------------------------------------------ naming

    @property
    def shard_ids(self) -> tuple[str, ...]:
        return tuple(sorted(self._shards))

    def location(self, shard: str) -> str:
        """The configured (normalised) location of ``shard``."""
        return self._shard(shard).location

    def _shard(self, shard: str) -> _Shard:
        s = self._shards.get(shard)
        if s is None:
            raise ConfigurationError(f"data store: shard not configured in data_store.shards ({shard})",
                                 reason="shard_unknown")
        return s

    def object_name(self, key: bytes) -> str:
        """Relative object name of ``key`` (:func:`encode_key`)."""
        return encode_key(key)

    def object_path(self, key: bytes, shard: str) -> str:
        """Full location of ``key``'s object on ``shard``; KeyTooLong past the shard's limit."""
        s = self._shard(shard)
        name = encode_key(key)
        if len(name) > s.name_budget():
            raise KeyTooLong(f"key {short_hash_of_key(bytes(key))} is too long for an object name "
                             f"on shard {shard} (longest key there: {self.max_key_bytes(shard)} bytes)")
        return s.path(name)

    def max_key_bytes(self, shard: str | None = None) -> int:
        """Longest canonical key (bytes) whose object name fits on ``shard`` (all shards if None)."""
        shards = [self._shard(shard)] if shard is not None else list(self._shards.values())
        budget = min(s.name_budget() for s in shards)
        lo, hi = 0, 8192  # name_length is monotonic: binary search the largest fitting size
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if name_length(mid) <= budget:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def check_keys(self, keys, shard: str | None = None) -> int:
        """How many of ``keys`` (canonical bytes: a sequence or a pyarrow binary array) are too long."""
        limit = self.max_key_bytes(shard)
        if isinstance(keys, (pa.Array, pa.ChunkedArray)):
            lengths = pc.binary_length(keys)
            return int(pc.sum(pc.greater(lengths, limit).cast(pa.int64())).as_py() or 0)
        return sum(1 for k in keys if len(k) > limit)

    # ------------------------------------------------------- concurrency

    def _map(self, fn: Callable, items: Sequence) -> list:
        if len(items) <= 1 or self.io_concurrency <= 1:
            return [fn(x) for x in items]
        pool = self._pool
        if pool is None:
            with self._lock:
                if self._pool is None:
                    self._pool = concurrent.futures.ThreadPoolExecutor(
                        max_workers=self.io_concurrency, thread_name_prefix="objects-io")
                pool = self._pool
        return list(pool.map(fn, items))

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    # -------------------------------------------------------- primitives

    def _head(self, s: _Shard, name: str) -> _Head | None:
        return _gcs_head(s.path(name)) if s.is_gcs else _local_head(s.path(name))

    def _get(self, s: _Shard, name: str) -> tuple[bytes, _Head] | None:
        return _gcs_get(s.path(name)) if s.is_gcs else _local_get(s.path(name))

    def _write(self, s: _Shard, name: str, data: bytes, written_ns: int, expect: int) -> bool:
        if s.is_gcs:
            return _gcs_write(s.path(name), data, written_ns, expect)
        return _local_write(s.path(name), data, written_ns, expect)

    def _name(self, key: bytes, s: _Shard) -> str:
        name = encode_key(key)
        if len(name) > s.name_budget():
            raise KeyTooLong(f"key {short_hash_of_key(bytes(key))} is too long for an object name "
                             f"on shard {s.id} (longest key there: {self.max_key_bytes(s.id)} bytes)")
        return name

    # ------------------------------------------------------------- reads

    def _read_many(self, keys: Sequence[bytes], shard: str, what: str,
                   fn: Callable[[_Shard, str], Any]) -> dict:
        if not keys:
            return {}
        s = self._shard(shard)
        uniq = list(dict.fromkeys(bytes(k) for k in keys))
        if not s.is_gcs and not os.path.isdir(s.location):
            return {}

        def one(key):
            try:
                name = self._name(key, s)
            except (KeyTooLong, ValueError):
                return key, None  # such a key cannot exist on the shard
            try:
                return key, fn(s, name)
            except Exception as e:  # noqa: BLE001 -- classified, chained
                raise _store_error(e, what) from e

        return {k: v for k, v in self._map(one, uniq) if v is not None}

    def read(self, keys: Sequence[bytes], shard: str) -> dict[bytes, tuple[bytes, int]]:
        """``key -> (object bytes, version)`` for the keys present on ``shard``."""
        got = self._read_many(keys, shard, "shard read", self._get)
        return {k: (data, h.version) for k, (data, h) in got.items()}

    def hashes(self, keys: Sequence[bytes], shard: str) -> dict[bytes, tuple[bytes, int]]:
        """``key -> (xxh3-128 of the object bytes, version)`` for the keys present on ``shard``."""
        got = self._read_many(keys, shard, "shard hash", self._get)
        return {k: (content_hash(data), h.version) for k, (data, h) in got.items()}

    def key_sizes(self, keys: Sequence[bytes], shard: str) -> dict[bytes, int]:
        """``key -> object size in bytes`` (metadata only) for the keys present on ``shard``."""
        got = self._read_many(keys, shard, "shard sizes", self._head)
        return {k: h.size for k, h in got.items()}

    def versions(self, keys: Sequence[bytes], shard: str) -> dict[bytes, int]:
        """``key -> version`` (metadata only) for the keys present on ``shard``."""
        got = self._read_many(keys, shard, "shard versions", self._head)
        return {k: h.version for k, h in got.items()}

    def _list(self, shard: str, what: str) -> list[int]:
        """Sizes of every object of ``shard`` (temporary files excluded)."""
        s = self._shard(shard)
        try:
            if s.is_gcs:
                return [n for p, n in gcs.list_objects(s.root)
                        if not p.rsplit("/", 1)[-1].startswith(".")]
            sizes = []
            for root, _dirs, files in os.walk(s.root):
                for f in files:
                    if f.startswith("."):
                        continue
                    try:
                        sizes.append(os.stat(os.path.join(root, f), follow_symlinks=False).st_size)
                    except FileNotFoundError:
                        continue
            return sizes
        except Exception as e:  # noqa: BLE001
            raise _store_error(e, what) from e

    def count(self, shard: str) -> int:
        """Objects on ``shard`` (0 when its location holds none)."""
        return len(self._list(shard, "shard count"))

    def shard_bytes(self, shard: str) -> int:
        """Sum of the object sizes on ``shard``."""
        return sum(self._list(shard, "shard bytes"))

    def shard_exists(self, shard: str) -> bool:
        """Configured, and its directory exists (local) / its bucket answers (GCS)."""
        s = self._shards.get(shard)
        if s is None:
            return False
        if not s.is_gcs:
            return os.path.isdir(s.location)
        from google.api_core.exceptions import NotFound

        bucket, name = gcs.parse(s.location)
        try:
            it = gcs.client().list_blobs(bucket, prefix=(name + "/") if name else "", max_results=1)
            for _ in it:
                break
            return True
        except NotFound:
            return False
        except Exception as e:  # noqa: BLE001
            raise _store_error(e, "shard exists") from e

    def check_shard(self, shard: str, *, write: bool = False) -> str | None:
        """The preflight of ``shard`` (:class:`~pipeline.stores.base.ShardChecks`): None when a
        copy can read from it (``write=True``: write to it), else what is wrong.  Nothing is
        written.

        Local: a source's directory must exist and be readable; a target's
        directory must be writable (``os.access``) -- or, when absent (the first
        copy creates it), its nearest existing parent.  GCS: the bucket must
        answer a listing of the shard's prefix (a 404 or 403 names it); write
        permission is not probed on GCS (a probe would have to write), so a
        refused write surfaces at the run's first copy, which stops the run
        as a configuration error without failing any key."""
        s = self._shards.get(shard)
        if s is None:
            return "not configured in data_store.shards"
        if s.is_gcs:
            try:
                return None if self.shard_exists(shard) else f"bucket of {s.location} not found"
            except StoreError as e:
                return str(e)
        loc = s.location
        if not os.path.isdir(loc):
            if not write:
                return f"directory {loc} does not exist"
            parent = os.path.dirname(os.path.abspath(loc))
            while not os.path.isdir(parent) and os.path.dirname(parent) != parent:
                parent = os.path.dirname(parent)
            return None if os.access(parent, os.W_OK | os.X_OK) else f"directory {parent} is not writable"
        mode = os.R_OK | os.X_OK | (os.W_OK if write else 0)
        if not os.access(loc, mode):
            return f"directory {loc} is not {'writable' if write else 'readable'}"
        return None

    # ------------------------------------------------------------ writes

    def copy(self, keys: Sequence[bytes], source: str, target: str) -> list[CopyOutcome]:
        """Copy the objects of ``keys`` from ``source`` to ``target`` (see "Copy" above).

        Returns one :class:`CopyOutcome` per input key, in order.  Raises
        ``PermanentError(reason="shard_missing")`` when a local source
        directory does not exist (it is never created).
        """
        if source == target:
            raise ValueError("copy: source and target are the same shard")
        if not keys:
            return []
        src, tgt = self._shard(source), self._shard(target)
        if not src.is_gcs and not os.path.isdir(src.location):
            raise ConfigurationError(f"copy: source shard directory not found ({source})", reason="shard_missing")
        uniq = list(dict.fromkeys(bytes(k) for k in keys))
        done = dict(zip(uniq, self._map(lambda k: self._copy_one(k, src, tgt), uniq)))
        return [done[bytes(k)] for k in keys]

    def _copy_one(self, key: bytes, src: _Shard, tgt: _Shard) -> CopyOutcome:
        try:
            sname = self._name(key, src)
            tname = self._name(key, tgt)
            got = self._get(src, sname)
            if got is None:
                return CopyOutcome(key, error=SourceMissing(
                    f"source object missing for key {short_hash_of_key(key)}"))
            data, sh = got
            written = self._put_over(tgt, tname, data, sh.written_ns, newer_wins=True)
            return CopyOutcome(key, content_hash=content_hash(data), source_version=sh.version,
                               written=written)
        except KeyTooLong as e:
            return CopyOutcome(key, error=e)
        except Exception as e:  # noqa: BLE001 -- per-key outcome, classified
            return CopyOutcome(key, error=_store_error(e, "copy"))

    def _put_over(self, s: _Shard, name: str, data: bytes, written_ns: int, *, newer_wins: bool) -> bool:
        """Make ``name`` on ``s`` hold ``data`` (compare-and-set loop).

        Returns True when the object holds ``data`` afterwards; False when
        ``newer_wins`` and the object was written after ``written_ns``.
        """
        for _ in range(5):
            head = self._head(s, name)
            if head is None:
                if self._write(s, name, data, written_ns, 0):
                    return True
                continue  # created concurrently: look again
            if newer_wins and head.size == len(data):
                cur = self._get(s, name)
                if cur is not None and cur[0] == data:
                    return True  # already holds these bytes: nothing to write
                if cur is not None:
                    head = cur[1]
            if newer_wins and head.written_ns > written_ns:
                return False  # a newer record: never overwritten
            stamp = written_ns if newer_wins else max(written_ns, head.written_ns + 1)
            if self._write(s, name, data, stamp, head.version):
                return True
        raise TransientError("object kept changing while being written", reason="contention")

    def put_many(self, shard: str, rows: Iterable[tuple[bytes, bytes]]) -> int:
        """Write ``(key, value)`` records on ``shard`` (demo and tests).

        Every row is written (a new version, even for unchanged bytes),
        stamped with a fresh write time (``max(now, previous + 1)``), so it
        outranks every earlier record of the key, copies included.  The last
        of duplicate keys wins.  Returns the rows written.
        """
        s = self._shard(shard)
        latest: dict[bytes, bytes] = {}
        for row in rows:
            latest[bytes(row[0])] = bytes(row[1])
        if not latest:
            return 0

        def one(item):
            key, value = item
            try:
                self._put_over(s, self._name(key, s), value, time.time_ns(), newer_wins=False)
            except Exception as e:  # noqa: BLE001
                raise _store_error(e, "shard put") from e

        self._map(one, list(latest.items()))
        return len(latest)

    def delete(self, keys: Sequence[bytes], shard: str, *, versions: Sequence[int] | None = None) -> int:
        """Delete the objects of ``keys`` on ``shard``; returns how many were deleted.

        Idempotent (absent objects are fine).  With ``versions`` (aligned with
        ``keys``) an object is deleted only while it still has that version --
        GCS: ``if_generation_match``; local: checked just before the unlink.
        """
        if not keys:
            return 0
        if versions is not None and len(versions) != len(keys):
            raise ValueError("delete: versions must align with keys")
        s = self._shard(shard)
        items = list(zip(keys, versions if versions is not None else [None] * len(keys)))

        def one(item) -> int:
            key, ver = item
            try:
                name = self._name(bytes(key), s)
            except (KeyTooLong, ValueError):
                return 0
            try:
                if s.is_gcs:
                    return int(gcs.delete(s.path(name), if_generation_match=ver))
                path = s.path(name)
                if ver is not None:
                    head = _local_head(path)
                    if head is None or head.version != int(ver):
                        return 0
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    return 0
                return 1
            except Exception as e:  # noqa: BLE001
                raise _store_error(e, "shard delete") from e

        n = sum(self._map(one, items))
        return n
