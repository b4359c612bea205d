"""PostgreSQL map and data stores (``kind: postgres``).

Never imports Beam.  Keys arrive as canonical bytes and are stored as their
text form (``keys.text_form`` of the keyspace's key type), as in the SQLite
stores.  Every identifier (table, schema, column) is validated against
``^[A-Za-z_][A-Za-z0-9_]{0,62}$`` and quoted; every value is bound as a
parameter.

The map store is :mod:`pipeline.stores.postgres_map`, the data store
:mod:`pipeline.stores.postgres_data`, and what they share (DSNs and their
redaction, error classification, connection pools) :mod:`pipeline.stores.postgres_common`.
This module names the public parts of all three.
"""
from __future__ import annotations

from pipeline.stores.postgres_common import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_LOCK_TIMEOUT,
    DEFAULT_POOL_SIZE,
    IDENTIFIER_RE,
    redact_dsn,
)
from pipeline.stores.postgres_data import PostgresDataStore, encode_key_rows, pseudo_version
from pipeline.stores.postgres_map import PostgresMapSnapshot, PostgresMapStore

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
