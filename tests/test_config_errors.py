"""Configuration errors of the stores, through the CLI against a real PostgreSQL and SQLite:
found by the preflight before a run (exit 2, nothing modified), or while a run goes (exit 1,
no key Failed, the lease released, a rerun resumes); and the figures of ``--retry-failed``.

Every refusal names the shard and the object in one line, never a password."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid

import pytest
import yaml

from pipeline import states as S
from pipeline.errors import ConfigurationError, PermanentError
from pipeline.lease import read_lease

from conftest import ROOT, run_cli
from services import fresh_database, pg_execute
from test_executor import _cli_cfg, _plan_cli
from test_postgres import SECRET, Space, build_keyspace, create_tables, map_table

SM = os.path.join(os.path.dirname(sys.executable), "shardmove")


@pytest.fixture(scope="module")
def pgdb():
    with fresh_database("pgcfg") as name:
        yield name


@pytest.fixture
def db(pgdb):
    ns = "t_" + uuid.uuid4().hex[:10]
    pg_execute(pgdb, f"CREATE SCHEMA {ns}")
    yield Space(pgdb, ns)


def _config(tmp_path, raw) -> str:
    path = str(tmp_path / "shardmove.yaml")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(raw, f)
    return path


def _one_error_line(r, code):
    assert r.returncode == code, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    errs = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errs) == 1, r.stderr
    assert "Traceback" not in r.stderr and SECRET not in r.stdout + r.stderr
    return errs[0]


def test_postgres_target_missing_its_table_is_refused_before_any_copy(tmp_path, db):
    raw, _originals = build_keyspace(tmp_path, db, None, 300, password=SECRET)
    cfgpath = _config(tmp_path, raw)
    plan_id = _plan_cli(cfgpath)
    plan_dir = os.path.join(raw["work_dir"], "plans", plan_id)
    db.sql(f'DROP TABLE "{db.schema("s4")}".orders')
    before = map_table(db)
    r = run_cli("run", plan_id, "--config", cfgpath)
    line = _one_error_line(r, 2)
    assert line == (f"error: preflight: data store: target shard s4: table {db.schema('s4')}.orders does not exist; "
                    "nothing was modified"), line
    assert map_table(db) == before
    assert not os.path.exists(os.path.join(plan_dir, "checkpoints"))
    assert read_lease(plan_dir) is None  # the lease was never taken


def test_postgres_preflight_names_a_missing_schema_and_a_missing_privilege(tmp_path, db):
    raw, _ = build_keyspace(tmp_path, db, None, 200)
    cfgpath = _config(tmp_path, raw)
    plan_id = _plan_cli(cfgpath)
    # a role that may read the target's tables but not write them
    role = "ro_" + uuid.uuid4().hex[:8]
    db.sql(f"CREATE ROLE {role} LOGIN PASSWORD '{SECRET}'")
    try:
        db.sql(f"GRANT USAGE ON SCHEMA {', '.join(db.schema(s) for s in ['s0', 's1', 's2', 's3', 's4'])} TO {role}")
        for s in ["s0", "s1", "s2", "s3", "s4"]:
            db.sql(f'GRANT SELECT, INSERT, DELETE ON ALL TABLES IN SCHEMA "{db.schema(s)}" TO {role}')
        db.sql(f'REVOKE INSERT ON "{db.schema("s4")}".accounts FROM {role}')
        shards = {s: {"dsn": db.dsn(user=role, password=SECRET), "schema": db.schema(s)}
                  for s in ["s0", "s1", "s2", "s3", "s4"]}
        raw2 = dict(raw, data_store=dict(raw["data_store"], shards=shards))
        cfg2 = str(tmp_path / "readonly.yaml")
        with open(cfg2, "w") as f:
            yaml.safe_dump(raw2, f)
        os.chmod(cfg2, 0o600)
        line = _one_error_line(run_cli("run", plan_id, "--config", cfg2), 2)
        assert f"target shard s4: no INSERT privilege on table {db.schema('s4')}.accounts" in line, line
    finally:
        db.sql(f"DROP OWNED BY {role}")
        db.sql(f"DROP ROLE {role}")
    db.sql(f'DROP SCHEMA "{db.schema("s4")}" CASCADE')
    line = _one_error_line(run_cli("run", plan_id, "--config", cfgpath), 2)
    assert f"target shard s4: schema {db.schema('s4')} does not exist" in line, line


def test_table_dropped_mid_run_stops_it_without_failing_keys_and_a_rerun_resumes(tmp_path, db):
    raw, _originals = build_keyspace(tmp_path, db, None, 400, password=SECRET)
    cfgpath = _config(tmp_path, raw)
    plan_id = _plan_cli(cfgpath)
    plan_dir = os.path.join(raw["work_dir"], "plans", plan_id)
    hold = str(tmp_path / "at-lease")
    env = dict(os.environ, SHARDMOVE_TEST_HOLD="lease", SHARDMOVE_TEST_HOLD_FILE=hold)
    p = subprocess.Popen([SM, "run", plan_id, "--config", cfgpath], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=env)
    try:
        t0 = time.time()
        while not os.path.exists(hold):  # preflight passed, the lease is taken; nothing copied yet
            assert p.poll() is None, p.communicate()
            assert time.time() - t0 < 180, "the run never took its lease"
            time.sleep(0.01)
        db.sql(f'DROP TABLE "{db.schema("s4")}".orders')  # behind the run's back
        os.remove(hold)  # the run goes on
        out, err = p.communicate(timeout=300)
    finally:
        if p.poll() is None:
            p.kill()
    r = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    line = _one_error_line(r, 1)
    assert line.startswith("error: the run stopped on a configuration error: "), line
    assert "orders" in line and "s4" in line and "rerun to resume" in line, line
    m = re.search(r"^summary: planned=(\d+) done=(\d+) failed=(\d+)$", out, re.M)
    assert m and m.group(3) == "0", out
    lease = read_lease(plan_dir)
    assert lease["released"], lease
    assert not os.path.exists(os.path.join(plan_dir, "halt.json"))
    st = run_cli("status", plan_id, "--config", cfgpath)
    assert st.returncode == 6 and "state: stopped" in st.stdout, st.stdout + st.stderr
    assert re.search(r"^progress: .* failed=0$", st.stdout, re.M), st.stdout  # no key Failed
    # the operator restores the table: the rerun resumes and finishes every key
    db.sql(f'CREATE TABLE "{db.schema("s4")}".orders (tenant_id text NOT NULL, order_id integer NOT NULL, '
           "item text, amount double precision, PRIMARY KEY (tenant_id, order_id))")
    again = run_cli("run", plan_id, "--config", cfgpath)
    assert again.returncode == 0, again.stderr[-2000:]
    planned = int(m.group(1))
    assert f"summary: planned={planned} done={planned} failed=0" in again.stdout


def test_sqlite_target_without_its_table_is_refused_and_stops_a_run(tmp_path):
    import sqlite3

    cfgpath = _cli_cfg(tmp_path, keys=400)
    plan_id = _plan_cli(cfgpath)
    from pipeline.config import load_config

    cfg = load_config(cfgpath)
    plan_dir = os.path.join(cfg.work_dir, "plans", plan_id)
    manifest = json.load(open(os.path.join(plan_dir, "manifest.json")))
    target = manifest["pairs"][0]["target"]
    path = os.path.join(cfg.data_store["directory"], f"{target}.sqlite")
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE IF NOT EXISTS records (key TEXT PRIMARY KEY, value BLOB NOT NULL, version INTEGER NOT NULL)")
    con.execute("ALTER TABLE records RENAME TO elsewhere")
    con.commit()
    con.close()
    line = _one_error_line(run_cli("run", plan_id, "--config", cfgpath), 2)
    assert line == f"error: preflight: data store: target shard {target}: file {path} has no table records; " \
                   "nothing was modified", line
    assert not os.path.exists(os.path.join(plan_dir, "checkpoints"))


def test_retry_failed_reports_the_keys_it_finished(tmp_path):
    cfgpath = _cli_cfg(tmp_path, keys=800)
    healthy = open(cfgpath).read()
    with open(cfgpath, "a") as f:
        f.write("faults: {seed: 3, copy: {permanent_rate: 0.3}}\n")
    plan_id = _plan_cli(cfgpath)
    first = run_cli("run", plan_id, "--config", cfgpath)
    assert first.returncode == 3, first.stderr[-2000:]
    failed = int(re.search(r"^summary: planned=\d+ done=\d+ failed=(\d+)$", first.stdout, re.M).group(1))
    assert failed > 0 and f"failed[permanent]: {failed}" in first.stdout
    with open(cfgpath, "w") as f:
        f.write(healthy)
    r = run_cli("run", plan_id, "--config", cfgpath, "--retry-failed")
    assert r.returncode == 0, r.stderr[-2000:]
    m = re.search(r"^elapsed: ([0-9.]+)s keys_per_s: (\d+) ", r.stdout, re.M)
    assert m, r.stdout
    assert int(m.group(2)) > 0, r.stdout  # it moved the failed keys: not 0
    from pipeline.config import load_config

    summary = json.load(open(os.path.join(load_config(cfgpath).work_dir, "plans", plan_id, "summary.json")))
    assert summary["failed"] == 0 and "finished_this_run" not in summary
    assert summary["keys_per_s"] == pytest.approx(failed / summary["elapsed_s"], rel=0.01)


# ------------------------------------------------------------- Failed reasons


def test_readme_lists_every_failed_reason():
    readme = open(os.path.join(ROOT, "README.md")).read()
    section = readme[readme.index("### Failed reasons"):]
    section = section[:section.index("\n#", 1)]  # up to the next heading
    listed = set(re.findall(r"^\| `([a-z_]+)` \|", section, re.M))
    assert listed == set(S.REASONS), (sorted(S.REASONS - listed), sorted(listed - S.REASONS))


def test_failed_reasons_are_a_closed_set():
    assert S.failure_reason("constraint") == S.CONSTRAINT
    assert S.failure_reason("key_too_long") == S.KEY_TOO_LONG
    for code in ("store_error", "io_error", "storage_error", "something_new", None):
        assert S.failure_reason(code) == S.PERMANENT
    assert issubclass(ConfigurationError, PermanentError)


def test_permission_refused_at_the_swap_stops_the_run_and_a_rerun_swaps(tmp_path, db):
    """The swap stage's path: the map refuses the swap's UPDATE as a revoked privilege would
    (SQLSTATE 42501, raised by a trigger); the keys stay Swapping, none Failed."""
    raw, _originals = build_keyspace(tmp_path, db, None, 300)
    cfgpath = _config(tmp_path, raw)
    plan_id = _plan_cli(cfgpath)
    db.sql(f"""
        CREATE FUNCTION test_refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
          RAISE EXCEPTION 'permission denied for table shard_map' USING ERRCODE = 'insufficient_privilege';
        END $$;
        CREATE TRIGGER test_refuse BEFORE UPDATE ON {db.ns}.shard_map FOR EACH ROW EXECUTE FUNCTION test_refuse();
    """)
    r = run_cli("run", plan_id, "--config", cfgpath)
    line = _one_error_line(r, 1)
    assert line.startswith("error: the run stopped on a configuration error: ") and "shard_map" in line, line
    m = re.search(r"^summary: planned=(\d+) done=0 failed=0$", r.stdout, re.M)
    assert m, r.stdout
    st = run_cli("status", plan_id, "--config", cfgpath)
    assert st.returncode == 6 and re.search(r"^progress: .* failed=0$", st.stdout, re.M), st.stdout
    m_sw = re.search(r"^states now: .*\bswapping=(\d+)\b", st.stdout, re.M)
    assert m_sw and int(m_sw.group(1)) > 0, st.stdout  # kept, not Failed
    db.sql(f"DROP TRIGGER test_refuse ON {db.ns}.shard_map")
    again = run_cli("run", plan_id, "--config", cfgpath)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"summary: planned={m.group(1)} done={m.group(1)} failed=0" in again.stdout


def test_local_stores_preflight_without_writing(tmp_path):
    from pipeline.keys import KeyType
    from pipeline.stores.base import ShardChecks
    from pipeline.stores.objects import ObjectDataStore
    from pipeline.stores.sqlite import SqliteDataStore

    objs = ObjectDataStore({"a": str(tmp_path / "o" / "a"), "b": str(tmp_path / "o" / "b")}, KeyType.STRING)
    assert isinstance(objs, ShardChecks)
    assert objs.check_shard("a") == f"directory {tmp_path / 'o' / 'a'} does not exist"
    assert objs.check_shard("a", write=True) is None  # the first copy creates it
    assert objs.check_shard("zz") == "not configured in data_store.shards"
    assert not (tmp_path / "o").exists()  # nothing was created
    sq = SqliteDataStore(str(tmp_path / "d"), KeyType.STRING)
    assert sq.check_shard("s0", write=True) is None and sq.check_shard("s0").endswith("s0.sqlite does not exist")
    sq.put_many("s0", [(b"k", b"v")])
    before = (tmp_path / "d" / "s0.sqlite").read_bytes()
    assert sq.check_shard("s0") is None and sq.check_shard("s0", write=True) is None
    assert (tmp_path / "d" / "s0.sqlite").read_bytes() == before
    (tmp_path / "d" / "s1.sqlite").write_bytes(b"not a database, just bytes" * 100)
    assert "not a SQLite database" in sq.check_shard("s1", write=True)
