"""What a store author needs, in one place: bring your own map store or data mover.

A map store implements :class:`MapStore` (the authoritative key -> shard map:
snapshots, look-ups, all-or-nothing compare-and-set swap batches, change
numbers); a data store -- the data mover -- implements :class:`DataStore`
(idempotent copies that carry the source version and never replace a newer
target record, reads, content hashes, sizes, deletes).  Optional capabilities
are Protocols too: :class:`RunRegistry`, :class:`WriteFencing`,
:class:`KeyNameLimits`.  Keys cross every interface as canonical bytes; no
message may hold a key.

Two ways in (README "Bring your own store"):

* pass an instance to the API -- ``shardmove.plan(cfg, map_store=..., data_store=...)``
  and ``shardmove.run(...)`` with the same objects.  On the in-process runner
  (the default) the workers use that very object, so it must be thread-safe
  and survive ``close()`` (reopening lazily); workers in other processes get a
  pickled copy, so there it must be picklable and hold configuration only.  A
  store whose state lives in the object sets ``in_process_only = True`` and
  the preflight refuses such runners;
* register a factory under the entry-point group ``shardmove.stores``
  (:data:`ENTRY_POINT_GROUP`): ``kind: <entry-point name>`` then works in YAML,
  from the command line and on every runner where the distribution is
  installed.  The factory has ``map_store(spec, key_type)`` and/or
  ``data_store(spec, key_type)`` (:class:`StoreFactory`); ``spec`` is the
  configuration section.

:class:`MemoryMapStore` and :class:`MemoryDataStore` (``kind: memory``) are
in-memory stores for experiments and examples: NOT durable.  Check a store
with the contract kit, :mod:`shardmove.testing`.
"""
from __future__ import annotations

from pipeline.errors import PermanentError, SourceMissing, StoreError, TransientError
from pipeline.stores.base import (
    SNAPSHOT_SCHEMA,
    CopyOutcome,
    DataStore,
    KeyNameLimits,
    MapSnapshot,
    MapStore,
    RunRegistry,
    ShardInventory,
    SnapshotStats,
    SwapItem,
    SwapResult,
    WriteFencing,
    check_cutoff,
    content_hash,
)
from pipeline.stores.memory import MemoryDataStore, MemoryMapStore
from pipeline.stores.registry import ENTRY_POINT_GROUP, StoreFactory, known_kinds

__all__ = [
    "MapStore", "MapSnapshot", "DataStore", "RunRegistry", "WriteFencing", "KeyNameLimits", "ShardInventory",
    "CopyOutcome", "SwapItem", "SwapResult", "SnapshotStats", "SNAPSHOT_SCHEMA", "content_hash", "check_cutoff",
    "StoreError", "PermanentError", "TransientError", "SourceMissing",
    "MemoryMapStore", "MemoryDataStore", "ENTRY_POINT_GROUP", "StoreFactory", "known_kinds",
]
