"""shardmove at its edges (issue 12): user errors, refusals that change nothing,
unsigned hashes in Beam, abbreviated flags, key limits.  Through the real CLI."""
from __future__ import annotations

import os
import re
import socket
import sqlite3

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import run_cli
from services import tree

SECRET = "sekret-pw-987"
PLAN_RE = re.compile(r"^plan id: ([0-9a-f]{64})$", re.M)
FAST = 60  # no user error may take longer than this (a hang fails the test)


def one_error_line(r, code):
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr and "internal failure" not in r.stderr, r.stderr
    assert SECRET not in r.stdout + r.stderr
    return lines[0]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    d = tmp_path_factory.mktemp("edges-demo")
    r = run_cli("demo", str(d), "--keys", "300", "--shards", "2")
    assert r.returncode == 0, r.stderr
    return d


def write_cfg(path, doc: dict) -> str:
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def demo_doc(demo, tmp_path, **over) -> dict:
    doc = yaml.safe_load((demo / "shardmove.yaml").read_text())
    doc["map_store"] = {"kind": "sqlite", "path": str(demo / "keyspace" / "map.sqlite")}
    doc["data_store"] = {"kind": "sqlite", "directory": str(demo / "keyspace" / "shards")}
    doc["work_dir"] = str(tmp_path / "work")
    doc.update(over)
    return doc


def unused_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# ------------------------------------------------------------- item 2: store errors are user errors

def _sqlite_not_a_db(tmp_path):
    p = tmp_path / "garbage.sqlite"
    p.write_bytes(b"this is not a database at all" * 200)
    return {"kind": "sqlite", "path": str(p)}


def _sqlite_directory(tmp_path):
    p = tmp_path / "adir.sqlite"
    p.mkdir()
    return {"kind": "sqlite", "path": str(p)}


def _sqlite_wrong_schema(tmp_path):
    p = tmp_path / "other.sqlite"
    c = sqlite3.connect(p)
    c.execute("CREATE TABLE something_else(a)")
    c.commit()
    c.close()
    return {"kind": "sqlite", "path": str(p)}


@pytest.mark.parametrize("make", [_sqlite_not_a_db, _sqlite_directory, _sqlite_wrong_schema],
                         ids=["not_a_database", "directory", "wrong_schema"])
@pytest.mark.parametrize("command", ["validate", "snapshot", "plan"])
def test_misconfigured_sqlite_map_is_bad_configuration(demo, tmp_path, make, command):
    cfg = write_cfg(tmp_path / "c.yaml", demo_doc(demo, tmp_path, map_store=make(tmp_path)))
    line = one_error_line(run_cli(command, "--config", cfg, timeout=FAST), 2)
    assert "map store" in line, line
    assert not (tmp_path / "work").exists() or tree(tmp_path / "work") == {} or \
        all(v is None for v in tree(tmp_path / "work").values())


def test_misconfigured_sqlite_data_shard_on_run_is_bad_configuration(demo, tmp_path):
    cfg = write_cfg(tmp_path / "c.yaml", demo_doc(demo, tmp_path))
    r = run_cli("plan", "--config", cfg)
    assert r.returncode == 0, r.stderr
    plan_id = PLAN_RE.findall(r.stdout)[0]
    shards = tmp_path / "shards"
    shards.mkdir()
    for name in os.listdir(demo / "keyspace" / "shards"):
        (shards / name).write_bytes(b"not a database" * 300)
    bad = write_cfg(tmp_path / "bad.yaml", demo_doc(demo, tmp_path, data_store={"kind": "sqlite",
                                                                             "directory": str(shards)}))
    before = tree(tmp_path / "work")
    line = one_error_line(run_cli("run", plan_id, "--config", bad, timeout=FAST), 2)
    assert "data store" in line or "shard" in line, line
    assert tree(tmp_path / "work") == before


@pytest.fixture
def pg():
    from services import require_postgres

    return require_postgres()


def _pg_cases():
    from services import dsn_for

    return {
        "wrong_db": lambda: {"kind": "postgres", "dsn": dsn_for("no_such_db_shardmove", password=SECRET)},
        "wrong_port": lambda: {"kind": "postgres", "dsn": dsn_for("postgres", host="127.0.0.1",
                                                                    port=str(unused_port()), password=SECRET),
                               "connect_timeout": 2},
        "wrong_user": lambda: {"kind": "postgres", "dsn": dsn_for("postgres", user="no_such_role_sm",
                                                                    password=SECRET)},
        "missing_table": lambda: {"kind": "postgres", "dsn": dsn_for("postgres", password=SECRET),
                                  "table": "no_such_table_sm"},
    }


@pytest.mark.parametrize("case", ["wrong_db", "wrong_port", "wrong_user", "missing_table"])
@pytest.mark.parametrize("command", ["validate", "plan"])
def test_misconfigured_postgres_map_is_bad_configuration(demo, tmp_path, pg, case, command):
    spec = _pg_cases()[case]()
    cfg = write_cfg(tmp_path / "c.yaml", demo_doc(demo, tmp_path, map_store=spec))
    line = one_error_line(run_cli(command, "--config", cfg, timeout=FAST), 2)
    assert "map store" in line and "password=***" in line or "table" in line, line


def test_unreachable_postgres_host_does_not_hang(demo, tmp_path, pg):
    from services import dsn_for

    spec = {"kind": "postgres", "dsn": dsn_for("postgres", host="192.0.2.1", password=SECRET), "connect_timeout": 1}
    cfg = write_cfg(tmp_path / "c.yaml", demo_doc(demo, tmp_path, map_store=spec))
    line = one_error_line(run_cli("validate", "--config", cfg, timeout=30), 2)
    assert "192.0.2.1" in line, line


@pytest.fixture
def redis_url():
    from services import require_redis

    return require_redis()


def test_misconfigured_redis_map_is_bad_configuration(demo, tmp_path, redis_url):
    import redis
    from services import fresh_prefix, redis_url_as

    cases = {
        "wrong_port": {"kind": "redis", "url": f"redis://:{SECRET}@127.0.0.1:{unused_port()}/0", "connect_timeout": 2},
        "wrong_auth": {"kind": "redis", "url": redis_url_as("nobody_sm", SECRET)},
    }
    with fresh_prefix("edges") as prefix:
        c = redis.Redis.from_url(redis_url)
        c.set(f"{prefix}:shard", "a string, not a hash")
        cases["prefix_type"] = {"kind": "redis", "url": redis_url, "prefix": prefix}
        for name, spec in cases.items():
            for command in ("validate", "plan"):
                cfg = write_cfg(tmp_path / "c.yaml", demo_doc(demo, tmp_path, map_store=spec))
                line = one_error_line(run_cli(command, "--config", cfg, timeout=FAST), 2)
                assert "map store" in line or "map schema" in line, (name, line)


def test_malformed_inputs_are_bad_input(demo, tmp_path):
    garbage = tmp_path / "snap.parquet"
    garbage.write_bytes(b"PAR1" + b"\0" * 100 + b"PAR1")
    floats = tmp_path / "floats.parquet"
    pq.write_table(pa.table({"key": pa.array([1.5, 2.5]), "shard_id": pa.array(["s0", "s1"])}), floats)
    intshards = tmp_path / "intshards.parquet"
    pq.write_table(pa.table({"key": pa.array(["a", "b"]), "shard_id": pa.array([1, 2])}), intshards)
    cfg = write_cfg(tmp_path / "c.yaml", demo_doc(demo, tmp_path))
    for snap in (garbage, floats, intshards):
        line = one_error_line(run_cli("plan", "--config", cfg, "--snapshot", str(snap), timeout=FAST), 2)
        assert "snapshot" in line, line
    doc = demo_doc(demo, tmp_path)
    doc["target"] = {"snapshot": str(floats)}
    line = one_error_line(run_cli("plan", "--config", write_cfg(tmp_path / "t.yaml", doc), timeout=FAST), 2)
    assert "target" in line, line
    for text in ("- just\n- a list\n", "target: 5\n", "map_store: 3\n", "current_shards: 7\n", "\x00\x01",
                 "key_type: [1]\n", "faults: 5\n"):
        (tmp_path / "y.yaml").write_text(text)
        one_error_line(run_cli("validate", "--config", str(tmp_path / "y.yaml"), timeout=FAST), 2)
    (tmp_path / "y.yaml").write_bytes(b"\xff\xfe\x00not utf-8")
    assert "not UTF-8" in one_error_line(run_cli("validate", "--config", str(tmp_path / "y.yaml")), 2)
    one_error_line(run_cli("validate", "--config", str(tmp_path)), 2)  # a directory


# ------------------------------------------------------------- item 3: a refusal changes nothing

def _copy_demo(demo, dst):
    import shutil

    shutil.copytree(demo / "keyspace", dst / "keyspace")


def _insert_map_row(cfg_doc, key: str, shard: str = "s0"):
    """A new row, written as an application would: with a new, higher version."""
    c = sqlite3.connect(cfg_doc["map_store"]["path"])
    top = c.execute("SELECT max(version) FROM shard_map").fetchone()[0]
    c.execute("INSERT INTO shard_map(key, shard_id, version) VALUES (?, ?, ?)", (key, shard, top + 1))
    c.commit()
    c.close()


def _doc_in(tmp_path, demo):
    _copy_demo(demo, tmp_path)
    doc = yaml.safe_load((demo / "shardmove.yaml").read_text())
    doc["map_store"] = {"kind": "sqlite", "path": str(tmp_path / "keyspace" / "map.sqlite")}
    doc["data_store"] = {"kind": "sqlite", "directory": str(tmp_path / "keyspace" / "shards")}
    doc["work_dir"] = str(tmp_path / "work")
    return doc


def _planned_copy(tmp_path, demo):
    """A copy of the demo keyspace under ``tmp_path``, planned: (config doc, config path, plan id)."""
    doc = _doc_in(tmp_path, demo)
    cfg = write_cfg(tmp_path / "c.yaml", doc)
    r = run_cli("plan", "--config", cfg)
    assert r.returncode == 0, r.stderr
    return doc, cfg, PLAN_RE.findall(r.stdout)[0]


@pytest.mark.parametrize("bad_key", ["", "x" * 5000], ids=["empty", "over_long"])
def test_refused_plan_leaves_a_fresh_work_dir_absent(demo, tmp_path, bad_key):
    doc = _doc_in(tmp_path, demo)
    _insert_map_row(doc, bad_key)
    cfg = write_cfg(tmp_path / "c.yaml", doc)
    for args in (["--dry-run"], []):
        r = run_cli("plan", "--config", cfg, *args)
        line = one_error_line(r, 2)
        assert "1 keys" in line, line
        assert r.stdout == "", r.stdout  # nothing but the one error line
        assert not (tmp_path / "work").exists(), tree(tmp_path / "work")


def test_refused_commands_leave_the_work_dir_byte_for_byte(demo, tmp_path):
    doc, cfg, plan_id = _planned_copy(tmp_path, demo)
    _insert_map_row(doc, "")  # the map now holds a key plan refuses
    before = tree(tmp_path / "work")
    for args in (["plan", "--dry-run"], ["plan"], ["catchup", plan_id], ["catchup", plan_id, "--dry-run"]):
        one_error_line(run_cli(*args, "--config", cfg), 2)
        assert tree(tmp_path / "work") == before, args
    # refused runs: a config that does not fit the plan, a missing data store
    kt = write_cfg(tmp_path / "kt.yaml", {**doc, "key_type": "bytes"})
    one_error_line(run_cli("run", plan_id, "--config", kt), 2)
    assert tree(tmp_path / "work") == before
    nodata = write_cfg(tmp_path / "nd.yaml", {**doc, "data_store": {"kind": "sqlite",
                                                                     "directory": str(tmp_path / "nowhere")}})
    one_error_line(run_cli("run", plan_id, "--config", nodata), 2)
    assert tree(tmp_path / "work") == before
    # a run refused for drift (exit 4)
    c = sqlite3.connect(doc["map_store"]["path"])
    c.execute("DELETE FROM shard_map WHERE key = ''")
    moved = pq.read_table(os.path.join(tmp_path / "work" / "plans" / plan_id / "moves",
                                       sorted(os.listdir(tmp_path / "work" / "plans" / plan_id / "moves"))[0]))
    c.execute("DELETE FROM shard_map WHERE key = ?", (moved["key"][0].as_py().decode(),))
    c.commit()
    c.close()
    one_error_line(run_cli("run", plan_id, "--config", cfg), 4)
    assert tree(tmp_path / "work") == before


def test_a_successful_dry_run_keeps_only_its_snapshot(demo, tmp_path):
    doc = _doc_in(tmp_path, demo)
    cfg = write_cfg(tmp_path / "c.yaml", doc)
    r = run_cli("plan", "--config", cfg, "--dry-run")
    assert r.returncode == 0, r.stderr
    kept = {p.split(os.sep)[0] for p in tree(tmp_path / "work")}
    assert kept == {"snapshots"}, kept  # the snapshot is a cache (README); no plan, no history


# ------------------------------------------------------------- item 14: validate reports what plan refuses

@pytest.mark.parametrize("bad_key", ["", "x" * 5000], ids=["empty", "over_long"])
def test_validate_reports_every_key_plan_refuses(demo, tmp_path, bad_key):
    doc = _doc_in(tmp_path, demo)
    _insert_map_row(doc, bad_key)
    cfg = write_cfg(tmp_path / "c.yaml", doc)
    r = run_cli("validate", "--config", cfg)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "validate: bad topology" in r.stdout or "bad topology" in r.stdout + r.stderr
    assert "Traceback" not in r.stderr


# ------------------------------------------------------------- item 1: uint64 hashes as Beam elements

def _key_with_hash(high: bool) -> str:
    from pipeline.keys import stable_hashes

    for i in range(1000):
        k = f"dup-{i}"
        h = int(stable_hashes([k.encode()], 1)[0])
        if (h >= 2 ** 63) == high:
            return k
    raise AssertionError("no key found")


@pytest.mark.parametrize("high,beam", [
    (True, ["--runner=FnApiRunner"]),
    (False, ["--runner=FnApiRunner"]),
    (True, ["--runner=FnApiRunner", "--direct_running_mode=multi_processing", "--direct_num_workers=2"]),
], ids=["hash_ge_2_63", "hash_lt_2_63", "hash_ge_2_63_multi_process"])
def test_duplicate_keys_are_refused_whatever_their_hash(demo, tmp_path, high, beam):
    dup = _key_with_hash(high)
    keys = [f"k{i}" for i in range(50)] + [dup, dup]
    snap = tmp_path / "snap.parquet"
    pq.write_table(pa.table({"key": pa.array(keys), "shard_id": pa.array(["s0", "s1"] * 26)}), snap)
    cfg = write_cfg(tmp_path / "c.yaml", demo_doc(demo, tmp_path))
    line = one_error_line(run_cli("plan", "--config", cfg, "--snapshot", str(snap), "--", *beam), 2)
    assert "1 duplicate keys" in line, line


def test_uint64_coder_round_trips_and_is_deterministic():
    from transforms.coders import Uint64Coder

    c = Uint64Coder()
    assert c.is_deterministic()
    for v in (0, 1, 2 ** 63 - 1, 2 ** 63, 2 ** 64 - 1):
        data = c.encode(v)
        assert len(data) == 8 and c.decode(data) == v
    assert c.encode(1) < c.encode(2 ** 63) < c.encode(2 ** 64 - 1)  # order-preserving bytes
    with pytest.raises((OverflowError, ValueError)):
        c.encode(2 ** 64)


# ------------------------------------------------------------- item 5: no abbreviated flags

def test_abbreviated_flags_are_refused_everywhere(demo, tmp_path):
    from shardmove.cli import build_parser

    doc, cfg, plan_id = _planned_copy(tmp_path, demo)
    before = tree(tmp_path / "work")
    for args in (["run", plan_id, "--config", cfg, "--force", "true"],
                 ["run", plan_id, "--config", cfg, "--force-swap", "true"],
                 ["run", plan_id, "--conf", cfg],
                 ["plan", "--config", cfg, "--dry"],
                 ["plan", "--config", cfg, "--copy-conc", "4"],
                 ["status", plan_id, "--config", cfg, "--js"]):
        line = one_error_line(run_cli(*args), 2)
        assert "unrecognized arguments" in line, (args, line)
        assert tree(tmp_path / "work") == before
    parsers = [build_parser()]
    while parsers:  # every parser and sub-parser refuses prefixes
        p = parsers.pop()
        assert p.allow_abbrev is False, p.prog
        for a in p._actions:
            if isinstance(a, type(build_parser()._subparsers._group_actions[0])):
                parsers.extend(a.choices.values())


def test_unsafe_option_needs_its_full_name_and_warns_when_the_run_starts(demo, tmp_path):
    doc, cfg, plan_id = _planned_copy(tmp_path, demo)
    r = run_cli("run", plan_id, "--config", cfg, "--force-swap-on-verification-failure", "true",
                "--", "--runner=FnApiRunner")
    assert r.returncode == 0, r.stderr
    warnings = [l for l in r.stderr.splitlines() if l.startswith("warning: force_swap_on_verification_failure is on")]
    assert len(warnings) == 1, r.stderr
    # off (the default): no warning
    import io

    from pipeline.config import load_config
    from shardmove.executor import warn_unsafe_options

    buf = io.StringIO()
    assert warn_unsafe_options(load_config(cfg), buf) == [] and buf.getvalue() == ""


# ------------------------------------------------------------- item 14: smaller items

def test_explicit_target_over_long_key_is_counted_once(demo, tmp_path):
    long_key = "L" * 5000
    keys = [f"k{i}" for i in range(20)] + [long_key]
    src = tmp_path / "src.parquet"
    pq.write_table(pa.table({"key": pa.array(keys), "shard_id": pa.array(["s0"] * 21)}), src)
    tgt = tmp_path / "tgt.parquet"
    pq.write_table(pa.table({"key": pa.array(keys), "shard_id": pa.array(["s1"] * 21)}), tgt)
    doc = demo_doc(demo, tmp_path)
    doc["target"] = {"snapshot": str(tgt), "shards": [{"id": "s0"}, {"id": "s1"}]}
    line = one_error_line(run_cli("plan", "--config", write_cfg(tmp_path / "c.yaml", doc), "--snapshot", str(src)), 2)
    assert "plan: 1 keys are longer than 4096 bytes" in line, line


def test_local_object_shards_state_their_key_limit(tmp_path):
    from pipeline.stores.sqlite import SqliteMapStore
    from pipeline.keys import KeyType

    ms = SqliteMapStore.create(str(tmp_path / "map.sqlite"), KeyType.STRING)
    ms.put_many([(f"k{i}".encode(), "s0") for i in range(50)] + [(b"y" * 700, "s0")])
    shards = {s: str(tmp_path / "objects" / s) for s in ("s0", "s1")}
    for d in shards.values():
        os.makedirs(d)
    doc = {"work_dir": str(tmp_path / "work"), "map_store": {"kind": "sqlite", "path": str(tmp_path / "map.sqlite")},
           "data_store": {"kind": "objects", "shards": shards}, "current_shards": ["s0"],
           "target": {"shards": ["s1"]}}
    line = one_error_line(run_cli("plan", "--config", write_cfg(tmp_path / "c.yaml", doc), "--dry-run"), 2)
    assert "1 keys are too long" in line and "630 bytes on s1" in line, line
    assert not (tmp_path / "work").exists()


def test_replanning_with_other_hash_buckets_says_the_plan_is_reused(demo, tmp_path):
    doc = _doc_in(tmp_path, demo)
    cfg = write_cfg(tmp_path / "c.yaml", doc)
    r1 = run_cli("plan", "--config", cfg, "--hash-buckets", "4")
    assert r1.returncode == 0 and "note:" not in r1.stdout, r1.stderr
    r2 = run_cli("plan", "--config", cfg, "--hash-buckets", "8")
    assert r2.returncode == 0, r2.stderr
    notes = [l for l in r2.stdout.splitlines() if l.startswith("note:")]
    assert len(notes) == 1 and "hash_buckets=4" in notes[0] and "hash_buckets=8" in notes[0], r2.stdout
    assert PLAN_RE.findall(r1.stdout) == PLAN_RE.findall(r2.stdout)


def test_operator_commands_with_an_unusable_map_store_are_bad_configuration(demo, tmp_path):
    doc, cfg, plan_id = _planned_copy(tmp_path, demo)
    bad = write_cfg(tmp_path / "bad.yaml", {**doc, "map_store": _sqlite_not_a_db(tmp_path)})
    before = tree(tmp_path / "work")
    for args in (["run", plan_id], ["verify", plan_id], ["rollback", plan_id],
                 ["rollback", plan_id, "--apply"],
                 ["cleanup", plan_id, "--older-than", "0s"], ["cleanup", plan_id, "--older-than", "0s", "--apply"],
                 ["validate", "--compare", plan_id], ["catchup", plan_id], ["snapshot"]):
        line = one_error_line(run_cli(*args, "--config", bad, timeout=FAST), 2)
        assert "not a SQLite database" in line and "garbage.sqlite" in line, (args, line)
        assert tree(tmp_path / "work") == before, args


def test_run_with_an_unreachable_postgres_target_shard_is_refused_before_anything_is_modified(demo, tmp_path, pg):
    from services import dsn_for, fresh_database, pg_execute

    with fresh_database("edges") as dbname:
        for shard in ("s0", "s1"):
            pg_execute(dbname, f"CREATE SCHEMA {shard}")
            pg_execute(dbname, f"CREATE TABLE {shard}.accounts (tenant_id text PRIMARY KEY, name text)")
        shards = {s: {"dsn": dsn_for(dbname, password=SECRET), "schema": s} for s in ("s0", "s1")}
        shards["s2"] = {"dsn": dsn_for("no_such_db_shardmove", password=SECRET), "schema": "s2"}
        doc = _doc_in(tmp_path, demo)
        doc["data_store"] = {"kind": "postgres", "shards": shards,
                             "tables": [{"name": "accounts", "key_column": "tenant_id"}]}
        cfg = write_cfg(tmp_path / "c.yaml", doc)
        r = run_cli("plan", "--config", cfg)
        assert r.returncode == 0, r.stderr
        plan_id = PLAN_RE.findall(r.stdout)[0]
        before = tree(tmp_path / "work")
        map_before = (tmp_path / "keyspace" / "map.sqlite").read_bytes()
        line = one_error_line(run_cli("run", plan_id, "--config", cfg, timeout=FAST), 2)
        assert "target shards" in line and "s2" in line, line
        assert tree(tmp_path / "work") == before
        assert (tmp_path / "keyspace" / "map.sqlite").read_bytes() == map_before


def test_a_damaged_manifest_is_bad_input(demo, tmp_path):
    import json

    doc, cfg, plan_id = _planned_copy(tmp_path, demo)
    manifest = tmp_path / "work" / "plans" / plan_id / "manifest.json"
    for text in ('{"format_version": 1}', "[1, 2]", json.dumps({**json.loads(manifest.read_text()), "files": [7]})):
        manifest.write_text(text)
        for args in (["run", plan_id], ["status", plan_id], ["verify", plan_id]):
            line = one_error_line(run_cli(*args, "--config", cfg, timeout=FAST), 2)
            assert "manifest.json is damaged" in line, (args, line)


def test_a_dry_run_refused_by_the_capacity_check_keeps_nothing(demo, tmp_path):
    doc = _doc_in(tmp_path, demo)
    cfg = write_cfg(tmp_path / "c.yaml", doc)
    r = run_cli("plan", "--config", cfg, "--dry-run", "--min-headroom-percent", "99")
    assert r.returncode == 4 and "capacity check: FAILED" in r.stdout, (r.stdout, r.stderr)
    assert not (tmp_path / "work").exists(), tree(tmp_path / "work")
    r = run_cli("plan", "--config", cfg, "--min-headroom-percent", "99")
    assert r.returncode == 4, (r.stdout, r.stderr)
    assert not (tmp_path / "work").exists(), tree(tmp_path / "work")


def test_gcs_without_credentials_is_bad_configuration(demo, tmp_path):
    doc = _doc_in(tmp_path, demo)
    doc["work_dir"] = "gs://no-such-bucket-shardmove/work"
    cfg = write_cfg(tmp_path / "c.yaml", doc)
    env = {"STORAGE_EMULATOR_HOST": "", "NO_GCE_CHECK": "true", "GOOGLE_APPLICATION_CREDENTIALS": "",
           "HOME": str(tmp_path), "CLOUDSDK_CONFIG": str(tmp_path / "gcloud")}
    line = one_error_line(run_cli("plan", "--config", cfg, "--dry-run", env=env, timeout=FAST), 2)
    assert "GCS: no credentials" in line, line


def test_validate_reports_what_plan_refuses_in_an_explicit_target(demo, tmp_path):
    tgt = tmp_path / "tgt.parquet"
    pq.write_table(pa.table({"key": pa.array(["a", "L" * 5000, "", "b"]),
                             "shard_id": pa.array(["s1", "s1", "s0", "zz"])}), tgt)
    doc = _doc_in(tmp_path, demo)
    doc["target"] = {"snapshot": str(tgt), "shards": [{"id": "s0"}, {"id": "s1"}]}
    cfg = write_cfg(tmp_path / "c.yaml", doc)
    r = run_cli("validate", "--config", cfg)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "target snapshot: invalid keys: 1 over-long keys: 1 rows on shards not in target.shards: 1" in r.stdout
    assert one_error_line(run_cli("plan", "--config", cfg), 2)
