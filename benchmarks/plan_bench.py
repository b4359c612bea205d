#!/usr/bin/env python
"""Planner benchmark: the Beam planner against a plain numpy/pyarrow plan.

    .venv/bin/python benchmarks/plan_bench.py --keys 10000000 [--repeat 2]

1. Builds (once, cached under ``$SHARDMOVE_BENCH_DIR`` or ``/tmp/shardmove-bench``)
   a snapshot of N keys laid out like ``shardmove snapshot`` writes it: Parquet
   parts of 1M rows, row groups of 20,000 rows (the default segment size),
   zstd, schema (key: binary, shard_id: string, version: int64), keys
   assigned to 16 shards s0..s15 by the native ring, plus ``snapshot.json``.
2. Runs, each in its OWN child process so each peak RSS is its own:
   a) the Beam planner end to end (``shardmove.planner.make_plan``, FnApiRunner,
      target = the 16 shards plus s16);
   b) a plain numpy/pyarrow script computing the same plan from the same
      snapshot (read, hash, ring assign, compare, filter, duplicate check by
      sorting hashes, sort by (source, target, hash, key), one Parquet file
      per (source, target, bucket), each committed write-fsync-rename like the
      planner's).
   Each child times itself from just before planning starts (after imports)
   to after the plan is committed, and reads its own peak RSS (VmHWM).
3. Checks that both produced the same moves (count and an ordered digest of
   every (source, target, key_hash, key) in file order) and whether the move
   files are byte-identical.

Figures (``name: value``): see benchmarks/README.md.
"""
from __future__ import annotations

import time

_T_START = time.perf_counter()  # child processes: imports are timed from here

import argparse
import glob
import hashlib
import json
import os
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from common import bench_root, child_result, emit, median, run_child  # noqa: E402

SOURCE_SHARDS = [f"s{i}" for i in range(16)]
TARGET_SHARDS = SOURCE_SHARDS + ["s16"]
ROWS_PER_FILE = 1_000_000
ROW_GROUP = 20_000
HASH_BUCKETS = 16  # the option's default, used by both sides


# ------------------------------------------------------------------ snapshot

def build_snapshot(n: int, root: str) -> str:
    """Snapshot directory of ``n`` keys (cached by n)."""
    d = os.path.join(root, f"snapshot-{n}")
    if os.path.exists(os.path.join(d, "snapshot.json")):
        return d
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import xxhash

    from pipeline import plancore as core
    from pipeline.ring import Ring

    tmp = d + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp, mode=0o700)
    ring = Ring.build("native", [(s, 1.0) for s in SOURCE_SHARDS])
    shard_arr = pa.array(list(ring.shard_ids), pa.string())
    prefix = np.frombuffer(b"user-", dtype=np.uint8)
    width = 12
    pow10 = 10 ** np.arange(width - 1, -1, -1, dtype=np.int64)
    lanes = (0, 0, 0)
    files = []
    for part, lo in enumerate(range(0, n, ROWS_PER_FILE)):
        hi = min(n, lo + ROWS_PER_FILE)
        ids = np.arange(lo, hi, dtype=np.int64)
        mat = np.empty((hi - lo, len(prefix) + width), dtype=np.uint8)
        mat[:, :len(prefix)] = prefix
        mat[:, len(prefix):] = (ids[:, None] // pow10) % 10 + 48
        keys = pa.FixedSizeBinaryArray.from_buffers(pa.binary(mat.shape[1]), hi - lo,
                                                    [None, pa.py_buffer(mat.tobytes())]).cast(pa.binary())
        hashes = np.fromiter(map(xxhash.xxh3_64_intdigest, keys.to_pylist()), np.uint64, count=hi - lo)
        idx = ring.assign(None, hashes)
        shards = pa.DictionaryArray.from_arrays(pa.array(idx, pa.int32()), shard_arr).cast(pa.string())
        table = pa.table({"key": keys, "shard_id": shards, "version": pa.array(ids + 1, pa.int64())},
                         schema=core.SNAPSHOT_SCHEMA)
        lanes = core._add_digest(lanes, core.digest_lanes(hashes, core._shard_hash_array(shards)))
        name = f"part-{part:05d}.parquet"
        pq.write_table(table, os.path.join(tmp, name), row_group_size=ROW_GROUP, compression="zstd")
        files.append({"name": name, "rows": hi - lo})
    meta = {"format_version": 1, "digest": core.digest_hex(*lanes), "rows": n, "cutoff": n,
            "rows_above_cutoff": 0, "key_type": "string", "files": files,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with open(os.path.join(tmp, "snapshot.json"), "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
    shutil.rmtree(d, ignore_errors=True)
    os.rename(tmp, d)
    return d


def build_target(n: int, root: str, snapshot: str) -> str:
    """An explicit target holding every key of the snapshot (cached by n): the ring of
    TARGET_SHARDS's own assignment, so about 5.9% of keys differ and the explicit plan
    must equal the ring plan move for move."""
    d = os.path.join(root, f"target-{n}")
    if os.path.exists(os.path.join(d, "done")):
        return d
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import xxhash

    from pipeline.ring import Ring

    tmp = d + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp, mode=0o700)
    ring = Ring.build("native", [(s, 1.0) for s in TARGET_SHARDS])
    shard_arr = pa.array(list(ring.shard_ids), pa.string())
    for name in sorted(f for f in os.listdir(snapshot) if f.endswith(".parquet")):
        keys = pq.read_table(os.path.join(snapshot, name), columns=["key"]).column("key").combine_chunks()
        hashes = np.fromiter(map(xxhash.xxh3_64_intdigest, keys.to_pylist()), np.uint64, count=len(keys))
        idx = ring.assign(None, hashes)
        shards = pa.DictionaryArray.from_arrays(pa.array(idx, pa.int32()), shard_arr).cast(pa.string())
        pq.write_table(pa.table({"key": keys, "shard_id": shards}), os.path.join(tmp, name),
                       row_group_size=ROW_GROUP, compression="zstd")
    open(os.path.join(tmp, "done"), "w").close()
    shutil.rmtree(d, ignore_errors=True)
    os.rename(tmp, d)
    return d


# ------------------------------------------------------------------ children

def child_planner(snapshot: str, out: str, profile: str | None, target: str | None = None,
                  beam_args: tuple = (), plan_threads: int = 0) -> None:
    import apache_beam  # noqa: F401  (import cost is not planning time)

    import transforms.plan  # noqa: F401
    from pipeline.config import load_config
    from shardmove.planner import make_plan

    raw = {
        "work_dir": os.path.join(out, "work"),
        "map_store": {"kind": "sqlite", "path": os.path.join(out, "unused.sqlite")},
        "current_shards": SOURCE_SHARDS,
        "target": {"profile": "native", "shards": [{"id": s} for s in TARGET_SHARDS]},
        "hash_buckets": HASH_BUCKETS,
        "plan_threads": plan_threads,
    }
    if target:
        raw["target"]["snapshot"] = target
    prof = None
    if profile:
        import cProfile

        prof = cProfile.Profile()
    t0 = time.perf_counter()
    c0 = time.process_time()
    if prof:
        prof.enable()
    cfg = load_config(None, raw=raw)
    res = make_plan(cfg, snapshot=snapshot, out=lambda _line: None, beam_args=list(beam_args))
    if prof:
        prof.disable()
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - c0
    if prof:
        prof.dump_stats(profile)
    child_result({"elapsed_s": elapsed, "cpu_s": cpu, "import_s": t0 - _T_START, "moves": res.manifest["moves"], "rows": res.manifest["keys_examined"],
                  "moves_dir": os.path.join(res.plan_dir, "moves"), "plan_id": res.plan_id})


def child_baseline(snapshot: str, out: str, profile: str | None) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import xxhash
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.names import group_id
    from pipeline.ring import Ring

    moves_schema = pa.schema([("key", pa.binary()), ("source", pa.string()), ("target", pa.string()),
                              ("key_hash", pa.uint64())])
    moves_dir = os.path.join(out, "moves")
    t0 = time.perf_counter()
    c0 = time.process_time()
    ring = Ring.build("native", [(s, 1.0) for s in TARGET_SHARDS])
    pos = {s: i for i, s in enumerate(ring.shard_ids)}
    # read file by file (1M rows each): hash, ring assign, compare, keep the moved rows
    parts = sorted(glob.glob(os.path.join(snapshot, "*.parquet")))
    all_hashes, mkeys_l, mh_l, ms_l, mt_l = [], [], [], [], []
    n = 0
    for p in parts:
        table = pq.ParquetFile(p).read(columns=["key", "shard_id"])
        keys = table["key"].combine_chunks()
        hashes = np.fromiter(map(xxhash.xxh3_64_intdigest, keys.to_pylist()), np.uint64, count=len(keys))
        n += len(keys)
        all_hashes.append(hashes)
        tgt_idx = ring.assign(None, hashes)
        src_enc = table["shard_id"].combine_chunks().dictionary_encode()
        src_map = np.array([pos[s] for s in src_enc.dictionary.to_pylist()], np.int32)
        src_idx = src_map[src_enc.indices.to_numpy(zero_copy_only=False)]
        moved = np.flatnonzero(src_idx != tgt_idx)
        mkeys_l.append(keys.take(pa.array(moved)))
        mh_l.append(hashes[moved])
        ms_l.append(src_idx[moved])
        mt_l.append(tgt_idx[moved])
    # duplicate check: sort all hashes, confirm collisions by key bytes
    hs = np.sort(np.concatenate(all_hashes)) if all_hashes else np.zeros(0, np.uint64)
    del all_hashes
    cand = np.unique(hs[1:][hs[1:] == hs[:-1]])
    del hs
    if len(cand):
        ks = []
        for p in parts:
            keys = pq.ParquetFile(p).read(columns=["key"])["key"].combine_chunks()
            h = np.fromiter(map(xxhash.xxh3_64_intdigest, keys.to_pylist()), np.uint64, count=len(keys))
            ks += keys.take(pa.array(np.flatnonzero(np.isin(h, cand)))).to_pylist()
        if len(ks) != len(set(ks)):
            raise SystemExit(f"baseline: {len(ks) - len(set(ks))} duplicate keys")
    mkeys = pa.concat_arrays(mkeys_l) if mkeys_l else pa.array([], pa.binary())
    mh = np.concatenate(mh_l) if mh_l else np.zeros(0, np.uint64)
    ms = np.concatenate(ms_l) if ms_l else np.zeros(0, np.int32)
    mt = np.concatenate(mt_l) if mt_l else np.zeros(0, np.int32)
    moved = np.arange(len(mh))
    # sort by (source bytes, target bytes, hash); equal hashes cannot occur (no duplicates)
    rank = np.empty(len(ring.shard_ids), np.int32)
    rank[np.argsort([s.encode() for s in ring.shard_ids], kind="stable")] = np.arange(len(ring.shard_ids))
    order = np.lexsort((mh, rank[mt], rank[ms]))
    moved, mh, ms, mt = moved[order], mh[order], ms[order], mt[order]
    with np.errstate(over="ignore"):
        bucket = ((mh >> np.uint64(32)) * np.uint64(HASH_BUCKETS) >> np.uint64(32)).astype(np.int32)
    mkeys = mkeys.take(pa.array(moved))
    ids = pa.array(list(ring.shard_ids), pa.string())
    src_col = ids.take(pa.array(ms))
    tgt_col = ids.take(pa.array(mt))
    # one file per (source, target, bucket)
    os.makedirs(moves_dir, mode=0o700, exist_ok=True)
    gkey = (ms.astype(np.int64) << 40) | (mt.astype(np.int64) << 20) | bucket
    bounds = np.flatnonzero(np.diff(gkey)) + 1 if len(gkey) else np.zeros(0, np.int64)
    starts = np.concatenate([[0], bounds]).astype(np.int64) if len(gkey) else []
    ends = np.concatenate([bounds, [len(gkey)]]).astype(np.int64) if len(gkey) else []
    moves = pa.table({"key": mkeys, "source": src_col, "target": tgt_col, "key_hash": pa.array(mh, pa.uint64())},
                     schema=moves_schema)

    def commit(name, data):  # write a temporary, fsync, rename (like the planner's commits)
        tmp = os.path.join(moves_dir, "." + name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, os.path.join(moves_dir, name))

    # commits on 8 threads, as the planner does, so that fsync latency is
    # not what the ratio measures
    with ThreadPoolExecutor(8) as pool:
        futures = []
        for s, e in zip(starts, ends):
            sl = moves.slice(int(s), int(e - s))
            name = group_id(ring.shard_ids[ms[s]], ring.shard_ids[mt[s]], int(bucket[s])) + ".parquet"
            sink = pa.BufferOutputStream()
            pq.write_table(sl, sink, row_group_size=65536, compression="zstd", use_dictionary=["source", "target"],
                           write_statistics=True)
            futures.append(pool.submit(commit, name, sink.getvalue().to_pybytes()))
        for fut in futures:
            fut.result()
    dfd = os.open(moves_dir, os.O_RDONLY)
    os.fsync(dfd)
    os.close(dfd)
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - c0
    child_result({"elapsed_s": elapsed, "cpu_s": cpu, "moves": int(len(moved)), "rows": n, "moves_dir": moves_dir})


# ------------------------------------------------------------------ checking

def moves_digest(moves_dir: str) -> tuple[int, str, dict]:
    """(count, ordered digest, {file name: sha256 of bytes}) of a moves directory.

    Files are taken in (source, target, bucket) order, rows in file order, so
    equal digests mean the same moves in the same CONTRACTS order."""
    import pyarrow.parquet as pq

    from pipeline.names import parse_group_id

    names = [f for f in os.listdir(moves_dir) if f.endswith(".parquet")]

    def order(f):
        s, t, b = parse_group_id(f[: -len(".parquet")])
        return s.encode(), t.encode(), b

    names.sort(key=order)
    h = hashlib.sha256()
    count = 0
    file_hashes = {}
    for f in names:
        path = os.path.join(moves_dir, f)
        with open(path, "rb") as fh:
            file_hashes[f] = hashlib.sha256(fh.read()).hexdigest()
        t = pq.read_table(path)
        count += t.num_rows
        h.update(f.encode() + b"\n")
        h.update(t["key_hash"].combine_chunks().to_numpy(zero_copy_only=False).astype("<u8").tobytes())
        for col in ("source", "target"):
            h.update("\x1f".join(t[col].to_pylist()).encode())
        for k in t["key"].to_pylist():
            h.update(len(k).to_bytes(4, "little") + k)
    return count, h.hexdigest(), file_hashes


# ------------------------------------------------------------------ main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keys", type=int, default=10_000_000)
    ap.add_argument("--repeat", type=int, default=2, help="runs of each side, interleaved (default 2)")
    ap.add_argument("--bench-dir", default=None, help="cache/work directory (default $SHARDMOVE_BENCH_DIR or /tmp)")
    ap.add_argument("--profile", default=None, help="write a cProfile of the first planner run to this file")
    ap.add_argument("--only", choices=("planner", "baseline"), default=None, help="run one side only")
    ap.add_argument("--explicit-target", action="store_true",
                    help="also plan with an explicit target holding every key (the ring's own assignment): "
                         "explicit_* figures, with the ring planner as the baseline")
    ap.add_argument("--beam-args", default="",
                    help="Beam flags for the planner sides, one string (e.g. \"--direct_running_mode=in_memory\"): "
                         "forces an engine mode instead of the planner's automatic choice")
    ap.add_argument("--plan-threads", type=int, default=0,
                    help="the planner's plan_threads option (default 0: its automatic choice)")
    ap.add_argument("--child", choices=("planner", "baseline", "explicit"), help=argparse.SUPPRESS)
    ap.add_argument("--target", help=argparse.SUPPRESS)
    ap.add_argument("--snapshot", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child == "explicit":
        child_planner(args.snapshot, args.out, args.profile, target=args.target, beam_args=args.beam_args.split(),
                      plan_threads=args.plan_threads)
        return 0
    if args.child:
        if args.child == "planner":
            child_planner(args.snapshot, args.out, args.profile, beam_args=args.beam_args.split(),
                          plan_threads=args.plan_threads)
        else:
            child_baseline(args.snapshot, args.out, args.profile)
        return 0

    root = args.bench_dir or bench_root()
    os.makedirs(root, exist_ok=True)
    t0 = time.perf_counter()
    snap = build_snapshot(args.keys, root)
    print(f"# snapshot {snap} ready in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    log = os.path.join(root, "plan_bench.log")
    runs = {"planner": [], "baseline": [], "explicit": []}
    sides = [args.only] if args.only else ["planner", "baseline"]
    target = None
    if args.explicit_target:
        target = build_target(args.keys, root, snap)
        sides = [s for s in sides if s != "baseline"] if args.only is None else sides
        if "planner" not in sides:
            sides.insert(0, "planner")
        sides.append("explicit")
    last_dirs = {}
    for r in range(args.repeat):
        for side in sides:
            out = tempfile.mkdtemp(prefix=f"plan-{side}-", dir=root)
            argv_child = [os.path.abspath(__file__), "--child", side, "--snapshot", snap, "--out", out]
            if side == "explicit":
                argv_child += ["--target", target]
            if side != "baseline" and args.beam_args:
                argv_child += ["--beam-args=" + args.beam_args]
            if side != "baseline" and args.plan_threads:
                argv_child += ["--plan-threads", str(args.plan_threads)]
            if args.profile and side == "planner" and r == 0:
                argv_child += ["--profile", args.profile]
            res = run_child(argv_child, log=log, sample_memory=True)
            res["keys_per_s"] = res["rows"] / res["elapsed_s"]
            runs[side].append(res)
            if side in last_dirs:
                shutil.rmtree(last_dirs[side][0], ignore_errors=True)
            last_dirs[side] = (out, res["moves_dir"])
            print(f"# run {r + 1} {side}: {res['elapsed_s']:.2f}s in-process ({res['cpu_s']:.2f}s CPU), "
                  f"{res['process_wall_s']:.2f}s "
                  f"process, peak {res['peak_rss_mb']:.0f} MB RSS, {res['peak_pss_tree_mb']:.0f} MB PSS (tree)",
                  file=sys.stderr)

    emit("keys", args.keys)
    pl, bl = runs["planner"], runs["baseline"]
    for i, res in enumerate(pl, 1):
        emit(f"keys_per_s_run{i}", res["keys_per_s"])
        emit(f"peak_rss_mb_run{i}", res["peak_rss_mb"])
        emit(f"peak_pss_tree_mb_run{i}", res["peak_pss_tree_mb"])
        emit(f"peak_rss_tree_mb_run{i}", res["peak_rss_tree_mb"])
        emit(f"process_wall_s_run{i}", res["process_wall_s"])
        emit(f"cpu_s_run{i}", res["cpu_s"])
        emit(f"import_s_run{i}", res["import_s"])
    for i, res in enumerate(bl, 1):
        emit(f"baseline_keys_per_s_run{i}", res["keys_per_s"])
        emit(f"baseline_peak_rss_mb_run{i}", res["peak_rss_mb"])
        emit(f"baseline_peak_pss_tree_mb_run{i}", res["peak_pss_tree_mb"])
        emit(f"baseline_peak_rss_tree_mb_run{i}", res["peak_rss_tree_mb"])
        emit(f"baseline_process_wall_s_run{i}", res["process_wall_s"])
        emit(f"baseline_cpu_s_run{i}", res["cpu_s"])
    if pl:
        emit("keys_per_s", max(r["keys_per_s"] for r in pl))
        emit("keys_per_s_median", median([r["keys_per_s"] for r in pl]))
        emit("plan_seconds", min(r["elapsed_s"] for r in pl))
        emit("process_wall_s", min(r["process_wall_s"] for r in pl))
        emit("peak_rss_mb", max(r["peak_rss_mb"] for r in pl))
        emit("peak_pss_tree_mb", max(r["peak_pss_tree_mb"] for r in pl))
        emit("peak_rss_tree_mb", max(r["peak_rss_tree_mb"] for r in pl))
    if bl:
        emit("baseline_keys_per_s", max(r["keys_per_s"] for r in bl))
        emit("baseline_plan_seconds", min(r["elapsed_s"] for r in bl))
        emit("baseline_process_wall_s", min(r["process_wall_s"] for r in bl))
        emit("baseline_peak_rss_mb", max(r["peak_rss_mb"] for r in bl))
        emit("baseline_peak_pss_tree_mb", max(r["peak_pss_tree_mb"] for r in bl))
        emit("baseline_peak_rss_tree_mb", max(r["peak_rss_tree_mb"] for r in bl))
    if pl and bl:
        emit("ratio", max(r["keys_per_s"] for r in pl) / max(r["keys_per_s"] for r in bl))
        emit("ratio_median", median([a["keys_per_s"] / b["keys_per_s"] for a, b in zip(pl, bl)]))
        emit("cpu_ratio", min(r["cpu_s"] for r in bl) / min(r["cpu_s"] for r in pl))
        n1, d1, f1 = moves_digest(last_dirs["planner"][1])
        n2, d2, f2 = moves_digest(last_dirs["baseline"][1])
        emit("moves", n1)
        emit("baseline_moves", n2)
        emit("moves_digest", d1[:16])
        emit("same_moves", n1 == n2 and d1 == d2 and all(r["moves"] == n1 for r in pl + bl))
        emit("same_file_bytes", f1 == f2)
    ex = runs["explicit"]
    if ex and pl:
        for i, res in enumerate(ex, 1):
            emit(f"explicit_keys_per_s_run{i}", res["keys_per_s"])
            emit(f"explicit_peak_rss_mb_run{i}", res["peak_rss_mb"])
        emit("explicit_keys_per_s", max(r["keys_per_s"] for r in ex))
        emit("explicit_peak_rss_mb", max(r["peak_rss_mb"] for r in ex))
        emit("explicit_ratio_to_ring", max(r["keys_per_s"] for r in ex) / max(r["keys_per_s"] for r in pl))
        emit("explicit_ratio_to_ring_median", median([a["keys_per_s"] / b["keys_per_s"] for a, b in zip(ex, pl)]))
        n1, d1, f1 = moves_digest(last_dirs["planner"][1])
        n3, d3, f3 = moves_digest(last_dirs["explicit"][1])
        emit("explicit_moves", n3)
        emit("explicit_same_moves_as_ring", n1 == n3 and d1 == d3)
        emit("explicit_same_file_bytes_as_ring", f1 == f3)
    for side, (out, _m) in last_dirs.items():
        shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
