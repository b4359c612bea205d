"""Reaching the real PostgreSQL and Redis servers the store tests need.

The servers themselves are found or started once per session by
``tests/servers.py`` (see there), which exports where they are:

* ``SHARDMOVE_TEST_PG``: an admin DSN to the ``postgres`` database that may
  ``CREATE DATABASE``;
* ``SHARDMOVE_TEST_REDIS``: a Redis URL.

``require_postgres()`` / ``require_redis()`` check that the server answers;
one that does not skips the test with the reason -- or fails it when
``CI=true`` (CI must never silently skip the store tests).

Isolation: every PostgreSQL test gets a fresh database (``fresh_database``),
dropped afterwards; every Redis test gets a unique key prefix
(``fresh_prefix``), whose keys are deleted afterwards.  Tests can rerun.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from typing import Iterator

import pytest

import servers

_TIMEOUT = 3


def _pg_dsn() -> str:
    return os.environ.get("SHARDMOVE_TEST_PG") or servers.DEFAULT_PG


def _redis_url() -> str:
    return os.environ.get("SHARDMOVE_TEST_REDIS") or servers.DEFAULT_REDIS


def _unavailable(what: str, err: BaseException | None):
    if what in servers.failures:
        reason = servers.failures[what]
    else:
        detail = str(err).strip().splitlines()[0] if err is not None and str(err).strip() else ""
        reason = f"{what} not reachable ({type(err).__name__}: {detail})"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason + " -- CI=true: the store tests must run", pytrace=False)
    pytest.skip(reason)


def require_postgres() -> str:
    """The admin DSN, after checking the server answers (skip / fail otherwise)."""
    import psycopg

    if "PostgreSQL" in servers.failures:
        _unavailable("PostgreSQL", None)
    try:
        with psycopg.connect(_pg_dsn(), connect_timeout=_TIMEOUT, autocommit=True) as conn:
            conn.execute("SELECT 1")
    except Exception as e:  # any failure to reach the server: skip or fail, with the reason
        _unavailable("PostgreSQL", e)
    return _pg_dsn()


def require_redis() -> str:
    """The Redis URL, after checking the server answers (skip / fail otherwise)."""
    import redis

    if "Redis" in servers.failures:
        _unavailable("Redis", None)
    try:
        client = redis.Redis.from_url(_redis_url(), socket_connect_timeout=_TIMEOUT, socket_timeout=_TIMEOUT)
        client.ping()
        client.close()
    except Exception as e:  # any failure to reach the server: skip or fail, with the reason
        _unavailable("Redis", e)
    return _redis_url()


def redis_url_as(user: str, password: str) -> str:
    """The test Redis's URL with other credentials (host, port and db kept)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(require_redis())
    host = parts.hostname if ":" not in (parts.hostname or "") else f"[{parts.hostname}]"
    netloc = f"{user}:{password}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def dsn_for(dbname: str, **extra: str) -> str:
    """The admin DSN pointed at ``dbname`` (plus extra ``key=value`` settings)."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    params = conninfo_to_dict(_pg_dsn())
    params["dbname"] = dbname
    params.update(extra)
    return make_conninfo(**params)


@contextlib.contextmanager
def fresh_database(tag: str = "t") -> Iterator[str]:
    """A new, empty database for one test; yields its name and drops it afterwards."""
    import psycopg
    from psycopg import sql

    admin = require_postgres()
    name = f"smtest_{tag}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin, autocommit=True, connect_timeout=_TIMEOUT) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield name
    finally:
        with psycopg.connect(admin, autocommit=True, connect_timeout=_TIMEOUT) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def pg_execute(dbname: str, statement: str, params=None) -> list:
    """Run one statement in ``dbname`` as the admin (another 'application'); returns its rows."""
    import psycopg

    with psycopg.connect(dsn_for(dbname), autocommit=True, connect_timeout=_TIMEOUT) as conn:
        cur = conn.execute(statement, params)
        return cur.fetchall() if cur.description else []


@contextlib.contextmanager
def fresh_prefix(tag: str = "t") -> Iterator[str]:
    """A unique Redis key prefix for one test; its keys are deleted afterwards."""
    import redis

    url = require_redis()
    prefix = f"smtest:{tag}:{uuid.uuid4().hex[:12]}"
    try:
        yield prefix
    finally:
        client = redis.Redis.from_url(url, socket_connect_timeout=_TIMEOUT)
        keys = list(client.scan_iter(match=prefix + ":*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


# ------------------------------------------------- the CLI, killed and resumed


def plan_moves(plan_dir: str, manifest: dict) -> list:
    """Every planned move as (canonical key, source, target)."""
    import pyarrow.parquet as pq

    rows = []
    for f in manifest["files"]:
        t = pq.read_table(os.path.join(plan_dir, "moves", f["group"] + ".parquet"))
        rows += list(zip(t["key"].to_pylist(), t["source"].to_pylist(), t["target"].to_pylist()))
    return rows


def wait_for_parts(plan_dir: str, n: int, timeout: float = 180) -> int:
    """Block until at least n checkpoint parts are committed (the run is mid-way)."""
    root = os.path.join(plan_dir, "checkpoints")
    t0 = time.time()
    while time.time() - t0 < timeout:
        found = sum(len([f for f in fs if f.startswith("part-")]) for _d, _s, fs in os.walk(root))
        if found >= n:
            return found
        time.sleep(0.02)
    raise AssertionError("the run never committed a checkpoint")


def run_killed_then_resumed(tmp_path, raw: dict, parts_before_kill: int = 3):
    """plan -> run -> SIGKILL mid-run -> rerun -> status, through the real CLI.

    Writes ``raw`` as ``<tmp_path>/shardmove.yaml`` (0600).  Returns (plan dir,
    manifest, every stdout/stderr produced) after checking the rerun's summary
    line and ``status`` exit 0."""
    import yaml

    from conftest import run_cli
    from shardmove.planner import load_manifest

    cfgpath = str(tmp_path / "shardmove.yaml")
    fd = os.open(cfgpath, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(raw, f)
    outs = []
    r = run_cli("plan", "--config", cfgpath, "--log-level", "DEBUG")
    outs += [r.stdout, r.stderr]
    assert r.returncode == 0, r.stderr
    plan_id = next(line.split(": ", 1)[1] for line in r.stdout.splitlines() if line.startswith("plan id: "))
    plan_dir = os.path.join(raw["work_dir"], "plans", plan_id)
    sm = os.path.join(os.path.dirname(sys.executable), "shardmove")
    p = subprocess.Popen([sm, "run", plan_id, "--config", cfgpath, "--log-level", "DEBUG"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_parts(plan_dir, parts_before_kill)
    finally:
        p.send_signal(signal.SIGKILL)
        out, err = p.communicate()
    outs += [out, err]
    assert p.returncode == -signal.SIGKILL
    r = run_cli("run", plan_id, "--config", cfgpath, "--log-level", "DEBUG", "--debug")
    outs += [r.stdout, r.stderr]
    assert r.returncode == 0, r.stderr
    m = load_manifest(plan_dir)
    assert f"summary: planned={m['moves']} done={m['moves']} failed=0" in r.stdout
    st = run_cli("status", plan_id, "--config", cfgpath)
    outs += [st.stdout, st.stderr]
    assert st.returncode == 0 and "state: complete" in st.stdout, st.stdout + st.stderr
    return plan_dir, m, outs


def assert_no_secret(outs: list, work_dir: str, secret: str) -> None:
    """``secret`` appears in no output and in no file of the work directory."""
    blob = "\n".join(outs)
    assert "summary: planned=" in blob
    assert secret not in blob
    for d, _s, files in os.walk(work_dir):
        for name in files:
            with open(os.path.join(d, name), "rb") as f:
                assert secret.encode() not in f.read(), os.path.join(d, name)


def tree(root) -> dict:
    """Every path under ``root`` with its bytes (directories as None)."""
    out = {}
    for d, dirs, files in os.walk(root):
        for n in dirs:
            out[os.path.relpath(os.path.join(d, n), root)] = None
        for n in files:
            p = os.path.join(d, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = f.read()
    return out
