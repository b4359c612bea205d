"""Open the configured map store and data store (by ``kind``).

Specs are plain mappings (picklable), so Beam DoFns open their own clients
in ``setup()`` from the same spec the launcher used.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

from pipeline.config import Config
from pipeline.errors import BadInput
from pipeline.keys import KeyType

__all__ = ["open_map_store", "open_data_store", "map_store_from_spec", "data_store_from_spec"]


def map_store_from_spec(spec: Mapping[str, Any], key_type: KeyType, *, must_exist: bool = True):
    kind = spec.get("kind")
    if kind == "postgres":
        from pipeline.stores.postgres import PostgresMapStore

        return PostgresMapStore.from_spec(spec, key_type)
    if kind == "redis":
        from pipeline.stores.redis_store import RedisMapStore

        return RedisMapStore.from_spec(spec, key_type)
    if kind == "sqlite":
        from pipeline.stores.sqlite import SqliteMapStore

        path = spec.get("path")
        if not path:
            raise BadInput("config map_store.path: required for kind sqlite")
        if must_exist and not os.path.exists(path):
            raise BadInput(f"map store not found: {path}")
        return SqliteMapStore(path, key_type)
    raise BadInput(f"config map_store.kind: unknown kind {kind!r}")


def data_store_from_spec(spec: Mapping[str, Any], key_type: KeyType):
    kind = spec.get("kind")
    if kind in (None, "none"):
        return None
    if kind == "postgres":
        from pipeline.stores.postgres import PostgresDataStore

        return PostgresDataStore.from_spec(spec, key_type)
    if kind == "objects":
        from pipeline.stores.objects import ObjectDataStore

        return ObjectDataStore.from_spec(spec, key_type)
    if kind == "sqlite":
        from pipeline.stores.sqlite import SqliteDataStore

        d = spec.get("directory")
        if not d:
            raise BadInput("config data_store.directory: required for kind sqlite")
        if not os.path.isdir(d):
            raise BadInput(f"data store directory not found: {d}")
        return SqliteDataStore(d, key_type)
    raise BadInput(f"config data_store.kind: unknown kind {kind!r}")


def open_map_store(cfg: Config, *, must_exist: bool = True):
    return map_store_from_spec(cfg.map_store, cfg.key_type, must_exist=must_exist)


def open_data_store(cfg: Config):
    return data_store_from_spec(cfg.data_store, cfg.key_type)
