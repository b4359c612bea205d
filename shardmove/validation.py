"""Topology validation and drift detection (the spec's ``TopologyValidator``).

Never imports Beam.  Works through the :class:`~pipeline.stores.base.MapStore`
protocol only (``snapshot``, ``lookup``, ``count_above``, ``max_version``), so
it validates every map store the same way.

:func:`validate_topology` streams one point-in-time export of the map
(``map_store.snapshot(segment_size)``) and reports

* rows per shard id, and the rows on shard ids the configuration does not
  know;
* duplicate keys, confirmed by key bytes: rows are partitioned by the top
  byte of their stable hash (in memory while small, spilled to owner-only
  Arrow files in a private temporary directory beyond ``memory_rows``), then
  each partition's colliding hashes are grouped by key bytes;
* the topology digest: the same order-independent digest as the snapshot
  digest (:func:`pipeline.plancore.digest_lanes` / ``digest_hex``), so it equals
  ``shardmove snapshot``'s digest of the same content and, before a plan has
  run, the plan's ``snapshot.digest``;
* a map that holds no rows at all (a wrong table, prefix or path): bad;
* on a store whose change counter is kept apart from the rows
  (:class:`~pipeline.stores.base.ExternalClock`, Redis), rows whose version is
  above the counter (seeded without setting it): bad, as every snapshot would
  leave them out.

:func:`compare_plan` reads a committed plan's move files one group at a time
in batches and looks their keys up (``map_store.lookup``): each plan key is at
its source (still to move), at its target (moved), elsewhere or missing
(drift).  With the plan snapshot's version cutoff it also counts the rows
created or changed since the snapshot that the plan's own swaps do not
explain: ``count_above(cutoff)`` minus the plan keys found above the cutoff,
plus plan keys rewritten at their source.

Only counts leave this module: never a key value.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import fs
from pipeline import keys as K
from pipeline import plancore as core
from pipeline import workdir
from pipeline.errors import EXIT_BAD_INPUT, EXIT_OK, EXIT_REFUSED, BadInput
from pipeline.snapshot import list_parts
from pipeline.stores import open_map_store
from pipeline.stores.base import ExternalClock

__all__ = [
    "TopologyReport",
    "DriftReport",
    "ValidationResult",
    "validate_topology",
    "compare_plan",
    "validate",
    "format_lines",
    "error_lines",
]

LOG = logging.getLogger("shardmove.validation")

#: Rows held in memory for duplicate detection before spilling to disk.
DEFAULT_MEMORY_ROWS = 2_000_000
#: Keys per ``map_store.lookup`` call in a plan comparison.
DEFAULT_LOOKUP_BATCH = 5_000
_PARTITIONS = 256
_SPILL_SCHEMA = pa.schema([("h", pa.uint64()), ("key", pa.binary())])


@dataclasses.dataclass
class TopologyReport:
    """What one pass over the map found (counts and shard ids only)."""

    rows: int = 0
    cutoff: int | None = None
    rows_above_cutoff: int | None = None  # written while the export ran
    invalid_keys: int = 0  # rows the key type cannot represent (skipped by the export)
    empty_keys: int = 0  # empty string / bytes keys: the planner rejects them
    oversize_keys: int = 0  # keys longer than MAX_KEY_BYTES: the planner rejects them
    target_checked: bool = False  # an explicit target snapshot was read too
    target_invalid_keys: int = 0  # ... keys in it the key type cannot represent (or empty)
    target_oversize_keys: int = 0
    target_unknown_shard_rows: int = 0  # ... rows on ids not in target.shards
    duplicate_keys: int = 0  # distinct keys that appear more than once
    duplicate_rows: int = 0  # rows beyond the first of each duplicated key
    per_shard: dict = dataclasses.field(default_factory=dict)
    unknown_shard_rows: int = 0
    unknown_shards: list = dataclasses.field(default_factory=list)
    digest: str = ""
    spilled: bool = False
    rows_above_clock: int = 0  # rows whose version the change counter never issued (ExternalClock stores)
    highest_above_clock: int = 0  # ... the highest such version
    clock: int | None = None  # the change counter after the pass

    @property
    def empty(self) -> bool:
        """The map holds no rows at all (a wrong table, prefix or path is the usual cause)."""
        return not (self.rows or self.invalid_keys or self.rows_above_cutoff or self.rows_above_clock)

    @property
    def bad(self) -> bool:
        return bool(self.duplicate_keys or self.unknown_shard_rows or self.invalid_keys or self.empty_keys
                    or self.oversize_keys or self.target_invalid_keys or self.target_oversize_keys
                    or self.target_unknown_shard_rows or self.rows_above_clock or self.empty)


@dataclasses.dataclass
class DriftReport:
    """A committed plan compared with the live map."""

    plan_id: str
    plan_keys: int = 0
    at_source: int = 0  # still to move
    at_target: int = 0  # moved (by this plan's swaps)
    elsewhere: int = 0  # on a third shard: drift
    missing: int = 0  # deleted from the map: drift
    snapshot_cutoff: int | None = None
    rows_above_cutoff: int | None = None  # count_above(cutoff) after the pass
    plan_keys_above_cutoff: int = 0
    swapped_by_plan: int = 0  # plan keys at their target with version > cutoff (this plan's own swaps)
    rewritten_at_source: int = 0  # plan keys at their source with version > cutoff: drift
    other_changed: int | None = None  # non-plan rows created or changed since the snapshot: drift
    concurrent_writes: int = 0  # change numbers issued while the comparison ran
    digest_matches_snapshot: bool | None = None

    @property
    def drift(self) -> bool:
        return bool(self.elsewhere or self.missing or self.rewritten_at_source or (self.other_changed or 0))


@dataclasses.dataclass
class ValidationResult:
    topology: TopologyReport
    drift: DriftReport | None = None

    @property
    def exit_code(self) -> int:
        if self.topology.bad:
            return EXIT_BAD_INPUT
        if self.drift is not None and self.drift.drift:
            return EXIT_REFUSED
        return EXIT_OK

    @property
    def verdict(self) -> str:
        return {EXIT_OK: "ok", EXIT_BAD_INPUT: "bad topology", EXIT_REFUSED: "drift detected"}[self.exit_code]

    def to_dict(self) -> dict:
        out = {"topology": dataclasses.asdict(self.topology), "exit_code": self.exit_code, "verdict": self.verdict}
        out["topology"]["empty"] = self.topology.empty
        if self.drift is not None:
            out["drift"] = dataclasses.asdict(self.drift)
            out["drift"]["drift"] = self.drift.drift
        return out


# ------------------------------------------------------------ duplicates

class _DuplicateFinder:
    """Duplicate keys (by key bytes) with memory bounded by ``memory_rows``.

    Rows stay in memory until ``memory_rows``; then every row is spilled to
    one of 256 Arrow stream files by the top byte of its stable hash, and the
    partitions are checked one at a time.  The spill directory is created
    0700 by :func:`tempfile.mkdtemp` (it holds key values) and removed by
    :meth:`close`.
    """

    def __init__(self, memory_rows: int, spill_root: str | None = None):
        self.memory_rows = max(1, int(memory_rows))
        self.spill_root = spill_root
        self._mem: list[pa.Table] = []
        self._mem_rows = 0
        self._dir: str | None = None
        self._writers: list | None = None
        self._sinks: list = []

    @property
    def spilled(self) -> bool:
        return self._dir is not None

    def add(self, keys: pa.Array, hashes: np.ndarray) -> None:
        t = pa.table({"h": pa.array(hashes, pa.uint64()), "key": keys}, schema=_SPILL_SCHEMA)
        if self._writers is None:
            self._mem.append(t)
            self._mem_rows += t.num_rows
            if self._mem_rows > self.memory_rows:
                self._spill_open()
                for m in self._mem:
                    self._spill(m)
                self._mem, self._mem_rows = [], 0
        else:
            self._spill(t)

    def _spill_open(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="shardmove-validate-", dir=self.spill_root)
        self._writers = []
        for i in range(_PARTITIONS):
            path = os.path.join(self._dir, f"p{i:03d}.arrow")
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))  # owner-only before any data
            sink = pa.OSFile(path, "wb")
            self._sinks.append(sink)
            self._writers.append(pa.ipc.new_stream(sink, _SPILL_SCHEMA))

    def _spill(self, t: pa.Table) -> None:
        if t.num_rows == 0:
            return
        part = (t.column("h").to_numpy() >> np.uint64(56)).astype(np.int64)
        order = np.argsort(part, kind="stable")
        part_sorted = part[order]
        t = t.take(pa.array(order))
        bounds = np.searchsorted(part_sorted, np.arange(_PARTITIONS + 1))
        for i in range(_PARTITIONS):
            lo, hi = int(bounds[i]), int(bounds[i + 1])
            if hi > lo:
                self._writers[i].write_table(t.slice(lo, hi - lo))

    def finish(self) -> tuple[int, int]:
        """(duplicate keys, extra rows)."""
        if self._writers is None:
            tables = [pa.concat_tables(self._mem)] if self._mem else []
            self._mem = []
        else:
            for w in self._writers:
                w.close()
            for s in self._sinks:
                s.close()
            self._writers = []
            tables = self._partitions()
        keys = rows = 0
        for t in tables:
            k, r = _duplicates_in(t)
            keys += k
            rows += r
        return keys, rows

    def _partitions(self) -> Iterable[pa.Table]:
        for i in range(_PARTITIONS):
            with pa.OSFile(os.path.join(self._dir, f"p{i:03d}.arrow"), "rb") as src:
                yield pa.ipc.open_stream(src).read_all()

    def close(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)


def _duplicates_in(t: pa.Table) -> tuple[int, int]:
    """Duplicate keys in one partition: colliding hashes first, then key bytes."""
    if t.num_rows < 2:
        return 0, 0
    h = t.column("h").to_numpy()
    uniq, counts = np.unique(h, return_counts=True)
    colliding = uniq[counts > 1]
    if len(colliding) == 0:
        return 0, 0
    cand = t.filter(pa.array(np.isin(h, colliding))).select(["key"])
    g = cand.group_by("key").aggregate([("key", "count")])
    c = g.column("key_count").to_numpy()
    dup = c[c > 1]
    return int(len(dup)), int((dup - 1).sum())


# ------------------------------------------------------------- topology

def validate_topology(map_store, known_shards, segment_size: int = 20000, *,
                      memory_rows: int = DEFAULT_MEMORY_ROWS, spill_root: str | None = None) -> TopologyReport:
    """One streamed pass over ``map_store.snapshot(segment_size)``; see the module docstring."""
    rep = TopologyReport()
    kt = getattr(map_store, "key_type", None)
    empty_matters = kt is None or K.KeyType(kt) in (K.KeyType.STRING, K.KeyType.BYTES)
    lanes = (0, 0, 0)
    per_shard: dict[str, int] = {}
    finder = _DuplicateFinder(memory_rows, spill_root)
    try:
        with map_store.snapshot(segment_size) as snap:
            for batch in snap:
                if batch.num_rows == 0:
                    continue
                keys = batch.column(batch.schema.get_field_index("key"))
                shards = batch.column(batch.schema.get_field_index("shard_id"))
                if keys.type != pa.binary():
                    keys = keys.cast(pa.binary())
                lengths = pc.binary_length(keys)
                rep.oversize_keys += int(pc.sum(pc.greater(lengths, K.MAX_KEY_BYTES).cast(pa.int64())).as_py() or 0)
                if empty_matters:
                    rep.empty_keys += int(pc.sum(pc.equal(lengths, 0).cast(pa.int64())).as_py() or 0)
                hashes = K.stable_hashes(keys.to_pylist(), len(keys))
                lanes = core._add_digest(lanes, core.digest_lanes(hashes, core._shard_hash_array(shards)))
                for v in pc.value_counts(shards):
                    s = v["values"].as_py()
                    per_shard[s] = per_shard.get(s, 0) + v["counts"].as_py()
                finder.add(keys, hashes)
                rep.rows += batch.num_rows
            stats = snap.stats()
        rep.cutoff = stats.cutoff
        rep.rows_above_cutoff = stats.rows_above_cutoff
        if isinstance(map_store, ExternalClock):
            rep.rows_above_clock, rep.highest_above_clock = map_store.rows_above_clock()
            rep.clock = map_store.max_version()
        rep.invalid_keys = int(stats.invalid_keys or 0)
        rep.duplicate_keys, rep.duplicate_rows = finder.finish()
        rep.spilled = finder.spilled
    finally:
        finder.close()
    known = set(known_shards)
    rep.per_shard = dict(sorted(per_shard.items(), key=lambda kv: kv[0].encode()))
    unknown = sorted((s for s in per_shard if s not in known), key=lambda s: s.encode())
    rep.unknown_shards = unknown
    rep.unknown_shard_rows = sum(per_shard[s] for s in unknown)
    rep.digest = core.digest_hex(*lanes)
    LOG.info("validated %d rows on %d shards (%d duplicate keys)", rep.rows, len(per_shard), rep.duplicate_keys)
    return rep


# ---------------------------------------------------------------- drift

def _move_key_batches(plan_dir: str, group: str, batch_size: int):
    path = workdir.move_file(plan_dir, group)
    try:
        with fs.open_input(path) as fh:
            pf = pq.ParquetFile(fh)
            for b in pf.iter_batches(batch_size=batch_size, columns=["key"]):
                yield b.column(0).to_pylist()
    except FileNotFoundError as e:
        raise BadInput(f"plan: move file {group}.parquet is missing") from e
    except (OSError, pa.ArrowException) as e:
        raise BadInput(f"plan: move file {group}.parquet is damaged") from e


def compare_plan(map_store, plan_dir: str, manifest: dict, *, lookup_batch: int = DEFAULT_LOOKUP_BATCH,
                 live_digest: str | None = None) -> DriftReport:
    """Compare a committed plan with the live map (see the module docstring)."""
    rep = DriftReport(plan_id=manifest["plan_id"])
    cutoff = (manifest.get("snapshot") or {}).get("cutoff")
    rep.snapshot_cutoff = cutoff
    if live_digest is not None:
        rep.digest_matches_snapshot = live_digest == manifest["snapshot"]["digest"]
    v0 = map_store.max_version()
    for f in manifest["files"]:
        source, target = f["source"], f["target"]
        for keys in _move_key_batches(plan_dir, f["group"], lookup_batch):
            found = map_store.lookup(keys)
            rep.plan_keys += len(keys)
            rep.missing += len(keys) - len(found)
            for shard, version in found.values():
                above = cutoff is not None and version > cutoff
                rep.plan_keys_above_cutoff += above
                if shard == target:
                    rep.at_target += 1
                    rep.swapped_by_plan += above
                elif shard == source:
                    rep.at_source += 1
                    rep.rewritten_at_source += above
                else:
                    rep.elsewhere += 1
    if cutoff is not None:
        # versions only grow: every plan key seen above the cutoff is still counted here
        rep.rows_above_cutoff = map_store.count_above(cutoff)
        rep.other_changed = max(0, rep.rows_above_cutoff - rep.plan_keys_above_cutoff)
    rep.concurrent_writes = max(0, map_store.max_version() - v0)
    if rep.plan_keys != manifest.get("moves", rep.plan_keys):
        raise BadInput(f"plan: move files hold {rep.plan_keys} keys, the manifest says {manifest['moves']}")
    return rep


# ------------------------------------------------------------- launcher

def _check_target_snapshot(cfg, rep: TopologyReport) -> None:
    """Count what the planner refuses in an explicit target snapshot (same rules:
    :func:`pipeline.plancore.prepare_batch` on the target side)."""
    targets = frozenset(s.id for s in cfg.target_shards) if cfg.target_shards else None
    st = core.Stats()
    units = list_parts(cfg.target_snapshot, "target snapshot", cfg.key_type)
    for path in dict.fromkeys(p for p, _rg in units):
        try:
            with fs.open_input(path) as fh:
                pf = pq.ParquetFile(fh)
                for rg in range(pf.num_row_groups):
                    core.prepare_batch(pf.read_row_group(rg, columns=["key", "shard_id"]), cfg.key_type, st,
                                       targets, target_side=True)
        except (OSError, pa.ArrowException) as e:
            raise BadInput(f"target snapshot: {path.rsplit('/', 1)[-1]} is corrupted or truncated "
                           f"({type(e).__name__})") from None
    rep.target_checked = True
    rep.target_invalid_keys = st.target_invalid_keys
    rep.target_oversize_keys = st.target_oversize_keys
    rep.target_unknown_shard_rows = st.target_unknown_shard_rows


def validate(cfg, *, compare_plan_dir: str | None = None, map_store=None,
             memory_rows: int = DEFAULT_MEMORY_ROWS) -> ValidationResult:
    """Validate the configured map store; optionally compare a plan with it."""
    manifest = None
    if compare_plan_dir is not None:
        manifest = workdir.load_manifest(compare_plan_dir)
        if manifest["key_type"] != cfg.key_type.value:
            raise BadInput(f"plan key_type {manifest['key_type']} differs from the configuration's "
                           f"{cfg.key_type.value}")
    own = map_store is None
    store = open_map_store(cfg) if own else map_store
    try:
        topo = validate_topology(store, cfg.known_shards(), cfg.opt("segment_size"), memory_rows=memory_rows)
        if getattr(cfg, "target_snapshot", None):
            _check_target_snapshot(cfg, topo)
        drift = None
        if manifest is not None:
            drift = compare_plan(store, compare_plan_dir, manifest, live_digest=topo.digest)
        return ValidationResult(topo, drift)
    finally:
        if own:
            store.close()


def format_lines(res: ValidationResult) -> list[str]:
    """``name: value`` lines for the terminal (counts and shard ids only)."""
    t = res.topology
    lines = [f"map rows: {t.rows} cutoff: {t.cutoff} rows_above_cutoff: {t.rows_above_cutoff}"]
    for s, n in t.per_shard.items():
        lines.append(f"shard {s}: {n}")
    lines.append(f"duplicate keys: {t.duplicate_keys} (extra rows: {t.duplicate_rows})")
    shown = ", ".join(t.unknown_shards[:5]) + (", ..." if len(t.unknown_shards) > 5 else "")
    lines.append(f"unknown shard rows: {t.unknown_shard_rows}" + (f" on {len(t.unknown_shards)} ids ({shown})"
                                                                  if t.unknown_shards else ""))
    lines.append(f"invalid keys: {t.invalid_keys}")
    lines.append(f"empty keys: {t.empty_keys}")
    lines.append(f"over-long keys (> {K.MAX_KEY_BYTES} bytes): {t.oversize_keys}")
    if t.target_checked:
        lines.append(f"target snapshot: invalid keys: {t.target_invalid_keys} over-long keys: "
                     f"{t.target_oversize_keys} rows on shards not in target.shards: {t.target_unknown_shard_rows}")
    if t.clock is not None:
        lines.append(f"rows above the clock: {t.rows_above_clock} (clock: {t.clock})")
    lines.append(f"topology digest: {t.digest}")
    d = res.drift
    if d is not None:
        lines.append(f"plan id: {d.plan_id}")
        lines.append(f"plan keys: {d.plan_keys} at_source={d.at_source} at_target={d.at_target} "
                     f"elsewhere={d.elsewhere} missing={d.missing}")
        if d.snapshot_cutoff is None:
            lines.append("changed since snapshot: not checked (the plan's snapshot has no version cutoff)")
        else:
            lines.append(f"changed since snapshot (version > {d.snapshot_cutoff}): rows={d.rows_above_cutoff} "
                         f"swapped_by_this_plan={d.swapped_by_plan} "
                         f"other_plan_keys={d.plan_keys_above_cutoff - d.swapped_by_plan} "
                         f"other_keys={d.other_changed}")
        if d.digest_matches_snapshot is not None:
            lines.append("topology equals plan snapshot: " + ("yes" if d.digest_matches_snapshot else "no"))
        if d.concurrent_writes:
            lines.append(f"warning: the map changed while validating ({d.concurrent_writes} change numbers); "
                         "counts may be inexact")
        lines.append("drift: " + ("DETECTED" if d.drift else "none"))
    lines.append(f"validate: {res.verdict}")
    return lines


def describe_map(spec) -> str:
    """Which map a ``map_store`` section names, for a message: kind and table, prefix or path."""
    kind = spec.get("kind")
    if kind == "redis":
        return f"redis prefix {spec.get('prefix', 'shardmap')!r}"
    if kind == "postgres":
        return f"postgres table {spec.get('table', 'shard_map')!r}"
    return f"{kind} file {spec.get('path')}"


def error_lines(res: ValidationResult, map_spec=None) -> list[str]:
    """One ``validate: ...`` line per kind of problem that makes the exit code non-zero
    (counts only); ``map_spec`` (the ``map_store`` section) names the map."""
    t, d = res.topology, res.drift
    where = describe_map(map_spec) if map_spec else "the map store"
    out = []
    if t.empty:
        out.append(f"validate: {where} holds no rows (is the map store's table, prefix or path the right one?)")
    if t.rows_above_clock:
        fix = (f"SET {map_spec.get('prefix', 'shardmap')}:clock {t.highest_above_clock}"
               if map_spec and map_spec.get("kind") == "redis" else f"raise it to {t.highest_above_clock}")
        out.append(f"validate: {t.rows_above_clock} rows of {where} have a version above its clock ({t.clock}), "
                   f"up to {t.highest_above_clock}; snapshots leave them out: {fix}")
    if (t.duplicate_keys or t.unknown_shard_rows or t.invalid_keys or t.empty_keys or t.oversize_keys
            or t.target_invalid_keys or t.target_oversize_keys or t.target_unknown_shard_rows):
        out.append(f"validate: bad topology: {t.duplicate_keys} duplicate keys, "
                   f"{t.unknown_shard_rows} rows on {len(t.unknown_shards)} unknown shard ids, "
                   f"{t.invalid_keys} invalid keys")
    if not t.bad and d is not None and d.drift:
        out.append(f"validate: drift detected against plan {d.plan_id[:12]}: "
                   f"{d.elsewhere} plan keys on another shard, {d.missing} deleted, "
                   f"{d.rewritten_at_source} rewritten at source, {d.other_changed or 0} other keys changed "
                   "since the snapshot")
    return out
