"""``shardmove verify``: post-verification of a seeded sample of moved keys
and of keys that did not move.

    verify_plan(cfg, plan_dir, sample=1000, seed=7)   # -> VerifyResult

Both populations are sampled the same way (the keys with the smallest seeded
rank) and checked by one loop (:func:`_check_sample`): the map entry, then
the record on the shard the key should be on; each population judges what it
found in its own way (:func:`_judge_moved`, :func:`_judge_stable`).  Keys never
reach ``out`` or the log, only their hash prefixes.
"""
from __future__ import annotations

import heapq
import logging
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import fs
from pipeline import keys as K
from pipeline import plancore as core
from pipeline import states as S
from pipeline import workdir
from pipeline.config import Config
from pipeline.errors import EXIT_FAILED_KEYS, EXIT_OK, BadInput
from pipeline.snapshot import list_parts
from pipeline.stores import open_map_store
from pipeline.workdir import load_manifest
from shardmove.workflows._common import (batch_size, bump, check_key_type, chunks, groups, merged,
                                         require_data_store)

__all__ = ["SampleReport", "VerifyResult", "verify_plan"]

LOG = logging.getLogger(__name__)

_EXAMPLES = 10  # key hash prefixes shown per mismatch reason


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
        bump(self.mismatches, reason)
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


def _sample_moved(plan_dir: str, manifest: dict, sample: int, seed: int, rep: SampleReport) -> list:
    """The sampled Done keys: ``(rank, key_hash, key, target, content_hash, source_version)``."""
    sampler = _Sampler(sample)
    for gid, _source, target in groups(manifest):
        t = merged(plan_dir, manifest["plan_id"], gid, S.State.DONE)
        if not t.num_rows:
            continue
        rep.population += t.num_rows
        h = t.column("key_hash").to_numpy(zero_copy_only=False)
        keys, chash, sver = t.column("key"), t.column("content_hash"), t.column("source_version")
        sampler.add(_sample_keys(h, seed), lambda i: (int(h[i]), keys[i].as_py(), target,
                                                      chash[i].as_py(), sver[i].as_py()))
    picked = sampler.result()
    rep.sampled = len(picked)
    return picked


def _sample_stable(cfg: Config, plan_dir: str, manifest: dict, loc: str, sample: int, seed: int,
                   rep: SampleReport) -> list:
    """The sampled snapshot keys outside the plan: ``(rank, key_hash, key, snapshot shard)``."""
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
        rep.population += int(keep.sum())
        idx = np.flatnonzero(keep)
        if not len(idx):
            continue
        hk = h[idx]
        sampler.add(_sample_keys(hk, seed),
                    lambda i: (int(hk[i]), canon[int(idx[i])].as_py(), shard[int(idx[i])].as_py()))
    picked = sampler.result()
    rep.sampled = len(picked)
    return picked


def _check_sample(ms, ds, batch: int, picked: list, judge: Callable[[tuple, bool, tuple | None], None]) -> None:
    """For each sampled row ``(rank, key_hash, key, shard, ...)``, in batches of
    ``batch`` keys: is the map at ``shard``, and the record found there
    (``(content hash, version)`` or None)?  ``judge`` gets the row and both."""
    for a, b in chunks(len(picked), batch):
        rows = picked[a:b]
        cur = ms.lookup([r[2] for r in rows])
        by_shard: dict = {}
        for r in rows:
            by_shard.setdefault(r[3], []).append(r)
        for shard, rs in by_shard.items():
            found = ds.hashes([r[2] for r in rs], shard)
            for r in rs:
                judge(r, cur.get(r[2], (None,))[0] == shard, found.get(r[2]))


def _judge_moved(rep: SampleReport, row: tuple, at_shard: bool, record: tuple | None) -> None:
    _u, kh, _key, _target, ch, sv = row
    if not at_shard:
        rep._bad("map_not_at_target", kh)
    elif record is None:
        rep._bad("target_missing", kh)
    elif ch is None:
        rep.unverifiable += 1
    elif record[0] == ch:
        rep.ok += 1
    elif sv is not None and record[1] is not None and record[1] > sv:
        rep.rewritten += 1
    else:
        rep._bad("content_mismatch", kh)


def _judge_stable(rep: SampleReport, baseline: dict, row: tuple, at_shard: bool, record: tuple | None) -> None:
    """Records a first-seen key's baseline in ``baseline`` (counted in ``baseline_recorded``)."""
    _u, kh, _key, shard = row
    if not at_shard:
        rep._bad("map_changed", kh)
        return
    if record is None:
        rep._bad("record_missing", kh)
        return
    ch, ver = record
    base = baseline.get((kh, shard))
    if base is None:
        baseline[(kh, shard)] = (ch, ver)
        rep.baseline_recorded += 1
        rep.ok += 1
    elif ver is None or base[1] is None:
        rep.ok += 1  # no versions: content cannot be told from legitimate writes
    elif ver == base[1] and ch != base[0]:
        rep._bad("content_changed", kh)
    elif ver != base[1]:
        rep.rewritten += 1
    else:
        rep.ok += 1


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
    check_key_type(cfg, manifest)
    ms = open_map_store(cfg)
    ds = require_data_store(cfg, "verify")
    B = batch_size(cfg)
    res = VerifyResult(manifest["plan_id"], sample, seed, SampleReport(), SampleReport())

    picked = _sample_moved(plan_dir, manifest, sample, seed, res.moved)
    _check_sample(ms, ds, B, picked, lambda row, at, rec: _judge_moved(res.moved, row, at, rec))

    loc = (manifest.get("snapshot") or {}).get("location")
    if loc is None:
        res.notes.append("stable: the plan has no snapshot (a rollback plan): not sampled")
    else:
        if not fs.exists(loc):
            raise BadInput(f"verify: the plan's snapshot is missing: {loc}")
        picked = _sample_stable(cfg, plan_dir, manifest, loc, sample, seed, res.stable)
        baseline = _read_baseline(plan_dir)
        _check_sample(ms, ds, B, picked, lambda row, at, rec: _judge_stable(res.stable, baseline, row, at, rec))
        if res.stable.baseline_recorded:
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
