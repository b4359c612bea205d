"""The test servers the session provides itself (tests/servers.py): started on a
free port, answering, and stopped with their files gone -- nothing else touched."""
from __future__ import annotations

import os

import pytest

import servers


def _own(start, answers):
    if os.environ.get("CI", "").lower() != "true" and servers.failures:
        pytest.skip("; ".join(servers.failures.values()))
    before = list(servers._started)
    address = start()
    proc, tmp = servers._started[-1]
    assert servers._started[:-1] == before and proc.poll() is None and os.path.isdir(tmp)
    assert answers(address)
    # stop only this one: the session's own servers stay up for the rest of the suite
    servers.stop_one(*servers._started.pop())
    assert proc.poll() is not None and not os.path.exists(tmp)
    assert not answers(address)


def test_a_started_postgres_answers_and_is_stopped_and_removed():
    _own(servers._start_postgres, servers._pg_answers)


def test_a_started_redis_is_7_or_later_and_is_stopped_and_removed():
    _own(servers._start_redis, servers.redis_usable)


def test_the_session_exports_where_its_servers_are():
    if servers.failures:
        pytest.skip("; ".join(servers.failures.values()))
    assert servers._pg_answers(os.environ["SHARDMOVE_TEST_PG"])
    assert servers.redis_usable(os.environ["SHARDMOVE_TEST_REDIS"])
