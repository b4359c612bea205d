"""Pluggable stores (issue 20 item 3): the README's custom mover registered by a real entry
point (a ``dictmover-0.1.dist-info`` on sys.path) passes the store contract kit and migrates
a demo keyspace through the command line; store objects passed to the API; the in-memory
stores; unknown kinds and runners with worker processes refused with one line."""
from __future__ import annotations

import importlib
import os
import re
import sqlite3
import sys
import threading
import uuid

import pytest
import yaml

import shardmove
from pipeline.keys import KeyType
from pipeline.stores import data_store_from_spec
from shardmove.stores import MemoryDataStore, MemoryMapStore
from shardmove.testing import DataStoreContract

from conftest import run_cli

README = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")
PLAN_RE = re.compile(r"^plan id: ([0-9a-f]{64})$", re.M)


def _readme_mover() -> str:
    text = open(README, encoding="utf-8").read()
    m = re.search(r"<!-- custom-mover -->\n```python\n(.*?)```", text, re.S)
    assert m, "the README's custom mover is missing"
    return m.group(1)


def test_the_readme_mover_is_under_40_lines():
    assert len([line for line in _readme_mover().splitlines() if line.strip()]) < 40


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory):
    """The README block as module ``dictmover``, installed by a dist-info whose
    entry_points.txt registers it in the group ``shardmove.stores`` as ``dictmover``."""
    d = tmp_path_factory.mktemp("plugin")
    (d / "dictmover.py").write_text(_readme_mover())
    info = d / "dictmover-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: dictmover\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[shardmove.stores]\ndictmover = dictmover\n")
    sys.path.insert(0, str(d))
    importlib.invalidate_caches()
    yield str(d)
    sys.path.remove(str(d))
    sys.modules.pop("dictmover", None)
    importlib.invalidate_caches()


class TestDictMoverByEntryPoint(DataStoreContract):
    """The contract kit against the README's mover, built through its entry point."""

    @pytest.fixture(autouse=True)
    def _plugin(self, plugin_dir):
        pass

    def make_data_store(self, key_type=KeyType.STRING):
        store = data_store_from_spec({"kind": "dictmover", "name": uuid.uuid4().hex}, key_type)
        assert type(store).__module__ == "dictmover"
        return store


def _demo(tmp_path, keys: int = 600) -> str:
    r = run_cli("demo", str(tmp_path / "d"), "--keys", str(keys), "--shards", "3")
    assert r.returncode == 0, r.stderr
    return str(tmp_path / "d" / "shardmove.yaml")


def _edit(cfg: str, **sections) -> None:
    doc = yaml.safe_load(open(cfg))
    doc.update(sections)
    with open(cfg, "w") as f:
        yaml.safe_dump(doc, f, sort_keys=False)


def _map_rows(cfg: str) -> list:
    con = sqlite3.connect(os.path.join(os.path.dirname(cfg), "keyspace", "map.sqlite"))
    try:
        return con.execute("SELECT key, shard_id FROM shard_map").fetchall()
    finally:
        con.close()


def _seed(store, rows) -> None:
    by_shard: dict = {}
    for key, shard in rows:
        by_shard.setdefault(shard, []).append((key.encode(), b"value of " + key.encode()))
    for shard, recs in by_shard.items():
        store.put_many(shard, recs)


def _cli(capsys, *argv) -> tuple[int, str, str]:
    from shardmove.cli import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_a_migration_through_the_cli_with_the_entry_point_mover(plugin_dir, tmp_path, capsys):
    """The CLI in this process (the mover's records live here): plan, run, status."""
    cfg = _demo(tmp_path)
    name = uuid.uuid4().hex
    _edit(cfg, data_store={"kind": "dictmover", "name": name})
    mover = data_store_from_spec({"kind": "dictmover", "name": name}, KeyType.STRING)
    _seed(mover, _map_rows(cfg))
    code, out, err = _cli(capsys, "plan", "--config", cfg)
    assert code == 0, err
    plan_id = PLAN_RE.findall(out)[0]
    code, out, err = _cli(capsys, "run", plan_id, "--config", cfg)
    assert code == 0, err
    m = re.search(r"^summary: planned=(\d+) done=(\d+) failed=0$", out, re.M)
    assert m and m.group(1) == m.group(2) and int(m.group(1)) > 0
    after = _map_rows(cfg)
    assert sum(mover.count(s) for s in ("s0", "s1", "s2", "s3")) == 600 + int(m.group(1))  # copies kept
    for key, shard in after:  # every key's record is on the shard the map now names
        assert mover.read([key.encode()], shard) != {}
    assert mover.count("s3") == sum(1 for _, s in after if s == "s3") == int(m.group(1))
    assert _cli(capsys, "status", plan_id, "--config", cfg)[0] == 0


def test_unknown_kinds_name_the_known_ones_including_plugins(plugin_dir, tmp_path):
    cfg = _demo(tmp_path, keys=50)
    _edit(cfg, data_store={"kind": "dictmovr"})
    env = {"PYTHONPATH": plugin_dir + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = run_cli("plan", "--config", cfg, env=env)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: config data_store.kind: unknown kind 'dictmovr' (known: dictmover, memory, none, objects, "
        "postgres, sqlite)"], r.stderr
    _edit(cfg, data_store={"kind": "dictmover"}, map_store={"kind": "instance"})
    r = run_cli("plan", "--config", cfg, env=env)
    assert r.returncode == 2 and "map_store.kind: unknown kind 'instance' (known: memory, postgres, redis, " \
                                  "sqlite)" in r.stderr
    assert not os.path.isdir(os.path.join(os.path.dirname(cfg), "work", "snapshots")) or not [
        n for n in os.listdir(os.path.join(os.path.dirname(cfg), "work", "snapshots")) if not n.startswith(".")]


def test_stores_in_this_process_refuse_runners_with_worker_processes(plugin_dir, tmp_path, capsys):
    cfg = _demo(tmp_path, keys=50)
    _edit(cfg, data_store={"kind": "dictmover"})
    code, _out, err = _cli(capsys, "plan", "--config", cfg, "--", "--direct_running_mode=multi_processing")
    assert code == 2 and err.strip().splitlines() == [
        "error: data_store: the store plugin 'dictmover' keeps its state in this process (in_process_only), "
        "and FnApiRunner with "
        "--direct_running_mode=multi_processing runs its workers in other processes; use the in-process "
        "runner (--runner=FnApiRunner, the default)"], err
    _edit(cfg, map_store={"kind": "memory", "name": uuid.uuid4().hex}, data_store={"kind": "sqlite",
                                                                                     "directory": "keyspace/shards"})
    code, _out, err = _cli(capsys, "plan", "--config", cfg, "--", "--runner=PrismRunner")
    lines = err.strip().splitlines()
    assert code == 2 and lines[0].startswith("warning: map_store kind memory is not durable: its contents live "
                                             "in this process only"), err
    assert lines[1:] == ["error: map_store: a memory store lives in this process, and PrismRunner runs its "
                         "workers in other processes; use the in-process runner (--runner=FnApiRunner, the "
                         "default)"], err


def test_memory_stores_from_yaml_through_the_api(tmp_path):
    """kind: memory for both stores: filled here, planned and run in this process."""
    name = uuid.uuid4().hex
    keys = [f"user-{i}".encode() for i in range(400)]
    ms, ds = MemoryMapStore(name), MemoryDataStore(name)
    ms.put_many([(k, f"s{i % 2}") for i, k in enumerate(keys)])
    for i, k in enumerate(keys):
        ds.put_many(f"s{i % 2}", [(k, b"v" + k)])
    doc = {"work_dir": str(tmp_path / "work"), "map_store": {"kind": "memory", "name": name},
           "data_store": {"kind": "memory", "name": name}, "current_shards": ["s0", "s1"],
           "target": {"profile": "native", "shards": [{"id": s} for s in ("s0", "s1", "s2")]}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(doc))
    other = MemoryMapStore(uuid.uuid4().hex)  # a store object instead of the configured one
    other.put_many([(k, "s0") for k in keys[:10]])
    other.put_many([(k, "s1") for k in keys[10:30]])
    info = shardmove.snapshot(str(tmp_path / "c.yaml"), map_store=other, cutoff=1)
    assert (info.rows, info.cutoff, info.rows_above_cutoff) == (10, 1, 20)
    plan = shardmove.plan(str(tmp_path / "c.yaml"))
    assert plan.keys_examined == 400 and plan.move_count > 0
    done = shardmove.run(str(tmp_path / "c.yaml"), plan)
    assert done.exit_code == 0 and done.done == plan.move_count
    moves = [m for b in plan.moves() for m in zip(b.column("key").to_pylist(), b.column("target").to_pylist())]
    now = ms.lookup(keys)
    assert len(moves) == plan.move_count and all(now[k][0] == t and ds.read([k], t) for k, t in moves)
    assert ms.count_above(plan.manifest["snapshot"]["cutoff"]) == len(moves)  # swapped: new versions


class _Unpicklable:
    """A store object that cannot be pickled (it holds a lock): only this process can use it."""

    def __init__(self, inner):
        self.inner, self.lock, self.calls = inner, threading.Lock(), 0

    def copy(self, keys, source, target):
        with self.lock:
            self.calls += 1
        return self.inner.copy(keys, source, target)

    def __getattr__(self, name):
        if name in ("inner", "in_process_only"):  # bound to this process only by being unpicklable
            raise AttributeError(name)
        return getattr(self.inner, name)


def test_store_objects_passed_to_the_api_are_the_ones_the_workers_use(tmp_path):
    cfg = shardmove.load_config(_demo(tmp_path, keys=300))
    mover = _Unpicklable(MemoryDataStore(uuid.uuid4().hex))
    _seed(mover, _map_rows(os.path.join(str(tmp_path / "d"), "shardmove.yaml")))
    with pytest.raises(shardmove.BadInput, match=r"^data_store: object does not implement the DataStore "
                                                 r"protocol \(missing "):
        shardmove.plan(cfg, data_store=object())
    with pytest.raises(shardmove.BadInput, match="data_store: the store's key_type is int64, the configuration's "
                                                 "string"):
        shardmove.plan(cfg, data_store=MemoryDataStore(uuid.uuid4().hex, KeyType.INT64))
    plan = shardmove.plan(cfg, data_store=mover)
    done = shardmove.run(cfg, plan, data_store=mover)
    assert done.exit_code == 0 and done.done == plan.move_count > 0
    assert mover.calls > 0  # the very object, not a copy
    assert mover.count("s3") == plan.move_count
    with pytest.raises(shardmove.BadInput, match=r"^data_store: the store object _Unpicklable cannot be pickled, "
                                                 r"and FnApiRunner with --direct_running_mode=multi_processing "
                                                 r"runs its workers in other processes"):
        shardmove.run(cfg, plan, data_store=mover, beam_args=["--direct_running_mode=multi_processing"])


def test_a_picklable_store_object_reaches_worker_processes_as_a_copy(tmp_path):
    """FnApiRunner with SDK workers in other processes: the object passed to the API is
    pickled there (configuration only) and does the work."""
    from pipeline.stores.sqlite import SqliteDataStore

    cfg = shardmove.load_config(_demo(tmp_path, keys=200))
    mover = SqliteDataStore(cfg.data_store["directory"], cfg.key_type)
    plan = shardmove.plan(cfg, data_store=mover)
    done = shardmove.run(cfg, plan, data_store=mover,
                         beam_args=["--direct_running_mode=multi_processing", "--direct_num_workers=1"])
    assert done.exit_code == 0 and done.done == plan.move_count > 0
    assert mover.count("s3") == plan.move_count
