"""The PostgreSQL map store.

Never imports Beam.  Connections, DSN redaction and error classification are
shared with the other PostgreSQL store: :mod:`pipeline.stores.postgres_common`.

Map store (``kind: postgres``, ``dsn``, ``table`` -- default ``shard_map``,
optionally ``schema.table``; ``columns`` -- ``{key, shard_id, version}`` mapped
onto other column names, each a strict identifier, quoted)::

    <table>(key TEXT PRIMARY KEY, shard_id TEXT NOT NULL, version BIGINT NOT NULL)
    + index <table>_version_idx(version)
    <table>_runs(plan_id TEXT PRIMARY KEY, epoch BIGINT, window_lo INTEGER, window_hi INTEGER,
                 holder TEXT, expires_at DOUBLE PRECISION)   -- the executors' run registry

:func:`map_ddl` is the one definition of these objects: ``create()`` /
``ensure_schema()`` run it, ``claim_run`` runs its registry statement,
``initialize()`` (``shardmove init``) runs what is missing of it after checking
the shape of what exists, ``shardmove init --print-sql`` prints it, and the
README shows it (tests/test_docs.py compares).  Nothing else is created.

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
"""
from __future__ import annotations

import threading
from typing import Any, Iterable, Iterator, Mapping, NamedTuple, Sequence

import psycopg
import pyarrow as pa
from psycopg import sql
from psycopg.pq import TransactionStatus

from pipeline.errors import ConfigurationError, BadInput, PermanentError, StoreError, TransientError
from pipeline.keys import KeyType, text_forms
from pipeline.lease import LeaseLost
from pipeline.stores.base import CountingSnapshot, SwapItem, SwapResult, check_cutoff, swap_item
from pipeline.stores.claims import ClaimRow, decide_claim, raise_for
from pipeline.stores.postgres_common import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_LOCK_TIMEOUT,
    LOG,
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
    _RawText,
    _seconds,
    _server_identity,
    _split_table,
    _store_error,
    _txn,
    redact_dsn,
)
from pipeline.stores.postgres_data import PostgresDataStore

__all__ = ["PostgresMapStore", "PostgresMapSnapshot", "MapColumns", "map_columns", "map_ddl", "ddl_text", "DdlStep",
           "RUNS_COLUMNS"]


class MapColumns(NamedTuple):
    """The map table's column names (``map_store.columns``): the store's three
    logical columns onto the names of an existing table."""

    key: str = "key"
    shard_id: str = "shard_id"
    version: str = "version"


def map_columns(spec: Any, what: str = "map_store.columns") -> MapColumns:
    """``{key?, shard_id?, version?}`` -> :class:`MapColumns` (BadInput if invalid).

    Each name is a strict identifier (quoted in every statement, so its case
    matters); an unknown logical column or two columns of one name are refused.
    """
    if spec is None or isinstance(spec, MapColumns):
        return spec or MapColumns()
    if not isinstance(spec, Mapping):
        raise BadInput(f"config {what}: expected a mapping of key, shard_id, version to column names")
    unknown = sorted(str(k) for k in spec if k not in MapColumns._fields)
    if unknown:
        raise BadInput(f"config {what}: unknown column {unknown[0]!r} (expected key, shard_id, version)")
    cols = MapColumns(*(_check_ident(spec.get(f, f), f"{what}.{f}") for f in MapColumns._fields))
    if len(set(cols)) != len(cols):
        raise BadInput(f"config {what}: key, shard_id and version need three different columns")
    return cols


class DdlStep(NamedTuple):
    """One object of the map's DDL: what it is, its name, and the statement that creates it if absent."""

    kind: str  # schema | table | index | registry
    name: str
    statement: sql.Composed


#: The run registry's columns, in the order ``claim_run`` inserts them.
RUNS_COLUMNS = ("plan_id", "epoch", "window_lo", "window_hi", "holder", "expires_at")


def map_ddl(table: str = "shard_map", columns: MapColumns = MapColumns()) -> list[DdlStep]:
    """The map store's DDL, the one definition (see the module docstring): the
    schema (if ``table`` names one), the map table, its version index and the run
    registry, each ``IF NOT EXISTS``.  Never a DROP or an ALTER."""
    schema, name = _split_table(table, "map_store.table")
    t = _ident(schema, name)
    k, s, v = (sql.Identifier(c) for c in columns)
    idx, runs = name[:50] + "_version_idx", name[:50] + "_runs"
    qual = (schema + ".") if schema else ""
    steps = []
    if schema:
        steps.append(DdlStep("schema", schema, sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema))))
    steps += [
        DdlStep("table", qual + name, sql.SQL("CREATE TABLE IF NOT EXISTS {t} ({k} TEXT PRIMARY KEY, "
                                              "{s} TEXT NOT NULL, {v} BIGINT NOT NULL)").format(t=t, k=k, s=s, v=v)),
        DdlStep("index", qual + idx, sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} ({})")
                .format(sql.Identifier(idx), t, v)),
        DdlStep("registry", qual + runs, sql.SQL(
            "CREATE TABLE IF NOT EXISTS {} (plan_id TEXT PRIMARY KEY, epoch BIGINT NOT NULL, "
            "window_lo INTEGER NOT NULL, window_hi INTEGER NOT NULL, holder TEXT NOT NULL, "
            "expires_at DOUBLE PRECISION NOT NULL)").format(_ident(schema, runs))),
    ]
    return steps


def ddl_text(table: str = "shard_map", columns: MapColumns = MapColumns()) -> str:
    """:func:`map_ddl` as SQL text, one statement a line (identifiers quoted)."""
    return "\n".join(step.statement.as_string(None) + ";" for step in map_ddl(table, columns))


class PostgresMapSnapshot(CountingSnapshot):
    """A point-in-time export of a PostgreSQL shard map (see :class:`base.MapSnapshot`).

    Opening it starts ONE ``REPEATABLE READ READ ONLY`` transaction on its own
    connection and reads the cutoff (``max(version)`` in that transaction, or
    the caller's ``cutoff``: at most that, else BadInput).
    Iterating streams the rows with ``version <= cutoff`` through a named
    server-side cursor, ``segment_size`` rows per fetch (memory bounded by one
    segment), as RecordBatches of :data:`SNAPSHOT_SCHEMA`.  Rows whose key is
    not the canonical text form of a key of the key type are counted in
    ``invalid_keys`` and skipped.

    When the iteration ends the transaction is committed and the rows above
    the cutoff are counted in a new one (rows written or swapped while the
    export ran; inside the repeatable-read transaction that count is 0).
    """

    def __init__(self, store: "PostgresMapStore", segment_size: int, cutoff: int | None = None):
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
            top = self._conn.execute(sql.SQL("SELECT max({v}) FROM {t}").format(**store._q)).fetchone()[0]
            self.cutoff = check_cutoff(cutoff, int(top or 0))
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
            cur.execute(sql.SQL("SELECT {k}::text, {s}::text, {v}::bigint FROM {t} WHERE {v} <= %s")
                        .format(**store._q), (self.cutoff,))
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
                sql.SQL("SELECT count(*) FROM {t} WHERE {v} > %s").format(**store._q),
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
                 pool_size: int = 4, columns: "MapColumns | Mapping | None" = None):
        self.key_type = KeyType(key_type)
        self.dsn = dsn
        self.table = table
        self.schema, self._name = _split_table(table, "map_store.table")
        self._table = _ident(self.schema, self._name)
        self.columns = map_columns(columns)
        #: the identifiers every statement is formatted with: {t} table, {k} {s} {v} its columns
        self._q = dict(t=self._table, **{n: sql.Identifier(c) for n, c in zip("ksv", self.columns)})
        self.connect_timeout = float(connect_timeout)
        self.lock_timeout = float(lock_timeout)
        self.pool_size = int(pool_size)
        self._secrets = _dsn_secrets(dsn)
        self._idents = frozenset(filter(None, (self.schema, self._name, *self.columns)))
        self._pool_obj: _Pool | None = None
        self._pool_guard = threading.Lock()
        self._identity: tuple | None = None

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], key_type: KeyType) -> "PostgresMapStore":
        """``{kind: postgres, dsn, table?, columns?, connect_timeout?, lock_timeout?, pool_size?}``
        (BadInput if invalid)."""
        what = "map_store"
        _check_fields(spec, {"kind", "dsn", "table", "columns", "connect_timeout", "lock_timeout", "pool_size"},
                      what)
        table = spec.get("table", "shard_map")
        _split_table(table, f"{what}.table")
        return cls(_dsn_of(spec, what), key_type, table=table, columns=map_columns(spec.get("columns")),
                   connect_timeout=_seconds(spec, "connect_timeout", what, DEFAULT_CONNECT_TIMEOUT, 0.5, 300),
                   lock_timeout=_seconds(spec, "lock_timeout", what, DEFAULT_LOCK_TIMEOUT, 0, 3600),
                   pool_size=_count(spec, "pool_size", what, 4, 1, 256))

    def _config(self) -> dict:
        return dict(dsn=self.dsn, key_type=self.key_type, table=self.table, connect_timeout=self.connect_timeout,
                    lock_timeout=self.lock_timeout, pool_size=self.pool_size, columns=self.columns)

    def __repr__(self) -> str:
        cols = "" if self.columns == MapColumns() else f", columns={tuple(self.columns)!r}"
        return f"PostgresMapStore({redact_dsn(self.dsn)!r}, {self.key_type.value!r}, table={self.table!r}{cols})"

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
            # a configuration error (the map table is gone): a run halts, it does not fail keys
            return ConfigurationError(f"{what}: map store table not found: {self.table}", reason="map_missing")
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
        """Run :func:`map_ddl` (every statement ``IF NOT EXISTS``; the only objects this store
        creates), in one transaction, checking nothing.  ``initialize()`` also checks."""
        try:
            with self._pool().borrow() as conn, _txn(conn):
                for step in map_ddl(self.table, self.columns):
                    conn.execute(step.statement)
        except psycopg.Error as e:
            raise self._error(e, "map schema") from None

    def initialize(self) -> list[tuple[str, str]]:
        """Create what is missing of :func:`map_ddl`; check what exists (``shardmove init``).

        First reads the catalog in one transaction: an existing map table must be
        a table with the (mapped) key column text-typed and unique on its own
        (primary key or a plain unique index), shard_id text and version bigint
        or integer, both NOT NULL; an existing registry must have the columns of
        :data:`RUNS_COLUMNS`, in order.  Anything else raises BadInput and
        nothing is created.  An existing index whose first column is the version
        column stands for the version index.  Then one transaction runs the
        statements of the missing objects.  Never drops or alters anything.

        Returns ``(status, "kind name")`` pairs, status ``created`` or ``exists``.
        """
        steps = map_ddl(self.table, self.columns)
        try:
            with self._pool().borrow() as conn:
                with _txn(conn, "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"):
                    present = {st.kind: self._present(conn, st) for st in steps}
                todo = [st for st in steps if not present[st.kind]]
                if todo:
                    with _txn(conn):
                        for st in todo:
                            conn.execute(st.statement)
        except psycopg.Error as e:
            raise self._error(e, "map init") from None
        return [("exists" if present[st.kind] else "created",
                 f"{st.kind} " + (present[st.kind] if isinstance(present[st.kind], str) else st.name))
                for st in steps]

    def _present(self, conn: psycopg.Connection, step: DdlStep) -> "bool | str":
        """Whether ``step``'s object exists (for the version index: another index on the
        version column stands for it, and its name is returned); BadInput when it exists
        with a shape this store cannot use."""
        if step.kind == "schema":
            return conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (self.schema,)).fetchone() is not None
        table = self._table if step.kind != "registry" else self._runs_table()
        oid = self._oid(conn, table) if self.schema is None or self._schema_exists(conn) else None
        if oid is None:
            return False
        if step.kind == "index":
            vnum = self._columns_of(conn, oid)[self.columns.version][0]
            row = conn.execute("SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                               "WHERE i.indrelid = %s AND i.indkey[0] = %s AND i.indpred IS NULL AND i.indisvalid "
                               "ORDER BY c.relname = %s DESC, c.relname LIMIT 1",
                               (oid, vnum, step.name.rsplit(".", 1)[-1])).fetchone()
            if row is None:
                return False
            return True if row[0] == step.name.rsplit(".", 1)[-1] else (self.schema + "." if self.schema else "") + row[0]
        kind = conn.execute("SELECT relkind FROM pg_class WHERE oid = %s", (oid,)).fetchone()[0]
        what = "map store table" if step.kind == "table" else "run registry table"
        if kind not in ("r", "p"):
            raise BadInput(f"init: {what} {step.name} exists but is not a table (relkind {kind})")
        cols = self._columns_of(conn, oid)
        if step.kind == "registry":
            names = tuple(sorted(cols, key=lambda c: cols[c][0]))
            if names != RUNS_COLUMNS:
                raise BadInput(f"init: {what} {step.name} has columns ({', '.join(names)}), "
                               f"expected ({', '.join(RUNS_COLUMNS)})")
            return True
        for field, col in zip(MapColumns._fields, self.columns):
            if col not in cols:
                raise BadInput(f"init: {what} {step.name} has no column {col!r} for {field} "
                               f"(map other names with map_store.columns)")
            _num, typ, notnull = cols[col]
            base = typ.split("(", 1)[0]
            ok = ("bigint", "integer") if field == "version" else ("text", "character varying")
            if base not in ok:
                raise BadInput(f"init: {what} {step.name}: column {col} is {typ}, expected {' or '.join(ok)}")
            if field != "key" and not notnull:
                raise BadInput(f"init: {what} {step.name}: column {col} allows NULL, expected NOT NULL")
        unique = conn.execute("SELECT 1 FROM pg_index WHERE indrelid = %s AND indisunique AND indnatts = 1 "
                              "AND indkey[0] = %s AND indpred IS NULL AND indexprs IS NULL AND indisvalid",
                              (oid, cols[self.columns.key][0])).fetchone()
        if unique is None:
            raise BadInput(f"init: {what} {step.name}: column {self.columns.key} is not unique on its own "
                           "(expected a primary key or unique index on it)")
        return True

    def _schema_exists(self, conn: psycopg.Connection) -> bool:
        return conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (self.schema,)).fetchone() is not None

    @staticmethod
    def _oid(conn: psycopg.Connection, table: sql.Identifier) -> int | None:
        return conn.execute("SELECT to_regclass(%s)::oid", (table.as_string(conn),)).fetchone()[0]

    @staticmethod
    def _columns_of(conn: psycopg.Connection, oid: int) -> dict[str, tuple[int, str, bool]]:
        """name -> (attnum, format_type, NOT NULL) of a relation's live columns."""
        rows = conn.execute("SELECT attname, attnum, format_type(atttypid, atttypmod), attnotnull FROM pg_attribute "
                            "WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
                            (oid,)).fetchall()
        return {r[0]: (int(r[1]), r[2], bool(r[3])) for r in rows}

    # ---------------------------------------------------------------- reads

    def snapshot(self, segment_size: int = 20000, cutoff: int | None = None) -> PostgresMapSnapshot:
        """Open a point-in-time export (at ``cutoff``, default the current version);
        see :class:`PostgresMapSnapshot`."""
        return PostgresMapSnapshot(self, segment_size, cutoff)

    def lookup(self, keys: Sequence[bytes]) -> dict[bytes, tuple[str, int]]:
        """Current ``(shard_id, version)`` of those keys that exist (one read transaction)."""
        if not keys:
            return {}
        texts = text_forms(keys, self.key_type)
        by_text = dict(zip(texts, keys))
        uniq = list(by_text)
        out: dict[bytes, tuple[str, int]] = {}
        q = sql.SQL("SELECT {k}, {s}, {v} FROM {t} WHERE {k} = ANY(%s::text[])").format(**self._q)
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
        return self._scalar(sql.SQL("SELECT max({v}) FROM {t}").format(**self._q), (), "map max version")

    def count_above(self, version: int) -> int:
        """Rows whose version is above ``version`` (uses the version index)."""
        return self._scalar(sql.SQL("SELECT count(*) FROM {t} WHERE {v} > %s").format(**self._q),
                            (int(version),), "map count")

    def count(self) -> int:
        return self._scalar(sql.SQL("SELECT count(*) FROM {}").format(self._table), (), "map count")

    # --------------------------------------------------------------- writes

    def _lock_and_next_version(self, conn: psycopg.Connection) -> int:
        """Serialize map writers, then the next change number (commit order == version order)."""
        conn.execute(sql.SQL("LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE").format(self._table))
        return int(conn.execute(sql.SQL("SELECT coalesce(max({v}), 0) + 1 FROM {t}")
                                .format(**self._q)).fetchone()[0])

    def put_many(self, rows: Iterable[tuple[bytes, str]], *, chunk_size: int = _WRITE_CHUNK) -> int:
        """Upsert ``(key, shard_id)`` rows (demo and tests).

        One write transaction per chunk, stamped with one new change number.
        Returns the rows written.
        """
        q = sql.SQL("INSERT INTO {t} ({k}, {s}, {v}) SELECT u.k, u.s, %s FROM unnest(%s::text[], %s::text[]) "
                    "AS u(k, s) ON CONFLICT ({k}) DO UPDATE SET {s} = EXCLUDED.{s}, "
                    "{v} = EXCLUDED.{v}").format(**self._q)
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
        the map table) is created here if absent.  The one claim rule,
        :func:`pipeline.stores.claims.decide_claim`, decided with the table
        locked: a live plan whose window overlaps this one refuses it
        (``Refused``); an older epoch of the same plan is refused
        (``LeaseLost``), a newer one supersedes the claim.  The epoch is the fencing token that
        :meth:`swap_batch` checks inside its transaction.
        """
        runs = self._runs_table()
        try:
            with self._pool().borrow() as conn:
                conn.execute(next(st for st in map_ddl(self.table, self.columns) if st.kind == "registry").statement)
                with _txn(conn):
                    conn.execute(sql.SQL("LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE").format(runs))
                    rows = conn.execute(sql.SQL("SELECT plan_id, epoch, window_lo, window_hi, holder, expires_at "
                                                "FROM {}").format(runs)).fetchall()
                    raise_for(decide_claim(plan_id, epoch, window, now, [ClaimRow(*r) for r in rows]), plan_id)
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

        sel = sql.SQL("SELECT {k}, {s} FROM {t} WHERE {k} = ANY(%s::text[])").format(**self._q)
        upd = sql.SQL("UPDATE {t} AS m SET {s} = u.tgt, {v} = %s "
                      "FROM unnest(%s::text[], %s::text[], %s::text[]) AS u(k, src, tgt) "
                      "WHERE m.{k} = u.k AND m.{s} = u.src").format(**self._q)
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
                        version = int(conn.execute(sql.SQL("SELECT coalesce(max({v}), 0) + 1 FROM {t}")
                                                   .format(**self._q)).fetchone()[0])
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
