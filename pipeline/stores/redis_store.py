"""Redis map store (``kind: redis``).

Never imports Beam.  Keys arrive as canonical bytes and are stored as their
text form (``keys.text_form`` of the keyspace's key type), as in the SQLite
map.

Layout (``prefix`` defaults to ``shardmap``)::

    <prefix>:shard    hash     key text -> shard id
    <prefix>:version  hash     key text -> version (decimal)
    <prefix>:clock    string   the keyspace change counter
    <prefix>:runs     hash     plan id -> JSON claim {epoch, lo, hi, holder, expires_at}
                               (the executors' run registry, see ``claim_run``)

``version`` is the keyspace-wide change number of the SQLite map: every write
batch (a ``put_many`` chunk, a swap batch) runs as ONE Lua script that does
``INCR <prefix>:clock`` once and stamps each row it writes with the new
value, so versions grow in commit order and ``max_version()`` is the clock.
A conflicted swap writes nothing and consumes no version.  Applications that
write the map must follow the same rule (INCR the clock, HSET both hashes, in
one script or MULTI).  A map seeded by hand must set the clock to at least its
highest version (:func:`seeding_rule`): rows above the clock are left out of
every snapshot, and ``rows_above_clock`` (:class:`~pipeline.stores.base.ExternalClock`)
counts them for ``validate``.  There is nothing to create: ``initialize`` only
checks the layout's key types.

The scripts carry a ``#!lua`` shebang (Redis >= 7.0): Redis then refuses them
up front when it is out of memory instead of failing half-way, so a batch is
applied entirely or not at all.  In Redis Cluster, put the prefix in braces
(``{shardmap}``) so that the four keys share a slot.

Credentials: the URL (``redis://user:password@host:port/db``,
``rediss://`` for TLS); it is only ever shown through
:func:`pipeline.stores.postgres.redact_dsn`.  Connection failures, timeouts,
``LOADING``/``BUSY``/``TRYAGAIN``/``OOM`` become
:class:`~pipeline.errors.TransientError`; authentication failures and
``WRONGTYPE`` (a key of the layout holding another type) become
:class:`~pipeline.errors.PermanentError`.
"""
from __future__ import annotations

import threading
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import redis
import xxhash

from pipeline.errors import BadInput, PermanentError, StoreError, TransientError
from pipeline.lease import LeaseLost
from pipeline.keys import KeyType, text_forms
from pipeline.stores.base import CountingSnapshot, SwapItem, SwapResult, swap_item
from pipeline.stores.claims import ClaimDecision, ClaimRow, raise_for
from pipeline.stores.postgres_common import _dsn_secrets, _scrub, redact_dsn

__all__ = ["RedisMapStore", "RedisMapSnapshot", "DEFAULT_URL", "DEFAULT_PREFIX", "seeding_rule"]

DEFAULT_URL = "redis://127.0.0.1:6379/0"
DEFAULT_PREFIX = "shardmap"
_WRITE_CHUNK = 10_000  # rows per put_many script call


def seeding_rule(prefix: str = DEFAULT_PREFIX) -> list[str]:
    """How to seed a map under ``prefix`` by hand, one instruction a line (``shardmove init``
    prints them; the README says the same)."""
    return [
        f"HSET {prefix}:shard <key text> <shard id>    (every key; key text as in CONTRACTS: string as is, "
        "int64 decimal, uuid lowercase hyphenated, bytes lowercase hex)",
        f"HSET {prefix}:version <key text> <version>   (the same keys; a positive integer, 1 will do)",
        f"SET {prefix}:clock <n>                       (n >= the highest version seeded; rows above the clock "
        "are left out of every snapshot, and validate refuses them)",
    ]
_LOOKUP_CHUNK = 10_000

# KEYS: shard hash, version hash, clock, runs hash.  ARGV[1] = "1" to decide
# without writing; ARGV[2], ARGV[3] = the fencing token (plan id, epoch) or
# "", ""; then (key, expected source, target) triples.  Returns {version or
# "0", status per item: 0 apply, 1 already at target, 2 conflict}, or
# {"lease_lost", current epoch or "none"} when the token no longer holds.
_SWAP_LUA = """#!lua
if ARGV[2] ~= '' then
  local claim = redis.call('HGET', KEYS[4], ARGV[2])
  local epoch = claim and cjson.decode(claim).epoch
  if epoch ~= tonumber(ARGV[3]) then
    return {'lease_lost', epoch and tostring(epoch) or 'none'}
  end
end
local dry = ARGV[1] == '1'
local n = (#ARGV - 3) / 3
local status = {}
local apply = {}
local conflict = false
for i = 1, n do
  local b = 4 + (i - 1) * 3
  local cur = redis.call('HGET', KEYS[1], ARGV[b])
  if cur == ARGV[b + 2] then
    status[i] = 1
  elseif cur == ARGV[b + 1] then
    status[i] = 0
    apply[#apply + 1] = b
  else
    status[i] = 2
    conflict = true
  end
end
local version = '0'
if (not dry) and (not conflict) and #apply > 0 then
  redis.call('INCR', KEYS[3])
  version = redis.call('GET', KEYS[3])
  for _, b in ipairs(apply) do
    redis.call('HSET', KEYS[1], ARGV[b], ARGV[b + 2])
    redis.call('HSET', KEYS[2], ARGV[b], version)
  end
end
table.insert(status, 1, version)
return status
"""

# KEYS: runs hash.  ARGV: plan id, epoch, window lo, window hi, holder, expires at, now.
# The claim rule of pipeline.stores.claims.decide_claim, in one atomic script:
# the same plan with a newer epoch first, then the live overlapping claim of
# another plan with the bytewise-smallest plan id.  Returns {'ok'} or {'newer'
# | 'overlap', plan id, epoch, lo, hi, holder, expires at} (the deciding row).
_CLAIM_LUA = """#!lua
local pid, epoch = ARGV[1], tonumber(ARGV[2])
local lo, hi, now = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[7])
local function row(kind, id, r)
  return {kind, id, tostring(r.epoch), tostring(r.lo), tostring(r.hi), r.holder, tostring(r.expires_at)}
end
local mine = redis.call('HGET', KEYS[1], pid)
if mine then
  local r = cjson.decode(mine)
  if r.epoch > epoch then return row('newer', pid, r) end
end
local function before(a, b)
  for i = 1, math.min(#a, #b) do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y end
  end
  return #a < #b
end
local best, br = nil, nil
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  if all[i] ~= pid then
    local r = cjson.decode(all[i + 1])
    if r.expires_at > now and r.lo <= hi and lo <= r.hi and (best == nil or before(all[i], best)) then
      best, br = all[i], r
    end
  end
end
if best then return row('overlap', best, br) end
redis.call('HSET', KEYS[1], pid, cjson.encode({epoch = epoch, lo = lo, hi = hi, holder = ARGV[5],
                                               expires_at = tonumber(ARGV[6])}))
return {'ok'}
"""

# KEYS: runs hash.  ARGV: plan id, epoch, new expiry.  Returns 1 if this epoch holds the claim.
_RENEW_LUA = """#!lua
local claim = redis.call('HGET', KEYS[1], ARGV[1])
if not claim then return 0 end
local r = cjson.decode(claim)
if r.epoch ~= tonumber(ARGV[2]) then return 0 end
r.expires_at = tonumber(ARGV[3])
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(r))
return 1
"""

# KEYS: shard hash, version hash, clock.  ARGV: (key, shard) pairs.  Returns the version.
_PUT_LUA = """#!lua
redis.call('INCR', KEYS[3])
local version = redis.call('GET', KEYS[3])
for i = 1, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  redis.call('HSET', KEYS[2], ARGV[i], version)
end
return version
"""


# ----------------------------------------------------------------- errors

_TRANSIENT_REPLIES = ("LOADING", "BUSY", "TRYAGAIN", "OOM", "MASTERDOWN", "CLUSTERDOWN", "READONLY")


def _store_error(e: redis.RedisError, what: str, secrets: Sequence[str]) -> StoreError:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    msg = f"{what}: {_scrub(text, secrets)} ({type(e).__name__})"
    if isinstance(e, redis.exceptions.AuthenticationError) or "NOAUTH" in text or "WRONGPASS" in text:
        return PermanentError(msg, reason="cannot_connect")
    if isinstance(e, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)):
        return TransientError(msg, reason="connection")
    if text.startswith(_TRANSIENT_REPLIES) or isinstance(e, redis.exceptions.BusyLoadingError):
        return TransientError(msg, reason="busy")
    if text.startswith("WRONGTYPE"):
        return PermanentError(msg, reason="schema")
    return PermanentError(msg, reason="store_error")


def _raise(e: redis.RedisError, what: str, secrets: Sequence[str]):
    err = _store_error(e, what, secrets)
    if any(s in str(e) for s in secrets):
        raise err from None  # the driver's own message held a secret
    raise err from e


# ------------------------------------------------------------ seen-set


class _SeenSet:
    """Membership of 128-bit key hashes in about 16 bytes per key.

    Runs of (hi, lo) uint64 pairs sorted by ``hi``, merged like a binary
    counter (two sorted runs merge in linear time with a stable sort); a
    batch is checked against every run with ``searchsorted`` on ``hi`` and a
    comparison of ``lo``.  xxh3-128 of the key text: a false "seen" (two keys
    with one hash) has probability ~n^2 / 2^129.
    """

    def __init__(self):
        self._runs: list[tuple[np.ndarray, np.ndarray]] = []
        self.size = 0

    @staticmethod
    def _split(fields: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
        digest = xxhash.xxh3_128_digest
        both = np.frombuffer(b"".join(map(digest, fields)), dtype=">u8").reshape(-1, 2).astype(np.uint64)
        return both[:, 0].copy(), both[:, 1].copy()

    def add(self, fields: Sequence[bytes]) -> np.ndarray:
        """Record ``fields``; returns a mask of those never seen before (first occurrence)."""
        n = len(fields)
        if n == 0:
            return np.zeros(0, dtype=bool)
        hi, lo = self._split(fields)
        order = np.argsort(hi, kind="stable")  # equal hashes keep their input order
        shi, slo = hi[order], lo[order]
        fresh = np.ones(n, dtype=bool)  # in sorted order
        same_hi = shi[1:] == shi[:-1]
        if same_hi.any():  # duplicates in the batch (or, rarely, equal high halves)
            for p in np.nonzero(same_hi)[0] + 1:
                g = p - 1
                while g >= 0 and shi[g] == shi[p]:
                    if fresh[g] and slo[g] == slo[p]:
                        fresh[p] = False
                        break
                    g -= 1
        for rhi, rlo in self._runs:  # sorted queries against sorted runs
            left = np.searchsorted(rhi, shi, "left")
            right = np.searchsorted(rhi, shi, "right")
            width = right - left
            one = width == 1  # the usual hit: one run entry with this high half
            hit = np.zeros(n, dtype=bool)
            hit[one] = rlo[left[one]] == slo[one]
            for p in np.nonzero(width > 1)[0]:
                hit[p] = slo[p] in rlo[left[p]:right[p]]
            fresh &= ~hit
        if fresh.any():
            self._runs.append((shi[fresh], slo[fresh]))
            self.size += int(fresh.sum())
            while len(self._runs) >= 2 and len(self._runs[-2][0]) <= 2 * len(self._runs[-1][0]):
                (ahi, alo), (bhi, blo) = self._runs[-2], self._runs[-1]
                mhi, mlo = np.concatenate([ahi, bhi]), np.concatenate([alo, blo])
                o = np.argsort(mhi, kind="stable")
                self._runs[-2:] = [(mhi[o], mlo[o])]
        new = np.zeros(n, dtype=bool)
        new[order[fresh]] = True
        return new


# ---------------------------------------------------------------- snapshot


class RedisMapSnapshot(CountingSnapshot):
    """A point-in-time export of a Redis shard map (see :class:`base.MapSnapshot`).

    Redis has no read transactions, so the snapshot is "at the cutoff, minus
    what changed while it ran": opening it reads ``cutoff = GET <prefix>:clock``;
    iterating ``HSCAN``s ``<prefix>:shard`` (``COUNT segment_size``, a hint),
    reads the versions of each page with ``HMGET <prefix>:version`` (after
    the shard ids: a row whose version is still <= cutoff then has the shard
    id it had at the cutoff), and yields RecordBatches of exactly
    ``segment_size`` rows (the last one shorter).

    * A row with version > cutoff was written during the scan: it is left
      out, and counted in ``rows_above_cutoff``, which is counted after the
      scan by a second ``HSCAN`` of ``<prefix>:version`` (as SQLite counts
      after its read transaction) -- the planner reports it as drift.
    * ``HSCAN`` may return a field twice (when the hash is resized during the
      scan); duplicates are dropped through a set of xxh3-128 hashes of the
      key texts (about 16 bytes per key, numpy arrays) and counted in
      ``duplicates``.  A page buffer holds at most ``segment_size`` rows plus
      one page.
    * A row without a version (or with a non-integer one), or whose key or
      shard id is not valid for the key type, is counted in ``invalid_keys``.
    * A key deleted during the scan may or may not be exported.
    """

    def __init__(self, store: "RedisMapStore", segment_size: int):
        if isinstance(segment_size, bool) or not isinstance(segment_size, int) or segment_size < 1:
            raise ValueError(f"segment_size must be a positive integer, got {segment_size!r}")
        self.segment_size = segment_size
        self.key_type = store.key_type
        self._store = store
        self._rows = 0
        self._invalid = 0
        self._excluded = 0
        self.duplicates = 0
        self._above: int | None = None
        self._started = False
        self._closed = False
        self.cutoff = store.max_version()

    def _is_closed(self) -> bool:
        return self._closed

    def _page(self, cursor: int) -> tuple[int, list[bytes], list[bytes]]:
        """One HSCAN page: (next cursor, fields, shard ids).  A hook for tests."""
        nxt, page = self._store._client().hscan(self._store.shard_key, cursor, count=self.segment_size)
        return int(nxt), list(page.keys()), list(page.values())

    def _batches(self) -> Iterator[pa.RecordBatch]:
        store = self._store
        seen = _SeenSet()
        buf_k: list[bytes] = []
        buf_s: list[bytes] = []
        buf_v: list[int] = []
        try:
            cursor = 0
            while True:
                cursor, fields, shards = self._page(cursor)
                if fields:
                    fresh = seen.add(fields)
                    if not fresh.all():
                        self.duplicates += int(len(fields) - fresh.sum())
                        fields = [f for f, ok in zip(fields, fresh) if ok]
                        shards = [s for s, ok in zip(shards, fresh) if ok]
                    versions = store._client().hmget(store.version_key, fields) if fields else []
                    for f, s, v in zip(fields, shards, versions):
                        try:
                            iv = int(v)
                        except (TypeError, ValueError):
                            self._invalid += 1
                            continue
                        if iv > self.cutoff:
                            self._excluded += 1
                            continue
                        buf_k.append(f)
                        buf_s.append(s)
                        buf_v.append(iv)
                    while len(buf_k) >= self.segment_size:
                        n = self.segment_size
                        batch = self._to_batch(buf_k[:n], buf_s[:n], buf_v[:n])
                        del buf_k[:n], buf_s[:n], buf_v[:n]
                        if batch.num_rows:
                            yield batch
                if cursor == 0:
                    break
            if buf_k:
                batch = self._to_batch(buf_k, buf_s, buf_v)
                if batch.num_rows:
                    yield batch
            self._above = store.count_above(self.cutoff)
        except redis.RedisError as e:
            _raise(e, f"map store {redact_dsn(store.url)}: snapshot", store._secrets)
        finally:
            self._closed = True

    def _to_batch(self, keys: list[bytes], shards: list[bytes], versions: list[int]) -> pa.RecordBatch:
        return self._columns_to_batch(keys, shards, versions)

    def close(self) -> None:
        self._closed = True


# ------------------------------------------------------------------- store


class RedisMapStore:
    """The shard map in three Redis keys (see the module docstring).

    Thread-safe (redis-py's connection pool) and picklable (configuration
    only).  ``repr()`` and every message show the URL redacted.
    """

    def __init__(self, url: str = DEFAULT_URL, key_type: KeyType = KeyType.STRING, *,
                 prefix: str = DEFAULT_PREFIX, connect_timeout: float = 5.0, socket_timeout: float = 30.0):
        if not isinstance(prefix, str) or not prefix or any(c.isspace() for c in prefix):
            raise BadInput(f"config map_store.prefix: expected a non-empty name without spaces, got {prefix!r}")
        self.key_type = KeyType(key_type)
        self.url = url
        self.prefix = prefix
        self.connect_timeout = float(connect_timeout)
        self.socket_timeout = float(socket_timeout)
        self.shard_key = f"{prefix}:shard"
        self.version_key = f"{prefix}:version"
        self.clock_key = f"{prefix}:clock"
        self.runs_key = f"{prefix}:runs"
        self._secrets = _dsn_secrets(url)
        self._redis: redis.Redis | None = None
        self._scripts: dict = {}
        self._guard = threading.Lock()

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], key_type: KeyType) -> "RedisMapStore":
        """``{kind: redis, url?, prefix?, connect_timeout?, socket_timeout?}`` (BadInput if invalid)."""
        unknown = sorted(set(spec) - {"kind", "url", "prefix", "connect_timeout", "socket_timeout"})
        if unknown:
            raise BadInput(f"config map_store: unknown field {unknown[0]}")
        url = spec.get("url", DEFAULT_URL)
        if not isinstance(url, str) or not url.startswith(("redis://", "rediss://", "unix://")):
            raise BadInput(f"config map_store.url: expected redis://, rediss:// or unix:// "
                           f"(got {redact_dsn(url) if isinstance(url, str) else url!r})")
        opts = {}
        for name, default, hi in (("connect_timeout", 5.0, 300.0), ("socket_timeout", 30.0, 3600.0)):
            v = spec.get(name, default)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= hi:
                raise BadInput(f"config map_store.{name}: expected seconds in 0..{hi:g}, got {v!r}")
            opts[name] = float(v)
        return cls(url, key_type, prefix=spec.get("prefix", DEFAULT_PREFIX), **opts)

    def _config(self) -> dict:
        return dict(url=self.url, key_type=self.key_type, prefix=self.prefix,
                    connect_timeout=self.connect_timeout, socket_timeout=self.socket_timeout)

    def __getstate__(self) -> dict:
        return self._config()

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def __repr__(self) -> str:
        return f"RedisMapStore({redact_dsn(self.url)!r}, {self.key_type.value!r}, prefix={self.prefix!r})"

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _client(self) -> redis.Redis:
        with self._guard:
            if self._redis is None:
                try:
                    self._redis = redis.Redis.from_url(
                        self.url, socket_connect_timeout=self.connect_timeout, socket_timeout=self.socket_timeout,
                        decode_responses=False, health_check_interval=30)
                except (ValueError, redis.RedisError) as e:
                    raise PermanentError(f"map store: bad Redis URL {redact_dsn(self.url)} ({type(e).__name__})",
                                         reason="cannot_connect") from None
                self._scripts = {name: self._redis.register_script(src) for name, src in (
                    ("swap", _SWAP_LUA), ("put", _PUT_LUA), ("claim", _CLAIM_LUA), ("renew", _RENEW_LUA))}
            return self._redis

    def _script(self, name: str):
        self._client()
        return self._scripts[name]

    def close(self) -> None:
        with self._guard:
            client, self._redis = self._redis, None
        if client is not None:
            try:
                client.close()
            except redis.RedisError:
                pass

    # --------------------------------------------------------------- set-up

    @classmethod
    def create(cls, url: str = DEFAULT_URL, key_type: KeyType = KeyType.STRING, **kwargs) -> "RedisMapStore":
        store = cls(url, key_type, **kwargs)
        store.ensure_schema()
        return store

    def ensure_schema(self) -> None:
        """Nothing to create: checks the server answers and the three keys have the layout's types."""
        want = {self.shard_key: b"hash", self.version_key: b"hash", self.clock_key: b"string",
                self.runs_key: b"hash"}
        try:
            c = self._client()
            for key, typ in want.items():
                got = c.type(key)
                if got not in (typ, b"none"):
                    raise PermanentError(f"map schema: {key} holds a {got.decode()}, expected a {typ.decode()}",
                                         reason="schema")
        except redis.RedisError as e:
            _raise(e, f"map store {redact_dsn(self.url)}: schema", self._secrets)

    def initialize(self) -> list[tuple[str, str]]:
        """Nothing to create (``shardmove init``): checks the layout's key types
        (BadInput if one holds another type) and returns ``("exists", "hash <key>")``
        for each layout key already present.  See :func:`seeding_rule`."""
        try:
            self.ensure_schema()
        except PermanentError as e:
            if e.reason == "schema":
                raise BadInput(f"init: {e}") from None
            raise
        try:
            c = self._client()
            found = [(k, c.type(k).decode()) for k in (self.shard_key, self.version_key, self.clock_key, self.runs_key)]
        except redis.RedisError as e:
            _raise(e, f"map store {redact_dsn(self.url)}: init", self._secrets)
        return [("exists", f"{typ} {key}") for key, typ in found if typ != "none"]

    def rows_above_clock(self) -> tuple[int, int]:
        """(rows whose version is above the clock, the highest such version).

        A row's version is the clock value of the write that stamped it, and the
        clock only grows, so every version is at most the clock read *after* it:
        a row above the clock read after the scan was seeded without setting the
        clock.  One HSCAN of ``<prefix>:version``; rows above the clock read
        before the scan are kept (by key) until the clock is read again.
        """
        try:
            c = self._client()
            before = self.max_version()
            above: dict[bytes, int] = {}
            cursor = 0
            while True:
                cursor, page = c.hscan(self.version_key, cursor, count=10_000)
                for f, v in page.items():
                    try:
                        iv = int(v)
                    except ValueError:
                        continue
                    if iv > before:
                        above[f] = iv
                if int(cursor) == 0:
                    break
            after = self.max_version()
        except redis.RedisError as e:
            _raise(e, f"map store {redact_dsn(self.url)}: clock check", self._secrets)
        high = [v for v in above.values() if v > after]
        return len(high), max(high, default=0)

    # ---------------------------------------------------------------- reads

    def snapshot(self, segment_size: int = 20000) -> RedisMapSnapshot:
        """Open an export at the current clock; see :class:`RedisMapSnapshot`."""
        return RedisMapSnapshot(self, segment_size)

    def lookup(self, keys: Sequence[bytes]) -> dict[bytes, tuple[str, int]]:
        """Current ``(shard_id, version)`` of those keys that exist (one MULTI per chunk)."""
        if not keys:
            return {}
        texts = text_forms(keys, self.key_type)
        by_text = dict(zip(texts, keys))
        uniq = list(by_text)
        out: dict[bytes, tuple[str, int]] = {}
        try:
            c = self._client()
            for a in range(0, len(uniq), _LOOKUP_CHUNK):
                part = uniq[a:a + _LOOKUP_CHUNK]
                with c.pipeline(transaction=True) as p:
                    p.hmget(self.shard_key, part)
                    p.hmget(self.version_key, part)
                    shards, versions = p.execute()
                for t, s, v in zip(part, shards, versions):
                    if s is None or v is None:
                        continue
                    try:
                        out[by_text[t]] = (s.decode("utf-8"), int(v))
                    except (UnicodeDecodeError, ValueError):
                        continue
        except redis.RedisError as e:
            _raise(e, f"map store {redact_dsn(self.url)}: lookup", self._secrets)
        return out

    def max_version(self) -> int:
        """The clock (0 when absent): every write stamps the clock's new value."""
        try:
            v = self._client().get(self.clock_key)
        except redis.RedisError as e:
            _raise(e, f"map store {redact_dsn(self.url)}: max version", self._secrets)
        try:
            return int(v or 0)
        except ValueError:
            raise PermanentError(f"map max version: {self.clock_key} is not an integer", reason="schema") from None

    def count_above(self, version: int) -> int:
        """Rows whose version is above ``version``: one HSCAN of the version hash (O(map),
        duplicates dropped as in the snapshot)."""
        version = int(version)
        seen = _SeenSet()
        n = 0
        try:
            c = self._client()
            cursor = 0
            while True:
                cursor, page = c.hscan(self.version_key, cursor, count=10_000)
                if page:
                    fields = list(page.keys())
                    fresh = seen.add(fields)
                    for f, ok in zip(fields, fresh):
                        if ok:
                            try:
                                n += int(page[f]) > version
                            except ValueError:
                                pass
                if int(cursor) == 0:
                    break
        except redis.RedisError as e:
            _raise(e, f"map store {redact_dsn(self.url)}: count", self._secrets)
        return n

    def count(self) -> int:
        try:
            return int(self._client().hlen(self.shard_key))
        except redis.RedisError as e:
            _raise(e, f"map store {redact_dsn(self.url)}: count", self._secrets)

    # --------------------------------------------------------------- writes

    def put_many(self, rows: Iterable[tuple[bytes, str]], *, chunk_size: int = _WRITE_CHUNK) -> int:
        """Upsert ``(key, shard_id)`` rows (demo and tests): one script per chunk,
        stamped with one new clock value.  Returns the rows written."""
        total = 0
        buf: list[tuple[bytes, str]] = []

        def flush():
            nonlocal total
            args: list = []
            for t, (_, s) in zip(text_forms([k for k, _ in buf], self.key_type), buf):
                args += [t, s]
            try:
                self._script("put")(keys=[self.shard_key, self.version_key, self.clock_key], args=args)
            except redis.RedisError as e:
                _raise(e, f"map store {redact_dsn(self.url)}: put", self._secrets)
            total += len(buf)
            buf.clear()

        for row in rows:
            buf.append((row[0], row[1]))
            if len(buf) >= chunk_size:
                flush()
        if buf:
            flush()
        return total

    def supports_fence(self, data_store: object) -> bool:
        """Never: Redis cannot check a data store inside its script."""
        return False

    # ------------------------------------------------ run registry (fencing)

    def claim_run(self, plan_id: str, epoch: int, window: tuple[int, int], holder: str, ttl: float,
                  now: float) -> None:
        """Register this executor (plan, epoch) in ``<prefix>:runs``, atomically (one script).

        ``<prefix>:runs`` is a hash: plan id -> JSON ``{epoch, lo, hi, holder,
        expires_at}``.  The one claim rule,
        :func:`pipeline.stores.claims.decide_claim`, written in Lua: a live plan
        whose window overlaps this one refuses it (``Refused``); an older epoch
        of the same plan is refused (``LeaseLost``), a newer one supersedes
        the claim.  The
        epoch is the fencing token that :meth:`swap_batch` checks inside its
        script.
        """
        try:
            reply = self._script("claim")(keys=[self.runs_key], args=[
                plan_id, int(epoch), int(window[0]), int(window[1]), holder, repr(float(now + ttl)), repr(float(now))])
        except redis.RedisError as e:
            _raise(e, f"map store {redact_dsn(self.url)}: run claim", self._secrets)
        kind = reply[0].decode()
        if kind != "ok":
            pid, ep, lo, hi, who, exp = (v.decode() for v in reply[1:7])
            row = ClaimRow(pid, int(float(ep)), int(float(lo)), int(float(hi)), who, float(exp))
            raise_for(ClaimDecision(kind, row), plan_id)

    def _renew(self, plan_id: str, epoch: int, expires_at: float, what: str) -> bool:
        try:
            return bool(self._script("renew")(keys=[self.runs_key], args=[plan_id, int(epoch), repr(float(expires_at))]))
        except redis.RedisError as e:
            _raise(e, f"map store {redact_dsn(self.url)}: {what}", self._secrets)

    def renew_run(self, plan_id: str, epoch: int, ttl: float, now: float) -> None:
        """Extend this executor's claim; ``LeaseLost`` if another epoch took it over."""
        if not self._renew(plan_id, epoch, now + ttl, "run renew"):
            raise LeaseLost(f"plan {plan_id[:12]}: this executor's claim on the map store was taken over")

    def release_run(self, plan_id: str, epoch: int) -> None:
        """Give the claim up (kept, expired, so the epoch never goes back)."""
        self._renew(plan_id, epoch, 0.0, "run release")

    def swap_batch(self, items: Sequence[SwapItem | tuple], *, fence: object | None = None,
                   token: "tuple[str, int] | None" = None) -> SwapResult:
        """Move a batch of keys to their targets: compare-and-set, all or nothing.

        ONE Lua script (EVALSHA, falling back to EVAL), atomic on the server:
        for each item ``(key, expected_source, target)`` it reads the key's
        shard id -- at ``target``: ``already`` (not written again, so a rerun
        of a committed batch writes nothing); at ``expected_source``: to
        apply; otherwise or absent: ``conflicts``.  With no conflict it does
        ``INCR <prefix>:clock`` once and sets every key to apply to its target
        with the new clock value as its version; with any conflict it writes
        nothing.  The same key twice with different moves is a conflict.
        With ``token`` = (plan id, epoch) the script first checks the run
        registry (:meth:`claim_run`): a taken-over executor raises
        ``LeaseLost`` and nothing is applied.
        """
        if fence is not None:
            raise TypeError("swap_batch: the Redis map store cannot fence a swap (supports_fence is False)")
        norm = [swap_item(it) for it in items]
        if not norm:
            return SwapResult()
        texts = text_forms([it.key for it in norm], self.key_type)
        first: dict[str, int] = {}
        dup_conflict: set[str] = set()
        for i, (t, it) in enumerate(zip(texts, norm)):
            j = first.setdefault(t, i)
            if j != i and norm[j] != it:
                dup_conflict.add(t)
        uniq = list(first)
        args: list = ["1" if dup_conflict else "0"] + ([token[0], int(token[1])] if token is not None else ["", ""])
        for t in uniq:
            it = norm[first[t]]
            args += [t, it.source, it.target]
        try:
            reply = self._script("swap")(keys=[self.shard_key, self.version_key, self.clock_key, self.runs_key],
                                         args=args)
        except redis.RedisError as e:
            _raise(e, f"map store {redact_dsn(self.url)}: swap", self._secrets)
        if reply[0] == b"lease_lost":
            raise LeaseLost(f"plan {token[0][:12]}: epoch {token[1]} no longer holds the map store "
                            f"(now {reply[1].decode()}); nothing applied")
        version = int(reply[0])
        code = {t: int(s) for t, s in zip(uniq, reply[1:])}
        by: dict[str, list[int]] = {"apply": [], "already": [], "conflict": []}
        for i, t in enumerate(texts):
            c = 2 if t in dup_conflict else code[t]
            by[("apply", "already", "conflict")[c]].append(i)
        if by["conflict"]:
            return SwapResult(already=tuple(by["already"]), conflicts=tuple(by["conflict"]))
        return SwapResult(applied=tuple(by["apply"]), already=tuple(by["already"]),
                          version=version if by["apply"] else None)
