"""validate: duplicates, unknown shards and the topology digest; drift against a plan.

Real SQLite stores throughout.  The one exception is the planted duplicate:
SQLite's ``PRIMARY KEY`` makes a duplicate key impossible in the map file,
so a thin fault-injecting wrapper re-emits rows of the real store's snapshot
(the kind of duplicate a non-unique store or a broken export produces).
"""
import json
import os
import sqlite3

import pyarrow as pa
import pytest

from shardmove import api
from shardmove import validation as V
from pipeline.config import load_config
from shardmove.planner import load_manifest
from pipeline.snapshot import take_snapshot
from pipeline.stores.sqlite import SqliteMapStore

from conftest import run_cli


def quiet(_line):
    pass


@pytest.fixture
def keyspace(tmp_path):
    info = api.create_demo_keyspace(str(tmp_path / "ks"), keys=1500, shards=4)
    return info["config"], load_config(info["config"])


class DuplicatingMapStore:
    """Fault injection: the real store, whose snapshot re-emits its first ``n`` rows at the end."""

    def __init__(self, inner, n):
        self.inner, self.n, self.key_type = inner, n, inner.key_type

    def snapshot(self, segment_size=20000):
        return _DupSnapshot(self.inner.snapshot(segment_size), self.n)

    def __getattr__(self, name):
        return getattr(self.inner, name)


class _DupSnapshot:
    def __init__(self, snap, n):
        self.snap, self.n, self.cutoff = snap, n, snap.cutoff

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.snap.close()

    def __iter__(self):
        first = None
        for b in self.snap:
            first = first if first is not None else b.slice(0, self.n)
            yield b
        if first is not None:
            yield first

    def stats(self):
        return self.snap.stats()

    def close(self):
        self.snap.close()


def test_validate_clean_map_digest_equals_snapshot_digest(keyspace, tmp_path):
    _path, cfg = keyspace
    store = SqliteMapStore(cfg.map_store["path"], cfg.key_type)
    rep = V.validate_topology(store, cfg.known_shards(), 400)
    snap = take_snapshot(store, str(tmp_path / "work"), 500, cfg.key_type)
    assert rep.digest == snap.digest
    assert rep.rows == 1500 and sum(rep.per_shard.values()) == 1500
    assert set(rep.per_shard) == {"s0", "s1", "s2", "s3"}
    assert (rep.duplicate_keys, rep.unknown_shard_rows, rep.invalid_keys) == (0, 0, 0)
    assert V.ValidationResult(rep).exit_code == 0


@pytest.mark.parametrize("memory_rows", [10_000_000, 100])  # in memory, and spilled to disk
def test_validate_finds_planted_duplicate(keyspace, memory_rows):
    _path, cfg = keyspace
    real = SqliteMapStore(cfg.map_store["path"], cfg.key_type)
    res = V.validate(cfg, map_store=DuplicatingMapStore(real, 3), memory_rows=memory_rows)
    t = res.topology
    assert (t.duplicate_keys, t.duplicate_rows, t.rows) == (3, 3, 1503)
    assert t.spilled == (memory_rows == 100)
    assert res.exit_code == 2 and res.verdict == "bad topology"
    assert "duplicate keys: 3 (extra rows: 3)" in V.format_lines(res)


def test_duplicates_confirmed_by_key_bytes_not_hash():
    t = pa.table({"h": pa.array([7, 7, 7, 9], pa.uint64()), "key": pa.array([b"a", b"b", b"a", b"c"])})
    assert V._duplicates_in(t) == (1, 1)  # b"a" twice; b"b" only shares a (forced) hash
    assert V._duplicates_in(t.slice(1, 3)) == (0, 0)


def test_validate_cli_unknown_shard_exit_2(keyspace):
    path, cfg = keyspace
    SqliteMapStore(cfg.map_store["path"], cfg.key_type).put_many([(b"planted-unknown", "s99")])
    r = run_cli("validate", "--config", path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "unknown shard rows: 1 on 1 ids (s99)" in r.stdout
    assert r.stderr.startswith("error: validate: bad topology") and "planted-unknown" not in r.stdout + r.stderr


def test_validate_refuses_a_map_that_holds_no_rows(keyspace):
    path, cfg = keyspace
    con = sqlite3.connect(cfg.map_store["path"])
    with con:
        con.execute("DELETE FROM shard_map")
    con.close()
    r = run_cli("validate", "--config", path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "map rows: 0 " in r.stdout
    assert r.stderr == (f"error: validate: sqlite file {cfg.map_store['path']} holds no rows "
                        "(is the map store's table, prefix or path the right one?)\n")
    r = run_cli("validate", "--config", path, "--json")
    assert r.returncode == 2 and json.loads(r.stdout)["topology"]["empty"] is True


def test_validate_compare_own_swaps_are_not_drift_but_planted_drift_is(keyspace):
    path, cfg = keyspace
    cfg = cfg.with_options(swap_batch_size=200, hash_buckets=2)
    res = api.plan(cfg, out=quiet)
    manifest = load_manifest(res.plan_dir)
    moves = manifest["moves"]
    clean = run_cli("validate", "--config", path, "--compare", res.plan_id)
    assert clean.returncode == 0, (clean.stdout, clean.stderr)
    assert f"topology digest: {manifest['snapshot']['digest']}" in clean.stdout
    assert f"plan keys: {moves} at_source={moves} at_target=0 elsewhere=0 missing=0" in clean.stdout
    assert "topology equals plan snapshot: yes" in clean.stdout and "drift: none" in clean.stdout

    # after the run every plan key sits at its target with a version above the cutoff: not drift
    assert api.run(cfg, res.plan_dir, out=quiet).exit_code == 0
    d = V.validate(cfg, compare_plan_dir=res.plan_dir).drift
    assert (d.at_target, d.at_source, d.elsewhere, d.missing) == (moves, 0, 0, 0)
    assert d.plan_keys_above_cutoff == d.swapped_by_plan == d.rows_above_cutoff == moves
    assert d.other_changed == 0 and not d.drift and d.digest_matches_snapshot is False

    # behind the plan's back: one plan key to a third shard (a real compare-and-set swap),
    # one deleted, and one new key created since the snapshot
    import pyarrow.parquet as pq

    f = next(f for f in manifest["files"] if f["rows"] >= 2)
    keys = pq.read_table(os.path.join(res.plan_dir, "moves", f["group"] + ".parquet"))["key"].to_pylist()
    third = next(s for s in ("s0", "s1", "s2", "s3") if s not in (f["source"], f["target"]))
    store = SqliteMapStore(cfg.map_store["path"], cfg.key_type)
    assert store.swap_batch([(keys[0], f["target"], third)]).committed
    con = sqlite3.connect(cfg.map_store["path"])
    con.execute("DELETE FROM shard_map WHERE key = ?", (keys[1].decode(),))
    con.commit()
    con.close()
    store.put_many([(b"created-after-snapshot", "s1")])

    r = run_cli("validate", "--config", path, "--compare", res.plan_dir, "--json")
    assert r.returncode == 4, (r.stdout, r.stderr)
    d = json.loads(r.stdout)["drift"]
    assert (d["elsewhere"], d["missing"], d["other_changed"], d["rewritten_at_source"]) == (1, 1, 1, 0)
    assert d["at_target"] == moves - 2 and d["at_source"] == 0 and d["drift"] is True
    assert d["swapped_by_plan"] == moves - 2 and d["plan_keys_above_cutoff"] == moves - 1
    assert r.stderr.startswith("error: validate: drift detected")
    for k in (keys[0], keys[1], b"created-after-snapshot"):
        assert k.decode() not in r.stdout + r.stderr


def test_validate_compare_unknown_plan_exit_2(keyspace):
    path, _cfg = keyspace
    r = run_cli("validate", "--config", path, "--compare", "0" * 64)
    assert r.returncode == 2 and "no committed plan" in r.stderr


@pytest.mark.parametrize("kind", ["postgres", "redis"])
def test_validate_works_through_the_map_store_protocol_on_other_stores(kind, tmp_path):
    """The same digest as a snapshot of the same store; a planted drift found by compare_plan."""
    import contextlib

    from services import dsn_for, fresh_database, fresh_prefix

    rows = [(f"k{i:05d}".encode(), f"s{i % 3}") for i in range(700)] + [(b"odd-one", "s9")]
    with contextlib.ExitStack() as stack:
        if kind == "postgres":
            from pipeline.stores.postgres import PostgresMapStore

            store = PostgresMapStore.create(dsn_for(stack.enter_context(fresh_database("val"))))
        else:
            from pipeline.stores.redis_store import RedisMapStore
            from services import require_redis

            store = RedisMapStore.create(require_redis(), prefix=stack.enter_context(fresh_prefix("val")))
        stack.callback(store.close)
        store.put_many(rows)
        rep = V.validate_topology(store, {"s0", "s1", "s2"}, 250)
        assert rep.digest == take_snapshot(store, str(tmp_path / "w"), 250, store.key_type).digest
        assert rep.per_shard == {"s0": 234, "s1": 233, "s2": 233, "s9": 1} and rep.unknown_shard_rows == 1
        cutoff = store.max_version()
        # a hand-made two-key plan: k00000 s0 -> s1 (then moved to s2 behind its back), k00003 s0 -> s1
        plan = tmp_path / "plan"
        (plan / "moves").mkdir(parents=True)
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"key": pa.array([b"k00000", b"k00003"], pa.binary())}),
                       str(plan / "moves" / "s0~s1~00000.parquet"))
        manifest = {"plan_id": "e" * 64, "moves": 2, "snapshot": {"digest": rep.digest, "cutoff": cutoff},
                    "files": [{"group": "s0~s1~00000", "source": "s0", "target": "s1", "rows": 2}]}
        assert not V.compare_plan(store, str(plan), manifest).drift
        assert store.swap_batch([(b"k00000", "s0", "s2")]).committed
        d = V.compare_plan(store, str(plan), manifest)
        assert (d.at_source, d.elsewhere, d.other_changed, d.drift) == (1, 1, 0, True)
