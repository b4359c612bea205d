"""Embedded SQLite stores, the shared part: connections, per-file locks, errors, SQL helpers.

Never imports Beam.  Keys arrive as canonical bytes and are stored as their
text form (``keys.text_form`` of the keyspace's key type).

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

The map store lives in :mod:`pipeline.stores.sqlite_map`, the data store in
:mod:`pipeline.stores.sqlite_data`; :mod:`pipeline.stores.sqlite` names both.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import sqlite3
import threading
import time
import urllib.parse
from typing import Iterable, Iterator, Sequence

from pipeline import fs, procs
from pipeline.errors import ConfigurationError, PermanentError, StoreError, TransientError
from pipeline.keys import KeyType

#: Seconds a connection waits for another writer before "database is locked".
DEFAULT_BUSY_TIMEOUT = 5.0

_IN_CHUNK = 500  # bound variables per ``IN (...)`` query
_WRITE_CHUNK = 10_000  # rows per put_many transaction

# SQLite primary result codes that mean "someone else holds the lock, try again".
_TRANSIENT_CODES = {5, 6, 15}  # SQLITE_BUSY, SQLITE_LOCKED, SQLITE_PROTOCOL
_CANTOPEN = 14
_NOTADB = 26
_READONLY = 8


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
        return ConfigurationError(f"{what}: cannot open the database file ({name})", reason="cannot_open")
    if code is not None and (code & 0xFF) == _NOTADB:
        return ConfigurationError(f"{what}: the file is not a SQLite database ({name})", reason="not_a_database")
    if "no such table" in str(e) or "no such column" in str(e):
        return ConfigurationError(f"{what}: schema mismatch: {e}", reason="schema")
    if code is not None and (code & 0xFF) == _READONLY:
        return ConfigurationError(f"{what}: the database file is read-only ({name})", reason="permission")
    return PermanentError(f"{what}: {e} ({name})", reason="store_error")


# ----------------------------------------------------------- per-file locks
#
# Process-wide by design: the lock guards a file on this machine, whichever
# store object (or DoFn instance) writes it.  Holds no data.
#
# Between processes (Beam's multi_processing SDK workers, several executors
# of different plans), each file's writers also take an exclusive flock(2) on
# a sidecar file, ``<file>-shardmove-lock``, polled every 0.2-2 ms: SQLite's
# own busy handler sleeps 1, 2, 5, 10 ... 100 ms between its tries, so a
# writer waiting on another process's transaction woke up to tens of ms after
# it ended.  The sidecar, never the database file itself: closing any other
# descriptor of a database file drops the process's POSIX locks on it (SQLite's),
# and on NFS flock is emulated with those very locks.  A directory where the
# sidecar cannot be created (read-only) leaves it to SQLite's locking alone.

_FILE_LOCKS: dict[str, threading.Lock] = {}
_FILE_LOCKS_GUARD = threading.Lock()
_LOCK_FDS: dict[str, int] = {}
LOCK_SUFFIX = "-shardmove-lock"
_REAL: dict[str, str] = {}  # path -> its realpath, resolved once per process


def _real(path: str) -> str:
    """``os.path.realpath(path)``, remembered per absolute path (a relative one is made
    absolute first: the working directory may change): every swap batch takes its files'
    locks, and each lstat of a resolution gives up the GIL and waits to take it back."""
    path = os.fspath(path)
    if not os.path.isabs(path):
        path = os.path.abspath(path)
    real = _REAL.get(path)
    if real is None:
        real = os.path.realpath(path)
        if len(_REAL) < 65536:
            _REAL[path] = real
    return real


def _file_lock(path: str) -> threading.Lock:
    real = _real(path)
    with _FILE_LOCKS_GUARD:
        lock = _FILE_LOCKS.get(real)
        if lock is None:
            lock = _FILE_LOCKS[real] = threading.Lock()
        return lock


def _lock_fd(path: str) -> int | None:
    """This process's descriptor of ``path``'s sidecar lock file, opened once (owner-only);
    None when it cannot be created."""
    real = _real(path)
    fd = _LOCK_FDS.get(real)
    if fd is None:
        try:  # opened outside the guard: a fork meanwhile must not leave the guard held
            fd = os.open(real + LOCK_SUFFIX, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError:
            fd = -1
        with _FILE_LOCKS_GUARD:
            kept = _LOCK_FDS.setdefault(real, fd)
        if kept != fd and fd >= 0:  # another thread opened it first
            os.close(fd)
        fd = kept
    return None if fd < 0 else fd


def _flock(fd: int, timeout: float) -> bool | None:
    """Take the exclusive flock of ``fd`` within ``timeout`` seconds: True, or False if
    another process held it all along; None if this file system refuses flocks (SQLite's
    locking alone then applies, as without a sidecar)."""
    deadline = time.monotonic() + timeout
    delay = 0.0002
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            now = time.monotonic()
            if now >= deadline:
                return False
            time.sleep(min(delay, deadline - now))
            delay = min(delay * 2, 0.002)
        except OSError:  # e.g. ENOLCK
            return None


@contextlib.contextmanager
def _locked(paths: Iterable[str], timeout: float, what: str):
    """Hold the locks of ``paths`` (in the given order): each file's lock in this process,
    then its sidecar flock between processes, each waited for up to ``timeout`` seconds;
    TransientError("busy") if one is not held by then."""
    held: list = []
    flocked: list = []
    wait = max(timeout, 0.001)
    try:
        for p in paths:
            lock = _file_lock(p)
            if not lock.acquire(timeout=wait):
                raise TransientError(f"{what}: file busy in this process", reason="busy")
            held.append(lock)
            fd = _lock_fd(p)
            if fd is not None:
                got = _flock(fd, wait)
                if got is False:
                    raise TransientError(f"{what}: file busy in another process", reason="busy")
                if got:
                    flocked.append(fd)
        yield
    finally:
        for fd in reversed(flocked):
            fcntl.flock(fd, fcntl.LOCK_UN)
        for lock in reversed(held):
            lock.release()


def _forget_lock_fds() -> None:
    """After a fork, in the child: its own sidecar descriptors (a flock belongs to an open
    file, shared with the parent's) and fresh guards (a parent thread may have held them)."""
    global _FILE_LOCKS_GUARD, _FILE_LOCKS
    for fd in _LOCK_FDS.values():
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass
    _LOCK_FDS.clear()
    _FILE_LOCKS_GUARD = threading.Lock()
    _FILE_LOCKS = {}


os.register_at_fork(after_in_child=_forget_lock_fds)


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


def _scratch_label(base: str) -> str:
    """``base``, or a hash of it when it is long: the scratch name must stay within NAME_MAX."""
    return base if len(base) <= 100 else hashlib.sha256(base.encode()).hexdigest()[:32]


def _creating_name(path: str) -> str:
    """The scratch file a process builds ``path`` in: hidden, beside it, never ``*.sqlite``,
    named after its owner (:func:`pipeline.procs.owner_tag`) and thread."""
    directory, base = os.path.split(os.path.abspath(path))
    return os.path.join(directory,
                        f".{_scratch_label(base)}.{procs.owner_tag()}~{threading.get_ident()}.creating")


def _sweep_creating(path: str) -> None:
    """Remove the scratch files of ``path`` that a killed process of this host left (its
    owner is gone); a live creator's are left alone."""
    directory, base = os.path.split(os.path.abspath(path))
    prefix = f".{_scratch_label(base)}."
    suffixes = (".creating", ".creating-wal", ".creating-shm", ".creating-journal")
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        if not name.startswith(prefix) or not name.endswith(suffixes):
            continue
        tag = name[len(prefix):name.rindex(".creating")].rpartition("~")[0]
        if not tag or not procs.owner_gone(tag):
            continue
        try:
            os.unlink(os.path.join(directory, name))
        except OSError:
            pass


@contextlib.contextmanager
def _read_transaction(conn: sqlite3.Connection, keys: int):
    """One read transaction around a read of ``keys`` keys in ``IN (...)`` chunks of
    :data:`_IN_CHUNK`, so that every chunk sees the same state.  A read of one chunk is
    one statement, a read transaction of its own: no BEGIN/COMMIT (two fewer sqlite3
    steps).  On any error the transaction is rolled back here, so the thread's connection
    is never left inside it (a later ``BEGIN`` would fail, and an open read transaction
    holds back the WAL's checkpoints); callers still roll back on SQLite errors."""
    several = keys > _IN_CHUNK
    if several:
        conn.execute("BEGIN")
    try:
        yield
    except BaseException:
        if several:
            _rollback(conn)
        raise
    if several:
        conn.execute("COMMIT")


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
        """Ensure ``path`` holds ``schema``.  An absent file is created whole or not
        at all (:meth:`_create_whole`): a kill at any moment leaves either no file or
        one in WAL mode with its schema, never a half-made one that a rerun's
        preflight would refuse.  A file with no schema at all (one an older version
        left half-made, or an empty file) is put in WAL mode first."""
        if not os.path.exists(path):
            self._create_whole(path, schema, what)
        else:
            _sweep_creating(path)  # a killed creator's scratch, even if another made the file
        conn = self._conn(path)
        try:
            if conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0:
                conn.execute("PRAGMA journal_mode=WAL")
            for stmt in schema:
                conn.execute(stmt)
        except sqlite3.Error as e:
            raise _store_error(e, what) from e

    def _create_whole(self, path: str, schema: Sequence[str], what: str) -> None:
        """Build ``path`` (0600, WAL, ``schema``) in a hidden scratch file beside it,
        fsync it, and link it into place: the name appears only for a whole file,
        and a file someone else created first is kept.  The directory (0700) is
        created if absent.  Scratch files of killed processes are swept first."""
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            os.makedirs(directory, mode=0o700, exist_ok=True)
            os.chmod(directory, 0o700)
        _sweep_creating(path)
        tmp = _creating_name(path)
        try:
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            try:
                os.fchmod(fd, 0o600)
            finally:
                os.close(fd)
            conn = self._open(tmp)
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                for stmt in schema:
                    conn.execute(stmt)
            except sqlite3.Error as e:
                raise _store_error(e, what) from e
            finally:
                conn.close()  # the last connection: checkpoints the WAL into the file and removes it
            fs.sync_file(tmp)
            try:
                os.link(tmp, path)  # atomic; fails if the name exists
            except FileExistsError:
                return
            except OSError:  # a file system without hard links: create it in place, never replace
                try:  # a kill now leaves a file without schema, which the next ensure completes
                    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
                except FileExistsError:
                    return
                os.close(fd)
                return  # the caller puts it in WAL mode and creates its schema
            os.unlink(tmp)  # at once: a kill leaves a second name of the live file only in between
            fs.sync_dir(directory)
        finally:
            for suffix in ("", "-wal", "-shm", "-journal"):
                try:
                    os.unlink(tmp + suffix)
                except FileNotFoundError:
                    pass

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


