"""PostgreSQL map and data stores.

Never imports Beam.  Keys arrive as canonical bytes and are stored as their
text form (``keys.text_form`` of the keyspace's key type), as in the SQLite
stores.  Every identifier (table, schema, column) is validated against
``^[A-Za-z_][A-Za-z0-9_]{0,62}$`` and quoted; every value is bound as a
parameter.

Map store (``kind: postgres``, ``dsn``, ``table`` -- default ``shard_map``,
optionally ``schema.table``)::

    <table>(key TEXT PRIMARY KEY, shard_id TEXT NOT NULL, version BIGINT NOT NULL)
    + index <table>_version_idx(version)
    <table>_runs(plan_id TEXT PRIMARY KEY, epoch BIGINT, window_lo INTEGER, window_hi INTEGER,
                 holder TEXT, expires_at DOUBLE PRECISION)   -- the executors' run registry

``create()`` / ``ensure_schema()`` create the table and index (and the schema
if named); ``claim_run`` creates the registry table.  Nothing else is created.

``version`` is the keyspace-wide change number of the SQLite map: every write
transaction (a ``put_many`` chunk, a swap batch) stamps its rows with
``max(version) + 1``, computed after taking ``LOCK TABLE <table> IN SHARE ROW
EXCLUSIVE MODE`` (self-exclusive, blocks other writers, never readers).  So
writers of the map are serialized and versions grow in *commit order* -- which
a sequence could not promise (a transaction holding ``nextval() = 10`` may
commit after one holding 11, and a snapshot at cutoff 11 would then neither
see nor count it).  Applications that write the map must stamp the same way
(one statement ``... version = (SELECT max(version) + 1 ...)`` is enough: it
queues behind the lock).

Data store (``kind: postgres``, ``shards``, ``tables``): each shard is a DSN
(a database), optionally with a ``schema`` in which the configured tables
live (``{dsn: ..., schema: shard_s1}``); without ``schema`` the tables are
found through the connection's ``search_path``.  A key's data is the rows of
every configured table whose key column equals the key's text form (bytea key
columns take ``\\x<hex>``); co-located tables move together.  See
:class:`PostgresDataStore` for the canonical row encoding, the copy and the
pseudo-version used by the write fence.

Connections: a small bounded pool per DSN (``pool_size``: 4 for the map, 8 per
shard for the data store) shared by a store's threads; ``connect_timeout`` (default 5 s) bounds connecting and
``lock_timeout`` (default 5 s) bounds every lock wait.  Credentials come from
the DSN or the standard libpq mechanisms (``PGPASSWORD``, ``~/.pgpass``,
``PGSERVICE``...).  Every session uses ISO dates, UTC, shortest-exact floats
and hex bytea output, so the text form of every value is canonical.

Errors: connection failures, serialization failures and deadlocks (SQLSTATE
class 40), lock timeouts (55P03), statement timeouts (57014), class 08/53/57P
become :class:`~pipeline.errors.TransientError`; a missing database, a failed
authentication, a missing table or column become
:class:`~pipeline.errors.PermanentError` with a short ``reason``.  Messages
carry the PostgreSQL primary message with quoted values elided, never a
DETAIL line, a key or a password, and are raised ``from None`` so that the
driver's own message (which may hold a DSN fragment or a row value) never
reaches a traceback.  DSNs are shown only through :func:`redact_dsn`.
"""
from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Sequence

import psycopg
import pyarrow as pa
import xxhash
from psycopg import sql
from psycopg.adapt import Loader
from psycopg.pq import TransactionStatus

from pipeline.errors import BadInput, PermanentError, Refused, SourceMissing, StoreError, TransientError
from pipeline.keys import KeyType, short_hash_of_key, text_forms
from pipeline.lease import LeaseLost
from pipeline.stores.base import CopyOutcome, CountingSnapshot, SwapItem, SwapResult, swap_item

__all__ = [
    "PostgresMapStore",
    "PostgresMapSnapshot",
    "PostgresDataStore",
    "redact_dsn",
    "encode_key_rows",
    "pseudo_version",
    "IDENTIFIER_RE",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_LOCK_TIMEOUT",
    "DEFAULT_POOL_SIZE",
]

LOG = logging.getLogger("shardmove.stores.postgres")

#: Seconds to wait for a connection to open.
DEFAULT_CONNECT_TIMEOUT = 5.0
#: Seconds any statement waits for a lock before failing (as a TransientError).
DEFAULT_LOCK_TIMEOUT = 5.0
#: Connections per DSN per store object.
DEFAULT_POOL_SIZE = 8
#: Seconds a thread waits for a free pooled connection.
_POOL_WAIT = 60.0

IDENTIFIER_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")

_IN_CHUNK = 5000  # keys per ``= ANY(%s)`` query
_WRITE_CHUNK = 10_000  # rows per put_many transaction

_SESSION_SQL = (
    "SET DateStyle = 'ISO, YMD'; SET IntervalStyle = 'postgres'; SET TimeZone = 'UTC'; "
    "SET extra_float_digits = 1; SET bytea_output = 'hex'; SET client_encoding = 'UTF8'"
)


# ----------------------------------------------------------------- redaction

_URI_USERINFO = re.compile(r"(?P<pre>\b[A-Za-z][A-Za-z0-9+.\-]*://[^:/@?#\s]*):(?P<pw>[^@/?#\s]*)@")
_URI_QUERY_PW = re.compile(r"(?P<pre>[?&]password=)(?P<pw>[^&#\s]*)", re.IGNORECASE)
_KV_PW = re.compile(r"(?P<pre>\bpassword\s*=\s*)(?P<pw>'(?:[^'\\]|\\.)*'|[^\s']+)", re.IGNORECASE)


def redact_dsn(dsn: str) -> str:
    """The DSN / URL with every password replaced by ``***``.

    Handles ``key=value`` conninfo strings (quoted or not) and URIs
    (``scheme://user:password@host`` and ``?password=``), whether or not they
    parse.  Use it wherever a DSN could be echoed.
    """
    if not dsn:
        return ""
    out = _URI_USERINFO.sub(lambda m: m.group("pre") + ":***@", str(dsn))
    out = _URI_QUERY_PW.sub(lambda m: m.group("pre") + "***", out)
    return _KV_PW.sub(lambda m: m.group("pre") + "***", out)


def _dsn_secrets(dsn: str) -> tuple[str, ...]:
    """Every form of the password(s) a DSN carries (raw, unquoted, percent-decoded)."""
    found: set[str] = set()
    if not dsn:
        return ()
    for rx in (_URI_USERINFO, _URI_QUERY_PW, _KV_PW):
        for m in rx.finditer(dsn):
            raw = m.group("pw")
            found.add(raw)
            if raw.startswith("'") and raw.endswith("'") and len(raw) >= 2:
                found.add(re.sub(r"\\(.)", r"\1", raw[1:-1]))
            found.add(urllib.parse.unquote(raw))
    try:
        from psycopg.conninfo import conninfo_to_dict

        pw = conninfo_to_dict(dsn).get("password")
        if pw:
            found.add(str(pw))
    except Exception:  # an unparsable DSN: the regexes above did what they could
        pass
    return tuple(sorted((s for s in found if s), key=len, reverse=True))


def _scrub(text: str, secrets: Sequence[str]) -> str:
    for s in secrets:
        text = text.replace(s, "***")
    return text


# -------------------------------------------------------------------- errors

_QUOTED = re.compile(r'"[^"]*"')
_PARENS = re.compile(r"=\([^)]*\)")


def _safe_primary(e: BaseException, secrets: Sequence[str], idents: frozenset[str] = frozenset()) -> str:
    """The first line of the server's primary message, values elided.

    Double-quoted words stay only if they are identifiers this store knows
    (table, column, schema names); anything else (a value, a database name
    that could echo a DSN fragment) becomes ``"…"``.
    """
    diag = getattr(e, "diag", None)
    msg = getattr(diag, "message_primary", None) if diag is not None else None
    if not msg:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    msg = _QUOTED.sub(lambda m: m.group(0) if m.group(0)[1:-1] in idents else '"…"', msg)
    msg = _PARENS.sub("=(…)", msg)
    return _scrub(msg, secrets)


_PERMANENT_CONNECT = ("does not exist", "authentication failed", "no password supplied",
                      "permission denied", "no pg_hba.conf entry")


def _store_error(e: psycopg.Error, what: str, secrets: Sequence[str],
                 idents: frozenset[str] = frozenset()) -> StoreError:
    """Classify a psycopg error (see the module docstring); never a key or a password."""
    state = getattr(e, "sqlstate", None) or ""
    name = type(e).__name__
    msg = f"{what}: {_safe_primary(e, secrets, idents)} ({name}{', SQLSTATE ' + state if state else ''})"
    if state == "55P03":
        return TransientError(msg, reason="busy")
    if state.startswith("40"):
        return TransientError(msg, reason="conflict")
    if state == "57014":
        return TransientError(msg, reason="timeout")
    if state.startswith(("08", "53", "57P", "58")):
        return TransientError(msg, reason="connection")
    if state in ("42P01", "42703", "3F000", "42704", "42883"):
        return PermanentError(msg, reason="schema")
    if state.startswith("23"):
        return PermanentError(msg, reason="constraint")
    if state.startswith("42501"):
        return PermanentError(msg, reason="permission")
    if isinstance(e, psycopg.OperationalError) and not state:
        low = str(e).lower()
        if any(p in low for p in _PERMANENT_CONNECT):
            return PermanentError(msg, reason="cannot_connect")
        return TransientError(msg, reason="connection")
    if isinstance(e, psycopg.InterfaceError):
        return TransientError(msg, reason="connection")
    return PermanentError(msg, reason="store_error")


# --------------------------------------------------------------- identifiers


def _check_ident(value: Any, what: str) -> str:
    if not isinstance(value, str) or not IDENTIFIER_RE.match(value):
        raise BadInput(f"config {what}: expected an identifier matching {IDENTIFIER_RE.pattern}, got {value!r}")
    return value


def _split_table(value: Any, what: str) -> tuple[str | None, str]:
    """``"table"`` or ``"schema.table"``, each part a strict identifier."""
    if not isinstance(value, str):
        raise BadInput(f"config {what}: expected a table name, got {value!r}")
    parts = value.split(".")
    if len(parts) == 1:
        return None, _check_ident(parts[0], what)
    if len(parts) == 2:
        return _check_ident(parts[0], what), _check_ident(parts[1], what)
    raise BadInput(f"config {what}: expected table or schema.table, got {value!r}")


def _ident(schema: str | None, name: str) -> sql.Identifier:
    return sql.Identifier(schema, name) if schema else sql.Identifier(name)


def _seconds(spec: Mapping, name: str, what: str, default: float, lo: float, hi: float) -> float:
    v = spec.get(name, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
        raise BadInput(f"config {what}.{name}: expected seconds in {lo:g}..{hi:g}, got {v!r}")
    return float(v)


def _count(spec: Mapping, name: str, what: str, default: int, lo: int, hi: int) -> int:
    v = spec.get(name, default)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise BadInput(f"config {what}.{name}: expected an integer in {lo}..{hi}, got {v!r}")
    return v


def _check_fields(spec: Mapping, allowed: set[str], what: str) -> None:
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise BadInput(f"config {what}: unknown field {unknown[0]}")


def _dsn_of(spec: Mapping, what: str) -> str:
    dsn = spec.get("dsn", "")
    if not isinstance(dsn, str):
        raise BadInput(f"config {what}.dsn: expected a connection string")
    try:
        from psycopg.conninfo import conninfo_to_dict

        conninfo_to_dict(dsn)
    except psycopg.Error:
        raise BadInput(f"config {what}.dsn: not a valid PostgreSQL connection string "
                       f"({redact_dsn(dsn)})") from None
    return dsn


# --------------------------------------------------------------- connections


class _RawText(Loader):
    """Load text columns as their raw UTF-8 bytes (the snapshot's key column)."""

    def load(self, data) -> bytes:
        return bytes(data)


class _Pool:
    """A bounded LIFO pool of autocommit connections to one DSN.

    Threads borrow a connection for one operation (one transaction) and give
    it back; a broken connection, or one left inside a transaction, is closed
    instead of returned.  Holds no data.
    """

    def __init__(self, dsn: str, secrets: Sequence[str], *, connect_timeout: float, lock_timeout: float,
                 max_size: int, what: str):
        self._dsn = dsn
        self._secrets = secrets
        self._connect_timeout = connect_timeout
        self._lock_timeout = lock_timeout
        self._max = max_size
        self._what = what
        self._idle: list[psycopg.Connection] = []
        self._open = 0
        self._cond = threading.Condition()
        self._closed = False

    def connect(self) -> psycopg.Connection:
        """A new connection (not pooled), with the canonical session settings."""
        try:
            conn = psycopg.connect(self._dsn, autocommit=True, application_name="shardmove",
                                   connect_timeout=max(1, int(round(self._connect_timeout))))
        except psycopg.Error as e:
            err = _store_error(e, f"{self._what}: cannot connect to {redact_dsn(self._dsn)}", self._secrets)
            raise err from None
        try:
            conn.execute(_SESSION_SQL)
            conn.execute(sql.SQL("SET lock_timeout = {}").format(sql.Literal(f"{int(self._lock_timeout * 1000)}ms")))
        except psycopg.Error as e:
            conn.close()
            raise _store_error(e, f"{self._what}: session set-up", self._secrets) from None
        return conn

    @contextlib.contextmanager
    def borrow(self) -> Iterator[psycopg.Connection]:
        conn = self._take()
        ok = False
        try:
            yield conn
            ok = True
        finally:
            self._give(conn, ok)

    def _take(self) -> psycopg.Connection:
        deadline = time.monotonic() + _POOL_WAIT
        with self._cond:
            while True:
                if self._closed:
                    raise TransientError(f"{self._what}: store closed", reason="closed")
                if self._idle:
                    return self._idle.pop()
                if self._open < self._max:
                    self._open += 1
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TransientError(f"{self._what}: no free connection after {_POOL_WAIT:g}s", reason="busy")
                self._cond.wait(left)
        try:
            return self.connect()
        except BaseException:
            with self._cond:
                self._open -= 1
                self._cond.notify()
            raise

    def _give(self, conn: psycopg.Connection, ok: bool) -> None:
        healthy = not conn.closed and not conn.broken
        if healthy and conn.info.transaction_status != TransactionStatus.IDLE:
            try:
                conn.rollback()
            except psycopg.Error:
                healthy = False
            healthy = healthy and conn.info.transaction_status == TransactionStatus.IDLE
        with self._cond:
            if healthy and not self._closed:
                self._idle.append(conn)
                self._cond.notify()
                return
            self._open -= 1
            self._cond.notify()
        try:
            conn.close()
        except psycopg.Error:
            pass

    def close(self) -> None:
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._open -= len(idle)
            self._cond.notify_all()
        for c in idle:
            try:
                c.close()
            except psycopg.Error:
                pass


@contextlib.contextmanager
def _txn(conn: psycopg.Connection, begin: str = "BEGIN") -> Iterator[psycopg.Connection]:
    """One explicit transaction on an autocommit connection: COMMIT, or ROLLBACK on error."""
    conn.execute(begin)
    try:
        yield conn
    except BaseException:
        if not conn.closed and not conn.broken:
            try:
                conn.execute("ROLLBACK")
            except psycopg.Error:
                pass
        raise
    conn.execute("COMMIT")


def _server_identity(conn: psycopg.Connection) -> tuple:
    """(server start time, port, cluster name, database): equal iff two connections
    reach the same database of the same running server (whatever user or host alias)."""
    row = conn.execute("SELECT pg_postmaster_start_time()::text, current_setting('port'), "
                       "current_setting('cluster_name'), current_database()").fetchone()
    return tuple(row)


class _Configured:
    """Picklable as configuration only; pools are reopened lazily."""

    def _config(self) -> dict:
        raise NotImplementedError

    def __getstate__(self) -> dict:
        return self._config()

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        raise NotImplementedError


# ------------------------------------------------------------------ map store


class PostgresMapSnapshot(CountingSnapshot):
    """A point-in-time export of a PostgreSQL shard map (see :class:`base.MapSnapshot`).

    Opening it starts ONE ``REPEATABLE READ READ ONLY`` transaction on its own
    connection and reads the cutoff (``max(version)`` in that transaction).
    Iterating streams the rows with ``version <= cutoff`` through a named
    server-side cursor, ``segment_size`` rows per fetch (memory bounded by one
    segment), as RecordBatches of :data:`SNAPSHOT_SCHEMA`.  Rows whose key is
    not the canonical text form of a key of the key type are counted in
    ``invalid_keys`` and skipped.

    When the iteration ends the transaction is committed and the rows above
    the cutoff are counted in a new one (rows written or swapped while the
    export ran; inside the repeatable-read transaction that count is 0).
    """

    def __init__(self, store: "PostgresMapStore", segment_size: int):
        if isinstance(segment_size, bool) or not isinstance(segment_size, int) or segment_size < 1:
            raise ValueError(f"segment_size must be a positive integer, got {segment_size!r}")
        self.segment_size = segment_size
        self.key_type = store.key_type
        self._store = store
        self._rows = 0
        self._invalid = 0
        self._above: int | None = None
        self._started = False
        self._conn = store._pool().connect()
        try:
            self._conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            top = self._conn.execute(sql.SQL("SELECT max(version) FROM {}").format(store._table)).fetchone()[0]
            self.cutoff = int(top or 0)
        except psycopg.Error as e:
            self._conn.close()
            raise store._error(e, "map snapshot") from None
        except BaseException:
            self._conn.close()
            raise

    def _batches(self) -> Iterator[pa.RecordBatch]:
        store = self._store
        try:
            cur = self._conn.cursor(name="shardmove_snapshot")
            cur.adapters.register_loader("text", _RawText)
            cur.execute(sql.SQL("SELECT key::text, shard_id::text, version::bigint FROM {} WHERE version <= %s")
                        .format(store._table), (self.cutoff,))
            while True:
                rows = cur.fetchmany(self.segment_size)
                if not rows:
                    break
                batch = self._to_batch(rows)
                if batch.num_rows:
                    yield batch
            cur.close()
            self._conn.execute("COMMIT")
            self._above = int(self._conn.execute(
                sql.SQL("SELECT count(*) FROM {} WHERE version > %s").format(store._table),
                (self.cutoff,)).fetchone()[0])
        except psycopg.Error as e:
            raise store._error(e, "map snapshot") from None
        finally:
            self.close()

    def _to_batch(self, rows: list) -> pa.RecordBatch:
        return self._columns_to_batch(*zip(*rows))

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except psycopg.Error:
                pass


class PostgresMapStore(_Configured):
    """The shard map in one PostgreSQL table (see the module docstring).

    Thread-safe (a bounded connection pool) and picklable (configuration only).
    ``repr()`` and every message show the DSN redacted.
    """

    #: count() and count_above() run in the server (the version index): the drift check may use them
    cheap_counts = True

    def __init__(self, dsn: str = "", key_type: KeyType = KeyType.STRING, *, table: str = "shard_map",
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT, lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
                 pool_size: int = 4):
        self.key_type = KeyType(key_type)
        self.dsn = dsn
        self.table = table
        self.schema, self._name = _split_table(table, "map_store.table")
        self._table = _ident(self.schema, self._name)
        self.connect_timeout = float(connect_timeout)
        self.lock_timeout = float(lock_timeout)
        self.pool_size = int(pool_size)
        self._secrets = _dsn_secrets(dsn)
        self._idents = frozenset(filter(None, (self.schema, self._name, "key", "shard_id", "version")))
        self._pool_obj: _Pool | None = None
        self._pool_guard = threading.Lock()
        self._identity: tuple | None = None

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], key_type: KeyType) -> "PostgresMapStore":
        """``{kind: postgres, dsn, table?, connect_timeout?, lock_timeout?, pool_size?}`` (BadInput if invalid)."""
        what = "map_store"
        _check_fields(spec, {"kind", "dsn", "table", "connect_timeout", "lock_timeout", "pool_size"}, what)
        table = spec.get("table", "shard_map")
        _split_table(table, f"{what}.table")
        return cls(_dsn_of(spec, what), key_type, table=table,
                   connect_timeout=_seconds(spec, "connect_timeout", what, DEFAULT_CONNECT_TIMEOUT, 0.5, 300),
                   lock_timeout=_seconds(spec, "lock_timeout", what, DEFAULT_LOCK_TIMEOUT, 0, 3600),
                   pool_size=_count(spec, "pool_size", what, 4, 1, 256))

    def _config(self) -> dict:
        return dict(dsn=self.dsn, key_type=self.key_type, table=self.table, connect_timeout=self.connect_timeout,
                    lock_timeout=self.lock_timeout, pool_size=self.pool_size)

    def __repr__(self) -> str:
        return f"PostgresMapStore({redact_dsn(self.dsn)!r}, {self.key_type.value!r}, table={self.table!r})"

    def _pool(self) -> _Pool:
        with self._pool_guard:
            if self._pool_obj is None:
                self._pool_obj = _Pool(self.dsn, self._secrets, connect_timeout=self.connect_timeout,
                                       lock_timeout=self.lock_timeout, max_size=self.pool_size, what="map store")
            return self._pool_obj

    def _error(self, e: psycopg.Error, what: str) -> StoreError:
        err = _store_error(e, what, self._secrets, self._idents)
        primary = getattr(getattr(e, "diag", None), "message_primary", None) or ""
        if getattr(e, "sqlstate", None) == "42P01" and f'"{self._name}"' in primary:
            return PermanentError(f"{what}: map store table not found: {self.table}", reason="map_missing")
        return err

    def close(self) -> None:
        with self._pool_guard:
            pool, self._pool_obj = self._pool_obj, None
        if pool is not None:
            pool.close()

    # --------------------------------------------------------------- set-up

    @classmethod
    def create(cls, dsn: str, key_type: KeyType = KeyType.STRING, **kwargs) -> "PostgresMapStore":
        """The store, with its schema (if named), table and version index created if absent."""
        store = cls(dsn, key_type, **kwargs)
        store.ensure_schema()
        return store

    def ensure_schema(self) -> None:
        """``CREATE SCHEMA / TABLE / INDEX IF NOT EXISTS`` (the only objects this store creates)."""
        idx = sql.Identifier(self._name[:50] + "_version_idx")
        try:
            with self._pool().borrow() as conn, _txn(conn):
                if self.schema:
                    conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self.schema)))
                conn.execute(sql.SQL("CREATE TABLE IF NOT EXISTS {} (key TEXT PRIMARY KEY, "
                                     "shard_id TEXT NOT NULL, version BIGINT NOT NULL)").format(self._table))
                conn.execute(sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} (version)").format(idx, self._table))
        except psycopg.Error as e:
            raise self._error(e, "map schema") from None

    # ---------------------------------------------------------------- reads

    def snapshot(self, segment_size: int = 20000) -> PostgresMapSnapshot:
        """Open a point-in-time export; see :class:`PostgresMapSnapshot`."""
        return PostgresMapSnapshot(self, segment_size)

    def lookup(self, keys: Sequence[bytes]) -> dict[bytes, tuple[str, int]]:
        """Current ``(shard_id, version)`` of those keys that exist (one read transaction)."""
        if not keys:
            return {}
        texts = text_forms(keys, self.key_type)
        by_text = dict(zip(texts, keys))
        uniq = list(by_text)
        out: dict[bytes, tuple[str, int]] = {}
        q = sql.SQL("SELECT key, shard_id, version FROM {} WHERE key = ANY(%s::text[])").format(self._table)
        try:
            with self._pool().borrow() as conn, _txn(conn, "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"):
                for a in range(0, len(uniq), _IN_CHUNK):
                    for k, s, v in conn.execute(q, (uniq[a:a + _IN_CHUNK],)):
                        out[by_text[k]] = (s, int(v))
        except psycopg.Error as e:
            raise self._error(e, "map lookup") from None
        return out

    def _scalar(self, query: sql.Composable, params: tuple, what: str) -> int:
        try:
            with self._pool().borrow() as conn:
                return int(conn.execute(query, params).fetchone()[0] or 0)
        except psycopg.Error as e:
            raise self._error(e, what) from None

    def max_version(self) -> int:
        return self._scalar(sql.SQL("SELECT max(version) FROM {}").format(self._table), (), "map max version")

    def count_above(self, version: int) -> int:
        """Rows whose version is above ``version`` (uses the version index)."""
        return self._scalar(sql.SQL("SELECT count(*) FROM {} WHERE version > %s").format(self._table),
                            (int(version),), "map count")

    def count(self) -> int:
        return self._scalar(sql.SQL("SELECT count(*) FROM {}").format(self._table), (), "map count")

    # --------------------------------------------------------------- writes

    def _lock_and_next_version(self, conn: psycopg.Connection) -> int:
        """Serialize map writers, then the next change number (commit order == version order)."""
        conn.execute(sql.SQL("LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE").format(self._table))
        return int(conn.execute(sql.SQL("SELECT coalesce(max(version), 0) + 1 FROM {}")
                                .format(self._table)).fetchone()[0])

    def put_many(self, rows: Iterable[tuple[bytes, str]], *, chunk_size: int = _WRITE_CHUNK) -> int:
        """Upsert ``(key, shard_id)`` rows (demo and tests).

        One write transaction per chunk, stamped with one new change number.
        Returns the rows written.
        """
        q = sql.SQL("INSERT INTO {} (key, shard_id, version) SELECT k, s, %s FROM unnest(%s::text[], %s::text[]) "
                    "AS u(k, s) ON CONFLICT (key) DO UPDATE SET shard_id = EXCLUDED.shard_id, "
                    "version = EXCLUDED.version").format(self._table)
        total = 0
        buf: list[tuple[bytes, str]] = []

        def flush():
            nonlocal total
            last = dict(zip(text_forms([k for k, _ in buf], self.key_type), (s for _, s in buf)))
            ordered = sorted(last.items())
            try:
                with self._pool().borrow() as conn, _txn(conn):
                    v = self._lock_and_next_version(conn)
                    conn.execute(q, (v, [t for t, _ in ordered], [s for _, s in ordered]))
            except psycopg.Error as e:
                raise self._error(e, "map put") from None
            total += len(buf)
            buf.clear()

        for row in rows:
            buf.append((row[0], row[1]))
            if len(buf) >= chunk_size:
                flush()
        if buf:
            flush()
        return total

    def _identity_of(self) -> tuple:
        if self._identity is None:
            try:
                with self._pool().borrow() as conn:
                    self._identity = _server_identity(conn)
            except psycopg.Error as e:
                raise self._error(e, "map identity") from None
        return self._identity

    def supports_fence(self, data_store: object) -> bool:
        """True when ``data_store`` is a :class:`PostgresDataStore` whose every shard lives in
        this map's database (same cluster, same database): a fenced swap then re-checks
        the source records inside the swap's own transaction."""
        if not isinstance(data_store, PostgresDataStore):
            return False
        try:
            mine = self._identity_of()
            return all(data_store._identity_of(s) == mine for s in data_store.shards)
        except StoreError as e:  # cannot tell: the caller falls back to its re-check fence
            LOG.warning("write fence: cannot compare the map's and the shards' databases (%s); "
                        "not fencing inside the swap transaction", e.reason)
            return False

    # ------------------------------------------------ run registry (fencing)

    def _runs_table(self) -> sql.Identifier:
        return _ident(self.schema, self._name[:50] + "_runs")

    def claim_run(self, plan_id: str, epoch: int, window: tuple[int, int], holder: str, ttl: float,
                  now: float) -> None:
        """Register this executor (plan, epoch) in ``<table>_runs``, atomically.

        The registry table (``plan_id TEXT PRIMARY KEY, epoch BIGINT, window_lo,
        window_hi INTEGER, holder TEXT, expires_at DOUBLE PRECISION``, next to
        the map table) is created here if absent.  Refuses (``Refused``) while
        another plan whose window overlaps this one holds a live claim; an older
        epoch of the same plan is refused (``LeaseLost``), a newer one
        supersedes the claim.  The epoch is the fencing token that
        :meth:`swap_batch` checks inside its transaction.
        """
        runs = self._runs_table()
        try:
            with self._pool().borrow() as conn:
                conn.execute(sql.SQL("CREATE TABLE IF NOT EXISTS {} (plan_id TEXT PRIMARY KEY, "
                                     "epoch BIGINT NOT NULL, window_lo INTEGER NOT NULL, window_hi INTEGER NOT NULL, "
                                     "holder TEXT NOT NULL, expires_at DOUBLE PRECISION NOT NULL)").format(runs))
                with _txn(conn):
                    conn.execute(sql.SQL("LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE").format(runs))
                    rows = conn.execute(sql.SQL("SELECT plan_id, epoch, window_lo, window_hi, holder, expires_at "
                                                "FROM {}").format(runs)).fetchall()
                    for pid, ep, lo, hi, who, exp in rows:
                        if pid == plan_id:
                            if ep > epoch:
                                raise LeaseLost(f"plan {plan_id[:12]} is already claimed by a newer executor "
                                                f"(epoch {ep})")
                            continue
                        if exp > now and lo <= window[1] and window[0] <= hi:
                            raise Refused(f"plan {pid[:12]} (held by {who}) may move the same keys and is running "
                                          f"on this map store until {_iso(exp)}; refusing to run plan {plan_id[:12]}")
                    conn.execute(sql.SQL("INSERT INTO {} VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (plan_id) DO "
                                         "UPDATE SET epoch = EXCLUDED.epoch, window_lo = EXCLUDED.window_lo, "
                                         "window_hi = EXCLUDED.window_hi, holder = EXCLUDED.holder, "
                                         "expires_at = EXCLUDED.expires_at").format(runs),
                                 (plan_id, int(epoch), int(window[0]), int(window[1]), holder, float(now + ttl)))
        except psycopg.Error as e:
            raise self._error(e, "run claim") from None

    def renew_run(self, plan_id: str, epoch: int, ttl: float, now: float) -> None:
        """Extend this executor's claim; ``LeaseLost`` if another epoch took it over."""
        try:
            with self._pool().borrow() as conn:
                n = conn.execute(sql.SQL("UPDATE {} SET expires_at = %s WHERE plan_id = %s AND epoch = %s")
                                 .format(self._runs_table()), (float(now + ttl), plan_id, int(epoch))).rowcount
        except psycopg.Error as e:
            raise self._error(e, "run renew") from None
        if n != 1:
            raise LeaseLost(f"plan {plan_id[:12]}: this executor's claim on the map store was taken over")

    def release_run(self, plan_id: str, epoch: int) -> None:
        """Give the claim up (kept, expired, so the epoch never goes back)."""
        try:
            with self._pool().borrow() as conn:
                conn.execute(sql.SQL("UPDATE {} SET expires_at = 0 WHERE plan_id = %s AND epoch = %s")
                             .format(self._runs_table()), (plan_id, int(epoch)))
        except psycopg.Error as e:
            raise self._error(e, "run release") from None

    def swap_batch(self, items: Sequence[SwapItem | tuple], *,
                   fence: "PostgresDataStore | None" = None,
                   token: "tuple[str, int] | None" = None) -> SwapResult:
        """Move a batch of keys to their targets: compare-and-set, all or nothing.

        ONE transaction, after ``LOCK TABLE ... IN SHARE ROW EXCLUSIVE MODE``
        (map writers queue; readers and snapshots do not).  For each item
        ``(key, expected_source, target[, source_version])``:

        * key at ``target``: ``already``; its row is not written again (a rerun
          of a committed batch writes nothing);
        * key at ``expected_source``: set to ``target`` and stamped with the
          batch's new change number ``max(version) + 1`` (``applied``);
        * otherwise (another shard, or absent): ``conflicts``.

        With ``fence`` (a :class:`PostgresDataStore` whose shards live in this
        database, see :meth:`supports_fence`), the same transaction takes
        ``SHARE`` locks on the source shard's tables (writers wait until the
        swap commits) and recomputes every applied key's pseudo-version from
        its rows; keys whose version differs from ``source_version`` (changed
        or deleted since the copy) are ``source_changed``.

        With ``token`` = (plan id, epoch), the transaction first checks the
        run registry (:meth:`claim_run`): an executor whose claim was taken
        over raises ``LeaseLost`` and applies nothing.

        Any conflict or changed source rolls the whole batch back.  The same
        key twice with different moves is a conflict.  Lock timeouts,
        deadlocks and lost connections raise TransientError.
        """
        norm = [swap_item(it) for it in items]
        if not norm:
            return SwapResult()
        if fence is not None:
            if not isinstance(fence, PostgresDataStore):
                raise TypeError("swap_batch: fence must be a PostgresDataStore")
            if any(it.source_version is None for it in norm):
                raise ValueError("swap_batch: a fenced swap needs source_version on every item")
            mine = self._identity_of()
            for s in sorted({it.source for it in norm}):
                if s not in fence.shards:
                    raise PermanentError("fenced swap: a source shard is not configured in the data store",
                                         reason="shard_missing")
                if fence._identity_of(s) != mine:
                    raise PermanentError("fenced swap: a source shard is not in the map's database",
                                         reason="fence_unsupported")
        texts = text_forms([it.key for it in norm], self.key_type)
        first: dict[str, int] = {}
        dup_conflict: set[str] = set()
        for i, (t, it) in enumerate(zip(texts, norm)):
            j = first.setdefault(t, i)
            if j != i and norm[j] != it:
                dup_conflict.add(t)

        sel = sql.SQL("SELECT key, shard_id FROM {} WHERE key = ANY(%s::text[])").format(self._table)
        upd = sql.SQL("UPDATE {t} AS m SET shard_id = u.tgt, version = %s "
                      "FROM unnest(%s::text[], %s::text[], %s::text[]) AS u(k, src, tgt) "
                      "WHERE m.key = u.k AND m.shard_id = u.src").format(t=self._table)
        try:
            with self._pool().borrow() as conn:
                conn.execute("BEGIN")
                try:
                    conn.execute(sql.SQL("LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE").format(self._table))
                    if token is not None:
                        row = conn.execute(sql.SQL("SELECT epoch FROM {} WHERE plan_id = %s FOR SHARE")
                                           .format(self._runs_table()), (token[0],)).fetchone()
                        if row is None or row[0] != token[1]:
                            conn.execute("ROLLBACK")

                            raise LeaseLost(f"plan {token[0][:12]}: epoch {token[1]} no longer holds the map store "
                                            f"(now {row[0] if row else 'none'}); nothing applied")
                    current: dict[str, str] = {}
                    uniq = list(first)
                    for a in range(0, len(uniq), _IN_CHUNK):
                        current.update(conn.execute(sel, (uniq[a:a + _IN_CHUNK],)).fetchall())
                    status: dict[str, str] = {}
                    applied: list[str] = []
                    for t, i in first.items():
                        it, cur = norm[i], current.get(t)
                        if t in dup_conflict:
                            status[t] = "conflict"
                        elif cur is not None and cur == it.target:
                            status[t] = "already"
                        elif cur is not None and cur == it.source:
                            status[t] = "apply"
                            applied.append(t)
                        else:
                            status[t] = "conflict"
                    if fence is not None and applied:
                        by_source: dict[str, list[str]] = {}
                        for t in applied:
                            by_source.setdefault(norm[first[t]].source, []).append(t)
                        for s in sorted(by_source):
                            found = fence._fence_versions(conn, s, by_source[s])
                            for t in by_source[s]:
                                if found.get(t) != norm[first[t]].source_version:
                                    status[t] = "source_changed"
                    by: dict[str, list[int]] = {"apply": [], "already": [], "conflict": [], "source_changed": []}
                    for i, t in enumerate(texts):
                        by[status[t]].append(i)
                    if by["conflict"] or by["source_changed"]:
                        conn.execute("ROLLBACK")
                        return SwapResult(already=tuple(by["already"]), conflicts=tuple(by["conflict"]),
                                          source_changed=tuple(by["source_changed"]))
                    version = None
                    if applied:
                        version = int(conn.execute(sql.SQL("SELECT coalesce(max(version), 0) + 1 FROM {}")
                                                   .format(self._table)).fetchone()[0])
                        applied.sort()
                        srcs = [norm[first[t]].source for t in applied]
                        tgts = [norm[first[t]].target for t in applied]
                        n = conn.execute(upd, (version, applied, srcs, tgts)).rowcount
                        if n != len(applied):
                            conn.execute("ROLLBACK")
                            raise PermanentError("map swap: compare-and-set wrote an unexpected number of rows",
                                                 reason="swap_inconsistent")
                    conn.execute("COMMIT")
                    return SwapResult(applied=tuple(by["apply"]), already=tuple(by["already"]), version=version)
                except BaseException:
                    if not conn.closed and not conn.broken and \
                            conn.info.transaction_status != TransactionStatus.IDLE:
                        try:
                            conn.execute("ROLLBACK")
                        except psycopg.Error:
                            pass
                    raise
        except psycopg.Error as e:
            raise self._error(e, "map swap") from None


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


# ----------------------------------------------------------------- data store


@dataclass(frozen=True)
class _TableSpec:
    name: str  # as configured (the canonical encoding's table name)
    schema: str | None
    table: str
    key_column: str
    version_column: str | None


@dataclass(frozen=True)
class _Shard:
    dsn: str
    schema: str | None


@dataclass(frozen=True)
class _Layout:
    """One configured table as found on one shard."""

    spec: _TableSpec
    ident: sql.Composable  # the resolved, schema-qualified table
    columns: tuple[str, ...]  # non-generated columns, sorted by name (the encoding's order)
    types: tuple[str, ...]  # format_type() of each column
    key_type_sql: str  # the key column's type
    version_index: int | None  # position of the version column in ``columns``

    @property
    def shape(self) -> tuple:
        return self.columns, self.types

    @property
    def key_is_bytea(self) -> bool:
        return self.key_type_sql == "bytea"

    def header(self) -> bytes:
        return _table_header(self.spec.name, self.columns, self.types)


def _u32(n: int) -> bytes:
    return n.to_bytes(4, "big")


def _lp(s: str) -> bytes:
    b = s.encode("utf-8")
    return _u32(len(b)) + b


def _table_header(name: str, columns: Sequence[str], types: Sequence[str]) -> bytes:
    return _lp(name) + _u32(len(columns)) + b"".join(_lp(c) + _lp(t) for c, t in zip(columns, types))


def _encode_row(values: Sequence[str | None]) -> bytes:
    parts = []
    for v in values:
        if v is None:
            parts.append(b"\x00")
        else:
            b = v.encode("utf-8")
            parts.append(b"\x01" + _u32(len(b)) + b)
    return b"".join(parts)


def encode_key_rows(tables: Sequence[tuple[str, Sequence[str], Sequence[str], Sequence[Sequence[str | None]]]]) -> bytes:
    """The canonical encoding of one key's data (its "record bytes").

    ``tables``: for each configured table, in configured order, ``(name,
    columns, types, rows)`` with ``columns`` sorted by name, ``types`` their
    ``format_type()`` and each row the columns' PostgreSQL text output (None
    for NULL) in that order.  See :class:`PostgresDataStore`.
    """
    out = []
    for name, columns, types, rows in tables:
        out.append(_table_header(name, columns, types))
        out.append(_u32(len(rows)))
        out.extend(sorted(_encode_row(r) for r in rows))
    return b"".join(out)


def pseudo_version(record: bytes) -> int:
    """The version of a PostgreSQL record: the first 63 bits of its content hash."""
    return int.from_bytes(xxhash.xxh3_128_digest(record)[:8], "big") >> 1


def _lock_id(text: str) -> int:
    """Advisory lock id of a key (signed 64-bit), shared by every copy and delete."""
    h = xxhash.xxh3_64_intdigest(b"shardmove:key:" + text.encode("utf-8"))
    return h - (1 << 64) if h >= (1 << 63) else h


class PostgresDataStore(_Configured):
    """Records of a keyspace in PostgreSQL tables, one database (or schema) per shard.

    **Record.**  A key's record is the rows of every configured table whose
    key column equals the key's text form (for a ``bytea`` key column:
    ``\\x`` + hex; such a column needs key_type ``bytes``).  A key with no row
    in any table has no record (:class:`~pipeline.errors.SourceMissing`).

    **Canonical encoding** (the ``value`` of :meth:`read`; its xxh3-128 is the
    content hash).  For each configured table, in configured order::

        u32 len + table name (as configured) | u32 column count |
        per column, sorted by name: u32 len + name, u32 len + format_type() |
        u32 row count | the rows, each encoded as below, sorted bytewise

    A row is its columns in name order, each ``0x00`` for NULL or ``0x01`` +
    u32 len + the value's PostgreSQL text output (UTF-8, under the fixed
    session settings: ISO dates, UTC, shortest-exact floats, hex bytea).
    Integers are big-endian.  Generated columns are neither encoded nor copied.

    **Version.**  ``source_version`` is a pseudo-version: the first 63 bits of
    the content hash (:func:`pseudo_version`).  It changes whenever any row
    of the key changes, is inserted or is deleted, and comes back only if the
    data comes back identical.  It is an identity, not an order.

    **Copy** (``copy``): one ``REPEATABLE READ`` read of the source (all
    tables at one point in time), then ONE target transaction that takes a
    transaction-level advisory lock per key (so concurrent copies of a key
    queue instead of interleaving), deletes the target's rows of those keys
    in every table and inserts the source rows with ``COPY ... FROM STDIN``.
    Rerunning it leaves the target in the same state: an idempotent upsert
    keyed by the key.  Target tables must exist with the same columns and
    types (``PermanentError(reason="schema")`` otherwise); nothing is created.
    If a table has a ``version_column`` (an application-maintained, growing
    row version), a key whose target rows carry a higher version than its
    source rows is left alone (``written=False``): a late duplicate copy
    never clobbers newer data written on the new owner.

    **Write fence.**  ``PostgresMapStore.swap_batch(..., fence=store)`` works
    when every shard lives in the map's database (schemas of one database):
    the swap transaction ``LOCK``s the source tables ``IN SHARE MODE`` and
    recomputes each key's pseudo-version.  It therefore catches every insert,
    update or delete of the key's rows in the configured tables since the
    copy.  It cannot see changes to tables not configured, nor writes that
    reach the source after the swap commits (an application that read the
    map before the swap); and shards in other databases cannot be fenced
    (``supports_fence`` is False).
    """

    def __init__(self, shards: Mapping[str, Any], tables: Sequence[Any], key_type: KeyType = KeyType.STRING, *,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT, lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
                 pool_size: int = DEFAULT_POOL_SIZE):
        self.key_type = KeyType(key_type)
        self.connect_timeout = float(connect_timeout)
        self.lock_timeout = float(lock_timeout)
        self.pool_size = int(pool_size)
        self._shards_raw = {str(k): (dict(v) if isinstance(v, Mapping) else v) for k, v in dict(shards).items()}
        self._tables_raw = [dict(t) if isinstance(t, Mapping) else t for t in tables]
        self._shards: dict[str, _Shard] = {}
        for sid, v in self._shards_raw.items():
            what = f"data_store.shards.{sid}"
            if isinstance(v, str):
                self._shards[sid] = _Shard(_dsn_of({"dsn": v}, what), None)
            elif isinstance(v, Mapping):
                _check_fields(v, {"dsn", "schema"}, what)
                schema = v.get("schema")
                if schema is not None:
                    _check_ident(schema, f"{what}.schema")
                self._shards[sid] = _Shard(_dsn_of(v, what), schema)
            else:
                raise BadInput(f"config {what}: expected a DSN or a mapping with dsn (and schema)")
        if not self._shards:
            raise BadInput("config data_store.shards: expected at least one shard")
        specs = []
        for i, t in enumerate(self._tables_raw):
            what = f"data_store.tables[{i}]"
            if not isinstance(t, Mapping):
                raise BadInput(f"config {what}: expected a mapping with name and key_column")
            _check_fields(t, {"name", "key_column", "version_column"}, what)
            schema, table = _split_table(t.get("name"), f"{what}.name")
            kc = _check_ident(t.get("key_column"), f"{what}.key_column")
            vc = t.get("version_column")
            if vc is not None:
                _check_ident(vc, f"{what}.version_column")
            specs.append(_TableSpec(t["name"], schema, table, kc, vc))
        if not specs:
            raise BadInput("config data_store.tables: expected at least one table")
        if len({s.name for s in specs}) != len(specs):
            raise BadInput("config data_store.tables: a table is listed twice")
        for sid, sh in self._shards.items():
            if sh.schema and any(s.schema for s in specs):
                raise BadInput(f"config data_store.shards.{sid}.schema: table names must not be schema-qualified "
                               "when a shard names its schema")
        self._specs = tuple(specs)
        self._secrets = tuple(sorted({s for sh in self._shards.values() for s in _dsn_secrets(sh.dsn)},
                                     key=len, reverse=True))
        idents = {"value"}
        for s in specs:
            idents.update(filter(None, (s.schema, s.table, s.key_column, s.version_column)))
        idents.update(sh.schema for sh in self._shards.values() if sh.schema)
        self._idents = frozenset(idents)
        self._pools: dict[str, _Pool] = {}
        self._layouts: dict[str, tuple[_Layout, ...]] = {}
        self._identities: dict[str, tuple] = {}
        self._guard = threading.Lock()

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], key_type: KeyType) -> "PostgresDataStore":
        """``{kind: postgres, shards: {id: dsn | {dsn, schema}}, tables: [{name, key_column,
        version_column?}], connect_timeout?, lock_timeout?, pool_size?}`` (BadInput if invalid)."""
        what = "data_store"
        _check_fields(spec, {"kind", "shards", "tables", "connect_timeout", "lock_timeout", "pool_size"}, what)
        shards, tables = spec.get("shards"), spec.get("tables")
        if not isinstance(shards, Mapping) or not shards:
            raise BadInput(f"config {what}.shards: expected a mapping of shard id to DSN")
        if not isinstance(tables, list) or not tables:
            raise BadInput(f"config {what}.tables: expected a list of {{name, key_column}}")
        return cls(shards, tables, key_type,
                   connect_timeout=_seconds(spec, "connect_timeout", what, DEFAULT_CONNECT_TIMEOUT, 0.5, 300),
                   lock_timeout=_seconds(spec, "lock_timeout", what, DEFAULT_LOCK_TIMEOUT, 0, 3600),
                   pool_size=_count(spec, "pool_size", what, DEFAULT_POOL_SIZE, 1, 256))

    def _config(self) -> dict:
        return dict(shards=self._shards_raw, tables=self._tables_raw, key_type=self.key_type,
                    connect_timeout=self.connect_timeout, lock_timeout=self.lock_timeout, pool_size=self.pool_size)

    def __repr__(self) -> str:
        shards = ", ".join(f"{s}={redact_dsn(sh.dsn)!r}" + (f"/{sh.schema}" if sh.schema else "")
                           for s, sh in self._shards.items())
        return f"PostgresDataStore({{{shards}}}, tables={[s.name for s in self._specs]!r}, {self.key_type.value!r})"

    @property
    def shards(self) -> tuple[str, ...]:
        return tuple(self._shards)

    @property
    def tables(self) -> tuple[str, ...]:
        return tuple(s.name for s in self._specs)

    def close(self) -> None:
        with self._guard:
            pools, self._pools = list(self._pools.values()), {}
        for p in pools:
            p.close()

    # ----------------------------------------------------------- plumbing

    def _shard(self, shard: str, what: str) -> _Shard:
        sh = self._shards.get(shard)
        if sh is None:
            raise PermanentError(f"{what}: shard not configured in data_store.shards", reason="shard_missing")
        return sh

    def _pool(self, shard: str) -> _Pool:
        with self._guard:
            pool = self._pools.get(shard)
            if pool is None:
                pool = self._pools[shard] = _Pool(
                    self._shards[shard].dsn, self._secrets, connect_timeout=self.connect_timeout,
                    lock_timeout=self.lock_timeout, max_size=self.pool_size, what=f"data store shard {shard}")
            return pool

    def _error(self, e: psycopg.Error, what: str) -> StoreError:
        return _store_error(e, what, self._secrets, self._idents)

    def _identity_of(self, shard: str) -> tuple:
        ident = self._identities.get(shard)
        if ident is None:
            self._shard(shard, "identity")
            try:
                with self._pool(shard).borrow() as conn:
                    ident = _server_identity(conn)
            except psycopg.Error as e:
                raise self._error(e, "data store identity") from None
            self._identities[shard] = ident
        return ident

    def _table_ref(self, shard: str, spec: _TableSpec) -> str:
        schema = spec.schema or self._shards[shard].schema
        return f'"{schema}"."{spec.table}"' if schema else f'"{spec.table}"'

    def _layout(self, shard: str, conn: psycopg.Connection, what: str, *, missing_ok: bool = False
                ) -> tuple[_Layout, ...] | None:
        """The configured tables as found on ``shard`` (cached per store object)."""
        got = self._layouts.get(shard)
        if got is not None:
            return got
        out = []
        for spec in self._specs:
            row = conn.execute(
                "SELECT c.oid, n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE c.oid = to_regclass(%s)", (self._table_ref(shard, spec),)).fetchone()
            if row is None:
                if missing_ok:
                    return None
                raise PermanentError(f"{what}: table {spec.name} not found on shard {shard}", reason="schema")
            oid, nsp, rel = row
            cols = conn.execute(
                "SELECT attname, format_type(atttypid, atttypmod), attgenerated <> '' FROM pg_attribute "
                "WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped", (oid,)).fetchall()
            types = {n: t for n, t, gen in cols if not gen}
            names = tuple(sorted(types))
            if spec.key_column not in types:
                raise PermanentError(f"{what}: table {spec.name} on shard {shard} has no column {spec.key_column}",
                                     reason="schema")
            if spec.version_column and spec.version_column not in types:
                raise PermanentError(f"{what}: table {spec.name} on shard {shard} has no column "
                                     f"{spec.version_column}", reason="schema")
            kt_sql = types[spec.key_column]
            if kt_sql == "bytea" and self.key_type is not KeyType.BYTES:
                raise PermanentError(f"{what}: table {spec.name}: a bytea key column needs key_type bytes",
                                     reason="schema")
            out.append(_Layout(spec, sql.Identifier(nsp, rel), names, tuple(types[n] for n in names), kt_sql,
                               names.index(spec.version_column) if spec.version_column else None))
        layouts = tuple(out)
        self._layouts[shard] = layouts
        return layouts

    @staticmethod
    def _key_params(layout: _Layout, texts: Sequence[str]) -> list[str]:
        return ["\\x" + t for t in texts] if layout.key_is_bytea else list(texts)

    @staticmethod
    def _key_of(layout: _Layout, out: str) -> str:
        return out[2:] if layout.key_is_bytea else out

    def _select_rows(self, conn: psycopg.Connection, layouts: Sequence[_Layout], texts: Sequence[str]
                     ) -> list[dict[str, list[tuple]]]:
        """Per table: key text -> its rows (column text values, in name order)."""
        result = []
        for lay in layouts:
            q = sql.SQL("SELECT {k}::text, {cols} FROM {t} WHERE {k} = ANY(%s::text[]::{kt}[])").format(
                k=sql.Identifier(lay.spec.key_column),
                cols=sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(c)) for c in lay.columns),
                t=lay.ident, kt=sql.SQL(lay.key_type_sql))
            rows: dict[str, list[tuple]] = {}
            for a in range(0, len(texts), _IN_CHUNK):
                params = self._key_params(lay, texts[a:a + _IN_CHUNK])
                for r in conn.execute(q, (params,)):
                    rows.setdefault(self._key_of(lay, r[0]), []).append(tuple(r[1:]))
            result.append(rows)
        return result

    @staticmethod
    def _records(layouts: Sequence[_Layout], per_table: list[dict[str, list[tuple]]]) -> dict[str, bytes]:
        """key text -> canonical encoding, for the keys with at least one row."""
        present: dict[str, None] = {}
        for rows in per_table:
            present.update(dict.fromkeys(rows))
        headers = [lay.header() for lay in layouts]
        out = {}
        for t in present:
            parts = []
            for h, rows in zip(headers, per_table):
                mine = rows.get(t, ())
                parts.append(h)
                parts.append(_u32(len(mine)))
                parts.extend(sorted(_encode_row(r) for r in mine))
            out[t] = b"".join(parts)
        return out

    @staticmethod
    def _max_versions(layouts: Sequence[_Layout], per_table: list[dict[str, list[tuple]]]) -> dict[str, int]:
        out: dict[str, int] = {}
        for lay, rows in zip(layouts, per_table):
            if lay.version_index is None:
                continue
            for t, rs in rows.items():
                for r in rs:
                    v = r[lay.version_index]
                    if v is not None:
                        try:
                            iv = int(v)
                        except ValueError:
                            continue
                        if iv > out.get(t, iv - 1):
                            out[t] = iv
        return out

    def _lock_keys(self, conn: psycopg.Connection, texts: Sequence[str]) -> None:
        ids = sorted({_lock_id(t) for t in texts})
        conn.execute("SELECT count(pg_advisory_xact_lock(h)) FROM (SELECT h FROM unnest(%s::bigint[]) AS u(h) "
                     "ORDER BY h) s", (ids,))

    def _read_records(self, keys: Sequence[bytes], shard: str, what: str) -> dict[bytes, bytes]:
        if not keys or shard not in self._shards:
            return {}
        texts = text_forms(keys, self.key_type)
        by_text = dict(zip(texts, keys))
        try:
            with self._pool(shard).borrow() as conn, \
                    _txn(conn, "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"):
                layouts = self._layout(shard, conn, what)
                recs = self._records(layouts, self._select_rows(conn, layouts, list(by_text)))
        except psycopg.Error as e:
            raise self._error(e, what) from None
        return {by_text[t]: r for t, r in recs.items()}

    def _fence_versions(self, conn: psycopg.Connection, shard: str, texts: Sequence[str]) -> dict[str, int]:
        """Inside a map swap transaction on ``conn`` (same database): lock the shard's
        tables against writers and return each present key's pseudo-version."""
        layouts = self._layouts.get(shard)
        if layouts is None:
            try:
                with self._pool(shard).borrow() as own:
                    layouts = self._layout(shard, own, "fenced swap")
            except psycopg.Error as e:
                raise self._error(e, "fenced swap") from None
        conn.execute(sql.SQL("LOCK TABLE {} IN SHARE MODE").format(sql.SQL(", ").join(l.ident for l in layouts)))
        recs = self._records(layouts, self._select_rows(conn, layouts, list(texts)))
        return {t: pseudo_version(r) for t, r in recs.items()}

    @contextlib.contextmanager
    def write_fence(self, shard: str) -> Iterator:
        """Hold ``shard``'s tables against writers and yield
        ``versions(keys) -> {key: (content hash, version)}`` (the shape of :meth:`hashes`).

        One transaction on the shard that ``LOCK``s every configured table
        ``IN SHARE MODE`` (readers go on; every writer -- fence-aware or not --
        waits) and reads pseudo-versions inside it.  The executor re-checks
        the source versions and swaps the map while it is held, so no write
        can reach the source between that check and the swap (the fence used
        when the map is in another database).  Nothing is written; the
        transaction is rolled back on exit.  A lock held elsewhere beyond
        ``lock_timeout`` raises TransientError on entry.
        """
        self._shard(shard, "write fence")
        with self._pool(shard).borrow() as conn:
            try:
                conn.execute("BEGIN")
                layouts = self._layout(shard, conn, "write fence")
                conn.execute(sql.SQL("LOCK TABLE {} IN SHARE MODE").format(
                    sql.SQL(", ").join(lay.ident for lay in layouts)))
            except psycopg.Error as e:
                raise self._error(e, "write fence") from None
            kt = self.key_type

            def versions(keys: Sequence[bytes]) -> dict[bytes, tuple[bytes, int]]:
                texts = text_forms(list(keys), kt)
                back = dict(zip(texts, keys))
                try:
                    recs = self._records(layouts, self._select_rows(conn, layouts, list(back)))
                except psycopg.Error as e:
                    raise self._error(e, "write fence") from None
                return {back[t]: (xxhash.xxh3_128_digest(r), pseudo_version(r)) for t, r in recs.items()}

            try:
                yield versions
            finally:
                if not conn.closed and not conn.broken:
                    try:
                        conn.execute("ROLLBACK")
                    except psycopg.Error:
                        pass

    # ---------------------------------------------------------------- reads

    def read(self, keys: Sequence[bytes], shard: str) -> dict[bytes, tuple[bytes, int]]:
        """``key -> (canonical encoding, pseudo-version)`` for the keys with rows on ``shard``."""
        return {k: (r, pseudo_version(r)) for k, r in self._read_records(keys, shard, "shard read").items()}

    def hashes(self, keys: Sequence[bytes], shard: str) -> dict[bytes, tuple[bytes, int]]:
        """``key -> (xxh3-128 of the canonical encoding, pseudo-version)``."""
        out = {}
        for k, r in self._read_records(keys, shard, "shard hash").items():
            out[k] = (xxhash.xxh3_128_digest(r), pseudo_version(r))
        return out

    def key_sizes(self, keys: Sequence[bytes], shard: str) -> dict[bytes, int]:
        """``key -> length of its canonical encoding`` for the keys with rows on ``shard``."""
        return {k: len(r) for k, r in self._read_records(keys, shard, "shard sizes").items()}

    #: Copies need the target tables to exist: nothing is created.
    creates_shards = False

    def shard_exists(self, shard: str) -> bool:
        """Configured, reachable, and every configured table exists there."""
        if shard not in self._shards:
            return False
        try:
            with self._pool(shard).borrow() as conn:
                return self._layout(shard, conn, "shard exists", missing_ok=True) is not None
        except psycopg.Error as e:
            err = self._error(e, "shard exists")
            if err.reason == "cannot_connect":
                return False
            raise err from None
        except PermanentError as e:
            if e.reason == "cannot_connect":
                return False
            raise

    def _key_union(self, layouts: Sequence[_Layout]) -> sql.Composable:
        return sql.SQL(" UNION ").join(
            sql.SQL("SELECT {k}::text AS k FROM {t}").format(k=sql.Identifier(l.spec.key_column), t=l.ident)
            for l in layouts)

    def count(self, shard: str) -> int:
        """Distinct keys with at least one row on ``shard`` (0 when not configured)."""
        if shard not in self._shards:
            return 0
        try:
            with self._pool(shard).borrow() as conn, _txn(conn, "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"):
                layouts = self._layout(shard, conn, "shard count")
                q = sql.SQL("SELECT count(*) FROM ({}) u").format(self._key_union(layouts))
                return int(conn.execute(q).fetchone()[0])
        except psycopg.Error as e:
            raise self._error(e, "shard count") from None

    def shard_bytes(self, shard: str) -> int:
        """Sum of :meth:`key_sizes` over every key on ``shard``, computed server side."""
        if shard not in self._shards:
            return 0
        try:
            with self._pool(shard).borrow() as conn, _txn(conn, "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"):
                layouts = self._layout(shard, conn, "shard bytes")
                total = 0
                for lay in layouts:
                    row_len = sql.SQL(" + ").join(
                        sql.SQL("CASE WHEN {c} IS NULL THEN 1 ELSE 5 + octet_length({c}::text) END")
                        .format(c=sql.Identifier(c)) for c in lay.columns)
                    total += int(conn.execute(sql.SQL("SELECT coalesce(sum({}), 0) FROM {}")
                                              .format(row_len, lay.ident)).fetchone()[0])
                keys = int(conn.execute(sql.SQL("SELECT count(*) FROM ({}) u")
                                        .format(self._key_union(layouts))).fetchone()[0])
                per_key = sum(len(lay.header()) + 4 for lay in layouts)
                return total + keys * per_key
        except psycopg.Error as e:
            raise self._error(e, "shard bytes") from None

    # --------------------------------------------------------------- writes

    def copy(self, keys: Sequence[bytes], source: str, target: str) -> list[CopyOutcome]:
        """Copy the records of ``keys`` from ``source`` to ``target`` (see the class docstring).

        One ``REPEATABLE READ`` read of the source, then ONE target write
        transaction: per-key advisory locks, delete the target's rows of the
        keys, ``COPY`` the source rows in.  Idempotent upsert keyed by the key;
        never touches the map; creates nothing.  Returns one
        :class:`CopyOutcome` per input key, in order (``SourceMissing`` for a
        key without rows on the source).  Raises ``PermanentError`` for an
        unconfigured shard (``shard_missing``) or a table that is missing or
        shaped differently on the target (``schema``), ``TransientError``
        (whole batch) for lock timeouts, deadlocks and lost connections.
        """
        if source == target:
            raise ValueError("copy: source and target are the same shard")
        if not keys:
            return []
        self._shard(source, "copy")
        self._shard(target, "copy")
        texts = text_forms(keys, self.key_type)
        uniq = list(dict.fromkeys(texts))

        try:
            with self._pool(source).borrow() as conn, \
                    _txn(conn, "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"):
                src_layouts = self._layout(source, conn, "copy read")
                per_table = self._select_rows(conn, src_layouts, uniq)
        except psycopg.Error as e:
            raise self._error(e, "copy read") from None
        records = self._records(src_layouts, per_table)
        src_versions = self._max_versions(src_layouts, per_table)

        written: set[str] = set()
        if records:
            present = sorted(records)
            try:
                with self._pool(target).borrow() as conn, _txn(conn):
                    tgt_layouts = self._layout(target, conn, "copy write")
                    for s, t in zip(src_layouts, tgt_layouts):
                        if s.shape != t.shape:
                            raise PermanentError(f"copy write: table {s.spec.name} has different columns on "
                                                 f"shards {source} and {target}", reason="schema")
                    self._lock_keys(conn, present)
                    todo = present
                    if any(l.version_index is not None for l in tgt_layouts):
                        have = self._max_versions(tgt_layouts, self._select_rows(conn, tgt_layouts, present))
                        todo = [t for t in present
                                if not (t in have and t in src_versions and have[t] > src_versions[t])]
                    if todo:
                        for lay in tgt_layouts:
                            conn.execute(sql.SQL("DELETE FROM {t} WHERE {k} = ANY(%s::text[]::{kt}[])").format(
                                t=lay.ident, k=sql.Identifier(lay.spec.key_column), kt=sql.SQL(lay.key_type_sql)),
                                (self._key_params(lay, todo),))
                        todo_set = set(todo)
                        for lay, rows in zip(tgt_layouts, per_table):
                            stmt = sql.SQL("COPY {} ({}) FROM STDIN").format(
                                lay.ident, sql.SQL(", ").join(map(sql.Identifier, lay.columns)))
                            with conn.cursor() as cur, cur.copy(stmt) as cp:
                                for t in todo:
                                    for r in rows.get(t, ()):
                                        cp.write_row(r)
                        written = todo_set
            except psycopg.Error as e:
                raise self._error(e, "copy write") from None

        hashed = {t: xxhash.xxh3_128_digest(r) for t, r in records.items()}
        out = []
        for k, t in zip(keys, texts):
            r = records.get(t)
            if r is None:
                out.append(CopyOutcome(k, error=SourceMissing(
                    f"source record missing for key {short_hash_of_key(k)}")))
            else:
                out.append(CopyOutcome(k, content_hash=hashed[t], source_version=pseudo_version(r),
                                       written=t in written))
        return out

    def delete(self, keys: Sequence[bytes], shard: str, *, versions: Sequence[int] | None = None) -> int:
        """Delete the rows of ``keys`` on ``shard`` in every table; returns the keys deleted.

        Idempotent.  With ``versions`` (pseudo-versions aligned with ``keys``)
        a key's rows are deleted only if its record still has that version --
        cleanup never removes data rewritten since it was copied.  One
        transaction, per-key advisory locks.
        """
        if not keys:
            return 0
        if versions is not None and len(versions) != len(keys):
            raise ValueError("delete: versions must align with keys")
        if shard not in self._shards:
            return 0
        texts = text_forms(keys, self.key_type)
        want = dict(zip(texts, versions)) if versions is not None else None
        uniq = sorted(set(texts))
        try:
            with self._pool(shard).borrow() as conn, _txn(conn):
                layouts = self._layout(shard, conn, "shard delete")
                self._lock_keys(conn, uniq)
                recs = self._records(layouts, self._select_rows(conn, layouts, uniq))
                todo = [t for t in uniq if t in recs and (want is None or pseudo_version(recs[t]) == int(want[t]))]
                if todo:
                    for lay in layouts:
                        conn.execute(sql.SQL("DELETE FROM {t} WHERE {k} = ANY(%s::text[]::{kt}[])").format(
                            t=lay.ident, k=sql.Identifier(lay.spec.key_column), kt=sql.SQL(lay.key_type_sql)),
                            (self._key_params(lay, todo),))
        except psycopg.Error as e:
            raise self._error(e, "shard delete") from None
        return len(todo)

    def put_many(self, shard: str, rows: Iterable[tuple[bytes, bytes]], *, chunk_size: int = _WRITE_CHUNK) -> int:
        """Write ``(key, value)`` records (demo and tests): a single-table layout.

        Uses the FIRST configured table as ``(<key_column> TEXT PRIMARY KEY,
        value BYTEA NOT NULL)``, creating it (and the shard's schema, if one is
        configured) when absent -- the only objects this store creates.  Each
        row replaces the key's row there; other tables are not touched.
        One transaction per chunk.  Returns the rows written.
        """
        sh = self._shard(shard, "shard put")
        spec = self._specs[0]
        schema = spec.schema or sh.schema
        table = _ident(schema, spec.table)
        kc = sql.Identifier(spec.key_column)
        ins = sql.SQL("INSERT INTO {t} ({k}, value) SELECT k, v FROM unnest(%s::text[], %s::bytea[]) AS u(k, v) "
                      "ON CONFLICT ({k}) DO UPDATE SET value = EXCLUDED.value").format(t=table, k=kc)
        total = 0
        buf: list[tuple[bytes, bytes]] = []

        def flush():
            nonlocal total
            last = dict(zip(text_forms([k for k, _ in buf], self.key_type), (bytes(v) for _, v in buf)))
            ordered = sorted(last.items())
            try:
                with self._pool(shard).borrow() as conn, _txn(conn):
                    if schema:
                        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
                    conn.execute(sql.SQL("CREATE TABLE IF NOT EXISTS {t} ({k} TEXT PRIMARY KEY, value BYTEA NOT NULL)")
                                 .format(t=table, k=kc))
                    conn.execute(ins, ([t for t, _ in ordered], [v for _, v in ordered]))
            except psycopg.Error as e:
                raise self._error(e, "shard put") from None
            total += len(buf)
            buf.clear()

        for row in rows:
            buf.append((row[0], row[1]))
            if len(buf) >= chunk_size:
                flush()
        if buf:
            flush()
        with self._guard:
            self._layouts.pop(shard, None)
        return total
