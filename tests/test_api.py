"""The Python API (``import shardmove``): typed results, no printing, in-memory inputs that
plan exactly as the same rows in a Parquet file, moves in CONTRACTS order, progress
callbacks and cancellation -- and the README's example, run as written."""
import os
import re
import sqlite3
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import shardmove
from pipeline import plancore as core

README = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    d = tmp_path_factory.mktemp("api")
    info = shardmove.create_demo_keyspace(str(d / "ks"), keys=3000, shards=4)
    cfg = shardmove.load_config(info["config"]).with_options(progress_interval="100ms",
                                                             checkpoint_flush_interval="50ms", hash_buckets=2)
    con = sqlite3.connect(cfg.map_store["path"])
    rows = list(con.execute("SELECT key, shard_id FROM shard_map ORDER BY key"))
    con.close()
    return cfg, rows, d


def _table(rows):
    return pa.table({"key": [k for k, _ in rows], "shard_id": [s for _, s in rows]})


def _snapshot_dirs(cfg):
    d = os.path.join(cfg.work_dir, "snapshots")
    return sorted(n for n in os.listdir(d) if not n.startswith(".")) if os.path.isdir(d) else []


def test_in_memory_inputs_plan_exactly_as_the_parquet_file(demo, tmp_path, capsys):
    """A table, a record batch reader (in batches that do not match segment_size) and an
    iterable of pairs give the plan id of the same rows in a Parquet file; nothing is printed."""
    cfg, rows, _d = demo
    path = tmp_path / "current.parquet"
    pq.write_table(_table(rows), path)
    ids = {"parquet": shardmove.plan(cfg, snapshot=str(path), dry_run=True).id}
    reversed_rows = list(reversed(rows))  # row order is not part of the identity
    reader = pa.RecordBatchReader.from_batches(_table(reversed_rows).schema,
                                               _table(reversed_rows).to_batches(max_chunksize=777))
    for name, given in (("table", _table(rows)), ("reader", reader), ("pairs", iter(rows))):
        ids[name] = shardmove.plan(cfg, snapshot=given, dry_run=True).id
    assert len(set(ids.values())) == 1, ids
    assert capsys.readouterr().out == ""
    assert _snapshot_dirs(cfg) == []  # dry runs keep nothing, in-memory snapshots included


def test_in_memory_bad_input_is_refused_like_the_parquet_file(demo, tmp_path):
    cfg, rows, _d = demo
    bad = rows[:50] + [("", "s0"), ("", "s1")]  # empty string keys are invalid
    path = tmp_path / "bad.parquet"
    pq.write_table(_table(bad), path)
    with pytest.raises(shardmove.BadInput) as from_file:
        shardmove.plan(cfg, snapshot=str(path), dry_run=True)
    with pytest.raises(shardmove.BadInput) as from_memory:
        shardmove.plan(cfg, snapshot=_table(bad))
    assert str(from_memory.value) == str(from_file.value) == (
        "plan: 2 keys in the snapshot cannot be represented as key_type string (or are empty)")
    dup = rows[:50] + rows[:3]
    with pytest.raises(shardmove.BadInput, match=r"^plan: 3 duplicate keys in the snapshot$"):
        shardmove.plan(cfg, snapshot=iter(dup))
    with pytest.raises(shardmove.BadInput, match=r"lacks the key and shard_id columns"):
        shardmove.plan(cfg, snapshot=pa.table({"k": ["a"], "shard_id": ["s0"]}))
    with pytest.raises(shardmove.BadInput, match=r"row 2 is not a \(key, shard_id\)"):
        shardmove.plan(cfg, snapshot=[("a", "s0"), ("b",)])
    with pytest.raises(shardmove.BadInput, match=r"^snapshot: 1 rows have a shard_id that is not text$"):
        shardmove.plan(cfg, snapshot=[("a", "s0"), ("b", 7)])
    with pytest.raises(shardmove.BadInput, match=r"^snapshot: 1 rows have a version that is not a 64-bit integer$"):
        shardmove.plan(cfg, snapshot=[("a", "s0", 1), ("b", "s1", "two")])
    assert _snapshot_dirs(cfg) == []  # refused: nothing left behind
    for e in (from_file.value, from_memory.value):
        assert not any(k in str(e) for k, _ in rows[:50])


def test_plan_moves_are_the_manifest_in_contracts_order(demo):
    cfg, rows, _d = demo
    plan = shardmove.plan(cfg, snapshot=_table(rows))
    assert plan.plan_dir and len(_snapshot_dirs(cfg)) == 1
    pairs = plan.pairs()
    assert sum(p.moves for p in pairs) == plan.move_count > 0
    assert [(p.source, p.target) for p in pairs] == sorted((p.source, p.target) for p in pairs)
    batches = list(plan.moves(batch_size=100))
    assert all(b.num_rows <= 100 for b in batches)
    t = pa.Table.from_batches(batches)
    assert t.num_rows == plan.move_count and t.schema.names == ["key", "source", "target", "key_hash"]
    order = list(zip(t["source"].to_pylist(), t["target"].to_pylist(), t["key_hash"].to_pylist(),
                     t["key"].to_pylist()))
    assert order == sorted(order, key=lambda r: (r[0].encode(), r[1].encode(), r[2], r[3]))
    # the same moves as the reference plan of the same rows on the same ring
    from shardmove.planner import build_ring

    ref = core.reference_plan([(k.encode(), s) for k, s in rows], ring=build_ring(cfg))
    assert order == [(s, d, h, k) for k, s, d, h in ref]
    with pytest.raises(shardmove.BadInput, match="a dry run keeps no moves"):
        next(shardmove.plan(cfg, snapshot=_table(rows), dry_run=True).moves())


def test_cancel_before_and_during_a_run_then_resume(demo, capsys):
    cfg, rows, _d = demo
    plan = shardmove.plan(cfg, snapshot=_table(rows))
    stop = threading.Event()
    stop.set()
    early = shardmove.run(cfg, plan, cancel=stop)  # cancelled before it took its lease: nothing done
    assert (early.exit_code, early.interrupted, early.cancelled, early.done) == (130, True, True, 0)
    assert shardmove.status(plan).state == "planned"
    stop.clear()
    events = []

    def progress(ev):
        events.append(ev)
        stop.set()
        raise RuntimeError("a failing callback never stops the run")

    first = shardmove.run(cfg, plan, progress=progress, cancel=stop)
    assert first.cancelled and first.interrupted and first.exit_code == 130
    assert events and all(set(ev) >= {"copied", "verified", "swapped", "failed", "total", "epoch"} for ev in events)
    st = shardmove.status(plan.plan_dir)
    assert st.state in ("stopped", "complete") and st.exit_code in (6, 0)
    rest = shardmove.run(cfg, plan.id)  # a plan id resolves under the config's work dir
    assert rest.exit_code == 0 and rest.done == plan.move_count and rest.state == "complete"
    assert not rest.cancelled and shardmove.status(plan, config=cfg).exit_code == 0
    assert capsys.readouterr().out == ""  # the API never prints


def test_readme_example_runs_as_written(tmp_path, monkeypatch, capsys):
    text = open(README, encoding="utf-8").read()
    m = re.search(r"<!-- api-example -->\n```python\n(.*?)```", text, re.S)
    assert m, "the README's API example is missing"
    monkeypatch.chdir(tmp_path)
    exec(compile(m.group(1), "README.md:api-example", "exec"), {"__name__": "readme_example"})
    out = capsys.readouterr().out.splitlines()
    assert out[-1].startswith("complete ") and re.fullmatch(r"[0-9a-f]{12} \d+ .*", out[0])


def test_run_metrics_gauges_and_durations(tmp_path):
    """The guide's metrics, as Beam reports them for one run (RunSummary.metrics): the
    counters once per key, the in-flight gauges within the configured concurrency, and the
    duration distributions -- copy_ms per store call, swap_batch_ms per swap batch."""
    import dataclasses
    import math

    info = shardmove.create_demo_keyspace(str(tmp_path / "ks"), keys=1200, shards=4)
    cfg = shardmove.load_config(info["config"]).with_options(copy_concurrency=4, verify_concurrency=3,
                                                             swap_batch_size=50, hash_buckets=2)
    cfg = dataclasses.replace(cfg, faults={"copy": {"latency_ms": 5, "keys_per_call": 1}})
    plan = shardmove.plan(cfg)
    res = shardmove.run(cfg, plan)
    m, n = res.metrics, plan.move_count
    assert res.exit_code == 0 and n > 0
    for counter in ("planned", "copied", "verified", "swapped"):
        assert m[counter] == n, (counter, m[counter], n)  # once per key
    assert m.get("failed", 0) == 0
    assert 2 <= m["active_copy"] <= 4  # the copy stage used its concurrency, never more
    assert 1 <= m["active_verify"] <= 3
    copy = m["copy_ms"]
    assert copy["count"] == n and copy["min"] >= 5  # one store call per key here, each >= the injected 5 ms
    assert m["verify_ms"]["count"] >= 1 and m["verify_ms"]["min"] >= 0
    batches = sum(math.ceil(f["rows"] / 50) for f in plan.manifest["files"])
    assert m["swap_batch_ms"]["count"] >= batches and m["swap_batch_ms"]["sum"] >= m["swap_batch_ms"]["max"] > 0
    assert res.summary["metrics_this_run"]["copy_ms"]["count"] == n  # kept in summary.json too


def test_dry_run_hash_sampling_reports_missing_records_and_bytes(tmp_path):
    """``plan --dry-run --sample-hashes N``: N seeded moves read at their sources; a record
    deleted from its source shows as missing, with its shard; bytes estimate the targets'
    growth; nothing is copied or committed; the same seed picks the same sample."""
    info = shardmove.create_demo_keyspace(str(tmp_path / "ks"), keys=1500, shards=3)
    cfg = shardmove.load_config(info["config"])
    everything = shardmove.plan(cfg, dry_run=True, sample_hashes=10**6).manifest["sample"]
    assert everything["sampled"] == everything["found"] == everything["moves"] > 0
    assert everything["missing"] == everything["unreadable"] == 0 and everything["bytes_found"] > 0
    # delete one moving key's record at its source: the full sample finds it missing
    committed = shardmove.plan(cfg)
    victim = next(iter(committed.moves())).slice(0, 1)
    key, source = victim["key"][0].as_py(), victim["source"][0].as_py()
    from pipeline.stores import open_data_store

    ds = open_data_store(cfg)
    assert ds.delete([key], source) == 1
    before = sorted(os.listdir(os.path.join(cfg.work_dir, "plans")))
    r = run_cli_plan(info["config"], "--dry-run", "--sample-hashes", "100000")
    assert r.returncode == 0, r.stderr
    assert f"sample: {everything['moves']} of {everything['moves']} moves read at their source (seed 0): " \
           f"{everything['moves'] - 1} found" in r.stdout
    assert f"1 records missing at their source ({source}: 1)" in r.stdout
    assert key.decode() not in r.stdout + r.stderr
    assert sorted(os.listdir(os.path.join(cfg.work_dir, "plans"))) == before  # nothing committed
    seeded = cfg.with_options(sample_seed=5)
    a = shardmove.plan(seeded, dry_run=True, sample_hashes=20).manifest["sample"]
    b = shardmove.plan(seeded, dry_run=True, sample_hashes=20).manifest["sample"]
    assert a == b and a["sampled"] == 20 and a["seed"] == 5
    with pytest.raises(shardmove.BadInput, match="needs --dry-run"):
        shardmove.plan(cfg, sample_hashes=5)
    # the catch-up path takes the flag too: refused without --dry-run, nothing committed
    before = sorted(os.listdir(os.path.join(cfg.work_dir, "plans")))
    r = run_cli_plan(info["config"], "--since", committed.id, "--sample-hashes", "5")
    assert r.returncode == 2 and "needs --dry-run" in r.stderr, r.stderr
    assert sorted(os.listdir(os.path.join(cfg.work_dir, "plans"))) == before
    r = run_cli_plan(info["config"], "--since", committed.id, "--dry-run", "--sample-hashes", "5")
    assert r.returncode == 0 and "sample: " in r.stdout, r.stdout + r.stderr


def run_cli_plan(config, *args):
    from conftest import run_cli

    return run_cli("plan", "--config", config, *args)


def test_the_public_names_are_the_api_whatever_was_imported_before():
    """``shardmove.validate`` (and every public name) is the API's function even after the
    application's own modules were imported: no submodule shadows a public name."""
    import importlib
    import pkgutil

    for mod in pkgutil.iter_modules(shardmove.__path__):
        importlib.import_module(f"shardmove.{mod.name}")
    from shardmove import api

    for name in shardmove.__all__:
        assert getattr(shardmove, name) is getattr(api, name), name
    assert callable(shardmove.validate) and shardmove.validate is api.validate


def test_the_api_prints_nothing_and_hands_its_warnings_to_out(tmp_path, capfd):
    """An unsafe option's warning goes to the caller's ``out``, not to stderr; a bad progress
    mode is refused before anything is read."""
    info = shardmove.create_demo_keyspace(str(tmp_path / "ks"), keys=400, shards=2)
    cfg = shardmove.load_config(info["config"]).with_options(force_swap_on_verification_failure=True)
    with pytest.raises(shardmove.BadInput, match="progress: expected one of"):
        shardmove.plan(cfg, progress_output="sometimes")
    assert not os.path.exists(os.path.join(cfg.work_dir, "snapshots"))  # nothing was read or written
    plan = shardmove.plan(cfg)
    lines = []
    res = shardmove.run(cfg, plan, out=lines.append)
    assert res.exit_code == 0
    assert any(l.startswith("warning: force_swap_on_verification_failure is on") for l in lines), lines
    captured = capfd.readouterr()
    assert "warning: force_swap" not in captured.err and captured.out == ""


def test_stages_run_with_quick_gil_handoffs_and_the_callers_interval_comes_back(demo, monkeypatch):
    """While executor stages are set up in this process, Python's switch interval is at most
    0.5 ms (the serial swap waits less for the GIL); a run hands the caller's interval back,
    and a caller's shorter interval is never raised."""
    import sys

    from transforms import runner
    from transforms.stages import base

    cfg, rows, _d = demo
    seen = []
    real_hold = base.hold_quick_handoffs

    def hold():  # the interval each stage's setup leaves in force (sampled at a fixed point,
        real_hold()  # not by progress events, which may fall before or after the stages)
        seen.append(sys.getswitchinterval())

    monkeypatch.setattr(base, "hold_quick_handoffs", hold)
    before = sys.getswitchinterval()
    try:
        sys.setswitchinterval(0.004)
        plan = shardmove.plan(cfg, snapshot=_table(rows[:1500]))
        res = shardmove.run(cfg, plan)
        assert res.exit_code == 0
        assert seen and all(v == pytest.approx(runner.STAGE_SWITCH_INTERVAL_S, abs=2e-6) for v in seen)
        assert sys.getswitchinterval() == pytest.approx(0.004, abs=2e-6)
        runner.hold_quick_handoffs()
        runner.hold_quick_handoffs()
        assert sys.getswitchinterval() == pytest.approx(runner.STAGE_SWITCH_INTERVAL_S, abs=2e-6)
        runner.release_quick_handoffs()
        assert sys.getswitchinterval() == pytest.approx(runner.STAGE_SWITCH_INTERVAL_S, abs=2e-6)
        runner.release_quick_handoffs()
        runner.release_quick_handoffs()  # one too many: ignored
        assert sys.getswitchinterval() == pytest.approx(0.004, abs=2e-6)
        sys.setswitchinterval(0.0001)
        runner.hold_quick_handoffs()
        assert sys.getswitchinterval() == pytest.approx(0.0001, abs=2e-6)
        runner.release_quick_handoffs()
    finally:
        sys.setswitchinterval(before)
