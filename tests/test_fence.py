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


# ------------------------------------------------------------- fence pre-checks

def _precheck_setup(tmp_path, n=12):
    ds = SqliteDataStore(str(tmp_path / "shards"))
    ms = SqliteMapStore.create(str(tmp_path / "map.sqlite"))
    keys = [b"k%02d" % i for i in range(n)]
    ms.put_many([(k, "a") for k in keys])
    ds.put_many("a", [(k, b"old " + k) for k in keys])
    ds.put_many("a", [(b"other", b"not in the batch")])
    outs = ds.copy(keys, "a", "b")
    return ds, ms, keys, [(o.key, "a", "b", o.source_version) for o in outs]


def _shards(ms, keys):
    return {k: v[0] for k, v in ms.lookup(keys).items()}


def test_a_fence_precheck_that_stands_spares_the_check_inside_the_lock(tmp_path):
    ds, ms, keys, items = _precheck_setup(tmp_path)
    pre = ms.fence_precheck(items, fence=ds)
    assert pre is not None and pre.changed == ()
    res = ms.swap_batch(items, fence=ds, precheck=pre)
    assert res.committed and len(res.applied) == len(keys) and pre.stood
    assert _shards(ms, keys) == {k: "b" for k in keys}
    pre.close()
    pre.close()  # harmless twice; its connection is kept for the next pre-check
    assert len(ms._precheck_conns) == 1


# what an application may do to the source shard between a pre-check and the swap
def _rewrite(ds, key):  # breaks the writer contract: new bytes, same version
    same_version_rewrite(ds.shard_path("a"), key.decode(), b"rewritten " + key)


def _new_version(ds, key):
    ds.put_many("a", [(key, b"new version " + key)])


def _delete(ds, key):
    ds.delete([key], "a")


@pytest.mark.parametrize("change", [_rewrite, _new_version, _delete])
def test_a_source_changed_after_the_precheck_is_never_swapped(tmp_path, change):
    ds, ms, keys, items = _precheck_setup(tmp_path)
    pre = ms.fence_precheck(items, fence=ds)
    assert pre.changed == ()  # the pre-check saw the sources unchanged ...
    change(ds, keys[3])       # ... then an application wrote one, before the swap took its lock
    res = ms.swap_batch(items, fence=ds, precheck=pre)
    assert not pre.stood
    assert not res.committed and res.source_changed == (3,) and res.applied == ()
    assert _shards(ms, keys) == {k: "a" for k in keys}


def _target_deleted(ds, key):  # e.g. cleanup of another plan: a versioned delete of the copy
    ds.delete([key], "b", versions=[ds.read([key], "b")[key][1]])


def _target_new_version(ds, key):
    ds.put_many("b", [(key, b"written on the target " + key)])


@pytest.mark.parametrize("change", [_target_deleted, _target_new_version])
def test_a_copy_changed_on_its_target_after_the_precheck_is_never_swapped(tmp_path, change):
    """The target is not locked by the swap (copies of other keys go on): its data_version
    says nothing, so the swap confirms each compared copy's version on the target."""
    ds, ms, keys, items = _precheck_setup(tmp_path)
    pre = ms.fence_precheck(items, fence=ds)
    assert pre.changed == ()
    change(ds, keys[2])
    res = ms.swap_batch(items, fence=ds, precheck=pre)
    assert not pre.stood
    assert not res.committed and res.source_changed == (2,) and res.applied == ()
    assert _shards(ms, keys) == {k: "a" for k in keys}


def test_copies_of_other_keys_on_the_target_leave_the_precheck_standing(tmp_path):
    ds, ms, keys, items = _precheck_setup(tmp_path)
    ds.put_many("a", [(b"z1", b"another key")])
    pre = ms.fence_precheck(items, fence=ds)
    ds.copy([b"z1"], "a", "b")  # the run's copies go on into the same target file ...
    ds.put_many("b", [(b"z2", b"and another write there")])
    res = ms.swap_batch(items, fence=ds, precheck=pre)
    assert res.committed and pre.stood  # ... and do not void the check of this batch's copies


def test_a_write_to_another_record_of_the_source_voids_the_precheck_but_not_the_swap(tmp_path):
    ds, ms, keys, items = _precheck_setup(tmp_path)
    pre = ms.fence_precheck(items, fence=ds)
    ds.put_many("a", [(b"other", b"written meanwhile")])
    res = ms.swap_batch(items, fence=ds, precheck=pre)
    assert not pre.stood  # the shard changed: checked again inside the lock
    assert res.committed and len(res.applied) == len(keys)


def test_a_precheck_counts_only_for_the_very_items_it_checked(tmp_path):
    ds, ms, keys, items = _precheck_setup(tmp_path)
    pre = ms.fence_precheck(items[:6], fence=ds)
    _rewrite(ds, keys[8])  # outside what the pre-check saw
    res = ms.swap_batch(list(items), fence=ds, precheck=pre)  # other items: the swap checks itself
    assert not pre.stood and res.source_changed == (8,)
    equal = list(items[:6])
    assert ms.swap_batch(equal, fence=ds, precheck=ms.fence_precheck(items[:6], fence=ds)).committed


def test_changes_a_precheck_found_are_reported_by_the_swap(tmp_path):
    ds, ms, keys, items = _precheck_setup(tmp_path)
    _new_version(ds, keys[0])
    _rewrite(ds, keys[5])
    pre = ms.fence_precheck(items, fence=ds)
    assert sorted(pre.changed) == ["k00", "k05"]
    res = ms.swap_batch(items, fence=ds, precheck=pre)
    assert not res.committed and res.source_changed == (0, 5)
    assert _shards(ms, keys) == {k: "a" for k in keys}


def test_a_precheck_is_not_made_when_it_cannot_be(tmp_path):
    ds, ms, keys, items = _precheck_setup(tmp_path)
    assert ms.fence_precheck([], fence=ds) is None
    assert ms.fence_precheck(items + items[:1], fence=ds) is None  # a key twice
    assert ms.fence_precheck([(b"k00", "gone", "b", 1)], fence=ds) is None  # no source file
    assert ms.fence_precheck(items, fence=object()) is None


def test_prechecks_against_random_writes_decide_exactly_as_the_lock(tmp_path):
    """Seeded interleavings: whatever an application writes between a pre-check and the
    swap (sources, copies on the target, other keys), the swap reports exactly the keys
    whose source no longer matches its copy and applies a batch only when none does."""
    import random
    rng = random.Random(7)
    ds = SqliteDataStore(str(tmp_path / "shards"))
    ms = SqliteMapStore.create(str(tmp_path / "map.sqlite"))
    for trial in range(40):
        keys = [b"t%02d-%02d" % (trial, i) for i in range(8)]
        ms.put_many([(k, "a") for k in keys])
        ds.put_many("a", [(k, b"v " + k) for k in keys])
        items = [(o.key, "a", "b", o.source_version) for o in ds.copy(keys, "a", "b")]
        early = {i for i in range(8) if rng.random() < 0.1}
        for i in early:
            _new_version(ds, keys[i])
        pre = ms.fence_precheck(items, fence=ds)
        late = {i for i in range(8) if rng.random() < 0.15}
        for i in late:
            rng.choice([_rewrite, _new_version, _delete, _target_deleted, _target_new_version])(ds, keys[i])
        if rng.random() < 0.3:
            ds.put_many("a", [(b"other", b"%d" % trial)])
        if rng.random() < 0.3:
            ds.put_many("b", [(b"other on b", b"%d" % trial)])  # a target write of another key
        res = ms.swap_batch(items, fence=ds, precheck=pre)
        pre.close()
        changed = early | late
        assert set(res.source_changed) == changed, trial
        assert res.committed == (not changed), trial
        assert set(_shards(ms, keys).values()) == ({"a"} if changed else {"b"}), trial


def test_run_never_swaps_a_source_written_between_its_precheck_and_its_swap(tmp_path, monkeypatch):
    """The executor checks each chunk's fence ahead of its swap, on another thread: an
    application write landing in between is caught inside the swap's lock."""
    info = api.create_demo_keyspace(str(tmp_path / "ks"), keys=600, shards=4)
    with open(info["config"], "a") as f:
        f.write("swap_batch_size: 40\nhash_buckets: 2\nretry_base_delay: 1ms\ncopy_concurrency: 4\n")
    cfg = dataclasses.replace(load_config(info["config"]), beam={"runner": "FnApiRunner"})
    precheck = SqliteMapStore.fence_precheck
    rewritten: dict = {}
    made = []

    def precheck_then_write(self, items, *, fence):
        pre = precheck(self, items, fence=fence)
        made.append(pre is not None)
        key, source = items[len(made) % len(items)][:2]
        if len(rewritten) < 6 and key not in rewritten:
            value = b"written after the pre-check: " + key
            same_version_rewrite(fence.shard_path(source), key.decode(), value)
            rewritten[key] = (source, value)
        return pre

    monkeypatch.setattr(SqliteMapStore, "fence_precheck", precheck_then_write)
    res = api.plan(cfg, out=quiet)
    run = api.run(cfg, res.plan_dir, out=quiet)
    assert run.exit_code == 0, run.summary
    assert len(rewritten) == 6 and all(made)
    ms = SqliteMapStore(cfg.map_store["path"], cfg.key_type)
    ds = SqliteDataStore(cfg.data_store["directory"], cfg.key_type)
    where = ms.lookup(list(rewritten))
    assert [k for k, (source, value) in rewritten.items()
            if ds.read([k], where[k][0])[k][0] != value] == []  # every one re-copied before its swap
    m = run.summary["metrics_this_run"]
    assert m.get("source_changed_recopies", 0) >= 6
    assert 0 < m.get("fence_prechecks_stood", 0) < len(made)
