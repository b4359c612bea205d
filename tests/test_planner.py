"""The segmented Beam planner: equal to the brute-force reference, deterministic,
validated (one clear error line, exit 2, nothing committed)."""
import json
import os
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import fs
from pipeline import plancore as core
from pipeline.config import load_config
from pipeline.errors import BadInput
from pipeline.keys import KeyType, canonical_bytes
from shardmove.planner import make_plan
from pipeline.ring import Ring

SHARDS4 = ["s0", "s1", "s2", "s3"]


def _ring(shards, kt=KeyType.STRING, profile="native"):
    return Ring.build(profile, [(s, 1.0) for s in shards], key_type=kt)


def _assignments(n, kt=KeyType.STRING, seed=1):
    rng = random.Random(seed)
    ring = _ring(SHARDS4, kt)
    out = []
    for i in range(n):
        if kt is KeyType.STRING:
            k = f"user-{i:06d}".encode()
        elif kt is KeyType.INT64:
            k = canonical_bytes(rng.randrange(-2**63, 2**63), kt)
        else:
            k = bytes(rng.randrange(256) for _ in range(16 if kt is KeyType.UUID else rng.randrange(1, 24)))
        out.append((k, ring.assign_one(k)))
    # dedupe random collisions
    seen, uniq = set(), []
    for k, s in out:
        if k not in seen:
            seen.add(k)
            uniq.append((k, s))
    return uniq


def _write_snapshot(path, rows, *, text_keys=None, row_group=None):
    keys = [k for k, _ in rows]
    table = pa.table({"key": pa.array(text_keys if text_keys is not None else keys,
                                      pa.string() if text_keys is not None else pa.binary()),
                      "shard_id": pa.array([s for _, s in rows], pa.string())})
    pq.write_table(table, path, row_group_size=row_group or max(1, len(rows)))
    return path


def _cfg(tmp_path, target_shards, **extra):
    raw = {
        "work_dir": str(tmp_path / "work"),
        "map_store": {"kind": "sqlite", "path": str(tmp_path / "unused.sqlite")},
        "current_shards": SHARDS4,
        "target": {"profile": "native", "shards": [{"id": s} for s in target_shards]},
    }
    raw.update(extra)
    return load_config(None, raw=raw)


def _read_plan(plan_dir):
    m = json.loads(open(os.path.join(plan_dir, "manifest.json")).read())
    rows = []
    for f in m["files"]:
        t = pq.read_table(os.path.join(plan_dir, "moves", f["group"] + ".parquet"))
        rows += list(zip(t["key"].to_pylist(), t["source"].to_pylist(), t["target"].to_pylist(),
                         t["key_hash"].to_pylist()))
    return m, rows


@pytest.mark.parametrize("segment_size", [100, 777, 20000])
def test_beam_planner_equals_reference(tmp_path, segment_size):
    rows = _assignments(3000)
    snap = _write_snapshot(tmp_path / "snap.parquet", rows, row_group=1000)
    target = SHARDS4 + ["s4"]
    cfg = _cfg(tmp_path, target, segment_size=segment_size, hash_buckets=3)
    res = make_plan(cfg, snapshot=str(snap), out=lambda _l: None)
    m, got = _read_plan(res.plan_dir)
    want = core.reference_plan(rows, ring=_ring(target))
    assert sorted(got) == sorted(want)
    assert m["moves"] == len(want) > 0
    # CONTRACTS order inside each file, files in (source, target, bucket) order
    assert got == sorted(got, key=lambda r: (r[1].encode(), r[2].encode(), r[3], r[0]))
    assert all(t == "s4" for _, _, t, _ in got)  # adding a shard moves keys only onto it


def test_plan_id_independent_of_segment_size_and_layout(tmp_path):
    rows = _assignments(2000)
    a = _write_snapshot(tmp_path / "a.parquet", rows, row_group=500)
    shuffled = list(rows)
    random.Random(3).shuffle(shuffled)
    b = _write_snapshot(tmp_path / "b.parquet", shuffled, row_group=2000)
    ids = set()
    for snap, seg in ((a, 100), (b, 5000)):
        cfg = _cfg(tmp_path, SHARDS4 + ["s4"], segment_size=seg)
        ids.add(make_plan(cfg, snapshot=str(snap), dry_run=True, out=lambda _l: None).plan_id)
    assert len(ids) == 1


def test_plan_files_byte_identical_across_runs(tmp_path):
    rows = _assignments(2500)
    snap = _write_snapshot(tmp_path / "snap.parquet", rows, row_group=700)
    blobs = []
    for i in range(2):
        cfg = _cfg(tmp_path / f"w{i}", SHARDS4 + ["s4"], segment_size=300)
        res = make_plan(cfg, snapshot=str(snap), out=lambda _l: None)
        d = os.path.join(res.plan_dir, "moves")
        blobs.append({f: open(os.path.join(d, f), "rb").read() for f in sorted(os.listdir(d))})
    assert blobs[0] == blobs[1] and blobs[0]


def test_window_restricts_moves_and_changes_plan_id(tmp_path):
    rows = _assignments(3000)
    snap = _write_snapshot(tmp_path / "snap.parquet", rows)
    target = SHARDS4 + ["s4"]
    full = make_plan(_cfg(tmp_path, target), snapshot=str(snap), dry_run=True, out=lambda _l: None)
    res = make_plan(_cfg(tmp_path, target, window="00-3F"), snapshot=str(snap), out=lambda _l: None)
    _m, got = _read_plan(res.plan_dir)
    want = core.reference_plan(rows, ring=_ring(target), window=(0, 0x3F))
    assert sorted(got) == sorted(want) and 0 < len(want) < full.manifest["moves"]
    assert all((h >> 56) <= 0x3F for *_x, h in got)
    assert res.plan_id != full.plan_id


def test_explicit_target_join(tmp_path):
    rows = _assignments(1500)
    snap = _write_snapshot(tmp_path / "snap.parquet", rows)
    rng = random.Random(5)
    explicit = {k: rng.choice(SHARDS4 + ["s9"]) for k, _ in rows if rng.random() < 0.6}
    tpath = tmp_path / "target.parquet"
    pq.write_table(pa.table({"key": pa.array(list(explicit), pa.binary()),
                             "shard_id": pa.array(list(explicit.values()))}), tpath)
    cfg = _cfg(tmp_path, [], target={"snapshot": str(tpath), "shards": [{"id": s} for s in SHARDS4 + ["s9"]]})
    res = make_plan(cfg, snapshot=str(snap), out=lambda _l: None)
    _m, got = _read_plan(res.plan_dir)
    assert sorted(got) == sorted(core.reference_plan(rows, target=explicit))


def test_text_keys_of_int64_snapshot(tmp_path):
    rows = _assignments(800, KeyType.INT64)
    from pipeline.keys import text_form

    snap = _write_snapshot(tmp_path / "snap.parquet", rows, text_keys=[text_form(k, KeyType.INT64) for k, _ in rows])
    target = SHARDS4 + ["s4"]
    cfg = _cfg(tmp_path, target, key_type="int64")
    res = make_plan(cfg, snapshot=str(snap), out=lambda _l: None)
    _m, got = _read_plan(res.plan_dir)
    assert sorted(got) == sorted(core.reference_plan(rows, ring=_ring(target, KeyType.INT64)))


def _staging_left(tmp_path):
    plans = tmp_path / "work" / "plans"
    return [p for p in os.listdir(plans)] if plans.exists() else []


@pytest.mark.parametrize("mutate,match", [
    (lambda rows: rows + [rows[5]], r"plan: 1 duplicate keys in the snapshot"),
    (lambda rows: rows + [(b"stray-key", "s77")], r"plan: 1 keys are on 1 shard ids the configuration does not know \(s77\)"),
    (lambda rows: rows + [(b"", "s0")], r"cannot be represented as key_type string \(or are empty\)"),
    (lambda rows: rows + [(b"k" * 5000, "s0")], r"plan: 1 keys are longer than 4096 bytes"),
])
def test_validation_errors(tmp_path, mutate, match):
    rows = mutate(_assignments(500))
    snap = _write_snapshot(tmp_path / "snap.parquet", rows)
    with pytest.raises(BadInput, match=match) as e:
        make_plan(_cfg(tmp_path, SHARDS4 + ["s4"]), snapshot=str(snap), out=lambda _l: None)
    assert "stray-key" not in str(e.value) and "user-" not in str(e.value)
    assert _staging_left(tmp_path) == []  # nothing committed, staging removed


def test_unrepresentable_int64_keys(tmp_path):
    rows = [(b"12", "s0"), (b"x", "s1")]
    snap = _write_snapshot(tmp_path / "snap.parquet", rows, text_keys=["12", "notanumber"])
    with pytest.raises(BadInput, match=r"1 keys in the snapshot cannot be represented as key_type int64"):
        make_plan(_cfg(tmp_path, SHARDS4, key_type="int64"), snapshot=str(snap), out=lambda _l: None)


def test_empty_snapshot_gives_empty_plan(tmp_path):
    snap = _write_snapshot(tmp_path / "snap.parquet", [])
    lines = []
    res = make_plan(_cfg(tmp_path, SHARDS4 + ["s4"]), snapshot=str(snap), out=lines.append)
    assert res.manifest["moves"] == 0 and res.manifest["files"] == []
    assert "empty snapshot: the plan is empty" in lines


def test_corrupted_snapshot_is_bad_input(tmp_path):
    p = tmp_path / "snap.parquet"
    _write_snapshot(p, _assignments(100))
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadInput, match=r"snapshot: 1 of 1 Parquet files in .* are corrupted or truncated"):
        make_plan(_cfg(tmp_path, SHARDS4), snapshot=str(p), out=lambda _l: None)


def test_dry_run_capacity_check(tmp_path):
    rows = _assignments(2000)
    snap = _write_snapshot(tmp_path / "snap.parquet", rows)
    tight = {"profile": "native", "shards": [{"id": s, "capacity_keys": 420} for s in SHARDS4 + ["s4"]]}
    lines = []
    res = make_plan(_cfg(tmp_path, [], target=tight), snapshot=str(snap), dry_run=True, out=lines.append)
    assert not res.capacity_ok
    assert any(l.startswith("shard s") and "OVER" in l for l in lines)
    assert not (tmp_path / "work" / "plans").exists() or _staging_left(tmp_path) == []
    roomy = {"profile": "native", "shards": [{"id": s, "capacity_keys": 5000} for s in SHARDS4 + ["s4"]]}
    res = make_plan(_cfg(tmp_path, [], target=roomy), snapshot=str(snap), dry_run=True, out=lambda _l: None)
    assert res.capacity_ok
    assert res.manifest["capacity"][0]["headroom_keys_pct"] > 10


def test_golden_small_plan(tmp_path):
    """Pins the wire format: snapshot digest, plan id and move count of a fixed plan.
    A change here changes every plan id: do it deliberately (CONTRACTS "Plan identity")."""
    ring = _ring(SHARDS4)
    rows = [(f"golden-{i}".encode(), ring.assign_one(f"golden-{i}".encode())) for i in range(200)]
    snap = _write_snapshot(tmp_path / "s.parquet", rows)
    res = make_plan(_cfg(tmp_path, SHARDS4 + ["s4"]), snapshot=str(snap), out=lambda _l: None)
    assert res.manifest["snapshot"]["digest"] == "0fa7f25cedfccf841e80e18582de866b842540418342ee08dd7ce5da2022a866"
    assert res.plan_id == "749b9ee26c291e0e647eb10d126197bb0d8ecdb996c7a37b9de9a1abc293d566"
    assert res.manifest["moves"] == 45


def test_dry_run_capacity_in_bytes(tmp_path):
    from shardmove import api

    info = api.create_demo_keyspace(str(tmp_path / "ks"), keys=2000, shards=4)
    cfg = load_config(info["config"])
    raw_target = [{"id": s, "capacity_bytes": 10**9} for s in SHARDS4] + [{"id": "s4", "capacity_bytes": 1000}]
    import dataclasses
    from pipeline.config import TargetShard

    cfg = dataclasses.replace(cfg, target_shards=tuple(TargetShard(t["id"], 1.0, None, t["capacity_bytes"])
                                                        for t in raw_target))
    lines = []
    res = api.plan(cfg, dry_run=True, out=lines.append)
    assert not res.capacity_ok
    s4 = next(r for r in res.manifest["capacity"] if r["shard"] == "s4")
    assert s4["bytes_before"] == 0 and s4["bytes_after"] > 1000 and s4["headroom_bytes_pct"] < 0
    s0 = next(r for r in res.manifest["capacity"] if r["shard"] == "s0")
    assert s0["bytes_after"] < s0["bytes_before"]
    assert any("s4" in l and "OVER" in l for l in lines)


def test_plan_threads_give_the_same_plan_bytes(tmp_path, monkeypatch):
    """plan_threads forced to 3 (each chunk's row groups planned on a pool, spills written
    on it) and to 1 give byte-identical move files and the same manifest figures;
    variable-length keys, several chunks and spills per chunk, the writer's byte budget binding."""
    monkeypatch.setattr("transforms.plan.SPILL_ROWS", 600)
    monkeypatch.setattr("transforms.planio.SPILL_ROWS", 1000)  # chunks of 10 row groups: several chunks
    monkeypatch.setattr("transforms.plan._WriteGroupFn.WRITE_AHEAD_BYTES", 1)  # one group in flight at a time
    rows = _assignments(1500, KeyType.BYTES)
    snap = _write_snapshot(tmp_path / "snap.parquet", rows, row_group=200)
    plans = []
    for threads in (1, 3):
        cfg = _cfg(tmp_path / f"t{threads}", SHARDS4 + ["s4"], key_type="bytes", segment_size=100,
                   plan_threads=threads, hash_buckets=3)
        res = make_plan(cfg, snapshot=str(snap), out=lambda _l: None)
        d = os.path.join(res.plan_dir, "moves")
        m = {k: v for k, v in res.manifest.items() if k not in ("created_at", "planner_seconds")}
        plans.append((m, {f: open(os.path.join(d, f), "rb").read() for f in sorted(os.listdir(d))}))
    assert plans[0] == plans[1] and plans[0][1]
    _m, got = _read_plan(res.plan_dir)
    assert sorted(got) == sorted(core.reference_plan(rows, ring=_ring(SHARDS4 + ["s4"], KeyType.BYTES)))


def test_explicit_target_plan_threads_give_the_same_plan_bytes(tmp_path, monkeypatch):
    """An explicit-target plan with plan_threads 3 (row groups prepared, spills written and
    partitions joined on pools) and 1: byte-identical move files and the same manifest
    figures; variable-length keys, target-only and snapshot-only keys, several chunks and
    spills per chunk of each side, several join partitions."""
    monkeypatch.setattr("transforms.plan_explicit.SIDE_SPILL_ROWS", 150)  # spills of 2 segments
    monkeypatch.setattr("transforms.planio.SPILL_ROWS", 400)  # chunks of 4 row groups: 2 chunks a side
    monkeypatch.setattr("transforms.plan_explicit.JOIN_PARTITION_ROWS", 100)  # 8 join partitions
    rows = _assignments(1500, KeyType.BYTES)
    snap = _write_snapshot(tmp_path / "snap.parquet", rows, row_group=200)
    rng = random.Random(7)
    explicit = {k: rng.choice(SHARDS4 + ["s4"]) for k, _ in rows if rng.random() < 0.8}
    explicit.update({bytes([1, i % 256, i // 256]) + b"only-in-target": "s4" for i in range(300)})
    tpath = tmp_path / "target.parquet"
    pq.write_table(pa.table({"key": pa.array(list(explicit), pa.binary()),
                             "shard_id": pa.array(list(explicit.values()))}), tpath, row_group_size=200)
    target = {"snapshot": str(tpath), "shards": [{"id": s} for s in SHARDS4 + ["s4"]]}
    plans = []
    for threads in (1, 3):
        cfg = _cfg(tmp_path / f"t{threads}", [], target=target, key_type="bytes", segment_size=100,
                   plan_threads=threads, hash_buckets=3)
        res = make_plan(cfg, snapshot=str(snap), out=lambda _l: None)
        d = os.path.join(res.plan_dir, "moves")
        m = {k: v for k, v in res.manifest.items() if k not in ("created_at", "planner_seconds")}
        plans.append((m, {f: open(os.path.join(d, f), "rb").read() for f in sorted(os.listdir(d))}))
    assert plans[0] == plans[1] and len(plans[0][1]) > 3
    _m, got = _read_plan(res.plan_dir)
    assert sorted(got) == sorted(core.reference_plan(rows, target=explicit))


def test_plan_threads_automatic_choice():
    from shardmove.planner import AUTO_THREADS_MIN_ROWS, plan_threads

    assert plan_threads(3, 10, False) == 3  # the option wins
    assert plan_threads(0, AUTO_THREADS_MIN_ROWS - 1, True) == 1  # small snapshot: one thread
    assert plan_threads(0, 10 * AUTO_THREADS_MIN_ROWS, False) == 1  # another engine: its own workers
    assert 2 <= plan_threads(0, 10 * AUTO_THREADS_MIN_ROWS, True) <= 8  # two per core


def test_automatic_plan_threads_count_the_footers_rows(tmp_path, monkeypatch):
    """A plain Parquet directory (no snapshot.json) of small row groups: the automatic
    thread count is given the rows the footers count, not row groups x segment_size
    (which took 1,500 rows in 8 row groups for 160,000)."""
    import shardmove.planner as planner
    from pipeline.snapshot import snapshot_parts

    seen = []
    real = planner.plan_threads
    monkeypatch.setattr(planner, "plan_threads", lambda option, rows, in_process: seen.append(rows)
                        or real(option, rows, in_process))
    rows = _assignments(1500)
    (tmp_path / "snap").mkdir()
    _write_snapshot(tmp_path / "snap" / "a.parquet", rows[:1000], row_group=200)
    _write_snapshot(tmp_path / "snap" / "b.parquet", rows[1000:], row_group=200)
    units, counted = snapshot_parts(str(tmp_path / "snap"), "snapshot", KeyType.STRING)
    assert len(units) == 8 and counted == len(rows)
    res = make_plan(_cfg(tmp_path, SHARDS4 + ["s4"]), snapshot=str(tmp_path / "snap"), out=lambda _l: None)
    assert seen == [len(rows)] and res.manifest["keys_examined"] == len(rows)


def test_move_files_are_synced_once_per_directory_after_the_last(tmp_path, monkeypatch):
    """Each move file is written to a temporary, fsynced and renamed; the moves directory
    is fsynced once, when every file of the bundle is in place (not once per file), and
    before the manifest is written."""
    import pipeline.fs as fs_mod

    syncs = []
    real = fs_mod._fsync_dir

    def record(directory):
        listing = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
        syncs.append((directory.rstrip("/"), listing))
        real(directory)

    monkeypatch.setattr(fs_mod, "_fsync_dir", record)
    rows = _assignments(3000)
    snap = _write_snapshot(tmp_path / "snap.parquet", rows, row_group=500)
    res = make_plan(_cfg(tmp_path, SHARDS4 + ["s4"], hash_buckets=4), snapshot=str(snap), out=lambda _l: None)
    files = sorted(f["group"] + ".parquet" for f in res.manifest["files"])
    assert len(files) > 4
    moves = [(d, listing) for d, listing in syncs if d.endswith("/moves")]
    assert len(moves) == 1 and moves[0][1] == files  # once, after the last rename, no temporaries left
    manifest_at = next(i for i, (_d, listing) in enumerate(syncs) if "manifest.json" in listing)
    assert syncs.index(moves[0]) < manifest_at
