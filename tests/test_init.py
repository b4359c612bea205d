"""``shardmove init`` and the real map stores it sets up, through the CLI, against the real
PostgreSQL and Redis servers (tests/servers.py) and SQLite files.

Each keyspace is the SQLite demo (its shards stay SQLite files); its map is moved into
the store under test the way an operator would: ``init``, then rows seeded with the
store's own client (SQL, redis commands), then ``validate``, ``plan`` and ``run``.
"""
from __future__ import annotations

import os
import sqlite3

import psycopg
import pytest
import redis
import yaml

from conftest import run_cli
from services import dsn_for, fresh_database, fresh_prefix, pg_execute, require_redis
from shardmove import api
from shardmove.planner import load_manifest
from services import plan_moves

QUIET = {"hash_buckets": 2, "retry_base_delay": "1ms", "checkpoint_flush_interval": "50ms",
         "copy_concurrency": 3, "verify_concurrency": 3}


@pytest.fixture(scope="module")
def pgdb():
    with fresh_database("init") as name:
        yield name


def demo(tmp_path, map_store, keys=300):
    """The demo keyspace with ``map_store`` configured instead of its SQLite map.
    Returns (config path, the demo map's rows as (key text, shard id))."""
    info = api.create_demo_keyspace(str(tmp_path / "ks"), keys=keys, shards=4)
    base = os.path.dirname(info["config"])
    with open(info["config"]) as f:
        raw = yaml.safe_load(f)
    con = sqlite3.connect(os.path.join(base, raw["map_store"]["path"]))
    rows = con.execute("SELECT key, shard_id FROM shard_map ORDER BY key").fetchall()
    con.close()
    raw["map_store"] = map_store
    raw["data_store"]["directory"] = os.path.join(base, raw["data_store"]["directory"])
    raw["work_dir"] = os.path.join(base, raw["work_dir"])
    raw.update(QUIET)
    path = str(tmp_path / "cfg.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(raw, f)
    return path, rows


def cli_ok(*args):
    r = run_cli(*args)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def cli_refused(*args, code=2):
    """One ``error:`` line on stderr, exit ``code``; returns that line."""
    r = run_cli(*args)
    assert r.returncode == code, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr
    return lines[0]


def plan_and_run(cfg):
    """plan, run: the plan's keys end up at their targets.  Returns (moves, plan dir)."""
    out = cli_ok("plan", "--config", cfg)
    plan_id = next(line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("plan id: "))
    plan_dir = next(line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("plan dir: "))
    m = load_manifest(plan_dir)
    assert m["moves"] > 10
    out = cli_ok("run", plan_id, "--config", cfg)
    assert f"summary: planned={m['moves']} done={m['moves']} failed=0" in out
    return plan_moves(plan_dir, m), plan_dir


def expected_map(rows, moves):
    want = dict(rows)
    want.update({k.decode(): t for k, _s, t in moves})
    return want


# ------------------------------------------------------------------ PostgreSQL


def tables(db, schema):
    return sorted(r[0] for r in pg_execute(db, "SELECT c.relname FROM pg_class c JOIN pg_namespace n "
                                               "ON n.oid = c.relnamespace WHERE n.nspname = %s", (schema,)))


def test_init_creates_a_postgres_map_that_a_plan_then_uses(tmp_path, pgdb):
    cfg, rows = demo(tmp_path, {"kind": "postgres", "dsn": dsn_for(pgdb), "table": "initns.shard_map"})
    out = cli_ok("init", "--config", cfg)
    assert out.splitlines()[1:] == [
        "created: schema initns", "created: table initns.shard_map", "created: index initns.shard_map_version_idx",
        "created: registry initns.shard_map_runs", "init: created 4, already present 0"]
    made = tables(pgdb, "initns")
    assert made == ["shard_map", "shard_map_pkey", "shard_map_runs", "shard_map_runs_pkey", "shard_map_version_idx"]
    # the operator seeds the map with plain SQL, one version for all
    with psycopg.connect(dsn_for(pgdb), autocommit=True) as conn:
        with conn.cursor().copy("COPY initns.shard_map (key, shard_id, version) FROM STDIN") as cp:
            for k, s in rows:
                cp.write_row((k, s, 1))
    # a second init finds everything and changes nothing
    out = cli_ok("init", "--config", cfg)
    assert [line.split(":")[0] for line in out.splitlines()[1:-1]] == ["exists"] * 4
    assert out.splitlines()[-1] == "init: nothing to do: everything already exists"
    assert tables(pgdb, "initns") == made
    assert pg_execute(pgdb, "SELECT count(*), max(version) FROM initns.shard_map") == [(len(rows), 1)]
    assert "validate: ok" in cli_ok("validate", "--config", cfg)
    moves, _ = plan_and_run(cfg)
    got = dict(pg_execute(pgdb, "SELECT key, shard_id FROM initns.shard_map"))
    assert got == expected_map(rows, moves)
    assert pg_execute(pgdb, "SELECT count(*) FROM initns.shard_map_runs") == [(1,)]


def test_a_mapped_existing_table_plans_and_runs(tmp_path, pgdb):
    pg_execute(pgdb, "CREATE SCHEMA app; CREATE TABLE app.tenant_placement (tenant varchar(200) PRIMARY KEY, "
                     "placement text NOT NULL, rev integer NOT NULL, note text DEFAULT 'kept'); "
                     "CREATE INDEX placement_rev ON app.tenant_placement (rev)")
    cols = {"key": "tenant", "shard_id": "placement", "version": "rev"}
    cfg, rows = demo(tmp_path, {"kind": "postgres", "dsn": dsn_for(pgdb), "table": "app.tenant_placement",
                                "columns": cols})
    with psycopg.connect(dsn_for(pgdb), autocommit=True) as conn:
        with conn.cursor().copy("COPY app.tenant_placement (tenant, placement, rev) FROM STDIN") as cp:
            for k, s in rows:
                cp.write_row((k, s, 7))
    out = cli_ok("init", "--config", cfg)
    assert out.splitlines() == [
        "map store: postgres table 'app.tenant_placement' (columns key=tenant, shard_id=placement, version=rev)",
        "exists: schema app", "exists: table app.tenant_placement", "exists: index app.placement_rev",
        "created: registry app.tenant_placement_runs", "init: created 1, already present 3"]
    assert tables(pgdb, "app") == ["placement_rev", "tenant_placement", "tenant_placement_pkey",
                                   "tenant_placement_runs", "tenant_placement_runs_pkey"]
    assert "validate: ok" in cli_ok("validate", "--config", cfg)
    moves, _ = plan_and_run(cfg)
    got = {k: (s, v, n) for k, s, v, n in pg_execute(pgdb, "SELECT tenant, placement, rev, note "
                                                         "FROM app.tenant_placement")}
    want = expected_map(rows, moves)
    assert {k: s for k, (s, _v, _n) in got.items()} == want
    moved = {k.decode() for k, _s, _t in moves}
    assert all(v > 7 for k, (_s, v, _n) in got.items() if k in moved)  # swaps stamp new versions
    assert all(v == 7 for k, (_s, v, _n) in got.items() if k not in moved)
    assert {n for _s, _v, n in got.values()} == {"kept"}  # the application's own column is untouched


@pytest.mark.parametrize("ddl, message", [
    ("CREATE TABLE {t} (key text PRIMARY KEY, shard_id text, version bigint NOT NULL)",
     "column shard_id allows NULL, expected NOT NULL"),
    ("CREATE TABLE {t} (key text PRIMARY KEY, shard text NOT NULL, version bigint NOT NULL)",
     "has no column 'shard_id' for shard_id (map other names with map_store.columns)"),
    ("CREATE TABLE {t} (key bigint PRIMARY KEY, shard_id text NOT NULL, version bigint NOT NULL)",
     "column key is bigint, expected text or character varying"),
    ("CREATE TABLE {t} (key text NOT NULL, shard_id text NOT NULL, version bigint NOT NULL)",
     "column key is not unique on its own"),
    ("CREATE VIEW {t} AS SELECT 'k'::text AS key, 's'::text AS shard_id, 1::bigint AS version",
     "exists but is not a table"),
])
def test_init_refuses_an_existing_table_of_another_shape_and_creates_nothing(tmp_path, pgdb, ddl, message):
    schema = "shape_" + os.urandom(4).hex()
    pg_execute(pgdb, f"CREATE SCHEMA {schema}; " + ddl.format(t=f"{schema}.shard_map"))
    before = tables(pgdb, schema)
    cfg, _rows = demo(tmp_path, {"kind": "postgres", "dsn": dsn_for(pgdb), "table": f"{schema}.shard_map"}, keys=10)
    line = cli_refused("init", "--config", cfg)
    assert message in line and f"{schema}.shard_map" in line
    assert tables(pgdb, schema) == before


def test_init_refuses_a_run_registry_of_another_shape(tmp_path, pgdb):
    pg_execute(pgdb, "CREATE SCHEMA regshape; CREATE TABLE regshape.shard_map_runs (plan_id text PRIMARY KEY)")
    cfg, _rows = demo(tmp_path, {"kind": "postgres", "dsn": dsn_for(pgdb), "table": "regshape.shard_map"}, keys=10)
    line = cli_refused("init", "--config", cfg)
    assert "run registry table regshape.shard_map_runs has columns (plan_id), expected (plan_id, epoch" in line
    assert tables(pgdb, "regshape") == ["shard_map_runs", "shard_map_runs_pkey"]  # no map table created


@pytest.mark.parametrize("columns, message", [
    ({"key": "k", "shard": "s"}, "config map_store.columns: unknown column 'shard' (expected key, shard_id, version)"),
    ({"key": 'k"; DROP TABLE x; --'}, "config map_store.columns.key: expected an identifier"),
    ({"key": "same", "version": "same"}, "config map_store.columns: key, shard_id and version need three different"),
    (["key"], "config map_store.columns: expected a mapping"),
])
def test_bad_column_mappings_are_one_line_exit_2(tmp_path, pgdb, columns, message):
    cfg, _rows = demo(tmp_path, {"kind": "postgres", "dsn": dsn_for(pgdb), "table": "badcols.m",
                                 "columns": columns}, keys=10)
    for cmd in (["init"], ["validate"], ["plan"]):
        assert message in cli_refused(*cmd, "--config", cfg)
    assert "badcols" not in {r[0] for r in pg_execute(pgdb, "SELECT nspname FROM pg_namespace")}


def test_print_sql_is_the_ddl_init_runs_and_connects_to_nothing(tmp_path):
    from pipeline.stores.postgres_map import ddl_text, map_columns

    cols = {"key": "tenant", "version": "rev"}
    cfg, _rows = demo(tmp_path, {"kind": "postgres", "dsn": "host=127.0.0.1 port=1 dbname=nowhere",
                                 "table": "app.m", "columns": cols}, keys=10)
    out = cli_ok("init", "--config", cfg, "--print-sql")
    assert out.strip() == ddl_text("app.m", map_columns(cols))
    assert 'CREATE TABLE IF NOT EXISTS "app"."m" ("tenant" TEXT PRIMARY KEY, "shard_id" TEXT NOT NULL, ' \
           '"rev" BIGINT NOT NULL);' in out


# ---------------------------------------------------------------------- SQLite


def test_sqlite_init_creates_the_contracts_map_and_refuses_columns(tmp_path):
    path = tmp_path / "maps" / "map.sqlite"
    cfg, rows = demo(tmp_path, {"kind": "sqlite", "path": str(path)})
    out = cli_ok("init", "--config", cfg)
    assert out.splitlines()[1:] == [f"created: file {path}", "created: table shard_map",
                                   "created: index shard_map_version", "init: created 3, already present 0"]
    assert os.stat(path).st_mode & 0o777 == 0o600
    con = sqlite3.connect(path)
    assert con.execute("SELECT sql FROM sqlite_master WHERE name = 'shard_map'").fetchone()[0] == \
        "CREATE TABLE shard_map(key TEXT PRIMARY KEY, shard_id TEXT NOT NULL, version INTEGER NOT NULL)"
    with con:
        con.executemany("INSERT INTO shard_map VALUES (?, ?, 1)", rows)
    con.close()
    out = cli_ok("init", "--config", cfg)
    assert out.splitlines()[-1] == "init: nothing to do: everything already exists"
    moves, _ = plan_and_run(cfg)
    con = sqlite3.connect(path)
    assert dict(con.execute("SELECT key, shard_id FROM shard_map")) == expected_map(rows, moves)
    con.close()

    with open(cfg) as f:
        raw = yaml.safe_load(f)
    raw["map_store"]["columns"] = {"key": "k"}
    with open(cfg, "w") as f:
        yaml.safe_dump(raw, f)
    assert "config map_store.columns: kind sqlite keeps the fixed shard_map(key, shard_id, version) schema" in \
        cli_refused("init", "--config", cfg)


def test_sqlite_init_refuses_another_shape(tmp_path):
    path = tmp_path / "map.sqlite"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE shard_map(key TEXT PRIMARY KEY, shard_id TEXT NOT NULL, version TEXT NOT NULL)")
    con.close()
    cfg, _rows = demo(tmp_path, {"kind": "sqlite", "path": str(path)}, keys=10)
    line = cli_refused("init", "--config", cfg)
    assert "shard_map column version is TEXT NOT NULL, expected INTEGER NOT NULL" in line
    con = sqlite3.connect(path)
    assert [r[0] for r in con.execute("SELECT name FROM sqlite_master")] == ["shard_map", "sqlite_autoindex_shard_map_1"]
    con.close()


# ----------------------------------------------------------------------- Redis


@pytest.fixture
def prefix():
    with fresh_prefix("init") as p:
        yield p


def test_redis_init_says_there_is_nothing_to_create_and_how_to_seed(tmp_path, prefix):
    cfg, _rows = demo(tmp_path, {"kind": "redis", "url": require_redis(), "prefix": prefix}, keys=10)
    out = cli_ok("init", "--config", cfg)
    lines = out.splitlines()
    assert lines[0] == f"map store: redis prefix {prefix!r}"
    assert lines[1].startswith("init: nothing to create")
    assert [line.split()[:2] for line in lines[2:]] == [["seed:", "HSET"], ["seed:", "HSET"], ["seed:", "SET"]]
    assert f"{prefix}:clock" in lines[-1]
    c = redis.Redis.from_url(require_redis())
    assert list(c.scan_iter(match=prefix + ":*")) == []  # nothing written
    c.set(f"{prefix}:shard", "not a hash")
    assert f"{prefix}:shard holds a string, expected a hash" in cli_refused("init", "--config", cfg)


def test_redis_validate_refuses_rows_above_the_clock_and_an_empty_prefix(tmp_path, prefix):
    cfg, rows = demo(tmp_path, {"kind": "redis", "url": require_redis(), "prefix": prefix})
    # a wrong (here: not yet seeded) prefix holds no rows: not ok
    line = cli_refused("validate", "--config", cfg)
    assert line == (f"error: validate: redis prefix {prefix!r} holds no rows (is the map store's table, prefix or "
                    "path the right one?)")
    assert "snapshot: the map store holds no rows to export" in cli_refused("plan", "--config", cfg)
    # seeded by hand, as the README says, but without the clock
    c = redis.Redis.from_url(require_redis())
    c.hset(f"{prefix}:shard", mapping=dict(rows))
    c.hset(f"{prefix}:version", mapping={k: 3 for k, _s in rows})
    line = cli_refused("validate", "--config", cfg)
    assert line == (f"error: validate: {len(rows)} rows of redis prefix {prefix!r} have a version above its clock "
                    f"(0), up to 3; snapshots leave them out: SET {prefix}:clock 3")
    line = cli_refused("plan", "--config", cfg)  # not a path error: what is wrong, and where to look
    assert f"holds no rows to export ({len(rows)} rows have a version above the cutoff 0" in line
    c.set(f"{prefix}:clock", 2)
    assert "above its clock (2), up to 3" in cli_refused("validate", "--config", cfg)
    c.set(f"{prefix}:clock", 3)
    out = cli_ok("validate", "--config", cfg)
    assert f"map rows: {len(rows)} cutoff: 3" in out and "rows above the clock: 0 (clock: 3)" in out
    moves, _ = plan_and_run(cfg)
    got = {k.decode(): s.decode() for k, s in c.hgetall(f"{prefix}:shard").items()}
    assert got == expected_map(rows, moves)


def test_init_needs_a_config_and_an_unreachable_map_is_one_line_exit_2(tmp_path):
    assert run_cli("init", "--help").returncode == 0
    assert cli_refused("init") == "error: init: --config is required"
    secret = "init-sekret-42"
    cfg, _rows = demo(tmp_path, {"kind": "postgres", "dsn": dsn_for("no_such_db_shardmove_init", password=secret)},
                      keys=10)
    line = cli_refused("init", "--config", cfg)
    assert "map store" in line and "password=***" in line and secret not in line
