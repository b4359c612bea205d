"""The executor at its edges: keys swapped before a crash, the state machine as the
truth of what is recorded, checkpoints flushed by a timer.  Real SQLite stores, the
real Beam executor on the in-memory engine (FnApiRunner, pinned by transforms.runner)."""
import json
import os
import threading

import pytest

from shardmove import api
from shardmove.executor import status_exit_code
from pipeline import checkpoint as ckpt
from pipeline import states as S
from pipeline.keys import text_form
from pipeline.stores.sqlite import SqliteDataStore, SqliteMapStore

from test_executor import (_write_states, key_states, make_keyspace, map_rows, plan_moves, planned,
                           quiet, records, with_faults, write_counts)
from test_reliability import Writer


# ---------------------------------------------- item 7: moved keys are never Failed

@pytest.mark.parametrize("state", [S.State.COPIED, S.State.VERIFYING])
def test_key_swapped_then_written_on_target_resumes_done_not_failed(tmp_path, state):
    """The swap committed, the application wrote the key on its new shard, and the executor
    died while the key's last checkpoint still said Copied/Verifying: the rerun finds the key
    at its target and confirms it (Done, already_swapped) -- it never verifies the
    application's data against the copy-time hash, never re-copies over it, never fails it."""
    cfg = make_keyspace(tmp_path, keys=300)
    plan_dir, m = planned(cfg)
    _write_states(cfg, plan_dir, m, state)  # copies made, hashes recorded
    ms = SqliteMapStore(cfg.map_store["path"], cfg.key_type)
    ds = SqliteDataStore(cfg.data_store["directory"], cfg.key_type)
    moves = plan_moves(plan_dir, m)
    for k, s, t in moves:  # the swap committed; its later records were lost
        assert ms.swap_batch([(k, s, t)]).committed
    written = {k: b"written by the application on the new shard " + k for k, _s, _t in moves}
    for k, _s, t in moves:
        ds.put_many(t, [(k, written[k])])
    res = api.run(cfg, plan_dir, out=quiet)
    n = m["moves"]
    assert (res.summary["done"], res.summary["failed"]) == (n, 0), res.summary["failures_by_reason"]
    assert res.summary["done_by_verification"] == {"already_swapped": n}
    assert res.exit_code == 0
    mp = map_rows(cfg)
    for k, _s, t in moves:
        assert mp[text_form(k, cfg.key_type)] == t
        assert records(cfg, t)[text_form(k, cfg.key_type)] == written[k]  # the application's data
    assert all(c == 1 for c in write_counts(cfg).values())  # the map was not written again
    assert res.metrics.get("copied", 0) == 0 and res.metrics.get("recopied", 0) == 0


def test_key_swapped_during_a_mismatch_is_spared(tmp_path):
    """A key whose verification keeps failing while the map routes it to its target (a
    duplicate bundle, another executor) is migrated: Done(already_swapped), not Failed."""
    cfg = with_faults(make_keyspace(tmp_path, keys=300, max_retries=1), {"verify": {"mismatch_rate": 1.0}})
    plan_dir, m = planned(cfg)
    moves = plan_moves(plan_dir, m)
    ms = SqliteMapStore(cfg.map_store["path"], cfg.key_type)
    swapped = moves[: len(moves) // 2]
    orig = SqliteDataStore.hashes

    def hashes(self, keys, shard):  # the swap lands between the copy and its verification
        for k, s, t in swapped:
            if k in keys:
                ms.swap_batch([(k, s, t)])
        return orig(self, keys, shard)

    SqliteDataStore.hashes = hashes
    try:
        res = api.run(cfg, plan_dir, out=quiet)
    finally:
        SqliteDataStore.hashes = orig
    st = key_states(plan_dir, m)
    for k, _s, _t in swapped:
        assert st[k][0] == S.State.DONE and st[k][2] == S.VERIFY_ALREADY
    assert res.summary["failures_by_reason"] == {"verify_mismatch": len(moves) - len(swapped)}


# ---------------------------------------------- item 13: the state machine is the truth

def test_writer_enforces_the_state_machine(tmp_path):
    w = ckpt.CheckpointWriter(str(tmp_path), "a" * 64, "s0~s1~0000", 1, check_transitions=True)
    w.record_many([b"k1", b"k2"], None, S.State.COPYING, 1, prev=S.State.PLANNED)
    with pytest.raises(S.TransitionError, match=r"not allowed by the state machine: 1 x copied -> verified"):
        w.record_many([b"k1", b"k2"], None, S.State.VERIFIED, 1, prev=[S.State.COPIED, S.State.VERIFYING])
    with pytest.raises(S.TransitionError, match="1 x swapping -> copying"):
        w.record(b"k3", None, S.State.COPYING, 2, prev=S.State.SWAPPING)
    with pytest.raises(TypeError, match="pass prev"):
        w.record_many([b"k1"], None, S.State.COPIED, 1)
    assert len(w) == 2  # nothing refused was buffered
    with pytest.raises(S.TransitionError):  # any writer checks a transition it is told about
        ckpt.CheckpointWriter(str(tmp_path), "a" * 64, "s0~s1~0000", 1).record(
            b"k", None, S.State.DONE, 1, prev=S.State.VERIFIED)


@pytest.mark.parametrize("fence", ["auto", "recheck"])
def test_fault_injected_run_with_live_writer_records_only_allowed_transitions(tmp_path, fence):
    """A witness on CheckpointWriter.record_many and record_chunk (the executor's fast path;
    independent of the writer's own check)
    sees every transition of a run under copy, verify and swap faults with an application
    writing the sources: each leaves the state the key was in by an allowed transition."""
    cfg = with_faults(make_keyspace(tmp_path, keys=1200, write_fence=fence, swap_batch_size=40, max_retries=3,
                                    copy_concurrency=4),
                      {"seed": 5,  # single-key copies: a chunk's keys wait for its last copy, the writer hits them
                       "copy": {"transient_rate": 0.1, "permanent_rate": 0.02, "latency_ms": 20, "keys_per_call": 1},
                       "verify": {"transient_rate": 0.05, "mismatch_first": 1},
                       "swap": {"transient_rate": 0.2, "latency_ms": 10}})
    plan_dir, m = planned(cfg)
    seen, bad = {}, {}
    lock = threading.Lock()
    orig = ckpt.CheckpointWriter.record_many
    orig_chunk = ckpt.CheckpointWriter.record_chunk

    last = {}  # key -> the state last recorded for it (a fresh plan: every key starts Planned)
    wrong_prev = []

    def look(keys, states, prev):
        with lock:
            for j, k in enumerate(keys.to_pylist() if hasattr(keys, "to_pylist") else keys):
                t = (last.get(k, S.State.PLANNED), S.State(int(states)))
                last[k] = t[1]
                seen[t] = seen.get(t, 0) + 1
                if not S.can_transition(*t):
                    bad[t] = bad.get(t, 0) + 1
                if prev is not None and int(prev if isinstance(prev, int) else prev[j]) != t[0]:
                    wrong_prev.append(t)

    def witness(self, keys, key_hashes=None, states=None, attempts=None, *a, **kw):
        look(keys, states, kw.get("prev"))
        return orig(self, keys, key_hashes, states, attempts, *a, **kw)

    def witness_chunk(self, keys, key_hashes, state, attempts, *a, **kw):
        look(keys, state, kw.get("prev"))
        return orig_chunk(self, keys, key_hashes, state, attempts, *a, **kw)

    ckpt.CheckpointWriter.record_many = witness
    ckpt.CheckpointWriter.record_chunk = witness_chunk
    w = Writer(cfg, plan_moves(plan_dir, m), fence_aware=False, seed=3, pause=0.001)
    w.start()
    try:
        res = api.run(cfg, plan_dir, out=quiet)
    finally:
        w.stop.set()
        w.join()
        ckpt.CheckpointWriter.record_many = orig
        ckpt.CheckpointWriter.record_chunk = orig_chunk
    assert bad == {}, bad
    assert wrong_prev == []  # the executor tells the writer the state each key really leaves
    assert res.exit_code in (0, 3)
    assert res.summary["done"] + res.summary["failed"] == m["moves"]
    # the paths that used to break the table were taken
    assert res.metrics.get("source_changed_recopies", 0) > 0 and res.metrics.get("recopied", 0) > 0
    assert seen.get((S.State.SWAPPING, S.State.VERIFIED), 0) > 0
    assert seen.get((S.State.VERIFIED, S.State.COPYING), 0) > 0
    assert w.writes > 20



@pytest.mark.parametrize("state", [S.State.PLANNED, S.State.COPYING, S.State.COPIED, S.State.VERIFYING,
                                   S.State.VERIFIED, S.State.SWAPPING, S.State.FAILED])
@pytest.mark.parametrize("swapped", [False, True])
def test_resume_from_each_state_records_only_allowed_transitions(tmp_path, state, swapped):
    """Across runs too: a rerun's first record for a key leaves the state its merged
    checkpoint holds (Failed with --retry-failed), whether or not an earlier run's swap
    already applied, and every later one follows the table."""
    cfg = make_keyspace(tmp_path, keys=300)
    plan_dir, m = planned(cfg)
    _write_states(cfg, plan_dir, m, state)
    if swapped:
        ms = SqliteMapStore(cfg.map_store["path"], cfg.key_type)
        for k, s_, t in plan_moves(plan_dir, m):
            ms.swap_batch([(k, s_, t)])
    found = {k: S.State(v[0]) for k, v in key_states(plan_dir, m).items()}
    retry = state == S.State.FAILED
    bad = []
    witnessed = []
    orig = ckpt.CheckpointWriter.record_many
    orig_chunk = ckpt.CheckpointWriter.record_chunk

    def look(keys, states):
        for k in keys.to_pylist() if hasattr(keys, "to_pylist") else keys:
            t = (found[k], S.State(int(states)))
            if not S.can_transition(*t, retry_failed=retry and t[0] == S.State.FAILED):
                bad.append(t)
            found[k] = t[1]
            witnessed.append(t)

    def witness(self, keys, key_hashes=None, states=None, attempts=None, *a, **kw):
        look(keys, states)
        return orig(self, keys, key_hashes, states, attempts, *a, **kw)

    def witness_chunk(self, keys, key_hashes, state, attempts, *a, **kw):
        look(keys, state)
        return orig_chunk(self, keys, key_hashes, state, attempts, *a, **kw)

    ckpt.CheckpointWriter.record_many = witness
    ckpt.CheckpointWriter.record_chunk = witness_chunk
    try:
        res = api.run(cfg, plan_dir, retry_failed=retry, out=quiet)
    finally:
        ckpt.CheckpointWriter.record_many = orig
        ckpt.CheckpointWriter.record_chunk = orig_chunk
    assert bad == []
    assert witnessed  # the witness saw the run's transitions (not a vacuous pass)
    assert (res.summary["done"], res.summary["failed"]) == (m["moves"], 0)


# ---------------------------------------------- item 8: the flush interval is a timer

def test_checkpoints_flushed_by_the_interval_while_the_run_goes(tmp_path):
    """Groups smaller than a chunk get their transitions in one burst per stage, far below
    checkpoint_flush_every_transitions: only the interval can commit them.  With a slow
    mover, committed checkpoints (what status and a rerun read) must show keys Done while
    the run is still going, not only at its end."""
    cfg = with_faults(make_keyspace(tmp_path, keys=1000, hash_buckets=16, swap_batch_size=500, copy_concurrency=1,
                                    checkpoint_flush_every_transitions=100000, checkpoint_flush_interval="100ms",
                                    progress_interval="100ms"),
                      {"copy": {"latency_ms": 15, "keys_per_call": 1}})
    plan_dir, m = planned(cfg)
    n = m["moves"]
    assert max(f["rows"] for f in m["files"]) < 100  # every group far below the count threshold
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("res", api.run(cfg, plan_dir, out=quiet)))
    t.start()
    mid_run = []
    while t.is_alive():
        s = api.status(plan_dir).details
        if 0 < s["done"] < n:
            mid_run.append(s["done"])
            # a live executor holds the lease: running (status exit 5), never stopped
            assert s["state"] == "running" and status_exit_code(s) == 5, s["state"]
        t.join(0.05)
    assert result["res"].summary["done"] == n
    assert mid_run, "no Done key was committed before the run ended"
    events = [f for f in os.listdir(os.path.join(plan_dir, "progress")) if not f.startswith("timings")]
    mid_events = [e for e in (json.load(open(os.path.join(plan_dir, "progress", f))) for f in events)
                  if not e["final"] and 0 < e["swapped"] < n]
    assert mid_events  # progress advanced during the run


def test_writer_flush_if_due_commits_a_quiet_buffer_riders_included(tmp_path):
    now = [1000.0]
    w = ckpt.CheckpointWriter(str(tmp_path), "a" * 64, "s0~s1~0000", 1, flush_every=1000, flush_interval_s=2.0,
                              clock=lambda: now[0])
    w.record_many([b"k1"], None, S.State.COPYING, 1, may_flush=False)  # an in-progress marker
    w.flush_if_due()
    assert len(w) == 1 and w.stats.parts == 0  # not due yet
    now[0] += 2.5  # no further transition arrives: the timer alone commits it
    w.flush_if_due()
    assert len(w) == 0 and w.stats.parts == 1
    w.flush_if_due()
    assert w.stats.parts == 1  # nothing buffered, nothing written


def test_writer_keeps_its_buffer_when_settling_an_earlier_commit_raises(tmp_path, monkeypatch):
    """A background flush first settles earlier commits; when one of them fails for good
    (a lost lease, say), the transitions still buffered are kept, not dropped."""
    from concurrent.futures import ThreadPoolExecutor, wait

    from pipeline import fs

    real = fs.create_if_absent
    refuse = {"on": False}

    def flaky(path, data, mode=0o600, **kw):
        if refuse["on"]:
            raise PermissionError("refused")
        return real(path, data, mode, **kw)

    monkeypatch.setattr(ckpt.fs, "create_if_absent", flaky)
    with ThreadPoolExecutor(1) as committer:
        w = ckpt.CheckpointWriter(str(tmp_path), "a" * 64, "s0~s1~0000", 1, flush_every=1, flush_interval_s=3600,
                                  committer=committer)
        refuse["on"] = True
        w.record(b"a", None, S.State.COPIED, 1)  # handed to the committer, which fails
        wait(w._inflight)
        with pytest.raises(PermissionError):
            w.record(b"b", None, S.State.COPIED, 1)  # settling the failed commit raises ...
        assert len(w) == 1  # ... and b is still buffered
        refuse["on"] = False
        w.flush()
    keys = ckpt.read_group(str(tmp_path), "a" * 64, "s0~s1~0000").table.column("key").to_pylist()
    assert sorted(keys) == [b"a", b"b"]
