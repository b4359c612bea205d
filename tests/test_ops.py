"""Operator workflows: failures export, retry-failed, post-verification,
catch-up plans, rollback and cleanup.

Real SQLite stores, the real planner and executor on the in-memory engine;
faults come from the seeded wrappers (pipeline/faults.py); the CLI is run as
a subprocess where a process must die or an exit code is the point.
"""
import dataclasses
import json
import os
import re
import sqlite3
import stat

import pyarrow.parquet as pq
import pytest

from shardmove import api
from shardmove import ops
from pipeline import checkpoint as ckpt
from pipeline import states as S
from pipeline.config import load_config
from pipeline.errors import Refused
from shardmove.executor import summarize
from pipeline.keys import short_hash_of_key, text_form
from shardmove.planner import build_ring, load_manifest
from pipeline.stores.sqlite import SqliteDataStore, SqliteMapStore

from conftest import run_cli
from services import tree


def quiet(_line):
    pass


def keyspace(tmp_path, keys=600, **opts):
    """A demo keyspace whose YAML carries the test options (so the CLI sees them too)."""
    info = api.create_demo_keyspace(str(tmp_path / "ks"), keys=keys, shards=4)
    base = {"swap_batch_size": 50, "hash_buckets": 2, "retry_base_delay": "1ms", "checkpoint_flush_interval": "50ms"}
    base.update(opts)
    with open(info["config"], "a") as f:
        for k, v in base.items():
            f.write(f"{k}: {v}\n")
    cfg = load_config(info["config"])
    con = sqlite3.connect(cfg.map_store["path"])  # a witness of map writes, independent of the executor
    con.executescript("""
        CREATE TABLE IF NOT EXISTS test_writes(key TEXT);
        CREATE TRIGGER IF NOT EXISTS test_count_writes AFTER UPDATE ON shard_map
        BEGIN INSERT INTO test_writes VALUES (NEW.key); END;
    """)
    con.commit()
    con.close()
    return info["config"], cfg


def faulty(cfg, faults):
    return dataclasses.replace(cfg, faults=faults)


def plan_and_run(cfg, run_cfg=None):
    res = api.plan(cfg, out=quiet)
    run = api.run(run_cfg or cfg, res.plan_dir, out=quiet)
    return res.plan_dir, load_manifest(res.plan_dir), run


def merged(plan_dir, m):
    """key -> (state, reason, epoch, time_ms, source, target)."""
    out = {}
    for f in m["files"]:
        t = ckpt.read_group(plan_dir, m["plan_id"], f["group"]).table
        for k, s, r, e, tm in zip(t["key"].to_pylist(), t["state"].to_pylist(), t["reason"].to_pylist(),
                                  t["epoch"].to_pylist(), t["time_ms"].to_pylist()):
            out[k] = (s, r, e, tm, f["source"], f["target"])
    return out


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


def shard_file(cfg, shard):
    return os.path.join(cfg.data_store["directory"], f"{shard}.sqlite")


def records(cfg, shard):
    """text key -> (value, version)."""
    if not os.path.exists(shard_file(cfg, shard)):
        return {}
    con = sqlite3.connect(shard_file(cfg, shard))
    rows = {k: (bytes(v), ver) for k, v, ver in con.execute("SELECT key, value, version FROM records")}
    con.close()
    return rows


def sql(cfg, shard, statement, *params):
    con = sqlite3.connect(shard_file(cfg, shard))
    con.execute(statement, params)
    con.commit()
    con.close()


def no_key_in(text, cfg):
    leaked = [k for k in map_rows(cfg) if k in text]
    assert leaked == [], f"{len(leaked)} keys printed"


# ------------------------------------------------------------------ failures

def test_failures_export_owner_only_columns_and_counts(tmp_path):
    path, cfg = keyspace(tmp_path, max_retries=1)
    plan_dir, m, run = plan_and_run(cfg, faulty(cfg, {"seed": 3, "copy": {"permanent_rate": 0.1},
                                                      "verify": {"mismatch_rate": 0.1}}))
    summary = run.summary
    assert set(summary["failures_by_reason"]) == {"permanent", "verify_mismatch"}
    out = tmp_path / "failed.parquet"
    r = run_cli("failures", plan_dir, "--config", path, "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    t = pq.read_table(out)
    assert t.schema.names == ops.FAILURES_SCHEMA.names
    assert t.num_rows == summary["failed"]
    by_reason = {}
    for reason in t["reason"].to_pylist():
        by_reason[reason] = by_reason.get(reason, 0) + 1
    assert by_reason == summary["failures_by_reason"]
    for reason, n in summary["failures_by_reason"].items():
        assert f"failed[{reason}]: {n}" in r.stdout
    states = merged(plan_dir, m)
    tgt_records = records(cfg, "s4")
    for row in t.to_pylist():
        key = row["key"]
        st = states[key]
        assert st[0] == S.State.FAILED and row["state"] == "failed"
        assert (row["reason"], row["epoch"], row["time_ms"], row["source"], row["target"]) == (st[1], *st[2:])
        assert row["key_text"] == text_form(key, cfg.key_type) and row["key_id"] == short_hash_of_key(key)
        assert row["map_shard"] == row["source"]
        # a verify mismatch happens after the copy: its target copy is left behind
        assert row["target_copy"] == (row["reason"] == "verify_mismatch") == (row["key_text"] in tgt_records)
        assert row["failed_in"] == {"permanent": "copy", "verify_mismatch": "verify"}[row["reason"]]
    copies = summary["failures_by_reason"]["verify_mismatch"]
    assert f"target copies left behind: {copies} (removable by cleanup: {copies})" in r.stdout
    no_key_in(r.stdout + r.stderr, cfg)


def test_retry_failed_retries_exactly_the_failed_keys(tmp_path):
    _path, cfg = keyspace(tmp_path, keys=500)
    plan_dir, m, first = plan_and_run(cfg, faulty(cfg, {"seed": 1, "copy": {"permanent_rate": 0.25}}))
    before = merged(plan_dir, m)
    failed = {k for k, v in before.items() if v[0] == S.State.FAILED}
    assert 0 < len(failed) < m["moves"] and first.summary["failed"] == len(failed)
    res = api.run(cfg, plan_dir, retry_failed=True, out=quiet)
    assert res.exit_code == 0 and res.summary["done"] == m["moves"]
    assert res.metrics["copied"] == len(failed) and res.metrics["swapped"] == len(failed)
    after = merged(plan_dir, m)
    for k, v in after.items():
        if k in failed:
            assert v[0] == S.State.DONE and v[2] > before[k][2]  # redone in the new epoch
        else:
            assert v == before[k]  # Done keys untouched: same record, same epoch and time
    assert all(n == 1 for n in write_counts(cfg).values()) and len(write_counts(cfg)) == m["moves"]


# -------------------------------------------------------------------- verify

def test_verify_passes_clean_run_and_finds_planted_corruption(tmp_path):
    path, cfg = keyspace(tmp_path)
    plan_dir, m, _run = plan_and_run(cfg)
    res = ops.verify_plan(cfg, plan_dir, sample=10000, seed=7, out=quiet)
    assert res.clean and res.exit_code == 0
    assert res.moved.sampled == res.moved.ok == m["moves"]
    assert res.stable.sampled == res.stable.baseline_recorded == m["keys_examined"] - m["moves"]
    small = [ops.verify_plan(cfg, plan_dir, sample=20, seed=3, out=quiet).to_dict() for _ in range(2)]
    assert small[0] == small[1] and small[0]["moved"]["sampled"] == 20

    states = merged(plan_dir, m)
    done = sorted(k for k, v in states.items() if v[0] == S.State.DONE)
    rewritten, corrupted = done[0], done[1]
    tgt_of = {k: v[5] for k, v in states.items()}
    ds = SqliteDataStore(cfg.data_store["directory"], cfg.key_type)
    ds.put_many(tgt_of[rewritten], [(rewritten, b"written by the application after the swap")])
    sql(cfg, tgt_of[corrupted], "UPDATE records SET value = ? WHERE key = ?", b"bit rot", corrupted.decode())
    mp = map_rows(cfg)
    stable = sorted(k for k in mp if k.encode() not in states)
    missing, changed = stable[0], stable[1]
    sql(cfg, mp[missing], "DELETE FROM records WHERE key = ?", missing)
    sql(cfg, mp[changed], "UPDATE records SET value = ? WHERE key = ?", b"flipped in place", changed)

    r = run_cli("verify", plan_dir, "--config", path, "--sample", "10000", "--seed", "7", "--json")
    assert r.returncode == 3, r.stderr
    rep = json.loads(r.stdout)
    assert rep["moved"]["mismatches"] == {"content_mismatch": 1}
    assert rep["moved"]["examples"]["content_mismatch"] == [short_hash_of_key(corrupted)]
    assert rep["moved"]["rewritten"] == 1
    assert rep["stable"]["mismatches"] == {"record_missing": 1, "content_changed": 1}
    assert rep["stable"]["examples"]["content_changed"] == [short_hash_of_key(changed.encode())]
    assert rep["mismatches"] == 3 and not rep["clean"]
    no_key_in(r.stdout + r.stderr, cfg)


# ------------------------------------------------------------------- catch-up

def test_catchup_plans_exactly_the_keys_written_after_the_snapshot(tmp_path):
    _path, cfg = keyspace(tmp_path)
    plan_dir, m, run = plan_and_run(cfg)
    assert run.summary["done"] == m["moves"] > 0
    new = [f"late-{i:04d}".encode() for i in range(150)]
    SqliteMapStore(cfg.map_store["path"], cfg.key_type).put_many([(k, "s0") for k in new])
    SqliteDataStore(cfg.data_store["directory"], cfg.key_type).put_many("s0", [(k, b"v" + k) for k in new])
    ring = build_ring(cfg)
    expected = {k for k in new if ring.assign_one(k) != "s0"}
    assert expected

    lines = []
    res = ops.plan_since(cfg, plan_dir, out=lines.append)
    cm = res.manifest
    # the catch-up snapshot: the new keys plus the keys the first plan swapped (versions above its cutoff)
    assert cm["keys_examined"] == len(new) + m["moves"]
    snap = cm["snapshot"]["location"]
    assert os.path.basename(snap).startswith("catchup-")
    assert all(stat.S_IMODE(os.stat(os.path.join(snap, f)).st_mode) == 0o600 for f in os.listdir(snap))
    moved = set()
    for f in cm["files"]:
        moved |= set(pq.read_table(os.path.join(res.plan_dir, "moves", f["group"] + ".parquet"))["key"].to_pylist())
    assert moved == expected  # the first plan's keys sit on their target: no move for them
    run2 = api.run(cfg, res.plan_dir, out=quiet)
    assert run2.summary["done"] == len(expected) and run2.exit_code == 0
    mp = map_rows(cfg)
    assert all(mp[k.decode()] == ring.assign_one(k) for k in new)
    # a catch-up of the catch-up continues from the fresh cutoff: nothing left to move
    again = ops.plan_since(cfg, res.plan_dir, dry_run=True, out=quiet)
    assert again.manifest["moves"] == 0 and again.manifest["keys_examined"] == len(expected)


# ------------------------------------------------------------------- rollback

def test_rollback_preserves_target_writes_and_resumes_after_crashes(tmp_path):
    path, cfg = keyspace(tmp_path, keys=1000)
    plan_dir, m, run = plan_and_run(cfg)
    states = merged(plan_dir, m)
    done = sorted(k for k, v in states.items() if v[0] == S.State.DONE)
    assert len(done) == m["moves"] >= 150
    src_of = {k: states[k][4] for k in done}
    tgt_of = {k: states[k][5] for k in done}
    ds = SqliteDataStore(cfg.data_store["directory"], cfg.key_type)
    ms = SqliteMapStore(cfg.map_store["path"], cfg.key_type)
    # application writes on the target after the swap (a higher version than the copy)
    written = {k: b"new value of " + k for k in done[:20]}
    for k, v in written.items():
        ds.put_many(tgt_of[k], [(k, v)])
    # refused: a key moved on to a third shard; a key whose stale source record is newer
    elsewhere, newer = done[-1], done[-2]
    third = next(s for s in cfg.current_shards if s not in (src_of[elsewhere], tgt_of[elsewhere]))
    assert ms.swap_batch([(elsewhere, tgt_of[elsewhere], third)]).committed
    ds.put_many(src_of[newer], [(newer, b"written on the old source after the swap")])
    expected = {k: (written.get(k) or records(cfg, tgt_of[k])[k.decode()][0]) for k in done}
    untouched = {k: (records(cfg, src_of[k])[k.decode()], records(cfg, tgt_of[k])[k.decode()])
                 for k in (elsewhere, newer)}
    n = len(done) - 2

    def crash_config(name, after):
        p = os.path.join(os.path.dirname(path), name)
        with open(path) as src, open(p, "w") as f:
            # small batches: more chunks than the copy and verify windows hold, so a crash
            # mid-copy leaves keys in every state
            f.write(src.read() + f"checkpoint_flush_every_transitions: 1\nswap_batch_size: 5\n"
                                 f"faults: {{crash_after_transitions: {after}}}\n")
        return p

    # without --apply: a dry run -- the reverse plan's counts, nothing written, exit 0
    work_before, map_before = tree(cfg.work_dir), map_rows(cfg)
    r = run_cli("rollback", plan_dir, "--config", path)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert f"rollback (dry run): moves={n} already_at_source=0 refused=2" in r.stdout
    assert sum(int(l.rsplit(": ", 1)[1]) for l in r.stdout.splitlines() if l.startswith("pair ")) == n
    assert "refused[not_at_target]: 1" in r.stdout and "rerun with --apply" in r.stdout
    assert tree(cfg.work_dir) == work_before and map_rows(cfg) == map_before  # nothing changed, no lease
    # 1st crash: mid-copy (copy, verify and swap are fused, so earlier chunks got further)
    r = run_cli("rollback", plan_dir, "--apply", "--config", crash_config("crash1.yaml", n))
    assert r.returncode == 137, (r.stdout, r.stderr)
    rids = json.load(open(os.path.join(plan_dir, "rollbacks.json")))["rollback_plans"]
    assert len(rids) == 1
    rdir = os.path.join(cfg.work_dir, "plans", rids[0])
    rm = load_manifest(rdir)
    assert rm["rollback_of"] == m["plan_id"] and rm["moves"] == n
    assert rm["refused"] == {"not_at_target": 1, "source_newer": 1}
    st = summarize(rdir, rm)["states"]
    to_copy = st["planned"] + st["copying"]
    to_verify = to_copy + st["copied"] + st["verifying"]
    to_swap = n - st["done"]
    # copying every key takes 2n transitions (Copying, Copied) and the copy window holds only a
    # few chunks: some keys are copied (and maybe further), some not yet
    assert 0 < to_copy < n and to_verify <= to_swap
    with pytest.raises(Refused, match="rollback .* is unfinished"):  # its copies must not be cleaned up
        ops.cleanup(cfg, plan_dir, older_than=0, out=quiet)
    lines = []
    dry = ops.rollback(cfg, plan_dir, out=lines.append)  # the dry run names the rollback it would resume
    assert dry.exit_code == 0 and dry.dry_run and dry.plan_id == rids[0]
    assert any(l.startswith(f"rollback (dry run): would resume rollback {rids[0][:12]}: moves={n}") for l in lines)
    # 2nd crash: mid-swap. Every unfinished key records at least two more transitions (one
    # before its swap, Done after it), in windows of a few chunks, so after `to_swap` of them
    # later chunks are still unswapped. (to_verify + to_swap used to be the point: under load
    # it sometimes landed after the last swap, since in-progress markers are not all counted.)
    r = run_cli("rollback", plan_dir, "--apply", "--config", crash_config("crash2.yaml", to_swap))
    assert r.returncode == 137, (r.stdout, r.stderr)
    mp = map_rows(cfg)
    back = sum(1 for k in done if mp[k.decode()] == src_of[k])
    assert 0 < back < n  # the map is half swapped back
    # resume to the end: same rollback plan, every eligible key back on its source
    r = run_cli("rollback", plan_dir, "--apply", "--config", path)
    assert r.returncode == 3, (r.stdout, r.stderr)  # complete, but two keys were refused
    assert f"plan id: {rids[0]}" in r.stdout
    assert f"summary: planned={n} done={n} failed=0" in r.stdout
    assert "refused[not_at_target]: 1" in r.stdout and "refused[source_newer]: 1" in r.stdout
    assert json.load(open(os.path.join(plan_dir, "rollbacks.json")))["rollback_plans"] == rids
    mp = map_rows(cfg)
    for k in done:
        text = k.decode()
        if k in untouched:
            assert (records(cfg, src_of[k])[text], records(cfg, tgt_of[k])[text]) == untouched[k]
            continue
        assert mp[text] == src_of[k]
        assert records(cfg, src_of[k])[text][0] == expected[k]  # writes made on the target survive
    assert mp[elsewhere.decode()] == third and mp[newer.decode()] == tgt_of[newer]
    # swapped once forward and once back; the refused ones were never swapped back
    wc = write_counts(cfg)
    assert all(wc[k.decode()] == 2 for k in done if k not in untouched)
    no_key_in(r.stdout + r.stderr, cfg)
    # a rerun finds nothing more to roll back
    lines = []
    again = ops.rollback(cfg, plan_dir, apply=True, out=lines.append)
    assert again.plan_id == rids[0] and "nothing to do: plan already complete" in lines


# -------------------------------------------------------------------- cleanup

def test_cleanup_deletes_nothing_without_apply_and_never_a_mapped_copy(tmp_path):
    path, cfg = keyspace(tmp_path, max_retries=1)
    plan_dir, m, run = plan_and_run(cfg, faulty(cfg, {"seed": 5, "verify": {"mismatch_rate": 0.2}}))
    states = merged(plan_dir, m)
    done = sorted(k for k, v in states.items() if v[0] == S.State.DONE)
    failed = sorted(k for k, v in states.items() if v[0] == S.State.FAILED)
    assert done and len(failed) >= 2
    ms = SqliteMapStore(cfg.map_store["path"], cfg.key_type)
    # the map moved behind the plan's back: the copy it points to must survive
    back, forward = done[0], failed[0]
    assert ms.swap_batch([(back, states[back][5], states[back][4])]).committed
    assert ms.swap_batch([(forward, states[forward][4], states[forward][5])]).committed
    shards = sorted(cfg.known_shards())
    before = {s: records(cfg, s) for s in shards}

    r = run_cli("cleanup", plan_dir, "--config", path, "--older-than", "0s")
    assert r.returncode == 0, r.stderr
    assert {s: records(cfg, s) for s in shards} == before  # a dry run deletes nothing
    assert f"would delete source copies of done keys: {len(done) - 1} keys" in r.stdout
    assert f"would delete target copies of failed keys: {len(failed) - 1} keys" in r.stdout
    no_key_in(r.stdout + r.stderr, cfg)
    recent = ops.cleanup(cfg, plan_dir, older_than=3600, apply=True, out=quiet)
    assert recent.source_total == (0, 0) and recent.target_total == (0, 0)
    assert recent.skipped["too_recent"] == len(done) + len(failed)
    assert {s: records(cfg, s) for s in shards} == before

    res = ops.cleanup(cfg, plan_dir, older_than=0, apply=True, out=quiet)
    assert res.source_total[0] == len(done) - 1 and res.target_total[0] == len(failed) - 1
    assert res.skipped == {"map_not_at_target": 1, "map_not_at_source": 1}
    nbytes = sum(len(before[states[k][4]][k.decode()][0]) for k in done if k != back)
    assert res.source_total[1] == nbytes
    after = {s: records(cfg, s) for s in shards}
    for key, shard in map_rows(cfg).items():  # every key still has its record where the map points
        assert after[shard][key] == before[shard][key]
    for k in done:
        assert (k.decode() in after[states[k][4]]) == (k == back)
    for k in failed:
        assert (k.decode() in after[states[k][5]]) == (k == forward)
    again = ops.cleanup(cfg, plan_dir, older_than=0, apply=True, out=quiet)  # idempotent
    assert again.source_total == (0, 0) and again.target_total == (0, 0)
    assert {s: records(cfg, s) for s in shards} == after


def test_cleanup_refuses_an_unfinished_or_live_plan_and_changes_nothing(tmp_path):
    """An interrupted forward run: cleanup (dry run and --apply) exits 4 with one line and
    touches nothing -- no record, no lease; a live lease likewise.  Once the run is
    finished, the same cleanup deletes."""
    path, cfg = keyspace(tmp_path, keys=1000)
    res = api.plan(cfg, out=quiet)
    plan_dir = res.plan_dir
    crash = os.path.join(os.path.dirname(path), "crash.yaml")
    with open(path) as src, open(crash, "w") as f:
        f.write(src.read() + "checkpoint_flush_every_transitions: 1\nswap_batch_size: 5\n"
                             f"faults: {{crash_after_transitions: {res.manifest['moves']}}}\n")
    r = run_cli("run", plan_dir, "--config", crash)
    assert r.returncode == 137, (r.stdout, r.stderr)
    st = summarize(plan_dir, load_manifest(plan_dir))
    assert 0 < st["done"] < st["planned"] and not st["complete"]  # some source copies are deletable
    shards = sorted(cfg.known_shards())
    before = {s: records(cfg, s) for s in shards}
    lease_before = open(os.path.join(plan_dir, "lease.json")).read()
    for extra in ((), ("--apply",)):
        r = run_cli("cleanup", plan_dir, "--config", path, "--older-than", "0s", *extra)
        assert r.returncode == 4, (extra, r.stdout, r.stderr)
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: cleanup: the plan is unfinished"), r.stderr
        assert "would delete" not in r.stdout and "deleted" not in r.stdout
        assert {s: records(cfg, s) for s in shards} == before
        assert open(os.path.join(plan_dir, "lease.json")).read() == lease_before
        no_key_in(r.stdout + r.stderr, cfg)
    with pytest.raises(Refused, match="unfinished"):
        ops.cleanup(cfg, plan_dir, older_than=0, apply=True, out=quiet)

    assert api.run(cfg, plan_dir, out=quiet).exit_code == 0
    # a live run of the plan (its lease held): refused too, dry run included
    from pipeline.lease import acquire

    lease = acquire(plan_dir, res.plan_id, 60)
    try:
        for extra in ((), ("--apply",)):
            r = run_cli("cleanup", plan_dir, "--config", path, "--older-than", "0s", *extra)
            assert r.returncode == 4 and "is live (lease held by" in r.stderr, (extra, r.stderr)
            assert r.stderr.count("\n") == 1
    finally:
        lease.release()
    done_before = {s: records(cfg, s) for s in shards}
    r = run_cli("cleanup", plan_dir, "--config", path, "--older-than", "0s")
    assert r.returncode == 0, r.stderr
    would = int(re.search(r"would delete source copies of done keys: (\d+) keys", r.stdout).group(1))
    # keys found at their target on resume (Done lost to the crash) have no copy record: skipped
    skipped = re.search(r"skipped\[no_copy_record\]: (\d+)", r.stdout)
    assert would > 0 and would + (int(skipped.group(1)) if skipped else 0) == res.manifest["moves"]
    assert {s: records(cfg, s) for s in shards} == done_before
    r = run_cli("cleanup", plan_dir, "--config", path, "--older-than", "0s", "--apply")
    assert r.returncode == 0, r.stderr
    assert f"deleted source copies of done keys: {would} keys" in r.stdout


def test_rollback_right_after_a_killed_run_is_not_refused_by_its_live_claim(tmp_path):
    """A run killed before releasing its claim on the map store's run registry leaves the
    claim live for lease_ttl; the rollback takes the plan's lease (its holder is dead),
    supersedes and frees that claim, and rolls back at once instead of exit 4."""
    import time

    from pipeline.lease import read_lease

    path, cfg = keyspace(tmp_path, keys=400)
    plan_dir, m, run = plan_and_run(cfg)
    assert run.exit_code == 0
    epoch = read_lease(plan_dir)["epoch"]
    ms = SqliteMapStore(cfg.map_store["path"], cfg.key_type)
    ms.claim_run(m["plan_id"], epoch, (0, 255), "gone-host:1", 3600, time.time())  # what the kill left
    ms.close()
    r = run_cli("rollback", plan_dir, "--apply", "--config", path)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert re.search(r"summary: planned=(\d+) done=\1 failed=0", r.stdout), r.stdout


def test_cleanup_apply_never_runs_beside_a_live_run_of_a_plan_that_may_move_the_same_keys(tmp_path):
    """cleanup --apply claims the plan's window in the map store's run registry, as a run
    does: while another plan whose window overlaps is running, it refuses (exit 4) and
    deletes nothing; while it holds the claim, such a run cannot start -- so that run's
    swaps and cleanup's deletes of copies never interleave (a copy deleted just after the
    key was swapped to it would be the key's only record)."""
    import time

    path, cfg = keyspace(tmp_path, max_retries=1)
    plan_dir, m, run = plan_and_run(cfg, faulty(cfg, {"seed": 5, "verify": {"mismatch_rate": 0.2}}))
    shards = sorted(cfg.known_shards())
    before = {s: records(cfg, s) for s in shards}
    ms = SqliteMapStore(cfg.map_store["path"], cfg.key_type)
    other = "f" * 64  # another plan, live, over the same window (the default: the whole ring)
    ms.claim_run(other, 1, (0, 255), "elsewhere:1", 60, time.time())
    try:
        r = run_cli("cleanup", plan_dir, "--config", path, "--older-than", "0s", "--apply")
        assert r.returncode == 4, (r.stdout, r.stderr)
        assert r.stderr.count("\n") == 1 and f"plan {other[:12]}" in r.stderr, r.stderr
        assert {s: records(cfg, s) for s in shards} == before
        no_key_in(r.stdout + r.stderr, cfg)
    finally:
        ms.release_run(other, 1)

    # cleanup holding its claim: the other plan's run is refused meanwhile
    from shardmove.workflows import _common

    lease, claim = _common.plan_lease_and_claim(cfg, plan_dir, m)
    try:
        with pytest.raises(Refused, match=m["plan_id"][:12]):
            ms.claim_run(other, 2, (0, 255), "elsewhere:2", 60, time.time())
    finally:
        _common.release_lease_and_claim(lease, claim)
    ms.claim_run(other, 3, (0, 255), "elsewhere:3", 60, time.time())  # given back: free again
    ms.release_run(other, 3)
    res = ops.cleanup(cfg, plan_dir, older_than=0, apply=True, out=quiet)
    assert res.source_total[0] > 0
