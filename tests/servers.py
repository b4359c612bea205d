"""The PostgreSQL and Redis servers the test suite uses: found or started.

``provide()`` runs once per pytest session (``conftest.pytest_configure``):

* ``SHARDMOVE_TEST_PG`` (an admin DSN that may ``CREATE DATABASE``) and
  ``SHARDMOVE_TEST_REDIS`` (a Redis URL) name servers of your own.  They are
  used as they are; nothing of theirs is started or stopped.
* Unset, a server already answering on the default address
  (``host=127.0.0.1 port=5432 user=postgres dbname=postgres`` without a
  password; ``redis://127.0.0.1:6379/0`` with Redis >= 7) is used as it is.
* Otherwise the session starts its own on a free loopback port, from the
  server binaries on this machine (Debian's ``postgresql`` and
  ``redis-server``, which ``./run_local.sh test`` installs when it runs as
  root): a throw-away PostgreSQL cluster with ``trust`` authentication for
  loopback connections (as the ``postgres`` system user when the session runs
  as root, since PostgreSQL refuses to run as root), and a Redis without
  persistence.  Both live in a temporary directory and are stopped and
  deleted when the session ends (or dies: they get SIGTERM with their parent).

The chosen DSN and URL are exported in ``SHARDMOVE_TEST_PG`` /
``SHARDMOVE_TEST_REDIS`` for the tests and the processes they start.  A server
that cannot be provided leaves a one-line reason in ``failures``: under
``CI=true`` the session stops with that line; otherwise the tests that need
the server skip with it.
"""
from __future__ import annotations

import ctypes
import glob
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time

DEFAULT_PG = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
MIN_REDIS = (7, 0)
_START_TIMEOUT = 60

failures: dict[str, str] = {}  # "PostgreSQL" / "Redis" -> why it could not be provided
_started: list[tuple[subprocess.Popen, str]] = []  # (process, its temporary directory)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """preexec_fn: the server gets SIGTERM if the pytest process dies (Linux)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _pg_answers(dsn: str) -> bool:
    import psycopg

    try:
        with psycopg.connect(dsn, connect_timeout=2, autocommit=True) as conn:
            conn.execute("SELECT 1")
        return True
    except Exception:  # unreachable, or it wants a password we do not have
        return False


def _redis_version(url: str) -> tuple | None:
    import redis

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
        version = client.info("server")["redis_version"]
        client.close()
    except Exception:  # unreachable or not Redis
        return None
    return tuple(int(p) for p in re.findall(r"\d+", str(version))[:2])


def redis_usable(url: str) -> bool:
    """A Redis answers at ``url`` and is recent enough for the Redis store."""
    return (_redis_version(url) or (0, 0)) >= MIN_REDIS


def _pg_bindir() -> str | None:
    """The newest PostgreSQL server binaries on this machine."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"),
                        key=lambda p: int(re.sub(r"\D", "", p.split("/")[4]) or 0))
    if candidates:
        return os.path.dirname(candidates[-1])
    found = shutil.which("postgres")
    if found:
        return os.path.dirname(os.path.realpath(found))
    pg_config = shutil.which("pg_config")
    if pg_config:
        bindir = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True).stdout.strip()
        if os.path.exists(os.path.join(bindir, "postgres")):
            return bindir
    return None


def _server_user() -> tuple[int, int] | None:
    """(uid, gid) to run PostgreSQL as: None when not root, else the postgres user or nobody."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            entry = pwd.getpwnam(name)
            return entry.pw_uid, entry.pw_gid
        except KeyError:
            continue
    raise RuntimeError("running as root and neither a 'postgres' nor a 'nobody' user exists")


def _run_as(ids):
    if ids is None:
        return {}
    return {"user": ids[0], "group": ids[1], "extra_groups": []}


def _start_postgres() -> str:
    bindir = _pg_bindir()
    if bindir is None:
        raise RuntimeError("no PostgreSQL server binaries (install Debian's postgresql, "
                           "or set SHARDMOVE_TEST_PG to a server of your own)")
    ids = _server_user()
    tmp = tempfile.mkdtemp(prefix="shardmove-pg-")
    data, sock = os.path.join(tmp, "data"), os.path.join(tmp, "sock")
    os.mkdir(sock)
    if ids is not None:
        for path in (tmp, sock):
            os.chown(path, *ids)
    init = subprocess.run([os.path.join(bindir, "initdb"), "-D", data, "-U", "postgres", "--auth=trust",
                           "-E", "UTF8", "--locale=C", "--no-sync"],
                          capture_output=True, text=True, cwd=tmp, **_run_as(ids))
    if init.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        last = (init.stderr.strip().splitlines() or ["?"])[-1]
        raise RuntimeError(f"initdb failed: {last}")
    port = _free_port()
    log = os.path.join(tmp, "server.log")
    with open(log, "w") as out:  # the server keeps its own descriptor
        if ids is not None:
            os.chown(log, *ids)
        proc = subprocess.Popen(
            [os.path.join(bindir, "postgres"), "-D", data, "-p", str(port), "-k", sock,
             "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "synchronous_commit=off",
             "-c", "full_page_writes=off", "-c", "max_connections=300"],
            stdout=out, stderr=subprocess.STDOUT, cwd=tmp, preexec_fn=_die_with_parent, **_run_as(ids))
    _started.append((proc, tmp))
    return _wait_ready("postgres", proc, log, f"host=127.0.0.1 port={port} user=postgres dbname=postgres",
                       _pg_answers, poll=0.2)


def _start_redis() -> str:
    binary = shutil.which("redis-server") or ("/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None)
    if binary is None:
        raise RuntimeError("no redis-server binary (install Debian's redis-server, "
                           "or set SHARDMOVE_TEST_REDIS to a Redis >= 7 of your own)")
    out = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"v=(\d+)\.(\d+)", out)
    if m is None or (int(m.group(1)), int(m.group(2))) < MIN_REDIS:
        raise RuntimeError(f"{binary} is not Redis >= 7.0 ({out.strip() or 'no version'}); "
                           "the Redis store's Lua scripts need 7.0")
    tmp = tempfile.mkdtemp(prefix="shardmove-redis-")
    port = _free_port()
    log = os.path.join(tmp, "server.log")
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", tmp, "--logfile", log, "--daemonize", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp,
                            preexec_fn=_die_with_parent)
    _started.append((proc, tmp))
    return _wait_ready("redis-server", proc, log, f"redis://127.0.0.1:{port}/0", redis_usable, poll=0.1)


def _wait_ready(what: str, proc: subprocess.Popen, log: str, address: str, answers, poll: float) -> str:
    """``address`` once the server started there answers; one line why not otherwise."""
    deadline = time.monotonic() + _START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode} at start (log: {log})")
        if answers(address):
            return address
        time.sleep(poll)
    raise RuntimeError(f"{what} did not answer within {_START_TIMEOUT} s (log: {log})")


def _provide_one(what: str, env: str, default: str, usable, start) -> None:
    if os.environ.get(env):
        # the developer's own server, used as it is (its address is not printed: it may hold a password)
        if not usable(os.environ[env]):
            failures[what] = f"{what} named by {env} does not answer (or is too old, or refuses the login)"
        return
    if usable(default):
        os.environ[env] = default
        return
    try:
        os.environ[env] = start()
    except Exception as e:  # any reason the server could not be started: one line
        failures[what] = f"{what} for the tests could not be provided: {e}"


def provide() -> None:
    """Find or start both servers and export where they are (see the module doc)."""
    _provide_one("PostgreSQL", "SHARDMOVE_TEST_PG", DEFAULT_PG, _pg_answers, _start_postgres)
    _provide_one("Redis", "SHARDMOVE_TEST_REDIS", DEFAULT_REDIS, redis_usable, _start_redis)


def stop() -> None:
    """Stop what ``provide`` started (nothing else) and delete its files."""
    while _started:
        stop_one(*_started.pop())


def stop_one(proc: subprocess.Popen, tmp: str) -> None:
    """Stop one server ``provide`` started and delete its directory."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)  # PostgreSQL: fast shutdown; Redis: exit
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    shutil.rmtree(tmp, ignore_errors=True)
