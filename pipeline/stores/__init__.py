"""Map and data store adapters behind the :mod:`pipeline.stores.base` protocols.

Never imports Beam.  The one store factory: ``map_store_from_spec`` /
``data_store_from_spec`` build a store from a configuration section (``kind``
sqlite, postgres, redis, objects or memory; a plugin registered under the
entry-point group ``shardmove.stores``; or an API caller's instance -- see
:mod:`pipeline.stores.registry`), and ``open_map_store`` / ``open_data_store``
do so for a whole configuration.
"""
from __future__ import annotations

import logging
import os
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
from pipeline.stores.memory import MemoryDataStore, MemoryMapStore
from pipeline.stores.registry import ENTRY_POINT_GROUP, INSTANCE_KIND, plugin_store
from pipeline.stores.sqlite import SqliteDataStore, SqliteMapSnapshot, SqliteMapStore

__all__ = [
    "close_opened",
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
    "MemoryMapStore",
    "MemoryDataStore",
    "ENTRY_POINT_GROUP",
    "map_store_from_spec",
    "data_store_from_spec",
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


def map_store_from_spec(spec: Mapping[str, Any], key_type: KeyType, *, must_exist: bool = True) -> MapStore:
    """The map store a ``map_store`` section (a picklable spec) describes.

    The one store factory: the launcher opens its stores here, and Beam DoFns
    open their own clients in ``setup()`` from the same spec.
    """
    kind = spec.get("kind")
    if kind == INSTANCE_KIND:
        return spec["ref"].obj
    if kind == "memory":
        return MemoryMapStore.from_spec(spec, key_type)
    if kind == "postgres":
        # deferred: psycopg is loaded only by configurations that use PostgreSQL
        from pipeline.stores.postgres_map import PostgresMapStore

        return PostgresMapStore.from_spec(spec, key_type)
    if kind == "redis":
        # deferred: redis is loaded only by configurations that use Redis
        from pipeline.stores.redis_store import RedisMapStore

        return RedisMapStore.from_spec(spec, key_type)
    if kind == "sqlite":
        if "columns" in spec:
            raise BadInput("config map_store.columns: kind sqlite keeps the fixed shard_map(key, shard_id, version) "
                           "schema; columns can be mapped for kind postgres only")
        path = spec.get("path")
        if not path:
            raise BadInput("config map_store.path: required for kind sqlite")
        if must_exist and not os.path.exists(path):
            raise BadInput(f"map store not found: {path}")
        return SqliteMapStore(path, key_type, **_options(spec, "map_store"))
    return plugin_store(spec, key_type, "map_store")  # or BadInput naming the known kinds


def data_store_from_spec(spec: Mapping[str, Any], key_type: KeyType) -> DataStore | None:
    """The data store a ``data_store`` section describes (None for ``kind: none``)."""
    kind = spec.get("kind")
    if kind in (None, "none"):
        return None
    if kind == INSTANCE_KIND:
        return spec["ref"].obj
    if kind == "memory":
        return MemoryDataStore.from_spec(spec, key_type)
    if kind == "postgres":
        # deferred: psycopg is loaded only by configurations that use PostgreSQL
        from pipeline.stores.postgres_data import PostgresDataStore

        return PostgresDataStore.from_spec(spec, key_type)
    if kind == "objects":
        # deferred: the object store loads the GCS client only when it is used
        from pipeline.stores.objects import ObjectDataStore

        return ObjectDataStore.from_spec(spec, key_type)
    if kind == "sqlite":
        d = spec.get("directory")
        if not d:
            raise BadInput("config data_store.directory: required for kind sqlite")
        if not os.path.isdir(d):
            raise BadInput(f"data store directory not found: {d}")
        return SqliteDataStore(d, key_type, **_options(spec, "data_store"))
    return plugin_store(spec, key_type, "data_store")  # or BadInput naming the known kinds


def open_map_store(cfg, *, must_exist: bool = True) -> MapStore:
    """The map store of a :class:`pipeline.config.Config`."""
    return map_store_from_spec(cfg.map_store, cfg.key_type, must_exist=must_exist)


def open_data_store(cfg) -> DataStore | None:
    """The data store of a :class:`pipeline.config.Config` (None for ``kind: none``)."""
    return data_store_from_spec(cfg.data_store, cfg.key_type)


def close_opened(opened) -> None:
    """Close the stores a call opened from its configuration: ``[(config section, store)]``.
    A caller's own instance (``kind: instance``) stays open: it is the caller's to close.
    Closing is tidying up: a failure is logged, never raised."""
    for section, store in opened:
        if store is None or (section or {}).get("kind") == INSTANCE_KIND:
            continue
        try:
            store.close()
        except Exception as e:  # noqa: BLE001
            logging.getLogger(__name__).debug("store not closed: %s", type(e).__name__)
