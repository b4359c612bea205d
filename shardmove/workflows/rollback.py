"""``shardmove rollback``: reverse migration of a plan's Done keys, resumable.

    rollback(cfg, plan_dir)              # -> RollbackResult
    build_rollback_plan(cfg, plan_dir)   # -> RollbackPlan (commits the plan only)

A rollback is an ordinary plan (``<work>/plans/<rollback id>/``, its moves
from the plan's target back to its source) run by the ordinary executor, with
its own checkpoints, lease and resume.  The original plan lists its rollback
plans in ``<plan>/rollbacks.json``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import fs
from pipeline import plancore as core
from pipeline import states as S
from pipeline import workdir
from pipeline.config import Config
from pipeline.errors import EXIT_FAILED_KEYS, EXIT_OK
from pipeline.names import group_id
from pipeline.stores import close_opened, open_map_store
from pipeline.stores.base import ChangeCounter
from pipeline.workdir import MANIFEST_FORMAT_VERSION, load_manifest
from shardmove.executor import free_stale_claim, run_plan, summarize
from shardmove.workflows._common import (ROLLBACKS, batch_size, bump, check_key_type, chunks, groups, merged,
                                         plan_lease, probe_stores, require_data_store, rollback_ids)

__all__ = ["RollbackPlan", "RollbackResult", "build_rollback_plan", "rollback", "rollback_plan_id"]

LOG = logging.getLogger(__name__)


def rollback_plan_id(original_plan_id: str, keyset_digest: str) -> str:
    """sha256 (hex) of the canonical JSON ``["rollback", <original plan id>, <key set digest>]``."""
    text = json.dumps(["rollback", original_plan_id, keyset_digest], separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class RollbackPlan:
    """A committed rollback plan (or none: ``plan_dir`` None when nothing is eligible)."""

    plan_id: str | None
    plan_dir: str | None
    rollback_of: str
    moves: int
    examined: int                  # Done keys of the original plan
    already_at_source: int         # Done keys whose map already points at the original source
    refused: dict                  # reason -> keys never moved back
    created: bool = False
    pairs: list = field(default_factory=list)   # a dry run's reverse moves per (source, target)


@dataclass
class RollbackResult:
    rollback_of: str
    plan: RollbackPlan | None
    resumed: bool
    run: object | None             # shardmove.executor.RunResult
    exit_code: int
    dry_run: bool = False

    @property
    def plan_id(self) -> str | None:
        return self.plan.plan_id if self.plan else None


def _record_rollback(plan_dir: str, rid: str) -> None:
    ids = rollback_ids(plan_dir)
    if rid not in ids:
        ids.append(rid)
        fs.write_atomic(fs.join(plan_dir, ROLLBACKS),
                        json.dumps({"format_version": 1, "rollback_plans": ids}, indent=1).encode())


def _plan_from_manifest(d: str, m: dict) -> RollbackPlan:
    return RollbackPlan(m["plan_id"], d, m.get("rollback_of"), int(m["moves"]), int(m.get("keys_examined", 0)),
                        int(m.get("already_at_source", 0)), dict(m.get("refused", {})))


def build_rollback_plan(cfg: Config, plan_dir: str, *, out: Callable[[str], None] = print,
                        dry_run: bool = False) -> RollbackPlan:
    """Commit ``<work>/plans/<rollback id>/``: the reverse moves of the plan's Done keys.

    Eligible: Done keys whose map still points at the plan's target and whose
    target record exists.  Refused (counted, never moved): ``not_at_target``
    (the map points at a third shard, or the key left the map),
    ``target_record_missing``, and ``source_newer`` -- the stale record on the
    original source has a *higher* version than the target's current one, so
    the copy back (an upsert that never overwrites a higher version) would
    not apply; resolve those by hand.  Keys already back at the original
    source are counted as ``already_at_source``.

    Moves are ``(key, source=plan target, target=plan source)``, written with
    :func:`transforms.plan.write_moves_bytes`, one file per (source, target,
    bucket) with the plan's ``hash_buckets``; the manifest has the planner's
    format plus ``rollback_of``, ``refused`` and ``already_at_source``.
    Idempotent: the same key set gives the same plan id and files.  ``dry_run``: the same
    scan and counts (and plan id), with nothing written: ``plan_dir`` stays None and
    ``pairs`` holds the reverse moves per (source, target).
    """
    from transforms.plan import write_moves_bytes  # deferred: transforms.plan loads Apache Beam

    manifest = load_manifest(plan_dir)
    check_key_type(cfg, manifest)
    orig = manifest["plan_id"]
    ms = open_map_store(cfg)
    ds = require_data_store(cfg, "rollback")
    buckets = int(manifest.get("hash_buckets") or cfg.opt("hash_buckets"))
    B = batch_size(cfg)
    t0 = time.time()
    cutoff = ms.max_version() if isinstance(ms, ChangeCounter) else None
    staging = None if dry_run else workdir.new_staging(workdir.plans_dir(cfg.work_dir))
    if staging is not None:
        fs.makedirs(workdir.moves_dir(staging))
    refused: dict = {}
    at_source = 0
    examined = 0
    lanes = (0, 0, 0)
    files: dict = {}
    try:
        for gid, source, target in groups(manifest):
            t = merged(plan_dir, orig, gid, S.State.DONE)
            if not t.num_rows:
                continue
            examined += t.num_rows
            keys = t.column("key").to_pylist()
            hashes = t.column("key_hash").to_numpy(zero_copy_only=False)
            keep: list = []
            for a, b in chunks(len(keys), B):
                batch = keys[a:b]
                cur = ms.lookup(batch)
                at_target = []
                for i, k in enumerate(batch, start=a):
                    where = cur.get(k, (None,))[0]
                    if where == target:
                        at_target.append(i)
                    elif where == source:
                        at_source += 1
                    else:
                        bump(refused, "not_at_target")
                if not at_target:
                    continue
                ks = [keys[i] for i in at_target]
                tgt_rec = ds.hashes(ks, target)
                src_rec = ds.hashes(ks, source)
                for i, k in zip(at_target, ks):
                    if k not in tgt_rec:
                        bump(refused, "target_record_missing")
                    elif k in src_rec and src_rec[k][1] is not None and tgt_rec[k][1] is not None \
                            and src_rec[k][1] > tgt_rec[k][1]:
                        bump(refused, "source_newer")
                    else:
                        keep.append(i)
            if not keep:
                continue
            kh = hashes[keep].astype(np.uint64)
            lanes = core._add_digest(lanes, core.digest_lanes(
                kh, core._shard_hash_array(pa.array([target] * len(keep), pa.string()))))
            moves = pa.table({"key": pa.array([keys[i] for i in keep], pa.binary()),
                              "source": pa.array([target] * len(keep), pa.string()),
                              "target": pa.array([source] * len(keep), pa.string()),
                              "key_hash": pa.array(kh, pa.uint64())})
            bk = core.bucket_of(kh, buckets)
            for bucket in np.unique(bk).tolist():
                gid_r = group_id(target, source, int(bucket))
                part = moves.filter(pa.array(bk == bucket))
                if staging is None:  # a dry run counts only
                    prev = files.get(gid_r, {}).get("rows", 0)
                    files[gid_r] = {"group": gid_r, "source": target, "target": source, "bucket": int(bucket),
                                    "rows": prev + part.num_rows}
                    continue
                path = workdir.move_file(staging, gid_r)
                if gid_r in files:  # the same group from two source groups (not with one bucket count)
                    with fs.open_input(path) as fh:
                        part = pa.concat_tables([pq.read_table(fh), part])
                data = write_moves_bytes(part)
                fs.write_atomic(path, data)
                files[gid_r] = {"group": gid_r, "source": target, "target": source, "bucket": int(bucket),
                                "rows": part.num_rows, "bytes": len(data),
                                "sha256": hashlib.sha256(data).hexdigest()}
        n = sum(f["rows"] for f in files.values())
        refused = dict(sorted(refused.items()))
        if n == 0:
            if staging is not None:
                fs.rmtree(staging)
            return RollbackPlan(None, None, orig, 0, examined, at_source, refused)
        digest = core.digest_hex(*lanes)
        rid = rollback_plan_id(orig, digest)
        flist = sorted(files.values(), key=lambda f: (f["source"].encode(), f["target"].encode(), f["bucket"]))
        pairs: dict = {}
        before: dict = {}
        after: dict = {}
        for f in flist:
            bump(pairs, (f["source"], f["target"]), f["rows"])
            bump(before, f["source"], f["rows"])
            bump(after, f["target"], f["rows"])
        if staging is None:
            return RollbackPlan(rid, None, orig, n, examined, at_source, refused, pairs=[
                {"source": s, "target": t, "moves": c}
                for (s, t), c in sorted(pairs.items(), key=lambda kv: (kv[0][0].encode(), kv[0][1].encode()))])
        new_manifest = {
            "format_version": MANIFEST_FORMAT_VERSION,
            "plan_id": rid,
            "rollback_of": orig,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "key_type": manifest["key_type"],
            "window": None,
            "hash_buckets": buckets,
            "snapshot": {"digest": digest, "location": None, "cutoff": cutoff, "rows_above_cutoff": 0},
            "target": {"rollback_of": orig},
            "keys_examined": examined,
            "keys_in_window": examined,
            "moves": n,
            "moved_fraction": n / examined if examined else 0.0,
            "optimum_moved_fraction": n / examined if examined else 0.0,
            "pairs": [{"source": s, "target": t, "moves": c} for (s, t), c in
                      sorted(pairs.items(), key=lambda kv: (kv[0][0].encode(), kv[0][1].encode()))],
            "shards_before": dict(sorted(before.items())),
            "shards_after": dict(sorted(after.items())),
            "files": flist,
            "capacity": [],
            "refused": refused,
            "already_at_source": at_source,
            "planner_seconds": round(time.time() - t0, 3),
        }
        workdir.write_manifest(staging, new_manifest)
        final = workdir.plan_dir(cfg.work_dir, rid)
        # recorded first: a kill between the two leaves an id without a plan, which every
        # reader skips, never a committed rollback plan that cleanup and rollback cannot see
        _record_rollback(plan_dir, rid)
        created = workdir.commit_staged(staging, final, workdir.MANIFEST)
        LOG.info("rollback plan %s of %s: %d moves in %d files", rid[:12], orig[:12], n, len(flist))
        return RollbackPlan(rid, final, orig, n, examined, at_source, refused, created)
    except BaseException:
        if staging is not None:
            fs.rmtree(staging)
        raise
    finally:
        close_opened([(cfg.map_store, ms), (cfg.data_store, ds)])


def rollback(cfg: Config, plan_dir: str, *, apply: bool = False, beam_args: Sequence[str] = (),
             out: Callable[[str], None] = print, progress: str = "auto",
             warn: Callable[[str], None] | None = None) -> RollbackResult:
    """Reverse migration of the plan's Done keys, resumable.

    Without ``apply`` it is a dry run, as ``cleanup``: it prints what ``--apply`` would do
    (the reverse plan's counts per pair, or the unfinished rollback it would resume),
    takes no lease, writes nothing, and exits 0.

    Holds the original plan's lease throughout (no run or cleanup of it
    meanwhile; exit 4 if one is running).  An unfinished rollback plan of
    this plan (listed in ``<plan>/rollbacks.json``) is resumed; otherwise a
    new one is built (:func:`build_rollback_plan`) from the keys still at the
    target -- so rerunning after a complete rollback only picks up keys that
    were not rolled back (e.g. they failed), and says "nothing to do" when
    there are none.  The rollback plan is executed by the ordinary executor
    (:func:`shardmove.executor.run_plan`): copy the CURRENT target record back
    to the source, verify it, swap the map back in compare-and-set batches,
    with its own checkpoints, lease and resume.

    Exit code: the run's (0, 3 Failed keys, 130 interrupted, 4 refused), or
    3 when it succeeded but some keys were refused.
    """
    manifest = load_manifest(plan_dir)
    check_key_type(cfg, manifest)
    orig = manifest["plan_id"]
    probe_stores(cfg, manifest)
    if not apply:
        return _dry_run(cfg, plan_dir, orig, out)
    lease = plan_lease(cfg, plan_dir, manifest)
    try:
        free_stale_claim(cfg, manifest, lease)  # a killed run's claim would refuse the rollback plan
        plan = None
        resumed = False
        existing = []
        for rid in rollback_ids(plan_dir):
            d = workdir.plan_dir(cfg.work_dir, rid)
            if workdir.has_manifest(d):
                existing.append((d, load_manifest(d)))
        for d, m in reversed(existing):
            if not summarize(d, m)["complete"]:
                plan, resumed = _plan_from_manifest(d, m), True
                break
        if plan is None:
            plan = build_rollback_plan(cfg, plan_dir, out=out)
            if plan.plan_dir is None and existing:  # nothing new: report the last rollback
                d, m = existing[-1]
                last = _plan_from_manifest(d, m)
                last.refused, last.already_at_source = plan.refused, plan.already_at_source
                plan = last
        out(f"rollback of: {orig}")
        out(f"rollback: moves={plan.moves} already_at_source={plan.already_at_source} "
            f"refused={sum(plan.refused.values())}" + (" (resuming)" if resumed else ""))
        for reason, n in plan.refused.items():
            out(f"refused[{reason}]: {n}")
        if plan.plan_dir is None:
            out("nothing to roll back")
            return RollbackResult(orig, plan, False, None, EXIT_FAILED_KEYS if plan.refused else EXIT_OK)
        run = run_plan(cfg, plan.plan_dir, beam_args=beam_args, out=out, progress=progress,
                       **({} if warn is None else {"warn": warn}))
        code = run.exit_code
        if code == EXIT_OK and plan.refused:
            code = EXIT_FAILED_KEYS
        return RollbackResult(orig, plan, resumed, run, code)
    finally:
        lease.release()


def _dry_run(cfg: Config, plan_dir: str, orig: str, out: Callable[[str], None]) -> RollbackResult:
    """What ``rollback --apply`` would do, with nothing written and no lease taken."""
    out(f"rollback of: {orig}")
    for rid in reversed(rollback_ids(plan_dir)):
        d = workdir.plan_dir(cfg.work_dir, rid)
        if workdir.has_manifest(d):
            m = load_manifest(d)
            s = summarize(d, m)
            if not s["complete"]:
                plan = _plan_from_manifest(d, m)
                left = s["planned"] - s["done"] - s["failed"]
                out(f"rollback (dry run): would resume rollback {rid[:12]}: moves={plan.moves} "
                    f"done={s['done']} failed={s['failed']} left={left}")
                out("dry run: nothing changed; rerun with --apply to roll back")
                return RollbackResult(orig, plan, True, None, EXIT_OK, dry_run=True)
            break
    plan = build_rollback_plan(cfg, plan_dir, out=out, dry_run=True)
    out(f"rollback (dry run): moves={plan.moves} already_at_source={plan.already_at_source} "
        f"refused={sum(plan.refused.values())}")
    for p in plan.pairs:
        out(f"pair {p['source']} -> {p['target']}: {p['moves']}")
    for reason, n in plan.refused.items():
        out(f"refused[{reason}]: {n}")
    out("nothing to roll back" if not plan.moves else "dry run: nothing changed; rerun with --apply to roll back")
    return RollbackResult(orig, plan, False, None, EXIT_OK, dry_run=True)
