"""The embedded SQLite data store (CONTRACTS "Embedded SQLite stores").

Never imports Beam.  Connections, per-file locks and error classification are
shared with the SQLite map store: :mod:`pipeline.stores.sqlite_common`.

Data store: one file per shard, ``<directory>/<names.safe_name(shard)>.sqlite``::

    records(key TEXT PRIMARY KEY, value BLOB NOT NULL, version INTEGER NOT NULL)

A record's version should grow with every write of that key wherever it
lives (README, "The writer contract"): ``copy`` carries the source version to
the target, and ``put_many`` stamps ``max(version in the file) + 1`` (a
Lamport clock per file), so a write made on the target after a copy always
outranks the copied record.  The write fence does not rely on applications
doing the same: besides the version, the fenced swap
(:mod:`pipeline.stores.sqlite_map`) compares the source record's bytes with
its copy on the target (and ``write_fence`` yields content hashes for the
executor's re-check), so a rewrite that kept the version is re-copied, never
swapped stale.
"""
from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from itertools import chain
from typing import Iterable, Sequence

import xxhash

from pipeline.errors import ConfigurationError, SourceMissing, StoreError, TransientError
from pipeline.keys import KeyType, short_hash_of_key, text_forms
from pipeline.names import safe_name
from pipeline.stores.base import CopyOutcome
from pipeline.stores.sqlite_common import (
    _IN_CHUNK,
    _WRITE_CHUNK,
    DEFAULT_BUSY_TIMEOUT,
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
    _upsert_sql,
)

__all__ = ["SqliteDataStore"]

_RECORDS_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS records("
    "key TEXT PRIMARY KEY, value BLOB NOT NULL, version INTEGER NOT NULL)",
)


def _schemaless(conn: sqlite3.Connection, error: sqlite3.Error | None = None) -> bool:
    """The file holds no schema at all (``error``, if given, is a missing table):
    a shard file that an older version, killed while creating it, left without its
    table.  It holds no records; the next copy to it creates the table."""
    if error is not None and "no such table" not in str(error):
        return False
    try:
        return conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0
    except sqlite3.Error:
        return False


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
            if _schemaless(conn):
                return False
            raise ConfigurationError(f"data store {path}: schema mismatch: no table records", reason="schema")
        return True

    def check_shard(self, shard: str, *, write: bool = False) -> str | None:
        """The preflight of ``shard`` (:class:`~pipeline.stores.base.ShardChecks`): None when a
        copy can read from it (``write=True``: write to it), else what is wrong.

        A source's file must exist, be a SQLite database and hold the ``records``
        table with its columns.  A target's file, if it exists, likewise, and it
        must take the write lock a copy takes (``BEGIN IMMEDIATE``, rolled back at
        once: nothing is written; a file someone else is writing to counts as
        writable); an absent target file is created by the first copy, so its
        directory (or the nearest existing parent) must be writable."""
        path = self.shard_path(shard)
        if not os.path.exists(path):
            if not write:
                return f"file {path} does not exist"
            parent = os.path.dirname(os.path.abspath(path))
            while not os.path.isdir(parent) and os.path.dirname(parent) != parent:
                parent = os.path.dirname(parent)
            return None if os.access(parent, os.W_OK | os.X_OK) else f"directory {parent} is not writable"
        if write and not os.access(path, os.W_OK):
            return f"file {path} is not writable"
        try:
            conn = self._open(path)
        except StoreError as e:
            return str(e)
        try:
            if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'records'").fetchone() is None:
                if write and _schemaless(conn):
                    return None  # it holds nothing: the first copy creates the table
                return f"file {path} has no table records"
            conn.execute("SELECT key, value, version FROM records LIMIT 0").fetchall()
            if write:
                conn.execute("BEGIN IMMEDIATE")
                conn.execute("ROLLBACK")
        except sqlite3.Error as e:
            err = _store_error(e, f"file {path}")
            return None if isinstance(err, TransientError) else str(err)
        finally:
            _rollback(conn)
            conn.close()
        return None

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
        uniq = list(by_text)
        try:
            with _read_transaction(conn, len(uniq)):
                for chunk in _chunks(uniq):
                    sql = _in_sql(f"SELECT key, {columns} FROM records WHERE key IN ({{in}})", len(chunk))
                    for row in conn.execute(sql, chunk):
                        out[by_text[row[0]]] = row[1:]
        except sqlite3.Error as e:
            _rollback(conn)
            if _schemaless(conn, e):
                return {}
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
            raise ConfigurationError(f"write fence: shard file not found ({safe_name(shard)})", reason="shard_missing")
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
        conn = self._conn(path)
        try:
            return int(conn.execute(sql).fetchone()[0] or 0)
        except sqlite3.Error as e:
            if _schemaless(conn, e):
                return 0
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
            raise ConfigurationError(f"copy: source shard file not found ({safe_name(source)})",
                                 reason="shard_missing")
        texts = text_forms(keys, self.key_type)
        uniq = list(dict.fromkeys(texts))

        # 1. one read of the source
        src = self._conn(src_path)
        found: dict[str, tuple[bytes, int]] = {}
        try:
            with _read_transaction(src, len(uniq)):
                for chunk in _chunks(uniq):
                    sql = _in_sql("SELECT key, CAST(value AS BLOB), version FROM records WHERE key IN ({in})",
                                  len(chunk))
                    for k, v, ver in src.execute(sql, chunk):
                        found[k] = (v, int(ver))
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
                            tgt.execute(_upsert_sql(len(chunk)), list(chain.from_iterable(chunk)))
                    tgt.execute("COMMIT")
                except sqlite3.Error as e:
                    _rollback(tgt)
                    raise _store_error(e, "copy write") from e

        digest = xxhash.xxh3_128_digest
        hashed = {t: digest(v) for t, (v, _) in found.items()}
        out = []
        append = out.append
        for k, t in zip(keys, texts):
            hit = found.get(t)
            if hit is None:
                append(CopyOutcome(k, error=SourceMissing(
                    f"source record missing for key {short_hash_of_key(k)}")))
            else:
                append(CopyOutcome(k, hashed[t], hit[1], t in written))
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
