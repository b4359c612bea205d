"""The executor: copy -> verify -> grouped swap with checkpoints, exact resume.

Runs the real Beam graph on the in-memory engine against real SQLite stores;
faults are injected with the seeded wrappers (pipeline/faults.py).
"""
import dataclasses
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from shardmove import api
from pipeline import checkpoint as ckpt
from pipeline import states as S
from pipeline.config import load_config
from shardmove.executor import summarize
from pipeline.keys import KeyType, text_form
from shardmove.planner import load_manifest
from pipeline.stores.sqlite import SqliteDataStore, SqliteMapStore

from conftest import run_cli


def quiet(_line):
    pass


def make_keyspace(tmp_path, keys=600, key_type="string", **opts):
    info = api.create_demo_keyspace(str(tmp_path / "ks"), keys=keys, shards=4, key_type=key_type)
    cfg = load_config(info["config"])
    base = {"swap_batch_size": 50, "hash_buckets": 2, "retry_base_delay": "1ms", "checkpoint_flush_interval": "50ms"}
    base.update(opts)
    cfg = cfg.with_options(**base)
    install_write_witness(cfg.map_store["path"])
    return cfg


def install_write_witness(map_path):
    """Count map-row writes per key with a trigger: a witness independent of the executor."""
    con = sqlite3.connect(map_path)
    con.executescript("""
        CREATE TABLE IF NOT EXISTS test_writes(key TEXT, n INTEGER);
        CREATE TRIGGER IF NOT EXISTS test_count_writes AFTER UPDATE ON shard_map
        BEGIN INSERT INTO test_writes VALUES (NEW.key, 1); END;
    """)
    con.commit()
    con.close()


def with_faults(cfg, faults):
    return dataclasses.replace(cfg, faults=faults)


def planned(cfg):
    res = api.plan(cfg, out=quiet)
    return res.plan_dir, load_manifest(res.plan_dir)


def plan_moves(plan_dir, manifest):
    rows = []
    for f in manifest["files"]:
        t = pq.read_table(os.path.join(plan_dir, "moves", f["group"] + ".parquet"))
        rows += list(zip(t["key"].to_pylist(), t["source"].to_pylist(), t["target"].to_pylist()))
    return rows


def map_rows(cfg):
    con = sqlite3.connect(cfg.map_store["path"])
    rows = dict(con.execute("SELECT key, shard_id FROM shard_map").fetchall())
    con.close()
    return rows


def write_counts(cfg):
    con = sqlite3.connect(cfg.map_store["path"])
    rows = dict(con.execute("SELECT key, count(*) FROM test_writes GROUP BY key").fetchall())
    con.close()
    return rows


def records(cfg, shard):
    path = os.path.join(cfg.data_store["directory"], f"{shard}.sqlite")
    con = sqlite3.connect(path)
    rows = dict(con.execute("SELECT key, value FROM records").fetchall())
    con.close()
    return rows


def key_states(plan_dir, manifest):
    out = {}
    for f in manifest["files"]:
        t = ckpt.read_group(plan_dir, manifest["plan_id"], f["group"]).table
        for k, s, r, m, a in zip(t["key"].to_pylist(), t["state"].to_pylist(), t["reason"].to_pylist(),
                                 t["verify_method"].to_pylist(), t["attempts"].to_pylist()):
            out[k] = (s, r, m, a)
    return out


def assert_migrated(cfg, plan_dir, manifest, originals, failed=frozenset()):
    """Done keys: mapped to target, target record == original; others untouched."""
    kt = cfg.key_type
    mp = map_rows(cfg)
    states = key_states(plan_dir, manifest)
    recs = {s: records(cfg, s) for s in cfg.known_shards()}
    for key, src, tgt in plan_moves(plan_dir, manifest):
        text = text_form(key, kt)
        if key in failed:
            assert states[key][0] == S.State.FAILED
            assert mp[text] == src
            assert recs[src][text] == originals[text]
        else:
            assert states[key][0] == S.State.DONE
            assert mp[text] == tgt
            assert recs[tgt][text] == originals[text]
    writes = write_counts(cfg)
    assert all(n == 1 for n in writes.values()), "a map row was written more than once"


def all_records(cfg):
    out = {}
    for s in cfg.current_shards:
        out.update(records(cfg, s))
    return out


# ------------------------------------------------------------------ tests

def test_happy_path_counts_and_data(tmp_path):
    cfg = make_keyspace(tmp_path)
    originals = all_records(cfg)
    plan_dir, m = planned(cfg)
    n = m["moves"]
    assert n > 0
    res = api.run(cfg, plan_dir, out=quiet)
    assert res.exit_code == 0
    s = res.summary
    assert (s["planned"], s["done"], s["failed"]) == (n, n, 0)
    for c in ("planned", "copied", "verified", "swapped"):
        assert res.metrics[c] == n, c
    assert res.metrics.get("failed", 0) == 0
    assert s["done_by_verification"] == {"hash": n}
    assert_migrated(cfg, plan_dir, m, originals)
    assert len(write_counts(cfg)) == n
    saved = json.load(open(os.path.join(plan_dir, "summary.json")))
    assert (saved["planned"], saved["done"], saved["failed"]) == (n, n, 0)


def test_transient_copy_twice_then_success(tmp_path):
    cfg = with_faults(make_keyspace(tmp_path, keys=200), {"copy": {"transient_first": 2}})
    plan_dir, m = planned(cfg)
    res = api.run(cfg, plan_dir, out=quiet)
    assert res.exit_code == 0 and res.summary["done"] == m["moves"]
    st = key_states(plan_dir, m)
    assert {a for (_s, _r, _m, a) in st.values()} == {3}
    assert res.metrics["retries"] >= 2


def test_permanent_and_mixed_failures(tmp_path):
    cfg = with_faults(make_keyspace(tmp_path, keys=800), {"seed": 3, "copy": {"permanent_rate": 0.3}})
    originals = all_records(cfg)
    plan_dir, m = planned(cfg)
    res = api.run(cfg, plan_dir, out=quiet)
    st = key_states(plan_dir, m)
    failed = {k for k, v in st.items() if v[0] == S.State.FAILED}
    assert 0 < len(failed) < m["moves"]
    assert res.exit_code == 3
    assert all(st[k][1] == "permanent" and st[k][3] == 1 for k in failed)
    assert res.summary["failures_by_reason"] == {"permanent": len(failed)}
    assert_migrated(cfg, plan_dir, m, originals, failed=failed)


def test_source_missing_is_permanent(tmp_path):
    cfg = make_keyspace(tmp_path, keys=300)
    plan_dir, m = planned(cfg)
    key, src, _t = plan_moves(plan_dir, m)[0]
    ds = SqliteDataStore(cfg.data_store["directory"], cfg.key_type)
    ds.delete([key], src)
    res = api.run(cfg, plan_dir, out=quiet)
    st = key_states(plan_dir, m)
    assert st[key][0] == S.State.FAILED and st[key][1] == "source_missing"
    assert res.summary["failed"] == 1 and res.exit_code == 3
    assert map_rows(cfg)[text_form(key, cfg.key_type)] == src


def test_persistent_mismatch_fails_and_force_swaps(tmp_path):
    cfg = with_faults(make_keyspace(tmp_path / "a", keys=300, max_retries=2), {"verify": {"mismatch_rate": 1.0}})
    plan_dir, m = planned(cfg)
    res = api.run(cfg, plan_dir, out=quiet)
    assert res.summary["failed"] == m["moves"] and res.summary["done"] == 0
    assert res.summary["failures_by_reason"] == {"verify_mismatch": m["moves"]}
    assert write_counts(cfg) == {}
    cfg2 = with_faults(make_keyspace(tmp_path / "b", keys=300, max_retries=1,
                                     force_swap_on_verification_failure=True), {"verify": {"mismatch_rate": 1.0}})
    plan_dir, m = planned(cfg2)
    res = api.run(cfg2, plan_dir, out=quiet)
    assert res.summary["done"] == m["moves"] and res.summary["done_by_verification"] == {"forced": m["moves"]}
    assert res.metrics["forced_swaps"] == m["moves"]


def test_transient_mismatch_recopies_then_verifies(tmp_path):
    cfg = with_faults(make_keyspace(tmp_path, keys=300), {"verify": {"mismatch_first": 1}})
    plan_dir, m = planned(cfg)
    res = api.run(cfg, plan_dir, out=quiet)
    assert res.summary["done"] == m["moves"]
    assert {v[3] for v in key_states(plan_dir, m).values()} == {2}  # one re-copy each


@pytest.mark.parametrize("mode", ["full", "sampled"])
def test_verification_modes_recorded(tmp_path, mode):
    cfg = make_keyspace(tmp_path, keys=600, verification=mode, sample_fraction=0.25)
    plan_dir, m = planned(cfg)
    res = api.run(cfg, plan_dir, out=quiet)
    by = res.summary["done_by_verification"]
    assert sum(by.values()) == m["moves"]
    if mode == "full":
        assert by == {"full": m["moves"]}
    else:
        assert set(by) == {"sampled", "unchecked"} and 0 < by["sampled"] < m["moves"]


def test_sampled_escalates_on_mismatch(tmp_path):
    cfg = with_faults(make_keyspace(tmp_path, keys=400, verification="sampled", sample_fraction=0.2),
                      {"verify": {"mismatch_first": 1}})
    plan_dir, m = planned(cfg)
    res = api.run(cfg, plan_dir, out=quiet)
    assert res.summary["done"] == m["moves"]
    assert "full" in res.summary["done_by_verification"]


def test_copy_everything_before_verifying_when_not_interleaved(tmp_path):
    calls = []
    orig_copy, orig_hashes = SqliteDataStore.copy, SqliteDataStore.hashes

    def copy(self, keys, source, target):
        calls.append("copy")
        return orig_copy(self, keys, source, target)

    def hashes(self, keys, shard):
        calls.append("verify")
        return orig_hashes(self, keys, shard)

    SqliteDataStore.copy, SqliteDataStore.hashes = copy, hashes
    try:
        for interleave in (False, True):
            calls.clear()
            # more chunks than the copy stage keeps in flight, so interleaving is observable
            cfg = make_keyspace(tmp_path / str(interleave), keys=1200, interleave_copy_and_verify=interleave,
                                write_fence="auto", swap_batch_size=5)
            plan_dir, m = planned(cfg)
            res = api.run(cfg, plan_dir, out=quiet)
            assert res.summary["done"] == m["moves"]
            first_verify = calls.index("verify")
            last_copy = len(calls) - 1 - calls[::-1].index("copy")
            if not interleave:
                assert last_copy < first_verify  # a barrier: all copies, then verification
            else:
                assert first_verify < last_copy  # overlapped
    finally:
        SqliteDataStore.copy, SqliteDataStore.hashes = orig_copy, orig_hashes


def test_swap_transient_twice_then_applied(tmp_path):
    cfg = with_faults(make_keyspace(tmp_path, keys=300), {"swap": {"transient_first": 2}})
    originals = all_records(cfg)
    plan_dir, m = planned(cfg)
    res = api.run(cfg, plan_dir, out=quiet)
    assert res.exit_code == 0 and res.summary["done"] == m["moves"]
    assert_migrated(cfg, plan_dir, m, originals)


def test_cas_conflict_fails_only_that_key(tmp_path):
    import threading

    cfg = with_faults(make_keyspace(tmp_path, keys=400), {"copy": {"latency_ms": 300}})
    plan_dir, m = planned(cfg)
    key, src, tgt = plan_moves(plan_dir, m)[3]
    other = next(s for s in cfg.current_shards if s not in (src, tgt))
    lease = os.path.join(plan_dir, "lease.json")

    def move_behind_the_executors_back():  # once the run holds its lease (drift check passed)
        for _ in range(3000):
            if os.path.exists(lease):
                break
            time.sleep(0.005)
        assert SqliteMapStore(cfg.map_store["path"], cfg.key_type).swap_batch([(key, src, other)]).committed

    t = threading.Thread(target=move_behind_the_executors_back)
    t.start()
    res = api.run(cfg, plan_dir, out=quiet)
    t.join()
    st = key_states(plan_dir, m)
    assert st[key][:2] == (S.State.FAILED, "map_changed")
    assert res.summary["failed"] == 1 and res.summary["done"] == m["moves"] - 1
    mp = map_rows(cfg)
    assert mp[text_form(key, cfg.key_type)] == other
    for k, s, t_ in plan_moves(plan_dir, m):
        if k != key:
            assert mp[text_form(k, cfg.key_type)] == t_ and st[k][0] == S.State.DONE


def test_drift_refused_unless_allowed(tmp_path):
    from pipeline.errors import Refused

    cfg = make_keyspace(tmp_path, keys=400)
    plan_dir, m = planned(cfg)
    moves = plan_moves(plan_dir, m)
    (k1, s1, t1), (k2, s2, _t2) = moves[0], moves[1]
    other = next(s for s in cfg.current_shards if s not in (s1, t1))
    ms = SqliteMapStore(cfg.map_store["path"], cfg.key_type)
    assert ms.swap_batch([(k1, s1, other)]).committed  # reassigned elsewhere
    con = sqlite3.connect(cfg.map_store["path"])
    con.execute("DELETE FROM shard_map WHERE key = ?", (text_form(k2, cfg.key_type),))  # deleted
    con.commit()
    con.close()
    before = map_rows(cfg)
    with pytest.raises(Refused, match=r"plan: 2 keys drifted since the plan's snapshot"):
        api.run(cfg, plan_dir, out=quiet)
    assert map_rows(cfg) == before  # nothing modified
    res = api.run(cfg, plan_dir, allow_drift=True, out=quiet)
    st = key_states(plan_dir, m)
    assert st[k1][:2] == (S.State.FAILED, "drifted") and st[k2][:2] == (S.State.FAILED, "drifted")
    assert res.summary["failures_by_reason"] == {"drifted": 2}
    assert res.summary["done"] == m["moves"] - 2


def test_second_run_changes_nothing(tmp_path):
    cfg = make_keyspace(tmp_path, keys=300)
    plan_dir, m = planned(cfg)
    first = api.run(cfg, plan_dir, out=quiet).summary
    before_map, before_writes = map_rows(cfg), write_counts(cfg)
    lines = []
    res = api.run(cfg, plan_dir, out=lines.append)
    assert res.nothing_to_do and "nothing to do: plan already complete" in lines
    assert map_rows(cfg) == before_map and write_counts(cfg) == before_writes
    for k in ("planned", "done", "failed", "states", "failures_by_reason", "done_by_verification"):
        assert res.summary[k] == first[k]


def _write_states(cfg, plan_dir, m, state, epoch=1):
    """Hand-written checkpoints: every key of the plan in ``state``.  Performs
    the side effects a real run would have made before reaching it."""
    ds = SqliteDataStore(cfg.data_store["directory"], cfg.key_type)
    ms = SqliteMapStore(cfg.map_store["path"], cfg.key_type)
    for f in m["files"]:
        t = pq.read_table(os.path.join(plan_dir, "moves", f["group"] + ".parquet"))
        keys = t["key"].to_pylist()
        src, tgt = t["source"][0].as_py(), t["target"][0].as_py()
        chash, sver = [None] * len(keys), [None] * len(keys)
        if state >= S.State.COPIED:
            outs = ds.copy(keys, src, tgt)
            chash = [o.content_hash for o in outs]
            sver = [o.source_version for o in outs]
        if state >= S.State.DONE:
            ms.swap_batch([(k, src, tgt) for k in keys])
        w = ckpt.CheckpointWriter(plan_dir, m["plan_id"], f["group"], epoch)
        w.record_many(keys, t["key_hash"].to_numpy(), int(state), 1, None, chash, sver,
                      "hash" if state >= S.State.VERIFIED else None)
        w.flush()


@pytest.mark.parametrize("state", [S.State.PLANNED, S.State.COPYING, S.State.COPIED, S.State.VERIFYING,
                                   S.State.VERIFIED, S.State.SWAPPING, S.State.DONE])
def test_resume_from_each_state(tmp_path, state):
    cfg = make_keyspace(tmp_path, keys=300)
    originals = all_records(cfg)
    plan_dir, m = planned(cfg)
    _write_states(cfg, plan_dir, m, state)
    res = api.run(cfg, plan_dir, out=quiet)
    assert res.summary["done"] == m["moves"] and res.exit_code == 0
    assert_migrated(cfg, plan_dir, m, originals)
    if state >= S.State.VERIFIED:  # resumed past copy: no copy again
        assert res.metrics.get("copied", 0) == 0


def test_swapping_already_applied_becomes_done_without_rewrite(tmp_path):
    cfg = make_keyspace(tmp_path, keys=300)
    plan_dir, m = planned(cfg)
    _write_states(cfg, plan_dir, m, S.State.VERIFIED)
    ms = SqliteMapStore(cfg.map_store["path"], cfg.key_type)
    for k, s, t in plan_moves(plan_dir, m):  # the swap committed, its Done was lost
        ms.swap_batch([(k, s, t)])
    res = api.run(cfg, plan_dir, out=quiet)
    assert res.summary["done"] == m["moves"]
    assert all(n == 1 for n in write_counts(cfg).values())


def test_lost_checkpoints_after_swap_resume_without_rewrite(tmp_path):
    """Every checkpoint lost after the swaps committed: the rerun finds the keys at their
    targets, does not copy over them, and records them Done without writing the map again."""
    import shutil

    cfg = make_keyspace(tmp_path, keys=300)
    originals = all_records(cfg)
    plan_dir, m = planned(cfg)
    api.run(cfg, plan_dir, out=quiet)
    shutil.rmtree(os.path.join(plan_dir, "checkpoints"))
    os.remove(os.path.join(plan_dir, "summary.json"))
    res = api.run(cfg, plan_dir, out=quiet)
    assert res.summary["done"] == m["moves"] and res.metrics.get("copied", 0) == 0
    assert res.summary["done_by_verification"] == {"already_swapped": m["moves"]}
    assert_migrated(cfg, plan_dir, m, originals)


def test_retry_failed(tmp_path):
    cfg = with_faults(make_keyspace(tmp_path, keys=400), {"seed": 1, "copy": {"permanent_rate": 0.25}})
    plan_dir, m = planned(cfg)
    first = api.run(cfg, plan_dir, out=quiet)
    assert first.summary["failed"] > 0
    again = api.run(cfg, plan_dir, out=quiet)
    assert again.nothing_to_do and again.exit_code == 3
    healed = dataclasses.replace(cfg, faults={})
    res = api.run(healed, plan_dir, retry_failed=True, out=quiet)
    assert res.summary["failed"] == 0 and res.summary["done"] == m["moves"] and res.exit_code == 0


def test_progress_final_event_and_gauges(tmp_path):
    cfg = with_faults(make_keyspace(tmp_path, keys=600, copy_concurrency=4, verify_concurrency=3,
                                    progress_interval="100ms"),
                      {"copy": {"latency_ms": 5, "keys_per_call": 1}})
    plan_dir, m = planned(cfg)
    res = api.run(cfg, plan_dir, out=quiet)
    d = os.path.join(plan_dir, "progress")
    events = [json.load(open(os.path.join(d, f))) for f in sorted(os.listdir(d)) if not f.startswith("timings")]
    assert len(events) >= 2
    final = events[-1]
    assert final["final"] and final["swapped"] == res.summary["done"] and final["failed"] == res.summary["failed"]
    assert final["total"] == res.summary["planned"]
    assert max(e["active_copy"] for e in events) <= 4
    assert max(e["active_verify"] for e in events) <= 3
    assert max(e["active_copy"] for e in events) >= 2  # concurrency was used


# ------------------------------------------------------------- processes

def _cli_cfg(tmp_path, keys=3000, **opts):
    info = api.create_demo_keyspace(str(tmp_path / "ks"), keys=keys, shards=4)
    with open(info["config"], "a") as f:
        for k, v in opts.items():
            f.write(f"{k}: {v}\n")
    install_write_witness(load_config(info["config"]).map_store["path"])
    return info["config"]


def _wait_for_parts(plan_dir, n, timeout=120):
    """Block until at least n checkpoint parts are committed (the run is mid-way)."""
    root = os.path.join(plan_dir, "checkpoints")
    t0 = time.time()
    while time.time() - t0 < timeout:
        found = sum(len([f for f in fs if f.startswith("part-")]) for _d, _s, fs in os.walk(root))
        if found >= n:
            return found
        time.sleep(0.02)
    raise AssertionError("the run never committed a checkpoint")


def _plan_cli(cfgpath):
    r = run_cli("plan", "--config", cfgpath)
    assert r.returncode == 0, r.stderr
    return next(l.split(": ", 1)[1] for l in r.stdout.splitlines() if l.startswith("plan id: "))


def test_kill_then_rerun_equals_uninterrupted(tmp_path):
    cfgpath = _cli_cfg(tmp_path, keys=5000, checkpoint_flush_interval="20ms", swap_batch_size=100)
    with open(cfgpath, "a") as f:
        f.write("faults: {copy: {latency_ms: 4, keys_per_call: 1}, swap: {latency_ms: 20}}\n")
    cfg = load_config(cfgpath)
    originals = all_records(cfg)
    plan_id = _plan_cli(cfgpath)
    plan_dir = os.path.join(cfg.work_dir, "plans", plan_id)
    sm = os.path.join(os.path.dirname(sys.executable), "shardmove")
    seen = 0
    for _ in range(3):  # SIGKILL at three points, each after new checkpoints landed
        p = subprocess.Popen([sm, "run", plan_id, "--config", cfgpath], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
        seen = _wait_for_parts(plan_dir, seen + 3)
        p.send_signal(signal.SIGKILL)
        p.wait()
        assert p.returncode == -signal.SIGKILL
    r = run_cli("run", plan_id, "--config", cfgpath)
    assert r.returncode == 0, r.stderr
    m = load_manifest(plan_dir)
    assert f"summary: planned={m['moves']} done={m['moves']} failed=0" in r.stdout
    con = sqlite3.connect(cfg.map_store["path"])
    con.close()
    assert_migrated(cfg, plan_dir, m, originals)


def test_sigterm_exits_130_then_rerun_completes(tmp_path):
    cfgpath = _cli_cfg(tmp_path, keys=3000, checkpoint_flush_interval="20ms", swap_batch_size=100)
    with open(cfgpath, "a") as f:
        f.write("faults: {copy: {latency_ms: 5, keys_per_call: 1}}\n")
    plan_id = _plan_cli(cfgpath)
    plan_dir = os.path.join(load_config(cfgpath).work_dir, "plans", plan_id)
    sm = os.path.join(os.path.dirname(sys.executable), "shardmove")
    p = subprocess.Popen([sm, "run", plan_id, "--config", cfgpath], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    _wait_for_parts(plan_dir, 2)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, (out, err)
    assert "interrupted" in out
    st = run_cli("status", plan_id, "--config", cfgpath)
    # stopped by the signal, no live executor: exit 6, no rate/ETA, no summary line; --watch ends at once
    assert st.returncode == 6 and "state: stopped" in st.stdout, st.stdout
    assert "rate:" not in st.stdout and "summary: planned=" not in st.stdout
    w = run_cli("status", plan_id, "--config", cfgpath, "--watch", "0.2", timeout=30)
    assert w.returncode == 6 and "state: stopped" in w.stdout
    r = run_cli("run", plan_id, "--config", cfgpath)
    assert r.returncode == 0, r.stderr
    st = run_cli("status", plan_id, "--config", cfgpath)
    assert st.returncode == 0 and "state: complete" in st.stdout


def test_redaction_debug_run_prints_no_key(tmp_path):
    cfgpath = _cli_cfg(tmp_path, keys=500)
    with open(cfgpath, "a") as f:
        f.write("faults: {seed: 2, copy: {transient_rate: 0.2, permanent_rate: 0.05}, swap: {transient_first: 1}}\n")
    cfg = load_config(cfgpath)
    keys = list(map_rows(cfg))
    outs = []
    r = run_cli("plan", "--config", cfgpath, "--log-level", "DEBUG")
    outs += [r.stdout, r.stderr]
    plan_id = next(l.split(": ", 1)[1] for l in r.stdout.splitlines() if l.startswith("plan id: "))
    r = run_cli("run", plan_id, "--config", cfgpath, "--log-level", "DEBUG", "--debug")
    outs += [r.stdout, r.stderr]
    r = run_cli("status", plan_id, "--config", cfgpath, "--json")
    outs += [r.stdout]
    plan_dir = os.path.join(cfg.work_dir, "plans", plan_id)
    for name in ("manifest.json", "summary.json"):
        outs.append(open(os.path.join(plan_dir, name)).read())
    for f in os.listdir(os.path.join(plan_dir, "progress")):
        outs.append(open(os.path.join(plan_dir, "progress", f)).read())
    blob = "\n".join(outs)
    assert "summary: planned=" in blob
    leaked = [k for k in keys if k in blob]
    assert leaked == []


def test_summary_groups_are_read_in_parallel_in_order_and_a_bounded_way_ahead():
    import threading as _t

    from shardmove import executor as ex

    started = []
    lock = _t.Lock()

    def work(i):
        with lock:
            started.append(i)
        time.sleep(0.002 * (i % 3))
        return i * 10

    gen = ex._in_order(work, list(range(40)))
    assert next(gen) == 0
    time.sleep(0.05)
    assert len(started) <= 2 * ex.SUMMARY_GROUP_THREADS + 1  # never far ahead of the consumer
    assert [0] + list(gen) == [i * 10 for i in range(40)]

    def bad(i):
        if i == 5:
            raise ValueError("group 5")
        return i

    with pytest.raises(ValueError, match="group 5"):
        list(ex._in_order(bad, list(range(20))))
