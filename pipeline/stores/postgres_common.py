"""PostgreSQL stores, the shared part: DSNs and their redaction, errors, pools, transactions.

Never imports Beam.  Keys arrive as canonical bytes and are stored as their
text form (``keys.text_form`` of the keyspace's key type), as in the SQLite
stores.  Every identifier (table, schema, column) is validated against
``^[A-Za-z_][A-Za-z0-9_]{0,62}$`` and quoted; every value is bound as a
parameter.

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


The map store lives in :mod:`pipeline.stores.postgres_map`, the data store in
:mod:`pipeline.stores.postgres_data`; :mod:`pipeline.stores.postgres` names both.
"""
from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
import urllib.parse
from typing import Any, Iterator, Mapping, Sequence

import psycopg
from psycopg import sql
from psycopg.adapt import Loader
from psycopg.pq import TransactionStatus

from pipeline.errors import BadInput, PermanentError, StoreError, TransientError

__all__ = [
    "redact_dsn",
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
