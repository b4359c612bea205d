#!/usr/bin/env python
"""Executor benchmarks: end to end on SQLite, the copy stage under latency,
and the cost of checkpoints.

    .venv/bin/python benchmarks/run_bench.py [--keys 500000] [--repeat 1] [--only a|b|c]

(a) ``keys_per_s`` / ``baseline_keys_per_s`` / ``ratio``: a demo keyspace of
    K keys on 4 SQLite shards whose target adds a 5th (~K/5 keys move) is
    created and planned once (cached), then copied twice; ``shardmove.api.run``
    executes the plan on one copy (FnApiRunner), a plain sqlite3 script does
    the same moves on the other: per move file, batches of swap_batch_size
    (500) keys in plan order, each batch = one read of the source, one write
    transaction on the target (upsert that never overwrites a newer version),
    a hash check (xxh3-128 of the value read back from the target vs the value
    copied) and one map transaction (``UPDATE shard_map SET shard_id=?,
    version=? WHERE key=? AND shard_id=?``, version = max + 1), with the same
    PRAGMAs as the SQLite stores (read from ``pipeline/stores/sqlite_common.py``
    and ``sqlite_map.py``).  Both end states are compared (``same_result``).
(c) measured in the same executor run: ``checkpoint_bytes_per_key`` (bytes
    under ``<plan>/checkpoints`` / moved keys, after the run before
    compaction, and after compaction) and ``checkpoint_time_share`` (time the
    stages wait in ``CheckpointWriter.flush`` / run time: parts due by count or
    interval are encoded and committed by a background thread, so this is the
    checkpoints' cost to the run); ``checkpoint_work_share`` is all encoding
    and commit work wherever it ran / run time, and the share spent in the
    commits themselves (``fs.create_if_absent`` of parts) is reported too.
(b) the copy stage alone, with injected mover latency (``faults: {copy:
    {latency_ms: L, keys_per_call: 1}}``) and ``copy_concurrency: 64`` on a
    smaller keyspace: the wall time of the copy stage is the executor's
    ``copy_busy_ms`` metric, the wall time during which the copy stage had
    chunks in flight (from a chunk's admission -- guard lookup, Copying
    markers, calls submitted -- to its emission after its last call).
    ``bound_fraction`` = copied keys / that time / (64 * 1000 / L).
    Run with the SQLite mover under the injected latency (as configured),
    and -- to separate the executor from SQLite's one-transaction-per-key
    cost -- with a mover that only sleeps (``*_sleep_mover`` figures).
    ``*_64_per_call``: a mover of 64 keys per call, against its own bound
    (64 * 64 * 1000 / L keys/s).
    ``--workers N`` adds to (a) a run of the executor with N SDK worker
    processes (``--direct_running_mode=multi_processing``) on a third copy:
    ``workersN_ratio_to_single`` (its speed / the single process's, same runs),
    ``workersN_same_result``, and the mean wall time of a swap batch in each
    (``single_swap_batch_ms_mean``, ``workersN_swap_batch_ms_mean``: the map
    and the fenced source shards are locked by one process at a time).

Each executor run is a child process, so instrumentation stays out of the
parent.  Figures are ``name: value`` lines; see benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from common import bench_root, child_result, emit, install_sleep_mover, median, run_child  # noqa: E402


# ------------------------------------------------------------------ inputs

def prepare(root: str, keys: int) -> str:
    """Pristine demo keyspace of ``keys`` keys with a committed plan (cached)."""
    d = os.path.join(root, f"run-keyspace-{keys}")
    marker = os.path.join(d, "plan_dir.txt")
    if os.path.exists(marker):
        return d
    shutil.rmtree(d, ignore_errors=True)
    from shardmove import api
    from pipeline.config import load_config

    api.create_demo_keyspace(d, keys=keys, shards=4)
    cfg = load_config(os.path.join(d, "shardmove.yaml"))
    res = api.plan(cfg, out=lambda _l: None)
    with open(marker, "w") as f:
        f.write(os.path.relpath(res.plan_dir, d))
    return d


def clone(pristine: str, dest: str) -> str:
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(pristine, dest, symlinks=True)
    return dest


def plan_dir_of(run_dir: str) -> str:
    with open(os.path.join(run_dir, "plan_dir.txt")) as f:
        return os.path.join(run_dir, f.read().strip())


def dir_bytes(path: str) -> int:
    total = 0
    for r, _d, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(r, f))
            except OSError:
                pass
    return total


def end_state(run_dir: str) -> dict:
    """Digest of the map's (key, shard) pairs and record counts per shard file."""
    import sqlite3

    h = hashlib.sha256()
    conn = sqlite3.connect(os.path.join(run_dir, "keyspace", "map.sqlite"))
    for k, s in conn.execute("SELECT key, shard_id FROM shard_map ORDER BY key"):
        h.update(f"{k}\x1f{s}\n".encode())
    conn.close()
    counts = {}
    shards = os.path.join(run_dir, "keyspace", "shards")
    for f in sorted(os.listdir(shards)):
        if f.endswith(".sqlite"):
            c = sqlite3.connect(os.path.join(shards, f))
            counts[f] = c.execute("SELECT count(*) FROM records").fetchone()[0]
            c.close()
    return {"map": h.hexdigest(), "records": counts}


# ------------------------------------------------------------------ children

def child_executor(run_dir: str, overrides: dict, faults: dict | None, sleep_mover: bool,
                   options: dict | None = None, beam_args: list | None = None,
                   sleep_instance: dict | None = None) -> None:
    import apache_beam  # noqa: F401  (imports are not run time)

    from shardmove import api
    from pipeline import checkpoint as ckpt
    from pipeline import fs
    from pipeline.config import load_config

    cfg = load_config(os.path.join(run_dir, "shardmove.yaml"), overrides)
    import dataclasses

    if faults is not None:
        cfg = dataclasses.replace(cfg, faults=faults)
    if options:  # raw run options not (yet) declared in the config, e.g. adaptive_throttling
        cfg = dataclasses.replace(cfg, options={**cfg.options, **options})
    if sleep_mover:
        install_sleep_mover()
    plan_dir = plan_dir_of(run_dir)
    ck_dir = os.path.join(plan_dir, "checkpoints")
    m = {"flush_s": 0.0, "flush_calls": 0, "ckpt_work_s": 0.0, "ckpt_work_cpu_s": 0.0, "commit_s": 0.0, "commit_calls": 0, "fsync_s": 0.0, "compact_s": 0.0,
         "bytes_before_compaction": None, "copy_chunks": 0}

    orig_flush = ckpt.CheckpointWriter.flush

    def flush(self, *a, **kw):
        t = time.perf_counter()
        try:
            return orig_flush(self, *a, **kw)
        finally:
            m["flush_s"] += time.perf_counter() - t
            m["flush_calls"] += 1

    ckpt.CheckpointWriter.flush = flush
    ckpt.CheckpointWriter.close = flush
    orig_sc = ckpt.CheckpointWriter._serialize_and_commit

    def serialize_and_commit(self, *a, **kw):  # on the stage's thread or the background committer
        t = time.perf_counter()
        c = time.thread_time()
        try:
            return orig_sc(self, *a, **kw)
        finally:
            m["ckpt_work_s"] += time.perf_counter() - t
            m["ckpt_work_cpu_s"] += time.thread_time() - c  # this thread's CPU: no I/O or GIL waits

    ckpt.CheckpointWriter._serialize_and_commit = serialize_and_commit
    orig_create = fs.create_if_absent

    in_commit = threading.local()

    def create_if_absent(path, data, *a, **kw):
        if "/checkpoints/" not in str(path):
            return orig_create(path, data, *a, **kw)
        t = time.perf_counter()
        in_commit.on = True
        try:
            return orig_create(path, data, *a, **kw)
        finally:
            in_commit.on = False
            m["commit_s"] += time.perf_counter() - t
            m["commit_calls"] += 1

    fs.create_if_absent = create_if_absent
    orig_fsync = os.fsync

    def fsync(fd):  # the part's data fsync, inside a checkpoint commit
        if not getattr(in_commit, "on", False):
            return orig_fsync(fd)
        t = time.perf_counter()
        try:
            return orig_fsync(fd)
        finally:
            m["fsync_s"] += time.perf_counter() - t

    os.fsync = fsync
    orig_compact = ckpt.compact_group

    def compact_group(*a, **kw):
        if m["bytes_before_compaction"] is None:
            m["bytes_before_compaction"] = dir_bytes(ck_dir)
        t = time.perf_counter()
        try:
            return orig_compact(*a, **kw)
        finally:
            m["compact_s"] += time.perf_counter() - t

    ckpt.compact_group = compact_group
    breakdown, breakdown_calls, breakdown_cpu = _install_breakdown()
    lines = []
    stores = {}
    if sleep_instance:  # a mover object every worker process unpickles (benchmarks/ on their path)
        from pipeline.stores import data_store_from_spec
        from sleepmover import SleepMover

        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (HERE, os.environ.get("PYTHONPATH")) if p)
        os.makedirs(sleep_instance["stats_dir"], exist_ok=True)
        stores["data_store"] = SleepMover(data_store_from_spec(cfg.data_store, cfg.key_type), **sleep_instance)
    t0 = time.perf_counter()
    c0 = time.process_time()
    res = api.run(cfg, plan_dir, out=lines.append, beam_args=beam_args or (), **stores)
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - c0
    calls_busy_s, calls_n = 0.0, 0
    if sleep_instance:
        from sleepmover import busy_seconds

        stores["data_store"].close()  # this process's calls (an in-process runner's stages)
        calls_busy_s, calls_n = busy_seconds(sleep_instance["stats_dir"])
    s = res.summary
    copy_ms = res.metrics.get("copy_ms") or {}
    child_result({
        "elapsed_s": elapsed, "cpu_s": cpu, "exit_code": res.exit_code, "planned": s["planned"],
        "done": s["done"], "failed": s["failed"], "bytes_after_compaction": dir_bytes(ck_dir),
        "copy_calls": copy_ms.get("count", 0), "copy_call_ms_sum": copy_ms.get("sum", 0),
        "swap_calls": (res.metrics.get("swap_batch_ms") or {}).get("count", 0),
        "swap_ms_sum": (res.metrics.get("swap_batch_ms") or {}).get("sum", 0),
        "copied": res.metrics.get("copied", 0), "breakdown": dict(breakdown),
        "breakdown_cpu": dict(breakdown_cpu), **m,
        "copy_chunks": breakdown_calls.get("copy_start", 0),
        # the copy stage's busy time (chunks in flight), the executor's own metric
        "copy_stage_s": res.metrics.get("copy_busy_ms", 0) / 1000.0, "copy_stage_keys": res.metrics.get("copied", 0),
        # with a sleep-mover instance: the wall time with a mover call in flight in any process
        "calls_busy_s": calls_busy_s, "calls": calls_n,
    })


#: (module, attribute path, label, is a generator) -- where an executor run spends its time.
_BREAKDOWN = (
    ("shardmove.executor", "verify_plan_files", "verify_plan_files", False),
    ("shardmove.executor", "find_drift", "find_drift", False),
    ("shardmove.executor", "summarize", "summarize_and_compact", False),
    ("shardmove.run_progress", "_Progress._scan", "progress_scan_thread", False),
    ("transforms.stages.load", "_LoadWorkFn.process", "stage_load_work", True),
    ("transforms.stages.copy", "_CopyFn.process", "stage_copy", True),
    ("transforms.stages.verify", "_VerifyFn.process", "stage_verify", True),
    ("transforms.stages.swap", "_SwapFn.process", "stage_swap", True),
    ("transforms.stages.guard", "MapGuard.keep_at_source", "copy_guard", False),
    ("transforms.stages.copy", "Copier.start_copies", "copy_start", False),
    ("transforms.stages.copy", "Copier.finish_copies", "copy_finish", False),
    ("transforms.stages.swap", "Swapper.swap_once", "swap_once", False),
    ("transforms.stages.common", "CheckpointRecorder.record", "record_transitions", False),
    ("pipeline.stores.sqlite_map", "SqliteMapStore.lookup", "map_lookup", False),
    ("pipeline.stores.sqlite_map", "SqliteMapStore.swap_batch", "map_swap_batch", False),
    ("pipeline.stores.sqlite_data", "SqliteDataStore.copy", "data_copy", False),
    ("pipeline.stores.sqlite_data", "SqliteDataStore.hashes", "data_hashes", False),
    # the writer and compaction each call their own binding of serialize_table
    ("pipeline.checkpoint.writer", "serialize_table", "checkpoint_serialize", False),
    ("pipeline.checkpoint.compaction", "serialize_table", "checkpoint_serialize", False),
)


def _timed(orig, label, gen, add):
    import functools

    if gen:
        @functools.wraps(orig)
        def wrapper(*a, **kw):
            it = orig(*a, **kw)
            while True:
                t, c = time.perf_counter(), time.thread_time()
                try:
                    v = next(it)
                except StopIteration:
                    add(label, time.perf_counter() - t, time.thread_time() - c)
                    return
                add(label, time.perf_counter() - t, time.thread_time() - c)
                yield v
    else:
        @functools.wraps(orig)
        def wrapper(*a, **kw):
            t, c = time.perf_counter(), time.thread_time()
            try:
                return orig(*a, **kw)
            finally:
                add(label, time.perf_counter() - t, time.thread_time() - c)
    return wrapper


def _install_breakdown() -> tuple[dict, dict, dict]:
    """Wrap the functions above to sum their wall time (seconds), count their calls and
    sum the CPU time of the calling thread inside them (seconds; excludes waits for I/O
    and for the GIL), into three dicts by label.

    Generators are timed inside each ``next()`` only, so a fused downstream
    stage's work is not counted twice.  Threads add to the same totals
    (copies run on pool threads)."""
    import importlib
    import threading

    acc: dict = {}
    calls: dict = {}
    cpu: dict = {}
    lock = threading.Lock()

    def add(label, dt, dc):
        with lock:
            acc[label] = acc.get(label, 0.0) + dt
            calls[label] = calls.get(label, 0) + 1
            cpu[label] = cpu.get(label, 0.0) + dc

    for modname, path, label, gen in _BREAKDOWN:
        mod = importlib.import_module(modname)
        owner = mod
        parts = path.split(".")
        for p in parts[:-1]:
            owner = getattr(owner, p)
        orig = getattr(owner, parts[-1])
        setattr(owner, parts[-1], _timed(orig, label, gen, add))
    return acc, calls, cpu


def child_baseline(run_dir: str) -> None:
    import sqlite3

    import pyarrow.parquet as pq
    import xxhash

    from pipeline.names import safe_name
    from pipeline.stores import sqlite_common, sqlite_map

    plan_dir = plan_dir_of(run_dir)
    manifest = json.load(open(os.path.join(plan_dir, "manifest.json")))
    ks = os.path.join(run_dir, "keyspace")
    batch = 500  # swap_batch_size (the demo config's and the default)
    base_pragmas = sqlite_common._SqliteBase._PRAGMAS
    map_pragmas = sqlite_map.SqliteMapStore._PRAGMAS
    busy = sqlite_common.DEFAULT_BUSY_TIMEOUT

    def connect(path, pragmas):
        c = sqlite3.connect(path, timeout=busy, isolation_level=None, check_same_thread=False,
                            cached_statements=256)
        c.execute("PRAGMA synchronous=FULL")
        for p in pragmas:
            c.execute(p)
        return c

    conns = {}

    def shard(s):
        if s not in conns:
            path = os.path.join(ks, "shards", safe_name(s) + ".sqlite")
            new = not os.path.exists(path)
            c = connect(path, base_pragmas)
            if new:
                c.execute("PRAGMA journal_mode=WAL")
                c.execute("CREATE TABLE IF NOT EXISTS records("
                          "key TEXT PRIMARY KEY, value BLOB NOT NULL, version INTEGER NOT NULL)")
            conns[s] = c
        return conns[s]

    digest = xxhash.xxh3_128_digest
    t0 = time.perf_counter()
    c0 = time.process_time()
    mp = connect(os.path.join(ks, "map.sqlite"), map_pragmas)
    moved = 0
    batches = 0
    phase = {"copy": 0.0, "verify": 0.0, "map": 0.0}
    for f in manifest["files"]:
        t = pq.read_table(os.path.join(plan_dir, "moves", f["group"] + ".parquet"), columns=["key"])
        keys = [k.decode() for k in t["key"].to_pylist()]
        src, tgt = shard(f["source"]), shard(f["target"])
        for a in range(0, len(keys), batch):
            part = keys[a:a + batch]
            q = ",".join("?" * len(part))
            batches += 1
            tp = time.perf_counter()
            # copy: one read of the source, one write transaction on the target
            src.execute("BEGIN")
            rows = src.execute(f"SELECT key, CAST(value AS BLOB), version FROM records WHERE key IN ({q})",
                               part).fetchall()
            src.execute("COMMIT")
            copied = {k: digest(v) for k, v, _ver in rows}
            tgt.execute("BEGIN IMMEDIATE")
            have = dict(tgt.execute(f"SELECT key, version FROM records WHERE key IN ({q})", part).fetchall())
            up = sorted((k, v, ver) for k, v, ver in rows if have.get(k) is None or have[k] <= ver)
            tgt.executemany("INSERT INTO records(key, value, version) VALUES (?, ?, ?) "
                            "ON CONFLICT(key) DO UPDATE SET value = excluded.value, version = excluded.version "
                            "WHERE records.version <= excluded.version", up)
            tgt.execute("COMMIT")
            tp = _lap(phase, "copy", tp)
            # hash check: xxh3-128 of the value read back from the target vs the value copied
            tgt.execute("BEGIN")
            back = tgt.execute(f"SELECT key, CAST(value AS BLOB) FROM records WHERE key IN ({q})", part).fetchall()
            tgt.execute("COMMIT")
            ok = [k for k, v in back if copied.get(k) == digest(v)]
            if len(ok) != len(part):
                raise SystemExit(f"baseline: {len(part) - len(ok)} keys failed the hash check")
            tp = _lap(phase, "verify", tp)
            # map update: one transaction, compare-and-set on the expected source
            mp.execute("BEGIN IMMEDIATE")
            version = mp.execute("SELECT coalesce(max(version), 0) + 1 FROM shard_map").fetchone()[0]
            cur = mp.executemany("UPDATE shard_map SET shard_id=?, version=? WHERE key=? AND shard_id=?",
                                 [(f["target"], version, k, f["source"]) for k in sorted(ok)])
            if cur.rowcount != len(ok):
                mp.execute("ROLLBACK")
                raise SystemExit("baseline: compare-and-set mismatch")
            mp.execute("COMMIT")
            _lap(phase, "map", tp)
            moved += len(ok)
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - c0
    child_result({"elapsed_s": elapsed, "cpu_s": cpu, "done": moved, "batches": batches, "phase": phase})


def _lap(acc: dict, name: str, t0: float) -> float:
    t = time.perf_counter()
    acc[name] += t - t0
    return t


# ------------------------------------------------------------------ main

def _overrides(s: str | None) -> dict:
    return json.loads(s) if s else {}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keys", type=int, default=500_000, help="keyspace size for (a)/(c); ~1/5 of it moves")
    ap.add_argument("--latency-keys", type=int, default=100_000,
                    help="keyspace size for (b) with the latency-only mover")
    ap.add_argument("--sqlite-latency-keys", type=int, default=20_000,
                    help="keyspace size for (b) with the SQLite mover (one write transaction per key: slow)")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--only", choices=("a", "b"), default=None, help="(c) is measured within (a)")
    ap.add_argument("--bench-dir", default=None)
    ap.add_argument("--exec-overrides", default=None, metavar="JSON",
                    help='(a): run options for the executor only, e.g. \'{"checkpoint_flush_every_transitions": 3000}\' '
                         '(the baseline does not checkpoint)')
    ap.add_argument("--workers", type=int, default=0, metavar="N",
                    help="(a): also run the executor with N SDK worker processes (--direct_running_mode="
                         "multi_processing --direct_num_workers=N) on a third copy: workers_* figures")
    ap.add_argument("--child", choices=("executor", "baseline"), help=argparse.SUPPRESS)
    ap.add_argument("--beam-args", help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", help=argparse.SUPPRESS)
    ap.add_argument("--overrides", help=argparse.SUPPRESS)
    ap.add_argument("--faults", help=argparse.SUPPRESS)
    ap.add_argument("--sleep-mover", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--options", help=argparse.SUPPRESS)
    ap.add_argument("--sleep-instance", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child == "executor":
        child_executor(args.run_dir, _overrides(args.overrides), json.loads(args.faults) if args.faults else None,
                       args.sleep_mover, _overrides(args.options),
                       json.loads(args.beam_args) if args.beam_args else None,
                       json.loads(args.sleep_instance) if args.sleep_instance else None)
        return 0
    if args.child == "baseline":
        child_baseline(args.run_dir)
        return 0

    root = args.bench_dir or bench_root()
    log = os.path.join(root, "run_bench.log")
    me = os.path.abspath(__file__)

    if args.only in (None, "a"):
        t = time.perf_counter()
        pristine = prepare(root, args.keys)
        print(f"# keyspace {pristine} ready in {time.perf_counter() - t:.1f}s", file=sys.stderr)
        ex_runs, bl_runs, same = [], [], []
        mp_runs, mp_same = [], []
        mp_args = ["--direct_running_mode=multi_processing", f"--direct_num_workers={args.workers}"]

        def executor(run_dir: str) -> list:  # an executor child on a copy, with --exec-overrides
            return ([me, "--child", "executor", "--run-dir", run_dir]
                    + (["--overrides", args.exec_overrides] if args.exec_overrides else []))
        for r in range(args.repeat):
            a = clone(pristine, os.path.join(root, "run-exec"))
            b = clone(pristine, os.path.join(root, "run-base"))
            ex = run_child(executor(a), log=log)
            bl = run_child([me, "--child", "baseline", "--run-dir", b], log=log)
            if ex["exit_code"] != 0 or ex["done"] != ex["planned"]:
                raise SystemExit(f"executor run did not complete: {ex}")
            same.append(end_state(a) == end_state(b) and bl["done"] == ex["done"])
            ex_runs.append(ex)
            bl_runs.append(bl)
            print(f"# run {r + 1}: executor {ex['elapsed_s']:.2f}s ({ex['cpu_s']:.2f}s CPU), baseline "
                  f"{bl['elapsed_s']:.2f}s ({bl['cpu_s']:.2f}s CPU)", file=sys.stderr)
            if args.workers:
                c = clone(pristine, os.path.join(root, "run-workers"))
                mp = run_child(executor(c) + ["--beam-args", json.dumps(mp_args)], log=log)
                if mp["exit_code"] != 0 or mp["done"] != mp["planned"]:
                    raise SystemExit(f"executor run with {args.workers} workers did not complete: {mp}")
                mp_same.append(end_state(c) == end_state(b) and mp["done"] == ex["done"])
                mp_runs.append(mp)
                print(f"# run {r + 1}: executor with {args.workers} worker processes {mp['elapsed_s']:.2f}s "
                      f"({mp['cpu_s']:.2f}s CPU in the launcher)", file=sys.stderr)
                shutil.rmtree(c, ignore_errors=True)
            shutil.rmtree(b, ignore_errors=True)
            if r + 1 < args.repeat:
                shutil.rmtree(a, ignore_errors=True)
        keys = ex_runs[0]["done"]
        emit("keys", keys)
        for i, (ex, bl) in enumerate(zip(ex_runs, bl_runs), 1):
            emit(f"keys_per_s_run{i}", keys / ex["elapsed_s"])
            emit(f"baseline_keys_per_s_run{i}", keys / bl["elapsed_s"])
            emit(f"cpu_s_run{i}", ex["cpu_s"])
            emit(f"baseline_cpu_s_run{i}", bl["cpu_s"])
        best_ex = min(r["elapsed_s"] for r in ex_runs)
        best_bl = min(r["elapsed_s"] for r in bl_runs)
        emit("keys_per_s", keys / best_ex)
        emit("baseline_keys_per_s", keys / best_bl)
        emit("ratio", best_bl / best_ex)
        emit("ratio_median", median([b["elapsed_s"] / e["elapsed_s"] for e, b in zip(ex_runs, bl_runs)]))
        emit("cpu_ratio", min(r["cpu_s"] for r in bl_runs) / min(r["cpu_s"] for r in ex_runs))
        emit("same_result", all(same))
        if mp_runs:  # item 4: N worker processes against the single process, run for run
            w = args.workers
            for i, mp in enumerate(mp_runs, 1):
                emit(f"workers{w}_keys_per_s_run{i}", keys / mp["elapsed_s"])
            emit(f"workers{w}_keys_per_s", keys / min(r["elapsed_s"] for r in mp_runs))
            emit(f"workers{w}_ratio_to_single", best_ex / min(r["elapsed_s"] for r in mp_runs))
            emit(f"workers{w}_ratio_to_single_median",
                 median([e["elapsed_s"] / m["elapsed_s"] for e, m in zip(ex_runs, mp_runs)]))
            emit(f"workers{w}_same_result", all(mp_same))
            # where scaling stops: a swap batch's wall time (map and fenced-shard locks included)
            for tag, runs in (("single", ex_runs), (f"workers{w}", mp_runs)):
                calls = sum(r["swap_calls"] for r in runs)
                if calls:
                    emit(f"{tag}_swap_batch_ms_mean", sum(r["swap_ms_sum"] for r in runs) / calls)
        # (c) from the executor runs
        ex = min(ex_runs, key=lambda r: r["elapsed_s"])
        emit("checkpoint_bytes_per_key", ex["bytes_before_compaction"] / keys)
        emit("checkpoint_bytes_per_key_compacted", ex["bytes_after_compaction"] / keys)
        # the time the executor waits for checkpoints (flush calls; parts due by count or
        # interval are encoded and committed in the background) ...
        emit("checkpoint_time_share", ex["flush_s"] / ex["elapsed_s"])
        # ... and all checkpoint encoding + commit work, wherever it ran
        emit("checkpoint_work_share", ex["ckpt_work_s"] / ex["elapsed_s"])
        # ... of which CPU (the committing thread's own CPU time: no fsync or GIL waits)
        emit("checkpoint_work_cpu_share", ex["ckpt_work_cpu_s"] / ex["elapsed_s"])
        emit("checkpoint_commit_time_share", ex["commit_s"] / ex["elapsed_s"])
        # ... of which the parts' data fsyncs (a part's bytes are durable before its name appears)
        emit("checkpoint_fsync_time_share", ex["fsync_s"] / ex["elapsed_s"])
        emit("checkpoint_parts", ex["commit_calls"])
        emit("checkpoint_compaction_share", ex["compact_s"] / ex["elapsed_s"])
        bl = min(bl_runs, key=lambda r: r["elapsed_s"])
        for name, secs in bl["phase"].items():
            emit(f"baseline_ms_per_batch_{name}", 1000 * secs / max(1, bl["batches"]))
        # where the executor's run time goes (shares of its wall time; nested, so they overlap)
        for label, secs in sorted(ex["breakdown"].items(), key=lambda kv: -kv[1]):
            emit(f"exec_share_{label}", secs / ex["elapsed_s"])
        for label, secs in sorted(ex["breakdown"].items(), key=lambda kv: -kv[1]):
            emit(f"exec_ms_per_batch_{label}", 1000 * secs / max(1, ex["copy_chunks"]))
        # the CPU of the calling threads inside them (wall time minus I/O and GIL waits)
        for label, secs in sorted(ex["breakdown_cpu"].items(), key=lambda kv: -kv[1]):
            emit(f"exec_cpu_ms_per_batch_{label}", 1000 * secs / max(1, ex["copy_chunks"]))
        shutil.rmtree(os.path.join(root, "run-exec"), ignore_errors=True)

    if args.only in (None, "b"):
        # (b) the copy stage alone: (latency ms, mover, adaptive throttling, keyspace, figure suffix,
        # keys per mover call, swap_batch_size or None for the default)
        variants = [
            (10, "sleep", True, args.latency_keys, "", 1, None),
            (2, "sleep", True, args.latency_keys, "_2ms", 1, None),
            (10, "sleep", False, args.latency_keys, "_no_adaptive", 1, None),
            (2, "sleep", False, args.latency_keys, "_2ms_no_adaptive", 1, None),
            (10, "sqlite", True, args.sqlite_latency_keys, "_sqlite_mover", 1, None),
            (2, "sqlite", True, args.sqlite_latency_keys, "_2ms_sqlite_mover", 1, None),
            # multi-key movers against their own bound (64 calls of 64 keys in flight): a 500-key
            # chunk is 8 such calls and the window holds 2-3 chunks, so about 24 calls are in flight
            (10, "sleep", True, args.latency_keys, "_64_per_call", 64, None),
        ]
        for latency, mover, adaptive, nkeys, tag, per_call, batch in variants:
            pristine = prepare(root, nkeys)
            c = clone(pristine, os.path.join(root, "run-latency"))
            faults = {"copy": {"latency_ms": latency, "keys_per_call": per_call}}
            overrides = {"copy_concurrency": 64}
            if batch:
                overrides["swap_batch_size"] = batch
            child = [me, "--child", "executor", "--run-dir", c, "--faults", json.dumps(faults),
                     "--overrides", json.dumps(overrides)]
            if mover == "sleep":
                child.append("--sleep-mover")
            if not adaptive:
                child += ["--options", json.dumps({"adaptive_throttling": False})]
            res = run_child(child, log=log)
            if res["exit_code"] != 0:
                raise SystemExit(f"latency run did not complete: {res}")
            bound = 64 * per_call * 1000.0 / latency
            rate = res["copy_stage_keys"] / res["copy_stage_s"]
            emit(f"copy_keys_per_s{tag}", rate)
            emit(f"bound_fraction{tag}", rate / bound)
            emit(f"copy_call_ms_mean{tag}", res["copy_call_ms_sum"] / max(1, res["copy_calls"]))
            emit(f"end_to_end_keys_per_s{tag}", res["done"] / res["elapsed_s"])
            print(f"# latency {latency}ms mover={mover} adaptive={adaptive}: {res['copy_stage_keys']} keys copied "
                  f"in {res['copy_stage_s']:.2f}s of copy stage ({res['copy_chunks']} chunks), run "
                  f"{res['elapsed_s']:.2f}s", file=sys.stderr)
            shutil.rmtree(c, ignore_errors=True)
        # 2 ms single-key calls, 64 in flight in total: one process (64 concurrent calls) and two
        # SDK worker processes (32 each).  The mover is an object every process unpickles
        # (benchmarks/sleepmover.py), so it sleeps in the workers too; the copy stage's wall time
        # is the union of all processes' call intervals (copy_busy_ms, a counter, would sum them).
        for workers, tag in ((1, "_2ms_calls"), (2, "_2ms_workers2")):
            pristine = prepare(root, args.latency_keys)
            c = clone(pristine, os.path.join(root, "run-latency"))
            stats = os.path.join(root, "run-latency-calls")
            shutil.rmtree(stats, ignore_errors=True)
            mover = {"latency_ms": 2, "keys_per_call": 1, "stats_dir": stats}
            child = [me, "--child", "executor", "--run-dir", c, "--sleep-instance", json.dumps(mover),
                     "--overrides", json.dumps({"copy_concurrency": 64 // workers})]
            if workers > 1:
                child += ["--beam-args", json.dumps(["--direct_running_mode=multi_processing",
                                                     f"--direct_num_workers={workers}"])]
            res = run_child(child, log=log)
            if res["exit_code"] != 0 or res["done"] != res["planned"]:
                raise SystemExit(f"latency run with {workers} worker processes did not complete: {res}")
            bound = 64 * 1000.0 / 2
            rate = res["calls"] / res["calls_busy_s"] if res["calls_busy_s"] else 0.0
            emit(f"copy_keys_per_s{tag}", rate)
            emit(f"bound_fraction{tag}", rate / bound)
            emit(f"end_to_end_keys_per_s{tag}", res["done"] / res["elapsed_s"])
            print(f"# latency 2ms, {workers} process(es) x {64 // workers} calls: {res['calls']} calls, "
                  f"{res['calls_busy_s']:.2f}s with calls in flight, run {res['elapsed_s']:.2f}s", file=sys.stderr)
            shutil.rmtree(c, ignore_errors=True)
            shutil.rmtree(stats, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
