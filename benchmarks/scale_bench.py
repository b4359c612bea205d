#!/usr/bin/env python
"""Scaling model inputs: per-worker throughput of the planner and the executor.

    .venv/bin/python benchmarks/scale_bench.py [--only plan,run,io] [--plan-keys 1000000,10000000]
        [--run-keys 20000,100000,400000] [--concurrency 1,4,16,64] [--latency-ms 10] [--repeat 1]

Everything runs on the default engine (FnApiRunner in memory: one worker
process), each measurement in its OWN child process so its peak RSS is its
own.  What a Dataflow/Flink worker does is the same work on its share of the
groups, so these are per-worker figures; multi-machine figures are MODELLED
from them (see README "Scaling out").

(plan) ``plan_keys_per_s_<N>``: ``shardmove.planner.make_plan`` end to end on a
       snapshot of N keys (16 shards -> 17; the snapshot is built and cached
       by benchmarks/plan_bench.py's builder), CPU seconds and peak RSS.
(run)  ``run_keys_per_s_<K>``: ``shardmove.api.run`` on a demo keyspace of K
       keys on 4 SQLite shards whose target adds a 5th (~K/5 keys move),
       planned beforehand; swap_batch_size 500, hash_buckets 16, verification
       hash.  Also the p50 of one swap batch and of one copy call, and RSS.
(io)   ``io_copy_keys_per_s_c<C>``: the same run with the simulated-latency
       mover (``faults: {copy: {latency_ms: L, keys_per_call: 1}}``) at
       copy_concurrency C: keys copied / seconds in the copy stage (the
       ``copy_busy_ms`` metric: wall time during which the copy stage had
       chunks in flight); ``io_bound_c<C>`` = C x 1000 / L keys/s, the ceiling of one
       worker's copy stage; ``io_fraction_c<C>`` = measured / bound.  Four
       variants: a mover that only sleeps (the executor's own scaling) and the
       SQLite mover under the latency (``_sqlite``: SQLite's one write
       transaction per key joins in), each with adaptive throttling on (the
       default) and off (``_fixed``).  The number of moved keys grows with C
       (a phased window of the same keyspace), so every run lasts long enough
       to measure.

Figures are ``name: value`` lines; progress notes go to stderr as ``# ...``.
"""
from __future__ import annotations

import time

_T_START = time.perf_counter()

import argparse
import json
import os
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in (HERE, ROOT):
    if p not in sys.path:
        sys.path.insert(0, p)

from common import bench_root, child_result, emit, install_sleep_mover, run_child  # noqa: E402


def note(msg: str) -> None:
    print(f"# {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ children

def child_plan(snapshot: str, out: str) -> None:
    import apache_beam  # noqa: F401  (import cost is not planning time)

    import transforms.plan  # noqa: F401
    from plan_bench import HASH_BUCKETS, SOURCE_SHARDS, TARGET_SHARDS
    from pipeline.config import load_config
    from shardmove.planner import make_plan

    raw = {
        "work_dir": os.path.join(out, "work"),
        "map_store": {"kind": "sqlite", "path": os.path.join(out, "unused.sqlite")},
        "current_shards": SOURCE_SHARDS,
        "target": {"profile": "native", "shards": [{"id": s} for s in TARGET_SHARDS]},
        "hash_buckets": HASH_BUCKETS,
    }
    t0, c0 = time.perf_counter(), time.process_time()
    res = make_plan(load_config(None, raw=raw), snapshot=snapshot, out=lambda _l: None)
    child_result({"elapsed_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
                  "rows": res.manifest["keys_examined"], "moves": res.manifest["moves"],
                  "files": len(res.manifest["files"])})


def child_run(cfgpath: str, plan_dir: str, faults: str, mover: str = "sqlite") -> None:
    import dataclasses

    import apache_beam  # noqa: F401

    from shardmove import api
    from pipeline.config import load_config

    if mover == "sleep":
        install_sleep_mover()
    cfg = dataclasses.replace(load_config(cfgpath), faults=json.loads(faults))
    t0, c0 = time.perf_counter(), time.process_time()
    res = api.run(cfg, plan_dir, out=lambda _l: None)
    elapsed = time.perf_counter() - t0
    s = res.summary
    child_result({"elapsed_s": elapsed, "cpu_s": time.process_time() - c0, "done": s["done"],
                  "failed": s["failed"], "exit": res.exit_code, "timings": s.get("timings", {}),
                  "throttled_s": s.get("throttled_s", 0.0), "retries": s.get("retries_this_run", 0),
                  "active_copy": res.metrics.get("active_copy", 0),
                  # the copy stage's busy time: chunks in flight (its own metric, copy_busy_ms)
                  "copy_stage_s": res.metrics.get("copy_busy_ms", 0) / 1000.0,
                  "copy_stage_keys": res.metrics.get("copied", 0)})


# ------------------------------------------------------------------ inputs

def keyspace(root: str, keys: int) -> str:
    """A pristine demo keyspace of ``keys`` keys (cached)."""
    from shardmove import api

    d = os.path.join(root, f"scale-keyspace-{keys}")
    if not os.path.exists(os.path.join(d, "ready")):
        shutil.rmtree(d, ignore_errors=True)
        note(f"building a demo keyspace of {keys} keys")
        api.create_demo_keyspace(d, keys=keys, shards=4)
        open(os.path.join(d, "ready"), "w").close()
    return d


def planned_copy(pristine: str, where: str, options: dict) -> tuple[str, str, int]:
    """A fresh copy of ``pristine`` with a committed plan: (config, plan dir, moves)."""
    from shardmove import api
    from pipeline.config import load_config

    shutil.rmtree(where, ignore_errors=True)
    shutil.copytree(pristine, where, ignore=shutil.ignore_patterns("work", "ready"))
    cfgpath = os.path.join(where, "shardmove.yaml")
    with open(cfgpath, "a") as f:
        for k, v in options.items():
            f.write(f"{k}: {json.dumps(v)}\n")
    res = api.plan(load_config(cfgpath), out=lambda _l: None)
    return cfgpath, res.plan_dir, res.manifest["moves"]


# ------------------------------------------------------------------ parts

def bench_plan(root: str, sizes: list, repeat: int) -> None:
    from plan_bench import build_snapshot

    for n in sizes:
        snap = build_snapshot(n, root)
        best = None
        for r in range(repeat):
            out = os.path.join(root, f"scale-plan-out-{n}")
            shutil.rmtree(out, ignore_errors=True)
            note(f"planning {n} keys (run {r + 1})")
            res = run_child([__file__, "--child", "plan", snap, out], timeout=7200)
            shutil.rmtree(out, ignore_errors=True)
            if best is None or res["elapsed_s"] < best["elapsed_s"]:
                best = res
        emit(f"plan_keys_per_s_{n}", n / best["elapsed_s"])
        emit(f"plan_cpu_keys_per_s_{n}", n / best["cpu_s"])
        emit(f"plan_seconds_{n}", best["elapsed_s"])
        emit(f"plan_peak_rss_mb_{n}", best["peak_rss_mb"])
        emit(f"plan_moves_{n}", best["moves"])


RUN_OPTIONS = {"swap_batch_size": 500, "hash_buckets": 16, "copy_concurrency": 32, "verification": "hash"}


def bench_run(root: str, sizes: list, repeat: int) -> None:
    for k in sizes:
        pristine = keyspace(root, k)
        best = None
        for r in range(repeat):
            where = os.path.join(root, f"scale-run-{k}")
            cfgpath, plan_dir, moves = planned_copy(pristine, where, RUN_OPTIONS)
            note(f"running {moves} moves of {k} keys (run {r + 1})")
            res = run_child([__file__, "--child", "run", cfgpath, plan_dir, "{}"], timeout=7200)
            res["moves"] = moves
            shutil.rmtree(where, ignore_errors=True)
            assert res["exit"] == 0 and res["done"] == moves, res
            if best is None or res["elapsed_s"] < best["elapsed_s"]:
                best = res
        t = best["timings"]
        emit(f"run_moves_{k}", best["moves"])
        emit(f"run_keys_per_s_{k}", best["moves"] / best["elapsed_s"])
        emit(f"run_cpu_keys_per_s_{k}", best["moves"] / best["cpu_s"])
        emit(f"run_peak_rss_mb_{k}", best["peak_rss_mb"])
        if "swap" in t:
            emit(f"run_swap_batch_p50_ms_{k}", t["swap"]["p50_ms"])
        if "copy" in t:
            emit(f"run_copy_call_p50_ms_{k}", t["copy"]["p50_ms"])


def _window_for(concurrency: int) -> str | None:
    """More moves for more concurrency, from one keyspace (a phased window)."""
    if concurrency <= 4:
        return "00-0F"   # 1/16 of the keys
    if concurrency <= 16:
        return "00-3F"   # 1/4
    return None          # all


def bench_io(root: str, keys: int, concurrencies: list, latency_ms: float, repeat: int) -> None:
    pristine = keyspace(root, keys)
    faults = {"copy": {"latency_ms": latency_ms, "keys_per_call": 1}}
    for c in concurrencies:
        bound = c * 1000.0 / latency_ms
        emit(f"io_bound_c{c}", bound)
        for mover, adaptive in (("sleep", True), ("sleep", False), ("sqlite", True), ("sqlite", False)):
            tag = ("" if mover == "sleep" else "_sqlite") + ("" if adaptive else "_fixed")
            opts = dict(RUN_OPTIONS, copy_concurrency=c, adaptive_throttling=adaptive)
            w = _window_for(c)
            if w:
                opts["window"] = w
            best = None
            for r in range(repeat):
                where = os.path.join(root, f"scale-io-{c}")
                cfgpath, plan_dir, moves = planned_copy(pristine, where, opts)
                note(f"io: {moves} moves, copy_concurrency {c}, {mover} mover, adaptive {adaptive} (run {r + 1})")
                res = run_child([__file__, "--child", "run", cfgpath, plan_dir, json.dumps(faults), mover],
                                timeout=7200)
                res["moves"] = moves
                shutil.rmtree(where, ignore_errors=True)
                assert res["exit"] == 0 and res["done"] == moves, res
                if best is None or res["copy_stage_s"] < best["copy_stage_s"]:
                    best = res
            kps = best["copy_stage_keys"] / best["copy_stage_s"]
            emit(f"io_moves_c{c}{tag}", best["moves"])
            emit(f"io_copy_keys_per_s_c{c}{tag}", kps)
            emit(f"io_fraction_c{c}{tag}", kps / bound)
            emit(f"io_end_to_end_keys_per_s_c{c}{tag}", best["moves"] / best["elapsed_s"])
            emit(f"io_throttled_s_c{c}{tag}", best["throttled_s"])
            emit(f"io_peak_in_flight_c{c}{tag}", best["active_copy"])
            if "copy" in best["timings"]:
                emit(f"io_copy_call_p50_ms_c{c}{tag}", best["timings"]["copy"]["p50_ms"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="plan,run,io")
    ap.add_argument("--plan-keys", default="1000000,10000000")
    ap.add_argument("--run-keys", default="20000,100000,400000")
    ap.add_argument("--io-keys", type=int, default=32000)
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--latency-ms", type=float, default=10.0)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--child", nargs="+")
    args = ap.parse_args(argv)
    if args.child:
        kind, *rest = args.child
        {"plan": child_plan, "run": child_run}[kind](*rest)
        return 0
    root = bench_root()
    parts = set(args.only.split(","))
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    emit("cpus", os.cpu_count())
    if "plan" in parts:
        bench_plan(root, ints(args.plan_keys), args.repeat)
    if "run" in parts:
        bench_run(root, ints(args.run_keys), args.repeat)
    if "io" in parts:
        bench_io(root, args.io_keys, ints(args.concurrency), args.latency_ms, args.repeat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
