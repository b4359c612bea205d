"""Planning, end to end: snapshot -> Beam planner -> validation -> manifest.

``make_plan`` is the launcher: it parses nothing and prints nothing itself
except through ``out``; the CLI and the Python API call it.  The Beam graph
(``transforms/plan.py``) writes moves and statistics into a staging
directory; this module validates them, computes the plan id (CONTRACTS "Plan
identity") and commits ``<work>/plans/<plan id>/`` with ``manifest.json``
written last.  Any validation error removes the staging directory: nothing
is committed.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import pyarrow.parquet as pq

from pipeline import fs
from pipeline import plancore as core
from pipeline import workdir
from pipeline.config import Config
from pipeline.errors import BadInput, Refused
from pipeline.ring import Ring
from pipeline.snapshot import list_parts, read_snapshot_info, snapshot_parts, take_snapshot
from pipeline.stores.base import KeyNameLimits, ShardInventory
from pipeline.workdir import MANIFEST_FORMAT_VERSION, load_manifest, resolve_plan_dir
from shardmove.progress import ProgressDisplay, resolve_mode
from shardmove.sampling import sample_sources
from transforms.preflight import preflight

__all__ = ["PlanResult", "make_plan", "plan_threads", "load_manifest", "resolve_plan_dir", "MANIFEST_FORMAT_VERSION"]

LOG = logging.getLogger("shardmove.plan")


@dataclass
class PlanResult:
    plan_id: str
    plan_dir: str | None  # None for a dry run
    manifest: dict
    capacity_ok: bool
    dry_run: bool
    created: bool = True
    lines: list = field(default_factory=list)
    name: str | None = None  # ``plan --name``: metadata, never part of the plan id


def build_ring(cfg: Config):
    try:
        return Ring.build(
            cfg.target_profile,
            [(s.id, s.weight) for s in cfg.target_shards],
            cfg.target_virtual_nodes,
            key_type=cfg.key_type,
        )
    except ValueError as e:
        raise BadInput(f"config target: {e}") from e


def _target_canonical(cfg: Config, ring, stats: dict) -> dict:
    if ring is not None:
        return ring.canonical()
    return {"explicit_target_digest": core.digest_hex(*stats["target_digest"])}


def _validate(stats: dict, dups: int, cfg: Config) -> None:
    err = core.input_error(stats["invalid_keys"], stats["oversize_keys"], cfg.key_type)
    if err:
        raise BadInput(err)
    if dups:
        raise BadInput(f"plan: {dups} duplicate keys in the snapshot")
    if stats["unknown_shard_rows"]:
        ids = stats["unknown_shard_ids"]
        shown = ", ".join(ids[:3]) + (", ..." if len(ids) > 3 else "")
        raise BadInput(f"plan: {stats['unknown_shard_rows']} keys are on {len(ids)} shard ids the configuration "
                       f"does not know ({shown})")
    err = core.input_error(stats.get("target_invalid_keys", 0), stats.get("target_oversize_keys", 0), cfg.key_type,
                           what="target snapshot")
    if err:
        raise BadInput(err)
    if stats.get("target_unknown_shard_rows"):
        raise BadInput(f"plan: {stats['target_unknown_shard_rows']} keys in the target snapshot are on shard ids "
                       "not listed in target.shards")


def _check_key_limits(data_store, staging: str, files: list) -> None:
    """Keys the data store cannot name on their target shard (e.g. GCS's 1024-byte object
    names) are refused at plan time, not halfway through a run."""
    if not isinstance(data_store, KeyNameLimits):
        return
    too_long = 0
    limits: dict = {}
    for f in files:
        with fs.open_input(workdir.move_file(staging, f["group"])) as fh:
            keys = pq.read_table(fh, columns=["key"]).column("key").combine_chunks()
        n = data_store.check_keys(keys, f["target"])
        if n:
            too_long += n
            limits[f["target"]] = data_store.max_key_bytes(f["target"])
    if too_long:
        shown = ", ".join(f"{b} bytes on {s}" for s, b in sorted(limits.items(), key=lambda kv: kv[0].encode())[:3])
        raise BadInput(f"plan: {too_long} keys are too long for the data store's object names on their target "
                       f"shard (longest key allowed: {shown}{', ...' if len(limits) > 3 else ''})")


def _capacity(cfg: Config, stats: dict, data_store, staging: str, files: list) -> tuple[list, bool]:
    """Rows of (shard, before, after, capacity_keys, headroom_keys%, capacity_bytes, bytes_after, headroom_bytes%)."""
    before, after = stats["before"], stats["after"]
    caps = {s.id: s for s in cfg.target_shards}
    shards = sorted(set(before) | set(after) | set(caps), key=lambda s: s.encode())
    min_head = cfg.opt("min_headroom_percent")
    need_bytes = data_store is not None and any(s.capacity_bytes for s in cfg.target_shards) \
        and isinstance(data_store, ShardInventory)
    moved_out: dict = {}
    moved_in: dict = {}
    if need_bytes:
        for f in files:
            with fs.open_input(workdir.move_file(staging, f["group"])) as fh:
                t = pq.read_table(fh, columns=["key"])
            sizes = data_store.key_sizes(t["key"].to_pylist(), f["source"])
            b = sum(sizes.values())
            moved_out[f["source"]] = moved_out.get(f["source"], 0) + b
            moved_in[f["target"]] = moved_in.get(f["target"], 0) + b
    rows = []
    ok = True
    for s in shards:
        c = caps.get(s)
        row = {"shard": s, "before": before.get(s, 0), "after": after.get(s, 0)}
        if c is not None and c.capacity_keys:
            row["capacity_keys"] = c.capacity_keys
            row["headroom_keys_pct"] = 100.0 * (c.capacity_keys - row["after"]) / c.capacity_keys
            if row["headroom_keys_pct"] < min_head:
                ok = False
                row["over"] = True
        if need_bytes and c is not None and c.capacity_bytes:
            cur = data_store.shard_bytes(s) if data_store.shard_exists(s) else 0
            proj = cur - moved_out.get(s, 0) + moved_in.get(s, 0)
            row["capacity_bytes"] = c.capacity_bytes
            row["bytes_before"] = cur
            row["bytes_after"] = proj
            row["headroom_bytes_pct"] = 100.0 * (c.capacity_bytes - proj) / c.capacity_bytes
            if row["headroom_bytes_pct"] < min_head:
                ok = False
                row["over"] = True
        rows.append(row)
    return rows, ok


#: a plan moving more than this multiple of the optimum says the current placement is not the ring's
PLACEMENT_WARNING_FACTOR = 2.0


def placement_warning(moved: float, optimum: float | None) -> str | None:
    """A ``warning:`` line when the plan moves far more keys than the ring's optimum."""
    if optimum is None or optimum <= 0 or moved <= PLACEMENT_WARNING_FACTOR * optimum:
        return None
    return (f"warning: this plan moves {100 * moved:.1f}% of the keys, {moved / optimum:.1f}x the optimum "
            f"{100 * optimum:.1f}%: the current placement is not this ring's. If another ring placed the "
            "keys, set target.profile to it; otherwise give an explicit target (target.snapshot)")


def report_lines(manifest: dict, capacity: list, min_head: float) -> list[str]:
    m = manifest
    lines = [
        f"snapshot: rows={m['keys_examined']} digest={m['snapshot']['digest'][:12]} "
        f"cutoff={m['snapshot'].get('cutoff')} rows_above_cutoff={m['snapshot'].get('rows_above_cutoff', 0)}",
        f"window: {m['window'] or 'all'} keys_in_window={m['keys_in_window']}",
        f"moves: {m['moves']} of {m['keys_examined']} keys ({100 * m['moved_fraction']:.2f}%), "
        f"optimum {100 * m['optimum_moved_fraction']:.2f}%",
    ]
    for p in m["pairs"]:
        lines.append(f"pair {p['source']} -> {p['target']}: {p['moves']}")
    for r in capacity:
        s = f"shard {r['shard']}: before={r['before']} after={r['after']}"
        if "capacity_keys" in r:
            s += f" capacity_keys={r['capacity_keys']} headroom={r['headroom_keys_pct']:.1f}%"
        if "capacity_bytes" in r:
            s += (f" bytes_before={r['bytes_before']} bytes_after={r['bytes_after']} "
                  f"capacity_bytes={r['capacity_bytes']} headroom_bytes={r['headroom_bytes_pct']:.1f}%")
        if r.get("over"):
            s += f" OVER (min headroom {min_head:g}%)"
        lines.append(s)
    return lines


def make_plan(
    cfg: Config,
    *,
    map_store=None,
    data_store=None,
    snapshot: str | None = None,
    dry_run: bool = False,
    beam_args: Sequence[str] = (),
    out: Callable[[str], None] = print,
    sample_hashes: int = 0,
    sample_seed: int = 0,
    progress: str = "auto",
    name: str | None = None,
    cutoff: int | None = None,
    warn: Callable[[str], None] | None = None,
) -> PlanResult:
    """Plan from ``snapshot`` (or ``cfg.snapshot``), else from a snapshot of ``map_store``
    taken now -- at ``cutoff`` when given (:func:`pipeline.snapshot.take_snapshot`).
    ``name``: the plan's name (``plan --name``), checked before anything is committed and
    recorded after the commit; never part of the plan id.  ``warn`` gets the preflight's
    lines (stderr by default)."""
    resolve_mode(progress, sys.stderr)  # a bad progress mode is bad input before anything is read
    if sample_hashes and not dry_run:
        raise BadInput("plan: --sample-hashes needs --dry-run (it only reads)")
    if sample_hashes < 0:
        raise BadInput("plan: --sample-hashes must be >= 0")
    if sample_hashes and data_store is None:
        raise BadInput("plan: --sample-hashes needs a data store (data_store in the config)")
    sample = (sample_hashes, sample_seed)
    if name is not None:
        workdir.validate_plan_name(name)
    pf = preflight(cfg, beam_args, log=warn or (lambda s: sys.stderr.write(s + "\n")))  # before anything is written
    for w in pf.warnings:
        out(w)

    ring = None if cfg.target_snapshot else build_ring(cfg)
    target_parts = list_parts(cfg.target_snapshot, "target snapshot", cfg.key_type) if cfg.target_snapshot else ()

    snap_loc = snapshot or cfg.snapshot
    snap_meta = None
    if cutoff is not None and snap_loc is not None:
        raise BadInput("plan: a cutoff applies to a snapshot of the map store, not to a given snapshot")
    if snap_loc is None:
        if map_store is None:
            raise BadInput("plan: no snapshot given and no map store configured")
        info = take_snapshot(map_store, cfg.work_dir, cfg.opt("segment_size"), cfg.key_type, cutoff=cutoff)
        try:
            # the cutoff is this snapshot's, even where the directory (same content) was written
            # before by another snapshot with another cutoff, or from rows in memory (none)
            meta = {**(read_snapshot_info(info.location) or {}), "cutoff": info.cutoff,
                    "rows_above_cutoff": info.rows_above_cutoff}
            result = _plan_from(cfg, ring, target_parts, info.location, meta,
                                data_store, dry_run, pf.args, out, sample=sample, progress=progress, name=name,
                                snapshot_line=(
                                    f"snapshot: {info.location} rows={info.rows} cutoff={info.cutoff} "
                                    f"rows_above_cutoff={info.rows_above_cutoff}"))
        except BaseException:
            # a refused (or failed) plan leaves the work directory as it found it:
            # the snapshot this call took goes too (an existing one stays)
            if info.created:
                workdir.remove_committed(info.location)
            raise
        if result.dry_run and not result.capacity_ok and info.created:
            workdir.remove_committed(info.location)  # a dry run refused by the capacity check (exit 4) keeps nothing either
        return result
    return _plan_from(cfg, ring, target_parts, snap_loc, read_snapshot_info(snap_loc), data_store, dry_run,
                      pf.args, out, sample=sample, progress=progress, name=name)


#: ``plan_threads: 0`` plans snapshots of at least this many keys on several threads
AUTO_THREADS_MIN_ROWS = 1_000_000
#: ... two per core, at most this many
AUTO_THREADS_MAX = 8


def plan_threads(option: int, rows: int, in_process: bool) -> int:
    """Planning threads per worker process: the ``plan_threads`` option when set; else
    (automatic) two per core, at most AUTO_THREADS_MAX, when the engine runs the plan in
    this one process (in-memory FnApiRunner) and the snapshot has at least
    AUTO_THREADS_MIN_ROWS rows; else 1 (a small snapshot is one chunk of little work;
    other engines' workers already use every core).  Two per core, so that one thread's
    waits (file reads and writes, the GIL) are filled by another's GIL-free work: on 2
    shared cores 4 threads planned 10M keys 20-25% faster than 2."""
    if option:
        return int(option)
    if not in_process or rows < AUTO_THREADS_MIN_ROWS:
        return 1
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(2 * cores, AUTO_THREADS_MAX))


class _PlanProgress:
    """Planning progress while the plan pipeline runs: polls the marks the planning DoFns
    leave in the staging directory (:func:`pipeline.workdir.read_planning_progress`) every
    ``progress_interval`` and shows segments and keys examined (:mod:`shardmove.progress`)."""

    def __init__(self, staging: str, keys_total, mode: str, cfg: Config):
        self.staging = staging
        self.keys_total = int(keys_total) if keys_total is not None else None
        self.display = ProgressDisplay(mode, cfg.opt("progress_log_interval"))
        tick = self.display.tick
        self.interval = min(cfg.opt("progress_interval"), tick) if tick else cfg.opt("progress_interval")
        self._stop = threading.Event()
        self._thread = None
        self.t0 = time.time()

    def fields(self) -> dict:
        segments, keys = workdir.read_planning_progress(self.staging)
        elapsed = time.time() - self.t0
        rate = keys / elapsed if elapsed > 0 else 0.0
        left = None if self.keys_total is None else max(0, self.keys_total - keys)
        return {"phase": "plan", "segments": segments, "keys_examined": keys, "keys_total": self.keys_total,
                "rate_keys_per_s": round(rate, 1),
                "eta_s": round(left / rate, 1) if left is not None and rate > 0 else None,
                "elapsed_s": round(elapsed, 1)}

    def __enter__(self):
        if self.display.mode == "none":
            return self
        self.display.__enter__()

        def loop():
            while not self._stop.wait(self.interval):
                try:
                    self.display.show(self.fields())
                except Exception as e:  # noqa: BLE001 - never fail a plan for its progress
                    LOG.debug("planning progress failed: %s", type(e).__name__)

        self._thread = threading.Thread(target=loop, name="plan-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type, *_):
        if self._thread is None:
            return False
        self._stop.set()
        self._thread.join(timeout=10)
        try:
            if exc_type is None:
                self.display.show(self.fields(), final=True)
        finally:
            self.display.close()
        return False


def _plan_from(cfg: Config, ring, target_parts, snap_loc: str, snap_meta, data_store, dry_run: bool,
               pipeline_argv: Sequence[str], out: Callable[[str], None], snapshot_line: str | None = None,
               sample: tuple = (0, 0), progress: str = "auto", name: str | None = None) -> PlanResult:
    """``pipeline_argv``: the Beam arguments the preflight checked (``Preflight.args``)."""
    # deferred, with the graph: building it loads Beam (seconds); the API imports this module
    from transforms.runner import dry_run_line, dry_run_stages, in_process, make_pipeline, run_pipeline
    from transforms.plan import PlanGraphSpec, build_plan_graph

    parts, footer_rows = snapshot_parts(snap_loc, "snapshot", cfg.key_type)

    known = frozenset(cfg.known_shards())
    ctx = core.PlanContext(
        key_type=cfg.key_type,
        ring=ring,
        window=cfg.window,
        known_shards=known,
        hash_buckets=cfg.opt("hash_buckets"),
        target_shards=frozenset(s.id for s in cfg.target_shards) if cfg.target_shards else None,
    )
    plans = workdir.plans_dir(cfg.work_dir)
    new_dirs = fs.NewDirs()
    new_dirs.watch(plans)
    staging = workdir.new_staging(plans)
    try:
        # the footers' row count (exact, read with the units), not snapshot.json's: a plain
        # Parquet file or directory has no snapshot.json
        local = in_process(pipeline_argv)
        threads = plan_threads(cfg.opt("plan_threads"), footer_rows, local)
        spec = PlanGraphSpec(parts, target_parts, ctx, staging, cfg.opt("segment_size"), threads, reshuffle=not local)
        t0 = time.time()
        p = make_pipeline(pipeline_argv)
        build_plan_graph(p, spec)
        with _PlanProgress(staging, (snap_meta or {}).get("rows"), progress, cfg):
            stages = dry_run_stages(run_pipeline(p))
        fs.rmtree(workdir.planning_progress_dir(staging))  # progress marks are not part of the plan
        if stages is not None:  # a translated (dry-run) Dataflow job: nothing ran, nothing to commit
            fs.rmtree(staging)
            new_dirs.remove_created()
            if snapshot_line:
                out(snapshot_line)
            out(dry_run_line(stages))
            return PlanResult("", None, {}, True, True, created=False, lines=[dry_run_line(stages)])
        elapsed = time.time() - t0
        stats = json.loads(fs.read_bytes(workdir.plan_output_path(staging, workdir.PLAN_STATS)))
        files = json.loads(fs.read_bytes(workdir.plan_output_path(staging, workdir.PLAN_FILES)))
        dups = json.loads(fs.read_bytes(workdir.plan_output_path(staging, workdir.PLAN_DUPLICATES)))
        _validate(stats, dups, cfg)
        _check_key_limits(data_store, staging, files)
        digest = core.digest_hex(*stats["digest"])
        if snap_meta and snap_meta.get("digest") and snap_meta["digest"] != digest:
            raise BadInput("snapshot: content does not match its snapshot.json digest (files changed or damaged)")
        target_canon = _target_canonical(cfg, ring, stats)
        plan_id = core.plan_id_for(digest, target_canon, cfg.key_type, cfg.window)
        if name is not None:  # a name of another plan: refused before anything is printed or committed
            workdir.check_plan_name(cfg.work_dir, name, plan_id)
        if snapshot_line:  # only now: a refused plan prints its one error line and nothing else
            out(snapshot_line)
        files.sort(key=lambda f: (f["source"].encode(), f["target"].encode(), f["bucket"]))
        pairs: dict = {}
        for key, n in stats["pairs"].items():
            pairs[key] = n
        pair_rows = sorted(
            ({"source": k.split("\x1f")[0], "target": k.split("\x1f")[1], "moves": n} for k, n in pairs.items()),
            key=lambda r: (r["source"].encode(), r["target"].encode()),
        )
        weights = {s.id: s.weight for s in cfg.target_shards} if ring is not None else {}
        total = stats["rows"]
        manifest = {
            "format_version": MANIFEST_FORMAT_VERSION,
            "plan_id": plan_id,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "key_type": cfg.key_type.value,
            "window": cfg.opt("window"),
            "hash_buckets": cfg.opt("hash_buckets"),
            "snapshot": {
                "digest": digest,
                "location": snap_loc,
                "cutoff": (snap_meta or {}).get("cutoff"),
                "rows_above_cutoff": (snap_meta or {}).get("rows_above_cutoff", 0),
            },
            "target": target_canon,
            "keys_examined": total,
            "keys_in_window": stats["in_window"],
            "moves": stats["moved"],
            "moved_fraction": (stats["moved"] / total) if total else 0.0,
            "optimum_moved_fraction": core.optimum_moved_fraction(stats["before"], weights) if weights and cfg.window is None else None,
            "pairs": pair_rows,
            "shards_before": dict(sorted(stats["before"].items())),
            "shards_after": dict(sorted(stats["after"].items())),
            "files": files,
            "planner_seconds": round(elapsed, 3),
        }
        ring_optimum = manifest["optimum_moved_fraction"]
        if manifest["optimum_moved_fraction"] is None:
            manifest["optimum_moved_fraction"] = manifest["moved_fraction"]
        capacity, cap_ok = _capacity(cfg, stats, data_store, staging, files)
        manifest["capacity"] = capacity
        lines = [f"plan id: {plan_id}"]
        if name is not None:
            lines.append(f"name: {name}")
        if manifest["moves"] == 0:
            lines.append("nothing to move")  # still committed: a run then says the plan is complete
        lines += report_lines(manifest, capacity, cfg.opt("min_headroom_percent"))
        if total == 0:
            lines.append("empty snapshot: the plan is empty")
        warning = placement_warning(manifest["moved_fraction"], ring_optimum)
        if warning:
            lines.append(warning)
        for line in lines:
            out(line)
        result = PlanResult(plan_id, None, manifest, cap_ok, dry_run, lines=lines, name=name)
        final = workdir.plan_dir(cfg.work_dir, plan_id)
        _note_reused_layout(final, manifest, out)
        if dry_run:
            if sample[0]:  # read a seeded sample of the moves at their sources; nothing is copied
                rep = sample_sources(data_store, staging, files, pair_rows, sample[0], seed=sample[1],
                                     batch=cfg.opt("swap_batch_size"))
                manifest["sample"] = rep.as_dict()
                for line in rep.lines():
                    out(line)
                    lines.append(line)
            fs.rmtree(staging)
            new_dirs.remove_created()
            out("dry run: no plan committed")
            return result
        if not cap_ok:
            fs.rmtree(staging)
            raise Refused("plan: a target shard would fall below the configured headroom; no plan committed")
        for leftover in workdir.PLAN_OUTPUTS:
            fs.remove(workdir.plan_output_path(staging, leftover))
        workdir.write_manifest(staging, manifest)
        result.created = workdir.commit_staged(staging, final, workdir.MANIFEST)
        result.plan_dir = final
        if name is not None:
            workdir.claim_plan_name(cfg.work_dir, name, plan_id)
        else:
            result.name = workdir.plan_names(cfg.work_dir).get(plan_id)
        LOG.info("plan %s committed: %d moves in %d files", plan_id[:12], stats["moved"], len(files))
        return result
    except BaseException:
        fs.rmtree(staging)
        new_dirs.remove_created()
        raise


def _note_reused_layout(final: str, manifest: dict, out: Callable[[str], None]) -> None:
    """One line when a committed plan with this id exists with another work
    layout: the plan id does not depend on ``hash_buckets``, so the existing
    plan (and its layout) is what ``run`` will use."""
    if not workdir.has_manifest(final):
        return
    try:
        old = json.loads(fs.read_bytes(workdir.manifest_path(final))).get("hash_buckets")
    except (OSError, ValueError):
        return
    if old is not None and old != manifest["hash_buckets"]:
        out(f"note: plan {manifest['plan_id'][:12]} already exists with hash_buckets={old}; it is kept as it is "
            f"(hash_buckets={manifest['hash_buckets']} is ignored: it does not change the plan id)")
