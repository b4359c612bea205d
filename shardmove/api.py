"""The Python API: what the CLI calls, for schedulers and notebooks too.

    from pipeline.config import load_config
    from shardmove import api
    cfg = load_config("demo/shardmove.yaml")   # written by ./run_local.sh or `shardmove demo demo`
    result = api.plan(cfg)            # PlanResult(plan_id, plan_dir, manifest, ...)
"""
from __future__ import annotations

import os
from typing import Callable, Sequence

import yaml

from pipeline.config import Config
from pipeline.errors import before_changes
from pipeline.keys import KeyType, stable_hashes
from pipeline.ring import Ring
from pipeline.snapshot import take_snapshot
from pipeline.stores import open_data_store, open_map_store
from shardmove.demo import create_demo
from shardmove.executor import plan_status, run_plan
from shardmove.planner import make_plan

__all__ = ["create_demo_keyspace", "snapshot", "plan", "run", "status"]


def create_demo_keyspace(directory: str, *, keys: int = 20000, shards: int = 4, key_type: str = "string",
                         seed: int = 0) -> dict:
    """An embedded keyspace (SQLite map + one SQLite file per shard) and a
    config whose target adds one shard.  Creates nothing that exists."""
    kt = KeyType(key_type)
    directory = os.path.abspath(directory)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    cfg_path = os.path.join(directory, "shardmove.yaml")
    ks = os.path.join(directory, "keyspace")
    current = [f"s{i}" for i in range(shards)]
    target = current + [f"s{shards}"]
    info = {"keys": keys, "config": cfg_path, "created": False}
    if not os.path.exists(os.path.join(ks, "map.sqlite")):
        ring = Ring.build("native", [(s, 1.0) for s in current], key_type=kt)

        def assign(batch: list[bytes]) -> list[str]:
            idx = ring.assign(batch, stable_hashes(batch, len(batch)))
            return [ring.shard_ids[i] for i in idx]

        counts = create_demo(ks, keys=keys, shards=current, key_type=kt, assign=assign, seed=seed)
        info.update(counts if isinstance(counts, dict) else {})
        info["keys"] = keys
        info["created"] = True
    if not os.path.exists(cfg_path):
        per_shard = max(1, keys // len(target))
        doc = {
            "key_type": kt.value,
            "work_dir": "work",
            "map_store": {"kind": "sqlite", "path": "keyspace/map.sqlite"},
            "data_store": {"kind": "sqlite", "directory": "keyspace/shards"},
            "current_shards": current,
            "target": {
                "profile": "native",
                "shards": [{"id": s, "weight": 1, "capacity_keys": int(per_shard * 1.6) + 10} for s in target],
            },
            "copy_concurrency": 8,
            "swap_batch_size": 500,
            "hash_buckets": 4,
        }
        fd = os.open(cfg_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"# shardmove demo keyspace: {len(current)} shard{'s' if len(current) != 1 else ''} today, "
                    f"the target adds {target[-1]}.\n")
            yaml.safe_dump(doc, f, sort_keys=False)
    return info


def snapshot(cfg: Config):
    with before_changes():
        store = open_map_store(cfg)
        return take_snapshot(store, cfg.work_dir, cfg.opt("segment_size"), cfg.key_type)


def plan(cfg: Config, *, snapshot: str | None = None, dry_run: bool = False, beam_args: Sequence[str] = (),
         out: Callable[[str], None] = print):
    with before_changes():  # planning only reads the stores: one it cannot use is bad configuration
        map_store = None
        if snapshot is None and cfg.snapshot is None:
            map_store = open_map_store(cfg)
        data_store = None
        if any(s.capacity_bytes for s in cfg.target_shards) or cfg.data_store.get("kind") == "objects":
            data_store = open_data_store(cfg)  # record sizes, or object-name limits checked at plan time
        return make_plan(cfg, map_store=map_store, data_store=data_store, snapshot=snapshot, dry_run=dry_run,
                         beam_args=beam_args, out=out)


def run(cfg: Config, plan_dir: str, *, retry_failed: bool = False, allow_drift: bool = False,
        beam_args: Sequence[str] = (), out: Callable[[str], None] = print):
    """Execute (or resume) a plan; returns ``RunResult`` with ``exit_code`` and ``summary``."""
    return run_plan(cfg, plan_dir, retry_failed=retry_failed, allow_drift=allow_drift, beam_args=beam_args,
                    out=out)


def status(plan_dir: str) -> dict:
    """Per-state counts, failures by reason, verification methods, lease holder."""
    return plan_status(plan_dir)
