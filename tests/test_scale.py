"""Scaling: no hot keys, retried and duplicated bundles, per-shard throttling.

- ``test_hot_key_*``: a migration where every key moves between ONE pair of
  shards still spreads over ``hash_buckets`` work groups; what Beam shuffles
  is a chunk or a pointer keyed by its group, never one element per key; swap
  batch ids are the same on every rerun.
- ``test_twice_*``: every stage's DoFn run twice over the same input (a
  retried bundle) and as two instances side by side (a duplicated bundle):
  the map, the records, the merged checkpoints and the summary equal those of
  a normal run, and no map row is written twice (a SQLite trigger counts).
- ``test_throttle_*``: per-shard caps and the adaptive controller, against a
  mover whose latency grows with the calls in flight (a fake for fault
  injection: it wraps the real store).
- ``test_window_*``: a chunk's calls run by a few pool tasks pulling from one
  queue, each call counted while it runs; a failing call stops the chunk's rest.
"""
import copy
import dataclasses
import os
import shutil
import concurrent.futures
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import apache_beam as beam
import pyarrow.parquet as pq
import pytest
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue

from shardmove import api
from pipeline import checkpoint as ckpt
from pipeline.config import load_config
from shardmove.executor import summarize
from shardmove.planner import load_manifest
from pipeline.stores.sqlite import SqliteMapStore
from transforms.throttle import ShardThrottles, ThrottleConfig
from transforms import execute as tx
from transforms.stages.copy import _CopyFn
from transforms.stages.load import _LoadWorkFn
from transforms.stages.swap import _SwapFn
from transforms.stages.verify import _VerifyFn
from transforms.plan import SPILL_PARTITION_BITS

from test_executor import install_write_witness, map_rows, quiet, records, write_counts

SUMMARY_KEYS = ("planned", "done", "failed", "states", "failures_by_reason", "done_by_verification", "complete")


def exec_spec(cfg, plan_dir, epoch=1, **kw):
    m = load_manifest(plan_dir)
    return tx.ExecSpec(plan_dir=plan_dir, plan_id=m["plan_id"], epoch=epoch, key_type=cfg.key_type,
                       map_store=dict(cfg.map_store), data_store=dict(cfg.data_store), options=dict(cfg.options),
                       groups=tuple((f["group"], f["rows"]) for f in m["files"]), **kw)


def load_chunks(spec):
    fn = _LoadWorkFn(spec)
    return [ch for g in spec.groups for ch in fn.process(g)]


# ------------------------------------------------------------ hot keys

class _ShuffleTaps:
    """Taps the input of every shuffle (Reshuffle, GroupByKey) of a pipeline
    before it runs, counting elements by value type and by work group."""

    def __init__(self):
        self.results = []

    def install(self, p):
        found = []

        class Visitor(beam.pipeline.PipelineVisitor):
            def __init__(self):
                self.stack = []

            def enter_composite_transform(self, node):
                if isinstance(node.transform, beam.Reshuffle) and not any(self.stack):
                    found.append((node.full_label, node.inputs[0], False))
                self.stack.append(isinstance(node.transform, beam.Reshuffle))

            def leave_composite_transform(self, node):
                self.stack.pop()

            def visit_transform(self, node):
                if isinstance(node.transform, beam.GroupByKey) and not any(self.stack):
                    found.append((node.full_label, node.inputs[0], True))

        p.visit(Visitor())
        for i, (label, pcoll, keyed) in enumerate(found):
            pcoll | f"ShuffleTap{i}" >> beam.Map(_tap, label, keyed)
        return [label for label, _p, _k in found]

    def wrap(self, real_run):
        def run(p):
            self.labels = self.install(p)
            result = real_run(p)
            from apache_beam.metrics.metric import MetricsFilter

            counts = {}
            for c in result.metrics().query(MetricsFilter().with_namespace("test_shuffle"))["counters"]:
                counts[c.key.metric.name] = counts.get(c.key.metric.name, 0) + (c.committed or c.attempted)
            self.results.append(counts)
            return result
        return run


def _tap(element, label, keyed):
    from apache_beam.metrics import Metrics

    value = element[1] if keyed else element
    Metrics.counter("test_shuffle", f"{label}|type|{type(value).__name__}").inc()
    if isinstance(value, tx.Chunk):
        Metrics.counter("test_shuffle", f"{label}|group|{value.gid}").inc()
        Metrics.counter("test_shuffle", f"{label}|keys").inc(len(value))


def test_hot_key_one_pair_spreads_over_buckets_and_shuffles_chunks(tmp_path, monkeypatch):
    import transforms.runner as runner

    info = api.create_demo_keyspace(str(tmp_path / "ks"), keys=2000, shards=1)  # s0 -> s0, s1: one pair
    buckets, batch = 8, 40
    cfg = load_config(info["config"]).with_options(hash_buckets=buckets, swap_batch_size=batch,
                                                  retry_base_delay="1ms")
    install_write_witness(cfg.map_store["path"])
    taps = _ShuffleTaps()
    monkeypatch.setattr(runner, "run_pipeline", taps.wrap(runner.run_pipeline))
    res = api.plan(cfg, out=quiet)
    m = res.manifest
    assert [(p["source"], p["target"]) for p in m["pairs"]] == [("s0", "s1")]
    rows = [f["rows"] for f in m["files"]]
    assert len(rows) == buckets and sum(rows) == m["moves"] > 500
    assert max(rows) < 1.5 * (sum(rows) / buckets)  # the pair's keys spread evenly over its buckets
    run = api.run(cfg, res.plan_dir, out=quiet)
    assert run.exit_code == 0 and run.summary["done"] == m["moves"]
    assert set(write_counts(cfg).values()) == {1}

    plan_counts, run_counts = taps.results
    # planning shuffles spill pointers (path, offset, length) keyed by hash partition or
    # work group: at most one per partition and per group and chunk, whatever the key count
    # (and beam.Create's reshuffle of its few inputs: pickled bytes)
    assert {k.split("|")[2] for k in plan_counts} <= {"tuple", "bytes"}, plan_counts
    assert sum(plan_counts.values()) <= 2 ** SPILL_PARTITION_BITS + 2 * buckets
    # execution shuffles chunks of <= swap_batch_size keys keyed by their group (and the
    # group ids themselves, once: beam.Create's reshuffle)
    n_chunks = sum(-(-r // batch) for r in rows)
    for k, n in run_counts.items():
        label, kind, what = k.split("|") if k.count("|") == 2 else (*k.split("|"), "")
        if kind == "type":
            assert what == "Chunk" or (label.startswith("LoadWork/") and n == buckets), (k, n)
    for label in ("StableInput",):
        assert run_counts[f"{label}|type|Chunk"] == n_chunks
        assert run_counts[f"{label}|keys"] == m["moves"]
        groups = {k.split("|")[2] for k in run_counts if k.startswith(f"{label}|group|")}
        assert len(groups) >= buckets

    # swap batches are deterministic: chunk i of a group is keys i*B..(i+1)*B-1 of its file,
    # on every load (a rerun after a crash, another worker)
    spec = exec_spec(cfg, res.plan_dir, retry_failed=True)
    with open(os.path.join(res.plan_dir, "moves", m["files"][0]["group"] + ".parquet"), "rb") as f:
        first = pq.read_table(f)["key"].to_pylist()
    shutil.rmtree(os.path.join(res.plan_dir, "checkpoints"))  # as if nothing had run
    a = [(c.batch_id, c.keys) for c in load_chunks(spec)]
    b = [(c.batch_id, c.keys) for c in load_chunks(spec)]
    assert a == b and len(a) == n_chunks
    mine = [keys for bid, keys in a if bid.startswith(m["files"][0]["group"] + "#")]
    assert mine == [first[i:i + batch] for i in range(0, len(first), batch)]


# ------------------------------------------------- retried / duplicated

@pytest.fixture(scope="module")
def twice_template(tmp_path_factory):
    d = tmp_path_factory.mktemp("twice") / "ks"
    api.create_demo_keyspace(str(d), keys=500, shards=4)
    return d


def _keyspace(template, where):
    d = where / "ks"
    shutil.copytree(template, d)
    cfg = load_config(str(d / "shardmove.yaml")).with_options(swap_batch_size=40, hash_buckets=2,
                                                              retry_base_delay="1ms")
    install_write_witness(cfg.map_store["path"])
    return cfg


def _observed(cfg, plan_dir):
    m = load_manifest(plan_dir)
    states = {}
    for f in m["files"]:
        t = ckpt.read_group(plan_dir, m["plan_id"], f["group"]).table
        for k, s, r, meth, a in zip(t["key"].to_pylist(), t["state"].to_pylist(), t["reason"].to_pylist(),
                                    t["verify_method"].to_pylist(), t["attempts"].to_pylist()):
            states[k] = (s, r, meth, a)
    s = summarize(plan_dir, m)
    return {
        "map": map_rows(cfg),
        "records": {sh: records(cfg, sh) for sh in sorted(cfg.known_shards())},
        "states": states,
        "summary": {k: s[k] for k in SUMMARY_KEYS},
        "writes": write_counts(cfg),
    }


def _emitted(outputs) -> list:
    """What a DoFn method emitted (Beam passes WindowedValues through unchanged)."""
    return [o.value if isinstance(o, WindowedValue) else o for o in (outputs or ())]


def _process(fn, ch) -> list:
    return _emitted(fn.process(copy.deepcopy(ch), window=GlobalWindow(), timestamp=MIN_TIMESTAMP))


def _by_batch(out) -> list:
    """One output per batch id, in batch id order; every output of a batch must agree."""
    seen: dict = {}
    for c in out:
        if c.batch_id in seen:
            assert seen[c.batch_id].states == c.states, c.batch_id
        seen[c.batch_id] = c
    return [seen[b] for b in sorted(seen)]


def _retried(fn_cls, spec, chunks):
    """One instance, each element processed twice (a retried bundle), then finish_bundle.
    The stages keep chunks in flight, so outputs of either attempt may come later."""
    fn = fn_cls(spec)
    fn.setup()
    fn.start_bundle()
    out = []
    for ch in chunks:
        out.extend(_process(fn, ch))
        out.extend(_process(fn, ch))
    out.extend(_emitted(fn.finish_bundle()))
    fn.teardown()
    return _by_batch(out)


def _side_by_side(fn_cls, spec, chunks):
    """Two instances on two threads, each processing the same bundle (a duplicated bundle)."""
    start = threading.Barrier(2)

    def bundle(fn):
        fn.setup()
        fn.start_bundle()
        start.wait()
        out = [o for ch in chunks for o in _process(fn, ch)]
        out.extend(_emitted(fn.finish_bundle()))
        fn.teardown()
        return _by_batch(out)

    with ThreadPoolExecutor(2) as ex:
        a, b = ex.map(bundle, [fn_cls(spec), fn_cls(spec)])
    assert [(c.batch_id, c.states) for c in a] == [(c.batch_id, c.states) for c in b]
    return a


def test_copy_guard_fails_closed_when_the_map_cannot_be_read(twice_template, tmp_path):
    """A retried bundle may follow its own swaps: without the guard's lookup, nothing is copied."""
    from pipeline.errors import TransientError

    cfg = _keyspace(twice_template, tmp_path).with_options(max_retries=1, retry_base_delay="1ms")
    plan_dir = api.plan(cfg, out=quiet).plan_dir
    spec = exec_spec(cfg, plan_dir)
    chunks = load_chunks(spec)
    fn = _CopyFn(spec)
    fn.setup()
    lookups, copies = [], []

    class MapDown:
        def lookup(self, keys):
            lookups.append(len(keys))
            raise TransientError("map store unreachable")

    class Recorder:
        keys_per_call = 0

        def copy(self, keys, source, target):
            copies.append(len(keys))
            return []

    fn.ctx.map, fn.ctx.data = MapDown(), Recorder()
    fn.start_bundle()
    with pytest.raises(TransientError):
        _process(fn, chunks[0])
    fn.teardown()
    assert len(lookups) == 2 and copies == []  # retried once, then the bundle fails; no copy


def test_twice_every_stage_retried_and_duplicated_changes_nothing(twice_template, tmp_path):
    ref_cfg = _keyspace(twice_template, tmp_path / "ref")
    ref_plan = api.plan(ref_cfg, out=quiet).plan_dir
    assert api.run(ref_cfg, ref_plan, out=quiet).exit_code == 0
    reference = _observed(ref_cfg, ref_plan)
    assert set(reference["writes"].values()) == {1}

    cfg = _keyspace(twice_template, tmp_path / "twice")
    plan_dir = api.plan(cfg, out=quiet).plan_dir
    spec = exec_spec(cfg, plan_dir)
    SqliteMapStore(cfg.map_store["path"], cfg.key_type).claim_run(spec.plan_id, spec.epoch, (0, 255), "test", 600,
                                                                   time.time())
    chunks = load_chunks(spec)
    assert sum(len(c) for c in chunks) == reference["summary"]["planned"]
    for fn_cls in (_CopyFn, _VerifyFn, _SwapFn):
        out = _retried(fn_cls, spec, chunks)
        out2 = _side_by_side(fn_cls, spec, chunks)
        if fn_cls is not _SwapFn:
            assert [(c.batch_id, c.states) for c in out] == [(c.batch_id, c.states) for c in out2]
            chunks = out
    got = _observed(cfg, plan_dir)
    assert got["writes"] == reference["writes"]  # every moved key's map row written exactly once
    for k in ("map", "records", "states", "summary"):
        assert got[k] == reference[k], k


def test_twice_whole_pipeline_with_every_bundle_replayed(twice_template, tmp_path):
    """Beam's own bundle replay (``--direct_runner_bundle_repeat=1``): every bundle of
    every stage runs twice end to end, the first run's outputs discarded."""
    ref_cfg = _keyspace(twice_template, tmp_path / "ref")
    ref_plan = api.plan(ref_cfg, out=quiet).plan_dir
    api.run(ref_cfg, ref_plan, out=quiet)
    reference = _observed(ref_cfg, ref_plan)
    cfg = _keyspace(twice_template, tmp_path / "twice")
    args = ["--direct_runner_bundle_repeat=1"]
    plan = api.plan(cfg, beam_args=args, out=quiet)
    assert plan.plan_id == load_manifest(ref_plan)["plan_id"]
    assert [f["sha256"] for f in plan.manifest["files"]] == [f["sha256"] for f in load_manifest(ref_plan)["files"]]
    run = api.run(cfg, plan.plan_dir, beam_args=args, out=quiet)
    assert run.exit_code == 0
    got = _observed(cfg, plan.plan_dir)
    assert got["writes"] == reference["writes"]
    for k in ("map", "records", "summary"):
        assert got[k] == reference[k], k
    assert {k: v[:2] for k, v in got["states"].items()} == {k: v[:2] for k, v in reference["states"].items()}


# ------------------------------------------------------------ throttling

class LoadSensitive:
    """Fault injection only: a mover whose latency grows with the calls in flight
    above ``knee`` while ``loaded``; wraps a real store (or nothing)."""

    def __init__(self, inner=None, base_s=0.004, knee=4):
        self._inner = inner
        self.base_s, self.knee = base_s, knee
        self.loaded = True
        self.keys_per_call = 1
        self._lock = threading.Lock()
        self.in_flight = 0
        self.peak = 0

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def call(self):
        with self._lock:
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
            n = self.in_flight
        time.sleep(self.base_s * (1 + (max(0, n - self.knee) / self.knee if self.loaded else 0)))
        with self._lock:
            self.in_flight -= 1

    def copy(self, keys, source, target):
        self.call()
        return self._inner.copy(keys, source, target)


def _drive(throttles, store, threads, seconds, shards=("s0",)):
    """``threads`` callers hammering ``store`` through ``throttles`` for ``seconds``;
    returns the peak of calls in flight observed every 50 ms."""
    stop = threading.Event()
    samples = []

    def caller():
        while not stop.is_set():
            permit = throttles.acquire(shards, 1)
            try:
                store.call()
            finally:
                throttles.release(permit, True)

    ts = [threading.Thread(target=caller, daemon=True) for _ in range(threads)]
    for t in ts:
        t.start()
    t0 = time.time()
    while time.time() - t0 < seconds:
        time.sleep(0.05)
        samples.append(store.in_flight)
    stop.set()
    for t in ts:
        t.join()
    return samples


def test_throttle_backs_off_when_latency_rises_and_ramps_up_when_load_drops():
    cap = 24
    throttles = ShardThrottles(ThrottleConfig(max_in_flight=cap))
    store = LoadSensitive(base_s=0.005, knee=4)
    loaded = _drive(throttles, store, threads=cap, seconds=2.5)
    lim = throttles.shard("s0")
    assert lim.backoffs >= 1 and lim.min_limit_seen < cap / 2
    tail = loaded[len(loaded) // 2:]
    assert max(tail) < cap * 0.75  # in flight dropped: latency at 2x is reached near 8 calls
    assert sum(tail) / len(tail) < 14
    low = lim.limit
    store.loaded = False  # the load drops: latency is flat again
    recovered = _drive(throttles, store, threads=cap, seconds=3.0)
    assert lim.limit > low and lim.limit >= cap * 0.75, throttles.snapshot()
    assert max(recovered[len(recovered) // 2:]) >= cap * 0.75


def test_throttle_caps_in_flight_and_keys_per_second():
    throttles = ShardThrottles(ThrottleConfig(max_in_flight=3, adaptive=False))
    store = LoadSensitive(base_s=0.01, knee=100)
    samples = _drive(throttles, store, threads=10, seconds=0.6, shards=("s0", "s1"))
    assert store.peak == 3 and max(samples) <= 3  # a call holds a slot on both of its shards

    rate = 400.0
    throttles = ShardThrottles(ThrottleConfig(max_keys_per_s=rate, adaptive=False))
    waited, n, t0 = 0.0, 0, time.monotonic()
    while time.monotonic() - t0 < 0.5:
        p = throttles.acquire(["s0"], 20)
        throttles.release(p, True)
        waited += p.waited_s
        n += 20
    elapsed = time.monotonic() - t0
    assert n <= rate * elapsed + 20 + 1  # one call's burst at most
    assert waited > 0.3


def test_window_runs_a_chunks_calls_on_a_few_pool_tasks_counting_each_call():
    from transforms.stages.common import StageMetrics
    from transforms.stages.window import Window

    window = Window("copy", 2, StageMetrics("copy"))
    pool = ThreadPoolExecutor(max_workers=4)
    seen, lock = [], threading.Lock()
    outstanding = []

    def call(x):
        with lock:
            seen.append(x)
            outstanding.append(window._outstanding_calls)
        time.sleep(0.001)
        return x * 2

    batch = window.submit_calls(pool, call, [(i,) for i in range(50)], workers=4)
    assert len(batch.futures) == 4  # O(workers) futures, not one per call
    for f in batch.futures:
        f.result()
    assert batch.results == [2 * i for i in range(50)]  # in call order
    assert sorted(seen) == list(range(50)) and window._outstanding_calls == 0
    assert max(outstanding) <= 50 and min(outstanding) >= 1  # each call counted until it ends

    # a failing call: its task's future raises, no further call of the chunk starts,
    # and the calls never started are no longer outstanding
    started = []

    def failing(x):
        started.append(x)
        if x == 3:
            raise RuntimeError("boom")
        time.sleep(0.002)
        return x

    batch = window.submit_calls(pool, failing, [(i,) for i in range(200)], workers=2)
    errors = []
    for f in batch.futures:
        try:
            f.result()
        except RuntimeError as e:
            errors.append(e)
    assert len(errors) == 1 and len(started) < 200
    deadline = time.monotonic() + 5
    while window._outstanding_calls and time.monotonic() < deadline:
        time.sleep(0.01)  # the last task's done-callback settles the count
    assert window._outstanding_calls == 0

    # the window closed (teardown) with calls left: the tasks stop, and their futures say the
    # chunk's results are incomplete (CancelledError) instead of succeeding with holes in them
    window2 = Window("copy", 2, StageMetrics("copy"))
    window2.start_bundle()

    def slow(x):
        time.sleep(0.002)
        if x == 5:
            window2.close()
        return x

    batch = window2.submit_calls(pool, slow, [(i,) for i in range(100)], workers=2)
    with pytest.raises(concurrent.futures.CancelledError):
        for f in batch.futures:
            f.result()
    assert None in batch.results
    pool.shutdown(wait=True)


class _Counter:
    def __init__(self):
        self.total = 0

    def inc(self, n=1):
        self.total += n


def test_throttle_in_the_copy_stage_backs_off_a_slow_shard(tmp_path):
    info = api.create_demo_keyspace(str(tmp_path / "ks"), keys=1600, shards=1)  # ~800 moves s0 -> s1
    cfg = load_config(info["config"]).with_options(copy_concurrency=16, shard_max_in_flight=16,
                                                  swap_batch_size=5000, hash_buckets=1, retry_base_delay="1ms")
    plan_dir = api.plan(cfg, out=quiet).plan_dir
    spec = exec_spec(cfg, plan_dir)
    [chunk] = load_chunks(spec)
    fn = _CopyFn(spec)
    fn.setup()
    fn.ctx.data = LoadSensitive(fn.ctx.data, base_s=0.008, knee=2)  # every call waits, more so under load
    fn.ctx.metrics.throttled_ms = _Counter()  # read back what drain() reports (no runner, no metrics context)
    fn.start_bundle()
    [out] = _process(fn, chunk) + _emitted(fn.finish_bundle())  # emitted once its calls finished
    snap = fn.ctx.throttles.snapshot()
    fn.teardown()
    assert set(out.states) == {2}, (sorted(set(out.states)), set(out.reason))  # Copied
    assert snap["s1"]["backoffs"] >= 1 and snap["s1"]["min_limit"] < 16, (snap, fn.ctx.throttles.shard("s1").history)
    assert fn.ctx.data.peak <= 16
    assert fn.ctx.metrics.throttled_ms.total > 0  # callers waited for the backed-off shard


def test_throttle_keys_per_s_cap_reports_throttled_time_in_summary(twice_template, tmp_path):
    rate = 30
    cfg = _keyspace(twice_template, tmp_path).with_options(shard_max_keys_per_s=rate)
    plan_dir = api.plan(cfg, out=quiet).plan_dir
    run = api.run(cfg, plan_dir, out=quiet)
    assert run.exit_code == 0
    moves = run.summary["planned"]
    # every move lands on the new shard: >= moves / rate seconds, minus the first call's burst
    assert run.summary["elapsed_s"] >= (moves - 40) / rate
    assert run.summary["throttled_s"] > 2
    assert run.metrics["throttled_ms"] == pytest.approx(run.summary["throttled_s"] * 1000, abs=1)
    # what Dataflow's autoscaler reads: whole seconds (each DoFn instance carries its fraction)
    assert int(run.summary["throttled_s"]) - 1 <= run.metrics["cumulativeThrottlingSeconds"] <= run.summary["throttled_s"]
