"""Operator workflows after a run: failures, post-verification, rollback,
cleanup and catch-up plans (migration usage guide, "Operational sequence",
steps 6-7).  The CLI (:mod:`shardmove.cli_ops`) is a thin wrapper around these
functions; schedulers and notebooks call them directly.

    from shardmove import ops
    ops.export_failures(cfg, plan_dir, "failed.parquet")   # -> FailuresResult
    ops.verify_plan(cfg, plan_dir, sample=1000, seed=7)     # -> VerifyResult
    ops.rollback(cfg, plan_dir)                             # -> RollbackResult
    ops.cleanup(cfg, plan_dir, older_than=86400, apply=True)  # -> CleanupResult
    ops.plan_since(cfg, plan_dir)                           # -> planner.PlanResult

Never imports Beam itself (``rollback`` and ``plan_since`` start the
executor / planner, which do).  Keys never reach ``out`` or the log: a key is
identified only by :func:`pipeline.keys.short_hash` of its stable hash.  The
only file written here that holds key values is the failures export (0600).

Everything reads the plan's merged checkpoints (:func:`pipeline.checkpoint.read_group`),
so results do not depend on how many runs it took.  Store calls go in batches
of ``swap_batch_size`` keys.
"""
from __future__ import annotations

import hashlib
import heapq
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import checkpoint as ckpt
from pipeline import fs
from pipeline import keys as K
from pipeline import plancore as core
from pipeline import states as S
from pipeline import workdir
from pipeline.config import Config
from pipeline.errors import EXIT_FAILED_KEYS, EXIT_OK, BadInput
from pipeline.names import group_id
from shardmove.planner import PlanResult
from pipeline.stores import open_data_store, open_map_store
from pipeline.stores.base import content_hash
from pipeline.workdir import MANIFEST_FORMAT_VERSION, load_manifest

__all__ = [
    "FAILURES_SCHEMA",
    "FailuresResult",
    "export_failures",
    "SampleReport",
    "VerifyResult",
    "verify_plan",
    "RollbackPlan",
    "RollbackResult",
    "build_rollback_plan",
    "rollback",
    "rollback_plan_id",
    "CleanupResult",
    "cleanup",
    "plan_since",
]

LOG = logging.getLogger("shardmove.ops")

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
_EXAMPLES = 10  # key hash prefixes shown per mismatch reason


# ----------------------------------------------------------------- helpers

def _groups(manifest: dict) -> Iterator[tuple[str, str, str]]:
    for f in manifest["files"]:
        yield f["group"], f["source"], f["target"]


def _merged(plan_dir: str, plan_id: str, gid: str, state: S.State | None = None) -> pa.Table:
    t = ckpt.read_group(plan_dir, plan_id, gid).table
    if state is not None and t.num_rows:
        t = t.filter(pc.equal(t.column("state"), int(state)))
    return t


def _chunks(n: int, size: int) -> Iterator[tuple[int, int]]:
    for a in range(0, n, size):
        yield a, min(n, a + size)


def _batch(cfg: Config) -> int:
    return max(1, int(cfg.opt("swap_batch_size")))


def _bump(d: dict, k: str, n: int = 1) -> None:
    if n:
        d[k] = d.get(k, 0) + n


def _check_key_type(cfg: Config, manifest: dict) -> None:
    if manifest["key_type"] != cfg.key_type.value:
        raise BadInput(f"plan key_type {manifest['key_type']} differs from the configuration's {cfg.key_type.value}")


def _require_data_store(cfg: Config, what: str):
    ds = open_data_store(cfg)
    if ds is None:
        raise BadInput(f"{what}: needs a data store (data_store.kind is none)")
    return ds


def _probe_stores(cfg: Config, manifest: dict) -> None:
    """Use the map store and the plan's shards once before anything is modified,
    so that a store that cannot be opened, reached or read is bad configuration
    (exit 2) rather than a failure halfway through."""
    from pipeline.errors import before_changes

    with before_changes():
        open_map_store(cfg).max_version()
        ds = open_data_store(cfg)
        if ds is not None and hasattr(ds, "shard_exists"):
            for p in manifest.get("pairs", ()):
                ds.shard_exists(p["source"])
                ds.shard_exists(p["target"])


def _plan_lease(cfg: Config, plan_dir: str, manifest: dict):
    """Take the plan's executor lease (exit 4 while a run holds it) and keep it renewed."""
    from pipeline.lease import acquire

    lease = acquire(plan_dir, manifest["plan_id"], cfg.opt("lease_ttl"))
    lease.start_renewing()
    return lease


# ================================================================ failures

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
    _check_key_type(cfg, manifest)
    plan_id = manifest["plan_id"]
    kt = cfg.key_type
    ms = open_map_store(cfg)
    ds = open_data_store(cfg)
    B = _batch(cfg)
    sink = pa.BufferOutputStream()
    writer = pq.ParquetWriter(sink, FAILURES_SCHEMA.with_metadata({"format_version": "1", "plan_id": plan_id}),
                              compression="zstd")
    by_reason: dict = {}
    copies: dict = {}
    removable = 0
    failed = 0
    try:
        for gid, source, target in _groups(manifest):
            t = _merged(plan_dir, plan_id, gid, S.State.FAILED)
            if not t.num_rows:
                continue
            keys = t.column("key").to_pylist()
            current: dict = {}
            present: set = set()
            for a, b in _chunks(len(keys), B):
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
                _bump(by_reason, r)
            n_copies = sum(1 for c in has_copy if c)
            _bump(copies, target, n_copies)
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


# ================================================================== verify

@dataclass
class SampleReport:
    """One sampled population of ``verify_plan`` (counts; examples are key hash prefixes)."""

    population: int = 0
    sampled: int = 0
    ok: int = 0
    rewritten: int = 0            # written by the application since (a higher version): not a mismatch
    unverifiable: int = 0         # no recorded hash to compare (map and presence still checked)
    baseline_recorded: int = 0    # stable keys seen for the first time (their baseline was recorded)
    mismatches: dict = field(default_factory=dict)
    examples: dict = field(default_factory=dict)

    @property
    def mismatch_count(self) -> int:
        return sum(self.mismatches.values())

    def _bad(self, reason: str, key_hash: int) -> None:
        _bump(self.mismatches, reason)
        ex = self.examples.setdefault(reason, [])
        if len(ex) < _EXAMPLES:
            ex.append(K.short_hash(key_hash))


@dataclass
class VerifyResult:
    plan_id: str
    sample: int
    seed: int
    moved: SampleReport
    stable: SampleReport
    notes: list = field(default_factory=list)

    @property
    def mismatches(self) -> int:
        return self.moved.mismatch_count + self.stable.mismatch_count

    @property
    def clean(self) -> bool:
        return self.mismatches == 0

    @property
    def exit_code(self) -> int:
        return EXIT_OK if self.clean else EXIT_FAILED_KEYS

    def to_dict(self) -> dict:
        return {"plan_id": self.plan_id, "sample": self.sample, "seed": self.seed,
                "moved": asdict(self.moved), "stable": asdict(self.stable),
                "mismatches": self.mismatches, "clean": self.clean, "notes": list(self.notes)}


def _sample_keys(hashes: np.ndarray, seed: int) -> np.ndarray:
    """Seeded rank of each key: the sample is the N smallest (deterministic, order-free)."""
    s = core._mix(np.array([seed % 2**64], dtype=np.uint64))[0]
    with np.errstate(over="ignore"):
        return core._mix(hashes.astype(np.uint64) ^ s)


def _keep_smallest(u: np.ndarray, n: int) -> np.ndarray:
    """Indices of the n smallest ranks (ties at the boundary kept; trimmed later)."""
    if len(u) <= n:
        return np.arange(len(u))
    thr = np.partition(u, n - 1)[n - 1]
    return np.flatnonzero(u <= thr)


class _Sampler:
    """Keeps the N rows with the smallest (rank, key_hash, key) across batches."""

    def __init__(self, n: int):
        self.n = n
        self.rows: list = []

    def add(self, u: np.ndarray, rows: Callable[[int], tuple]) -> None:
        if self.n <= 0:
            return
        for i in _keep_smallest(u, self.n).tolist():
            self.rows.append((int(u[i]),) + rows(i))
        if len(self.rows) > 4 * self.n:
            self.rows = heapq.nsmallest(self.n, self.rows, key=lambda r: (r[0], r[1], r[2]))

    def result(self) -> list:
        return heapq.nsmallest(self.n, self.rows, key=lambda r: (r[0], r[1], r[2]))


_BASELINE = "verify-baseline.parquet"
_BASELINE_SCHEMA = pa.schema([("key_hash", pa.uint64()), ("shard_id", pa.string()),
                              ("content_hash", pa.binary()), ("version", pa.int64())],
                             metadata={"format_version": "1"})


def _read_baseline(plan_dir: str) -> dict:
    path = fs.join(workdir.reports_dir(plan_dir), _BASELINE)
    if not fs.exists(path):
        return {}
    try:
        with fs.open_input(path) as f:
            t = pq.read_table(f)
    except (OSError, pa.ArrowException):
        LOG.warning("verify baseline unreadable; recording a new one")
        return {}
    return {(h, s): (c, v) for h, s, c, v in zip(t["key_hash"].to_pylist(), t["shard_id"].to_pylist(),
                                                   t["content_hash"].to_pylist(), t["version"].to_pylist())}


def _write_baseline(plan_dir: str, base: dict) -> None:
    items = sorted(base.items(), key=lambda kv: (kv[0][0], kv[0][1].encode()))
    t = pa.table({"key_hash": pa.array([k[0] for k, _ in items], pa.uint64()),
                  "shard_id": pa.array([k[1] for k, _ in items], pa.string()),
                  "content_hash": pa.array([v[0] for _, v in items], pa.binary()),
                  "version": pa.array([v[1] for _, v in items], pa.int64())}, schema=_BASELINE_SCHEMA)
    sink = pa.BufferOutputStream()
    pq.write_table(t, sink, compression="zstd")
    fs.makedirs(workdir.reports_dir(plan_dir))
    fs.write_atomic(fs.join(workdir.reports_dir(plan_dir), _BASELINE), sink.getvalue().to_pybytes(), mode=0o600)


def _moved_hashes(plan_dir: str, manifest: dict) -> np.ndarray:
    parts = []
    for f in manifest["files"]:
        with fs.open_input(workdir.move_file(plan_dir, f["group"])) as fh:
            parts.append(pq.read_table(fh, columns=["key_hash"]).column("key_hash").to_numpy())
    return np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.uint64)


def _isin_sorted(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    if not len(sorted_set):
        return np.zeros(len(values), bool)
    idx = np.searchsorted(sorted_set, values)
    idx[idx == len(sorted_set)] = 0
    return sorted_set[idx] == values


def verify_plan(cfg: Config, plan_dir: str, *, sample: int = 1000, seed: int = 0,
                out: Callable[[str], None] | None = print) -> VerifyResult:
    """Post-verification of a seeded sample of moved keys and of keys that did not move.

    **Moved** (``sample`` Done keys): the map points at the plan's target; a
    record exists there; its content hash equals the hash recorded at copy
    time in the checkpoints.  A different hash with a *higher* version than
    the one copied is an application write made after the swap
    (``rewritten``, not a mismatch); a different hash at the same (or a
    lower) version is ``content_mismatch``.

    **Stable** (``sample`` keys of the plan's snapshot that are not in the
    plan): the map still points at the snapshot's shard; the record is
    readable on it; and, where the store keeps versions, its content is
    unchanged: the first verify of a plan records a baseline (key hash,
    shard, content hash, version -- no key values) of every stable key it
    samples in ``<plan>/reports/verify-baseline.parquet``; later verifies
    report ``content_changed`` for a record whose version equals the
    baseline's but whose content hash differs (a higher version is an
    application write: ``rewritten``).

    The sample is the ``sample`` keys with the smallest ``mix(key_hash ^
    mix(seed))`` in each population: the same seed gives the same keys.
    """
    out = out or (lambda _l: None)
    if sample < 0:
        raise BadInput(f"verify: --sample must be >= 0, got {sample}")
    manifest = load_manifest(plan_dir)
    _check_key_type(cfg, manifest)
    plan_id = manifest["plan_id"]
    ms = open_map_store(cfg)
    ds = _require_data_store(cfg, "verify")
    B = _batch(cfg)
    res = VerifyResult(plan_id, sample, seed, SampleReport(), SampleReport())

    # ---- moved: Done keys
    sampler = _Sampler(sample)
    for gid, source, target in _groups(manifest):
        t = _merged(plan_dir, plan_id, gid, S.State.DONE)
        if not t.num_rows:
            continue
        res.moved.population += t.num_rows
        h = t.column("key_hash").to_numpy(zero_copy_only=False)
        keys, chash, sver = t.column("key"), t.column("content_hash"), t.column("source_version")
        sampler.add(_sample_keys(h, seed), lambda i: (int(h[i]), keys[i].as_py(), target,
                                                      chash[i].as_py(), sver[i].as_py()))
    picked = sampler.result()
    res.moved.sampled = len(picked)
    for a, b in _chunks(len(picked), B):
        rows = picked[a:b]
        cur = ms.lookup([r[2] for r in rows])
        by_target: dict = {}
        for r in rows:
            by_target.setdefault(r[3], []).append(r)
        for target, rs in by_target.items():
            found = ds.hashes([r[2] for r in rs], target)
            for _u, kh, key, _t, ch, sv in rs:
                rep = res.moved
                if cur.get(key, (None,))[0] != target:
                    rep._bad("map_not_at_target", kh)
                elif key not in found:
                    rep._bad("target_missing", kh)
                elif ch is None:
                    rep.unverifiable += 1
                elif found[key][0] == ch:
                    rep.ok += 1
                elif sv is not None and found[key][1] is not None and found[key][1] > sv:
                    rep.rewritten += 1
                else:
                    rep._bad("content_mismatch", kh)

    # ---- stable: snapshot keys outside the plan
    loc = (manifest.get("snapshot") or {}).get("location")
    if loc is None:
        res.notes.append("stable: the plan has no snapshot (a rollback plan): not sampled")
    else:
        from pipeline.snapshot import list_parts

        if not fs.exists(loc):
            raise BadInput(f"verify: the plan's snapshot is missing: {loc}")
        moved = _moved_hashes(plan_dir, manifest)
        sampler = _Sampler(sample)
        for path, rg in list_parts(loc, "snapshot"):
            with fs.open_input(path) as fh:
                pf = pq.ParquetFile(fh)
                table = pf.read_row_group(rg, columns=["key", "shard_id"])
            if not table.num_rows:
                continue
            canon, shard, h = core.prepare_batch(table, cfg.key_type, core.Stats(), None)
            keep = ~_isin_sorted(h, moved)
            res.stable.population += int(keep.sum())
            idx = np.flatnonzero(keep)
            if not len(idx):
                continue
            hk = h[idx]
            sampler.add(_sample_keys(hk, seed),
                        lambda i: (int(hk[i]), canon[int(idx[i])].as_py(), shard[int(idx[i])].as_py()))
        picked = sampler.result()
        res.stable.sampled = len(picked)
        baseline = _read_baseline(plan_dir)
        added = False
        for a, b in _chunks(len(picked), B):
            rows = picked[a:b]
            cur = ms.lookup([r[2] for r in rows])
            by_shard: dict = {}
            for r in rows:
                by_shard.setdefault(r[3], []).append(r)
            for shard, rs in by_shard.items():
                found = ds.hashes([r[2] for r in rs], shard)
                for _u, kh, key, _s in rs:
                    rep = res.stable
                    if cur.get(key, (None,))[0] != shard:
                        rep._bad("map_changed", kh)
                        continue
                    if key not in found:
                        rep._bad("record_missing", kh)
                        continue
                    ch, ver = found[key]
                    base = baseline.get((kh, shard))
                    if base is None:
                        baseline[(kh, shard)] = (ch, ver)
                        rep.baseline_recorded += 1
                        added = True
                        rep.ok += 1
                    elif ver is None or base[1] is None:
                        rep.ok += 1  # no versions: content cannot be told from legitimate writes
                    elif ver == base[1] and ch != base[0]:
                        rep._bad("content_changed", kh)
                    elif ver != base[1]:
                        rep.rewritten += 1
                    else:
                        rep.ok += 1
        if added:
            _write_baseline(plan_dir, baseline)
    _print_verify(res, out)
    return res


def _print_verify(res: VerifyResult, out) -> None:
    out(f"plan id: {res.plan_id}")
    out(f"verify: sample={res.sample} seed={res.seed}")
    for name, rep in (("moved", res.moved), ("stable", res.stable)):
        line = (f"{name}: population={rep.population} sampled={rep.sampled} ok={rep.ok} "
                f"rewritten={rep.rewritten} mismatches={rep.mismatch_count}")
        if name == "moved":
            line += f" unverifiable={rep.unverifiable}"
        else:
            line += f" baseline_recorded={rep.baseline_recorded}"
        out(line)
        for reason, n in sorted(rep.mismatches.items()):
            out(f"{name} mismatch[{reason}]: {n} (key hashes: {', '.join(rep.examples.get(reason, []))})")
    for note in res.notes:
        out(f"note: {note}")
    out("verify: clean" if res.clean else f"verify: {res.mismatches} mismatches")


# ================================================================ rollback

_ROLLBACKS = "rollbacks.json"


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


@dataclass
class RollbackResult:
    rollback_of: str
    plan: RollbackPlan | None
    resumed: bool
    run: object | None             # shardmove.executor.RunResult
    exit_code: int

    @property
    def plan_id(self) -> str | None:
        return self.plan.plan_id if self.plan else None


def _rollback_ids(plan_dir: str) -> list[str]:
    path = fs.join(plan_dir, _ROLLBACKS)
    if not fs.exists(path):
        return []
    try:
        return list(json.loads(fs.read_bytes(path)).get("rollback_plans", []))
    except ValueError as e:
        raise BadInput(f"{_ROLLBACKS} of the plan is not valid JSON") from e


def _record_rollback(plan_dir: str, rid: str) -> None:
    ids = _rollback_ids(plan_dir)
    if rid not in ids:
        ids.append(rid)
        fs.write_atomic(fs.join(plan_dir, _ROLLBACKS),
                        json.dumps({"format_version": 1, "rollback_plans": ids}, indent=1).encode())


def _plan_from_manifest(d: str, m: dict) -> RollbackPlan:
    return RollbackPlan(m["plan_id"], d, m.get("rollback_of"), int(m["moves"]), int(m.get("keys_examined", 0)),
                        int(m.get("already_at_source", 0)), dict(m.get("refused", {})))


def build_rollback_plan(cfg: Config, plan_dir: str, *, out: Callable[[str], None] = print) -> RollbackPlan:
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
    Idempotent: the same key set gives the same plan id and files.
    """
    from transforms.plan import write_moves_bytes

    manifest = load_manifest(plan_dir)
    _check_key_type(cfg, manifest)
    orig = manifest["plan_id"]
    ms = open_map_store(cfg)
    ds = _require_data_store(cfg, "rollback")
    buckets = int(manifest.get("hash_buckets") or cfg.opt("hash_buckets"))
    B = _batch(cfg)
    t0 = time.time()
    cutoff = ms.max_version() if hasattr(ms, "max_version") else None
    staging = workdir.new_staging(workdir.plans_dir(cfg.work_dir))
    fs.makedirs(workdir.moves_dir(staging))
    refused: dict = {}
    at_source = 0
    examined = 0
    lanes = (0, 0, 0)
    files: dict = {}
    try:
        for gid, source, target in _groups(manifest):
            t = _merged(plan_dir, orig, gid, S.State.DONE)
            if not t.num_rows:
                continue
            examined += t.num_rows
            keys = t.column("key").to_pylist()
            hashes = t.column("key_hash").to_numpy(zero_copy_only=False)
            keep: list = []
            for a, b in _chunks(len(keys), B):
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
                        _bump(refused, "not_at_target")
                if not at_target:
                    continue
                ks = [keys[i] for i in at_target]
                tgt_rec = ds.hashes(ks, target)
                src_rec = ds.hashes(ks, source)
                for i, k in zip(at_target, ks):
                    if k not in tgt_rec:
                        _bump(refused, "target_record_missing")
                    elif k in src_rec and src_rec[k][1] is not None and tgt_rec[k][1] is not None \
                            and src_rec[k][1] > tgt_rec[k][1]:
                        _bump(refused, "source_newer")
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
            fs.rmtree(staging)
            return RollbackPlan(None, None, orig, 0, examined, at_source, refused)
        digest = core.digest_hex(*lanes)
        rid = rollback_plan_id(orig, digest)
        flist = sorted(files.values(), key=lambda f: (f["source"].encode(), f["target"].encode(), f["bucket"]))
        pairs: dict = {}
        before: dict = {}
        after: dict = {}
        for f in flist:
            _bump(pairs, (f["source"], f["target"]), f["rows"])
            _bump(before, f["source"], f["rows"])
            _bump(after, f["target"], f["rows"])
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
        created = workdir.commit_staged(staging, final, workdir.MANIFEST)
        _record_rollback(plan_dir, rid)
        LOG.info("rollback plan %s of %s: %d moves in %d files", rid[:12], orig[:12], n, len(flist))
        return RollbackPlan(rid, final, orig, n, examined, at_source, refused, created)
    except BaseException:
        fs.rmtree(staging)
        raise


def rollback(cfg: Config, plan_dir: str, *, beam_args: Sequence[str] = (),
             out: Callable[[str], None] = print) -> RollbackResult:
    """Reverse migration of the plan's Done keys, resumable.

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
    from shardmove.executor import run_plan, summarize

    manifest = load_manifest(plan_dir)
    _check_key_type(cfg, manifest)
    orig = manifest["plan_id"]
    _probe_stores(cfg, manifest)
    lease = _plan_lease(cfg, plan_dir, manifest)
    try:
        plan = None
        resumed = False
        existing = []
        for rid in _rollback_ids(plan_dir):
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
        run = run_plan(cfg, plan.plan_dir, beam_args=beam_args, out=out)
        code = run.exit_code
        if code == EXIT_OK and plan.refused:
            code = EXIT_FAILED_KEYS
        return RollbackResult(orig, plan, resumed, run, code)
    finally:
        lease.release()


# ================================================================= cleanup

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
    ``apply``; with ``apply`` the plan's lease is held throughout.

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
    _check_key_type(cfg, manifest)
    plan_id = manifest["plan_id"]
    _probe_stores(cfg, manifest)
    if not apply:  # a dry run only reads: a store it cannot use is bad configuration
        from pipeline.errors import before_changes

        with before_changes():
            return _cleanup(cfg, plan_dir, manifest, plan_id, older_than, apply, now, out)
    return _cleanup(cfg, plan_dir, manifest, plan_id, older_than, apply, now, out)


def _cleanup(cfg: Config, plan_dir: str, manifest: dict, plan_id: str, older_than: float, apply: bool,
             now: float | None, out: Callable[[str], None]) -> CleanupResult:
    ms = open_map_store(cfg)
    ds = _require_data_store(cfg, "cleanup")
    B = _batch(cfg)
    now = time.time() if now is None else now
    cutoff_ms = int((now - older_than) * 1000)
    res = CleanupResult(plan_id, apply, older_than, cutoff_ms)
    _refuse_unless_settled(cfg, plan_dir, manifest)  # refused before the lease: a refusal changes nothing
    lease = _plan_lease(cfg, plan_dir, manifest) if apply else None
    try:
        if lease is not None:  # a run may have started and stopped in between
            _refuse_unless_settled(cfg, plan_dir, manifest, leased=True)
        for gid, source, target in _groups(manifest):
            t = _merged(plan_dir, plan_id, gid)
            if not t.num_rows:
                continue
            state = t.column("state").to_numpy(zero_copy_only=False)
            tms = t.column("time_ms").to_numpy(zero_copy_only=False)
            terminal = (state == int(S.State.DONE)) | (state == int(S.State.FAILED))
            _bump(res.skipped, "not_terminal", int((~terminal).sum()))
            old = terminal & (tms <= cutoff_ms)
            _bump(res.skipped, "too_recent", int((terminal & ~old).sum()))
            keys = t.column("key").to_pylist()
            chash = t.column("content_hash").to_pylist()
            sver = t.column("source_version").to_pylist()
            done = np.flatnonzero(old & (state == int(S.State.DONE))).tolist()
            failed = np.flatnonzero(old & (state == int(S.State.FAILED))).tolist()
            for a, b in _chunks(len(done), B):
                rows = done[a:b]
                _cleanup_done(ms, ds, res, [keys[i] for i in rows], [chash[i] for i in rows],
                              [sver[i] for i in rows], source, target)
            for a, b in _chunks(len(failed), B):
                _cleanup_failed(ms, ds, res, [keys[i] for i in failed[a:b]], source, target)
    finally:
        if lease is not None:
            lease.release()
    _print_cleanup(cfg, ds, res, out)
    return res


def _refuse_unless_settled(cfg: Config, plan_dir: str, manifest: dict, *, leased: bool = False) -> None:
    """Cleanup's rule (see :func:`cleanup`): refuse while the plan or a rollback of
    it is live or unfinished.  One key-free line; reads only."""
    from pipeline.errors import Refused
    from shardmove.executor import summarize
    from pipeline.lease import live_holder

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
    from pipeline.errors import Refused
    from shardmove.executor import summarize

    for rid in _rollback_ids(plan_dir):
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
    _bump(res.skipped, "changed_during_cleanup", len(picks) - len(gone))


def _cleanup_done(ms, ds, res, keys, chash, sver, source, target) -> None:
    cur = ms.lookup(keys)
    idx = [i for i, k in enumerate(keys) if cur.get(k, (None,))[0] == target]
    _bump(res.skipped, "map_not_at_target", len(keys) - len(idx))
    if not idx:
        return
    ks = [keys[i] for i in idx]
    tgt = ds.hashes(ks, target)
    src = ds.read(ks, source)
    picks = []
    for i, k in zip(idx, ks):
        if k not in src:
            _bump(res.skipped, "already_deleted")
        elif k not in tgt:
            _bump(res.skipped, "target_record_missing")
        else:
            value, version = src[k]
            if sver[i] is None and chash[i] is None:
                _bump(res.skipped, "no_copy_record")  # Done without a recorded copy: cannot tell
                continue
            same = (version == sver[i]) if sver[i] is not None else content_hash(value) == chash[i]
            if same:
                picks.append((k, version, len(value)))
            else:
                _bump(res.skipped, "source_changed")
    _delete(ds, res, res.source_copies, source, picks)


def _cleanup_failed(ms, ds, res, keys, source, target) -> None:
    cur = ms.lookup(keys)
    idx = [i for i, k in enumerate(keys) if cur.get(k, (None,))[0] == source]
    _bump(res.skipped, "map_not_at_source", len(keys) - len(idx))
    if not idx:
        return
    ks = [keys[i] for i in idx]
    tgt = ds.read(ks, target)
    picks = [(k, tgt[k][1], len(tgt[k][0])) for k in ks if k in tgt]
    _bump(res.skipped, "no_target_copy", len(ks) - len(picks))
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


# ================================================================ catch-up

def _catchup_snapshot(cfg: Config, earlier: dict, out) -> tuple[str, list]:
    """A snapshot directory of the rows written since the earlier plan's cutoff,
    and the directories this call created (the full snapshot, the catch-up one)."""
    from pipeline.snapshot import take_snapshot

    base_cutoff = (earlier.get("snapshot") or {}).get("cutoff")
    if base_cutoff is None:
        raise BadInput("catch-up: the earlier plan's snapshot has no version cutoff "
                       "(planned from a user-supplied snapshot); take a full plan instead")
    base_cutoff = int(base_cutoff)
    info = take_snapshot(open_map_store(cfg), cfg.work_dir, cfg.opt("segment_size"), cfg.key_type)
    try:
        final, created = _catchup_from(cfg, info, base_cutoff, earlier, out)
    except BaseException:
        if info.created:  # a refused catch-up leaves the work directory as it found it
            fs.rmtree(info.location)
        raise
    return final, [d for d, new in ((final, created), (info.location, info.created)) if new]


def _catchup_from(cfg: Config, info, base_cutoff: int, earlier: dict, out):
    from pipeline.snapshot import SNAPSHOT_FORMAT_VERSION, ROWS_PER_FILE, list_parts

    snaps = workdir.snapshots_dir(cfg.work_dir)
    staging = workdir.new_staging(snaps)
    try:
        lanes = (0, 0, 0)
        rows = 0
        files = []
        writer = sink = None
        in_file = 0

        def commit():
            nonlocal writer, sink, in_file
            writer.close()
            name = f"part-{len(files):05d}.parquet"
            fs.write_atomic(fs.join(staging, name), sink.getvalue().to_pybytes(), mode=0o600)
            files.append({"name": name, "rows": in_file})
            writer = sink = None
            in_file = 0

        for path, rg in list_parts(info.location, "snapshot"):
            with fs.open_input(path) as fh:
                t = pq.ParquetFile(fh).read_row_group(rg)
            t = t.filter(pc.greater(t.column("version"), base_cutoff))
            if not t.num_rows:
                continue
            t = t.cast(core.SNAPSHOT_SCHEMA)
            h = K.stable_hashes(t.column("key").to_pylist(), t.num_rows)
            lanes = core._add_digest(lanes, core.digest_lanes(h, core._shard_hash_array(t.column("shard_id").combine_chunks())))
            if writer is None:
                sink = pa.BufferOutputStream()
                writer = pq.ParquetWriter(sink, core.SNAPSHOT_SCHEMA, compression="zstd")
            writer.write_table(t, row_group_size=cfg.opt("segment_size"))
            rows += t.num_rows
            in_file += t.num_rows
            if in_file >= ROWS_PER_FILE:
                commit()
        if writer is None and not files:  # nothing new: an empty part keeps the directory a snapshot
            sink = pa.BufferOutputStream()
            writer = pq.ParquetWriter(sink, core.SNAPSHOT_SCHEMA, compression="zstd")
        if writer is not None:
            commit()
        digest = core.digest_hex(*lanes)
        meta = {
            "format_version": SNAPSHOT_FORMAT_VERSION,
            "digest": digest,
            "rows": rows,
            "cutoff": info.cutoff,
            "rows_above_cutoff": info.rows_above_cutoff,
            "key_type": cfg.key_type.value,
            "files": files,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "catchup_of": earlier["plan_id"],
            "base_cutoff": base_cutoff,
            "full_snapshot": info.digest,
        }
        fs.write_atomic(workdir.snapshot_meta_path(staging), json.dumps(meta, indent=1, sort_keys=True).encode())
        final = fs.join(snaps, f"catchup-{digest}")
        created = workdir.commit_staged(staging, final, workdir.SNAPSHOT_META)
    except BaseException:
        fs.rmtree(staging)
        raise
    out(f"catch-up: {rows} of {info.rows} keys written since cutoff {base_cutoff} "
        f"(earlier plan {earlier['plan_id'][:12]}); snapshot cutoff {info.cutoff}")
    return final, created


def plan_since(cfg: Config, earlier_plan_dir: str, *, dry_run: bool = False, beam_args: Sequence[str] = (),
               out: Callable[[str], None] = print, name: str | None = None) -> PlanResult:
    """A catch-up plan: the keys created or reassigned after an earlier plan's snapshot.

    Takes a fresh snapshot of the map store, keeps the rows whose version is
    above the earlier plan's snapshot cutoff, writes them as the snapshot
    ``<work>/snapshots/catchup-<digest>/`` (0600 files; its ``snapshot.json``
    carries the fresh cutoff, so a catch-up of the catch-up continues from
    there) and plans from it against the configured target.  Keys the
    earlier plan itself swapped are above the cutoff too, but already sit on
    their target, so the ring gives them no move.  Capacity figures of a
    catch-up plan count only the catch-up keys.
    """
    from shardmove.planner import make_plan

    from pipeline.errors import before_changes

    earlier = load_manifest(earlier_plan_dir)
    _check_key_type(cfg, earlier)
    with before_changes():  # planning only reads the stores
        snap, created = _catchup_snapshot(cfg, earlier, out)
        try:
            data_store = open_data_store(cfg) if any(s.capacity_bytes for s in cfg.target_shards) else None
            res = make_plan(cfg, data_store=data_store, snapshot=snap, dry_run=dry_run, beam_args=beam_args,
                            out=out, name=name)
            if res.dry_run and not res.capacity_ok:  # refused by the capacity check (exit 4): keep nothing
                for d in created:
                    fs.rmtree(d)
            return res
        except BaseException:
            for d in created:  # a refused catch-up leaves the work directory as it found it
                fs.rmtree(d)
            raise
