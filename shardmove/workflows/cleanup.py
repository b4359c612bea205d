"""``shardmove cleanup``: delete the leftover copies of a finished migration
once its verification window has passed.

    cleanup(cfg, plan_dir, older_than=86400)              # dry run -> CleanupResult
    cleanup(cfg, plan_dir, older_than=86400, apply=True)  # deletes

Source copies of Done keys and target copies of Failed keys, each removed by
a versioned delete, so a record rewritten in between is kept.  Refused while
the plan, or a rollback of it, is live or unfinished.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from pipeline import states as S
from pipeline import workdir
from pipeline.config import Config
from pipeline.errors import BadInput, Refused, before_changes
from pipeline.lease import live_holder
from pipeline.stores import open_map_store
from pipeline.stores.base import content_hash
from pipeline.workdir import load_manifest
from shardmove.executor import summarize
from shardmove.workflows._common import (batch_size, bump, check_key_type, chunks, groups, merged,
                                         plan_lease_and_claim, probe_stores, release_lease_and_claim,
                                         require_data_store, rollback_ids)

__all__ = ["CleanupResult", "cleanup"]


@dataclass
class CleanupResult:
    """Per shard ``{shard: [keys, bytes]}``; with ``applied`` False, what would be deleted."""

    plan_id: str
    applied: bool
    older_than_s: float
    cutoff_ms: int
    source_copies: dict = field(default_factory=dict)   # of Done keys, on their source shard
    target_copies: dict = field(default_factory=dict)   # of Failed keys, on their target shard
    skipped: dict = field(default_factory=dict)

    @staticmethod
    def _total(d: dict) -> tuple[int, int]:
        return sum(v[0] for v in d.values()), sum(v[1] for v in d.values())

    @property
    def source_total(self) -> tuple[int, int]:
        return self._total(self.source_copies)

    @property
    def target_total(self) -> tuple[int, int]:
        return self._total(self.target_copies)


def _add(d: dict, shard: str, keys: int, nbytes: int) -> None:
    if keys:
        v = d.setdefault(shard, [0, 0])
        v[0] += keys
        v[1] += nbytes


def cleanup(cfg: Config, plan_dir: str, *, older_than: float, apply: bool = False, now: float | None = None,
            out: Callable[[str], None] = print) -> CleanupResult:
    """Delete leftover copies whose terminal transition is older than ``older_than`` seconds.

    * Done keys: the SOURCE copy, only while the map points at the target
      (looked up per batch just before deleting), only if the target record
      exists, and only if the source record is still the one copied (its
      version equals the version read at copy time; or, without one, its
      content hash equals the recorded hash) -- otherwise ``source_changed``.
    * Failed keys: the TARGET copy, only while the map points at the source.

    Every delete is a versioned delete (``DataStore.delete(..., versions=...)``
    with the version just read), so a record rewritten in between is kept.
    Idempotent: deleted records are simply absent next time.  Dry run unless
    ``apply``; with ``apply`` the plan's lease is held throughout, and the plan's window
    is claimed in the map store's run registry (where it has one): a live run of an
    overlapping plan refuses it (exit 4), and none can start until it ends.

    Refused (:class:`~pipeline.errors.Refused`, exit 4), as a dry run and
    with ``apply`` alike, before anything is read or written
    (:func:`_refuse_unless_settled`):

    * while a run or rollback of the plan is live (its lease is held);
    * while the plan itself is unfinished -- some keys are neither Done nor
      Failed (an interrupted run, or one never started): the keys in flight
      have copies that are neither leftovers nor final, and the migration may
      yet be resumed or rolled back; finish it first;
    * while a rollback of the plan is unfinished: its copies back onto the
      source look like the source copies this would delete.
    """
    if older_than < 0:
        raise BadInput(f"cleanup: --older-than must be >= 0, got {older_than}")
    manifest = load_manifest(plan_dir)
    check_key_type(cfg, manifest)
    plan_id = manifest["plan_id"]
    probe_stores(cfg, manifest)
    if not apply:  # a dry run only reads: a store it cannot use is bad configuration
        with before_changes():
            return _cleanup(cfg, plan_dir, manifest, plan_id, older_than, apply, now, out)
    return _cleanup(cfg, plan_dir, manifest, plan_id, older_than, apply, now, out)


def _cleanup(cfg: Config, plan_dir: str, manifest: dict, plan_id: str, older_than: float, apply: bool,
             now: float | None, out: Callable[[str], None]) -> CleanupResult:
    ms = open_map_store(cfg)
    ds = require_data_store(cfg, "cleanup")
    B = batch_size(cfg)
    now = time.time() if now is None else now
    cutoff_ms = int((now - older_than) * 1000)
    res = CleanupResult(plan_id, apply, older_than, cutoff_ms)
    _refuse_unless_settled(cfg, plan_dir, manifest)  # refused before the lease: a refusal changes nothing
    # with apply, the plan's window is claimed in the map store's run registry too: a live run
    # of a plan that may move the same keys refuses cleanup, and none can start until it ends
    # (its swaps and these deletes of copies never interleave)
    lease, claim = plan_lease_and_claim(cfg, plan_dir, manifest) if apply else (None, None)
    try:
        if lease is not None:  # a run may have started and stopped in between
            _refuse_unless_settled(cfg, plan_dir, manifest, leased=True)
        for gid, source, target in groups(manifest):
            t = merged(plan_dir, plan_id, gid)
            if not t.num_rows:
                continue
            state = t.column("state").to_numpy(zero_copy_only=False)
            tms = t.column("time_ms").to_numpy(zero_copy_only=False)
            terminal = (state == int(S.State.DONE)) | (state == int(S.State.FAILED))
            bump(res.skipped, "not_terminal", int((~terminal).sum()))
            old = terminal & (tms <= cutoff_ms)
            bump(res.skipped, "too_recent", int((terminal & ~old).sum()))
            keys = t.column("key").to_pylist()
            chash = t.column("content_hash").to_pylist()
            sver = t.column("source_version").to_pylist()
            done = np.flatnonzero(old & (state == int(S.State.DONE))).tolist()
            failed = np.flatnonzero(old & (state == int(S.State.FAILED))).tolist()
            for a, b in chunks(len(done), B):
                rows = done[a:b]
                _cleanup_done(ms, ds, res, [keys[i] for i in rows], [chash[i] for i in rows],
                              [sver[i] for i in rows], source, target)
            for a, b in chunks(len(failed), B):
                _cleanup_failed(ms, ds, res, [keys[i] for i in failed[a:b]], source, target)
    finally:
        if lease is not None:
            release_lease_and_claim(lease, claim)
    _print_cleanup(cfg, ds, res, out)
    return res


def _refuse_unless_settled(cfg: Config, plan_dir: str, manifest: dict, *, leased: bool = False) -> None:
    """Cleanup's rule (see :func:`cleanup`): refuse while the plan or a rollback of
    it is live or unfinished.  One key-free line; reads only."""
    if not leased:
        holder = live_holder(plan_dir)
        if holder is not None:
            raise Refused(f"cleanup: a run or rollback of this plan is live (lease held by {holder}); "
                          "clean up after it ends")
    s = summarize(plan_dir, manifest)
    if not s["complete"]:
        pending = s["planned"] - s["done"] - s["failed"]
        raise Refused(f"cleanup: the plan is unfinished ({pending} of {s['planned']} keys neither Done nor "
                      "Failed); finish it with shardmove run (or roll it back) first")
    _refuse_during_rollback(cfg, plan_dir)


def _refuse_during_rollback(cfg: Config, plan_dir: str) -> None:
    """An unfinished rollback may have copied records back onto the source already."""
    for rid in rollback_ids(plan_dir):
        d = workdir.plan_dir(cfg.work_dir, rid)
        if workdir.has_manifest(d) and not summarize(d, load_manifest(d))["complete"]:
            raise Refused(f"cleanup: rollback {rid[:12]} of this plan is unfinished; "
                          "finish it with shardmove rollback first")


def _delete(ds, res: CleanupResult, bucket: dict, shard: str, picks: list) -> None:
    """picks: [(key, version, nbytes)].  Versioned delete; exact tally of what went."""
    if not picks:
        return
    if not res.applied:
        _add(bucket, shard, len(picks), sum(p[2] for p in picks))
        return
    n = ds.delete([p[0] for p in picks], shard, versions=[p[1] for p in picks])
    if n == len(picks):
        _add(bucket, shard, n, sum(p[2] for p in picks))
        return
    left = ds.read([p[0] for p in picks], shard)  # rewritten meanwhile: kept
    gone = [p for p in picks if p[0] not in left or left[p[0]][1] != p[1]]
    _add(bucket, shard, len(gone), sum(p[2] for p in gone))
    bump(res.skipped, "changed_during_cleanup", len(picks) - len(gone))


def _map_still_at(ms, res: CleanupResult, keys: list, shard: str, reason: str) -> list[int]:
    """Indices of the keys whose map entry points at ``shard`` now (looked up just
    before deleting); the others are counted as skipped for ``reason``."""
    cur = ms.lookup(keys)
    idx = [i for i, k in enumerate(keys) if cur.get(k, (None,))[0] == shard]
    bump(res.skipped, reason, len(keys) - len(idx))
    return idx


def _cleanup_done(ms, ds, res, keys, chash, sver, source, target) -> None:
    idx = _map_still_at(ms, res, keys, target, "map_not_at_target")
    if not idx:
        return
    ks = [keys[i] for i in idx]
    tgt = ds.hashes(ks, target)
    src = ds.read(ks, source)
    picks = []
    for i, k in zip(idx, ks):
        if k not in src:
            bump(res.skipped, "already_deleted")
        elif k not in tgt:
            bump(res.skipped, "target_record_missing")
        else:
            value, version = src[k]
            if sver[i] is None and chash[i] is None:
                bump(res.skipped, "no_copy_record")  # Done without a recorded copy: cannot tell
                continue
            same = (version == sver[i]) if sver[i] is not None else content_hash(value) == chash[i]
            if same:
                picks.append((k, version, len(value)))
            else:
                bump(res.skipped, "source_changed")
    _delete(ds, res, res.source_copies, source, picks)


def _cleanup_failed(ms, ds, res, keys, source, target) -> None:
    idx = _map_still_at(ms, res, keys, source, "map_not_at_source")
    if not idx:
        return
    ks = [keys[i] for i in idx]
    tgt = ds.read(ks, target)
    picks = [(k, tgt[k][1], len(tgt[k][0])) for k in ks if k in tgt]
    bump(res.skipped, "no_target_copy", len(ks) - len(picks))
    _delete(ds, res, res.target_copies, target, picks)


def _print_cleanup(cfg: Config, ds, res: CleanupResult, out) -> None:
    verb = "deleted" if res.applied else "would delete"
    out(f"plan id: {res.plan_id}")
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(res.cutoff_ms / 1000))
    out(f"cleanup: keys whose terminal transition is before {when} (older than {res.older_than_s:g}s)")
    if not res.applied:
        out("cleanup: dry run -- nothing deleted; rerun with --apply to delete")
    for label, d in (("source copies of done keys", res.source_copies),
                     ("target copies of failed keys", res.target_copies)):
        n, nb = CleanupResult._total(d)
        out(f"{verb} {label}: {n} keys, {nb} bytes")
        for shard in sorted(d, key=lambda s: s.encode()):
            out(f"  shard {shard}: {d[shard][0]} keys, {d[shard][1]} bytes")
    for reason, n in sorted(res.skipped.items()):
        out(f"skipped[{reason}]: {n}")
    if res.applied:
        leaving = sorted(set(cfg.current_shards) - {s.id for s in cfg.target_shards}, key=lambda s: s.encode())
        for s in leaving:
            out(f"decommission: shard {s} (not in the target) holds {ds.count(s)} records")
