"""Shared fixtures.  Beam runs on the in-memory engine (FnApiRunner) only."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

SHARDMOVE = os.path.join(os.path.dirname(sys.executable), "shardmove")


def pytest_configure(config):
    """Find or start the PostgreSQL and Redis servers for the session (tests/servers.py)."""
    import servers

    servers.provide()
    if servers.failures and os.environ.get("CI", "").lower() == "true":
        servers.stop()
        raise pytest.UsageError(" ; ".join(servers.failures.values()) + " -- CI=true: the store tests must run")
    for reason in servers.failures.values():
        print(f"note: {reason}; its tests skip", file=sys.stderr)


def pytest_unconfigure(config):
    import servers

    servers.stop()


def run_cli(*args, env=None, timeout=600, cwd=None):
    """Run the real console script; returns CompletedProcess (text)."""
    e = dict(os.environ)
    e.setdefault("PYTHONHASHSEED", "0")
    if env:
        e.update(env)
    cmd = [SHARDMOVE, *args] if os.path.exists(SHARDMOVE) else [sys.executable, "-m", "shardmove.console", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=e, timeout=timeout, cwd=cwd)


@pytest.fixture
def cli():
    return run_cli
