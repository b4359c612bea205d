"""Behaviour of the Redis map store that is its own (the store contract is test_store_contract.py),
against a real server.

Every test gets a unique key prefix (tests/services.py) whose keys are deleted
afterwards; other clients play the applications.  Unreachable server:
skipped with the reason (failed when CI=true).
"""
from __future__ import annotations

import os
import pickle
import sqlite3
import threading
import time
import uuid

import pytest
import redis
import yaml

from pipeline import errors
from shardmove import api
from pipeline import states as S
from pipeline.stores import map_store_from_spec
from pipeline.config import load_config
from shardmove.demo import demo_keys
from pipeline.keys import KeyType
from shardmove.planner import load_manifest
from pipeline.stores.base import SNAPSHOT_SCHEMA, MapStore
from pipeline.stores.redis_store import RedisMapSnapshot, RedisMapStore
from pipeline.stores.sqlite import SqliteDataStore, SqliteMapStore

from services import (assert_no_secret, fresh_prefix, plan_moves, redis_url_as, require_redis,
                      run_killed_then_resumed)

SECRET = "sekret-pw-123"


@pytest.fixture
def prefix():
    with fresh_prefix("redis") as p:
        yield p


# ------------------------------------------------------------------ helpers


def client() -> redis.Redis:
    return redis.Redis.from_url(require_redis())


def make_map(prefix, kt=KeyType.STRING, rows=None, **kw) -> RedisMapStore:
    store = RedisMapStore.create(require_redis(), kt, prefix=prefix, **kw)
    if rows:
        store.put_many(rows)
    return store


def snapshot_rows(snap_or_store, segment_size=1000):
    snap = snap_or_store if isinstance(snap_or_store, RedisMapSnapshot) else snap_or_store.snapshot(segment_size)
    with snap:
        batches = list(snap)
        stats = snap.stats()
    rows = []
    for b in batches:
        assert b.schema == SNAPSHOT_SCHEMA
        assert b.num_rows <= snap.segment_size
        rows += list(zip(b.column(0).to_pylist(), b.column(1).to_pylist(), b.column(2).to_pylist()))
    return rows, stats, batches


# ------------------------------------------------------------------ protocols


def test_redis_store_implements_the_protocol_pickles_and_redacts(prefix):
    store = make_map(prefix, KeyType.INT64)
    assert isinstance(store, MapStore) and not store.supports_fence(object())
    store.lookup([(1).to_bytes(8, "big")])  # opens a connection
    again = pickle.loads(pickle.dumps(store))
    assert (again.url, again.prefix, again.key_type) == (store.url, prefix, KeyType.INT64)
    secret = RedisMapStore(f"redis://app:{SECRET}@127.0.0.1:6379/0", prefix=prefix)
    assert SECRET not in repr(secret) and "app:***@" in repr(secret)
    spec = map_store_from_spec({"kind": "redis", "url": "redis://127.0.0.1:6379/2", "prefix": "{sm}"}, KeyType.UUID)
    assert (spec.shard_key, spec.version_key, spec.clock_key) == ("{sm}:shard", "{sm}:version", "{sm}:clock")
    with pytest.raises(errors.BadInput, match=r"map_store.url: expected redis://") as e:
        map_store_from_spec({"kind": "redis", "url": f"http://u:{SECRET}@h"}, KeyType.STRING)
    assert SECRET not in str(e.value)
    with pytest.raises(errors.BadInput, match=r"map_store: unknown field dsn"):
        map_store_from_spec({"kind": "redis", "dsn": "x"}, KeyType.STRING)
    with pytest.raises(errors.BadInput, match=r"map_store.prefix"):
        map_store_from_spec({"kind": "redis", "prefix": "a b"}, KeyType.STRING)


def test_errors_are_classified_and_redacted(prefix):
    require_redis()
    gone = RedisMapStore(f"redis://app:{SECRET}@127.0.0.1:1/0", prefix=prefix, connect_timeout=1)
    with pytest.raises(errors.TransientError, match=r"map store .*: lookup") as e:
        gone.lookup([b"k"])
    assert SECRET not in str(e.value) and e.value.reason == "connection"
    wrong = RedisMapStore(redis_url_as(f"nobody-{uuid.uuid4().hex[:6]}", SECRET), prefix=prefix)
    with pytest.raises(errors.PermanentError) as e:
        wrong.max_version()
    assert e.value.reason == "cannot_connect" and SECRET not in str(e.value)
    store = make_map(prefix)
    client().set(store.shard_key, "not a hash")
    with pytest.raises(errors.PermanentError, match="holds a string, expected a hash") as e:
        store.ensure_schema()
    with pytest.raises(errors.PermanentError, match="WRONGTYPE") as e:
        store.swap_batch([(b"k", "a", "b")])
    assert e.value.reason == "schema"


# ------------------------------------------------------------------- snapshot


def test_rows_written_after_the_cutoff_are_not_exported_but_counted(prefix):
    keys = demo_keys(1000, KeyType.STRING)  # a hashtable-encoded hash (over 512 fields): HSCAN pages
    store = make_map(prefix, rows=[(k, "a") for k in keys])
    other = RedisMapStore(store.url, prefix=prefix)  # another client: the applications
    with _Recording(store, 20) as snap:
        it = iter(snap)
        first = next(it)
        moved = [k for k in keys if k not in snap.read][:2]  # not read from Redis yet
        other.put_many([(f"new-{i}".encode(), "b") for i in range(5)])
        assert other.swap_batch([(k, "a", "b") for k in moved]).committed
        rest = list(it)
        stats = snap.stats()
    exported = [r for b in [first] + rest for r in zip(*(c.to_pylist() for c in b.columns))]
    assert all(s == "a" and v <= snap.cutoff for _, s, v in exported)  # the map as it was at the cutoff
    assert sorted(k for k, _, _ in exported) == sorted(set(keys) - set(moved))  # changed rows left out
    assert len(moved) == 2 and stats.rows == 998 and stats.rows_above_cutoff == 7 == store.count_above(snap.cutoff)


class _Recording(RedisMapSnapshot):
    """Remembers every field HSCAN returned so far."""

    def _page(self, cursor):
        nxt, fields, shards = super()._page(cursor)
        self.read = getattr(self, "read", set()) | set(fields)
        return nxt, fields, shards


class _Rescan(RedisMapSnapshot):
    """Replays the scan from cursor 0 once, after the second page: the server then
    returns fields it returned before (what HSCAN does when the hash is resized)."""

    replayed = False

    def _page(self, cursor):
        if cursor != 0 and not self.replayed and self._calls == 2:
            self.replayed = True
            cursor = 0
        self._calls += 1
        return super()._page(cursor)

    _calls = 0


def test_hscan_duplicates_are_exported_once(prefix):
    keys = demo_keys(2000, KeyType.STRING)
    store = make_map(prefix, rows=[(k, f"s{i % 4}") for i, k in enumerate(keys)])
    rows, stats, _ = snapshot_rows(_Rescan(store, 100))
    assert sorted(k for k, _, _ in rows) == sorted(keys)  # each key exactly once
    snap = _Rescan(store, 100)
    rows, stats, _ = snapshot_rows(snap)
    assert snap.duplicates >= 100 and stats.rows == 2000 and stats.invalid_keys == 0

    # and a real scan while the applications add keys (the hash grows and rehashes)
    other = RedisMapStore(store.url, prefix=prefix)
    with store.snapshot(50) as snap:
        exported = []
        for i, batch in enumerate(snap):
            exported += batch.column(0).to_pylist()
            if i < 5:
                other.put_many([(f"grow-{i}-{j}".encode(), "s9") for j in range(2000)])
        stats = snap.stats()
    assert sorted(exported) == sorted(keys) and len(exported) == len(set(exported))
    assert stats.rows_above_cutoff == 10000


def test_snapshot_skips_and_counts_rows_the_key_type_cannot_represent(prefix):
    good = demo_keys(20, KeyType.INT64)
    store = make_map(prefix, KeyType.INT64, rows=[(k, "s1") for k in good])
    c = client()
    bad = ["007", "-0", "+5", "abc", "99999999999999999999", ""]
    for t in bad:
        c.hset(store.shard_key, t, "s1")
        c.hset(store.version_key, t, 1)
    c.hset(store.shard_key, "42", "s1")  # no version
    c.hset(store.shard_key, "43", "s1")
    c.hset(store.version_key, "43", "one")  # not an integer
    rows, stats, _ = snapshot_rows(store, 4)
    assert sorted(k for k, _, _ in rows) == sorted(good)
    assert stats.rows == 20 and stats.invalid_keys == len(bad) + 2


# ----------------------------------------------------------------------- swap


def test_a_fence_is_refused(prefix):
    """The swap contract (apply, rerun, conflict) is in test_store_contract.py."""
    store = make_map(prefix, rows=[(b"k", "a")])
    with pytest.raises(TypeError, match="cannot fence"):
        store.swap_batch([(b"k", "a", "b", 1)], fence=object())


def test_swaps_from_many_threads_stay_consistent(prefix):
    keys = demo_keys(400, KeyType.STRING)
    store = make_map(prefix, rows=[(k, "a") for k in keys])
    results = []

    def work(part):  # every key is attempted twice, by two threads
        for i in range(0, len(part), 20):
            results.append(store.swap_batch([(k, "a", "b") for k in part[i:i + 20]]))

    threads = [threading.Thread(target=work, args=(keys[i % 4::4] if i < 4 else keys[(i - 4)::4],))
               for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.committed for r in results)
    assert sum(len(r.applied) for r in results) == 400 and sum(len(r.already) for r in results) == 400
    versions = [r.version for r in results if r.applied]
    assert len(set(versions)) == len(versions)  # one new version per applied batch
    assert all(s == "b" for s, _ in store.lookup(keys).values())


# ------------------------------------------------------------- run registry


# ------------------------------------------------------ through the executor


def _demo_with_redis_map(tmp_path, prefix, keys, url=None, **options):
    """The SQLite demo keyspace, its map loaded into Redis: Redis map + SQLite shards."""
    info = api.create_demo_keyspace(str(tmp_path / "ks"), keys=keys, shards=4)
    with open(info["config"]) as f:
        raw = yaml.safe_load(f)
    base = os.path.dirname(info["config"])
    sqlite_map = SqliteMapStore(os.path.join(base, raw["map_store"]["path"]))
    store = RedisMapStore.create(require_redis(), prefix=prefix)
    with sqlite_map.snapshot(5000) as snap:
        for batch in snap:
            store.put_many(zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()))
    raw["map_store"] = {"kind": "redis", "url": url or require_redis(), "prefix": prefix}
    raw["data_store"]["directory"] = os.path.join(base, raw["data_store"]["directory"])
    raw["work_dir"] = os.path.join(base, raw["work_dir"])
    raw.update({"hash_buckets": 2, "retry_base_delay": "1ms", "checkpoint_flush_interval": "50ms",
                "copy_concurrency": 3, "verify_concurrency": 3})
    raw.update(options)
    data = SqliteDataStore(raw["data_store"]["directory"])
    originals = {}
    for s in raw["current_shards"]:
        con = sqlite3.connect(data.shard_path(s))
        originals.update({k: (s, v) for k, v in con.execute("SELECT key, value FROM records")})
        con.close()
    return raw, store, originals


def _assert_as_planned(raw, store, moves, originals, failed=()):
    data = SqliteDataStore(raw["data_store"]["directory"])
    current = {k.decode(): (s, v) for k, (s, v) in store.lookup([k.encode() for k in originals]).items()}
    moved = {}
    for key, src, tgt in moves:
        t = key.decode()
        moved[t] = tgt
        if key in failed:
            continue
        assert current[t][0] == tgt
        assert data.read([key], tgt)[key][0] == originals[t][1]  # the record, byte for byte
    for t, (s, _v) in originals.items():
        if t not in moved:
            assert current[t] == (s, 1)  # untouched: still its first version


def test_executor_cas_conflict_fails_only_that_key(tmp_path, prefix):
    raw, store, originals = _demo_with_redis_map(tmp_path, prefix, 400, swap_batch_size=500,
                                                 faults={"swap": {"latency_ms": 400}})
    cfg = load_config(None, raw=raw)
    res = api.plan(cfg, out=lambda _l: None)
    m = load_manifest(res.plan_dir)
    moves = plan_moves(res.plan_dir, m)
    key, src, tgt = moves[len(moves) // 2]
    other = next(s for s in raw["current_shards"] if s not in (src, tgt))
    target_file = SqliteDataStore(raw["data_store"]["directory"]).shard_path(tgt)
    moved_behind = []

    def application():  # when the copy lands on the target, move the key elsewhere
        app = RedisMapStore(store.url, prefix=prefix)
        deadline = time.time() + 120
        while time.time() < deadline:
            if os.path.exists(target_file):
                con = sqlite3.connect(target_file)
                try:
                    hit = con.execute("SELECT 1 FROM records WHERE key = ?", (key.decode(),)).fetchone()
                except sqlite3.Error:
                    hit = None
                con.close()
                if hit:
                    moved_behind.append(app.swap_batch([(key, src, other)]).committed)
                    return
            time.sleep(0.002)

    t = threading.Thread(target=application)
    t.start()
    run = api.run(cfg, res.plan_dir, out=lambda _l: None)
    t.join()
    assert moved_behind == [True], "the application did not move the key before the executor's swap"
    assert run.exit_code == 3
    assert (run.summary["failed"], run.summary["done"]) == (1, m["moves"] - 1)
    assert run.summary["failures_by_reason"] == {S.MAP_CHANGED: 1}
    assert store.lookup([key])[key][0] == other
    _assert_as_planned(raw, store, moves, originals, failed={key})


def test_cli_kill_and_resume_redis_map_sqlite_shards(tmp_path, prefix):
    """The whole migration through the CLI, killed mid-run, on a Redis map (reached
    with a password that must never be echoed) and SQLite shards."""
    c = client()
    user = f"smtest-{uuid.uuid4().hex[:8]}"
    c.acl_setuser(user, enabled=True, passwords=[f"+{SECRET}"], keys=["*"], commands=["+@all"])
    try:
        url = redis_url_as(user, SECRET)
        faults = {"copy": {"latency_ms": 10, "keys_per_call": 1}, "swap": {"latency_ms": 60}}
        raw, store, originals = _demo_with_redis_map(tmp_path, prefix, 1500, url=url, faults=faults,
                                                     swap_batch_size=25, checkpoint_flush_interval="20ms",
                                                     copy_concurrency=2)
        plan_dir, m, outs = run_killed_then_resumed(tmp_path, raw)
        assert m["moves"] > 150
        _assert_as_planned(raw, store, plan_moves(plan_dir, m), originals)
        assert_no_secret(outs, raw["work_dir"], SECRET)
    finally:
        c.acl_deluser(user)
