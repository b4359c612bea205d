"""Reliability: the write fence under live writers, leases and fencing, hostile keys,
bad input, owner-only files.  Real SQLite stores, the real Beam executor."""
import dataclasses
import json
import os
import random
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shardmove import api
from pipeline import checkpoint as ckpt
from pipeline import states as S
from pipeline.config import load_config
from pipeline.errors import BadInput, Refused
from pipeline.keys import KeyType, text_form
from pipeline.lease import LeaseLost, acquire, read_lease
from shardmove.planner import load_manifest
from pipeline.stores.sqlite import SqliteDataStore, SqliteMapStore

from conftest import run_cli
from test_executor import (all_records, install_write_witness, key_states, make_keyspace, map_rows, plan_moves,
                           planned, quiet, records, with_faults, write_counts)


# ------------------------------------------------------------ write fence

class Writer(threading.Thread):
    """An application writing source records of plan keys while they move.

    fence_aware: each write happens in a transaction holding the shard's write
    lock and first checks (map ATTACHed in the same transaction) that the key
    still lives on that shard -- what a fence-aware application does.
    Every tenth write is a delete (a delete counts as a write).
    """

    def __init__(self, cfg, moves, fence_aware, seed=0, pause=0.002):
        super().__init__(daemon=True)
        self.cfg, self.moves, self.fence_aware = cfg, moves, fence_aware
        self.rng = random.Random(seed)
        self.pause = pause
        self.stop = threading.Event()
        self.writes = 0
        self.deletes = 0

    def run(self):
        kt = self.cfg.key_type
        shards = self.cfg.data_store["directory"]
        while not self.stop.is_set():
            key, src, _tgt = self.rng.choice(self.moves)
            text = text_form(key, kt)
            con = sqlite3.connect(os.path.join(shards, f"{src}.sqlite"), timeout=30, isolation_level=None)
            try:
                con.execute("ATTACH DATABASE ? AS m", (self.cfg.map_store["path"],))
                con.execute("BEGIN IMMEDIATE")
                row = con.execute("SELECT shard_id FROM m.shard_map WHERE key = ?", (text,)).fetchone()
                if self.fence_aware and (row is None or row[0] != src):
                    con.execute("ROLLBACK")
                    continue
                if self.rng.random() < 0.1:
                    con.execute("DELETE FROM records WHERE key = ?", (text,))
                    self.deletes += 1
                else:
                    con.execute("UPDATE records SET value = ?, version = version + 1 WHERE key = ?",
                                (os.urandom(40), text))
                con.execute("COMMIT")
                self.writes += 1
            except sqlite3.OperationalError:
                pass
            finally:
                con.close()
            time.sleep(self.pause)


def stale_swaps(cfg, plan_dir, m):
    """Done keys whose target does not hold their source's last value (fence-aware writers
    never write a source after its key moved, so any difference is a stale swap)."""
    kt = cfg.key_type
    st = key_states(plan_dir, m)
    recs = {}
    stale = 0
    for key, src, tgt in plan_moves(plan_dir, m):
        if st[key][0] != S.State.DONE:
            continue
        for s in (src, tgt):
            if s not in recs:
                recs[s] = records(cfg, s)
        t = text_form(key, kt)
        if recs[src].get(t) is None or recs[src][t] != recs[tgt].get(t):
            stale += 1
    return stale


@pytest.mark.parametrize("mode", ["auto", "recheck"])
def test_write_fence_fence_aware_writers_see_no_stale_swap(tmp_path, mode):
    cfg = with_faults(make_keyspace(tmp_path, keys=1500, write_fence=mode, swap_batch_size=40),
                      {"copy": {"latency_ms": 30}, "swap": {"latency_ms": 15}})
    plan_dir, m = planned(cfg)
    w = Writer(cfg, plan_moves(plan_dir, m), fence_aware=True, seed=1)
    w.start()
    res = api.run(cfg, plan_dir, out=quiet)
    w.stop.set()
    w.join()
    st = key_states(plan_dir, m)
    recopied = res.metrics.get("source_changed_recopies", 0)
    failed_changing = sum(1 for v in st.values() if v[:2] == (S.State.FAILED, "source_changing"))
    print(f"\nwrite_fence[{mode}]: writes={w.writes} deletes={w.deletes} recopied={recopied} "
          f"source_changing={failed_changing} failures={res.summary['failures_by_reason']} "
          f"window={res.summary['timings'].get('fence')}")
    assert w.writes > 20
    assert stale_swaps(cfg, plan_dir, m) == 0
    assert res.summary["done"] + res.summary["failed"] == m["moves"]
    assert set(res.summary["failures_by_reason"]) <= {"source_missing", "source_changing"}
    if mode == "recheck":
        assert "fence" in res.summary["timings"]  # the window is measured


def test_write_fence_strict_with_unaware_writer(tmp_path):
    """SQLite map + SQLite shards: versions checked inside the swap transaction, so even a
    fence-unaware writer's change before the swap is never swapped stale."""
    cfg = with_faults(make_keyspace(tmp_path, keys=1000, swap_batch_size=40), {"copy": {"latency_ms": 30}})
    plan_dir, m = planned(cfg)
    log = []
    orig = SqliteMapStore.swap_batch

    def spy(self, items, **kw):  # record, per swapped key, the source version it was swapped with
        res = orig(self, items, **kw)
        if res.committed:
            log.extend((items[j][0], items[j][3]) for j in res.applied)
        return res

    SqliteMapStore.swap_batch = spy
    try:
        w = Writer(cfg, plan_moves(plan_dir, m), fence_aware=False, seed=2)
        w.start()
        api.run(cfg, plan_dir, out=quiet)
        w.stop.set()
        w.join()
    finally:
        SqliteMapStore.swap_batch = orig
    ds = SqliteDataStore(cfg.data_store["directory"], cfg.key_type)
    by_key = {k: (s, t) for k, s, t in plan_moves(plan_dir, m)}
    for key, sver in log:  # the target holds exactly the version the swap verified
        tgt = by_key[key][1]
        assert ds.read([key], tgt)[key][1] == sver
    assert w.writes > 20 and log


# ----------------------------------------------------------- leases

def test_second_executor_refused_naming_holder(tmp_path):
    cfg = make_keyspace(tmp_path, keys=300)
    plan_dir, m = planned(cfg)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        doc = {"format_version": 1, "plan_id": m["plan_id"], "epoch": 7,
               "holder": {"host": "elsewhere.example", "pid": other.pid, "start_time": "1"},
               "expires_at": time.time() + 60, "released": False}
        with open(os.path.join(plan_dir, "lease.json"), "w") as f:
            json.dump(doc, f)
        with pytest.raises(Refused, match=r"plan is leased by elsewhere.example:\d+ \(epoch 7\) until "):
            api.run(cfg, plan_dir, out=quiet)
        # expired: taken over, with a higher epoch
        doc["expires_at"] = time.time() - 1
        with open(os.path.join(plan_dir, "lease.json"), "w") as f:
            json.dump(doc, f)
        res = api.run(cfg, plan_dir, out=quiet)
        assert res.exit_code == 0 and read_lease(plan_dir)["epoch"] == 8
    finally:
        other.kill()


def test_dead_holder_on_this_host_taken_over_at_once(tmp_path):
    cfg = make_keyspace(tmp_path, keys=200)
    plan_dir, m = planned(cfg)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    doc = {"format_version": 1, "plan_id": m["plan_id"], "epoch": 3,
           "holder": {"host": socket.gethostname(), "pid": dead.pid, "start_time": "123"},
           "expires_at": time.time() + 3600, "released": False}
    with open(os.path.join(plan_dir, "lease.json"), "w") as f:
        json.dump(doc, f)
    res = api.run(cfg, plan_dir, out=quiet)
    assert res.exit_code == 0 and read_lease(plan_dir)["epoch"] == 4


def test_zombie_holder_is_dead_and_taken_over_at_once(tmp_path):
    """A SIGKILLed holder that its parent has not reaped yet still has a /proc entry (state Z)
    with its own start time: it holds nothing, so the lease is taken over at once."""
    from pipeline.lease import process_start_time

    cfg = make_keyspace(tmp_path, keys=200)
    plan_dir, m = planned(cfg)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        start = process_start_time(holder.pid)
        assert start is not None
        holder.send_signal(signal.SIGKILL)
        for _ in range(500):  # not reaped (no wait()): a zombie
            with open(f"/proc/{holder.pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
            time.sleep(0.01)
        else:
            raise AssertionError("the killed holder never became a zombie")
        doc = {"format_version": 1, "plan_id": m["plan_id"], "epoch": 3,
               "holder": {"host": socket.gethostname(), "pid": holder.pid, "start_time": start},
               "expires_at": time.time() + 3600, "released": False}
        with open(os.path.join(plan_dir, "lease.json"), "w") as f:
            json.dump(doc, f)
        assert process_start_time(holder.pid) is None
        res = api.run(cfg, plan_dir, out=quiet)
        assert res.exit_code == 0 and read_lease(plan_dir)["epoch"] == 4
    finally:
        holder.kill()
        holder.wait()


def test_cli_second_run_exits_4(tmp_path):
    cfg = make_keyspace(tmp_path, keys=200)
    plan_dir, m = planned(cfg)
    lease = acquire(plan_dir, m["plan_id"], 60)
    try:
        cfgpath = os.path.join(cfg.base_dir, "shardmove.yaml")
        r = run_cli("run", plan_dir, "--config", cfgpath)
        assert r.returncode == 4
        assert "error: plan is leased by " in r.stderr and "Traceback" not in r.stderr
    finally:
        lease.release()


def test_taken_over_executor_applies_nothing(tmp_path):
    """The epoch is checked inside the swap transaction: once another executor claims
    the plan on the map store, the old one cannot swap a single key."""
    cfg = with_faults(make_keyspace(tmp_path, keys=600, swap_batch_size=30), {"copy": {"latency_ms": 100}})
    plan_dir, m = planned(cfg)
    before = map_rows(cfg)

    def usurp():
        for _ in range(4000):
            if os.path.exists(os.path.join(plan_dir, "lease.json")):
                break
            time.sleep(0.005)
        time.sleep(0.05)
        SqliteMapStore(cfg.map_store["path"], cfg.key_type).claim_run(m["plan_id"], 99, (0, 255), "usurper", 60,
                                                                        time.time())

    t = threading.Thread(target=usurp)
    t.start()
    with pytest.raises(LeaseLost):
        api.run(cfg, plan_dir, out=quiet)
    t.join()
    assert map_rows(cfg) == before and write_counts(cfg) == {}


def test_overlapping_plans_cannot_run_together(tmp_path):
    cfg = make_keyspace(tmp_path, keys=300)
    plan_dir, m = planned(cfg)
    ms = SqliteMapStore(cfg.map_store["path"], cfg.key_type)
    ms.claim_run("f" * 64, 1, (0x00, 0x7F), "other-host:1", 60, time.time())
    with pytest.raises(Refused, match=r"plan ffffffffffff \(held by other-host:1\) may move the same keys"):
        api.run(cfg, plan_dir, out=quiet)
    # a plan in a disjoint window may run beside it
    cfg_w = cfg.with_options(window="80-FF")
    res_plan = api.plan(cfg_w, out=quiet)
    res = api.run(cfg_w, res_plan.plan_dir, out=quiet)
    assert res.exit_code == 0 and res.summary["done"] == load_manifest(res_plan.plan_dir)["moves"] > 0


# ----------------------------------------------------------- hostile keys

def test_hostile_keys_migrate_intact(tmp_path):
    """Empty keys are refused at plan time; NUL, newline, unicode and 4096-byte keys move intact."""
    ks = tmp_path / "ks"
    ks.mkdir()
    keys = [b"a\x00b", b"line\nbreak", "ünïcödé-ключ".encode(), b"k" * 4096, b"../../etc/passwd", b" "] + \
        [f"k{i}".encode() for i in range(300)]
    ms = SqliteMapStore.create(str(ks / "map.sqlite"), KeyType.STRING)
    from pipeline.ring import Ring

    ring = Ring.build("native", [(f"s{i}", 1.0) for i in range(2)])
    ms.put_many((k, ring.assign_one(k)) for k in keys)
    ds = SqliteDataStore(str(ks / "shards"), KeyType.STRING)
    for s in ("s0", "s1", "s2"):
        ds.ensure_shard(s)
    for k in keys:
        ds.put_many(ring.assign_one(k), [(k, b"value-of-" + k[:20])])
    raw = {"work_dir": str(tmp_path / "work"), "map_store": {"kind": "sqlite", "path": str(ks / "map.sqlite")},
           "data_store": {"kind": "sqlite", "directory": str(ks / "shards")}, "current_shards": ["s0", "s1"],
           "target": {"shards": ["s0", "s1", "s2"]}, "swap_batch_size": 50}
    cfg = load_config(None, raw=raw)
    plan_dir, m = planned(cfg)
    res = api.run(cfg, plan_dir, out=quiet)
    assert res.exit_code == 0 and res.summary["done"] == m["moves"] > 0
    mp = map_rows(cfg)
    new_ring = Ring.build("native", [(f"s{i}", 1.0) for i in range(3)])
    for k in keys:
        t = k.decode()
        assert mp[t] == new_ring.assign_one(k)
        assert records(cfg, mp[t])[t] == b"value-of-" + k[:20]
    # an empty key is refused at plan time, nothing committed
    ms.put_many([(b"", "s0")])
    with pytest.raises(BadInput, match=r"plan: 1 keys in the snapshot cannot be represented"):
        api.plan(cfg, out=quiet)


# ----------------------------------------------------------- bad input

def test_missing_shard_database_exit_2_nothing_modified(tmp_path):
    cfg = make_keyspace(tmp_path, keys=300)
    plan_dir, m = planned(cfg)
    src = m["pairs"][0]["source"]
    os.rename(os.path.join(cfg.data_store["directory"], f"{src}.sqlite"), str(tmp_path / "away.sqlite"))
    before = map_rows(cfg)
    with pytest.raises(BadInput, match=r"preflight: data store: source shard " + src + r": file .* does not exist"):
        api.run(cfg, plan_dir, out=quiet)
    assert map_rows(cfg) == before
    assert not os.path.exists(os.path.join(plan_dir, "checkpoints"))


def test_damaged_plan_file_exit_2(tmp_path):
    cfg = make_keyspace(tmp_path, keys=300)
    plan_dir, m = planned(cfg)
    f = os.path.join(plan_dir, "moves", m["files"][0]["group"] + ".parquet")
    data = open(f, "rb").read()
    open(f, "wb").write(data[:-40])
    with pytest.raises(BadInput, match=r"plan: 1 of \d+ move files are missing or damaged"):
        api.run(cfg, plan_dir, out=quiet)


def test_checkpoint_of_another_plan_refused(tmp_path):
    cfg = make_keyspace(tmp_path, keys=300)
    plan_dir, m = planned(cfg)
    gid = m["files"][0]["group"]
    w = ckpt.CheckpointWriter(plan_dir, "e" * 64, gid, 1)
    w.record(b"x", None, S.State.COPYING, 1)
    w.flush()
    with pytest.raises(BadInput, match=r"belongs to plan eeeeeeeeeeee"):
        api.run(cfg, plan_dir, out=quiet)


def test_truncated_checkpoint_part_is_skipped_safely(tmp_path, caplog):
    cfg = make_keyspace(tmp_path, keys=300)
    originals = all_records(cfg)
    plan_dir, m = planned(cfg)
    gid = m["files"][0]["group"]
    w = ckpt.CheckpointWriter(plan_dir, m["plan_id"], gid, 1)
    w.record(b"user-000001", None, S.State.DONE, 1)  # would be a lie if it were read
    name = w.flush()
    path = os.path.join(plan_dir, "checkpoints", gid, name)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    res = api.run(cfg, plan_dir, out=quiet)
    assert res.exit_code == 0 and res.summary["done"] == m["moves"]
    from test_executor import assert_migrated

    assert_migrated(cfg, plan_dir, m, originals)


# ----------------------------------------------------------- secrets at rest

def test_files_holding_keys_are_owner_only(tmp_path):
    cfg = make_keyspace(tmp_path, keys=300)
    plan_dir, m = planned(cfg)
    api.run(cfg, plan_dir, out=quiet)
    work = cfg.work_dir
    checked = 0
    for sub in ("snapshots", "plans"):
        for root, dirs, files in os.walk(os.path.join(work, sub)):
            for d in dirs:
                mode = stat.S_IMODE(os.stat(os.path.join(root, d)).st_mode)
                assert mode & 0o077 == 0, (d, oct(mode))
            for f in files:
                if f.endswith(".parquet"):
                    mode = stat.S_IMODE(os.stat(os.path.join(root, f)).st_mode)
                    assert mode == 0o600, (f, oct(mode))
                    checked += 1
    assert checked >= 3


def test_object_store_over_long_keys_refused_at_plan_time(tmp_path):
    """Keys whose object name would exceed the store's limit are refused when planning
    (exit 2, nothing committed), not halfway through a run."""
    from pipeline.ring import Ring

    ms = SqliteMapStore.create(str(tmp_path / "map.sqlite"), KeyType.STRING)
    ring = Ring.build("native", [("s0", 1.0)])
    keys = [f"k{i}".encode() for i in range(50)] + [b"x" * 2000]
    ms.put_many((k, "s0") for k in keys)
    shards = {s: str(tmp_path / "objects" / s) for s in ("s0", "s1")}
    for d in shards.values():
        os.makedirs(d)
    raw = {"work_dir": str(tmp_path / "work"), "map_store": {"kind": "sqlite", "path": str(tmp_path / "map.sqlite")},
           "data_store": {"kind": "objects", "shards": shards}, "current_shards": ["s0"],
           "target": {"shards": ["s0", "s1"]}}
    cfg = load_config(None, raw=raw)
    target = Ring.build("native", [("s0", 1.0), ("s1", 1.0)])
    if target.assign_one(b"x" * 2000) != "s1":  # make sure the long key moves
        raw["target"] = {"shards": ["s1"]}
        cfg = load_config(None, raw=raw)
    with pytest.raises(BadInput, match=r"plan: 1 keys are too long for the data store's object names"):
        api.plan(cfg, out=quiet)
    plans = tmp_path / "work" / "plans"
    assert not plans.exists() or [p for p in os.listdir(plans) if not p.startswith(".")] == []
