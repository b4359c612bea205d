"""A deterministic demo keyspace in the embedded SQLite stores.

``create_demo`` writes ``<directory>/map.sqlite`` (the shard map) and
``<directory>/shards/<safe_name(shard)>.sqlite`` (one data file per shard).
Everything is a pure function of ``(keys, shards, key_type, assign, seed)``:
two demos with the same inputs hold the same rows.

Keys per key type (N = ``keys``):

* ``string``: ``user-000001`` ... (zero-padded to at least 6 digits);
* ``int64``:  i * 0x9E3779B97F4A7C15 (mod 2**64, as signed), i = 1..N (+ seed
  * 2**32) -- distinct, spread over the whole range, negatives included;
* ``uuid``:   seeded random version-4 UUIDs;
* ``bytes``:  seeded random 8..24 byte strings.

Values are seeded random bytes of 50..500 bytes.  Files are owner-only
(0600; directories this module creates 0700) because they hold key values.
The map file is written last, under a temporary name renamed into place, so
its presence means the demo is complete.

Never imports Beam.
"""
from __future__ import annotations

import os
from typing import Callable

import numpy as np

from pipeline.errors import BadInput
from pipeline.keys import KeyType
from pipeline.stores.sqlite import SqliteDataStore, SqliteMapStore

__all__ = ["create_demo", "demo_keys", "demo_values", "MAP_FILE", "SHARDS_DIR"]

MAP_FILE = "map.sqlite"
SHARDS_DIR = "shards"

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_ASSIGN_CHUNK = 100_000


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, stream])


def _distinct_random(n: int, make: Callable[[np.random.Generator, int], list[bytes]],
                     rng: np.random.Generator) -> list[bytes]:
    out: dict[bytes, None] = {}
    while len(out) < n:
        for k in make(rng, n - len(out)):
            out.setdefault(k, None)
    return list(out)


def _uuid_batch(rng: np.random.Generator, n: int) -> list[bytes]:
    a = np.frombuffer(rng.bytes(16 * n), dtype=np.uint8).reshape(n, 16).copy()
    a[:, 6] = (a[:, 6] & 0x0F) | 0x40  # version 4
    a[:, 8] = (a[:, 8] & 0x3F) | 0x80  # RFC 4122 variant
    raw = a.tobytes()
    return [raw[i:i + 16] for i in range(0, 16 * n, 16)]


def _bytes_batch(rng: np.random.Generator, n: int) -> list[bytes]:
    lengths = rng.integers(8, 25, size=n)
    blob = rng.bytes(int(lengths.sum()))
    ends = np.cumsum(lengths).tolist()
    starts = [0] + ends[:-1]
    return [blob[s:e] for s, e in zip(starts, ends)]


def demo_keys(n: int, key_type: KeyType, seed: int = 0) -> list[bytes]:
    """The demo's N canonical keys (deterministic per key type and seed)."""
    kt = KeyType(key_type)
    if n < 0:
        raise ValueError(f"keys must be >= 0, got {n!r}")
    if n == 0:
        return []
    if kt is KeyType.STRING:
        width = max(6, len(str(n)))
        return [f"user-{i:0{width}d}".encode() for i in range(1, n + 1)]
    if kt is KeyType.INT64:
        i = np.arange(1, n + 1, dtype=np.uint64) + np.uint64((int(seed) & 0xFFFFFFFF) << 32)
        with np.errstate(over="ignore"):
            v = (i * _GOLDEN).view(np.int64)  # odd multiplier: a bijection, so distinct
        raw = v.astype(">i8").tobytes()
        return [raw[j:j + 8] for j in range(0, 8 * n, 8)]
    if kt is KeyType.UUID:
        return _distinct_random(n, _uuid_batch, _rng(seed, 1))
    return _distinct_random(n, _bytes_batch, _rng(seed, 2))


def demo_values(n: int, seed: int = 0) -> list[bytes]:
    """N seeded payloads of 50..500 bytes."""
    rng = _rng(seed, 3)
    lengths = rng.integers(50, 501, size=n)
    blob = rng.bytes(int(lengths.sum()))
    ends = np.cumsum(lengths).tolist()
    starts = [0] + ends[:-1]
    return [blob[s:e] for s, e in zip(starts, ends)]


def create_demo(directory: str, *, keys: int, shards: list[str], key_type: KeyType,
                assign: Callable[[list[bytes]], list[str]], seed: int = 0) -> dict:
    """Create a demo keyspace in ``directory``; return its counts.

    ``assign`` maps a list of canonical keys to their shard ids (the caller
    passes a ring lookup); every id it returns must be in ``shards``.  Every
    shard in ``shards`` gets a data file, even an empty one.  Raises BadInput
    if ``directory`` already holds a complete demo (its map file); the data
    files of an incomplete one (no map file) are replaced.

    Returns ``{"keys", "shards", "per_shard": {shard: keys}, "bytes",
    "map_path", "shards_directory"}``.
    """
    kt = KeyType(key_type)
    if isinstance(keys, bool) or not isinstance(keys, int) or keys < 0:
        raise BadInput(f"demo keys: expected an integer >= 0, got {keys!r}")
    shard_list = list(dict.fromkeys(shards))
    if not shard_list:
        raise BadInput("demo shards: expected at least one shard id")
    directory = os.fspath(directory)
    map_path = os.path.join(directory, MAP_FILE)
    shards_dir = os.path.join(directory, SHARDS_DIR)
    if os.path.exists(map_path):
        raise BadInput(f"demo already exists: {map_path}")

    if not os.path.isdir(directory):
        os.makedirs(directory, mode=0o700, exist_ok=True)
        os.chmod(directory, 0o700)
    if os.path.isdir(shards_dir):  # leftovers of an interrupted demo
        for name in os.listdir(shards_dir):
            if ".sqlite" in name:
                os.unlink(os.path.join(shards_dir, name))
    else:
        os.makedirs(shards_dir, mode=0o700, exist_ok=True)
    os.chmod(shards_dir, 0o700)

    key_list = demo_keys(keys, kt, seed)
    values = demo_values(keys, seed)
    known = set(shard_list)
    owners: list[str] = []
    for i in range(0, len(key_list), _ASSIGN_CHUNK):
        chunk = key_list[i:i + _ASSIGN_CHUNK]
        got = list(assign(chunk))
        if len(got) != len(chunk):
            raise BadInput(f"demo assign: returned {len(got)} shard ids for {len(chunk)} keys")
        owners.extend(got)
    unknown = set(owners) - known
    if unknown:
        raise BadInput(f"demo assign: returned {len(unknown)} shard id(s) not in shards")

    by_shard: dict[str, list[int]] = {s: [] for s in shard_list}
    for i, s in enumerate(owners):
        by_shard[s].append(i)

    # Data first, map last: the map's presence marks a complete demo.
    data = SqliteDataStore(shards_dir, kt)
    try:
        for s in shard_list:
            data.ensure_shard(s)
            idx = by_shard[s]
            data.put_many(s, ((key_list[i], values[i]) for i in idx), chunk_size=50_000)
    finally:
        data.close()

    tmp_path = map_path + ".tmp"
    for suffix in ("", "-wal", "-shm", "-journal"):
        if os.path.exists(tmp_path + suffix):
            os.unlink(tmp_path + suffix)
    mstore = SqliteMapStore.create(tmp_path, kt)
    try:
        mstore.put_many(zip(key_list, owners), chunk_size=50_000)
        conn = mstore._conn(tmp_path)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        mstore.close()
    wal = tmp_path + "-wal"
    if os.path.exists(wal) and os.path.getsize(wal) > 0:
        raise RuntimeError("demo map: write-ahead log not checkpointed after close")
    for suffix in ("-wal", "-shm"):
        if os.path.exists(tmp_path + suffix):
            os.unlink(tmp_path + suffix)
    os.replace(tmp_path, map_path)

    return {
        "keys": len(key_list),
        "shards": len(shard_list),
        "per_shard": {s: len(by_shard[s]) for s in shard_list},
        "bytes": sum(len(v) for v in values),
        "map_path": map_path,
        "shards_directory": shards_dir,
    }
