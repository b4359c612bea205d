"""Snapshot cutoff (issue 20 item 4): ``snapshot --cutoff V`` / ``plan --cutoff V`` export
the map at a caller-chosen version; above the current version they refuse (exit 2, one
line, nothing written); the cutoff reaches the digest and the plan id only through the
rows it selects.  CLI end to end on SQLite; ``snapshot(cutoff=)`` through the API on
PostgreSQL and Redis (their stores' cutoff is also in the store contract)."""
from __future__ import annotations

import os
import re

import pytest
import yaml
from hypothesis import given, settings, strategies as st

import shardmove
from pipeline.keys import KeyType
from pipeline.stores.sqlite import SqliteMapStore
from shardmove.testing import sample_keys

from conftest import run_cli
from services import dsn_for, fresh_database, fresh_prefix, require_redis

PLAN_RE = re.compile(r"^plan id: ([0-9a-f]{64})$", re.M)
DIGEST_RE = re.compile(r"^snapshot digest: ([0-9a-f]{64})$", re.M)
ROWS_RE = re.compile(r"^rows: (\d+) cutoff: (\d+) rows_above_cutoff: (\d+)$", re.M)


def _one_error_line(r) -> str:
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def _snapshots(cfg_path: str) -> list:
    d = os.path.join(os.path.dirname(cfg_path), "work", "snapshots")
    return sorted(n for n in os.listdir(d) if not n.startswith(".")) if os.path.isdir(d) else []


@pytest.fixture()
def keyspace(tmp_path):
    """A demo keyspace, then: one new key at v0+1, rewritten at v0+2 (no row keeps v0+1)."""
    r = run_cli("demo", str(tmp_path / "d"), "--keys", "400", "--shards", "3")
    assert r.returncode == 0, r.stderr
    cfg = str(tmp_path / "d" / "shardmove.yaml")
    store = SqliteMapStore(str(tmp_path / "d" / "keyspace" / "map.sqlite"), KeyType.STRING)
    v0 = store.max_version()
    store.put_many([(b"late-key", "s0")])
    store.put_many([(b"late-key", "s1")])
    assert store.max_version() == v0 + 2
    store.close()
    return cfg, v0


def test_snapshot_and_plan_at_a_cutoff_through_the_cli(keyspace):
    cfg, v0 = keyspace
    at = {}
    for cut in (v0, v0 + 1, v0 + 2, None):
        r = run_cli("snapshot", "--config", cfg, *(["--cutoff", str(cut)] if cut is not None else []))
        assert r.returncode == 0, r.stderr
        rows, cutoff, above = map(int, ROWS_RE.search(r.stdout).groups())
        at[cut] = (DIGEST_RE.search(r.stdout).group(1), rows, above)
        assert cutoff == (v0 + 2 if cut is None else cut)
    assert at[v0][1:] == at[v0 + 1][1:] == (400, 1) and at[v0 + 2][1:] == (401, 0)
    # the cutoff enters the digest only through the rows it selects
    assert at[v0][0] == at[v0 + 1][0] != at[v0 + 2][0] == at[None][0]
    assert _snapshots(cfg) == sorted({at[v0][0], at[None][0]})

    ids = {}
    for cut in (v0, v0 + 1, v0 + 2):
        r = run_cli("plan", "--config", cfg, "--cutoff", str(cut))
        assert r.returncode == 0, r.stderr
        ids[cut] = PLAN_RE.findall(r.stdout)[0]
        assert f"cutoff={cut} " in r.stdout
    assert ids[v0] == ids[v0 + 1] != ids[v0 + 2]
    plain = run_cli("plan", "--config", cfg, "--dry-run")
    assert PLAN_RE.findall(plain.stdout) == [ids[v0 + 2]]
    # a plan at an older cutoff runs: the row written after it is not in it (nor drift)
    r = run_cli("run", ids[v0], "--config", cfg)
    assert r.returncode == 0, r.stderr
    m = re.search(r"^summary: planned=(\d+) done=(\d+) failed=0$", r.stdout, re.M)
    assert m and m.group(1) == m.group(2)


def test_a_cutoff_above_the_current_version_is_refused_and_writes_nothing(keyspace):
    cfg, v0 = keyspace
    for cmd in (("snapshot",), ("plan",), ("plan", "--dry-run")):
        r = run_cli(*cmd, "--config", cfg, "--cutoff", str(v0 + 3))
        line = _one_error_line(r)
        assert line == f"error: snapshot cutoff {v0 + 3} is above the map store's current version {v0 + 2}", line
        assert _snapshots(cfg) == []
    line = _one_error_line(run_cli("snapshot", "--config", cfg, "--cutoff", "-1"))
    assert "snapshot cutoff: expected a version (an integer >= 0), got -1" in line
    _one_error_line(run_cli("snapshot", "--config", cfg, "--cutoff", "soon"))  # argparse: not an integer
    r = run_cli("plan", "--config", cfg, "--cutoff", str(v0), "--snapshot", cfg)
    assert "a cutoff applies to a snapshot of the map store" in _one_error_line(r)
    plans = os.path.join(os.path.dirname(cfg), "work", "plans")
    assert not os.path.isdir(plans) or not [n for n in os.listdir(plans) if not n.startswith(".")]


def _config(tmp_path, map_store: dict):
    doc = {"work_dir": str(tmp_path / "work"), "map_store": map_store, "current_shards": ["a", "b"],
           "target": {"profile": "native", "shards": [{"id": s} for s in ("a", "b", "c")]}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(doc))
    return shardmove.load_config(str(path))


def _fill(store) -> int:
    keys = sample_keys(60)
    store.put_many([(k, "a") for k in keys[:50]])
    v0 = store.max_version()
    store.put_many([(k, "b") for k in keys[50:]])
    store.put_many([(k, "a") for k in keys[50:]])  # rewritten: no row keeps v0 + 1
    return v0


def _check_api(cfg, store, v0: int) -> None:
    top = store.max_version()
    assert top == v0 + 2
    a, b = shardmove.snapshot(cfg, cutoff=v0), shardmove.snapshot(cfg, cutoff=v0 + 1)
    assert (a.rows, a.cutoff, a.rows_above_cutoff) == (50, v0, 10) and (b.rows, b.cutoff) == (50, v0 + 1)
    assert a.digest == b.digest and not b.created
    now = shardmove.snapshot(cfg)
    assert now.rows == 60 and now.cutoff == top and now.digest != a.digest
    with pytest.raises(shardmove.BadInput, match=rf"^snapshot cutoff {top + 1} is above the map store's current "
                                                 rf"version {top}$"):
        shardmove.snapshot(cfg, cutoff=top + 1)
    p0 = shardmove.plan(cfg, cutoff=v0, dry_run=True)
    assert p0.id == shardmove.plan(cfg, cutoff=v0 + 1, dry_run=True).id != shardmove.plan(cfg, dry_run=True).id
    assert p0.keys_examined == 50


def test_snapshot_cutoff_on_postgres(tmp_path):
    from pipeline.stores.postgres import PostgresMapStore

    with fresh_database("cutoff") as db:
        store = PostgresMapStore.create(dsn_for(db), KeyType.STRING)
        try:
            v0 = _fill(store)
            _check_api(_config(tmp_path, {"kind": "postgres", "dsn": dsn_for(db)}), store, v0)
        finally:
            store.close()


def test_snapshot_cutoff_on_redis(tmp_path):
    from pipeline.stores.redis_store import RedisMapStore

    with fresh_prefix("cutoff") as prefix:
        store = RedisMapStore.create(require_redis(), KeyType.STRING, prefix=prefix)
        try:
            v0 = _fill(store)
            _check_api(_config(tmp_path, {"kind": "redis", "url": require_redis(), "prefix": prefix}), store, v0)
        finally:
            store.close()


_ops = st.lists(st.tuples(st.sampled_from(["put", "swap"]), st.lists(st.integers(0, 30), min_size=1, max_size=8),
                          st.sampled_from(["a", "b", "c"])), min_size=1, max_size=12)


@settings(max_examples=25, deadline=None)
@given(_ops)
def test_every_cutoff_selects_the_rows_at_or_below_it_in_sqlite_and_memory(ops):
    """Property: whatever the history of writes and swaps, a snapshot at cutoff V holds exactly
    the rows whose version is <= V -- the same rows in the SQLite map and the memory map."""
    import tempfile
    import uuid

    from pipeline.stores.memory import MemoryMapStore

    with tempfile.TemporaryDirectory() as d:
        stores = [SqliteMapStore.create(os.path.join(d, "m.sqlite")), MemoryMapStore(uuid.uuid4().hex)]
        for op, ids, shard in ops:
            keys = sorted({f"k{i}".encode() for i in ids})
            for s in stores:
                if op == "put":
                    s.put_many([(k, shard) for k in keys])
                else:
                    cur = s.lookup(keys)
                    s.swap_batch([(k, cur[k][0], shard) for k in keys if k in cur and cur[k][0] != shard])
        tops = {s.max_version() for s in stores}
        assert len(tops) == 1
        for cut in range(tops.pop() + 1):
            seen = []
            for s in stores:
                rows, stats, _ = _at(s, cut)
                everything = s.lookup([f"k{i}".encode() for i in range(31)])
                assert sorted(rows) == sorted((k, sh, v) for k, (sh, v) in everything.items() if v <= cut)
                assert stats.rows_above_cutoff == sum(1 for _, v in everything.values() if v > cut)
                seen.append(sorted(rows))
            assert seen[0] == seen[1]
        stores[0].close()


def _at(store, cutoff: int):
    with store.snapshot(7, cutoff=cutoff) as snap:
        batches = list(snap)
        stats = snap.stats()
    return [r for b in batches for r in zip(*(c.to_pylist() for c in b.columns))], stats, batches
