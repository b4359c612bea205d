"""The embedded SQLite map store (CONTRACTS "Embedded SQLite stores").

Never imports Beam.  Connections, per-file locks and error classification are
shared with the SQLite data store: :mod:`pipeline.stores.sqlite_common`.

Map store file::

    shard_map(key TEXT PRIMARY KEY, shard_id TEXT NOT NULL, version INTEGER NOT NULL)
    + index shard_map_version(version)

``version`` is a keyspace-wide change number: every transaction that writes
rows (a ``put_many`` chunk, a swap batch) stamps them with ``max(version) + 1``
taken inside that write transaction.

The fenced swap attaches the source shards' files of a
:class:`~pipeline.stores.sqlite_data.SqliteDataStore` (and, read-only, the
targets') to the map's connection: besides the version, it compares the source
record's bytes with its copy on the target, so a rewrite that kept the version
is re-copied, never swapped stale.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
from itertools import chain
from typing import Iterable, Iterator, Sequence

import pyarrow as pa

from pipeline.errors import BadInput, ConfigurationError, PermanentError
from pipeline.keys import KeyType, text_forms
from pipeline.lease import LeaseLost
from pipeline.names import safe_name
from pipeline.stores.base import CountingSnapshot, SwapItem, SwapResult, check_cutoff, swap_item
from pipeline.stores.claims import ClaimRow, decide_claim, raise_for
from pipeline.stores.sqlite_common import (
    _WRITE_CHUNK,
    DEFAULT_BUSY_TIMEOUT,
    _IN_CHUNK,
    _chunks,
    _first,
    _in_sql,
    _limit,
    _locked,
    _read_transaction,
    _rollback,
    _rows_json,
    _SqliteBase,
    _store_error,
    _uri,
)
from pipeline.stores.sqlite_data import SqliteDataStore

__all__ = ["SqliteMapStore", "SqliteMapSnapshot", "FencePrecheck", "map_ddl"]

_log = logging.getLogger("pipeline.stores")

_MAP_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS shard_map("
    "key TEXT PRIMARY KEY, shard_id TEXT NOT NULL, version INTEGER NOT NULL)",
    "CREATE INDEX IF NOT EXISTS shard_map_version ON shard_map(version)",
)


def map_ddl() -> tuple[str, ...]:
    """The map file's DDL (CONTRACTS' ``shard_map`` and its version index), each ``IF NOT EXISTS``."""
    return _MAP_SCHEMA



class SqliteMapSnapshot(CountingSnapshot):
    """A point-in-time export of a SQLite shard map (see :class:`base.MapSnapshot`).

    Opening it starts ONE read transaction and reads the cutoff (the highest
    change number, or the caller's ``cutoff``: at most that, else BadInput).  Iterating streams the rows with ``version <= cutoff``
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

    def __init__(self, store: "SqliteMapStore", segment_size: int, cutoff: int | None = None):
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
            self.cutoff = check_cutoff(cutoff, int(top or 0))
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
        self._precheck_conns: list = []  # idle connections of fence pre-checks, shards attached

    def close(self) -> None:
        super().close()
        with self._all_guard:  # after: a pre-check returned meanwhile is closed and dropped here
            self._precheck_conns = []

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
            raise ConfigurationError(f"map store file not found: {self.path}", reason="map_missing")

    def _map_conn(self) -> sqlite3.Connection:
        self._require_file()
        return self._conn(self.path)

    # ---------------------------------------------------------------- reads

    def snapshot(self, segment_size: int = 20000, cutoff: int | None = None) -> SqliteMapSnapshot:
        """Open a point-in-time export (at ``cutoff``, default the current version);
        see :class:`SqliteMapSnapshot`."""
        return SqliteMapSnapshot(self, segment_size, cutoff)

    @contextlib.contextmanager
    def _keyed_read(self, keys: Sequence[bytes]):
        """``(text form -> key, this thread's map connection)`` inside one read transaction
        over the keys' ``IN`` chunks; a SQLite error is rolled back and raised as the store's."""
        by_text = dict(zip(text_forms(keys, self.key_type), keys))
        conn = self._map_conn()
        try:
            with _read_transaction(conn, len(by_text)):
                yield by_text, conn
        except sqlite3.Error as e:
            _rollback(conn)
            raise _store_error(e, f"map store {self.path}: lookup") from e

    def lookup(self, keys: Sequence[bytes]) -> dict[bytes, tuple[str, int]]:
        """Current ``(shard_id, version)`` of those keys that exist (one read transaction)."""
        out: dict[bytes, tuple[str, int]] = {}
        if keys:
            with self._keyed_read(keys) as (by_text, conn):
                for k, s, v in _rows_json(conn, "shard_id, version", "shard_map", list(by_text)):
                    out[by_text[k]] = (s, int(v))
        return out

    def keys_at(self, keys: Sequence[bytes], shard: str) -> set[bytes]:
        """Those of ``keys`` that the map routes to ``shard`` (one read transaction).

        What the executor's map guard asks before copying a chunk: only the few keys
        already at their target come back, not every key's shard and version
        (:meth:`lookup`): about 40% less CPU on the stage thread for a 500-key chunk."""
        out: set[bytes] = set()
        if keys:
            with self._keyed_read(keys) as (by_text, conn):
                for chunk in _chunks(list(by_text)):
                    # "+shard_id": the key index drives the search, whatever other index the map has
                    sql = _in_sql("SELECT json_group_array(key) FROM shard_map WHERE key IN ({in}) "
                                  "AND +shard_id = ?", len(chunk))
                    out.update(by_text[t] for t in json.loads(conn.execute(sql, [*chunk, shard]).fetchone()[0]))
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
                   token: "tuple[str, int] | None" = None,
                   precheck: "FencePrecheck | None" = None) -> SwapResult:
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

        ``precheck``: this very ``items`` list's fence check, made ahead by
        :meth:`fence_precheck` outside the lock.  Once the lock is held, it stands
        when no other connection has committed to any of the source shards since
        the snapshot it read (SQLite's ``data_version`` of each, read on the
        pre-check's own connection); the fence check is then not run again inside
        the lock.  Otherwise it is ignored and the check runs as without it.

        Any conflict or changed source rolls the whole batch back and applies
        nothing.  Idempotent: compare-and-set on the expected source.
        Raises TransientError when the map (or a fenced shard) stays locked
        beyond the busy timeout.  The same key twice in one batch with
        different moves is a conflict.
        """
        res = self._swap_batch(items, fence=fence, token=token, fast_path=True, precheck=precheck)
        if res is None:  # not every key was at its source: decide key by key
            res = self._swap_batch(items, fence=fence, token=token, fast_path=False)
        return res

    def fence_precheck(self, items: Sequence[SwapItem | tuple], *,
                       fence: "SqliteDataStore") -> "FencePrecheck | None":
        """The write fence's check of a swap batch, made ahead of its :meth:`swap_batch`
        and outside the map's lock -- typically on another thread while the previous
        batch swaps -- so that the serial, locked part of a swap shrinks to the
        compare-and-set and the commit.

        One read transaction on a connection of the pre-check's own (kept until the
        result is closed or used): the keys whose source record changed (as the swap
        would find them, :func:`_sources_changed`) and each source shard's
        ``data_version`` at that snapshot.  ``swap_batch(items, precheck=...)`` relies
        on it only if no other connection has committed to those shards since.  None
        when there is nothing to check ahead (an empty batch, a key twice, a missing
        file, a SQLite error): the swap then checks inside its lock, as always."""
        norm = _Items(items)
        if not norm.n or fence is None or not self.supports_fence(fence):
            return None
        texts = text_forms(norm.key, self.key_type)
        first = dict(zip(texts, range(len(texts))))
        if len(first) != len(texts):
            return None
        state = None
        try:
            with self._all_guard:
                state = self._precheck_conns.pop() if self._precheck_conns else None
            if state is None:
                conn = self._open(self.path)
                with self._all_guard:
                    self._all.append(conn)
                state = [conn, ((), ())]
            layout = self._fence_layout(norm, fence, state[0])
            if layout is None:
                self._return_precheck_conn(state)
                return None
            sources, attached, targets, paths = layout
            conn = self._attach(state, *paths)
            conn.execute("BEGIN")
            try:
                # read first: the read transaction's snapshot is fixed from here on
                versions = tuple(conn.execute(f"PRAGMA {attached[s]}.data_version").fetchone()[0]
                                 for s in sources)
                changed = _sources_changed(conn, norm, first, list(first), attached, targets)
                # the copies the check compared with, on targets the swap does not lock: their
                # versions, which the swap confirms under its locks (the target is written by
                # copies of other keys all along, so its data_version cannot tell)
                copies = {} if changed else _copy_versions(conn, norm, first, targets)
            finally:
                conn.execute("COMMIT")
        except (sqlite3.Error, ValueError, PermanentError) as e:
            if state is not None:
                _close_quietly(state[0])
            _log.debug("fence pre-check not made (%s); the swap checks inside its lock", type(e).__name__)
            return None
        return FencePrecheck(self, items, paths, versions, tuple(changed), state, copies)

    def _return_precheck_conn(self, state) -> None:
        with self._all_guard:
            if state[0] in self._all:
                self._precheck_conns.append(state)

    def _fence_layout(self, norm: "_Items", fence: "SqliteDataStore", conn: sqlite3.Connection):
        """A fenced batch's shards: (sorted sources, {source: fence schema}, {target: schema
        or None}, (source paths, read-only target paths)); None when a source file is missing."""
        sources = sorted(set(norm.source))
        # targets are attached read-only: BEGIN IMMEDIATE takes no write lock on them,
        # so copies to them go on during the swap
        readonly = sorted(set(norm.target) - set(sources))
        readonly = [s for s in readonly if os.path.exists(fence.shard_path(s))]
        limit = _limit(conn, "SQLITE_LIMIT_ATTACHED", 10)
        if len(sources) + len(readonly) > limit:
            raise ValueError(f"swap_batch: a fenced batch spans {len(sources)} source and {len(readonly)} "
                             f"target shards; at most {limit} can be attached")
        if not all(os.path.exists(fence.shard_path(s)) for s in sources):
            return None
        attached = {s: f"fence{n}" for n, s in enumerate(sources)}
        targets = {t: attached.get(t) for t in set(norm.target)}
        for n, s in enumerate(readonly):
            targets[s] = f"copy{n}"
        paths = (tuple(fence.shard_path(s) for s in sources), tuple(fence.shard_path(s) for s in readonly))
        return sources, attached, targets, paths

    def _swap_batch(self, items, *, fence, token, fast_path: bool,
                    precheck: "FencePrecheck | None" = None) -> "SwapResult | None":
        norm = _Items(items)
        if not norm.n:
            return SwapResult()
        if fence is not None:
            if not self.supports_fence(fence):
                raise TypeError("swap_batch: fence must be a SqliteDataStore")
            # an item without source_version can only be confirmed "already" at its
            # target; were it to be applied, it counts as source_changed (re-copy first)
        texts = text_forms(norm.key, self.key_type)

        # One decision per distinct key; an inconsistent duplicate is a conflict.
        first: dict[str, int]
        dup_conflict: set[str] = set()
        if len(set(texts)) == len(texts):  # no key twice (the executor's batches): built in C
            first = dict(zip(texts, range(len(texts))))
        else:
            first = {}
            for i, t in enumerate(texts):
                j = first.setdefault(t, i)
                if j != i and norm.row(j) != norm.row(i):
                    dup_conflict.add(t)

        conn = self._map_conn()
        attached: dict[str, str] = {}  # source shard -> schema name
        targets: dict[str, str | None] = {}  # target shard -> schema name (None: no file)
        lock_paths = [self.path]
        paths = None
        if fence is not None:
            layout = self._fence_layout(norm, fence, conn)
            if layout is None:
                missing = next(s for s in sorted(set(norm.source)) if not os.path.exists(fence.shard_path(s)))
                raise PermanentError(f"fenced swap: source shard file not found ({safe_name(missing)})",
                                     reason="shard_missing")
            _sources, attached, targets, paths = layout
            lock_paths += sorted(paths[0])
            conn = self._fenced_conn(*paths)

        with _locked(lock_paths, self.busy_timeout, "map swap"):
            try:
                conn.execute("BEGIN IMMEDIATE")
                # the run registry's token and the batch's change number: one statement
                if token is not None:
                    epoch, version = conn.execute(
                        "SELECT (SELECT epoch FROM shardmove_runs WHERE plan_id = ?), "
                        "(SELECT coalesce(max(version), 0) + 1 FROM shard_map)", (token[0],)).fetchone()
                    if epoch is None or epoch != token[1]:
                        conn.execute("ROLLBACK")
                        raise LeaseLost(f"plan {token[0][:12]}: epoch {token[1]} no longer holds the map store "
                                        f"(now {epoch if epoch is not None else 'none'}); nothing applied")
                else:
                    version = conn.execute("SELECT coalesce(max(version), 0) + 1 FROM shard_map").fetchone()[0]
                version = int(version)
                uniq = list(first)
                if not dup_conflict and fast_path:
                    # Fast path (a first run: every key still at its source): fence check and
                    # compare-and-set straight away; if every row was written, that is the answer.
                    checked = None
                    if precheck is not None and attached:
                        checked = precheck._stands(items, paths)  # locks held: nothing can commit now
                    try:
                        fast = self._swap_all_applied(conn, norm, first, uniq, attached, targets, version,
                                                      checked)
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
                    cur = current.get(t)
                    if t in dup_conflict:
                        status[t] = "conflict"
                    elif cur is not None and cur == norm.target[i]:
                        status[t] = "already"
                    elif cur is not None and cur == norm.source[i]:
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
                if applied_keys and _cas_update(conn, norm, first, applied_keys, version) != len(applied_keys):
                    conn.execute("ROLLBACK")
                    raise PermanentError("map swap: compare-and-set wrote an unexpected number of rows",
                                         reason="swap_inconsistent")
                conn.execute("COMMIT")
                return SwapResult(applied=tuple(by_status["apply"]), already=tuple(by_status["already"]),
                                  version=version if applied_keys else None)
            except sqlite3.Error as e:
                _rollback(conn)
                if fence is not None:  # a broken attached connection is not reused
                    self._drop_fenced_conn(tuple(fence.shard_path(s) for s in attached))
                raise _store_error(e, f"map store {self.path}: swap") from e

    def _swap_all_applied(self, conn, norm, first, uniq, attached, targets, version: int,
                          checked: "tuple | None" = None) -> int | None:
        """Inside the swap transaction: if every key is at its expected source (and,
        fenced, has the source version its copy read), apply them all, stamped
        ``version`` (the batch's change number), and return it.  Returns None (nothing
        written) when the fence check fails and raises _NotAllApplied (rows written:
        roll back) when the CAS missed a row.  ``checked``: the changed keys of a
        pre-check that still stands (:meth:`fence_precheck`), instead of checking now."""
        if attached and (checked if checked is not None else
                         _sources_changed(conn, norm, first, uniq, attached, targets)):
            return None
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
        try:
            return self._attach(state, shard_paths, readonly_paths)
        except sqlite3.Error as e:  # half attached: never reuse it; the next batch opens anew
            self._drop_fenced_conn(shard_paths)
            raise _store_error(e, f"map store {self.path}: swap (attach shards)") from e

    @staticmethod
    def _attach(state: list, shard_paths: tuple, readonly_paths: tuple) -> sqlite3.Connection:
        """``state`` = [connection, (attached source paths, attached read-only paths)]:
        its connection with exactly these shards attached (fence0.., copy0..)."""
        conn, current = state
        wanted = (shard_paths, readonly_paths)
        if current != wanted:
            state[1] = None  # until every ATTACH has succeeded
            for n in range(len(current[0]) if current else 0):
                conn.execute(f"DETACH DATABASE fence{n}")
            for n in range(len(current[1]) if current else 0):
                conn.execute(f"DETACH DATABASE copy{n}")
            for n, path in enumerate(shard_paths):
                conn.execute(f"ATTACH DATABASE ? AS fence{n}", (_uri(path),))
            for n, path in enumerate(readonly_paths):
                conn.execute(f"ATTACH DATABASE ? AS copy{n}", (_uri(path, readonly=True),))
            state[1] = wanted
        return conn

    def _drop_fenced_conn(self, shard_paths: tuple) -> None:
        """Forget this thread's fencing connection (after an error): the next batch opens a new one."""
        state = getattr(self._local, "fenced", None)
        if state is not None and state[0] is not None:
            _close_quietly(state[0])
            self._local.fenced = None


class FencePrecheck:
    """A swap batch's write-fence check made ahead of its swap (:meth:`SqliteMapStore.fence_precheck`).

    ``changed``: the keys (text forms) whose source had changed at that snapshot.
    ``stood``: set by the swap that used it -- True when nothing had committed to the
    source shards since, so the swap did not check again inside its lock.  Holds a
    connection of its own until :meth:`close` (the swap closes it; closing twice is
    harmless)."""

    __slots__ = ("items", "paths", "versions", "changed", "copies", "stood", "_store", "_state")

    def __init__(self, store: "SqliteMapStore", items, paths: tuple, versions: tuple, changed: tuple, state,
                 copies: "dict | None" = None):
        self.items = items
        self.paths = paths
        self.versions = versions
        self.changed = changed
        self.copies = copies or {}  # read-only target schema -> [(key text, version), ...]
        self.stood = False
        self._store = store
        self._state = state

    def _stands(self, items, paths) -> "tuple | None":
        """Called by the swap with the source shards' write locks held: the changed keys
        if this pre-check is of exactly ``items``, no other connection has committed to
        those shards since its snapshot, and every copy it compared with still has the
        version it had then on its target (a target the swap does not lock: a copy
        deleted or rewritten meanwhile voids the pre-check); else None (the swap checks
        inside its lock)."""
        if self._state is None or items is not self.items or paths != self.paths:
            return None
        conn = self._state[0]
        try:
            now = tuple(conn.execute(f"PRAGMA fence{n}.data_version").fetchone()[0]
                        for n in range(len(paths[0])))
            if now != self.versions or _copies_moved(conn, self.copies):
                return None
        except sqlite3.Error:
            return None
        self.stood = True
        return self.changed

    def close(self) -> None:
        state, self._state = self._state, None
        if state is not None:
            self._store._return_precheck_conn(state)


def _close_quietly(conn: sqlite3.Connection) -> None:
    try:
        conn.close()
    except sqlite3.Error:
        pass


class _Items:
    """A swap batch's items as columns (``key``, ``source``, ``target``, ``sver``,
    ``check``: one list each, row ``i`` = item ``i``), normalised once: 5-tuples
    (:class:`SwapItem` or plain) are split in C; 3- and 4-tuples through
    :func:`~pipeline.stores.base.swap_item`."""

    __slots__ = ("n", "key", "source", "target", "sver", "check")

    def __init__(self, items):
        items = items if isinstance(items, list) else list(items)
        self.n = len(items)
        if not items:
            self.key = self.source = self.target = self.sver = self.check = []
            return
        if set(map(len, items)) != {5}:
            items = [swap_item(it) for it in items]
        key, source, target, sver, check = zip(*items)
        self.key, self.source, self.target, self.sver = key, source, target, sver
        self.check = tuple(map(bool, check))

    def row(self, i: int) -> tuple:
        return (self.key[i], self.source[i], self.target[i], self.sver[i], self.check[i])


def _sources_changed(conn: sqlite3.Connection, norm: _Items, first, keys, attached: dict,
                     targets: dict) -> list[str]:
    """The write fence's check, inside the swap transaction: the ``keys`` whose record
    on their (attached) source shard is gone, no longer has the version the copy read,
    or no longer holds the same bytes as the key's record on its target shard.

    The last condition catches an application that rewrote a record and kept its
    version (the version is the application's to stamp here): the swap then needs
    a fresh copy.  A forced item (``check`` false) is compared by version only.
    SQLite compares the bytes itself, the target attached read-only (``targets``:
    target shard -> schema, or None when its file is absent: nothing was copied
    there, so every checked key changed).

    ONE statement per (source, target) pair and chunk of :data:`_IN_CHUNK` items:
    the items go in as bound ``VALUES`` rows ``(key, source version, check)`` and
    only the changed keys come back, as one JSON array.  Python's sqlite3 releases
    and re-takes the GIL at every step, and a re-take waits for the switch interval
    while another thread runs Python (:func:`~pipeline.stores.sqlite_common._rows_json`).
    Keys are bound parameters, never JSON input: SQLite's JSON functions cut a
    string at an escaped NUL, so ``"a\\u0000b"`` would match the key ``a``."""
    by_pair: dict[tuple[str, str], list] = {}
    source, target, sver, check = norm.source, norm.target, norm.sver, norm.check
    for t in keys:
        i = first[t]
        by_pair.setdefault((source[i], target[i]), []).append((t, sver[i], check[i]))
    per = max(1, min(_IN_CHUNK, _limit(conn, "SQLITE_LIMIT_VARIABLE_NUMBER", 999) // 3))
    changed: list[str] = []
    for (src, tgt), items in by_pair.items():
        schema = targets.get(tgt)
        if schema is None:
            changed += [it[0] for it in items if it[2]]
            items = [it for it in items if not it[2]]
            same = "1"
        else:
            same = (f"(SELECT CAST(t.value AS BLOB) FROM {schema}.records t WHERE t.key = j.k) "
                    "IS CAST(s.value AS BLOB)")
        for chunk in _chunks(items, per):
            sql = ("WITH j(k, v, c) AS (VALUES " + ",".join(["(?, ?, ?)"] * len(chunk)) + ") "
                   f"SELECT json_group_array(j.k) FROM j LEFT JOIN {attached[src]}.records s ON s.key = j.k "
                   f"WHERE s.key IS NULL OR s.version IS NOT j.v OR (j.c AND NOT ({same}))")
            changed += json.loads(conn.execute(sql, list(chain.from_iterable(chunk))).fetchone()[0])
    return changed


def _copy_versions(conn: sqlite3.Connection, norm: _Items, first, targets: dict) -> dict:
    """For a fence pre-check: the version of each checked key's copy on its target, per
    read-only target schema (``copyN``; a target that is also a source is locked by the
    swap and covered by its data_version; a forced item's copy is not compared)."""
    by_schema: dict[str, list[str]] = {}
    for t, i in first.items():
        schema = targets.get(norm.target[i])
        if norm.check[i] and schema is not None and schema.startswith("copy"):
            by_schema.setdefault(schema, []).append(t)
    return {schema: [(k, int(v)) for k, v in _rows_json(conn, "version", f"{schema}.records", keys)]
            for schema, keys in by_schema.items()}


def _copies_moved(conn: sqlite3.Connection, copies: dict) -> bool:
    """Whether any of ``copies`` (schema -> [(key text, version)]) is gone from its target
    or has another version now: ONE statement per schema and chunk, keys bound as values."""
    per = max(1, min(_IN_CHUNK, _limit(conn, "SQLITE_LIMIT_VARIABLE_NUMBER", 999) // 2))
    for schema, pairs in copies.items():
        for chunk in _chunks(pairs, per):
            sql = ("WITH j(k, v) AS (VALUES " + ",".join(["(?, ?)"] * len(chunk)) + ") "
                   f"SELECT EXISTS (SELECT 1 FROM j LEFT JOIN {schema}.records t ON t.key = j.k "
                   "WHERE t.key IS NULL OR t.version IS NOT j.v)")
            if conn.execute(sql, list(chain.from_iterable(chunk))).fetchone()[0]:
                return True
    return False


def _cas_update(conn: sqlite3.Connection, norm: _Items, first, keys, version: int) -> int:
    """Compare-and-set ``keys`` to their targets, stamping ``version``; returns the
    rows written.  ONE statement per (source, target) pair and chunk of
    :data:`_IN_CHUNK` keys, the keys bound in an ``IN`` list (SQLite sorts the list
    and walks it through the key index).

    Not ``executemany``: it steps once per row, and each step gives up the GIL and
    waits to take it back while another thread runs Python.  In a run (500k keys,
    py-spy ``--idle``) the swap thread -- the serial path -- spent 0.85 s of its
    5.6 s in those waits; beside a thread spinning in Python, a 500-row batch took
    3.5 s that way against 21 ms as one statement.  Alone, one statement costs
    ~2 ms more CPU per 500 rows (6.6 against 4.5 ms)."""
    by_pair: dict[tuple[str, str], list[str]] = {}
    source, target = norm.source, norm.target
    for t in keys:
        i = first[t]
        by_pair.setdefault((source[i], target[i]), []).append(t)
    per = max(1, min(_IN_CHUNK, _limit(conn, "SQLITE_LIMIT_VARIABLE_NUMBER", 999) - 3))
    written = 0
    for (src, tgt), ks in by_pair.items():
        for chunk in _chunks(ks, per):
            # "+shard_id": an index of the application's on shard_id must never drive this
            # update (without statistics SQLite would walk the whole source shard, locks held)
            sql = _in_sql("UPDATE shard_map SET shard_id = ?, version = ? WHERE +shard_id = ? AND key IN ({in})",
                          len(chunk))
            written += conn.execute(sql, [tgt, version, src, *chunk]).rowcount
    return written


class _NotAllApplied(Exception):
    """The fast swap path's compare-and-set missed a row (internal)."""
