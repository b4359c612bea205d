"""Map and data store adapters behind the :mod:`pipeline.stores.base` protocols.

Never imports Beam.  ``open_map_store`` / ``open_data_store`` build a store
from a configuration section (``{"kind": "sqlite", "path": ...}`` /
``{"kind": "sqlite", "directory": ...}``); later adapters register here.
"""
from __future__ import annotations

from typing import Any, Mapping

from pipeline.errors import BadInput
from pipeline.keys import KeyType
from pipeline.stores.base import (
    SNAPSHOT_SCHEMA,
    CopyOutcome,
    DataStore,
    MapSnapshot,
    MapStore,
    SnapshotStats,
    SwapItem,
    SwapResult,
    content_hash,
)
from pipeline.stores.sqlite import SqliteDataStore, SqliteMapSnapshot, SqliteMapStore

__all__ = [
    "SNAPSHOT_SCHEMA",
    "content_hash",
    "CopyOutcome",
    "DataStore",
    "MapSnapshot",
    "MapStore",
    "SnapshotStats",
    "SwapItem",
    "SwapResult",
    "SqliteDataStore",
    "SqliteMapSnapshot",
    "SqliteMapStore",
    "open_map_store",
    "open_data_store",
]


def _options(section: Mapping[str, Any], what: str) -> dict:
    """Optional tuning keys shared by the SQLite stores."""
    out = {}
    if "busy_timeout" in section:
        v = section["busy_timeout"]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise BadInput(f"config {what}.busy_timeout: expected seconds >= 0, got {v!r}")
        out["busy_timeout"] = float(v)
    if "synchronous" in section:
        v = section["synchronous"]
        if str(v).upper() not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise BadInput(f"config {what}.synchronous: expected OFF, NORMAL, FULL or EXTRA, got {v!r}")
        out["synchronous"] = str(v).upper()
    return out


def open_map_store(section: Mapping[str, Any], key_type: KeyType) -> MapStore:
    """The map store a ``map_store`` configuration section describes."""
    kind = section.get("kind")
    if kind == "sqlite":
        path = section.get("path")
        if not isinstance(path, str) or not path:
            raise BadInput(f"config map_store.path: expected a path, got {path!r}")
        return SqliteMapStore(path, key_type, **_options(section, "map_store"))
    raise BadInput(f"config map_store.kind: unsupported store kind {kind!r}")


def open_data_store(section: Mapping[str, Any], key_type: KeyType) -> DataStore | None:
    """The data store a ``data_store`` section describes (None for ``kind: none``)."""
    kind = section.get("kind")
    if kind == "none":
        return None
    if kind == "sqlite":
        directory = section.get("directory")
        if not isinstance(directory, str) or not directory:
            raise BadInput(f"config data_store.directory: expected a directory, got {directory!r}")
        return SqliteDataStore(directory, key_type, **_options(section, "data_store"))
    raise BadInput(f"config data_store.kind: unsupported store kind {kind!r}")
