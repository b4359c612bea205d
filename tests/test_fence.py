"""The write fence and the writer contract on SQLite shards.

An application stamps the versions of its SQLite records itself; one that
rewrites a record and keeps its version (lock-respecting, but breaking the
writer contract) must still never get a stale swap: the fence compares the
content hash read at copy time too.  Real SQLite stores; the executor runs on
the in-memory engine (``FnApiRunner``), strict fence and ``recheck`` alike.
"""
import dataclasses
import sqlite3
import threading

import pytest

from shardmove import api
from pipeline.config import load_config
from pipeline.stores.base import content_hash
from pipeline.stores.sqlite import SqliteDataStore, SqliteMapStore


def quiet(_line):
    pass


def same_version_rewrite(path: str, text_key: str, value: bytes) -> None:
    """A lock-respecting writer that breaks the contract: new value, same version."""
    con = sqlite3.connect(path, timeout=30, isolation_level=None)
    try:
        con.execute("BEGIN IMMEDIATE")
        n = con.execute("UPDATE records SET value = ? WHERE key = ?", (value, text_key)).rowcount
        con.execute("COMMIT")
        assert n == 1
    finally:
        con.close()


def test_fenced_swap_refuses_a_same_version_rewrite(tmp_path):
    ds = SqliteDataStore(str(tmp_path / "shards"))
    ms = SqliteMapStore.create(str(tmp_path / "map.sqlite"))
    keys = [b"k1", b"k2", b"k3"]
    ms.put_many([(k, "a") for k in keys])
    ds.put_many("a", [(k, b"old " + k) for k in keys])
    ds.ensure_shard("b")
    outs = ds.copy(keys, "a", "b")
    items = [(o.key, "a", "b", o.source_version) for o in outs]
    same_version_rewrite(ds.shard_path("a"), "k2", b"new k2")
    assert ds.read([b"k2"], "a")[b"k2"][1] == outs[1].source_version  # the version was kept

    res = ms.swap_batch(items, fence=ds)
    assert not res.committed and res.source_changed == (1,)
    assert {k: v[0] for k, v in ms.lookup(keys).items()} == {k: "a" for k in keys}  # nothing applied
    # under the source's write lock (the recheck fence): the content is read too
    with ds.write_fence("a") as versions:
        cur = versions(keys)
    assert cur[b"k2"] == (content_hash(b"new k2"), outs[1].source_version)
    assert cur[b"k1"] == (outs[0].content_hash, outs[0].source_version)
    # re-copied: the swap goes through, with the new content on the target
    again = ds.copy([b"k2"], "a", "b")[0]
    items[1] = (b"k2", "a", "b", again.source_version)
    assert ms.swap_batch(items, fence=ds).committed
    assert ds.read([b"k2"], "b")[b"k2"][0] == b"new k2"
    # the fence compares the source with its copy on the target: a target record that is
    # missing or differs (a target written behind the copy's back) is re-copied too
    same_version_rewrite(ds.shard_path("a"), "k1", b"k1 written on the target")  # a is now k1's target
    assert ms.swap_batch([(b"k1", "b", "a", outs[0].source_version)], fence=ds).source_changed == (0,)
    ds.delete([b"k3"], "a")
    assert ms.swap_batch([(b"k3", "b", "a", outs[2].source_version)], fence=ds).source_changed == (0,)
    assert ms.swap_batch([(b"k3", "b", "c", outs[2].source_version)], fence=ds).source_changed == (0,)  # no file
    assert {k: v[0] for k, v in ms.lookup(keys).items()} == {k: "b" for k in keys}
    # a key swapped by force (its verification failed): its version is checked, not its bytes
    forced = (b"k1", "b", "a", outs[0].source_version, False)
    assert ms.swap_batch([forced], fence=ds).committed
    assert ms.lookup([b"k1"])[b"k1"][0] == "a"


@pytest.mark.parametrize("write_fence", ["auto", "recheck"])
def test_run_never_swaps_a_record_rewritten_with_its_version_kept(tmp_path, monkeypatch, write_fence):
    info = api.create_demo_keyspace(str(tmp_path / "ks"), keys=800, shards=4)
    with open(info["config"], "a") as f:
        f.write(f"swap_batch_size: 50\nhash_buckets: 2\nretry_base_delay: 1ms\nwrite_fence: {write_fence}\n"
                "copy_concurrency: 4\n")
    cfg = load_config(info["config"])
    cfg = dataclasses.replace(cfg, beam={"runner": "FnApiRunner"})
    copy = SqliteDataStore.copy
    rewritten: dict = {}
    lock = threading.Lock()

    def copy_then_rewrite(self, keys, source, target):
        """After each key's FIRST copy, a writer rewrites its source record (same version)."""
        out = copy(self, keys, source, target)
        with lock:  # copies run on several threads
            for o in out:
                if o.error is None and o.key not in rewritten and len(rewritten) < 120:
                    value = b"rewritten after the copy: " + o.key
                    same_version_rewrite(self.shard_path(source), o.key.decode(), value)
                    rewritten[o.key] = (source, value)
        return out

    monkeypatch.setattr(SqliteDataStore, "copy", copy_then_rewrite)
    res = api.plan(cfg, out=quiet)
    run = api.run(cfg, res.plan_dir, out=quiet)
    assert run.exit_code == 0, run.summary
    assert run.summary["failed"] == 0 and len(rewritten) == 120
    ms = SqliteMapStore(cfg.map_store["path"], cfg.key_type)
    ds = SqliteDataStore(cfg.data_store["directory"], cfg.key_type)
    where = ms.lookup(list(rewritten))
    stale = []
    for k, (source, value) in rewritten.items():
        target = where[k][0]
        assert target != source
        if ds.read([k], target)[k][0] != value:
            stale.append(k)
    assert stale == []  # every rewritten key was re-copied before its swap
    assert run.summary["metrics_this_run"].get("source_changed_recopies", 0) >= 120


def test_forced_swap_still_swaps_a_real_mismatch(tmp_path, monkeypatch):
    """force_swap_on_verification_failure: a target that really differs from its source
    (written behind the copy's back) is swapped by force, the fence checking the version only."""
    info = api.create_demo_keyspace(str(tmp_path / "ks"), keys=400, shards=4)
    with open(info["config"], "a") as f:
        f.write("swap_batch_size: 50\nhash_buckets: 2\nretry_base_delay: 1ms\nmax_retries: 1\n"
                "force_swap_on_verification_failure: true\n")
    cfg = dataclasses.replace(load_config(info["config"]), beam={"runner": "FnApiRunner"})
    copy = SqliteDataStore.copy
    corrupted: set = set()
    lock = threading.Lock()

    def copy_then_corrupt_target(self, keys, source, target):
        out = copy(self, keys, source, target)
        with lock:  # the same 10 keys on every copy: re-copies cannot mend them
            for o in out:
                if o.error is None and (o.key in corrupted or len(corrupted) < 10):
                    same_version_rewrite(self.shard_path(target), o.key.decode(), b"not the source's bytes")
                    corrupted.add(o.key)
        return out

    monkeypatch.setattr(SqliteDataStore, "copy", copy_then_corrupt_target)
    res = api.plan(cfg, out=quiet)
    run = api.run(cfg, res.plan_dir, out=quiet)
    assert run.exit_code == 0 and run.summary["failed"] == 0, run.summary
    assert run.summary["done_by_verification"].get("forced") == 10
