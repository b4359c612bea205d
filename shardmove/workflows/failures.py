"""``shardmove failures``: export every Failed key of a plan.

    export_failures(cfg, plan_dir, "failed.parquet")   # -> FailuresResult

The export is the only file of the operator workflows that holds key values
(Parquet, :data:`FAILURES_SCHEMA`, created 0600); what is printed is counts
by reason, never a key.  Reads the plan's merged checkpoints, so the result
does not depend on how many runs it took; store calls go in batches of
``swap_batch_size`` keys.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import fs
from pipeline import keys as K
from pipeline import states as S
from pipeline.config import Config
from pipeline.stores import open_data_store, open_map_store
from pipeline.workdir import load_manifest
from shardmove.workflows._common import batch_size, bump, check_key_type, chunks, groups, merged

__all__ = ["FAILURES_SCHEMA", "FailuresResult", "export_failures"]

#: Columns of ``shardmove failures --out FILE``.
FAILURES_SCHEMA = pa.schema([
    ("key", pa.binary()),                 # canonical key bytes
    ("key_text", pa.string()),            # the key type's text form
    ("key_hash", pa.uint64()),            # stable hash (xxh3-64)
    ("key_id", pa.string()),              # first 12 hex digits of key_hash (as in logs)
    ("source", pa.string()),
    ("target", pa.string()),
    ("state", pa.string()),               # last merged state: "failed"
    ("failed_in", pa.string()),           # copy | verify | swap | drift | unknown (from the reason)
    ("reason", pa.string()),
    ("attempts", pa.int32()),
    ("epoch", pa.int64()),
    ("time_ms", pa.int64()),
    ("time", pa.timestamp("ms", tz="UTC")),
    ("map_shard", pa.string()),           # where the map points now (null: not in the map)
    ("target_copy", pa.bool_()),          # a record for the key exists on the target shard
])

_STAGE_OF_REASON = {
    S.SOURCE_MISSING: "copy", S.SHARD_MISSING: "copy", S.COPY_FAILED: "copy", S.PERMANENT: "copy",
    S.VERIFY_MISMATCH: "verify", S.VERIFY_FAILED: "verify",
    S.MAP_CHANGED: "swap", S.SWAP_FAILED: "swap", S.SOURCE_CHANGING: "swap",
    S.DRIFTED: "drift",
}


@dataclass
class FailuresResult:
    """What ``export_failures`` wrote (counts only; the keys are in ``path``)."""

    plan_id: str
    path: str
    failed: int
    by_reason: dict
    target_copies: int                       # failed keys with a record on their target shard
    target_copies_by_shard: dict
    target_copies_removable: int             # ... of which the map still points at the source


def export_failures(cfg: Config, plan_dir: str, path: str, *, out: Callable[[str], None] = print) -> FailuresResult:
    """Write every Failed key of the plan to ``path`` (Parquet, :data:`FAILURES_SCHEMA`, 0600).

    ``target_copy`` tells whether the key left a copy on its target shard (a
    failure after the copy, e.g. ``verify_mismatch`` or ``map_changed``);
    ``shardmove cleanup`` removes those while the map still points at the
    source.  Prints counts by reason, never keys.
    """
    manifest = load_manifest(plan_dir)
    check_key_type(cfg, manifest)
    plan_id = manifest["plan_id"]
    kt = cfg.key_type
    ms = open_map_store(cfg)
    ds = open_data_store(cfg)
    B = batch_size(cfg)
    sink = pa.BufferOutputStream()
    writer = pq.ParquetWriter(sink, FAILURES_SCHEMA.with_metadata({"format_version": "1", "plan_id": plan_id}),
                              compression="zstd")
    by_reason: dict = {}
    copies: dict = {}
    removable = 0
    failed = 0
    try:
        for gid, source, target in groups(manifest):
            t = merged(plan_dir, plan_id, gid, S.State.FAILED)
            if not t.num_rows:
                continue
            keys = t.column("key").to_pylist()
            current: dict = {}
            present: set = set()
            for a, b in chunks(len(keys), B):
                current.update(ms.lookup(keys[a:b]))
                if ds is not None:
                    present.update(ds.hashes(keys[a:b], target))
            reasons = [r or "unspecified" for r in t.column("reason").to_pylist()]
            map_shard = [current.get(k, (None,))[0] for k in keys]
            has_copy = [k in present for k in keys] if ds is not None else [None] * len(keys)
            hashes = t.column("key_hash").to_numpy(zero_copy_only=False)
            time_ms = t.column("time_ms").cast(pa.int64())
            table = pa.table({
                "key": t.column("key").cast(pa.binary()),
                "key_text": pa.array(K.text_array(keys, kt), pa.string()),
                "key_hash": t.column("key_hash"),
                "key_id": pa.array([K.short_hash(h) for h in hashes.tolist()], pa.string()),
                "source": pa.array([source] * len(keys), pa.string()),
                "target": pa.array([target] * len(keys), pa.string()),
                "state": pa.array([str(S.State.FAILED)] * len(keys), pa.string()),
                "failed_in": pa.array([_STAGE_OF_REASON.get(r, "unknown") for r in reasons], pa.string()),
                "reason": pa.array(reasons, pa.string()),
                "attempts": t.column("attempts").cast(pa.int32()),
                "epoch": t.column("epoch").cast(pa.int64()),
                "time_ms": time_ms,
                "time": time_ms.cast(pa.timestamp("ms", tz="UTC")),
                "map_shard": pa.array(map_shard, pa.string()),
                "target_copy": pa.array(has_copy, pa.bool_()),
            }, schema=FAILURES_SCHEMA)
            writer.write_table(table)
            failed += len(keys)
            for r in reasons:
                bump(by_reason, r)
            n_copies = sum(1 for c in has_copy if c)
            bump(copies, target, n_copies)
            removable += sum(1 for c, m in zip(has_copy, map_shard) if c and m == source)
        writer.close()
    except BaseException:
        writer.close()
        raise
    fs.write_atomic(path, sink.getvalue().to_pybytes(), mode=0o600)
    res = FailuresResult(plan_id, path, failed, dict(sorted(by_reason.items())), sum(copies.values()),
                         dict(sorted(copies.items(), key=lambda kv: kv[0].encode())), removable)
    out(f"plan id: {plan_id}")
    out(f"failed: {res.failed}")
    for r, n in res.by_reason.items():
        out(f"failed[{r}]: {n}")
    out(f"target copies left behind: {res.target_copies} (removable by cleanup: {res.target_copies_removable})")
    for s, n in res.target_copies_by_shard.items():
        out(f"target_copies[{s}]: {n}")
    out(f"failures file: {path} (owner-only; holds key values)")
    return res
