"""Checkpoints (pipeline/checkpoint/) and the state machine (pipeline/states.py)."""
from __future__ import annotations

import logging
import json
import os
import stat
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings, HealthCheck, strategies as st

from pipeline import checkpoint as cp
from pipeline import fs
from pipeline import keys as K
from pipeline import states as S
from pipeline.errors import BadInput
from pipeline.names import group_id
from pipeline.states import State

PLAN = "a" * 64
OTHER_PLAN = "b" * 64
GID = group_id("s1", "s2", 7)


class FakeClock:
    def __init__(self, t: float = 1_700_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


def _write_part(plan_dir, rows, epoch=1, plan_id=PLAN, gid=GID, extras=None):
    """Write one part with explicit rows: (key, state, attempts[, extras dict of columns])."""
    w = cp.CheckpointWriter(plan_dir, plan_id, gid, epoch, clock=FakeClock(),
                            extras_fn=(lambda: extras) if extras else None)
    for r in rows:
        w.record(*r)
    return w.flush()


def _files(plan_dir, gid=GID):
    return sorted(os.listdir(cp.group_dir(plan_dir, gid)))


# ================================================================ states.py

def test_state_ranks_and_names_pinned():
    assert [(s.name, int(s)) for s in State] == [
        ("PLANNED", 0), ("COPYING", 1), ("COPIED", 2), ("VERIFYING", 3),
        ("VERIFIED", 4), ("SWAPPING", 5), ("DONE", 6), ("FAILED", 7)]
    assert str(State.COPIED) == "copied" and f"{State.COPIED}" == "copied"
    assert f"{State.COPIED:d}" == "2"
    assert State.VERIFYING.label == "Verifying"
    assert State.parse("Swapping") is State.SWAPPING
    assert State.parse("done") is State.DONE and State.parse(7) is State.FAILED
    with pytest.raises(ValueError, match="state must be one of planned, copying"):
        State.parse("finished")


def test_transition_table():
    T = S.TRANSITIONS
    assert set(T) == set(State)
    # forward path
    path = list(State)[:7]
    for a, b in zip(path, path[1:]):
        S.check_transition(a, b)
    # retry loops, re-copy, roll-back
    for a, b in [(State.COPYING, State.COPYING), (State.VERIFYING, State.VERIFYING),
                 (State.SWAPPING, State.SWAPPING), (State.VERIFYING, State.COPYING),
                 (State.SWAPPING, State.VERIFIED), (State.VERIFIED, State.COPYING),
                 (State.PLANNED, State.VERIFIED), (State.COPYING, State.VERIFIED)]:
        assert S.can_transition(a, b)
    # every non-terminal state may fail; terminals go nowhere
    for s in State:
        if S.is_terminal(s):
            assert T[s] == frozenset()
        else:
            assert State.FAILED in T[s]
    assert S.TERMINAL == {State.DONE, State.FAILED}
    for a, b in [(State.PLANNED, State.COPIED), (State.COPIED, State.DONE),
                 (State.DONE, State.COPYING), (State.FAILED, State.COPYING),
                 (State.VERIFIED, State.DONE)]:
        with pytest.raises(S.TransitionError, match=f"{a} -> {b} is not allowed"):
            S.check_transition(a, b)
    S.check_transition(State.FAILED, State.COPYING, retry_failed=True)


def test_check_transitions_agrees_with_the_table_for_every_pair():
    """The batch check (one table look-up per call) refuses exactly what can_transition refuses."""
    for retry_failed in (False, True):
        for b in State:
            allowed = [a for a in State if S.can_transition(a, b, retry_failed=retry_failed)]
            refused = [a for a in State if a not in allowed]
            S.check_transitions(allowed, b, retry_failed=retry_failed)
            S.check_transitions(np.array(allowed, dtype=np.int8), int(b), retry_failed=retry_failed)
            S.check_transitions([], b)
            for a in refused:
                with pytest.raises(S.TransitionError, match=f"1 x {a} -> {b}"):
                    S.check_transitions(allowed + [a], b, retry_failed=retry_failed)
    with pytest.raises(S.TransitionError,
                       match=r"not allowed by the state machine: 2 x copied -> done, 1 x verified -> done\Z"):
        S.check_transitions([5, 4, 2, 5, 2], State.DONE)
    with pytest.raises(ValueError):
        S.check_transitions([1, 9], State.COPYING)


def test_resume_entries_are_allowed_transitions():
    for found in State:
        nxt = S.resume_entry(found)
        if nxt is not None:
            S.check_transition(found, nxt)
    assert S.resume_entry(State.DONE) is None
    assert S.resume_entry(State.FAILED) is None
    assert S.resume_entry(State.FAILED, retry_failed=True) is State.COPYING
    assert S.resume_entry(State.SWAPPING) is State.SWAPPING
    assert S.resume_entry(State.COPIED) is State.VERIFYING


def test_reason_codes():
    assert S.REASONS == {
        "source_missing", "shard_missing", "copy_failed", "verify_mismatch", "verify_failed",
        "map_changed", "swap_failed", "source_changing", "drifted", "permanent", "key_too_long", "constraint"}
    assert S.VERIFY_METHODS == {"full", "hash", "sampled", "forced", "unchecked", "already_swapped"}


# ========================================================= schema & format

def test_schema_pinned():
    assert [(f.name, str(f.type), f.nullable) for f in cp.CHECKPOINT_SCHEMA] == [
        ("key", "binary", False),
        ("key_hash", "uint64", False),
        ("state", "int8", False),
        ("attempts", "int32", False),
        ("reason", "string", True),
        ("content_hash", "fixed_size_binary[16]", True),
        ("source_version", "int64", True),
        ("verify_method", "string", True),
        ("epoch", "int64", False),
        ("time_ms", "int64", False),
    ]
    assert cp.FORMAT_VERSION == 1


def _golden_table() -> pa.Table:
    t = cp.Transitions(clock=FakeClock(1_700_000_000.5))
    t.add(b"user:1", None, State.COPYING, 1)
    t.add(b"user:1", None, State.COPIED, 1, content_hash=bytes(range(16)), source_version=42)
    t.add(b"\x00\xff", 0xFFFF_FFFF_FFFF_FFFF, State.FAILED, 5, reason=S.COPY_FAILED)
    t.add(b"", None, State.DONE, 2, content_hash=b"\xee" * 16, source_version=-1,
          verify_method=S.VERIFY_SAMPLED, time_ms=123)
    return t.to_table(9)


def test_golden_round_trip():
    table = _golden_table()
    assert table.schema.equals(cp.CHECKPOINT_SCHEMA)
    assert table.to_pydict() == {
        "key": [b"user:1", b"user:1", b"\x00\xff", b""],
        "key_hash": [K.stable_hash(b"user:1")] * 2 + [2**64 - 1, K.stable_hash(b"")],
        "state": [1, 2, 7, 6],
        "attempts": [1, 1, 5, 2],
        "reason": [None, None, "copy_failed", None],
        "content_hash": [None, bytes(range(16)), None, b"\xee" * 16],
        "source_version": [None, 42, None, -1],
        "verify_method": [None, None, None, "sampled"],
        "epoch": [9, 9, 9, 9],
        "time_ms": [1_700_000_000_500] * 3 + [123],
    }
    meta = {"format_version": 1, "plan_id": PLAN, "group_id": GID, "epoch": 9, "kind": "part",
            "active_copy": 12}
    data = cp.serialize_table(table, meta)
    assert data[:4] == b"PAR1" and data[-4:] == b"PAR1"
    back, md = cp.parse_part(data)
    assert back.equals(table)
    for name in table.column_names:
        assert back.column(name).to_pylist() == table.column(name).to_pylist()
    assert md == {k: str(v) for k, v in meta.items()}
    # the Parquet physical schema is the wire format
    pf = pq.ParquetFile(pa.BufferReader(data))
    phys = [(c.name, c.physical_type, c.max_definition_level) for c in
            (pf.schema.column(i) for i in range(len(pf.schema)))]
    assert phys == [
        ("key", "BYTE_ARRAY", 0), ("key_hash", "INT64", 0), ("state", "INT32", 0),
        ("attempts", "INT32", 0), ("reason", "BYTE_ARRAY", 1),
        ("content_hash", "FIXED_LEN_BYTE_ARRAY", 1), ("source_version", "INT64", 1),
        ("verify_method", "BYTE_ARRAY", 1), ("epoch", "INT64", 0), ("time_ms", "INT64", 0)]
    assert pf.metadata.row_group(0).column(0).compression == "ZSTD"


def test_written_part_round_trip_and_metadata_from_footer(tmp_path):
    plan = str(tmp_path)
    w = cp.CheckpointWriter(plan, PLAN, GID, 9, clock=FakeClock(1_700_000_000.5),
                            extras_fn=lambda: {"active_copy": 12})
    w.record_table(_golden_table())
    name = w.flush()
    assert cp.part_name(9).startswith("part-00000009-") and name.startswith("part-00000009-")
    path = os.path.join(cp.group_dir(plan, GID), name)
    meta = cp.read_file_metadata(path)
    counts = json.loads(meta.pop("state_counts"))
    assert meta == {
        "format_version": "1", "plan_id": PLAN, "group_id": GID, "epoch": "9", "kind": "part",
        "active_copy": "12"}
    table, _ = cp.parse_part(fs.read_bytes(path))
    assert table.equals(_golden_table())
    # rows per state rank, for progress read from the footer alone
    ranks = table.column("state").to_pylist()
    assert counts == {str(r): ranks.count(r) for r in set(ranks)}
    g = cp.read_group(plan, PLAN, GID)
    assert g.files == (name,) and g.skipped == () and g.rows_read == 4
    assert g.metadata[name]["active_copy"] == "12"
    # winners: user:1 -> Copied (same attempts, higher rank); sorted by (key_hash, key)
    assert g.table.num_rows == 3
    kh = g.table.column("key_hash").to_pylist()
    assert kh == sorted(kh)
    row = {r["key"]: r for r in g.table.to_pylist()}
    assert row[b"user:1"]["state"] == State.COPIED


def test_transitions_builder():
    t = cp.Transitions(clock=FakeClock(10.0))
    assert len(t) == 0 and t.to_table(1).num_rows == 0
    t.add(b"a", None, "copying", 1)
    t.add_many([b"b", b"c"], None, State.COPIED, 1, content_hashes=np.zeros((2, 16), np.uint8),
               verify_methods="hash", source_versions=[1, None])
    t.add(b"d", 5, 2, 0)
    tab = t.to_table(4)
    assert len(t) == 4
    assert tab.column("key").to_pylist() == [b"a", b"b", b"c", b"d"]  # call order kept
    assert tab.column("key_hash").to_pylist()[:3] == [K.stable_hash(k) for k in (b"a", b"b", b"c")]
    assert tab.column("time_ms").to_pylist() == [10_000] * 4
    assert tab.column("source_version").to_pylist() == [None, 1, None, None]
    t.clear()
    assert len(t) == 0
    with pytest.raises(TypeError, match="canonical bytes"):
        t.add("text", None, 1, 1)
    with pytest.raises(ValueError, match="content_hash must be 16 bytes"):
        t.add(b"k", None, 1, 1, content_hash=b"x")
    with pytest.raises(ValueError, match="state"):
        t.add(b"k", None, 9, 1)
    with pytest.raises(ValueError, match="verify_method"):
        t.add(b"k", None, 4, 1, verify_method="eyeballed")
    with pytest.raises(ValueError, match="states must be ranks"):
        t.add_many([b"a"], None, np.array([8], np.int8), 1)
    with pytest.raises(ValueError, match="attempts has 1 values for 2 keys"):
        t.add_many([b"a", b"b"], None, 1, [1])
    assert len(t) == 0


# ================================================================== merge

# Small domains so that ties, duplicates and hash collisions all happen.
_rec = st.tuples(
    st.sampled_from([b"a", b"b", b"c", b"dd", b""]),       # key
    st.integers(0, 2),                                      # epoch
    st.integers(0, 3),                                      # attempts
    st.integers(0, 7),                                      # state
    st.integers(0, 2),                                      # time_ms
    st.one_of(st.none(), st.sampled_from([b"\x00" * 16, b"\xff" * 16, b"\x01" + b"\x00" * 15])),
    st.one_of(st.none(), st.sampled_from(["copy_failed", "drifted"])),
    st.one_of(st.none(), st.sampled_from(["full", "hash"])),
    st.one_of(st.none(), st.integers(-1, 1)),               # source_version
)


def _tables(parts, collide):
    out = []
    for part in parts:
        t = cp.Transitions()
        for key, epoch, att, state, tm, ch, reason, vm, sv in part:
            kh = (K.stable_hash(key) % 2) if collide else K.stable_hash(key)
            t.add(key, kh, state, att, reason, ch, sv, vm, time_ms=tm)
        tab = t.to_table(0)
        epochs = pa.array([r[1] for r in part], pa.int64())
        out.append(tab.set_column(tab.schema.get_field_index("epoch"), "epoch", epochs))
    return out


def _brute_force(tables):
    """max per key of the documented order, null lowest; output sorted by (key_hash, key)."""
    def n(v):
        return (0, b"") if v is None else (1, v)
    best = {}
    for tab in tables:
        for r in tab.to_pylist():
            k = (r["key_hash"], r["key"])
            rank = (r["epoch"], r["attempts"], r["state"], r["time_ms"], n(r["content_hash"]),
                    n(r["reason"]), n(r["verify_method"]), n(r["source_version"]))
            if k not in best or rank > best[k][0]:
                best[k] = (rank, r)
    return [best[k][1] for k in sorted(best)]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(parts=st.lists(st.lists(_rec, min_size=0, max_size=8), min_size=1, max_size=5),
       collide=st.booleans(), data=st.data())
def test_merge_is_order_independent_and_matches_brute_force(parts, collide, data):
    tables = _tables(parts, collide)
    merged = cp.merge(tables)
    perm = data.draw(st.permutations(range(len(tables))))
    shuffled = []
    for i in perm:  # also shuffle rows within a part and split it into chunks
        t = tables[i]
        rows = data.draw(st.permutations(range(t.num_rows)))
        t = t.take(pa.array(rows, pa.int64()))
        cut = data.draw(st.integers(0, t.num_rows))
        shuffled.append(pa.concat_tables([t.slice(0, cut), t.slice(cut)]))
    assert cp.merge(shuffled).equals(merged)
    assert cp._merge_reference(tables).equals(merged)
    assert merged.to_pylist() == _brute_force(tables)
    # idempotent and associative: merging merged pieces changes nothing
    assert cp.merge([merged, *tables]).equals(merged)
    if len(tables) > 1:
        assert cp.merge([cp.merge(tables[:1]), cp.merge(tables[1:])]).equals(merged)


def _one(key, epoch, state, attempts, time_ms=0, **kw):
    t = cp.Transitions()
    t.add(key, None, state, attempts, time_ms=time_ms, **kw)
    return t.to_table(epoch)


def test_later_epoch_supersedes():
    failed = _one(b"k", 3, State.FAILED, 5, time_ms=900, reason=S.COPY_FAILED)
    done = _one(b"j", 3, State.DONE, 1, time_ms=900, verify_method="hash")
    retry = _one(b"k", 4, State.COPYING, 1, time_ms=100)
    m = cp.merge([failed, done, retry]).to_pylist()
    by_key = {r["key"]: r for r in m}
    assert by_key[b"k"]["state"] == State.COPYING and by_key[b"k"]["epoch"] == 4
    assert by_key[b"k"]["reason"] is None
    assert by_key[b"j"]["state"] == State.DONE  # untouched by the new epoch


def test_within_epoch_attempts_then_rank_win():
    verifying = _one(b"k", 2, State.VERIFYING, 1, time_ms=500)
    recopy = _one(b"k", 2, State.COPYING, 2, time_ms=400)  # re-copy after a mismatch
    assert cp.merge([verifying, recopy]).column("state").to_pylist() == [State.COPYING]
    copied = _one(b"k", 2, State.COPIED, 2, time_ms=300)
    assert cp.merge([recopy, copied, verifying]).column("state").to_pylist() == [State.COPIED]
    # time breaks a tie of (epoch, attempts, rank)
    a = _one(b"k", 2, State.FAILED, 2, time_ms=1, reason="drifted")
    b = _one(b"k", 2, State.FAILED, 2, time_ms=2, reason="copy_failed")
    assert cp.merge([a, b]).column("reason").to_pylist() == ["copy_failed"]


def test_duplicate_records_collapse():
    rec = _one(b"k", 1, State.VERIFIED, 1, time_ms=5, content_hash=b"\x07" * 16,
               verify_method="full", source_version=3)
    m = cp.merge([rec, rec, pa.concat_tables([rec, rec])])
    assert m.num_rows == 1 and m.equals(rec)
    assert cp.merge([]).num_rows == 0 and cp.merge([]).schema.equals(cp.CHECKPOINT_SCHEMA)


def test_merge_handles_hash_collisions_between_distinct_keys():
    a = _one(b"a", 1, State.DONE, 1)
    b = _one(b"b", 1, State.COPYING, 1)
    a2 = _one(b"a", 1, State.COPYING, 1)
    same = lambda t: t.set_column(1, "key_hash", pa.array([7], pa.uint64()))  # noqa: E731
    m = cp.merge([same(b), same(a2), same(a)])
    assert m.column("key").to_pylist() == [b"a", b"b"]
    assert m.column("state").to_pylist() == [State.DONE, State.COPYING]


# ========================================================= damaged files

def _group_path(plan, name):
    return os.path.join(cp.group_dir(plan, GID), name)


def test_damaged_parts_are_skipped_and_reported(tmp_path, caplog):
    plan = str(tmp_path)
    good = _write_part(plan, [(b"secret-key-1", None, State.COPIED, 1)])
    victim = _write_part(plan, [(b"secret-key-2", None, State.COPIED, 1)])
    data = fs.read_bytes(_group_path(plan, victim))
    with open(_group_path(plan, victim), "wb") as f:       # truncated: chop its tail
        f.write(data[: len(data) - 40])
    garbage = cp.part_name(1)
    with open(_group_path(plan, garbage), "wb") as f:
        f.write(os.urandom(3000))
    empty = cp.part_name(1)
    open(_group_path(plan, empty), "wb").close()
    head_only = cp.part_name(1)
    with open(_group_path(plan, head_only), "wb") as f:
        f.write(b"PAR1")
    other_schema = cp.part_name(1)
    pq.write_table(pa.table({"key": [b"x"]}).replace_schema_metadata(
        {"format_version": "1", "plan_id": PLAN, "group_id": GID}), _group_path(plan, other_schema))
    no_meta = cp.part_name(1)
    with open(_group_path(plan, no_meta), "wb") as f:
        f.write(cp.serialize_table(_one(b"secret-key-3", 1, State.DONE, 1), {}))
    open(_group_path(plan, ".tmp-inflight"), "wb").close()   # uncommitted write: ignored

    with caplog.at_level(logging.WARNING, logger="pipeline.checkpoint"):
        g = cp.read_group(plan, PLAN, GID)
    assert g.table.column("key").to_pylist() == [b"secret-key-1"]
    assert g.files == (good,)
    assert dict(g.skipped) == {
        victim: "truncated", garbage: "not a Parquet file", empty: "empty",
        head_only: "truncated", other_schema: "schema mismatch", no_meta: "not a checkpoint file"}
    text = caplog.text
    assert "skipped 6 unreadable file(s)" in text
    for name in (victim, garbage, empty, other_schema):
        assert name in text
    assert "secret" not in text and plan not in text


def test_corrupted_data_page_fails_checksum(tmp_path):
    plan = str(tmp_path)
    keys = [f"user:{i:06d}".encode() for i in range(5000)]
    w = cp.CheckpointWriter(plan, PLAN, GID, 1, flush_every=10**6, clock=FakeClock())
    w.record_many(keys, None, State.COPIED, 1, content_hashes=np.full((5000, 16), 3, np.uint8))
    name = w.flush()
    path = _group_path(plan, name)
    data = bytearray(fs.read_bytes(path))
    col = pq.ParquetFile(path).metadata.row_group(0).column(0)     # the key column chunk
    pos = col.data_page_offset + col.total_compressed_size - 2     # inside its compressed payload
    data[pos] ^= 0x55
    with pytest.raises(cp.UnreadablePart):
        cp.parse_part(bytes(data))
    with open(path, "wb") as f:
        f.write(bytes(data))
    g = cp.read_group(plan, PLAN, GID)
    assert g.table.num_rows == 0 and [s.name for s in g.skipped] == [name]


def test_foreign_plan_group_or_format_raises(tmp_path):
    plan = str(tmp_path)
    _write_part(plan, [(b"k", None, State.COPYING, 1)])
    _write_part(plan, [(b"k", None, State.COPIED, 1)], plan_id=OTHER_PLAN)
    with pytest.raises(cp.CheckpointError,
                       match=r"checkpoint part .*part-00000001-[0-9a-f]{32}\.parquet belongs to plan "
                             r"bbbbbbbbbbbb, not aaaaaaaaaaaa$") as ei:
        cp.read_group(plan, PLAN, GID)
    assert isinstance(ei.value, BadInput) and ei.value.exit_code == 2

    plan2 = str(tmp_path / "p2")
    other_gid = group_id("s1", "s3", 7)
    name = _write_part(plan2, [(b"k", None, State.COPYING, 1)], gid=other_gid)
    os.makedirs(cp.group_dir(plan2, GID))
    os.rename(os.path.join(cp.group_dir(plan2, other_gid), name), _group_path(plan2, name))
    with pytest.raises(cp.CheckpointError, match=f"belongs to group {other_gid}, not {GID}"):
        cp.read_group(plan2, PLAN, GID)

    plan3 = str(tmp_path / "p3")
    os.makedirs(cp.group_dir(plan3, GID))
    with open(_group_path(plan3, cp.part_name(1)), "wb") as f:
        f.write(cp.serialize_table(_one(b"k", 1, 1, 1), {"format_version": 2, "plan_id": PLAN,
                                                          "group_id": GID}))
    with pytest.raises(cp.CheckpointError, match="format_version 2; this build reads format_version 1"):
        cp.read_group(plan3, PLAN, GID)


# ============================================================= compaction

def _populate(plan, n_parts=4, keys_per_part=50, seed=0):
    rng = np.random.default_rng(seed)
    names = []
    for p in range(n_parts):
        w = cp.CheckpointWriter(plan, PLAN, GID, 1 + p % 2, flush_every=10**6, clock=FakeClock(p))
        idx = rng.integers(0, 80, keys_per_part)
        w.record_many([f"key-{i}".encode() for i in idx], None,
                      rng.integers(0, 8, keys_per_part).astype(np.int8),
                      rng.integers(0, 3, keys_per_part).astype(np.int32))
        names.append(w.flush())
    return names


def test_compaction_folds_parts_and_is_idempotent(tmp_path):
    plan = str(tmp_path)
    names = _populate(plan)
    before = cp.read_group(plan, PLAN, GID)
    r = cp.compact_group(plan, PLAN, GID)
    assert r.written and r.parts_folded == 4 and r.parts_deleted == 4
    assert r.rows_in == 200 and r.keys_out == before.table.num_rows and r.skipped == ()
    assert _files(plan) == [cp.COMPACTED_NAME]
    after = cp.read_group(plan, PLAN, GID)
    assert after.table.equals(before.table) and after.files == (cp.COMPACTED_NAME,)
    meta = cp.read_file_metadata(_group_path(plan, cp.COMPACTED_NAME))
    assert meta["kind"] == "compacted" and meta["plan_id"] == PLAN and meta["epoch"] == "2"
    assert meta["folded_parts"] == "4" and len(meta["compaction_id"]) == 32
    # again: nothing to fold, nothing changes
    assert not cp.compact_group(plan, PLAN, GID).written
    assert cp.read_group(plan, PLAN, GID).table.equals(before.table)
    # more parts, then compaction again == merge of everything ever written
    more = _populate(plan, n_parts=3, seed=1)
    everything = cp.read_group(plan, PLAN, GID).table
    r2 = cp.compact_group(plan, PLAN, GID)
    assert r2.parts_folded == 3 and _files(plan) == [cp.COMPACTED_NAME]
    assert cp.read_group(plan, PLAN, GID).table.equals(everything)
    assert set(names).isdisjoint(more)
    assert stat.S_IMODE(os.stat(_group_path(plan, cp.COMPACTED_NAME)).st_mode) == 0o600


def test_part_added_after_listing_survives(tmp_path):
    plan = str(tmp_path)
    _populate(plan, n_parts=2)
    late = []

    def fence():  # runs after listing and reading, right before the replace
        if not late:
            late.append(_write_part(plan, [(b"late-key", None, State.DONE, 9)], epoch=3))

    r = cp.compact_group(plan, PLAN, GID, fence=fence)
    assert r.parts_folded == 2
    assert _files(plan) == sorted([cp.COMPACTED_NAME, late[0]])
    g = cp.read_group(plan, PLAN, GID)
    assert b"late-key" in g.table.column("key").to_pylist()
    cp.compact_group(plan, PLAN, GID)
    assert _files(plan) == [cp.COMPACTED_NAME]
    assert cp.read_group(plan, PLAN, GID).table.equals(g.table)


def test_crash_between_replace_and_delete(tmp_path):
    plan = str(tmp_path)
    names = _populate(plan, n_parts=5)
    before = cp.read_group(plan, PLAN, GID).table
    removed = []

    def crashing_remove(path):
        if len(removed) == 2:
            raise OSError("simulated crash")
        fs.remove(path)
        removed.append(path)

    with pytest.raises(OSError, match="simulated crash"):
        cp._compact(plan, PLAN, GID, fence=None, min_parts=1, remove=crashing_remove)
    left = _files(plan)
    assert cp.COMPACTED_NAME in left and len(left) == 1 + 3
    g = cp.read_group(plan, PLAN, GID)
    assert g.table.equals(before) and g.skipped == ()
    # crash right after the replace (no part deleted at all)
    plan2 = str(tmp_path / "p2")
    _populate(plan2, n_parts=3)
    before2 = cp.read_group(plan2, PLAN, GID).table

    def crash_at_once(path):
        raise OSError("simulated crash")

    with pytest.raises(OSError):
        cp._compact(plan2, PLAN, GID, fence=None, min_parts=1, remove=crash_at_once)
    assert len(_files(plan2)) == 4
    assert cp.read_group(plan2, PLAN, GID).table.equals(before2)
    # recovery: the next compaction folds the leftovers
    for p, b in ((plan, before), (plan2, before2)):
        cp.compact_group(p, PLAN, GID)
        assert _files(p) == [cp.COMPACTED_NAME]
        assert cp.read_group(p, PLAN, GID).table.equals(b)
    assert len(names) == 5


def test_crash_before_replace_leaves_old_state(tmp_path):
    plan = str(tmp_path)
    _populate(plan, n_parts=3)
    cp.compact_group(plan, PLAN, GID)
    _populate(plan, n_parts=2, seed=5)
    files = _files(plan)
    before = cp.read_group(plan, PLAN, GID).table
    old = fs.read_bytes(_group_path(plan, cp.COMPACTED_NAME))

    def lost_lease():
        raise RuntimeError("lease lost")

    with pytest.raises(RuntimeError, match="lease lost"):
        cp.compact_group(plan, PLAN, GID, fence=lost_lease)
    assert _files(plan) == files
    assert fs.read_bytes(_group_path(plan, cp.COMPACTED_NAME)) == old
    assert cp.read_group(plan, PLAN, GID).table.equals(before)


def test_concurrent_compaction_is_detected(tmp_path):
    plan = str(tmp_path)
    _populate(plan, n_parts=3)
    before = cp.read_group(plan, PLAN, GID).table
    nested = []

    def fence():  # another compactor commits between our read and our replace
        if not nested:
            nested.append(cp.compact_group(plan, PLAN, GID))

    with pytest.raises(fs.CommitConflict, match="changed during compaction"):
        cp.compact_group(plan, PLAN, GID, fence=fence)
    assert nested[0].written
    assert _files(plan) == [cp.COMPACTED_NAME]
    assert cp.read_group(plan, PLAN, GID).table.equals(before)


def test_compaction_leaves_unreadable_parts_and_refuses_bad_compacted(tmp_path):
    plan = str(tmp_path)
    _populate(plan, n_parts=2)
    bad = cp.part_name(1)
    with open(_group_path(plan, bad), "wb") as f:
        f.write(b"PAR1 not really")
    r = cp.compact_group(plan, PLAN, GID)
    assert r.parts_folded == 2 and r.skipped == (cp.SkippedFile(bad, "truncated"),)
    assert _files(plan) == sorted([cp.COMPACTED_NAME, bad])
    os.remove(_group_path(plan, bad))
    _populate(plan, n_parts=1, seed=3)
    with open(_group_path(plan, cp.COMPACTED_NAME), "r+b") as f:
        f.truncate(100)
    files = _files(plan)
    with pytest.raises(cp.CheckpointError, match="compacted.parquet is unreadable \\(truncated\\)"):
        cp.compact_group(plan, PLAN, GID)
    assert _files(plan) == files and os.path.getsize(_group_path(plan, cp.COMPACTED_NAME)) == 100


def test_read_all_and_groups(tmp_path):
    plan = str(tmp_path)
    g2 = group_id("s 1", "s.2", 0)
    _write_part(plan, [(b"x", None, State.DONE, 1, None, None, None, "hash")])
    _write_part(plan, [(b"y", None, State.FAILED, 5, S.COPY_FAILED)], gid=g2)
    assert cp.list_groups(plan) == sorted([GID, g2])
    allg = cp.read_all(plan, PLAN)
    assert set(allg) == {GID, g2}
    assert [g.group_id for g in cp.iter_groups(plan, PLAN)] == sorted([GID, g2])
    results = cp.compact_all(plan, PLAN)
    assert all(r.written for r in results)
    assert cp.read_all(plan, PLAN)[g2].equals(allg[g2])
    assert cp.read_group(plan, PLAN, group_id("x", "y", 1)).table.num_rows == 0
    assert cp.list_groups(str(tmp_path / "nowhere")) == []


def test_summaries():
    t = cp.Transitions()
    t.add(b"a", None, State.DONE, 1, verify_method="hash")
    t.add(b"b", None, State.DONE, 1, verify_method="hash")
    t.add(b"c", None, State.DONE, 1, verify_method="forced")
    t.add(b"d", None, State.FAILED, 5, reason=S.COPY_FAILED)
    t.add(b"e", None, State.FAILED, 1, reason=S.SOURCE_MISSING)
    t.add(b"f", None, State.FAILED, 1)
    t.add(b"g", None, State.COPIED, 1)
    m = cp.merge([t.to_table(1)])
    assert cp.state_counts(m) == {"planned": 0, "copying": 0, "copied": 1, "verifying": 0,
                                  "verified": 0, "swapping": 0, "done": 3, "failed": 3}
    assert cp.failed_reasons(m) == {"unspecified": 1, "copy_failed": 1, "source_missing": 1}
    assert cp.done_verify_methods(m) == {"forced": 1, "hash": 2}
    empty = cp.merge([])
    assert sum(cp.state_counts(empty).values()) == 0
    assert cp.failed_reasons(empty) == {} and cp.done_verify_methods(empty) == {}


# ================================================================= writer

def test_writer_flushes_on_count_interval_and_end(tmp_path):
    plan = str(tmp_path)
    clock = FakeClock()
    w = cp.CheckpointWriter(plan, PLAN, GID, 2, flush_every=3, flush_interval_s=2.0, clock=clock)
    assert w.record(b"k1", None, State.COPYING, 1) is None
    assert w.record(b"k2", None, State.COPYING, 1) is None
    p1 = w.record(b"k3", None, State.COPYING, 1)          # count reached
    assert p1 and len(w) == 0 and _files(plan) == [p1]
    w.record(b"k1", None, State.COPIED, 1)
    clock.advance(1.9)
    assert w.maybe_flush() is None
    clock.advance(0.2)
    p2 = w.maybe_flush()                                    # interval elapsed
    assert p2 and p2 != p1
    clock.advance(10)
    assert w.maybe_flush() is None                          # nothing buffered
    p3 = w.record(b"k2", None, State.COPIED, 1)             # the interval had already elapsed
    assert p3
    w.record(b"k3", None, State.COPIED, 1)
    p4 = w.flush()                                          # end of bundle
    assert w.flush() is None
    parts = [p1, p2, p3, p4]
    assert len(set(parts)) == 4 and _files(plan) == sorted(parts)
    s = w.stats
    assert (s.parts, s.rows, s.last_part) == (4, 6, p4)
    assert s.bytes == sum(os.path.getsize(_group_path(plan, n)) for n in parts)
    g = cp.read_group(plan, PLAN, GID)
    assert dict(zip(g.table.column("key").to_pylist(), g.table.column("state").to_pylist())) == {
        b"k1": 2, b"k2": 2, b"k3": 2}
    # file modes: files 0600, directories 0700
    for n in parts:
        assert stat.S_IMODE(os.stat(_group_path(plan, n)).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(cp.group_dir(plan, GID)).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(cp.checkpoints_dir(plan)).st_mode) == 0o700


def test_writer_fence_extras_and_context_manager(tmp_path):
    plan = str(tmp_path)
    calls = []
    lost = []

    def fence():
        calls.append(1)
        if lost:
            raise RuntimeError("lease lost")

    active = iter(range(100))
    with cp.CheckpointWriter(plan, PLAN, GID, 5, fence=fence,
                             extras_fn=lambda: {"active_copy": next(active)}) as w:
        w.record(b"a", None, State.COPYING, 1)
        first = w.flush()
        w.record_many([b"b", b"c"], None, State.COPYING, 1)
    assert len(calls) == 2 and len(_files(plan)) == 2
    metas = cp.read_group(plan, PLAN, GID).metadata
    assert metas[first]["active_copy"] == "0"
    assert sorted(m["active_copy"] for m in metas.values()) == ["0", "1"]
    # a fence that raises: nothing committed, buffer kept for a later flush
    w = cp.CheckpointWriter(plan, PLAN, GID, 5, fence=fence)
    w.record(b"d", None, State.COPYING, 1)
    lost.append(True)
    with pytest.raises(RuntimeError, match="lease lost"):
        w.flush()
    assert len(_files(plan)) == 2
    lost.clear()
    assert w.flush() is not None and len(_files(plan)) == 3
    w = cp.CheckpointWriter(plan, PLAN, GID, 5, extras_fn=lambda: {"plan_id": "x"})
    w.record(b"z", None, 1, 1)
    with pytest.raises(ValueError, match="'plan_id' is a reserved name"):
        w.flush()
    assert len(w) == 1
    with pytest.raises(ValueError, match="checkpoint_flush_every_transitions"):
        cp.CheckpointWriter(plan, PLAN, GID, 5, flush_every=0)
    with pytest.raises(ValueError, match="group_id"):
        cp.CheckpointWriter(plan, PLAN, "../evil", 5)


def test_writer_retries_a_failed_commit_under_the_same_name(tmp_path, monkeypatch):
    plan = str(tmp_path)
    real = fs.create_if_absent
    attempts = []

    def flaky(path, data, mode=0o600):
        attempts.append(os.path.basename(path))
        if len(attempts) == 1:
            real(path, data, mode)  # the object lands but the caller sees an error
            raise OSError("connection reset")
        return real(path, data, mode)

    monkeypatch.setattr(cp.fs, "create_if_absent", flaky)
    w = cp.CheckpointWriter(plan, PLAN, GID, 1)
    w.record(b"k", None, State.COPIED, 1)
    with pytest.raises(OSError):
        w.flush()
    name = w.flush()  # same bytes, same name: counts as committed
    assert attempts == [name, name] and _files(plan) == [name]
    assert w.stats.parts == 1 and w.flush() is None


def test_writer_background_commits_lose_nothing_and_raise_at_the_waiting_flush(tmp_path, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor, wait

    from pipeline.errors import TransientError

    plan = str(tmp_path)
    real = fs.create_if_absent
    failing = {"n": 2}

    def flaky(path, data, mode=0o600, **kw):
        if failing["n"]:
            failing["n"] -= 1
            raise TransientError("store busy")
        return real(path, data, mode, **kw)

    monkeypatch.setattr(cp.fs, "create_if_absent", flaky)
    with ThreadPoolExecutor(1) as committer:
        w = cp.CheckpointWriter(plan, PLAN, GID, 1, flush_every=2, flush_interval_s=3600, committer=committer)
        for i in range(6):  # three flushes due by count: handed to the committer, none waited for
            assert w.record(b"k%d" % i, None, State.COPIED, 1) is None
        wait(w._inflight)
        assert len(_files(plan)) == 1  # two background commits failed (transient) ...
        w.flush()  # ... the waiting flush retries them under their names
        assert len(_files(plan)) == 3 and w.stats.parts == 3
        assert sorted(cp.read_group(plan, PLAN, GID).table.column("key").to_pylist()) == [b"k%d" % i for i in range(6)]


@pytest.mark.parametrize("interval", [3600, 0])
def test_writer_background_parts_share_one_directory_fsync_before_the_waiting_flush_returns(
        tmp_path, monkeypatch, interval):
    """Background parts are whole when they appear (their bytes fsynced first); their names
    are made durable by one directory fsync at the next waiting flush -- or each at once
    when the flush interval (the longest a transition waits in memory) has passed."""
    from concurrent.futures import ThreadPoolExecutor, wait

    plan = str(tmp_path)
    synced = []
    real = fs._fsync_dir

    def counting(directory):
        synced.append((directory, sorted(_files(plan))))
        return real(directory)

    monkeypatch.setattr(fs, "_fsync_dir", counting)
    with ThreadPoolExecutor(1) as committer:
        w = cp.CheckpointWriter(plan, PLAN, GID, 1, flush_every=2, flush_interval_s=interval, committer=committer)
        for i in range(6):  # three parts due by count, committed in the background
            w.record(b"k%d" % i, None, State.COPIED, 1)
            wait(w._inflight)
        parts = _files(plan)
        assert len(parts) == (3 if interval else 6)  # interval 0: every record is due
        assert len(synced) == (0 if interval else len(parts))
        w.flush()
        gdir = cp.group_dir(plan, GID)
        assert synced[-1] == (gdir, sorted(parts))  # every name durable when the waiting flush returns
        before = len(synced)
        assert before == (1 if interval else len(parts))
    w = cp.CheckpointWriter(plan, PLAN, GID, 1, flush_every=2, flush_interval_s=interval)
    w.record(b"x", None, State.COPIED, 1)
    w.flush()  # a part committed by a waiting flush: its own directory fsync
    assert len(synced) == before + 1 and synced[-1][0] == gdir
    assert len(cp.read_group(plan, PLAN, GID).table) == 7


def test_the_flush_timer_makes_background_part_names_durable_once_the_interval_passed(tmp_path, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor, wait

    plan = str(tmp_path)
    synced = []
    monkeypatch.setattr(fs, "_fsync_dir", lambda d: synced.append(d))
    with ThreadPoolExecutor(1) as committer:
        w = cp.CheckpointWriter(plan, PLAN, GID, 1, flush_every=1, flush_interval_s=0.2, committer=committer)
        w.record(b"a", None, State.COPIED, 1)  # due by count: committed in the background, name unsynced
        wait(w._inflight)
        w.flush_if_due()
        assert synced == []  # the interval has not passed
        time.sleep(0.25)
        w.flush_if_due()
        assert synced == [cp.group_dir(plan, GID)]
        w.flush_if_due()
        assert len(synced) == 1  # once


def test_writer_background_commit_refused_by_the_fence_stops_the_caller_at_once(tmp_path):
    from concurrent.futures import ThreadPoolExecutor, wait

    plan = str(tmp_path)
    lost = {"yes": False}

    class LeaseLost(Exception):
        pass

    def fence():
        if lost["yes"]:
            raise LeaseLost("taken over")

    with ThreadPoolExecutor(1) as committer:
        w = cp.CheckpointWriter(plan, PLAN, GID, 1, flush_every=1, flush_interval_s=3600, fence=fence,
                                committer=committer)
        w.record(b"a", None, State.COPIED, 1)
        wait(w._inflight)
        lost["yes"] = True
        w.record(b"b", None, State.COPIED, 1)  # its background commit is refused
        wait(w._inflight)
        with pytest.raises(LeaseLost):  # the next flush due (not only bundle end) raises it
            w.record(b"c", None, State.COPIED, 1)
        assert len(_files(plan)) == 1  # nothing committed past the fence


def test_record_table_checks_epoch(tmp_path):
    w = cp.CheckpointWriter(str(tmp_path), PLAN, GID, 3, flush_every=10)
    w.record_table(_one(b"k", 3, State.COPIED, 1))
    with pytest.raises(ValueError, match="epochs other than this writer's 3"):
        w.record_table(_one(b"k", 4, State.COPIED, 1))
    w.record_table(pa.table({"key": [b"q"], "state": pa.array([1], pa.int8()),
                             "attempts": pa.array([1], pa.int32())}))
    assert len(w) == 2
    w.flush()
    t = cp.read_group(str(tmp_path), PLAN, GID).table
    assert t.column("epoch").to_pylist() == [3, 3]


# ============================================================ performance

def test_merge_one_million_rows_smoke():
    rng = np.random.default_rng(7)
    n, nk = 1_000_000, 250_000
    key_pool = np.array([f"user:{i:09d}".encode() for i in range(nk)], dtype=object)
    idx = rng.integers(0, nk, n)
    t = cp.Transitions()
    t.add_many(pa.array(key_pool[idx], pa.binary()), None,
               rng.integers(0, 8, n).astype(np.int8), rng.integers(0, 4, n).astype(np.int32),
               content_hashes=rng.integers(0, 256, (n, 16), dtype=np.uint8),
               source_versions=rng.integers(0, 10**6, n), time_ms=rng.integers(0, 10**12, n))
    table = t.to_table(3)
    parts = [table.slice(i, 1000) for i in range(0, n, 1000)]
    t0 = time.perf_counter()
    merged = cp.merge(parts)
    elapsed = time.perf_counter() - t0
    print(f"\nmerge_1m_rows_s: {elapsed:.3f} ({merged.num_rows} keys)")
    assert merged.num_rows == len(np.unique(idx))
    kh = merged.column("key_hash").to_numpy()
    assert np.all(kh[1:] > kh[:-1])


def test_bytes_per_row_of_a_10k_part():
    rng = np.random.default_rng(3)
    n = 10_000
    t = cp.Transitions()
    t.add_many([f"user:{i:09d}".encode() for i in range(n)], None, State.COPIED, 1,
               content_hashes=rng.integers(0, 256, (n, 16), dtype=np.uint8),
               source_versions=rng.integers(0, 10**6, n))
    data = cp.serialize_table(t.to_table(1), {"format_version": 1, "plan_id": PLAN,
                                              "group_id": GID, "epoch": 1, "kind": "part"})
    print(f"\nbytes_per_transition_row: {len(data) / n:.1f}")
    assert len(data) / n < 64


def test_record_chunk_fast_path_checks_transitions_and_values_and_reads_back(tmp_path):
    """The executor's fast path (CheckpointWriter.record_chunk): the same rows as
    record_many, the state machine still checked, the values its types do not
    guarantee still refused -- and nothing refused is buffered."""
    from pipeline.states import TransitionError

    plan = str(tmp_path)
    w = cp.CheckpointWriter(plan, PLAN, GID, 3, flush_every=10**6, check_transitions=True)
    keys = [b"k1", b"k2", b"k3"]
    karr = pa.array(keys, pa.binary())
    hashes = np.array([K.stable_hash(k) for k in keys], dtype=np.uint64)
    w.record_chunk(karr, hashes, int(State.COPYING), [1, 1, 2], prev=[int(State.PLANNED)] * 3)
    w.record_chunk(karr, hashes, int(State.COPIED), [1, 1, 2], None, [b"h" * 16] * 3, [7, 8, 9], None,
                   prev=[int(State.COPYING)] * 3)
    w.record_chunk(karr[:2], hashes[:2], int(State.VERIFYING), [1, 1], None, b"h" * 16, 5, None,
                   prev=[int(State.COPIED)] * 2)
    w.record_chunk(karr[:2], hashes[:2], int(State.VERIFIED), [1, 1], None, b"h" * 16, 5, "hash",
                   prev=[int(State.VERIFYING)] * 2)
    assert len(w) == 10
    with pytest.raises(TransitionError):  # Copied -> Done skips verification and the swap
        w.record_chunk(karr[2:], hashes[2:], int(State.DONE), [2], prev=[int(State.COPIED)])
    with pytest.raises(TypeError):
        w.record_chunk(karr, hashes, int(State.COPYING), [1, 1, 1], prev=None)
    with pytest.raises(ValueError):  # a content hash is 16 bytes
        w.record_chunk(karr, hashes, int(State.COPIED), [1, 1, 2], None, [b"short"] * 3, None, None,
                       prev=[int(State.COPYING)] * 3)
    with pytest.raises(ValueError):  # an unknown verify method
        w.record_chunk(karr, hashes, int(State.VERIFIED), [1, 1, 2], None, None, None, "guessed",
                       prev=[int(State.VERIFYING)] * 3)
    with pytest.raises((ValueError, OverflowError, pa.ArrowInvalid)):  # attempts are non-negative int32
        w.record_chunk(karr, hashes, int(State.COPYING), [1, -1, 2], prev=[int(State.PLANNED)] * 3)
    with pytest.raises(ValueError):  # one attempt count per key
        w.record_chunk(karr, hashes, int(State.COPYING), [1, 1], prev=[int(State.PLANNED)] * 3)
    assert len(w) == 10
    w.flush()
    t = cp.read_group(plan, PLAN, GID).table.sort_by("key")
    assert t.column("key").to_pylist() == keys
    assert t.column("state").to_pylist() == [int(State.VERIFIED)] * 2 + [int(State.COPIED)]
    assert t.column("verify_method").to_pylist() == ["hash", "hash", None]
    assert t.column("source_version").to_pylist() == [5, 5, 9]
    assert t.column("key_hash").to_pylist() == [int(h) for h in hashes]
    assert t.column("epoch").to_pylist() == [3] * 3


def _recorder_ctx(tmp_path):
    """The part of a StageContext a CheckpointRecorder uses (epoch 2, no flush by count or time)."""
    class Ctx:
        class opts:
            checkpoint_flush_every_transitions = 10**6
            checkpoint_flush_interval = 3600.0

        class spec:
            plan_dir, plan_id, epoch = str(tmp_path), PLAN, 2

        class metrics:
            @staticmethod
            def checkpoint_extras():
                return {}

        class crasher:
            @staticmethod
            def tick(n):
                pass

        stage = "t"
        checkpoint_fence = staticmethod(lambda: None)
        retry_io = staticmethod(lambda fn, *a: fn(*a))

    return Ctx()


def test_recorder_gathers_rows_of_a_chunk_and_the_chunk_cache_is_never_pickled(tmp_path):
    import pickle

    from transforms.stages.common import CheckpointRecorder, Chunk

    keys = [b"a", b"b", b"c", b"d"]
    ch = Chunk(GID, 0, "s0", "s1", list(keys), [K.stable_hash(k) for k in keys], [0] * 4, [1] * 4,
               [None] * 4, [None] * 4, [None] * 4, [None] * 4)
    rec = CheckpointRecorder(_recorder_ctx(tmp_path))
    try:
        rec.record(ch, [0, 1, 2, 3], State.COPYING)
        rec.record(ch, [3, 1], State.COPIED, chash={1: b"1" * 16, 3: b"3" * 16}, sver={1: 11, 3: 13},
                   method=None, reason=None)
        rec.record(ch, [0, 2], State.FAILED, reason={0: "copy_failed", 2: "source_missing"})
        assert ch._fixed is not None
        back = pickle.loads(pickle.dumps(ch))
        assert back._fixed is None and back.keys == keys and back.states == ch.states
        rec.flush_all()
    finally:
        rec.close()
    t = cp.read_group(str(tmp_path), PLAN, GID).table.sort_by("key")
    assert t.column("key").to_pylist() == keys
    assert t.column("state").to_pylist() == [int(State.FAILED), int(State.COPIED)] * 2
    assert t.column("reason").to_pylist() == ["copy_failed", None, "source_missing", None]
    assert t.column("content_hash").to_pylist() == [None, b"1" * 16, None, b"3" * 16]
    assert t.column("source_version").to_pylist() == [None, 11, None, 13]
    assert t.column("key_hash").to_pylist() == [K.stable_hash(k) for k in keys]


def test_bundle_end_flushes_every_group_side_by_side_and_raises_the_first_error_after_all(tmp_path):
    """flush_all commits the buffers of all groups of a stage (one thread per writer):
    every group's transitions land even when one group's commit fails, and that
    failure is raised once all the others are committed."""
    from transforms.stages.common import CheckpointRecorder, Chunk

    gids = [group_id("s1", "s2", b) for b in range(12)]
    rec = CheckpointRecorder(_recorder_ctx(tmp_path))
    broken = gids[5]
    real_commit = cp.CheckpointWriter._commit

    def commit(self, *a, **kw):
        if self.group_id == broken:
            raise OSError("disk full")
        return real_commit(self, *a, **kw)

    cp.CheckpointWriter._commit = commit
    try:
        for n, gid in enumerate(gids):
            keys = [b"k%d-%d" % (n, i) for i in range(3)]
            ch = Chunk(gid, 0, "s1", "s2", keys, [K.stable_hash(k) for k in keys], [0] * 3, [1] * 3,
                       [None] * 3, [None] * 3, [None] * 3, [None] * 3)
            rec.record(ch, [0, 1, 2], State.COPYING)
        with pytest.raises(OSError, match="disk full"):
            rec.flush_all()
    finally:
        cp.CheckpointWriter._commit = real_commit
        rec.close()
    for n, gid in enumerate(gids):
        t = cp.read_group(str(tmp_path), PLAN, gid).table
        assert t.num_rows == (0 if gid == broken else 3), gid
    rec2 = CheckpointRecorder(_recorder_ctx(tmp_path))  # the failed part is kept by its writer: a later flush commits it
    try:
        rec2._writers = rec._writers
        rec2.flush_all()
    finally:
        rec2.close()
    assert cp.read_group(str(tmp_path), PLAN, broken).table.num_rows == 3


def test_bundle_end_raises_a_lost_lease_before_other_flush_errors(tmp_path):
    from pipeline.lease import LeaseLost
    from transforms.stages.common import CheckpointRecorder, Chunk

    gids = [group_id("s1", "s2", b) for b in range(6)]
    failing = {gids[0]: OSError("disk full"), gids[4]: LeaseLost("lease lost: plan is now held by epoch 3")}
    real_commit = cp.CheckpointWriter._commit

    def commit(self, *a, **kw):
        if self.group_id in failing:
            raise failing[self.group_id]
        return real_commit(self, *a, **kw)

    rec = CheckpointRecorder(_recorder_ctx(tmp_path))
    cp.CheckpointWriter._commit = commit
    try:
        for n, gid in enumerate(gids):
            ch = Chunk(gid, 0, "s1", "s2", [b"k%d" % n], [K.stable_hash(b"k%d" % n)], [0], [1],
                       [None], [None], [None], [None])
            rec.record(ch, [0], State.COPYING)
        with pytest.raises(LeaseLost):  # the run must stop as superseded, not retry a disk error
            rec.flush_all()
    finally:
        cp.CheckpointWriter._commit = real_commit
        rec.close()
    assert [cp.read_group(str(tmp_path), PLAN, g).table.num_rows for g in gids] == [0, 1, 1, 1, 0, 1]
