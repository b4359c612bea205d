"""Dry-run hash sampling (the guide's ``EnableDryRunHashSampling``): read a seeded sample
of a plan's moves at their source shards before anything is copied.

``plan --dry-run --sample-hashes N`` picks N moves by a seeded hash of their stable key
hash (the same N for the same plan and seed; a uniform sample of all moves, so a small
pair may get none), reads each record's content hash and size from its source shard,
and reports how many were found, how many are missing (a run would fail them as
``source_missing``), how many could not be read, and the bytes found -- from which the
bytes each target shard would receive are estimated (shown beside the capacity check,
not part of it).  Only reads: nothing is copied or written.  Keys
never appear in what this returns; shards are named, errors by their type only.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow.parquet as pq

from pipeline import fs
from pipeline import plancore as core
from pipeline import workdir
from pipeline.errors import StoreError

__all__ = ["SampleReport", "sample_sources"]


@dataclass
class SampleReport:
    requested: int
    seed: int
    moves: int
    sampled: int = 0
    found: int = 0
    missing: int = 0
    unreadable: int = 0
    bytes_found: int = 0
    missing_by_shard: dict = field(default_factory=dict)
    unreadable_by_shard: dict = field(default_factory=dict)   # shard -> error type
    est_bytes_per_target: dict = field(default_factory=dict)

    @property
    def mean_record_bytes(self) -> float | None:
        return self.bytes_found / self.found if self.found else None

    def as_dict(self) -> dict:
        return {**asdict(self), "mean_record_bytes": self.mean_record_bytes}

    def lines(self) -> list[str]:
        mean = f", {self.mean_record_bytes:,.0f} bytes per record" if self.found else ""
        out = [f"sample: {self.sampled} of {self.moves} moves read at their source (seed {self.seed}): "
               f"{self.found} found ({self.bytes_found:,} bytes{mean}), {self.missing} missing, "
               f"{self.unreadable} unreadable"]
        if self.missing:
            shards = ", ".join(f"{s}: {n}" for s, n in sorted(self.missing_by_shard.items()))
            out.append(f"sample: {self.missing} records missing at their source ({shards}); "
                       "a run fails such keys as source_missing")
        if self.unreadable:
            shards = ", ".join(f"{s}: {e}" for s, e in sorted(self.unreadable_by_shard.items()))
            out.append(f"sample: {self.unreadable} records could not be read ({shards})")
        for t, b in sorted(self.est_bytes_per_target.items(), key=lambda kv: kv[0].encode()):
            out.append(f"sample: shard {t} would receive about {b:,} bytes")
        return out


def _chosen(plan_dir: str, files: list, n: int, seed: int) -> dict:
    """{source: [key, ...]}: the n moves with the smallest seeded score of their key hash."""
    salt = np.uint64(core._mix(np.array([seed], dtype=np.uint64))[0])
    best = []  # (score, key, source) candidates: at most n per file
    for f in files:
        with fs.open_input(workdir.move_file(plan_dir, f["group"])) as fh:
            t = pq.read_table(fh, columns=["key", "source", "key_hash"])
        if t.num_rows == 0:
            continue
        scores = core._mix(t.column("key_hash").to_numpy() ^ salt)
        idx = np.argsort(scores, kind="stable")[:n]
        keys, sources = t.column("key").take(idx).to_pylist(), t.column("source").take(idx).to_pylist()
        best.extend(zip(scores[idx].tolist(), keys, sources))
    best.sort(key=lambda r: (r[0], r[1]))
    by_source: dict = {}
    for _score, key, source in best[:n]:
        by_source.setdefault(source, []).append(key)
    return by_source


def sample_sources(data_store, plan_dir: str, files: list, pairs: list, n: int, *, seed: int = 0,
                   batch: int = 500) -> SampleReport:
    """Read a seeded sample of ``n`` moves at their sources (``plan_dir``: a plan or its
    staging directory, holding ``moves/``).  ``pairs``: the manifest's pair rows, for the
    per-target byte estimate."""
    total = sum(int(f["rows"]) for f in files)
    rep = SampleReport(requested=n, seed=seed, moves=total)
    if n <= 0 or total == 0:
        return rep
    for source, keys in sorted(_chosen(plan_dir, files, n, seed).items(), key=lambda kv: kv[0].encode()):
        for off in range(0, len(keys), batch):
            chunk = keys[off:off + batch]
            rep.sampled += len(chunk)
            try:
                found = data_store.hashes(chunk, source)
                sizes = data_store.key_sizes([k for k in chunk if k in found], source) if found else {}
            except (StoreError, OSError) as e:
                rep.unreadable += len(chunk)
                rep.unreadable_by_shard[source] = type(e).__name__
                continue
            rep.found += len(found)
            rep.bytes_found += int(sum(sizes.values()))
            gone = len(chunk) - len(found)
            if gone:
                rep.missing += gone
                rep.missing_by_shard[source] = rep.missing_by_shard.get(source, 0) + gone
    if rep.found:
        per_target: dict = {}
        for p in pairs:
            per_target[p["target"]] = per_target.get(p["target"], 0) + int(p["moves"])
        rep.est_bytes_per_target = {t: int(round(m * rep.mean_record_bytes)) for t, m in per_target.items()}
    return rep
