"""Each public PTransform of the executor, tested the Beam way: a TestPipeline on the
in-memory engine (FnApiRunner) with ``assert_that`` on what the transform emits, against
a real SQLite keyspace (the demo's), then its side effects read back from the stores
and the checkpoints."""
from __future__ import annotations

import os
import sqlite3
import time

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to, is_empty

from pipeline import states as S
from pipeline.config import load_config
from pipeline.stores.sqlite import SqliteMapStore
from shardmove import api
from shardmove.executor import summarize
from shardmove.planner import load_manifest
from transforms.execute import CopyKeys, ExecSpec, LoadWork, SwapBatches, VerifyCopies

from test_executor import quiet


def _pipeline() -> BeamTestPipeline:
    return BeamTestPipeline(runner="FnApiRunner")  # the in-memory engine, pinned: nothing reaches for Prism


@pytest.fixture
def planned(tmp_path):
    """A planned demo keyspace (~1/3 of 300 keys move to the new shard) and its run spec."""
    info = api.create_demo_keyspace(str(tmp_path / "ks"), keys=300, shards=2)
    cfg = load_config(info["config"]).with_options(swap_batch_size=40, hash_buckets=2, retry_base_delay="1ms",
                                                  checkpoint_flush_interval="50ms")
    plan_dir = api.plan(cfg, out=quiet).plan_dir
    m = load_manifest(plan_dir)
    spec = ExecSpec(plan_dir=plan_dir, plan_id=m["plan_id"], epoch=1, key_type=cfg.key_type,
                    map_store=dict(cfg.map_store), data_store=dict(cfg.data_store), options=cfg.run_options,
                    groups=tuple((f["group"], f["rows"]) for f in m["files"]))
    return cfg, spec, m


def _chunk_shape(ch):
    return ch.batch_id, len(ch), tuple(sorted(set(ch.states)))


def _expected_chunks(spec, m, states):
    B = spec.options.swap_batch_size
    return [(f"{f['group']}#{i:06d}", min(B, f["rows"] - i * B), states)
            for f in m["files"] for i in range((f["rows"] + B - 1) // B)]


def _states(spec, m) -> dict:
    return summarize(spec.plan_dir, m)["states"]


def test_load_work_cuts_each_group_into_plan_order_chunks(planned):
    cfg, spec, m = planned
    assert m["moves"] > 0
    with _pipeline() as p:
        chunks = p | LoadWork(spec)
        assert_that(chunks | beam.Map(_chunk_shape),
                    equal_to(_expected_chunks(spec, m, (int(S.State.PLANNED),))))
    assert _states(spec, m)["planned"] == m["moves"]  # reads only: no transition recorded


def test_copy_keys_copies_every_chunk_and_emits_it_copied(planned):
    cfg, spec, m = planned
    with _pipeline() as p:
        copied = p | LoadWork(spec) | CopyKeys(spec)
        assert_that(copied | beam.Map(_chunk_shape), equal_to(_expected_chunks(spec, m, (int(S.State.COPIED),))))
    # the side effect: every moving key's record is on its target shard, the map unchanged
    keys_on_target = _target_rows(cfg)
    assert keys_on_target == m["moves"]
    assert _states(spec, m)["copied"] == m["moves"]
    # idempotent: copying again (a retried bundle) emits the same and changes nothing
    with _pipeline() as p:
        again = p | LoadWork(spec) | CopyKeys(spec)
        assert_that(again | beam.Map(_chunk_shape), equal_to(_expected_chunks(spec, m, (int(S.State.COPIED),))))
    assert _target_rows(cfg) == keys_on_target


def test_verify_copies_emits_chunks_verified(planned):
    cfg, spec, m = planned
    with _pipeline() as p:
        verified = p | LoadWork(spec) | CopyKeys(spec) | VerifyCopies(spec)
        assert_that(verified | beam.Map(_chunk_shape),
                    equal_to(_expected_chunks(spec, m, (int(S.State.VERIFIED),))))
        assert_that(verified | "Methods" >> beam.FlatMap(lambda ch: ch.method) | beam.Distinct(),
                    equal_to([S.VERIFY_HASH]), label="hash verified")
    assert _states(spec, m)["verified"] == m["moves"]


def test_swap_batches_swaps_the_map_and_emits_nothing(planned):
    cfg, spec, m = planned
    SqliteMapStore(cfg.map_store["path"], cfg.key_type).claim_run(spec.plan_id, spec.epoch, (0, 255), "test", 600,
                                                                   time.time())
    before = _map_rows(cfg)
    with _pipeline() as p:
        out = p | LoadWork(spec) | CopyKeys(spec) | VerifyCopies(spec) | SwapBatches(spec)
        assert_that(out, is_empty())
    s = summarize(spec.plan_dir, m)
    assert s["done"] == m["moves"] and s["failed"] == 0
    after = _map_rows(cfg)
    assert sum(1 for k in after if after[k] != before[k]) == m["moves"]
    # idempotent: a second pass finds every key Done and changes nothing
    with _pipeline() as p:
        out = p | LoadWork(spec) | CopyKeys(spec) | VerifyCopies(spec) | SwapBatches(spec)
        assert_that(out, is_empty())
    assert _map_rows(cfg) == after


def _map_rows(cfg) -> dict:
    with sqlite3.connect(cfg.map_store["path"]) as con:
        return dict(con.execute("SELECT key, shard_id FROM shard_map").fetchall())


def _target_rows(cfg) -> int:
    new = cfg.target_shards[-1].id  # the demo adds one shard: every move lands there
    path = os.path.join(cfg.data_store["directory"], f"{new}.sqlite")
    with sqlite3.connect(path) as con:
        return con.execute("SELECT count(*) FROM records").fetchone()[0]
