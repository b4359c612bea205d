"""The PostgreSQL data store.

Never imports Beam.  Connections, DSN redaction and error classification are
shared with the other PostgreSQL store: :mod:`pipeline.stores.postgres_common`.

Data store (``kind: postgres``, ``shards``, ``tables``): each shard is a DSN
(a database), optionally with a ``schema`` in which the configured tables
live (``{dsn: ..., schema: shard_s1}``); without ``schema`` the tables are
found through the connection's ``search_path``.  A key's data is the rows of
every configured table whose key column equals the key's text form (bytea key
columns take ``\\x<hex>``); co-located tables move together.  See
:class:`PostgresDataStore` for the canonical row encoding, the copy and the
pseudo-version used by the write fence.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Sequence

import psycopg
import xxhash
from psycopg import sql

from pipeline.errors import BadInput, PermanentError, SourceMissing, StoreError, TransientError
from pipeline.keys import KeyType, short_hash_of_key, text_forms
from pipeline.stores.base import CopyOutcome
from pipeline.stores.postgres_common import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_LOCK_TIMEOUT,
    DEFAULT_POOL_SIZE,
    _IN_CHUNK,
    _WRITE_CHUNK,
    _check_fields,
    _check_ident,
    _Configured,
    _count,
    _dsn_of,
    _dsn_secrets,
    _ident,
    _Pool,
    _seconds,
    _server_identity,
    _split_table,
    _store_error,
    _txn,
    redact_dsn,
)

__all__ = ["PostgresDataStore", "encode_key_rows", "pseudo_version"]


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
