"""The object-store data mover: naming, copy semantics, and the whole CLI on gs://.

Local shards run everywhere; GCS shards and the end-to-end run use the
session's fake-gcs-server (generation preconditions enforced).
"""
from __future__ import annotations

import base64
import os
import pickle
import signal
import sqlite3
import subprocess
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import xxhash
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import SHARDMOVE, run_cli
from gcs_emulators import *  # noqa: F401,F403 -- fixtures
from pipeline import fs, gcs
from shardmove import api
from pipeline.stores import data_store_from_spec
from pipeline.config import load_config
from shardmove.executor import summarize
from pipeline.errors import BadInput, PermanentError, SourceMissing, TransientError
from pipeline.keys import KeyType, text_form
from pipeline.stores import objects as O
from pipeline.stores.objects import ObjectDataStore, decode_name, encode_key, name_length

HOSTILE = [
    b"../../etc/passwd", b"..", b".", b"/", b"/etc/shadow", b"a/b/../../..", b"\x00", b"a\x00b",
    b"\n", b"line\nbreak", b"\\..\\..\\windows", b"k/00/xyz", b"~", b"%2e%2e%2f", "ключ/ü".encode(),
    b"\xff\xfe\x00\x01", b"A" * 631, b" " * 5,
]

_NAME_RE = r"\Ak/[0-9a-f]{2}(/[0-9a-v]{200}_)*/[0-9a-v]{1,200}\Z"


# ------------------------------------------------------------------ naming


@settings(max_examples=400, deadline=None)
@given(st.binary(min_size=1, max_size=700))
def test_object_name_round_trip_and_shape(key):
    import re

    name = encode_key(key)
    assert re.match(_NAME_RE, name)
    assert decode_name(name) == key
    assert len(name) == name_length(len(key))
    # the base32hex payload is RFC 4648 base32hex, lowercase, unpadded
    payload = "".join(p.rstrip("_") for p in name.split("/")[2:])
    assert base64.b32hexdecode(payload.upper() + "=" * (-len(payload) % 8)) == key
    assert name.split("/")[1] == f"{xxhash.xxh3_64_intdigest(key) >> 56:02x}"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.one_of(st.binary(min_size=1, max_size=600), st.sampled_from(HOSTILE[:-2])))
def test_no_key_escapes_its_prefix(tmp_path, key):
    local = str(tmp_path / "shard")
    store = ObjectDataStore({"a": local, "g": "gs://bkt/pre/fix"}, KeyType.BYTES)
    path = store.object_path(key, "a")
    assert os.path.realpath(path).startswith(os.path.realpath(local) + os.sep)
    assert os.path.normpath(path) == path  # no . / .. / empty component anywhere
    rel = os.path.relpath(path, local)
    assert not rel.startswith("..") and "\x00" not in path and "\n" not in path
    gpath = store.object_path(key, "g")
    assert gpath.startswith("gs://bkt/pre/fix/k/")
    comps = gpath[len("gs://bkt/pre/fix/"):].split("/")
    assert all(c and c not in (".", "..") for c in comps)


def test_hostile_keys_stay_inside_local_shard(tmp_path):
    outside = tmp_path / "etc"
    outside.mkdir()
    shard = tmp_path / "data" / "s0"
    store = ObjectDataStore({"s0": str(shard), "s1": str(tmp_path / "data" / "s1")}, KeyType.BYTES)
    keys = [k for k in HOSTILE if len(k) <= store.max_key_bytes()]
    assert store.put_many("s0", [(k, b"v:" + k) for k in keys]) == len(keys)
    for root, _dirs, files in os.walk(tmp_path):
        for f in files:
            assert os.path.realpath(os.path.join(root, f)).startswith(str(shard) + os.sep)
    assert os.listdir(outside) == []
    assert store.count("s0") == len(keys)
    got = store.read(keys, "s0")
    assert {k: v for k, (v, _ver) in got.items()} == {k: b"v:" + k for k in keys}
    # every file name decodes back to its key
    names = []
    for root, _dirs, files in os.walk(shard):
        names += [os.path.relpath(os.path.join(root, f), shard) for f in files]
    assert sorted(decode_name(n) for n in names) == sorted(keys)
    outs = store.copy(keys, "s0", "s1")
    assert all(o.ok for o in outs) and store.count("s1") == len(keys)


@pytest.mark.parametrize("bad", [
    "k/00/", "x/00/04", "k/0g/04", "k/ZZ/04", "k//04", "k/00/0", "k/00/04=", "K/00/04", "k/00/04/05",
    "k/00/" + "0" * 200 + "/01", "k/00/" + "0" * 199 + "_/01", "k/00/0W", "k/00/01",
])
def test_decode_is_strict(bad):
    with pytest.raises(ValueError):
        decode_name(bad)


def test_decode_rejects_wrong_fanout_and_noncanonical_base32():
    name = encode_key(b"hello")
    hh = name.split("/")[1]
    other = f"{(int(hh, 16) + 1) % 256:02x}"
    with pytest.raises(ValueError):
        decode_name(name.replace(f"/{hh}/", f"/{other}/", 1))
    # "hello" -> 8 chars, no spare bits; a 1-byte key leaves 2 spare bits that must be zero
    one = encode_key(b"\x00")
    assert one.endswith("/00")
    with pytest.raises(ValueError):
        decode_name(one[:-1] + "1")
    with pytest.raises(ValueError):
        encode_key(b"")


# ------------------------------------------------------------------ limits


def test_over_long_keys_are_refused_at_plan_time_and_by_copy(tmp_path):
    prefix = "p" * 300
    store = ObjectDataStore({"a": str(tmp_path / "a"), "b": str(tmp_path / "b"),
                             "g": f"gs://bkt/{prefix}"}, KeyType.BYTES)
    # GCS: whole object name <= 1024 bytes, including the prefix and its slash
    g = store.max_key_bytes("g")
    assert len(prefix) + 1 + name_length(g) <= 1024 < len(prefix) + 1 + name_length(g + 1)
    # local: name <= 1024 bytes and path <= 4095
    loc = store.max_key_bytes("a")
    assert name_length(loc) <= 1024 < name_length(loc + 1)
    assert store.max_key_bytes() == min(g, loc, store.max_key_bytes("b"))
    keys = [b"x" * n for n in (1, g, g + 1, loc, loc + 1, 5000)]
    assert store.check_keys(keys) == sum(len(k) > g for k in keys)
    assert store.check_keys(pa.array(keys, pa.binary())) == store.check_keys(keys)
    assert store.check_keys(keys, "a") == 2
    with pytest.raises(O.KeyTooLong):
        store.object_path(b"x" * (g + 1), "g")
    store.put_many("a", [(b"x" * loc, b"ok")])
    out = store.copy([b"x" * loc, b"x" * (loc + 1)], "a", "b")
    assert out[0].ok and not out[1].ok
    assert out[1].error.reason == "key_too_long" and isinstance(out[1].error, PermanentError)
    assert "xxxx" not in str(out[1].error)  # never a key value in a message


def test_spec_validation(tmp_path):
    ok = data_store_from_spec({"kind": "objects", "shards": {"s0": str(tmp_path / "a"), "s1": "gs://b-1/x/"},
                               "io_concurrency": 4, "keys_per_call": 8}, KeyType.STRING)
    assert isinstance(ok, ObjectDataStore) and ok.keys_per_call == 8 and ok.location("s1") == "gs://b-1/x"
    bad = [
        ({"kind": "objects"}, "data_store.shards"),
        ({"kind": "objects", "shards": {"s0": "relative/dir"}}, "must be an absolute directory"),
        ({"kind": "objects", "shards": {"s0": "gs://B@d/x"}}, "not a valid bucket name"),
        ({"kind": "objects", "shards": {"s0": "gs://bkt/a/../b"}}, r"\. or \.\. component"),
        ({"kind": "objects", "shards": {"s0": "gs://bkt/a", "s1": "gs://bkt/a/b"}}, "overlap"),
        ({"kind": "objects", "shards": {"s0": str(tmp_path), "s1": str(tmp_path)}}, "overlap"),
        ({"kind": "objects", "shards": {"s0": str(tmp_path)}, "color": 1}, "unknown field color"),
        ({"kind": "objects", "shards": {"s0": str(tmp_path)}, "io_concurrency": 0}, "io_concurrency"),
    ]
    for spec, msg in bad:
        with pytest.raises(BadInput, match=msg):
            data_store_from_spec(spec, KeyType.STRING)
    with pytest.raises(PermanentError, match="not configured"):
        ok.count("nope")
    assert ok.shard_exists("nope") is False


def test_error_classification():
    import errno

    from google.api_core import exceptions as E

    assert isinstance(O._store_error(OSError(errno.EAGAIN, "x"), "copy"), TransientError)
    assert O._store_error(OSError(errno.EACCES, "x"), "copy").reason == "io_error"
    assert isinstance(O._store_error(E.ServiceUnavailable("x"), "copy"), TransientError)
    assert isinstance(O._store_error(gcs.StorageUnavailable("x"), "copy"), TransientError)
    assert O._store_error(E.Forbidden("x"), "copy").reason == "forbidden"
    assert O._store_error(E.BadRequest("x"), "copy").reason == "storage_error"
    assert O._store_error(FileNotFoundError("gs 404"), "copy").reason == "shard_missing"


# ------------------------------------------------------------- copy semantics


@pytest.fixture(params=["local", "gcs"])
def store_factory(request, tmp_path):
    """Builds stores over local directories or fake-gcs-server prefixes."""
    if request.param == "gcs":
        emu = request.getfixturevalue("use_fake_gcs")
        bucket = emu.new_bucket()
        base = f"gs://{bucket}/data"
    else:
        base = str(tmp_path / "data")

    def make(key_type=KeyType.BYTES, **kw):
        return ObjectDataStore({s: f"{base}/{s}" for s in ("s0", "s1", "s2")}, key_type, **kw)

    make.kind = request.param
    return make


def test_copy_read_verify_delete(store_factory):
    store = store_factory()
    rows = [(f"key-{i}".encode(), os.urandom(10 + i)) for i in range(40)] + [(b"empty-value", b"")]
    store.put_many("s0", rows)
    keys = [k for k, _ in rows]
    src = store.read(keys, "s0")
    assert {k: v for k, (v, _) in src.items()} == dict(rows)
    out = store.copy(keys + [b"absent", keys[0]], "s0", "s1")
    assert len(out) == len(keys) + 2
    for o, (k, v) in zip(out, rows):
        assert o.ok and o.key == k and o.written
        assert o.content_hash == xxhash.xxh3_128_digest(v) and o.source_version == src[k][1]
    assert isinstance(out[-2].error, SourceMissing) and out[-2].error.reason == "source_missing"
    assert out[-1] == out[0]
    assert store.hashes(keys, "s1") == {k: (xxhash.xxh3_128_digest(v), store.read([k], "s1")[k][1])
                                        for k, v in rows}
    assert {k: v for k, (v, _) in store.read(keys, "s1").items()} == dict(rows)
    assert store.key_sizes(keys[:3], "s1") == {k: len(v) for k, v in rows[:3]}
    assert store.count("s1") == len(rows) and store.shard_bytes("s1") == sum(len(v) for _, v in rows)
    assert store.count("s2") == 0 and store.read(keys, "s2") == {}
    # idempotent: a second copy writes nothing (the target keeps its version)
    before = store.versions(keys, "s1")
    again = store.copy(keys, "s0", "s1")
    assert all(o.ok and o.written for o in again)
    assert store.versions(keys, "s1") == before
    # delete is idempotent
    assert store.delete(keys[:5], "s1") == 5
    assert store.delete(keys[:5], "s1") == 0
    assert store.count("s1") == len(rows) - 5
    assert store.shard_exists("s0") and store.shard_exists("s1")
    store.close()


def test_copy_never_overwrites_a_newer_target_but_repairs_a_stale_one(store_factory):
    store = store_factory()
    store.put_many("s0", [(b"a", b"v1"), (b"b", b"old-source")])
    assert store.copy([b"a"], "s0", "s1")[0].written
    # an application write on the target after the swap: newer, never clobbered by a late copy
    time.sleep(0.002)
    store.put_many("s1", [(b"a", b"written-after-swap")])
    late = store.copy([b"a"], "s0", "s1")[0]
    assert late.ok and late.written is False
    assert store.read([b"a"], "s1")[b"a"][0] == b"written-after-swap"
    assert late.content_hash != store.hashes([b"a"], "s1")[b"a"][0]  # verification will catch it
    # a stale leftover on the target, older than the source record: replaced
    store.put_many("s1", [(b"b", b"stale-leftover")])
    time.sleep(0.002)
    store.put_many("s0", [(b"b", b"fresh-source")])
    o = store.copy([b"b"], "s0", "s1")[0]
    assert o.ok and o.written and store.read([b"b"], "s1")[b"b"][0] == b"fresh-source"
    # the source changed after a copy: a re-copy carries the new bytes
    store.put_many("s0", [(b"b", b"fresh-source-2")])
    o2 = store.copy([b"b"], "s0", "s1")[0]
    assert o2.written and o2.source_version != o.source_version
    assert store.read([b"b"], "s1")[b"b"][0] == b"fresh-source-2"


def test_versions_change_on_every_write_and_guard_deletes(store_factory):
    store = store_factory()
    store.put_many("s0", [(b"k", b"1")])
    v1 = store.versions([b"k"], "s0")[b"k"]
    store.put_many("s0", [(b"k", b"1")])  # same bytes: still a new version
    v2 = store.versions([b"k"], "s0")[b"k"]
    assert v2 != v1 and store.read([b"k"], "s0")[b"k"] == (b"1", v2)
    if store_factory.kind == "local":  # fake-gcs-server ignores delete preconditions
        assert store.delete([b"k"], "s0", versions=[v1]) == 0
    assert store.delete([b"k"], "s0", versions=[v2]) == 1
    assert store.read([b"k"], "s0") == {}


def test_copy_across_local_and_gcs(use_fake_gcs, tmp_path):
    bucket = use_fake_gcs.new_bucket()
    store = ObjectDataStore({"l": str(tmp_path / "l"), "g": f"gs://{bucket}/g"}, KeyType.STRING)
    store.put_many("l", [(b"user-1", b"hello")])
    assert store.copy([b"user-1"], "l", "g")[0].written
    assert store.read([b"user-1"], "g")[b"user-1"][0] == b"hello"
    assert store.copy([b"user-1"], "g", "l")[0].written  # same bytes: nothing to do
    obj = gcs.stat(f"gs://{bucket}/g/" + encode_key(b"user-1"))
    assert obj.metadata[O.WRITTEN_NS_METADATA] == str(os.stat(store.object_path(b"user-1", "l")).st_mtime_ns)


def test_copy_when_target_appears_concurrently_uses_the_precondition(use_fake_gcs, monkeypatch):
    """The target is created between the look-up and the upload: 412, then settled."""
    bucket = use_fake_gcs.new_bucket()
    store = ObjectDataStore({"a": f"gs://{bucket}/a", "b": f"gs://{bucket}/b"}, KeyType.BYTES)
    store.put_many("a", [(b"k", b"same")])
    target = store.object_path(b"k", "b")
    real_head = O._gcs_head
    calls = {"n": 0}

    def racing_head(path):
        if path == target and calls["n"] == 0:
            calls["n"] += 1
            gcs.upload(path, b"same", if_generation_match=0)  # another copier wins the race
            return None  # ... after we looked
        return real_head(path)

    monkeypatch.setattr(O, "_gcs_head", racing_head)
    out = store.copy([b"k"], "a", "b")[0]
    assert out.ok and out.written and calls["n"] == 1
    assert gcs.read_bytes(target) == b"same"


def test_store_is_picklable_and_reopens_lazily(store_factory):
    store = store_factory()
    store.put_many("s0", [(b"k", b"v")])
    clone = pickle.loads(pickle.dumps(store))
    assert clone.read([b"k"], "s0")[b"k"][0] == b"v"
    assert clone.keys_per_call == store.keys_per_call


# ----------------------------------------------------------- end to end


def _records(shard_file):
    con = sqlite3.connect(shard_file)
    rows = dict(con.execute("SELECT key, value FROM records").fetchall())
    con.close()
    return rows


def _map_rows(path):
    con = sqlite3.connect(path)
    rows = dict(con.execute("SELECT key, shard_id FROM shard_map").fetchall())
    con.close()
    return rows


def _line(out: str, prefix: str) -> str:
    for line in out.splitlines():
        if line.startswith(prefix):
            return line[len(prefix):].strip()
    raise AssertionError(f"no line starting with {prefix!r} in:\n{out}")


def test_end_to_end_everything_on_gcs_with_sigkill_and_rerun(fake_gcs, tmp_path, monkeypatch):
    """snapshot -> plan -> run (SIGKILLed) -> run -> status, every location on gs://.

    Work directory, snapshot, plan, checkpoints, lease and the data shards live
    on fake-gcs-server (preconditions enforced); only the map stays SQLite (there
    is no GCS map store).
    """
    for k, v in fake_gcs.env.items():
        monkeypatch.setenv(k, v)
    gcs.configure_for_emulator()
    env = dict(fake_gcs.env)
    bucket = fake_gcs.new_bucket("e2e-work")
    data_bucket = fake_gcs.new_bucket("e2e-data")
    info = api.create_demo_keyspace(str(tmp_path / "ks"), keys=300, shards=4)
    demo = load_config(info["config"])
    shards = {f"s{i}": f"gs://{data_bucket}/shards/s{i}" for i in range(5)}
    store = ObjectDataStore(shards, KeyType.STRING)
    originals = {}
    for s in demo.current_shards:
        recs = _records(os.path.join(demo.data_store["directory"], f"{s}.sqlite"))
        originals.update(recs)
        store.put_many(s, [(k.encode(), bytes(v)) for k, v in recs.items()])
    assert sum(store.count(s) for s in shards) == 300

    doc = {
        "key_type": "string",
        "work_dir": f"gs://{bucket}/work",
        "map_store": {"kind": "sqlite", "path": demo.map_store["path"]},
        "data_store": {"kind": "objects", "shards": shards, "keys_per_call": 10},
        "current_shards": list(demo.current_shards),
        "target": {"profile": "native", "shards": [{"id": s} for s in shards]},
        "swap_batch_size": 20, "hash_buckets": 2, "retry_base_delay": "1ms",
        "checkpoint_flush_interval": "20ms", "copy_concurrency": 4, "verification": "hash",
    }
    cfg = tmp_path / "gcs.yaml"
    cfg.write_text(yaml.safe_dump(doc))
    slow = tmp_path / "gcs-slow.yaml"
    slow.write_text(yaml.safe_dump(dict(doc, faults={"copy": {"latency_ms": 150}, "swap": {"latency_ms": 150}})))

    t0 = time.monotonic()
    r = run_cli("snapshot", "-c", str(cfg), env=env, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    snap = _line(r.stdout, "snapshot:")
    assert snap.startswith(f"gs://{bucket}/work/snapshots/")
    r = run_cli("plan", "-c", str(cfg), "--snapshot", snap, env=env, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    plan_id = _line(r.stdout, "plan id:")
    plan_dir = f"gs://{bucket}/work/plans/{plan_id}"
    assert _line(r.stdout, "plan dir:") == plan_dir
    assert fs.exists(fs.join(plan_dir, "manifest.json"))
    manifest = yaml.safe_load(fs.read_bytes(fs.join(plan_dir, "manifest.json")))
    moves = []
    for f in manifest["files"]:
        with fs.open_input(fs.join(plan_dir, "moves", f["group"] + ".parquet")) as fh:
            t = pq.read_table(fh)
        moves += list(zip(t["key"].to_pylist(), t["source"].to_pylist(), t["target"].to_pylist()))
    n = len(moves)
    assert n == manifest["moves"] and n > 30

    # run, SIGKILL once checkpoints start landing on gs://, rerun to completion
    env_all = dict(os.environ, PYTHONHASHSEED="0", **env)
    proc = subprocess.Popen([SHARDMOVE, "run", "-c", str(slow), plan_id], env=env_all, cwd=str(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ckpts = fs.join(plan_dir, "checkpoints")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if any("/part-" in p for p in fs.walk_files(ckpts)):
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"run ended before it could be killed: {proc.communicate()}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    mid = summarize(plan_dir, manifest)
    assert not mid["complete"] and mid["done"] < n  # the kill landed mid-run
    r = run_cli("run", "-c", str(cfg), plan_id, env=env, cwd=str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"summary: planned={n} done={n} failed=0" in r.stdout
    r = run_cli("status", "-c", str(cfg), plan_id, env=env, cwd=str(tmp_path))
    assert r.returncode == 0 and f"summary: planned={n} done={n} failed=0" in r.stdout

    # data and map exactly as planned
    mp = _map_rows(demo.map_store["path"])
    moved = {}
    for key, src, tgt in moves:
        text = text_form(key, KeyType.STRING)
        assert mp[text] == tgt
        moved[text] = (src, tgt)
    assert set(mp) == set(originals)
    by_shard = {}
    for text, shard in mp.items():
        by_shard.setdefault(shard, []).append(text.encode())
    for shard, keys in by_shard.items():  # every key's data is on the shard the map names
        got = store.read(keys, shard)
        assert {k: v for k, (v, _ver) in got.items()} == {k: bytes(originals[k.decode()]) for k in keys}
    assert store.count("s4") == sum(1 for _s, t in moved.values() if t == "s4")
    assert set(fs.listdir(plan_dir)) >= {"manifest.json", "moves", "checkpoints", "lease.json", "summary.json"}
    assert not os.path.exists(tmp_path / "work")  # nothing went to a local work directory
    assert time.monotonic() - t0 < 100
