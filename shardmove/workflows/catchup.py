"""Catch-up plans (``shardmove plan --since PLAN``, or ``shardmove catchup PLAN``):
plan only the keys created or reassigned after an earlier plan's snapshot.

    plan_since(cfg, plan_dir)   # -> shardmove.planner.PlanResult

The catch-up snapshot ``<work>/snapshots/catchup-<digest>/`` holds the rows
of a fresh snapshot whose version is above the earlier plan's cutoff; the
ordinary planner plans from it.  A refused catch-up leaves the work directory
as it found it.
"""
from __future__ import annotations

import json
import time
from typing import Callable, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import fs
from pipeline import keys as K
from pipeline import plancore as core
from pipeline import workdir
from pipeline.config import Config
from pipeline.errors import BadInput, before_changes
from pipeline.snapshot import ROWS_PER_FILE, SNAPSHOT_FORMAT_VERSION, list_parts, take_snapshot
from pipeline.stores import open_data_store, open_map_store
from pipeline.workdir import load_manifest
from shardmove.planner import PlanResult, make_plan
from shardmove.workflows._common import check_key_type

__all__ = ["plan_since"]


def _catchup_snapshot(cfg: Config, earlier: dict, out) -> tuple[str, list]:
    """A snapshot directory of the rows written since the earlier plan's cutoff,
    and the directories this call created (the full snapshot, the catch-up one)."""
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
            workdir.remove_committed(info.location)
        raise
    return final, [d for d, new in ((final, created), (info.location, info.created)) if new]


def _catchup_from(cfg: Config, info, base_cutoff: int, earlier: dict, out):
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
               out: Callable[[str], None] = print, name: str | None = None, sample_hashes: int = 0,
               progress: str = "auto") -> PlanResult:
    """A catch-up plan: the keys created or reassigned after an earlier plan's snapshot.

    Takes a fresh snapshot of the map store, keeps the rows whose version is
    above the earlier plan's snapshot cutoff, writes them as the snapshot
    ``<work>/snapshots/catchup-<digest>/`` (0600 files; its ``snapshot.json``
    carries the fresh cutoff, so a catch-up of the catch-up continues from
    there) and plans from it against the configured target.  Keys the
    earlier plan itself swapped are above the cutoff too, but already sit on
    their target, so the ring gives them no move.  Capacity figures of a
    catch-up plan count only the catch-up keys.  ``sample_hashes`` and ``progress`` are
    ``plan``'s (``--sample-hashes`` needs ``dry_run``).
    """
    if sample_hashes and not dry_run:  # refused before the catch-up snapshot is written
        raise BadInput("plan: --sample-hashes needs --dry-run (it only reads)")
    earlier = load_manifest(earlier_plan_dir)
    check_key_type(cfg, earlier)
    with before_changes():  # planning only reads the stores
        snap, created = _catchup_snapshot(cfg, earlier, out)
        try:
            needs_data = (sample_hashes or any(s.capacity_bytes for s in cfg.target_shards)
                          or cfg.data_store.get("kind") in ("objects", "instance"))
            data_store = open_data_store(cfg) if needs_data else None  # as plan: sizes, name limits, samples
            res = make_plan(cfg, data_store=data_store, snapshot=snap, dry_run=dry_run, beam_args=beam_args,
                            out=out, name=name, sample_hashes=sample_hashes, sample_seed=cfg.opt("sample_seed"),
                            progress=progress)
            if res.dry_run and not res.capacity_ok:  # refused by the capacity check (exit 4): keep nothing
                for d in created:
                    workdir.remove_committed(d)
            return res
        except BaseException:
            for d in created:  # a refused catch-up leaves the work directory as it found it
                workdir.remove_committed(d)
            raise
