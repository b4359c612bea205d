"""Behaviour of the PostgreSQL map and data stores that is theirs alone (the store contract is
test_store_contract.py), against a real server.

Every test gets a fresh database (tests/services.py), dropped afterwards;
other connections play the applications.  Unreachable server: skipped with
the reason (failed when CI=true).
"""
from __future__ import annotations

import datetime as dt
import decimal
import os
import pickle
import uuid

import psycopg
import pytest
import xxhash

from pipeline import errors
from shardmove import api
from pipeline import states as S
from pipeline.stores import data_store_from_spec, map_store_from_spec
from pipeline.config import load_config
from shardmove.demo import demo_keys
from pipeline.keys import KeyType, stable_hashes
from shardmove.planner import load_manifest
from pipeline.ring import Ring
from pipeline.stores.base import SNAPSHOT_SCHEMA, DataStore, MapStore, SwapItem
from pipeline.stores.postgres import (
    PostgresDataStore,
    PostgresMapStore,
    encode_key_rows,
    pseudo_version,
    redact_dsn,
)

from conftest import ROOT
from services import (
    assert_no_secret,
    dsn_for,
    fresh_database,
    pg_execute,
    plan_moves,
    require_postgres,
    run_killed_then_resumed,
)

SECRET = "sekret-pw-123"
TABLES = [{"name": "accounts", "key_column": "tenant_id"}, {"name": "orders", "key_column": "tenant_id"}]


class Space:
    """One test's namespace: schema ``ns`` of a database (the connection's search_path),
    shard schemas ``<ns>_<shard>``.  ``ns=None``: the public schema of a database."""

    def __init__(self, dbname, ns=None):
        self.dbname, self.ns = dbname, ns

    def dsn(self, **extra):
        if self.ns:
            extra.setdefault("options", f"-c search_path={self.ns}")
        return dsn_for(self.dbname, **extra)

    def schema(self, shard):
        return f"{self.ns}_{shard}" if self.ns else shard

    def sql(self, statement, params=None):
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            cur = conn.execute(statement, params)
            return cur.fetchall() if cur.description else []


@pytest.fixture(scope="module")
def pgdb():
    with fresh_database("pg") as name:
        yield name


@pytest.fixture
def db(pgdb, request):
    """A fresh schema (the search_path) in the module's fresh database."""
    ns = "t_" + uuid.uuid4().hex[:10]
    pg_execute(pgdb, f"CREATE SCHEMA {ns}")
    yield Space(pgdb, ns)


# ------------------------------------------------------------------ helpers


def make_map(db, kt=KeyType.STRING, rows=None, **kw) -> PostgresMapStore:
    store = PostgresMapStore.create(db.dsn(), kt, **kw)
    if rows:
        store.put_many(rows)
    return store


def map_table(db, table="shard_map"):
    return db.sql(f"SELECT key, shard_id, version, xmin::text FROM {table} ORDER BY key")


def snapshot_rows(store, segment_size=1000):
    with store.snapshot(segment_size) as snap:
        batches = list(snap)
        stats = snap.stats()
    rows = []
    for b in batches:
        assert b.schema == SNAPSHOT_SCHEMA
        assert b.num_rows <= segment_size
        rows += list(zip(b.column(0).to_pylist(), b.column(1).to_pylist(), b.column(2).to_pylist()))
    return rows, stats, batches


def q(db, shard, table):
    """The qualified name of ``table`` on ``shard`` (None: the search_path's schema)."""
    return f'"{db.schema(shard)}".{table}' if shard else table


def create_tables(db, shard=None, version_column=False):
    ver = ", version bigint NOT NULL DEFAULT 0" if version_column else ""
    if shard:
        db.sql(f'CREATE SCHEMA IF NOT EXISTS "{db.schema(shard)}"')
    db.sql(f"CREATE TABLE {q(db, shard, 'accounts')} (tenant_id text PRIMARY KEY, name text NOT NULL, "
           f"balance numeric(12,2), opened timestamptz, tags text[], avatar bytea{ver})")
    db.sql(f"CREATE TABLE {q(db, shard, 'orders')} (tenant_id text NOT NULL, order_id integer NOT NULL, "
           f"item text, amount double precision{ver}, PRIMARY KEY (tenant_id, order_id))")


def seed_rows(keys, seed=0):
    """Deterministic rows: one account per key, 0..3 orders; awkward text on purpose."""
    accounts, orders = [], []
    base = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
    for i, k in enumerate(keys):
        t = k.decode()
        accounts.append((t, f"name {i}\t\\ \n é {seed}", decimal.Decimal(i * 7 + seed) / 4,
                         base + dt.timedelta(minutes=i), ["a", f"t{i % 3}"] if i % 5 else None,
                         bytes([i % 256, 0, 255]) if i % 3 else None))
        for j in range(i % 4):
            orders.append((t, j, f"item-{j}" if j != 1 else None, 0.1 * (i + j) + seed))
    return accounts, orders


def insert_rows(db, shard, accounts, orders):
    with psycopg.connect(db.dsn(), autocommit=True) as conn:
        with conn.cursor() as cur:
            with cur.copy(f"COPY {q(db, shard, 'accounts')} (tenant_id, name, balance, opened, tags, avatar) "
                          "FROM STDIN") as cp:
                for r in accounts:
                    cp.write_row(r)
            with cur.copy(f"COPY {q(db, shard, 'orders')} (tenant_id, order_id, item, amount) FROM STDIN") as cp:
                for r in orders:
                    cp.write_row(r)


def dump(db, shard=None):
    """key text -> (account rows, order rows), every column as text, sorted."""
    out: dict = {}
    for r in db.sql(f"SELECT tenant_id, a::text FROM {q(db, shard, 'accounts')} a ORDER BY 2"):
        out.setdefault(r[0], ([], []))[0].append(r[1])
    for r in db.sql(f"SELECT tenant_id, o::text FROM {q(db, shard, 'orders')} o ORDER BY 2"):
        out.setdefault(r[0], ([], []))[1].append(r[1])
    return out


def data_store(shards, tables=TABLES, kt=KeyType.STRING, **kw) -> PostgresDataStore:
    return PostgresDataStore(shards, tables, kt, **kw)


def schema_shards(db, names, **extra):
    return {s: {"dsn": db.dsn(**extra), "schema": db.schema(s)} for s in names}


# ------------------------------------------------------------------ protocols


def test_postgres_stores_implement_the_protocols_pickle_and_redact(db):
    m = make_map(db)
    d = data_store(schema_shards(db, ["a"], password=SECRET))
    assert isinstance(m, MapStore) and isinstance(d, DataStore)
    m.lookup([b"k"])  # opens a connection
    m2, d2 = pickle.loads(pickle.dumps(m)), pickle.loads(pickle.dumps(d))
    assert (m2.dsn, m2.table, m2.key_type) == (m.dsn, "shard_map", KeyType.STRING)
    assert d2.shards == ("a",) and d2.tables == ("accounts", "orders")
    assert SECRET not in repr(d) and "password=***" in repr(d)
    m3 = PostgresMapStore(db.dsn(password=SECRET))
    assert SECRET not in repr(m3) and "***" in repr(m3)


@pytest.mark.parametrize("dsn, expected", [
    ("host=h password=sekret-pw-123 dbname=d", "host=h password=*** dbname=d"),
    ("host=h password = 'sekret pw\\' x' dbname=d", "host=h password = *** dbname=d"),
    ("postgresql://u:sekret-pw-123@h:5432/d", "postgresql://u:***@h:5432/d"),
    ("postgresql://u@h/d?sslmode=require&password=sekret-pw-123", "postgresql://u@h/d?sslmode=require&password=***"),
    ("redis://:sekret-pw-123@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
    ("host=h dbname=d", "host=h dbname=d"),
])
def test_redact_dsn(dsn, expected):
    assert redact_dsn(dsn) == expected


def test_specs_are_validated_and_never_echo_a_password():
    key = KeyType.STRING
    with pytest.raises(errors.BadInput, match=r"map_store.table: expected an identifier"):
        map_store_from_spec({"kind": "postgres", "dsn": "", "table": "shard_map; DROP TABLE x"}, key)
    with pytest.raises(errors.BadInput, match=r"map_store.table: expected table or schema.table"):
        map_store_from_spec({"kind": "postgres", "dsn": "", "table": "a.b.c"}, key)
    with pytest.raises(errors.BadInput, match=r"map_store: unknown field tabel"):
        map_store_from_spec({"kind": "postgres", "dsn": "", "tabel": "x"}, key)
    with pytest.raises(errors.BadInput, match=r"map_store.connect_timeout") as e:
        map_store_from_spec({"kind": "postgres", "dsn": "", "connect_timeout": 0}, key)
    with pytest.raises(errors.BadInput, match=r"map_store.dsn: not a valid PostgreSQL connection string") as e:
        map_store_from_spec({"kind": "postgres", "dsn": f"host=h password={SECRET} oops"}, key)
    assert SECRET not in str(e.value)
    assert map_store_from_spec({"kind": "postgres", "dsn": "", "table": "app.shard_map"}, key).schema == "app"
    good = {"kind": "postgres", "shards": {"s0": "host=h"}, "tables": TABLES}
    assert isinstance(data_store_from_spec(good, key), PostgresDataStore)
    for bad, msg in [
        ({**good, "shards": {}}, r"data_store.shards: expected a mapping"),
        ({**good, "tables": [{"name": "x-y", "key_column": "k"}]}, r"data_store.tables\[0\].name"),
        ({**good, "tables": [{"name": "x", "key_column": "k k"}]}, r"data_store.tables\[0\].key_column"),
        ({**good, "shards": {"s0": {"dsn": "", "schema": "1bad"}}}, r"data_store.shards.s0.schema"),
        ({**good, "tables": TABLES + TABLES[:1]}, r"listed twice"),
        ({**good, "pool_size": 0}, r"data_store.pool_size"),
    ]:
        with pytest.raises(errors.BadInput, match=msg):
            data_store_from_spec(bad, key)


def test_connection_errors_are_classified_and_redacted(db):
    require_postgres()
    gone = PostgresMapStore(f"host=127.0.0.1 port=1 user=postgres dbname=x password={SECRET}",
                            connect_timeout=1)
    with pytest.raises(errors.TransientError, match=r"map store: cannot connect to .*password=\*\*\*") as e:
        gone.lookup([b"k"])
    assert SECRET not in str(e.value) and e.value.__cause__ is None and e.value.reason == "connection"
    missing = PostgresMapStore(dsn_for(db.dbname + "_absent", password=SECRET))
    with pytest.raises(errors.PermanentError, match="does not exist") as e:
        missing.max_version()
    assert e.value.reason == "cannot_connect" and SECRET not in str(e.value)
    no_table = PostgresMapStore(db.dsn(), table="nope")
    with pytest.raises(errors.PermanentError, match="map store table not found: nope") as e:
        no_table.count()
    assert e.value.reason == "map_missing"


def test_configs_in_the_repository_parse_and_build_stores():
    for name, kinds in (("postgres.yaml", ("postgres", "postgres")), ("redis.yaml", ("redis", "sqlite"))):
        cfg = load_config(os.path.join(ROOT, "configs", name))
        assert (cfg.map_store["kind"], cfg.data_store["kind"]) == kinds
        map_store_from_spec(cfg.map_store, cfg.key_type, must_exist=False)  # builds, does not connect
        if kinds[1] == "postgres":
            ds = data_store_from_spec(cfg.data_store, cfg.key_type)
            assert ds.tables == ("accounts", "orders") and len(ds.shards) == 5


# ------------------------------------------------------------------- snapshot


def test_snapshot_skips_and_counts_keys_the_key_type_cannot_represent(db):
    good = demo_keys(20, KeyType.INT64)
    store = make_map(db, KeyType.INT64, rows=[(k, "s1") for k in good])
    bad = ["007", "-0", "+5", " 5", "abc", "99999999999999999999", ""]
    for t in bad:
        db.sql("INSERT INTO shard_map VALUES (%s, 's1', 1)", (t,))
    rows, stats, _ = snapshot_rows(store, 4)
    assert sorted(k for k, _, _ in rows) == sorted(good)
    assert stats.rows == 20 and stats.invalid_keys == len(bad)


# ----------------------------------------------------------------------- swap


def test_swap_of_a_locked_map_is_transient(db):
    keys = demo_keys(3, KeyType.STRING)
    store = make_map(db, rows=[(k, "a") for k in keys], lock_timeout=0.1)
    with psycopg.connect(db.dsn()) as blocker:  # an application mid-transaction on the map
        blocker.execute("LOCK TABLE shard_map IN ROW EXCLUSIVE MODE")
        with pytest.raises(errors.TransientError, match=r"map swap: canceling statement due to lock timeout") as e:
            store.swap_batch([(keys[0], "a", "b")])
        assert e.value.reason == "busy"
        blocker.rollback()
    assert store.swap_batch([(keys[0], "a", "b")]).applied == (0,)


# ------------------------------------------------------------- run registry


# ----------------------------------------------------------------------- data


def _two_shards(db, n=40, **kw):
    create_tables(db, "s0")
    create_tables(db, "s1")
    keys = demo_keys(n, KeyType.STRING)
    accounts, orders = seed_rows(keys)
    insert_rows(db, "s0", accounts, orders)
    return data_store(schema_shards(db, ["s0", "s1"]), **kw), keys


def test_copy_moves_every_table_of_a_key_together_and_is_idempotent(db):
    data, keys = _two_shards(db)
    src = dump(db, "s0")
    out = data.copy(keys, "s0", "s1")
    assert [o.key for o in out] == keys and all(o.ok and o.written for o in out)
    assert dump(db, "s1") == src  # accounts and orders, every column, byte for byte in text form
    hashes = data.hashes(keys, "s1")
    assert hashes == data.hashes(keys, "s0")
    assert [o.content_hash for o in out] == [hashes[k][0] for k in keys]
    assert [o.source_version for o in out] == [hashes[k][1] for k in keys]
    records = data.read(keys, "s0")
    assert all(xxhash.xxh3_128_digest(r) == hashes[k][0] and pseudo_version(r) == v for k, (r, v) in records.items())
    again = data.copy(keys, "s0", "s1")
    assert [(o.content_hash, o.source_version) for o in again] == [(o.content_hash, o.source_version) for o in out]
    assert dump(db, "s1") == src
    sizes = data.key_sizes(keys, "s1")
    assert sizes == {k: len(r) for k, (r, _) in records.items()}
    assert data.shard_bytes("s1") == sum(sizes.values()) == data.shard_bytes("s0")
    assert data.count("s0") == data.count("s1") == len(keys)


def test_copy_replaces_stale_target_rows_and_reports_missing_sources(db):
    data, keys = _two_shards(db, n=8)
    data.copy(keys[:4], "s0", "s1")
    db.sql(f"INSERT INTO {q(db, 's1', 'orders')} VALUES (%s, 99, 'stale', 1)", (keys[0].decode(),))  # stale
    db.sql(f"UPDATE {q(db, 's1', 'accounts')} SET name = 'stale' WHERE tenant_id = %s", (keys[1].decode(),))
    absent = [b"absent-1", b"absent-2"]
    out = data.copy(keys[:4] + absent, "s0", "s1")
    assert [o.ok for o in out] == [True] * 4 + [False, False]
    for o in out[4:]:
        assert isinstance(o.error, errors.SourceMissing) and o.error.reason == "source_missing"
        assert o.content_hash is None and b"absent" not in str(o.error).encode()
    src, tgt = dump(db, "s0"), dump(db, "s1")
    assert {k: tgt[k] for k in tgt} == {k.decode(): src[k.decode()] for k in keys[:4]}


def test_copy_across_databases(db):
    with fresh_database("pg2") as other_db:
        other = Space(other_db)
        create_tables(db)
        create_tables(other)
        keys = demo_keys(20, KeyType.STRING)
        insert_rows(db, None, *seed_rows(keys))
        data = data_store({"here": db.dsn(), "there": other.dsn()})
        out = data.copy(keys, "here", "there")
        assert all(o.ok for o in out) and dump(other) == dump(db)
        assert data.hashes(keys, "there") == data.hashes(keys, "here")
        assert not PostgresMapStore(db.dsn()).supports_fence(data)
        data.close()


def test_copy_errors_schema_shape_locks_and_unknown_shards(db):
    data, keys = _two_shards(db, n=5, lock_timeout=0.1)
    with pytest.raises(errors.PermanentError, match="shard not configured") as e:
        data.copy(keys, "s0", "nowhere")
    assert e.value.reason == "shard_missing"
    with pytest.raises(ValueError, match="same shard"):
        data.copy(keys, "s0", "s0")
    assert data.copy([], "s0", "s1") == []
    with psycopg.connect(db.dsn()) as blocker:  # a writer holding the target table
        blocker.execute(f"LOCK TABLE {q(db, 's1', 'orders')} IN ACCESS EXCLUSIVE MODE")
        with pytest.raises(errors.TransientError, match="lock timeout") as e:
            data.copy(keys, "s0", "s1")
        assert e.value.reason == "busy"
        blocker.rollback()
    assert data.count("s1") == 0
    db.sql(f'CREATE SCHEMA "{db.schema("s2")}"')
    db.sql(f"CREATE TABLE {q(db, 's2', 'accounts')} (LIKE {q(db, 's0', 'accounts')})")
    wider = data_store(schema_shards(db, ["s0", "s2"]))
    with pytest.raises(errors.PermanentError, match="table orders not found on shard s2") as e:
        wider.copy(keys, "s0", "s2")
    assert e.value.reason == "schema" and not wider.shard_exists("s2") and wider.shard_exists("s0")
    db.sql(f"CREATE TABLE {q(db, 's2', 'orders')} (LIKE {q(db, 's0', 'orders')})")
    db.sql(f"ALTER TABLE {q(db, 's2', 'orders')} ADD COLUMN note text")
    fresh = data_store(schema_shards(db, ["s0", "s2"]))
    with pytest.raises(errors.PermanentError, match="table orders has different columns on shards s0 and s2"):
        fresh.copy(keys, "s0", "s2")
    assert not data.shard_exists("unconfigured") and data.count("unconfigured") == 0


def test_a_version_column_keeps_newer_target_rows(db):
    create_tables(db, "s0", version_column=True)
    create_tables(db, "s1", version_column=True)
    keys = demo_keys(3, KeyType.STRING)
    accounts, orders = seed_rows(keys)
    insert_rows(db, "s0", accounts, orders)
    tables = [dict(t, version_column="version") for t in TABLES]
    data = data_store(schema_shards(db, ["s0", "s1"]), tables=tables)
    data.copy(keys, "s0", "s1")
    db.sql(f"UPDATE {q(db, 's1', 'accounts')} SET name = 'newer', version = 5 WHERE tenant_id = %s",
           (keys[0].decode(),))
    newer = dump(db, "s1")[keys[0].decode()]
    out = data.copy(keys, "s0", "s1")  # a late duplicate copy
    assert [o.written for o in out] == [False, True, True] and all(o.ok for o in out)
    assert dump(db, "s1")[keys[0].decode()] == newer


def test_canonical_encoding_is_pinned(db):
    db.sql("CREATE TABLE recs (k text, n integer, note text, at timestamptz)")
    db.sql("INSERT INTO recs VALUES ('key', 2, NULL, '2024-01-02 03:04:05+02'), ('key', 1, 'é', NULL)")
    data = data_store({"s": db.dsn()}, tables=[{"name": "recs", "key_column": "k"}])
    record, version = data.read([b"key"], "s")[b"key"]

    def lp(s):
        b = s.encode()
        return len(b).to_bytes(4, "big") + b

    header = lp("recs") + (4).to_bytes(4, "big") + b"".join(
        lp(c) + lp(t) for c, t in [("at", "timestamp with time zone"), ("k", "text"), ("n", "integer"), ("note", "text")])
    row1 = b"\x00" + b"\x01" + lp("key") + b"\x01" + lp("1") + b"\x01" + lp("é")
    row2 = b"\x01" + lp("2024-01-02 01:04:05+00") + b"\x01" + lp("key") + b"\x01" + lp("2") + b"\x00"
    assert record == header + (2).to_bytes(4, "big") + b"".join(sorted([row1, row2]))
    assert record == encode_key_rows([("recs", ["at", "k", "n", "note"],
                                       ["timestamp with time zone", "text", "integer", "text"],
                                       [("2024-01-02 01:04:05+00", "key", "2", None), (None, "key", "1", "é")])])
    assert version == int.from_bytes(xxhash.xxh3_128_digest(record)[:8], "big") >> 1
    assert xxhash.xxh3_128_hexdigest(record) == "e7603a6bea75b948a55a1bec716e0df0"


def test_put_many_writes_a_single_table_layout(db):
    """The data store contract (deletes, counts, reads) is in test_store_contract.py."""
    data = data_store(schema_shards(db, ["t"]), tables=[{"name": "records", "key_column": "key"}])
    keys = demo_keys(10, KeyType.STRING)
    assert data.put_many("t", [(k, b"x" * (50 + i)) for i, k in enumerate(keys)]) == 10
    assert data.shard_exists("t") and data.count("t") == 10
    assert db.sql(f"SELECT value FROM {q(db, 't', 'records')} WHERE key = %s", (keys[3].decode(),)) == [(b"x" * 53,)]


# ---------------------------------------------------------------------- fence


def test_fenced_swap_rechecks_sources_in_the_swap_transaction(db):
    data, keys = _two_shards(db, n=6)
    store = make_map(db, rows=[(k, "s0") for k in keys])
    assert store.supports_fence(data) and not store.supports_fence(object())
    out = data.copy(keys, "s0", "s1")
    t = [k.decode() for k in keys]
    orders, accounts = q(db, "s0", "orders"), q(db, "s0", "accounts")
    db.sql(f"UPDATE {orders} SET item = 'changed' WHERE tenant_id = %s", (t[2],))  # an update
    db.sql(f"DELETE FROM {accounts} WHERE tenant_id = %s", (t[3],))  # a partial delete
    db.sql(f"DELETE FROM {orders} WHERE tenant_id = %s", (t[4],))
    db.sql(f"INSERT INTO {orders} VALUES (%s, 7, 'new', 1)", (t[5],))  # an insert
    before = map_table(db)
    items = [SwapItem(o.key, "s0", "s1", o.source_version) for o in out]
    res = store.swap_batch(items, fence=data)
    assert not res.committed and res.source_changed == (2, 3, 5) and res.applied == ()
    assert map_table(db) == before
    res = store.swap_batch(items[:2], fence=data)
    assert res.committed and res.applied == (0, 1)
    with pytest.raises(ValueError, match="needs source_version"):
        store.swap_batch([(keys[0], "s0", "s1")], fence=data)


def test_fenced_swap_waits_for_source_writers(db):
    data, keys = _two_shards(db, n=3)
    store = make_map(db, rows=[(k, "s0") for k in keys], lock_timeout=0.1)
    out = data.copy(keys, "s0", "s1")
    with psycopg.connect(db.dsn()) as writer:  # a writer mid-transaction on the source
        writer.execute(f"UPDATE {q(db, 's0', 'orders')} SET item = item WHERE tenant_id = %s", (keys[1].decode(),))
        with pytest.raises(errors.TransientError, match="lock timeout"):
            store.swap_batch([(o.key, "s0", "s1", o.source_version) for o in out], fence=data)
        writer.rollback()
    assert store.lookup(keys)[keys[0]][0] == "s0"
    assert store.swap_batch([(o.key, "s0", "s1", o.source_version) for o in out], fence=data).committed


def test_write_fence_holds_writers_and_reads_versions(db):
    data, keys = _two_shards(db, n=4, lock_timeout=0.2)
    out = data.copy(keys, "s0", "s1")
    with data.write_fence("s0") as versions:
        assert versions(keys + [b"absent"]) == {o.key: (o.content_hash, o.source_version) for o in out}
        with psycopg.connect(db.dsn(options=f"-c search_path={db.ns} -c lock_timeout=200")) as writer:
            with pytest.raises(psycopg.errors.LockNotAvailable):  # any writer waits for the fence
                writer.execute(f"UPDATE {q(db, 's0', 'orders')} SET item = 'x' WHERE tenant_id = %s",
                               (keys[1].decode(),))
    with psycopg.connect(db.dsn()) as writer:  # a writer mid-transaction: the fence cannot start
        writer.execute(f"UPDATE {q(db, 's0', 'orders')} SET item = item WHERE tenant_id = %s", (keys[1].decode(),))
        with pytest.raises(errors.TransientError, match="write fence: canceling statement due to lock timeout"):
            with data.write_fence("s0"):
                pass
        writer.rollback()
    assert data.hashes(keys, "s0") == data.hashes(keys, "s1")


# ------------------------------------------------------- keyspace end to end

CURRENT = ["s0", "s1", "s2", "s3"]
TARGET = CURRENT + ["s4"]


def build_keyspace(tmp_path, db, other_db, n, password=None, **options):
    """PostgreSQL map + PostgreSQL shards: s0..s3 are schemas of ``db`` (the map's
    database); the new shard s4 is the public schema of ``other_db`` (a database of
    its own), or schema s4 of ``db`` when ``other_db`` is None."""
    extra = {"password": password} if password else {}
    keys = demo_keys(n, KeyType.STRING)
    ring = Ring.build("native", [(s, 1.0) for s in CURRENT], key_type=KeyType.STRING)
    owners = [ring.shard_ids[i] for i in ring.assign(keys, stable_hashes(keys, len(keys)))]
    accounts, orders = seed_rows(keys)
    for s in CURRENT:
        create_tables(db, s)
        mine = {k.decode() for k, o in zip(keys, owners) if o == s}
        insert_rows(db, s, [a for a in accounts if a[0] in mine], [o for o in orders if o[0] in mine])
    if other_db:
        create_tables(other_db)
    else:
        create_tables(db, "s4")
    mstore = PostgresMapStore.create(db.dsn(), KeyType.STRING)
    mstore.put_many(zip(keys, owners))
    mstore.close()
    shards = {s: {"dsn": db.dsn(**extra), "schema": db.schema(s)} for s in TARGET}
    if other_db:
        shards["s4"] = other_db.dsn(**extra)
    raw = {
        "key_type": "string",
        "work_dir": str(tmp_path / "work"),
        "map_store": {"kind": "postgres", "dsn": dsn_for(db.dbname, **extra), "table": f"{db.ns}.shard_map"},
        "data_store": {"kind": "postgres", "shards": shards, "tables": TABLES, "pool_size": 3},
        "current_shards": CURRENT,
        "target": {"profile": "native", "shards": TARGET},
        "swap_batch_size": 40, "hash_buckets": 2, "retry_base_delay": "1ms",
        "checkpoint_flush_interval": "50ms", "copy_concurrency": 3, "verify_concurrency": 3,
    }
    raw.update(options)
    originals = {s: dump(db, s) for s in CURRENT}
    return raw, originals


def shard_data(db, other_db, shard):
    return dump(other_db) if shard == "s4" and other_db else dump(db, shard)


def install_map_witness(db):
    """Count map-row writes per key with a trigger: a witness independent of shardmove."""
    db.sql(f"""
        CREATE TABLE test_writes(key text);
        CREATE FUNCTION test_count() RETURNS trigger LANGUAGE plpgsql AS
        $$ BEGIN INSERT INTO {db.ns}.test_writes VALUES (NEW.key); RETURN NEW; END $$;
        CREATE TRIGGER test_count AFTER UPDATE ON shard_map FOR EACH ROW EXECUTE FUNCTION test_count();
    """)


def assert_as_planned(db, other_db, moves, originals, failed=()):
    current = dict((k, s) for k, s, _v, _x in map_table(db))
    data = {s: shard_data(db, other_db, s) for s in TARGET}
    moved = {k.decode() for k, _, _ in moves}
    for key, src, tgt in moves:
        t = key.decode()
        if key in failed:
            continue
        assert current[t] == tgt
        assert data[tgt][t] == originals[src][t]  # both tables, every column
        assert data[src][t] == originals[src][t]  # the source is left in place (no cleanup stage)
    for s in CURRENT:
        for t in originals[s]:
            if t not in moved:
                assert current[t] == s
    writes = dict(db.sql("SELECT key, count(*) FROM test_writes GROUP BY key"))
    done = moved - {k.decode() for k in failed}
    assert all(writes.get(t) == 1 for t in done), "a moved key's map row was not written exactly once"
    assert set(writes) - done <= {k.decode() for k in failed}  # only the applications wrote those


def test_executor_cas_conflict_fails_only_that_key(tmp_path, db):
    # the whole keyspace in one database (s0..s4 are schemas): the trigger below can reach the map
    raw, originals = build_keyspace(tmp_path, db, None, 300)
    cfg = load_config(None, raw=raw)
    res = api.plan(cfg, out=lambda _l: None)
    m = load_manifest(res.plan_dir)
    moves = plan_moves(res.plan_dir, m)
    key, src, tgt = moves[len(moves) // 2]
    other_shard = next(s for s in CURRENT if s not in (src, tgt))
    install_map_witness(db)
    # behind the executor's back, after its drift check: when the copy lands on the
    # target, an application moves the key elsewhere
    db.sql(f"""
        CREATE FUNCTION test_move() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
          UPDATE {db.ns}.shard_map SET shard_id = '{other_shard}',
                 version = (SELECT max(version) + 1 FROM {db.ns}.shard_map) WHERE key = NEW.tenant_id;
          RETURN NEW; END $$;
        CREATE TRIGGER test_move AFTER INSERT ON {q(db, tgt, "accounts")} FOR EACH ROW
          WHEN (NEW.tenant_id = '{key.decode()}') EXECUTE FUNCTION test_move();
    """)
    run = api.run(cfg, res.plan_dir, out=lambda _l: None)
    assert run.exit_code == 3
    assert (run.summary["failed"], run.summary["done"]) == (1, m["moves"] - 1)
    assert run.summary["failures_by_reason"] == {S.MAP_CHANGED: 1}
    assert dict((k, s) for k, s, _v, _x in map_table(db))[key.decode()] == other_shard
    assert_as_planned(db, None, moves, originals, failed={key})


def test_cli_kill_and_resume_postgres_map_and_shards(tmp_path, db):
    """The whole migration through the CLI, killed mid-run, on PostgreSQL map + shards
    (two tables per key), with a DSN password that must never be echoed."""
    with fresh_database("pg5") as other_db:
        other = Space(other_db)
        faults = {"copy": {"latency_ms": 15, "keys_per_call": 1}, "swap": {"latency_ms": 60}}
        raw, originals = build_keyspace(tmp_path, db, other, 1000, password=SECRET, faults=faults,
                                        swap_batch_size=20, checkpoint_flush_interval="20ms", copy_concurrency=2)
        install_map_witness(db)
        plan_dir, m, outs = run_killed_then_resumed(tmp_path, raw)
        assert m["moves"] > 100
        assert_as_planned(db, other, plan_moves(plan_dir, m), originals)
        assert_no_secret(outs, raw["work_dir"], SECRET)
