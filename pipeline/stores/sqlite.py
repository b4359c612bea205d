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

The map store is :mod:`pipeline.stores.sqlite_map`, the data store
:mod:`pipeline.stores.sqlite_data`, and what they share (connections, per-file
locks, error classification, SQL helpers) :mod:`pipeline.stores.sqlite_common`.
This module names the public parts of all three.
"""
from __future__ import annotations

from pipeline.stores.sqlite_common import DEFAULT_BUSY_TIMEOUT
from pipeline.stores.sqlite_data import SqliteDataStore
from pipeline.stores.sqlite_map import SqliteMapSnapshot, SqliteMapStore, map_ddl

__all__ = [
    "SqliteMapStore",
    "SqliteMapSnapshot",
    "SqliteDataStore",
    "map_ddl",
    "DEFAULT_BUSY_TIMEOUT",
]
