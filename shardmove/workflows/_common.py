"""What the operator workflows share: the plan's groups and merged checkpoints,
batching, the checks made before anything is modified, the plan's lease and
the list of its rollback plans."""
from __future__ import annotations

import json
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import checkpoint as ckpt
from pipeline import fs
from pipeline import states as S
from pipeline.config import Config
from pipeline.errors import BadInput, before_changes
from pipeline.lease import acquire
from pipeline.stores import open_data_store, open_map_store
from pipeline.stores.base import ShardInventory

__all__ = ["groups", "merged", "chunks", "batch_size", "bump", "check_key_type", "require_data_store",
           "probe_stores", "plan_lease", "ROLLBACKS", "rollback_ids"]

#: ``<plan>/rollbacks.json``: the ids of the plan's rollback plans, oldest first.
ROLLBACKS = "rollbacks.json"


def groups(manifest: dict) -> Iterator[tuple[str, str, str]]:
    """(group id, source, target) of every moves file of the plan."""
    for f in manifest["files"]:
        yield f["group"], f["source"], f["target"]


def merged(plan_dir: str, plan_id: str, gid: str, state: S.State | None = None) -> pa.Table:
    """The group's merged checkpoint rows (one per key), only those in ``state`` if given."""
    t = ckpt.read_group(plan_dir, plan_id, gid).table
    if state is not None and t.num_rows:
        t = t.filter(pc.equal(t.column("state"), int(state)))
    return t


def chunks(n: int, size: int) -> Iterator[tuple[int, int]]:
    for a in range(0, n, size):
        yield a, min(n, a + size)


def batch_size(cfg: Config) -> int:
    """Keys per store call: ``swap_batch_size``."""
    return max(1, int(cfg.opt("swap_batch_size")))


def bump(d: dict, k: str, n: int = 1) -> None:
    if n:
        d[k] = d.get(k, 0) + n


def check_key_type(cfg: Config, manifest: dict) -> None:
    if manifest["key_type"] != cfg.key_type.value:
        raise BadInput(f"plan key_type {manifest['key_type']} differs from the configuration's {cfg.key_type.value}")


def require_data_store(cfg: Config, what: str):
    ds = open_data_store(cfg)
    if ds is None:
        raise BadInput(f"{what}: needs a data store (data_store.kind is none)")
    return ds


def probe_stores(cfg: Config, manifest: dict) -> None:
    """Use the map store and the plan's shards once before anything is modified,
    so that a store that cannot be opened, reached or read is bad configuration
    (exit 2) rather than a failure halfway through."""
    with before_changes():
        open_map_store(cfg).max_version()
        ds = open_data_store(cfg)
        if isinstance(ds, ShardInventory):
            for p in manifest.get("pairs", ()):
                ds.shard_exists(p["source"])
                ds.shard_exists(p["target"])


def plan_lease(cfg: Config, plan_dir: str, manifest: dict):
    """Take the plan's executor lease (exit 4 while a run holds it) and keep it renewed."""
    lease = acquire(plan_dir, manifest["plan_id"], cfg.opt("lease_ttl"))
    lease.start_renewing()
    return lease


def plan_lease_and_claim(cfg: Config, plan_dir: str, manifest: dict):
    """:func:`plan_lease`, and the plan's window claimed in the map store's run registry
    (where it has one) for as long as the lease is held, renewed with it: ``(lease, claim
    store or None)``; give both back with :func:`release_lease_and_claim`.

    For a command that changes data of keys another plan may be moving (cleanup): a live
    run of an overlapping plan refuses it (exit 4), and no overlapping run can start
    while it holds the claim -- the claim rule of runs (:mod:`pipeline.stores.claims`)."""
    import time

    from shardmove.executor import open_claim

    plan_id, ttl = manifest["plan_id"], cfg.opt("lease_ttl")
    lease = acquire(plan_dir, plan_id, ttl)
    try:
        claim = open_claim(cfg, manifest, lease)
    except BaseException:
        lease.release()
        raise
    lease.start_renewing(also=(None if claim is None else
                               lambda: claim.renew_run(plan_id, lease.epoch, ttl, time.time())))
    return lease, claim


def release_lease_and_claim(lease, claim) -> None:
    """Give back what :func:`plan_lease_and_claim` took: the claim, then the lease (each
    tried even if the other fails; a claim not given back expires after lease_ttl)."""
    from shardmove.executor import _release

    try:
        _release(claim, lease.plan_id, lease)
    finally:
        if claim is not None:
            claim.close()


def rollback_ids(plan_dir: str) -> list[str]:
    """The ids of the plan's rollback plans (``rollbacks.json``), oldest first."""
    path = fs.join(plan_dir, ROLLBACKS)
    if not fs.exists(path):
        return []
    try:
        return list(json.loads(fs.read_bytes(path)).get("rollback_plans", []))
    except ValueError as e:
        raise BadInput(f"{ROLLBACKS} of the plan is not valid JSON") from e
