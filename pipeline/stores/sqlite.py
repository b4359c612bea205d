"""Embedded SQLite map and data stores (CONTRACTS "Embedded SQLite stores").

Never imports Beam.  Keys arrive as canonical bytes and are stored as their
text form (``keys.text_form`` of the keyspace's key type).

Map store file::

    shard_map(key TEXT PRIMARY KEY, shard_id TEXT NOT NULL, version INTEGER NOT NULL)
    + index shard_map_version(version)

``version`` is a keyspace-wide change number: every transaction that writes
rows (a ``put_many`` chunk, a swap batch) stamps them with ``max(version) + 1``
taken inside that write transaction.

Data store: one file per shard, ``<directory>/<names.safe_name(shard)>.sqlite``::

    records(key TEXT PRIMARY KEY, value BLOB NOT NULL, version INTEGER NOT NULL)

A record's version should grow with every write of that key wherever it
lives (README, "The writer contract"): ``copy`` carries the source version to
the target, and ``put_many`` stamps ``max(version in the file) + 1`` (a
Lamport clock per file), so a write made on the target after a copy always
outranks the copied record.  The write fence does not rely on applications
doing the same: besides the version, the fenced swap compares the source
record's bytes with its copy on the target (and ``write_fence`` yields content
hashes for the executor's re-check), so a rewrite that kept the version is
re-copied, never swapped stale.

Concurrency: WAL journal (set when this module creates a file; existing files
keep their mode), a busy timeout on every connection, and a process-wide
``threading.Lock`` per file path around every write transaction, so that
threads of one process queue for a file instead of fighting over SQLite's
write lock (FIELD-NOTES: concurrent writers to one SQLite file only produce
lock errors).  "database is locked / busy" becomes
:class:`~pipeline.errors.TransientError`; other SQLite failures become
:class:`~pipeline.errors.PermanentError` with a short ``reason``.  Neither
ever carries a key value.

Files created here are owner-only (0600; new directories 0700): they hold key
values.
"""
from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import urllib.parse
from typing import Iterable, Iterator, Sequence

import pyarrow as pa
import xxhash

from pipeline.errors import BadInput, PermanentError, SourceMissing, StoreError, TransientError
from pipeline.keys import KeyType, short_hash_of_key, text_forms
from pipeline.lease import LeaseLost
from pipeline.names import safe_name
from pipeline.stores.base import (
    SNAPSHOT_SCHEMA,
    CopyOutcome,
    CountingSnapshot,
    SnapshotStats,
    SwapItem,
    SwapResult,
    swap_item,
)
from pipeline.stores.claims import ClaimRow, decide_claim, raise_for

__all__ = [
    "SqliteMapStore",
    "SqliteMapSnapshot",
    "SqliteDataStore",
    "map_ddl",
    "DEFAULT_BUSY_TIMEOUT",
]

#: Seconds a connection waits for another writer before "database is locked".
DEFAULT_BUSY_TIMEOUT = 5.0

_IN_CHUNK = 500  # bound variables per ``IN (...)`` query
_WRITE_CHUNK = 10_000  # rows per put_many transaction

_MAP_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS shard_map("
    "key TEXT PRIMARY KEY, shard_id TEXT NOT NULL, version INTEGER NOT NULL)",
    "CREATE INDEX IF NOT EXISTS shard_map_version ON shard_map(version)",
)


def map_ddl() -> tuple[str, ...]:
    """The map file's DDL (CONTRACTS' ``shard_map`` and its version index), each ``IF NOT EXISTS``."""
    return _MAP_SCHEMA


_RECORDS_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS records("
    "key TEXT PRIMARY KEY, value BLOB NOT NULL, version INTEGER NOT NULL)",
)

# SQLite primary result codes that mean "someone else holds the lock, try again".
_TRANSIENT_CODES = {5, 6, 15}  # SQLITE_BUSY, SQLITE_LOCKED, SQLITE_PROTOCOL
_CANTOPEN = 14
_NOTADB = 26


# --------------------------------------------------------------------- errors


def _is_transient(e: sqlite3.Error) -> bool:
    code = getattr(e, "sqlite_errorcode", None)
    if code is not None:
        return (code & 0xFF) in _TRANSIENT_CODES
    msg = str(e).lower()
    return "locked" in msg or "busy" in msg


def _store_error(e: sqlite3.Error, what: str) -> StoreError:
    """Classify a SQLite error; the message names the operation, never a key."""
    name = getattr(e, "sqlite_errorname", type(e).__name__)
    if _is_transient(e):
        return TransientError(f"{what}: {e} ({name})", reason="busy")
    code = getattr(e, "sqlite_errorcode", None)
    if code is not None and (code & 0xFF) == _CANTOPEN:
        return PermanentError(f"{what}: cannot open the database file ({name})", reason="cannot_open")
    if code is not None and (code & 0xFF) == _NOTADB:
        return PermanentError(f"{what}: the file is not a SQLite database ({name})", reason="not_a_database")
    if "no such table" in str(e) or "no such column" in str(e):
        return PermanentError(f"{what}: schema mismatch: {e}", reason="schema")
    return PermanentError(f"{what}: {e} ({name})", reason="store_error")


# ----------------------------------------------------------- per-file locks
#
# Process-wide by design: the lock guards a file on this machine, whichever
# store object (or DoFn instance) writes it.  Holds no data.

_FILE_LOCKS: dict[str, threading.Lock] = {}
_FILE_LOCKS_GUARD = threading.Lock()


def _file_lock(path: str) -> threading.Lock:
    real = os.path.realpath(path)
    with _FILE_LOCKS_GUARD:
        lock = _FILE_LOCKS.get(real)
        if lock is None:
            lock = _FILE_LOCKS[real] = threading.Lock()
        return lock


@contextlib.contextmanager
def _locked(paths: Iterable[str], timeout: float, what: str):
    """Hold the process-wide locks of ``paths`` (in the given order)."""
    held = []
    try:
        for p in paths:
            lock = _file_lock(p)
            if not lock.acquire(timeout=max(timeout, 0.001)):
                raise TransientError(f"{what}: file busy in this process", reason="busy")
            held.append(lock)
        yield
    finally:
        for lock in reversed(held):
            lock.release()


# --------------------------------------------------------------- connections


def _first(row: tuple):
    return row[0]


def _chunks(seq: Sequence, size: int = _IN_CHUNK) -> Iterator[Sequence]:
    for i in range(0, len(seq), size):
        yield seq[i:i + size]


_IN_SQL_CACHE: dict[tuple[str, int], str] = {}


def _in_sql(template: str, n: int) -> str:
    """``template`` with ``{in}`` replaced by ``?,?,...`` (n marks)."""
    sql = _IN_SQL_CACHE.get((template, n))
    if sql is None:
        sql = template.replace("{in}", ",".join("?" * n))
        if len(_IN_SQL_CACHE) < 4096:
            _IN_SQL_CACHE[(template, n)] = sql
    return sql


def _rows_json(conn: sqlite3.Connection, columns: str, table: str, keys: Sequence[str]) -> Iterator[list]:
    """``[key, *columns]`` of the rows of ``table`` whose key is in ``keys``, read
    as ONE JSON array per ``IN`` chunk (SQLite builds it: ``json_group_array``).

    Why not iterate rows: Python's sqlite3 releases and re-takes the GIL for
    every row it steps, and while another thread runs Python each re-take
    waits for the switch interval, so a 500-row read that takes 1 ms alone
    took ~500 ms beside one busy thread (measured; JSON: 11 ms).  The keys
    are bound parameters (exact match, any text); JSON carries any valid
    text (NUL and control characters are escaped).  Not for BLOB columns."""
    for chunk in _chunks(keys):
        sql = _in_sql(f"SELECT json_group_array(json_array(key, {columns})) FROM {table} "
                      "WHERE key IN ({in})", len(chunk))
        yield from json.loads(conn.execute(sql, chunk).fetchone()[0])


def _limit(conn: sqlite3.Connection, name: str, default: int) -> int:
    """A run-time limit of ``conn`` (``Connection.getlimit``, Python >= 3.11), else SQLite's default."""
    getlimit = getattr(conn, "getlimit", None)
    code = getattr(sqlite3, name, None)
    if getlimit is None or code is None:
        return default
    return int(getlimit(code))


_UPSERT_SQL: dict[int, str] = {}


def _upsert_sql(n: int) -> str:
    """Upsert of n (key, value, version) rows that never replaces a newer version."""
    sql = _UPSERT_SQL.get(n)
    if sql is None:
        sql = ("INSERT INTO records(key, value, version) VALUES " + ",".join(["(?, ?, ?)"] * n)
               + " ON CONFLICT(key) DO UPDATE SET value = excluded.value, version = excluded.version "
               "WHERE records.version <= excluded.version")
        if len(_UPSERT_SQL) < 1024:
            _UPSERT_SQL[n] = sql
    return sql


def _uri(path: str, *, readonly: bool = False) -> str:
    """A ``file:`` URI that opens an existing file read-write (or read-only) and never creates one."""
    return "file:" + urllib.parse.quote(os.path.abspath(path)) + ("?mode=ro" if readonly else "?mode=rw")


def _create_file(path: str) -> bool:
    """Create an empty owner-only (0600) file, and its directory (0700) if absent."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        os.makedirs(directory, mode=0o700, exist_ok=True)
        os.chmod(directory, 0o700)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        return False
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    return True


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass


class _SqliteBase:
    """Thread-local connections (one per thread and file), closed by ``close()``."""

    #: Per-connection tuning.  A WAL checkpoint every 10000 pages (~40 MB)
    #: instead of SQLite's 1000: a 500-key batch of random keys dirties
    #: ~1000 pages, so the default checkpoints after nearly every batch
    #: (measured: swap and copy ~40% faster).
    _PRAGMAS: tuple[str, ...] = ("PRAGMA wal_autocheckpoint=10000",)
    #: What error messages call this store.
    _WHAT = "store"

    def __init__(self, key_type: KeyType, busy_timeout: float, synchronous: str):
        self.key_type = KeyType(key_type)
        if busy_timeout < 0:
            raise ValueError(f"busy_timeout must be >= 0 seconds, got {busy_timeout!r}")
        if str(synchronous).upper() not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise ValueError(f"synchronous must be OFF, NORMAL, FULL or EXTRA, got {synchronous!r}")
        self.busy_timeout = float(busy_timeout)
        self.synchronous = str(synchronous).upper()
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._all_guard = threading.Lock()

    # Picklable as configuration only; connections are reopened lazily.
    def _config(self) -> dict:
        raise NotImplementedError

    def __getstate__(self) -> dict:
        return self._config()

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def _open(self, path: str, *, text_factory=None) -> sqlite3.Connection:
        """A configured connection; a file that cannot be opened or is not a
        SQLite database raises a PermanentError naming the file."""
        try:
            conn = sqlite3.connect(
                _uri(path), uri=True, timeout=self.busy_timeout, isolation_level=None,
                check_same_thread=False, cached_statements=256,
            )
        except sqlite3.Error as e:
            raise _store_error(e, f"{self._WHAT} {path}") from None
        try:
            if text_factory is not None:
                conn.text_factory = text_factory
            conn.execute(f"PRAGMA synchronous={self.synchronous}")
            for pragma in self._PRAGMAS:
                conn.execute(pragma)
            # reading the schema is what tells a database from any other file
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.Error as e:
            conn.close()
            raise _store_error(e, f"{self._WHAT} {path}") from None
        return conn

    def _conn(self, path: str) -> sqlite3.Connection:
        conns = getattr(self._local, "conns", None)
        if conns is None:
            conns = self._local.conns = {}
        conn = conns.get(path)
        if conn is None:
            conn = self._open(path)
            conns[path] = conn
            with self._all_guard:
                self._all.append(conn)
        return conn

    def _init_file(self, path: str, schema: Sequence[str], what: str) -> None:
        """Create ``path`` (0600, WAL) if absent and ensure its schema."""
        created = _create_file(path)
        conn = self._conn(path)
        try:
            if created:
                conn.execute("PRAGMA journal_mode=WAL")
            for stmt in schema:
                conn.execute(stmt)
        except sqlite3.Error as e:
            raise _store_error(e, what) from e

    def close(self) -> None:
        """Close every connection this store opened (in any thread)."""
        with self._all_guard:
            conns, self._all = self._all, []
        for c in conns:
            try:
                c.close()
            except sqlite3.Error:
                pass
        self._local = threading.local()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------------ map store


class SqliteMapSnapshot(CountingSnapshot):
    """A point-in-time export of a SQLite shard map (see :class:`base.MapSnapshot`).

    Opening it starts ONE read transaction and reads the cutoff (the highest
    change number).  Iterating streams the rows with ``version <= cutoff``
    from a single cursor (``fetchmany``: memory bounded by ``segment_size``) as
    RecordBatches of :data:`SNAPSHOT_SCHEMA`.  Rows whose key is not a
    canonical text form of the key type -- or whose key, shard id or version
    has the wrong SQLite type -- are counted in ``invalid_keys`` and skipped.

    When the iteration ends the read transaction is closed and the rows above
    the cutoff are counted (rows written or swapped while the export ran).
    Inside the read transaction that count is always 0 -- SQLite readers see a
    fixed snapshot -- so it is taken just after it.
    """

    _SELECT = (
        "SELECT key, shard_id, version FROM shard_map WHERE version <= ? "
        "AND typeof(key) = 'text' AND typeof(shard_id) = 'text' AND typeof(version) = 'integer'"
    )
    _BAD_TYPED = (
        "SELECT count(*) FROM shard_map WHERE NOT "
        "(typeof(key) = 'text' AND typeof(shard_id) = 'text' AND typeof(version) = 'integer')"
    )

    def __init__(self, store: "SqliteMapStore", segment_size: int):
        if isinstance(segment_size, bool) or not isinstance(segment_size, int) or segment_size < 1:
            raise ValueError(f"segment_size must be a positive integer, got {segment_size!r}")
        self.segment_size = segment_size
        self.key_type = store.key_type
        self._path = store.path
        store._require_file()
        self._conn = store._open(store.path, text_factory=bytes)
        self._rows = 0
        self._invalid = 0
        self._above: int | None = None
        self._started = False
        try:
            self._conn.execute("BEGIN")
            top = self._conn.execute("SELECT max(version) FROM shard_map").fetchone()[0]
            if top is not None and not isinstance(top, int):
                raise PermanentError("map snapshot: a version is not an integer", reason="schema")
            self.cutoff = int(top or 0)
            self._invalid = int(self._conn.execute(self._BAD_TYPED).fetchone()[0])
        except sqlite3.Error as e:
            self._conn.close()
            raise _store_error(e, f"map store {self._path}: snapshot") from e
        except BaseException:
            self._conn.close()
            raise

    def _batches(self) -> Iterator[pa.RecordBatch]:
        try:
            cur = self._conn.execute(self._SELECT, (self.cutoff,))
            while True:
                rows = cur.fetchmany(self.segment_size)
                if not rows:
                    break
                batch = self._to_batch(rows)
                if batch.num_rows:
                    yield batch
            self._conn.execute("COMMIT")
            self._above = int(self._conn.execute(
                "SELECT count(*) FROM shard_map WHERE version > ?", (self.cutoff,)).fetchone()[0])
        except sqlite3.Error as e:
            raise _store_error(e, f"map store {self._path}: snapshot") from e
        finally:
            self.close()

    def _to_batch(self, rows: list) -> pa.RecordBatch:
        return self._columns_to_batch(*zip(*rows))

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            _rollback(conn)
            conn.close()


class SqliteMapStore(_SqliteBase):
    """The shard map in one SQLite file (see the module docstring).

    Thread-safe: each thread uses its own connection; writes of one process
    queue on a per-file lock.  Picklable (configuration only).
    """

    # The map is hot (every swap batch reads and writes random pages of it):
    # a 64 MiB page cache per connection; few connections exist.
    _PRAGMAS = _SqliteBase._PRAGMAS + ("PRAGMA cache_size=-65536",)
    _WHAT = "map store"

    #: count() and count_above() are index scans: the executor's drift check may use them
    cheap_counts = True

    def __init__(self, path: str, key_type: KeyType = KeyType.STRING, *,
                 busy_timeout: float = DEFAULT_BUSY_TIMEOUT, synchronous: str = "FULL"):
        super().__init__(key_type, busy_timeout, synchronous)
        self.path = os.fspath(path)

    def _config(self) -> dict:
        return dict(path=self.path, key_type=self.key_type, busy_timeout=self.busy_timeout,
                    synchronous=self.synchronous)

    def __repr__(self) -> str:
        return f"SqliteMapStore({self.path!r}, {self.key_type.value!r})"

    # --------------------------------------------------------------- set-up

    @classmethod
    def create(cls, path: str, key_type: KeyType = KeyType.STRING, **kwargs) -> "SqliteMapStore":
        """Create the map file (0600, WAL) if absent, with its schema; return the store."""
        store = cls(path, key_type, **kwargs)
        store.ensure_schema()
        return store

    def ensure_schema(self) -> None:
        """Create the file (if absent), the ``shard_map`` table and its version index."""
        with _locked([self.path], self.busy_timeout, "map schema"):
            self._init_file(self.path, _MAP_SCHEMA, "map schema")

    def initialize(self) -> list[tuple[str, str]]:
        """Create what is missing of the map (``shardmove init``); check what exists.

        The file (0600, WAL), ``shard_map`` and its version index, by the same
        statements as :meth:`ensure_schema`.  An existing ``shard_map`` must
        have the CONTRACTS shape (``key TEXT PRIMARY KEY``, ``shard_id TEXT NOT
        NULL``, ``version INTEGER NOT NULL``); otherwise BadInput and nothing is
        created.  Any plain index whose first column is ``version`` stands for
        the version index.  Never drops or alters anything.  Returns
        ``(status, "kind name")`` pairs, status ``created`` or ``exists``.
        """
        what = f"map store {self.path}: init"
        with _locked([self.path], self.busy_timeout, what):
            have_file = os.path.exists(self.path)
            have_table, index = False, None
            if have_file:
                try:
                    have_table, index = self._map_shape(self._conn(self.path))
                except sqlite3.Error as e:
                    raise _store_error(e, what) from e
            todo = [stmt for stmt, have in zip(_MAP_SCHEMA, (have_table, index)) if not have]
            if todo:
                self._init_file(self.path, todo, what)
        return [("exists" if have_file else "created", f"file {self.path}"),
                ("exists" if have_table else "created", "table shard_map"),
                ("exists" if index else "created", f"index {index or 'shard_map_version'}")]

    @staticmethod
    def _map_shape(conn: sqlite3.Connection) -> tuple[bool, str | None]:
        """(shard_map exists, the name of an index on its version column); BadInput
        when ``shard_map`` exists with another shape than CONTRACTS'."""
        row = conn.execute("SELECT type FROM sqlite_master WHERE name = 'shard_map'").fetchone()
        if row is None:
            return False, None
        if row[0] != "table":
            raise BadInput(f"init: shard_map exists but is a {row[0]}, not a table")
        cols = {r[1]: (str(r[2]).upper(), bool(r[3]), int(r[5]))
                for r in conn.execute("SELECT cid, name, type, \"notnull\", dflt_value, pk "
                                      "FROM pragma_table_info('shard_map')")}
        want = {"key": ("TEXT", False, 1), "shard_id": ("TEXT", True, 0), "version": ("INTEGER", True, 0)}
        for name, (typ, notnull, pk) in want.items():
            if name not in cols:
                raise BadInput(f"init: shard_map has no column {name} (expected the CONTRACTS schema "
                               "key TEXT PRIMARY KEY, shard_id TEXT NOT NULL, version INTEGER NOT NULL)")
            got_typ, got_notnull, got_pk = cols[name]
            if got_typ != typ or (notnull and not got_notnull) or bool(got_pk) != bool(pk):
                raise BadInput(f"init: shard_map column {name} is {got_typ or 'untyped'}"
                               f"{' NOT NULL' if got_notnull else ''}{' PRIMARY KEY' if got_pk else ''}, expected "
                               f"{typ}{' NOT NULL' if notnull else ''}{' PRIMARY KEY' if pk else ''}")
        if sum(1 for c in cols.values() if c[2]) != 1:
            raise BadInput("init: shard_map's primary key is not key alone")
        idx = conn.execute("SELECT il.name FROM pragma_index_list('shard_map') AS il WHERE il.partial = 0 AND "
                           "(SELECT ii.name FROM pragma_index_info(il.name) AS ii WHERE ii.seqno = 0) = 'version' "
                           "ORDER BY il.name != 'shard_map_version', il.name LIMIT 1").fetchone()
        return True, (idx[0] if idx else None)

    def _require_file(self) -> None:
        if not os.path.exists(self.path):
            raise PermanentError(f"map store file not found: {self.path}", reason="map_missing")

    def _map_conn(self) -> sqlite3.Connection:
        self._require_file()
        return self._conn(self.path)

    # ---------------------------------------------------------------- reads

    def snapshot(self, segment_size: int = 20000) -> SqliteMapSnapshot:
        """Open a point-in-time export; see :class:`SqliteMapSnapshot`."""
        return SqliteMapSnapshot(self, segment_size)

    def lookup(self, keys: Sequence[bytes]) -> dict[bytes, tuple[str, int]]:
        """Current ``(shard_id, version)`` of those keys that exist (one read transaction)."""
        if not keys:
            return {}
        texts = text_forms(keys, self.key_type)
        by_text = dict(zip(texts, keys))
        uniq = list(by_text)
        conn = self._map_conn()
        out: dict[bytes, tuple[str, int]] = {}
        try:
            conn.execute("BEGIN")
            for k, s, v in _rows_json(conn, "shard_id, version", "shard_map", uniq):
                out[by_text[k]] = (s, int(v))
            conn.execute("COMMIT")
        except sqlite3.Error as e:
            _rollback(conn)
            raise _store_error(e, f"map store {self.path}: lookup") from e
        return out

    def max_version(self) -> int:
        conn = self._map_conn()
        try:
            return int(conn.execute("SELECT max(version) FROM shard_map").fetchone()[0] or 0)
        except sqlite3.Error as e:
            raise _store_error(e, f"map store {self.path}: max version") from e

    def count_above(self, version: int) -> int:
        """Rows whose version is above ``version`` (uses the version index)."""
        conn = self._map_conn()
        try:
            return int(conn.execute("SELECT count(*) FROM shard_map WHERE version > ?",
                                    (int(version),)).fetchone()[0])
        except sqlite3.Error as e:
            raise _store_error(e, f"map store {self.path}: count") from e

    def count(self) -> int:
        conn = self._map_conn()
        try:
            return int(conn.execute("SELECT count(*) FROM shard_map").fetchone()[0])
        except sqlite3.Error as e:
            raise _store_error(e, f"map store {self.path}: count") from e

    # --------------------------------------------------------------- writes

    def put_many(self, rows: Iterable[tuple[bytes, str]], *, chunk_size: int = _WRITE_CHUNK) -> int:
        """Upsert ``(key, shard_id)`` rows (demo and tests).

        One write transaction per chunk; each chunk's rows are stamped with a
        new change number ``max(version) + 1``.  Returns the rows written.
        """
        conn = self._map_conn()
        total = 0
        buf: list[tuple[bytes, str]] = []

        def flush():
            nonlocal total
            texts = text_forms([k for k, _ in buf], self.key_type)
            with _locked([self.path], self.busy_timeout, "map put"):
                try:
                    conn.execute("BEGIN IMMEDIATE")
                    v = int(conn.execute("SELECT coalesce(max(version), 0) + 1 FROM shard_map").fetchone()[0])
                    conn.executemany(
                        "INSERT INTO shard_map(key, shard_id, version) VALUES (?, ?, ?) "
                        "ON CONFLICT(key) DO UPDATE SET shard_id = excluded.shard_id, version = excluded.version",
                        # key order: sequential index inserts (a stable sort keeps the last duplicate last)
                        sorted(((t, s, v) for t, (_, s) in zip(texts, buf)), key=_first),
                    )
                    conn.execute("COMMIT")
                except sqlite3.Error as e:
                    _rollback(conn)
                    raise _store_error(e, f"map store {self.path}: put") from e
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
        """A fenced swap needs the source shards in SQLite files (:class:`SqliteDataStore`)."""
        return isinstance(data_store, SqliteDataStore)

    # ------------------------------------------------ run registry (fencing)
    _RUNS_DDL = ("CREATE TABLE IF NOT EXISTS shardmove_runs(plan_id TEXT PRIMARY KEY, epoch INTEGER NOT NULL, "
                 "window_lo INTEGER NOT NULL, window_hi INTEGER NOT NULL, holder TEXT NOT NULL, "
                 "expires_at REAL NOT NULL)")

    def claim_run(self, plan_id: str, epoch: int, window: tuple[int, int], holder: str, ttl: float,
                  now: float) -> None:
        """Register this executor (plan, epoch) on the map store, atomically.

        The one claim rule, :func:`pipeline.stores.claims.decide_claim`, decided
        inside the write transaction: an overlapping live plan is refused
        (``Refused``), two plans whose key sets may overlap never run at once on
        one map; a newer epoch of the same plan supersedes an older one, an
        older epoch is refused (``LeaseLost``).  The epoch is then the fencing
        token that :meth:`swap_batch` checks inside its transaction.
        """
        conn = self._open(self.path)
        try:
            with _locked([self.path], self.busy_timeout, "run claim"):
                conn.execute(self._RUNS_DDL)
                conn.execute("BEGIN IMMEDIATE")
                try:
                    rows = conn.execute("SELECT plan_id, epoch, window_lo, window_hi, holder, expires_at "
                                        "FROM shardmove_runs").fetchall()
                    raise_for(decide_claim(plan_id, epoch, window, now, [ClaimRow(*r) for r in rows]), plan_id)
                    conn.execute("INSERT OR REPLACE INTO shardmove_runs VALUES (?, ?, ?, ?, ?, ?)",
                                 (plan_id, int(epoch), int(window[0]), int(window[1]), holder, now + ttl))
                    conn.execute("COMMIT")
                except BaseException:
                    _rollback(conn)
                    raise
        except sqlite3.Error as e:
            raise _store_error(e, f"map store {self.path}: run claim") from e
        finally:
            conn.close()

    def renew_run(self, plan_id: str, epoch: int, ttl: float, now: float) -> None:
        conn = self._map_conn()
        try:
            cur = conn.execute("UPDATE shardmove_runs SET expires_at = ? WHERE plan_id = ? AND epoch = ?",
                               (now + ttl, plan_id, int(epoch)))
            conn.commit()
        except sqlite3.Error as e:
            _rollback(conn)
            raise _store_error(e, f"map store {self.path}: run renew") from e
        if cur.rowcount != 1:
            raise LeaseLost(f"plan {plan_id[:12]}: this executor's claim on the map store was taken over")

    def release_run(self, plan_id: str, epoch: int) -> None:
        conn = self._map_conn()
        try:
            conn.execute("UPDATE shardmove_runs SET expires_at = 0 WHERE plan_id = ? AND epoch = ?",
                         (plan_id, int(epoch)))
            conn.commit()
        except sqlite3.Error as e:
            _rollback(conn)
            raise _store_error(e, f"map store {self.path}: run release") from e

    def swap_batch(self, items: Sequence[SwapItem | tuple], *,
                   fence: "SqliteDataStore | None" = None,
                   token: "tuple[str, int] | None" = None) -> SwapResult:
        """Move a batch of keys to their targets: compare-and-set, all or nothing.

        ONE write transaction (``BEGIN IMMEDIATE``).  For each item
        ``(key, expected_source, target[, source_version])``:

        * key at ``target``: counted in ``already``; its row is not written
          again (so a rerun of a committed batch writes nothing);
        * key at ``expected_source``: set to ``target`` and stamped with the
          batch's new change number ``max(version) + 1`` (``applied``);
        * otherwise (another shard, or absent): ``conflicts``.

        With ``fence`` (the :class:`SqliteDataStore` holding the source
        shards), each source shard file is ATTACHed and locked by the same
        transaction (each target shard file ATTACHed read-only), and every
        key to apply must still have a source record whose version equals
        ``source_version`` and whose bytes equal its record's on the target
        (a rewrite that kept the version); the others are
        ``source_changed``.  While the transaction runs, writers to those
        source shards wait: the swap is a short write fence.

        With ``token`` = (plan id, epoch), the transaction first checks the
        run registry (:meth:`claim_run`): an executor whose claim was taken
        over raises ``LeaseLost`` and applies nothing.

        Any conflict or changed source rolls the whole batch back and applies
        nothing.  Idempotent: compare-and-set on the expected source.
        Raises TransientError when the map (or a fenced shard) stays locked
        beyond the busy timeout.  The same key twice in one batch with
        different moves is a conflict.
        """
        res = self._swap_batch(items, fence=fence, token=token, fast_path=True)
        if res is None:  # not every key was at its source: decide key by key
            res = self._swap_batch(items, fence=fence, token=token, fast_path=False)
        return res

    def _swap_batch(self, items, *, fence, token, fast_path: bool) -> "SwapResult | None":
        norm = [swap_item(it) for it in items]
        if not norm:
            return SwapResult()
        if fence is not None:
            if not self.supports_fence(fence):
                raise TypeError("swap_batch: fence must be a SqliteDataStore")
            # an item without source_version can only be confirmed "already" at its
            # target; were it to be applied, it counts as source_changed (re-copy first)
        texts = text_forms([it.key for it in norm], self.key_type)

        # One decision per distinct key; an inconsistent duplicate is a conflict.
        first: dict[str, int] = {}
        dup_conflict: set[str] = set()
        for i, (t, it) in enumerate(zip(texts, norm)):
            j = first.setdefault(t, i)
            if j != i and norm[j] != it:
                dup_conflict.add(t)

        conn = self._map_conn()
        attached: dict[str, str] = {}  # source shard -> schema name
        targets: dict[str, str | None] = {}  # target shard -> schema name (None: no file)
        lock_paths = [self.path]
        if fence is not None:
            sources = sorted({it.source for it in norm})
            # targets are attached read-only: BEGIN IMMEDIATE takes no write lock on them,
            # so copies to them go on during the swap
            readonly = sorted({it.target for it in norm} - set(sources))
            readonly = [s for s in readonly if os.path.exists(fence.shard_path(s))]
            limit = _limit(conn, "SQLITE_LIMIT_ATTACHED", 10)
            if len(sources) + len(readonly) > limit:
                raise ValueError(f"swap_batch: a fenced batch spans {len(sources)} source and {len(readonly)} "
                                 f"target shards; at most {limit} can be attached")
            for n, s in enumerate(sources):
                path = fence.shard_path(s)
                if not os.path.exists(path):
                    raise PermanentError(f"fenced swap: source shard file not found ({safe_name(s)})",
                                         reason="shard_missing")
                attached[s] = f"fence{n}"
            targets = {it.target: attached.get(it.target) for it in norm}
            for n, s in enumerate(readonly):
                targets[s] = f"copy{n}"
            lock_paths += sorted(fence.shard_path(s) for s in sources)
            conn = self._fenced_conn(tuple(fence.shard_path(s) for s in sources),
                                     tuple(fence.shard_path(s) for s in readonly))

        with _locked(lock_paths, self.busy_timeout, "map swap"):
            try:
                conn.execute("BEGIN IMMEDIATE")
                if token is not None:
                    row = conn.execute("SELECT epoch FROM shardmove_runs WHERE plan_id = ?",
                                       (token[0],)).fetchone()
                    if row is None or row[0] != token[1]:
                        conn.execute("ROLLBACK")

                        raise LeaseLost(f"plan {token[0][:12]}: epoch {token[1]} no longer holds the map store "
                                        f"(now {row[0] if row else 'none'}); nothing applied")
                uniq = list(first)
                if not dup_conflict and fast_path:
                    # Fast path (a first run: every key still at its source): fence check and
                    # compare-and-set straight away; if every row was written, that is the answer.
                    try:
                        fast = self._swap_all_applied(conn, norm, first, uniq, attached, targets)
                    except _NotAllApplied:
                        conn.execute("ROLLBACK")
                        return None  # swap_batch decides key by key in a new transaction
                    if fast is not None:
                        conn.execute("COMMIT")
                        return SwapResult(applied=tuple(range(len(texts))), already=(), version=fast)
                current: dict[str, str] = dict(_rows_json(conn, "shard_id", "shard_map", uniq))

                applied_keys: list[str] = []
                status: dict[str, str] = {}
                for t, i in first.items():
                    it = norm[i]
                    cur = current.get(t)
                    if t in dup_conflict:
                        status[t] = "conflict"
                    elif cur is not None and cur == it.target:
                        status[t] = "already"
                    elif cur is not None and cur == it.source:
                        status[t] = "apply"
                        applied_keys.append(t)
                    else:
                        status[t] = "conflict"

                if attached:
                    for t in _sources_changed(conn, norm, first, applied_keys, attached, targets):
                        status[t] = "source_changed"

                by_status: dict[str, list[int]] = {"apply": [], "already": [], "conflict": [], "source_changed": []}
                for i, t in enumerate(texts):
                    by_status[status[t]].append(i)
                if by_status["conflict"] or by_status["source_changed"]:
                    conn.execute("ROLLBACK")
                    return SwapResult(applied=(), already=tuple(by_status["already"]),
                                      conflicts=tuple(by_status["conflict"]),
                                      source_changed=tuple(by_status["source_changed"]))
                version = None
                if applied_keys:
                    version = int(conn.execute(
                        "SELECT coalesce(max(version), 0) + 1 FROM shard_map").fetchone()[0])
                    if _cas_update(conn, norm, first, applied_keys, version) != len(applied_keys):
                        conn.execute("ROLLBACK")
                        raise PermanentError("map swap: compare-and-set wrote an unexpected number of rows",
                                             reason="swap_inconsistent")
                conn.execute("COMMIT")
                return SwapResult(applied=tuple(by_status["apply"]), already=tuple(by_status["already"]),
                                  version=version)
            except sqlite3.Error as e:
                _rollback(conn)
                if fence is not None:  # a broken attached connection is not reused
                    self._drop_fenced_conn(tuple(fence.shard_path(s) for s in attached))
                raise _store_error(e, f"map store {self.path}: swap") from e

    def _swap_all_applied(self, conn, norm, first, uniq, attached, targets) -> int | None:
        """Inside the swap transaction: if every key is at its expected source (and,
        fenced, has the source version its copy read), apply them all and return the
        new version.  Returns None (nothing written) when the fence check fails and
        raises _NotAllApplied (rows written: roll back) when the CAS missed a row."""
        if attached and _sources_changed(conn, norm, first, uniq, attached, targets):
            return None
        version = int(conn.execute("SELECT coalesce(max(version), 0) + 1 FROM shard_map").fetchone()[0])
        if _cas_update(conn, norm, first, uniq, version) == len(uniq):
            return version
        raise _NotAllApplied  # the caller rolls back and decides key by key

    def _fenced_conn(self, shard_paths: tuple, readonly_paths: tuple = ()) -> sqlite3.Connection:
        """This thread's fencing connection to the map with exactly these source
        shards ATTACHed (as fence0, fence1, ... in this order), and these target
        shards ATTACHed read-only (as copy0, copy1, ...).

        ONE connection per thread, re-attached when a batch needs other shards:
        every map connection's page cache is invalidated by another connection's
        write, so several fencing connections taking turns would each read the map
        cold (measured: swaps ~25% slower).  Attaching happens outside any
        transaction; ``BEGIN IMMEDIATE`` then takes the write lock of every
        attached file but the read-only ones (SQLite re-prepares cached
        statements after the change)."""
        state = getattr(self._local, "fenced", None)
        if state is None or state[0] is None:
            conn = self._open(self.path)
            with self._all_guard:
                self._all.append(conn)
            state = self._local.fenced = [conn, ((), ())]
        conn, current = state
        wanted = (shard_paths, readonly_paths)
        if current != wanted:
            try:
                for n in range(len(current[0])):
                    conn.execute(f"DETACH DATABASE fence{n}")
                for n in range(len(current[1])):
                    conn.execute(f"DETACH DATABASE copy{n}")
                for n, path in enumerate(shard_paths):
                    conn.execute(f"ATTACH DATABASE ? AS fence{n}", (_uri(path),))
                for n, path in enumerate(readonly_paths):
                    conn.execute(f"ATTACH DATABASE ? AS copy{n}", (_uri(path, readonly=True),))
            except sqlite3.Error as e:  # half attached: never reuse it; the next batch opens anew
                self._drop_fenced_conn(shard_paths)
                raise _store_error(e, f"map store {self.path}: swap (attach shards)") from e
            state[1] = wanted
        return conn

    def _drop_fenced_conn(self, shard_paths: tuple) -> None:
        """Forget this thread's fencing connection (after an error): the next batch opens a new one."""
        state = getattr(self._local, "fenced", None)
        if state is not None and state[0] is not None:
            try:
                state[0].close()
            except sqlite3.Error:
                pass
            self._local.fenced = None


def _sources_changed(conn: sqlite3.Connection, norm, first, keys, attached: dict, targets: dict) -> list[str]:
    """The write fence's check, inside the swap transaction: the ``keys`` whose record
    on their (attached) source shard is gone, no longer has the version the copy read,
    or no longer holds the same bytes as the key's record on its target shard.

    The last condition catches an application that rewrote a record and kept its
    version (the version is the application's to stamp here): the swap then needs
    a fresh copy.  SQLite compares the bytes itself, the target attached read-only
    (``targets``: target shard -> schema, or None when its file is absent); one JSON
    document per chunk comes back (see :func:`_rows_json`)."""
    by_pair: dict[tuple, list[str]] = {}
    for t in keys:
        it = norm[first[t]]
        by_pair.setdefault((it.source, it.target), []).append(t)
    changed = []
    for (source, target), ts in by_pair.items():
        tgt = targets.get(target)
        if tgt is None:  # no target file: nothing was copied there
            changed += [t for t in ts if norm[first[t]].check_content]
            ts = [t for t in ts if not norm[first[t]].check_content]
            if not ts:
                continue
        found: dict[str, tuple] = {}
        checked = [t for t in ts if norm[first[t]].check_content]
        for chunk in _chunks(checked):
            sql = _in_sql("SELECT json_group_array(json_array(s.key, s.version, "
                          "CAST(s.value AS BLOB) IS CAST(t.value AS BLOB))) "
                          f"FROM {attached[source]}.records s LEFT JOIN {tgt}.records t ON t.key = s.key "
                          "WHERE s.key IN ({in})", len(chunk))
            for k, ver, same in json.loads(conn.execute(sql, chunk).fetchone()[0]):
                found[k] = (ver, same)
        if len(checked) < len(ts):  # forced swaps: the version only
            forced = [t for t in ts if not norm[first[t]].check_content]
            for k, ver in _rows_json(conn, "version", f"{attached[source]}.records", forced):
                found[k] = (ver, True)
        for t in ts:
            cur = found.get(t)
            if cur is None or cur[0] != norm[first[t]].source_version or not cur[1]:
                changed.append(t)
    return changed


def _cas_update(conn: sqlite3.Connection, norm, first, keys, version: int) -> int:
    """Compare-and-set ``keys`` to their targets, stamping ``version``; returns the
    rows written.  One step per row (``executemany``): a set-based UPDATE (``key
    IN (...)`` or ``UPDATE ... FROM (VALUES ...)``) measured twice as slow here,
    as SQLite then collects the rows first and seeks each one again."""
    return conn.executemany(
        "UPDATE shard_map SET shard_id = ?, version = ? WHERE key = ? AND shard_id = ?",
        [(norm[first[t]].target, version, t, norm[first[t]].source) for t in sorted(keys)],
    ).rowcount


class _NotAllApplied(Exception):
    """The fast swap path's compare-and-set missed a row (internal)."""


# ----------------------------------------------------------------- data store


class SqliteDataStore(_SqliteBase):
    """Records in one SQLite file per shard (see the module docstring).

    Thread-safe and picklable (configuration only).  Reads of an absent shard
    file see an empty shard; only :meth:`copy` and the write methods create
    files, and only target files -- never a copy's source.
    """

    _WHAT = "data store"

    def __init__(self, directory: str, key_type: KeyType = KeyType.STRING, *,
                 busy_timeout: float = DEFAULT_BUSY_TIMEOUT, synchronous: str = "FULL"):
        super().__init__(key_type, busy_timeout, synchronous)
        self.directory = os.fspath(directory)
        self._ready: set[str] = set()  # target files whose schema this process ensured
        self._ready_guard = threading.Lock()

    def _config(self) -> dict:
        return dict(directory=self.directory, key_type=self.key_type, busy_timeout=self.busy_timeout,
                    synchronous=self.synchronous)

    def __repr__(self) -> str:
        return f"SqliteDataStore({self.directory!r}, {self.key_type.value!r})"

    def shard_path(self, shard: str) -> str:
        """``<directory>/<safe_name(shard)>.sqlite``."""
        return os.path.join(self.directory, safe_name(shard) + ".sqlite")

    def shard_exists(self, shard: str) -> bool:
        """The shard's file exists.  A file that is not a SQLite database, or
        lacks the ``records`` table, raises PermanentError naming it."""
        path = self.shard_path(shard)
        if not os.path.exists(path):
            return False
        conn = self._conn(path)
        try:
            found = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'records'").fetchone()
        except sqlite3.Error as e:
            raise _store_error(e, f"data store {path}") from e
        if found is None:
            raise PermanentError(f"data store {path}: schema mismatch: no table records", reason="schema")
        return True

    def ensure_shard(self, shard: str) -> str:
        """Create the shard file (0600, WAL) and its table if absent; return its path."""
        path = self.shard_path(shard)
        if path not in self._ready:
            with _locked([path], self.busy_timeout, "shard schema"):
                self._init_file(path, _RECORDS_SCHEMA, "shard schema")
            with self._ready_guard:
                self._ready.add(path)
        return path

    # ---------------------------------------------------------------- reads

    def _select(self, keys: Sequence[bytes], shard: str, columns: str, what: str) -> dict[bytes, tuple]:
        """``key -> row`` for the keys present on ``shard`` (one read transaction)."""
        if not keys:
            return {}
        path = self.shard_path(shard)
        if not os.path.exists(path):
            return {}
        texts = text_forms(keys, self.key_type)
        by_text = dict(zip(texts, keys))
        conn = self._conn(path)
        out: dict[bytes, tuple] = {}
        try:
            conn.execute("BEGIN")
            for chunk in _chunks(list(by_text)):
                sql = _in_sql(f"SELECT key, {columns} FROM records WHERE key IN ({{in}})", len(chunk))
                for row in conn.execute(sql, chunk):
                    out[by_text[row[0]]] = row[1:]
            conn.execute("COMMIT")
        except sqlite3.Error as e:
            _rollback(conn)
            raise _store_error(e, what) from e
        return out

    def read(self, keys: Sequence[bytes], shard: str) -> dict[bytes, tuple[bytes, int]]:
        """``key -> (value bytes, version)`` for the keys present on ``shard``."""
        rows = self._select(keys, shard, "CAST(value AS BLOB), version", "shard read")
        return {k: (bytes(v), int(ver)) for k, (v, ver) in rows.items()}

    def hashes(self, keys: Sequence[bytes], shard: str) -> dict[bytes, tuple[bytes, int]]:
        """``key -> (xxh3-128 of the value, version)`` for the keys present on ``shard``."""
        rows = self._select(keys, shard, "CAST(value AS BLOB), version", "shard hash")
        digest = xxhash.xxh3_128_digest
        return {k: (digest(v), int(ver)) for k, (v, ver) in rows.items()}

    @contextlib.contextmanager
    def write_fence(self, shard: str):
        """Hold ``shard``'s write lock (``BEGIN IMMEDIATE``) and yield
        ``versions(keys) -> {key: (content hash, version)}`` (the shape of
        :meth:`hashes`) read inside that transaction: the executor compares
        both with what the copy read, so a rewrite that kept the version is
        caught too.

        While it is held, writers to the shard wait: the executor re-checks
        source versions and swaps the map under it, so a fence-aware writer
        (one that checks the key's shard while holding the shard's write
        lock, i.e. in its own write transaction) can never write a source
        record between the re-check and the swap.  Nothing is written.
        """
        path = self.shard_path(shard)
        if not os.path.exists(path):
            raise PermanentError(f"write fence: shard file not found ({safe_name(shard)})", reason="shard_missing")
        conn = self._open(path)
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as e:
            conn.close()
            raise _store_error(e, "write fence") from e
        kt = self.key_type

        def versions(keys: Sequence[bytes]) -> dict[bytes, tuple[bytes, int]]:
            texts = text_forms(list(keys), kt)
            back = dict(zip(texts, keys))
            digest, unhex = xxhash.xxh3_128_digest, bytes.fromhex
            return {back[t]: (digest(unhex(hx)), int(v))
                    for t, v, hx in _rows_json(conn, "version, hex(value)", "records", texts)}

        try:
            yield versions
        finally:
            _rollback(conn)
            conn.close()

    def key_sizes(self, keys: Sequence[bytes], shard: str) -> dict[bytes, int]:
        """``key -> value length in bytes`` for the keys present on ``shard``."""
        rows = self._select(keys, shard, _LENGTH_SQL, "shard sizes")
        return {k: int(n) for k, (n,) in rows.items()}

    def _scalar(self, shard: str, sql: str, what: str) -> int:
        path = self.shard_path(shard)
        if not os.path.exists(path):
            return 0
        try:
            return int(self._conn(path).execute(sql).fetchone()[0] or 0)
        except sqlite3.Error as e:
            raise _store_error(e, what) from e

    def count(self, shard: str) -> int:
        """Records on ``shard`` (0 when its file is absent)."""
        return self._scalar(shard, "SELECT count(*) FROM records", "shard count")

    def shard_bytes(self, shard: str) -> int:
        """Sum of the value lengths on ``shard`` (0 when its file is absent)."""
        return self._scalar(shard, f"SELECT sum({_LENGTH_SQL}) FROM records", "shard bytes")

    # --------------------------------------------------------------- writes

    def copy(self, keys: Sequence[bytes], source: str, target: str) -> list[CopyOutcome]:
        """Copy the records of ``keys`` from ``source`` to ``target``.

        One read transaction on the source and ONE write transaction on the
        target.  Idempotent upsert keyed by the key, carrying the source
        ``(value, version)``; a target record is replaced only if its version
        is <= the source version, so a late duplicate copy can never overwrite
        newer data written on the target.  Never touches the shard map.

        Returns one :class:`CopyOutcome` per input key, in order: the content
        hash and source version, or ``SourceMissing`` for a key without a
        source record.  Raises ``PermanentError(reason="shard_missing")`` if
        the source shard file does not exist (it is never created) and
        ``TransientError`` (whole batch) when a file stays locked.
        """
        if source == target:
            raise ValueError("copy: source and target are the same shard")
        if not keys:
            return []
        src_path = self.shard_path(source)
        if not os.path.exists(src_path):
            raise PermanentError(f"copy: source shard file not found ({safe_name(source)})",
                                 reason="shard_missing")
        texts = text_forms(keys, self.key_type)
        uniq = list(dict.fromkeys(texts))

        # 1. one read of the source
        src = self._conn(src_path)
        found: dict[str, tuple[bytes, int]] = {}
        try:
            src.execute("BEGIN")
            for chunk in _chunks(uniq):
                sql = _in_sql("SELECT key, CAST(value AS BLOB), version FROM records WHERE key IN ({in})", len(chunk))
                for k, v, ver in src.execute(sql, chunk):
                    found[k] = (v, int(ver))
            src.execute("COMMIT")
        except sqlite3.Error as e:
            _rollback(src)
            raise _store_error(e, "copy read") from e

        # 2. one write transaction on the target
        written: set[str] = set()
        if found:
            tgt_path = self.ensure_shard(target)
            tgt = self._conn(tgt_path)
            present = list(found)
            with _locked([tgt_path], self.busy_timeout, "copy write"):
                try:
                    tgt.execute("BEGIN IMMEDIATE")
                    existing: dict[str, int] = dict(_rows_json(tgt, "version", "records", present))
                    rows = []
                    for t in present:
                        v, ver = found[t]
                        have = existing.get(t)
                        if have is None or have <= ver:
                            rows.append((t, v, ver))
                            written.add(t)
                    if rows:
                        rows.sort(key=_first)  # key order: fewer page seeks in the target's index
                        # one statement per chunk of rows, not one step per row (see _rows_json)
                        per = max(1, min(_IN_CHUNK, _limit(tgt, "SQLITE_LIMIT_VARIABLE_NUMBER", 999) // 3))
                        for chunk in _chunks(rows, per):
                            tgt.execute(_upsert_sql(len(chunk)), [x for row in chunk for x in row])
                    tgt.execute("COMMIT")
                except sqlite3.Error as e:
                    _rollback(tgt)
                    raise _store_error(e, "copy write") from e

        digest = xxhash.xxh3_128_digest
        hashed = {t: digest(v) for t, (v, _) in found.items()}
        out = []
        for k, t in zip(keys, texts):
            hit = found.get(t)
            if hit is None:
                out.append(CopyOutcome(k, error=SourceMissing(
                    f"source record missing for key {short_hash_of_key(k)}")))
            else:
                out.append(CopyOutcome(k, content_hash=hashed[t], source_version=hit[1], written=t in written))
        return out

    def put_many(self, shard: str, rows: Iterable[tuple[bytes, bytes]], *, chunk_size: int = _WRITE_CHUNK) -> int:
        """Upsert ``(key, value)`` records on ``shard`` (demo and tests; creates the file).

        One write transaction per chunk; rows get versions ``max(version) + 1,
        + 2, ...`` (in key order within a chunk), so every write outranks every record already in
        the file (including copied ones).  Returns the rows written.
        """
        path = self.ensure_shard(shard)
        conn = self._conn(path)
        total = 0
        buf: list[tuple[bytes, bytes]] = []

        def flush():
            nonlocal total
            texts = text_forms([k for k, _ in buf], self.key_type)
            with _locked([path], self.busy_timeout, "shard put"):
                try:
                    conn.execute("BEGIN IMMEDIATE")
                    base = int(conn.execute("SELECT coalesce(max(version), 0) + 1 FROM records").fetchone()[0])
                    # key order: sequential index inserts (a stable sort keeps the last duplicate last)
                    ordered = sorted(zip(texts, (v for _, v in buf)), key=_first)
                    conn.executemany(
                        "INSERT INTO records(key, value, version) VALUES (?, ?, ?) "
                        "ON CONFLICT(key) DO UPDATE SET value = excluded.value, version = excluded.version",
                        [(t, bytes(v), base + i) for i, (t, v) in enumerate(ordered)],
                    )
                    conn.execute("COMMIT")
                except sqlite3.Error as e:
                    _rollback(conn)
                    raise _store_error(e, "shard put") from e
            total += len(buf)
            buf.clear()

        for row in rows:
            buf.append((row[0], row[1]))
            if len(buf) >= chunk_size:
                flush()
        if buf:
            flush()
        return total

    def delete(self, keys: Sequence[bytes], shard: str, *, versions: Sequence[int] | None = None) -> int:
        """Delete records of ``keys`` on ``shard``; returns how many were deleted.

        Idempotent (absent records and an absent file are fine).  With
        ``versions`` (aligned with ``keys``) a record is deleted only if its
        version still equals the given one -- cleanup never removes a record
        rewritten since it was copied.  One write transaction.
        """
        if not keys:
            return 0
        if versions is not None and len(versions) != len(keys):
            raise ValueError("delete: versions must align with keys")
        path = self.shard_path(shard)
        if not os.path.exists(path):
            return 0
        texts = text_forms(keys, self.key_type)
        conn = self._conn(path)
        with _locked([path], self.busy_timeout, "shard delete"):
            try:
                conn.execute("BEGIN IMMEDIATE")
                if versions is None:
                    cur = conn.executemany("DELETE FROM records WHERE key = ?", [(t,) for t in texts])
                else:
                    cur = conn.executemany("DELETE FROM records WHERE key = ? AND version = ?",
                                           [(t, int(v)) for t, v in zip(texts, versions)])
                n = cur.rowcount
                conn.execute("COMMIT")
            except sqlite3.Error as e:
                _rollback(conn)
                raise _store_error(e, "shard delete") from e
        return max(n, 0)


# Byte length of a value whether stored as BLOB or TEXT (length() of TEXT counts characters).
_LENGTH_SQL = "CASE WHEN typeof(value) = 'blob' THEN length(value) ELSE length(CAST(value AS BLOB)) END"
