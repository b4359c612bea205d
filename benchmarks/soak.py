"""Kill/resume soak: SIGKILL a real migration again and again, then check nothing was lost.

    .venv/bin/python benchmarks/soak.py --keys 20000 --kills 20 --seed 7

Runs `shardmove run` as a subprocess on a demo keyspace slowed down with injected
latency, kills it with SIGKILL at seeded random moments (so kills land in copy,
verify, swap and the final checkpoint compaction), reruns it until it completes,
then checks with code independent of the executor -- reading the SQLite files and
the checkpoint Parquet files directly -- that:

* every planned key is Done or Failed with a reason;
* every Done key is mapped to its target and its target record is byte-identical
  to its original source record;
* every key not Done is still mapped to its source with its source record intact;
* no key's map row was written more than once (a trigger counts the writes).

Prints `kills:`, `keys_checked:`, `lost:`, `corrupted:`, `rewritten_map_rows:`,
`source_copies_of_done:`, `target_copies_of_failed:` and timing lines.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pipeline import workdir  # noqa: E402  (after the path is set; paths only, the checks read files directly)


def sh(*args, cwd=None):
    return subprocess.run(args, capture_output=True, text=True, cwd=cwd)


def shard_records(directory):
    out = {}
    for f in glob.glob(os.path.join(directory, "*.sqlite")):
        shard = os.path.basename(f)[: -len(".sqlite")]
        con = sqlite3.connect(f)
        out[shard] = dict(con.execute("SELECT key, value FROM records"))
        con.close()
    return out


def map_rows(path):
    con = sqlite3.connect(path)
    rows = dict(con.execute("SELECT key, shard_id FROM shard_map"))
    con.close()
    return rows


def merged_states(plan_dir):
    """Per key: the checkpoint record with the highest (epoch, attempts, state)."""
    best = {}
    for f in glob.glob(os.path.join(workdir.checkpoints_dir(plan_dir), "*", "*.parquet")):
        try:
            t = pq.read_table(f)
        except Exception:
            continue  # a damaged file is not data
        cols = [t[c].to_pylist() for c in ("key", "epoch", "attempts", "state", "reason")]
        for k, ep, at, st, rs in zip(*cols):
            rank = (ep, at, st)
            if k not in best or rank > best[k][0]:
                best[k] = (rank, st, rs)
    return {k: (v[1], v[2]) for k, v in best.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, default=20000)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--dir", default=None, help="work in this directory (default: a fresh temp dir)")
    ap.add_argument("--max-delay", type=float, default=5.0, help="longest wait before a kill, seconds")
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    base = args.dir or tempfile.mkdtemp(prefix="shardmove-soak-")
    sm = os.path.join(os.path.dirname(sys.executable), "shardmove")
    demo = os.path.join(base, "demo")
    r = sh(sm, "demo", demo, "--keys", str(args.keys), "--shards", "4")
    if r.returncode:
        sys.exit(f"demo failed: {r.stderr}")
    cfg = os.path.join(demo, "shardmove.yaml")
    with open(cfg, "a") as f:
        f.write("swap_batch_size: 200\nhash_buckets: 8\ncheckpoint_flush_interval: 200ms\n"
                "faults: {seed: %d, copy: {latency_ms: 15, transient_rate: 0.02}, verify: {latency_ms: 5},"
                " swap: {latency_ms: 120, transient_rate: 0.05}}\n" % args.seed)
    from pipeline.config import load_config

    c = load_config(cfg)
    original = shard_records(c.data_store["directory"])
    original_map = map_rows(c.map_store["path"])
    con = sqlite3.connect(c.map_store["path"])
    con.executescript("""CREATE TABLE IF NOT EXISTS soak_writes(key TEXT);
        CREATE TRIGGER IF NOT EXISTS soak_count AFTER UPDATE ON shard_map
        BEGIN INSERT INTO soak_writes VALUES (NEW.key); END;""")
    con.commit()
    con.close()
    r = sh(sm, "plan", "--config", cfg)
    if r.returncode:
        sys.exit(f"plan failed: {r.stderr}")
    plan_id = next(l.split(": ", 1)[1] for l in r.stdout.splitlines() if l.startswith("plan id: "))
    plan_dir = workdir.plan_dir(c.work_dir, plan_id)
    t0 = time.time()
    kills = runs = 0
    while True:
        runs += 1
        p = subprocess.Popen([sm, "run", plan_id, "--config", cfg], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        if kills < args.kills:
            delay = rng.uniform(0.3, args.max_delay)
            try:
                p.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                p.send_signal(signal.SIGKILL)
                p.wait()
                kills += 1
                continue
        out, err = p.communicate()
        if p.returncode in (0, 3):
            break
        if p.returncode != -signal.SIGKILL:
            sys.exit(f"run failed with exit {p.returncode}: {err.strip().splitlines()[-1:]}")
    elapsed = time.time() - t0

    # ---- independent checks
    manifest = json.load(open(workdir.manifest_path(plan_dir)))
    moves = []
    for f in manifest["files"]:
        t = pq.read_table(workdir.move_file(plan_dir, f["group"]))
        moves += zip(t["key"].to_pylist(), t["source"].to_pylist(), t["target"].to_pylist())
    states = merged_states(plan_dir)
    now_map = map_rows(c.map_store["path"])
    now = shard_records(c.data_store["directory"])
    con = sqlite3.connect(c.map_store["path"])
    rewritten = con.execute("SELECT count(*) FROM (SELECT key FROM soak_writes GROUP BY key HAVING count(*) > 1)"
                            ).fetchone()[0]
    con.close()
    lost = corrupted = src_copies = tgt_copies = undecided = 0
    for key, src, tgt in moves:
        text = key.decode("utf-8")
        st, reason = states.get(key, (0, None))
        orig = original[src][text]
        if st == 6:  # Done
            if now_map.get(text) != tgt or text not in now.get(tgt, {}):
                lost += 1
            elif now[tgt][text] != orig:
                corrupted += 1
            src_copies += text in now.get(src, {})
        else:
            if st != 7 or not reason:
                undecided += 1
            if now_map.get(text) != src or text not in now.get(src, {}):
                lost += 1
            elif now[src][text] != orig:
                corrupted += 1
            tgt_copies += text in now.get(tgt, {})
    moved = {k.decode() for k, _s, _t in moves}
    for text, shard in original_map.items():  # keys outside the plan are untouched
        if text not in moved and (now_map.get(text) != shard or now[shard].get(text) != original[shard][text]):
            corrupted += 1
    print(f"keys: {args.keys}")
    print(f"planned: {len(moves)}")
    print(f"kills: {kills}")
    print(f"runs: {runs}")
    print(f"keys_checked: {len(original_map)}")
    print(f"undecided: {undecided}")
    print(f"lost: {lost}")
    print(f"corrupted: {corrupted}")
    print(f"rewritten_map_rows: {rewritten}")
    print(f"source_copies_of_done: {src_copies}")
    print(f"target_copies_of_failed: {tgt_copies}")
    print(f"done: {sum(1 for k, _s, _t in moves if states.get(k, (0,))[0] == 6)}")
    print(f"failed: {sum(1 for k, _s, _t in moves if states.get(k, (0,))[0] == 7)}")
    print(f"elapsed_s: {elapsed:.1f}")
    return 0 if lost == corrupted == undecided == rewritten == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
