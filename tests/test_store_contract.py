"""The store contract suites of :mod:`shardmove.testing`, run against every store here.

Map stores: SQLite, PostgreSQL and Redis (real servers, tests/servers.py).  Data
stores: SQLite, PostgreSQL and the object store (local shards; its GCS shards
are tested in test_object_store.py).  The run-claim rule is checked here once
as a pure function, and through the contract against every map store.
"""
from __future__ import annotations

import itertools
import sqlite3
import uuid

import pytest
import redis

from pipeline.keys import KeyType
from pipeline.stores.claims import ClaimRow, decide_claim
from pipeline.stores.objects import ObjectDataStore
from pipeline.stores.postgres import PostgresDataStore, PostgresMapStore
from pipeline.stores.redis_store import RedisMapStore
from pipeline.stores.sqlite import SqliteDataStore, SqliteMapStore
from shardmove.testing import CLAIM_CASES, DataStoreContract, MapStoreContract

from services import dsn_for, fresh_database, fresh_prefix, pg_execute, require_redis

_n = itertools.count()


class _Tracked:
    """Closes every store a test made."""

    @pytest.fixture(autouse=True)
    def _close_stores(self):
        self.made = []
        yield
        for s in self.made:
            try:
                s.close()
            except Exception:  # noqa: BLE001 - best effort after the test
                pass

    def _keep(self, store):
        self.made.append(store)
        return store


# ------------------------------------------------------------------ the rule


@pytest.mark.parametrize("case", CLAIM_CASES, ids=[c[0] for c in CLAIM_CASES])
def test_the_claim_rule_decides_the_table(case):
    _name, rows, (plan_id, epoch, window, now), (kind, named) = case
    d = decide_claim(plan_id, epoch, window, now, [ClaimRow(*r) for r in rows])
    assert d.kind == kind and (d.row.plan_id if d.row else None) == named
    # the order the registry returns its rows in never changes the decision
    d2 = decide_claim(plan_id, epoch, window, now, [ClaimRow(*r) for r in reversed(rows)])
    assert d2 == d


# ---------------------------------------------------------------------- SQLite


class TestSqliteMapStore(_Tracked, MapStoreContract):
    awkward_keys = {
        KeyType.STRING: [b"", b"with\x00nul"],
        KeyType.INT64: [(0).to_bytes(8, "big")],
        KeyType.BYTES: [b""],
    }

    @pytest.fixture(autouse=True)
    def _dir(self, tmp_path):
        self.dir = tmp_path

    def make_map_store(self, key_type=KeyType.STRING):
        return self._keep(SqliteMapStore.create(str(self.dir / f"map{next(_n)}.sqlite"), key_type))

    def _table(self, store):
        con = sqlite3.connect(store.path)
        try:
            return con.execute("SELECT key, shard_id, version FROM shard_map ORDER BY key").fetchall()
        finally:
            con.close()

    def raw_state(self, store):
        return self._table(store)

    def stored_keys(self, store):
        return [r[0] for r in self._table(store)]


class TestSqliteDataStore(_Tracked, DataStoreContract):
    shards = ("s0", "s 1/ü", "s2")  # shard ids that are not file names as they stand

    @pytest.fixture(autouse=True)
    def _dir(self, tmp_path):
        self.dir = tmp_path

    def make_data_store(self, key_type=KeyType.STRING):
        return self._keep(SqliteDataStore(str(self.dir / f"shards{next(_n)}"), key_type))


# ------------------------------------------------------------------ PostgreSQL


@pytest.fixture(scope="module")
def pgdb():
    with fresh_database("contract") as name:
        yield name


class TestPostgresMapStore(_Tracked, MapStoreContract):
    @pytest.fixture(autouse=True)
    def _schema(self, pgdb):
        self.db = pgdb
        self.ns = "c_" + uuid.uuid4().hex[:10]
        pg_execute(pgdb, f"CREATE SCHEMA {self.ns}")

    def make_map_store(self, key_type=KeyType.STRING):
        return self._keep(PostgresMapStore.create(dsn_for(self.db), key_type, table=f"{self.ns}.map{next(_n)}"))

    def _table(self, store):
        return pg_execute(self.db, f"SELECT key, shard_id, version, xmin::text FROM {store.table} ORDER BY key")

    def raw_state(self, store):
        return self._table(store)  # with xmin: any rewrite of a row would change it

    def stored_keys(self, store):
        return [r[0] for r in self._table(store)]


class TestPostgresMappedMapStore(TestPostgresMapStore):
    """The same contract on a map whose columns have other names (``map_store.columns``),
    one of them needing quotes."""

    COLUMNS = {"key": "Tenant", "shard_id": "placement", "version": "rev"}

    def make_map_store(self, key_type=KeyType.STRING):
        return self._keep(PostgresMapStore.create(dsn_for(self.db), key_type, table=f"{self.ns}.map{next(_n)}",
                                                  columns=self.COLUMNS))

    def _table(self, store):
        return pg_execute(self.db, f'SELECT "Tenant", placement, rev, xmin::text FROM {store.table} ORDER BY 1')


class TestPostgresDataStore(_Tracked, DataStoreContract):
    keeps_newer_target = False  # no version column configured: see test_postgres.py for one
    reads_back_values = False  # a record reads back as the canonical encoding of its rows

    @pytest.fixture(autouse=True)
    def _db(self, pgdb):
        self.db = pgdb

    def make_data_store(self, key_type=KeyType.STRING):
        ns = f"d{next(_n)}_" + uuid.uuid4().hex[:8]
        shards = {s: {"dsn": dsn_for(self.db), "schema": f"{ns}_{i}"} for i, s in enumerate(self.shards)}
        for spec in shards.values():  # the store copies into existing tables only (creates_shards False)
            pg_execute(self.db, f"CREATE SCHEMA {spec['schema']}")
            pg_execute(self.db, f"CREATE TABLE {spec['schema']}.records (key TEXT PRIMARY KEY, value BYTEA NOT NULL)")
        return self._keep(PostgresDataStore(shards, [{"name": "records", "key_column": "key"}], key_type))


# ----------------------------------------------------------------------- Redis


class TestRedisMapStore(_Tracked, MapStoreContract):
    point_in_time_snapshot = False  # HSCAN: rows changed while it runs are left out
    awkward_keys = {KeyType.STRING: [b"with\x00nul"]}

    @pytest.fixture(autouse=True)
    def _prefix(self):
        with fresh_prefix("contract") as p:
            self.prefix = p
            yield

    def make_map_store(self, key_type=KeyType.STRING):
        return self._keep(RedisMapStore.create(require_redis(), key_type, prefix=f"{self.prefix}:{next(_n)}"))

    def raw_state(self, store):
        c = redis.Redis.from_url(require_redis())
        try:  # everything the layout holds: shard hash, version hash, clock
            return c.hgetall(store.shard_key), c.hgetall(store.version_key), c.get(store.clock_key)
        finally:
            c.close()

    def stored_keys(self, store):
        c = redis.Redis.from_url(require_redis())
        try:
            return [k.decode() for k in c.hkeys(store.shard_key)]
        finally:
            c.close()


# ---------------------------------------------------------------- object store


class TestObjectDataStore(_Tracked, DataStoreContract):
    awkward_keys = {KeyType.STRING: [b"../../etc/passwd", b"with\x00nul", b"/"], KeyType.BYTES: [b"\x00"]}

    @pytest.fixture(autouse=True)
    def _dir(self, tmp_path):
        self.dir = tmp_path

    def make_data_store(self, key_type=KeyType.STRING):
        base = self.dir / f"objects{next(_n)}"
        return self._keep(ObjectDataStore({s: str(base / s) for s in self.shards}, key_type))


# ------------------------------------------------------------- capabilities


def test_capabilities_are_protocols_that_fault_wrappers_keep(tmp_path):
    """The optional capabilities are checked with isinstance against base.py's Protocols;
    the fault-injection wrappers keep those of the store they wrap as their own
    attributes (Python >= 3.12 checks protocols statically, never via __getattr__)."""
    import inspect

    from pipeline.faults import wrap_stores
    from pipeline.stores.base import (ChangeCounter, KeyNameLimits, RunRegistry, ShardInventory,
                                      WriteFencing)

    ms = SqliteMapStore.create(str(tmp_path / "m.sqlite"))
    ds = SqliteDataStore(str(tmp_path / "d"))
    objects = ObjectDataStore({"s0": str(tmp_path / "o")})
    assert isinstance(ms, RunRegistry) and isinstance(ms, ChangeCounter) and not isinstance(ms, WriteFencing)
    assert isinstance(ds, WriteFencing) and isinstance(ds, ShardInventory) and not isinstance(ds, KeyNameLimits)
    assert isinstance(objects, KeyNameLimits) and not isinstance(objects, WriteFencing)
    wms, wds, _ = wrap_stores(ms, ds, {"copy": {"latency_ms": 0}})
    _, wobj, _ = wrap_stores(None, objects, {"copy": {"latency_ms": 0}})
    for wrapper, proto in ((wms, RunRegistry), (wms, ChangeCounter), (wds, WriteFencing), (wds, ShardInventory),
                           (wobj, KeyNameLimits)):
        assert isinstance(wrapper, proto)
        for name in ("claim_run", "write_fence", "check_keys", "shard_exists", "max_version"):
            if hasattr(getattr(wrapper, "_inner"), name):
                inspect.getattr_static(wrapper, name)  # found without __getattr__
    assert not isinstance(wobj, WriteFencing) and not isinstance(wds, KeyNameLimits)


def test_the_contract_module_needs_pytest_only_to_run():
    import subprocess
    import sys

    code = ("import sys, shardmove.testing as t; "
            "assert 'pytest' not in sys.modules and 'apache_beam' not in sys.modules; "
            "assert t.MapStoreContract and t.DataStoreContract and t.CLAIM_CASES")
    subprocess.run([sys.executable, "-c", code], check=True)
