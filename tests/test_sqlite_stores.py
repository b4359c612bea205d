"""Behaviour of the embedded SQLite map and data stores that is theirs alone, and of the demo keyspace.

What every map and data store must do is the store contract (test_store_contract.py).

Real SQLite files in tmp_path; other connections play the applications.
"""
from __future__ import annotations

import os
import pickle
import sqlite3
import stat
import threading

import pytest
import xxhash

from pipeline import errors
from shardmove.demo import create_demo, demo_keys
from pipeline.keys import KeyType, stable_hash
from pipeline.stores import (
    SNAPSHOT_SCHEMA,
    SqliteDataStore,
    SqliteMapStore,
    SwapItem,
    content_hash,
    data_store_from_spec,
    map_store_from_spec,
)

ALL_TYPES = [KeyType.STRING, KeyType.INT64, KeyType.UUID, KeyType.BYTES]


# ------------------------------------------------------------------ helpers


def make_map(tmp_path, kt=KeyType.STRING, rows=None, **kw) -> SqliteMapStore:
    store = SqliteMapStore.create(str(tmp_path / "map.sqlite"), kt, **kw)
    if rows:
        store.put_many(rows)
    return store


def table(path, sql="SELECT key, shard_id, version FROM shard_map ORDER BY key"):
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def snapshot_rows(store, segment_size=1000):
    with store.snapshot(segment_size) as snap:
        batches = list(snap)
        stats = snap.stats()
    rows = []
    for b in batches:
        assert b.schema == SNAPSHOT_SCHEMA
        assert b.num_rows <= segment_size
        rows += list(zip(b.column(0).to_pylist(), b.column(1).to_pylist(), b.column(2).to_pylist()))
    return rows, stats, batches


def values_for(keys, size=200):
    return [bytes([i % 251]) * (size - 8) + i.to_bytes(8, "big") for i in range(len(keys))]


def hold_write_lock(path):
    """Another 'application' connection holding the file's write lock."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    return conn


# ------------------------------------------------------------------ protocols


def test_content_hash_is_xxh3_128_of_the_value():
    assert content_hash(b"abc") == xxhash.xxh3_128_digest(b"abc")
    assert len(content_hash(b"")) == 16


def test_stores_pickle_as_configuration(tmp_path):
    m = make_map(tmp_path, KeyType.INT64, busy_timeout=0.5)
    d = SqliteDataStore(str(tmp_path / "d"), KeyType.UUID, synchronous="NORMAL")
    m.lookup([(1).to_bytes(8, "big")])  # opens a connection
    m2, d2 = pickle.loads(pickle.dumps(m)), pickle.loads(pickle.dumps(d))
    assert (m2.path, m2.key_type, m2.busy_timeout) == (m.path, KeyType.INT64, 0.5)
    assert (d2.directory, d2.key_type, d2.synchronous) == (d.directory, KeyType.UUID, "NORMAL")


def test_open_from_config_sections(tmp_path):
    spec = {"kind": "sqlite", "path": str(tmp_path / "m.sqlite"), "busy_timeout": 2, "synchronous": "full"}
    m = map_store_from_spec(spec, KeyType.STRING, must_exist=False)
    assert isinstance(m, SqliteMapStore) and (m.busy_timeout, m.synchronous) == (2.0, "FULL")
    assert data_store_from_spec({"kind": "none"}, KeyType.STRING) is None
    d = data_store_from_spec({"kind": "sqlite", "directory": str(tmp_path), "busy_timeout": 1}, KeyType.BYTES)
    assert isinstance(d, SqliteDataStore) and d.busy_timeout == 1.0
    with pytest.raises(errors.BadInput, match="map_store.kind: unknown kind 'cassandra'"):
        map_store_from_spec({"kind": "cassandra"}, KeyType.STRING)
    with pytest.raises(errors.BadInput, match="data_store.busy_timeout"):
        data_store_from_spec({"kind": "sqlite", "directory": str(tmp_path), "busy_timeout": -1}, KeyType.STRING)


# ------------------------------------------------------------------- snapshot


INVALID_TEXT = {
    # key type: stored texts that are not the canonical text form of any key
    KeyType.STRING: [],
    KeyType.INT64: ["007", "-0", "+5", " 5", "abc", "99999999999999999999", "1.5", ""],
    KeyType.UUID: ["1B4E28BA-2FA1-11D2-883F-0016D3CCA427", "1b4e28ba2fa111d2883f0016d3cca427", "nope", ""],
    KeyType.BYTES: ["ABCD", "abc", "zz", "00 11"],
}


@pytest.mark.parametrize("kt", ALL_TYPES)
def test_snapshot_skips_and_counts_keys_the_key_type_cannot_represent(tmp_path, kt):
    good = demo_keys(20, kt)
    store = make_map(tmp_path, kt, rows=[(k, "s1") for k in good])
    conn = sqlite3.connect(store.path, isolation_level=None)
    bad = list(INVALID_TEXT[kt])
    for t in bad:
        conn.execute("INSERT INTO shard_map VALUES (?, 's1', 1)", (t,))
    conn.execute("INSERT INTO shard_map VALUES (CAST(x'c328ff' AS TEXT), 's1', 1)")  # invalid UTF-8
    conn.execute("INSERT INTO shard_map VALUES (x'0102', 's1', 1)")  # a BLOB, not TEXT
    conn.execute("INSERT INTO shard_map VALUES (NULL, 's1', 1)")
    conn.execute("INSERT INTO shard_map VALUES ('zz-bad-shard', CAST(x'ff' AS TEXT), 1)")  # shard id not UTF-8
    conn.close()
    rows, stats, _ = snapshot_rows(store, 4)
    assert sorted(k for k, _, _ in rows) == sorted(good)
    assert stats.rows == 20
    assert stats.invalid_keys == len(bad) + 4


# --------------------------------------------------------------------- lookup


def test_a_missing_map_file_is_reported_not_created(tmp_path):
    store = SqliteMapStore(str(tmp_path / "absent.sqlite"))
    with pytest.raises(errors.PermanentError, match="map store file not found") as e:
        store.lookup([b"k"])
    assert e.value.reason == "map_missing"
    assert not (tmp_path / "absent.sqlite").exists()


# ----------------------------------------------------------------------- swap


def _swap_setup(tmp_path):
    keys = demo_keys(10, KeyType.STRING)
    store = make_map(tmp_path, rows=[(k, "a") for k in keys])
    return store, keys


def test_swap_of_a_locked_map_is_transient(tmp_path):
    store, keys = _swap_setup(tmp_path)
    quick = SqliteMapStore(store.path, busy_timeout=0.05)
    blocker = hold_write_lock(store.path)
    try:
        with pytest.raises(errors.TransientError, match=r"map store .*: swap: database is locked") as e:
            quick.swap_batch([(keys[0], "a", "b")])
        assert e.value.reason == "busy"
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert quick.swap_batch([(keys[0], "a", "b")]).applied == (0,)


# ----------------------------------------------------------------------- copy


def _data(tmp_path, kt=KeyType.STRING, **kw) -> SqliteDataStore:
    return SqliteDataStore(str(tmp_path / "shards"), kt, **kw)


def test_copy_from_a_missing_shard_file_is_permanent_and_creates_nothing(tmp_path):
    data = _data(tmp_path)
    with pytest.raises(errors.PermanentError, match=r"source shard file not found \(gone\)") as e:
        data.copy([b"k1"], "gone", "dst")
    assert e.value.reason == "shard_missing"
    assert not data.shard_exists("gone") and not data.shard_exists("dst")
    with pytest.raises(ValueError, match="same shard"):
        data.copy([b"k1"], "a", "a")
    assert data.copy([], "a", "b") == []


def test_copy_into_a_locked_target_is_transient_for_the_whole_batch(tmp_path):
    data = _data(tmp_path, busy_timeout=0.05)
    keys = demo_keys(5, KeyType.STRING)
    data.put_many("src", [(k, b"x" * 80) for k in keys])
    data.ensure_shard("dst")
    blocker = hold_write_lock(data.shard_path("dst"))
    try:
        with pytest.raises(errors.TransientError, match="copy write: database is locked"):
            data.copy(keys, "src", "dst")
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert data.count("dst") == 0
    assert all(o.ok for o in data.copy(keys, "src", "dst"))


def test_concurrent_copies_into_one_target_queue_instead_of_failing(tmp_path):
    data = _data(tmp_path, busy_timeout=10)
    keys = demo_keys(4000, KeyType.STRING)
    data.put_many("src", zip(keys, values_for(keys)))
    failures = []

    def work(part):
        try:
            for i in range(0, len(part), 100):
                assert all(o.ok for o in data.copy(part[i:i + 100], "src", "dst"))
        except Exception as e:  # collected for the assertion below
            failures.append(e)

    threads = [threading.Thread(target=work, args=(keys[i::8],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert data.count("dst") == 4000
    data.close()


# --------------------------------------------------------- other data methods


def test_shard_ids_are_escaped_in_file_names(tmp_path):
    """Round trips of every key type are in the store contract (test_store_contract.py)."""
    data = _data(tmp_path)
    keys = demo_keys(5, KeyType.STRING)
    data.put_many("s1", zip(keys, values_for(keys, 120)))
    assert all(o.ok for o in data.copy(keys, "s1", "s 2/ü"))
    assert os.path.basename(data.shard_path("s 2/ü")) == "s%202%2F%C3%BC.sqlite"
    assert data.hashes(keys, "s 2/ü") == data.hashes(keys, "s1")


def test_put_many_stamps_versions_above_everything_in_the_file(tmp_path):
    data = _data(tmp_path)
    data.put_many("s", [(b"a", b"1"), (b"b", b"2")])
    v = data.read([b"a", b"b"], "s")
    data.put_many("s", [(b"a", b"3")])
    assert data.read([b"a"], "s")[b"a"] == (b"3", max(x for _, x in v.values()) + 1)


# ---------------------------------------------------------------------- fence


def test_fenced_swap_applies_when_sources_are_unchanged(tmp_path):
    data = _data(tmp_path)
    keys = demo_keys(20, KeyType.STRING)
    data.put_many("a", zip(keys, values_for(keys)))
    store = make_map(tmp_path, rows=[(k, "a") for k in keys])
    out = data.copy(keys, "a", "b")
    assert store.supports_fence(data) and not store.supports_fence(object())
    res = store.swap_batch([SwapItem(o.key, "a", "b", o.source_version) for o in out], fence=data)
    assert res.committed and len(res.applied) == 20
    assert "fence0" not in [r[1] for r in sqlite3.connect(store.path).execute("PRAGMA database_list")]


def _two_sources(tmp_path, n: int, split: int):
    """(data store, keys, map): keys[:split] on shard "a", the rest on shard "c", in both."""
    data = _data(tmp_path)
    keys = demo_keys(n, KeyType.STRING)
    data.put_many("a", zip(keys[:split], values_for(keys[:split])))
    data.put_many("c", zip(keys[split:], values_for(keys[split:])))
    store = make_map(tmp_path, rows=[(k, "a") for k in keys[:split]] + [(k, "c") for k in keys[split:]])
    return data, keys, store


def test_fenced_swaps_share_one_connection_that_survives_a_failed_attach(tmp_path):
    data, keys, store = _two_sources(tmp_path, 8, 4)
    out_a, out_c = data.copy(keys[:4], "a", "b"), data.copy(keys[4:], "c", "b")
    assert store.swap_batch([(o.key, "a", "b", o.source_version) for o in out_a[:2]], fence=data).committed
    conn = store._fenced_conn((data.shard_path("a"),))
    # another source shard: the same connection, re-attached
    assert store.swap_batch([(o.key, "c", "b", o.source_version) for o in out_c[:2]], fence=data).committed
    assert store._fenced_conn((data.shard_path("c"),)) is conn
    # an attach that fails half way (the second file cannot be opened) never leaves a broken connection
    with pytest.raises(errors.StoreError):
        store._fenced_conn((data.shard_path("a"), str(tmp_path / "missing" / "x.sqlite")))
    res = store.swap_batch([(o.key, "a", "b", o.source_version) for o in out_a[2:]], fence=data)
    assert res.committed and len(res.applied) == 2
    assert store.swap_batch([(o.key, "c", "b", o.source_version) for o in out_c[2:]], fence=data).committed
    assert {k: v[0] for k, v in store.lookup(keys).items()} == {k: "b" for k in keys}


def test_fenced_swap_reports_changed_sources_and_applies_nothing(tmp_path):
    data = _data(tmp_path)
    keys = demo_keys(6, KeyType.STRING)
    data.put_many("a", zip(keys, values_for(keys)))
    store = make_map(tmp_path, rows=[(k, "a") for k in keys])
    out = data.copy(keys, "a", "b")
    data.put_many("a", [(keys[1], b"changed after the copy")])  # an application write to the source
    data.delete([keys[4]], "a")  # and a delete
    before = table(store.path)
    res = store.swap_batch([(o.key, "a", "b", o.source_version) for o in out], fence=data)
    assert not res.committed and res.source_changed == (1, 4) and res.applied == ()
    assert table(store.path) == before
    # without the version read at copy, a key to apply cannot be trusted: source_changed
    res = store.swap_batch([(keys[0], "a", "b")], fence=data)
    assert not res.committed and res.source_changed == (0,)
    assert table(store.path) == before


def test_fenced_swap_holds_the_source_write_lock_inside_its_transaction(tmp_path):
    data = _data(tmp_path, busy_timeout=0.05)
    keys = demo_keys(3, KeyType.STRING)
    data.put_many("a", zip(keys, values_for(keys)))
    store = make_map(tmp_path, rows=[(k, "a") for k in keys], busy_timeout=0.05)
    out = data.copy(keys, "a", "b")
    blocker = hold_write_lock(data.shard_path("a"))  # a writer mid-transaction on the source
    try:
        with pytest.raises(errors.TransientError):
            store.swap_batch([(o.key, "a", "b", o.source_version) for o in out], fence=data)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert store.lookup(keys)[keys[0]][0] == "a"
    with pytest.raises(errors.PermanentError, match="shard_missing|source shard file not found"):
        store.swap_batch([(keys[0], "zz", "b", 1)], fence=data)


# ----------------------------------------------------------------------- demo


def _ring(shards):
    return lambda ks: [shards[stable_hash(k) % len(shards)] for k in ks]


def _dump(directory, shards):
    out = [table(os.path.join(directory, "map.sqlite"))]
    for s in shards:
        out.append(table(SqliteDataStore(os.path.join(directory, "shards")).shard_path(s),
                         "SELECT key, value, version FROM records ORDER BY key"))
    return out


@pytest.mark.parametrize("kt", ALL_TYPES)
def test_demo_is_deterministic_and_complete(tmp_path, kt):
    shards = ["s1", "s2", "s3"]
    a = create_demo(str(tmp_path / "a"), keys=500, shards=shards, key_type=kt, assign=_ring(shards), seed=7)
    b = create_demo(str(tmp_path / "b"), keys=500, shards=shards, key_type=kt, assign=_ring(shards), seed=7)
    assert a["keys"] == 500 and sum(a["per_shard"].values()) == 500 and a["shards"] == 3
    assert a["per_shard"] == b["per_shard"] and a["bytes"] == b["bytes"]
    assert _dump(str(tmp_path / "a"), shards) == _dump(str(tmp_path / "b"), shards)
    store = SqliteMapStore(a["map_path"], kt)
    rows, stats, _ = snapshot_rows(store, 128)
    assert stats.rows == 500 and stats.invalid_keys == 0
    data = SqliteDataStore(a["shards_directory"], kt)
    ring = _ring(shards)
    for k, s, _ in rows:
        assert ring([k]) == [s]
    for s in shards:
        ks = [k for k, sh, _ in rows if sh == s]
        sizes = data.key_sizes(ks, s)
        assert len(sizes) == len(ks) and all(50 <= n <= 500 for n in sizes.values())
    c = create_demo(str(tmp_path / "c"), keys=500, shards=shards, key_type=kt, assign=_ring(shards), seed=8)
    assert _dump(str(tmp_path / "c"), shards) != _dump(str(tmp_path / "a"), shards)


def test_demo_files_are_owner_only_and_not_recreated(tmp_path):
    shards = ["s1", "s/2"]
    d = tmp_path / "demo"
    create_demo(str(d), keys=50, shards=shards, key_type=KeyType.STRING, assign=_ring(shards))
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(d / "shards").st_mode) == 0o700
    files = [d / "map.sqlite"] + [d / "shards" / n for n in os.listdir(d / "shards")]
    assert len(files) >= 3
    for f in files:
        assert stat.S_IMODE(os.stat(f).st_mode) == 0o600, f
    assert not (d / "map.sqlite.tmp").exists()
    with pytest.raises(errors.BadInput, match="demo already exists"):
        create_demo(str(d), keys=50, shards=shards, key_type=KeyType.STRING, assign=_ring(shards))


def test_demo_rejects_an_assignment_outside_the_shards(tmp_path):
    with pytest.raises(errors.BadInput, match="not in shards"):
        create_demo(str(tmp_path / "d"), keys=10, shards=["s1"], key_type=KeyType.STRING,
                    assign=lambda ks: ["s9"] * len(ks))


def test_writers_in_other_processes_wait_on_the_sidecar_lock_not_on_sqlite(tmp_path):
    """A write in another process holds ``<file>-shardmove-lock``: this process's writes of that
    file wait for it (TransientError "busy" after the busy timeout), and go on at once after."""
    import subprocess
    import sys
    import time

    from pipeline.stores import sqlite_common

    data = _data(tmp_path, busy_timeout=0.2)
    keys = demo_keys(5, KeyType.STRING)
    data.put_many("src", [(k, b"x" * 80) for k in keys])
    target = data.ensure_shard("dst")
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from pipeline.stores.sqlite_common import _locked\n"
         "with _locked([sys.argv[1]], 5, 'test'):\n"
         "    print('held', flush=True); sys.stdin.readline()\n", target],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    try:
        assert holder.stdout.readline().strip() == "held"
        t = time.monotonic()
        with pytest.raises(errors.TransientError, match="copy write: file busy in another process") as e:
            data.copy(keys, "src", "dst")
        assert e.value.reason == "busy" and time.monotonic() - t >= 0.2
        assert data.count("dst") == 0
    finally:
        holder.communicate("go\n", timeout=30)
    assert holder.returncode == 0
    assert all(o.ok for o in data.copy(keys, "src", "dst"))
    assert os.path.exists(target + sqlite_common.LOCK_SUFFIX)
    assert stat.S_IMODE(os.stat(target + sqlite_common.LOCK_SUFFIX).st_mode) == 0o600
    data.close()


def test_a_directory_without_room_for_the_sidecar_leaves_locking_to_sqlite(tmp_path, monkeypatch):
    from pipeline.stores import sqlite_common

    data = _data(tmp_path)
    keys = demo_keys(5, KeyType.STRING)
    data.put_many("src", [(k, b"x" * 80) for k in keys])
    real_open = os.open

    def refuse(path, *a, **kw):
        if str(path).endswith(sqlite_common.LOCK_SUFFIX):
            raise PermissionError(13, "read-only directory")
        return real_open(path, *a, **kw)

    monkeypatch.setattr(sqlite_common, "_LOCK_FDS", {})
    monkeypatch.setattr(sqlite_common.os, "open", refuse)
    assert all(o.ok for o in data.copy(keys, "src", "dst"))
    assert data.count("dst") == 5
    data.close()


def test_fenced_swap_of_mixed_items_decides_each_key_as_before(tmp_path):
    """The swap splits its items into columns once: 3-, 4- and 5-tuples and SwapItems
    mixed, two source shards, a forced key (version only), a consistent and an
    inconsistent duplicate, a key whose target file is absent."""
    data, keys, store = _two_sources(tmp_path, 10, 6)
    out_a, out_c = data.copy(keys[:5], "a", "b"), data.copy(keys[6:], "c", "b")
    # a forced key: its target copy differs, the fence checks its version only
    data.put_many("b", [(keys[1], b"differs from the source")])
    ver_a = {o.key: o.source_version for o in out_a}
    ver_a[keys[1]] = data.hashes([keys[1]], "a")[keys[1]][1]
    items = [
        (keys[0], "a", "b", ver_a[keys[0]]),               # 4-tuple
        (keys[1], "a", "b", ver_a[keys[1]], False),        # forced: version only
        SwapItem(keys[2], "a", "b", ver_a[keys[2]]),       # SwapItem
        (keys[3], "a", "b", ver_a[keys[3]], True),
        (keys[3], "a", "b", ver_a[keys[3]], 1),            # the same move again: consistent
    ] + [(o.key, "c", "b", o.source_version, True) for o in out_c]
    res = store.swap_batch(items, fence=data)
    assert res.committed and res.applied == tuple(range(len(items))) and res.already == ()
    assert {k: v[0] for k, v in store.lookup(keys[:4] + keys[6:]).items()} == {k: "b" for k in keys[:4] + keys[6:]}
    # a rerun finds them all at their target (3-tuples: no version needed for "already")
    res = store.swap_batch([(k, "a", "b") for k in keys[:4]], fence=data)
    assert res.committed and res.already == (0, 1, 2, 3) and res.applied == ()
    # an inconsistent duplicate is a conflict; nothing applied
    before = table(store.path)
    res = store.swap_batch([(keys[4], "a", "b", ver_a[keys[4]]), (keys[4], "a", "d", ver_a[keys[4]])], fence=data)
    assert not res.committed and res.conflicts == (0, 1)
    # a target shard without a file: nothing was copied there, the source counts as changed
    res = store.swap_batch([(keys[4], "a", "b", ver_a[keys[4]]), (keys[5], "a", "e", 1)], fence=data)
    assert not res.committed and res.source_changed == (1,)
    assert table(store.path) == before


def test_copy_outcomes_of_the_sqlite_store_are_plain_frozen_outcomes(tmp_path):
    from pipeline.stores import CopyOutcome

    data = _data(tmp_path)
    keys = demo_keys(3, KeyType.STRING)
    data.put_many("a", zip(keys[:2], values_for(keys[:2])))
    out = data.copy(keys, "a", "b")
    assert [type(o) for o in out] == [CopyOutcome] * 3
    assert out[0] == CopyOutcome(keys[0], content_hash(values_for(keys[:2])[0]), out[0].source_version, True)
    assert out[0].ok and out[1].ok and not out[2].ok and out[2].error.reason == "source_missing"
    with pytest.raises(AttributeError):  # still frozen
        out[0].written = False
    assert hash(out[0]) == hash(CopyOutcome(keys[0], out[0].content_hash, out[0].source_version, True))


def test_store_files_appear_whole_whatever_moment_a_creator_is_killed(tmp_path):
    """A process creating shard and map files is SIGKILLed at seeded moments: every
    file that exists afterwards has its table, and the next creator sweeps the dead
    process's scratch files."""
    import random
    import signal
    import subprocess
    import sys
    import time

    script = (
        "import sys\n"
        "from pipeline.stores import SqliteDataStore, SqliteMapStore\n"
        "d = sys.argv[1]; data = SqliteDataStore(d)\n"
        "for i in range(100000):\n"
        "    data.ensure_shard(f's{i}')\n"
        "    SqliteMapStore.create(f'{d}/map{i}.sqlite').close()\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    rng = random.Random(11)
    for round_ in range(8):
        d = tmp_path / f"r{round_}"
        p = subprocess.Popen([sys.executable, "-c", script, str(d)], env=env)
        time.sleep(0.6 + rng.random() * 0.6)
        p.send_signal(signal.SIGKILL)
        p.wait()
        names = os.listdir(d)
        shards = [n for n in names if n.startswith("s") and n.endswith(".sqlite")]
        maps = [n for n in names if n.startswith("map") and n.endswith(".sqlite")]
        assert shards, "the creator was killed before it made any file: give it longer"
        for n in shards + maps:
            con = sqlite3.connect(f"file:{d / n}?mode=ro", uri=True)
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            con.close()
            assert tables == ({"records"} if n.startswith("s") else {"shard_map"}), n
        # the next creation of a path the killed process was creating sweeps its scratch files
        data = SqliteDataStore(str(d))
        for n in [n for n in os.listdir(d) if ".creating" in n]:
            base = n[1:n.index(".sqlite.") + len(".sqlite")]
            if base.startswith("s"):
                data.ensure_shard(base[:-len(".sqlite")])
            else:
                SqliteMapStore.create(str(d / base)).close()
        data.close()
        assert [n for n in os.listdir(d) if ".creating" in n] == []


def test_a_target_file_left_without_any_schema_is_written_not_refused(tmp_path):
    """A target shard file with no schema at all (an older version killed while it
    created it): it reads as empty, passes the write preflight, and the next copy
    creates its table in WAL mode.  A file with other tables but no ``records`` is
    still refused."""
    data = _data(tmp_path)
    keys = demo_keys(20, KeyType.STRING)
    data.put_many("src", [(k, b"v" * 10) for k in keys])
    for shard, prepare in (("empty", lambda path: open(path, "wb").close()),
                           ("walonly", lambda path: sqlite3.connect(path).execute("PRAGMA journal_mode=WAL"))):
        path = data.shard_path(shard)
        prepare(path)
        assert data.check_shard(shard, write=True) is None
        assert data.check_shard(shard) is not None  # as a source it is still not a shard
        assert data.shard_exists(shard) is False
        assert data.count(shard) == 0 and data.hashes(keys, shard) == {}
        assert all(o.ok for o in data.copy(keys, "src", shard))
        assert data.count(shard) == 20
        con = sqlite3.connect(path)
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        con.close()
    other = data.shard_path("other")
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE elsewhere(x)")
    con.commit()
    con.close()
    assert "has no table records" in data.check_shard("other", write=True)
    data.close()


@pytest.mark.parametrize("fenced", [False, True])
def test_swap_of_keys_with_nul_and_escapes_moves_exactly_those_keys(tmp_path, fenced):
    """Keys that differ only after a NUL, or hold quotes, backslashes and control
    characters, are matched exactly by the swap's compare-and-set and fence check:
    swapping ``a\\0b`` leaves ``a`` where it is, and a changed source is caught."""
    data = _data(tmp_path)
    keys = [b"a\x00b", b"a", b'q"\\', b"tab\tnl\n", "é\u2028x".encode(), b"\x00"]
    moved, stay = [keys[0], keys[2], keys[3], keys[4], keys[5]], [keys[1]]
    data.put_many("a", zip(keys, values_for(keys)))
    store = make_map(tmp_path, rows=[(k, "a") for k in keys])
    out = data.copy(moved, "a", "b")
    res = store.swap_batch([SwapItem(o.key, "a", "b", o.source_version) for o in out],
                           fence=data if fenced else None)
    assert res.committed and sorted(res.applied) == list(range(len(moved)))
    got = store.lookup(keys)
    assert {k for k in keys if got[k][0] == "b"} == set(moved)
    assert [got[k][0] for k in stay] == ["a"]
    if fenced:  # the source of one key changes after its copy: that key, and only it, is reported
        data.put_many("a", [(keys[1], b"new")])
        out = data.copy(stay, "a", "b")
        data.put_many("a", [(keys[1], b"newer")])
        res = store.swap_batch([SwapItem(o.key, "a", "b", o.source_version) for o in out], fence=data)
        assert not res.committed and res.source_changed == (0,)
        assert store.lookup(stay)[keys[1]][0] == "a"


def test_the_swap_walks_the_key_index_even_beside_an_application_index_on_shard_id(tmp_path):
    """An application's own index on ``shard_id`` (no statistics) must never drive the swap's
    compare-and-set: SQLite would walk every row of the source shard with the map locked."""
    keys = demo_keys(600, KeyType.STRING)
    store = make_map(tmp_path, rows=[(k, "a") for k in keys])
    con = sqlite3.connect(store.path)
    con.execute("CREATE INDEX app_by_shard ON shard_map(shard_id)")
    con.commit()
    con.close()
    plans = []
    conn = store._map_conn()
    conn.set_trace_callback(lambda sql: plans.extend(
        r[3] for r in sqlite3.connect(store.path).execute("EXPLAIN QUERY PLAN " + sql.replace("?", "'x'"))
    ) if sql.startswith("UPDATE shard_map") else None)
    res = store.swap_batch([(k, "a", "b") for k in keys[:500]])
    conn.set_trace_callback(None)
    assert res.committed and len(res.applied) == 500
    assert plans and all("app_by_shard" not in p for p in plans), plans
    assert sum(s == "b" for s, _ in store.lookup(keys).values()) == 500


def test_without_hard_links_a_new_file_is_created_in_place_and_completed(tmp_path, monkeypatch):
    """A file system that refuses hard links: the file is created in place (never replaced)
    and given WAL mode and its table; no scratch file is left."""
    def no_links(src, dst, *a, **kw):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    data = _data(tmp_path)
    path = data.ensure_shard("t")
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert con.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall() == [("records",)]
    con.close()
    assert [n for n in os.listdir(os.path.dirname(path)) if ".creating" in n] == []
    data.close()


def test_a_dead_creators_scratch_is_swept_even_when_the_file_exists(tmp_path):
    """A killed creator's scratch file (here: a dead process's owner tag) beside a file that
    exists is removed when this process first ensures that file; a live owner's stays."""
    import subprocess
    import sys

    from pipeline import procs
    from pipeline.stores import sqlite_common

    data = _data(tmp_path)
    path = data.ensure_shard("t")
    data.close()
    dead_tag = subprocess.run([sys.executable, "-c", "from pipeline import procs; print(procs.owner_tag())"],
                              capture_output=True, text=True, check=True,
                              env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))).stdout.strip()
    d = os.path.dirname(path)
    dead = os.path.join(d, f".t.sqlite.{dead_tag}~1.creating")
    live = sqlite_common._creating_name(path)
    for f in (dead, dead + "-wal", live):
        open(f, "wb").close()
    assert procs.owner_gone(dead_tag) and not procs.owner_gone(procs.owner_tag())
    SqliteDataStore(d).ensure_shard("t")
    assert not os.path.exists(dead) and not os.path.exists(dead + "-wal") and os.path.exists(live)
    os.unlink(live)


@pytest.mark.parametrize("kt", ALL_TYPES)
def test_keys_at_names_exactly_the_keys_the_map_routes_to_a_shard(tmp_path, kt):
    """The map guard's question (before a copy): which of these keys are at the target
    already -- across several IN chunks, whatever else the map holds."""
    keys = demo_keys(1200, kt)
    rows = [(k, ("t" if i % 7 == 0 else "s")) for i, k in enumerate(keys[:1100])]  # the last 100: absent
    store = make_map(tmp_path, kt, rows=rows)
    want = {k for k, s in rows if s == "t"}
    assert store.keys_at(keys, "t") == want
    assert store.keys_at(keys, "s") == {k for k, s in rows if s == "s"}
    assert store.keys_at(keys[1100:], "t") == set() and store.keys_at([], "t") == set()
    assert store.keys_at(keys, "nowhere") == set()
    assert store.keys_at(keys, "t") == {k for k, v in store.lookup(keys).items() if v[0] == "t"}


def test_keys_at_matches_keys_with_nul_and_escapes_exactly(tmp_path):
    odd = [b"a", b"a\x00b", b'q"uote', b"back\\slash", b"ctl\x01\x1f", "é".encode()]
    store = make_map(tmp_path, rows=[(k, "t" if i % 2 else "s") for i, k in enumerate(odd)])
    assert store.keys_at(odd, "t") == {odd[1], odd[3], odd[5]}
    assert store.keys_at([b"a\x00b"], "s") == set() and store.keys_at([b"a"], "s") == {b"a"}


def test_a_failed_multi_chunk_read_never_leaves_its_read_transaction_open(tmp_path, monkeypatch):
    """A read of more keys than one IN chunk runs in one read transaction; an error that is
    not SQLite's (here: its JSON result undecodable) must not leave the connection in it."""
    from pipeline.stores import sqlite_common

    keys = demo_keys(1200, KeyType.STRING)
    store = make_map(tmp_path, rows=[(k, "s") for k in keys])
    real = sqlite_common.json.loads
    calls = []

    def broken(text):
        calls.append(1)
        if len(calls) == 2:  # the second chunk
            raise ValueError("undecodable")
        return real(text)

    monkeypatch.setattr(sqlite_common.json, "loads", broken)
    with pytest.raises(ValueError):
        store.lookup(keys)
    monkeypatch.setattr(sqlite_common.json, "loads", real)
    assert not store._map_conn().in_transaction
    assert len(store.lookup(keys)) == 1200 and store.keys_at(keys, "s") == set(keys)
