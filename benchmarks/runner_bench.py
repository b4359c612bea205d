#!/usr/bin/env python
"""Planner and executor throughput per runner, in one run, on the same inputs.

    .venv/bin/python benchmarks/runner_bench.py [--keys 100000] [--runners in_memory,multi_process,prism,flink]

One demo keyspace of ``--keys`` keys on 4 SQLite shards whose target adds a
5th (about a fifth of the keys move) is built once and snapshotted once.  For
each runner, on a fresh copy of it:

- ``<runner>_plan_keys_per_s``: snapshot keys / wall seconds of ``make_plan``
  (the Beam plan pipeline, validation and commit; the snapshot is shared, so
  it is not timed);
- ``<runner>_run_keys_per_s``: moved keys / wall seconds of ``api.run``
  (copy, verify, swap, checkpoints, lease, summary);
- ``<runner>_plan_s`` and ``<runner>_run_s``: the wall times themselves,
  start-up included (Prism starts a Go process and SDK workers per pipeline).

An untimed warm-up plan and run on a tiny keyspace comes first, so that
imports and first-use costs do not land on the first runner measured.

Every runner must produce the same plan id and the same summary; the
benchmark fails otherwise.  Runners:

- ``in_memory``: FnApiRunner, one process (the default engine);
- ``multi_process``: FnApiRunner with 2 SDK worker processes;
- ``prism``: PrismRunner with the binary from ``python -m transforms.engines prism``;
- ``flink``: needs Beam's Flink job-server jar; when none can be had it prints
  ``flink_status: unavailable`` and the reason on stderr.

Figures are ``name: value`` lines; notes go to stderr as ``# ...``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def note(msg: str) -> None:
    sys.stderr.write(f"# {msg}\n")
    sys.stderr.flush()


def _quiet(_line: str) -> None:
    pass


def runner_args(name: str) -> list[str] | None:
    from transforms import engines
    from pipeline.errors import BadInput

    if name == "in_memory":
        return ["--runner=FnApiRunner"]
    if name == "multi_process":
        return ["--runner=FnApiRunner", "--direct_running_mode=multi_processing", "--direct_num_workers=2"]
    if name == "prism":
        return ["--runner=PrismRunner", f"--prism_location={engines.ensure_prism(log=note)}"]
    if name == "flink":
        from apache_beam.options.pipeline_options import PipelineOptions

        try:
            engines.require_java("FlinkRunner")
            jar = engines.find_job_server_jar("FlinkRunner", PipelineOptions(["--flink_version=1.19"]), None)
        except BadInput as e:
            note(f"flink: {e}")
            return None
        return ["--runner=FlinkRunner", "--flink_master=[local]", "--flink_version=1.19", "--parallelism=2",
                "--environment_type=LOOPBACK", f"--flink_job_server_jar={jar}"]
    raise SystemExit(f"unknown runner {name}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keys", type=int, default=100_000)
    ap.add_argument("--runners", default="in_memory,multi_process,prism,flink")
    a = ap.parse_args(argv)

    import logging

    logging.basicConfig(level=logging.ERROR)
    for noisy in ("apache_beam", "PrismRunner"):
        logging.getLogger(noisy).setLevel(logging.ERROR)

    from shardmove import api
    from pipeline.config import load_config
    from shardmove.planner import make_plan

    work = tempfile.mkdtemp(prefix="runner-bench-")
    try:
        pristine = os.path.join(work, "pristine")
        t = time.perf_counter()
        api.create_demo_keyspace(pristine, keys=a.keys, shards=4)
        snap = api.snapshot(load_config(os.path.join(pristine, "shardmove.yaml"))).location
        note(f"keyspace of {a.keys} keys and its snapshot in {time.perf_counter() - t:.1f}s")
        print(f"keys: {a.keys}")
        # warm-up, untimed: imports and first-use costs would otherwise land on the first runner
        warm = os.path.join(work, "warm")
        api.create_demo_keyspace(warm, keys=500, shards=4)
        wcfg = load_config(os.path.join(warm, "shardmove.yaml"))
        api.run(wcfg, api.plan(wcfg, beam_args=["--runner=FnApiRunner"], out=_quiet).plan_dir,
                beam_args=["--runner=FnApiRunner"], out=_quiet)
        expected = None
        for name in a.runners.split(","):
            args = runner_args(name)
            if args is None:
                print(f"{name}_status: unavailable")
                continue
            d = os.path.join(work, name)
            shutil.copytree(pristine, d)
            cfg = load_config(os.path.join(d, "shardmove.yaml"))
            t = time.perf_counter()
            res = make_plan(cfg, snapshot=snap, beam_args=args, out=_quiet)
            plan_s = time.perf_counter() - t
            t = time.perf_counter()
            run = api.run(cfg, res.plan_dir, beam_args=args, out=_quiet)
            run_s = time.perf_counter() - t
            s = run.summary
            got = (res.plan_id, s["planned"], s["done"], s["failed"])
            if run.exit_code != 0 or (expected is not None and got != expected):
                raise SystemExit(f"{name}: differs from the first runner: {got} vs {expected} (exit {run.exit_code})")
            expected = got
            print(f"{name}_plan_keys_per_s: {a.keys / plan_s:.0f}")
            print(f"{name}_run_keys_per_s: {s['done'] / run_s:.0f}")
            print(f"{name}_plan_s: {plan_s:.2f}")
            print(f"{name}_run_s: {run_s:.2f}")
            sys.stdout.flush()
        print(f"moves: {expected[1] if expected else 0}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
