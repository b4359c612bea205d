"""shardmove's Python API: plan, inspect, run, watch and repair key migrations.

``import shardmove`` exposes everything here (loaded on first use)::

    import shardmove
    cfg = shardmove.load_config("demo/shardmove.yaml")     # or pass the path itself
    plan = shardmove.plan(cfg, snapshot=table)              # a path, an Arrow table, a reader or (key, shard) pairs
    for batch in plan.moves():                              # Arrow record batches, in CONTRACTS order
        ...
    done = shardmove.run(cfg, plan, progress=print, cancel=event)   # a RunSummary
    shardmove.status(plan).state                            # "complete", "stopped", ...

Nothing here prints: every function takes ``out`` (a callable given each line the CLI
would print), which defaults to discarding them.  Bad input raises
:class:`~pipeline.errors.BadInput` (the CLI's exit 2) with the CLI's one-line message;
a refusal raises :class:`~pipeline.errors.Refused` (exit 4).  Messages hold counts, paths
and shard ids, never a key value.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence, Union

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from pipeline import fs
from pipeline import workdir
from pipeline.config import Config, load_config
from pipeline.errors import BadInput, Interrupted, Refused, RunHalted, ShardmoveError, before_changes
from pipeline.keys import KeyType, stable_hashes
from pipeline.ring import Ring
from pipeline.snapshot import take_snapshot, write_snapshot
from pipeline.stores import close_opened, open_data_store, open_map_store
from shardmove.demo import create_demo
from shardmove.executor import RunResult, plan_state, plan_status, run_plan, status_exit_code
from shardmove.ops import cleanup as _cleanup
from shardmove.ops import export_failures as _export
from shardmove.ops import rollback as _rollback
from shardmove.ops import verify_plan
from shardmove.planner import make_plan
from shardmove.validation import validate as _validate

__all__ = [
    "load_config", "create_demo_keyspace", "snapshot", "plan", "run", "status", "validate", "verify",
    "rollback", "cleanup", "export_failures", "plans", "Plan", "Pair", "RunSummary", "Status",
    "ShardmoveError", "BadInput", "Refused", "RunHalted", "Interrupted",
]

#: A configuration: a loaded :class:`~pipeline.config.Config`, or the path of its YAML file.
ConfigLike = Union[Config, str, os.PathLike]
#: Assignments given in memory: an Arrow table (or record batch), a record batch reader,
#: or an iterable of ``(key, shard_id)`` / ``(key, shard_id, version)`` tuples.
Rows = Union[pa.Table, pa.RecordBatch, pa.RecordBatchReader, Iterable[tuple]]


def _discard(_line: str) -> None:
    pass


def _config(config: ConfigLike) -> Config:
    if isinstance(config, Config):
        return config
    if isinstance(config, (str, os.PathLike)):
        return load_config(os.fspath(config))
    raise BadInput(f"config: expected a Config or the path of a YAML file, got {type(config).__name__}")


def _check_store(obj, what: str, cfg: Config) -> None:
    from pipeline.stores.base import DataStore, MapStore

    proto = MapStore if what == "map_store" else DataStore
    if not isinstance(obj, proto):
        missing = [n for n in sorted(proto.__protocol_attrs__ if hasattr(proto, "__protocol_attrs__")
                                     else dir(proto)) if not n.startswith("_") and not hasattr(obj, n)]
        raise BadInput(f"{what}: {type(obj).__name__} does not implement the {proto.__name__} protocol"
                       + (f" (missing {', '.join(missing)})" if missing else ""))
    if KeyType(getattr(obj, "key_type")) is not cfg.key_type:
        raise BadInput(f"{what}: the store's key_type is {KeyType(obj.key_type).value}, the configuration's "
                       f"{cfg.key_type.value}")


@contextlib.contextmanager
def _with_stores(cfg: Config, map_store=None, data_store=None):
    """``cfg`` with the caller's store objects in place of its ``map_store`` / ``data_store``
    sections, for the duration of one call (:mod:`pipeline.stores.registry`: the driver and an
    in-process runner's workers use these very objects; other worker processes a pickled copy)."""
    from pipeline.stores.registry import instance_section

    refs = []
    try:
        for what, obj in (("map_store", map_store), ("data_store", data_store)):
            if obj is not None:
                _check_store(obj, what, cfg)
                section = instance_section(obj)
                refs.append(section["ref"])
                cfg = dataclasses.replace(cfg, **{what: section})
        yield cfg
    finally:
        for ref in refs:
            ref.close()


def create_demo_keyspace(directory: str, *, keys: int = 20000, shards: int = 4, key_type: str = "string",
                         seed: int = 0) -> dict:
    """An embedded keyspace (SQLite map + one SQLite file per shard) and a
    config whose target adds one shard.  Creates nothing that exists."""
    kt = KeyType(key_type)
    directory = os.path.abspath(directory)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    cfg_path = os.path.join(directory, "shardmove.yaml")
    ks = os.path.join(directory, "keyspace")
    current = [f"s{i}" for i in range(shards)]
    target = current + [f"s{shards}"]
    info = {"keys": keys, "config": cfg_path, "created": False}
    if not os.path.exists(os.path.join(ks, "map.sqlite")):
        ring = Ring.build("native", [(s, 1.0) for s in current], key_type=kt)

        def assign(batch: list[bytes]) -> list[str]:
            idx = ring.assign(batch, stable_hashes(batch, len(batch)))
            return [ring.shard_ids[i] for i in idx]

        counts = create_demo(ks, keys=keys, shards=current, key_type=kt, assign=assign, seed=seed)
        info.update(counts if isinstance(counts, dict) else {})
        info["keys"] = keys
        info["created"] = True
    if not os.path.exists(cfg_path):
        per_shard = max(1, keys // len(target))
        doc = {
            "key_type": kt.value,
            "work_dir": "work",
            "map_store": {"kind": "sqlite", "path": "keyspace/map.sqlite"},
            "data_store": {"kind": "sqlite", "directory": "keyspace/shards"},
            "current_shards": current,
            "target": {
                "profile": "native",
                "shards": [{"id": s, "weight": 1, "capacity_keys": int(per_shard * 1.6) + 10} for s in target],
            },
            "copy_concurrency": 8,
            "swap_batch_size": 500,
            "hash_buckets": 4,
        }
        text = (f"# shardmove demo keyspace: {len(current)} shard{'s' if len(current) != 1 else ''} today, "
                f"the target adds {target[-1]}.\n") + yaml.safe_dump(doc, sort_keys=False)
        try:  # whole or not at all: a kill here leaves no half-written config for the rerun to keep
            fs.create_if_absent(cfg_path, text.encode("utf-8"), 0o600)
        except fs.CommitConflict:
            pass  # another process wrote its config first: "creates nothing that exists"
    return info


def snapshot(config: ConfigLike, rows: Rows | None = None, *, cutoff: int | None = None, map_store=None):
    """Export the map store (or, given ``rows``, those in-memory assignments) into
    ``<work>/snapshots/<digest>/``; returns :class:`pipeline.snapshot.SnapshotInfo`.

    ``cutoff``: export the map at that version (rows with ``version <= cutoff``) instead
    of the current one; above the current version: :class:`BadInput`.  ``map_store``: a
    store object (the ``MapStore`` protocol) to export instead of the configured one."""
    cfg = _config(config)
    if map_store is not None:
        _check_store(map_store, "map_store", cfg)
    if rows is not None:
        if cutoff is not None:
            raise BadInput("snapshot: a cutoff applies to the map store, not to rows in memory")
        return write_snapshot(rows, cfg.work_dir, cfg.opt("segment_size"), cfg.key_type)
    with before_changes():
        store = map_store if map_store is not None else open_map_store(cfg)
        return take_snapshot(store, cfg.work_dir, cfg.opt("segment_size"), cfg.key_type, cutoff=cutoff)


# ------------------------------------------------------------------ plans

@dataclass(frozen=True)
class Pair:
    """Keys moving from one shard to another."""
    source: str
    target: str
    moves: int


@dataclass
class Plan:
    """A plan: committed (``plan_dir`` set) or a dry run's (``plan_dir`` None, nothing kept).

    ``manifest`` is the plan's ``manifest.json`` (counts, pairs, shards before and after,
    capacity rows); ``lines`` what the CLI prints about it."""
    plan_id: str
    plan_dir: str | None
    manifest: dict
    capacity_ok: bool
    dry_run: bool
    created: bool = True
    lines: list = field(default_factory=list)
    name: str | None = None

    @property
    def id(self) -> str:
        return self.plan_id

    @property
    def move_count(self) -> int:
        return int(self.manifest["moves"])

    @property
    def keys_examined(self) -> int:
        return int(self.manifest["keys_examined"])

    @property
    def moved_fraction(self) -> float:
        return float(self.manifest.get("moved_fraction") or 0.0)

    def pairs(self) -> list[Pair]:
        """(source, target, moves) per pair, in CONTRACTS order (shard ids by their UTF-8 bytes)."""
        pairs = [Pair(p["source"], p["target"], int(p["moves"])) for p in self.manifest.get("pairs") or []]
        return sorted(pairs, key=lambda p: (p.source.encode(), p.target.encode()))

    def moves(self, *, batch_size: int = 65536) -> Iterator[pa.RecordBatch]:
        """Every move as Arrow record batches (``key`` canonical bytes, ``source``, ``target``,
        ``key_hash``) in CONTRACTS order: (source, target, stable key hash, key).  Streams one
        move file at a time.  A dry run keeps no moves: :class:`BadInput`."""
        if self.plan_dir is None:
            raise BadInput("plan: a dry run keeps no moves; plan without dry_run to read them")
        files = sorted(self.manifest["files"], key=lambda f: (f["source"].encode(), f["target"].encode(),
                                                              int(f["bucket"])))
        for f in files:
            with fs.open_input(workdir.move_file(self.plan_dir, f["group"])) as fh:
                yield from pq.ParquetFile(fh).iter_batches(batch_size=batch_size)


def _in_memory(x) -> bool:
    return x is not None and not isinstance(x, (str, os.PathLike))


def plan(config: ConfigLike, *, snapshot: str | os.PathLike | Rows | None = None,
         target: str | os.PathLike | Rows | None = None, dry_run: bool = False, name: str | None = None,
         sample_hashes: int = 0, beam_args: Sequence[str] = (), out: Callable[[str], None] = _discard,
         progress_output: str = "none", cutoff: int | None = None, map_store=None, data_store=None,
         warn: Callable[[str], None] | None = None) -> Plan:
    """Plan the migration to the configured target; returns a :class:`Plan`.

    ``snapshot``: where the current assignments come from -- None (a consistent snapshot of
    the map store), a snapshot directory or Parquet file, or rows in memory (:data:`Rows`).
    ``target``: None (the configured ring) or an explicit target assignment, as a path or
    rows in memory.  Rows in memory are streamed in segments into
    ``<work>/snapshots/<digest>/`` first (never through ``beam.Create``), so they validate,
    and give the plan id, exactly as the equivalent Parquet file would.  A refused plan (bad
    input, capacity) removes the snapshots this call wrote.  ``sample_hashes`` (dry runs only):
    read that many moves at their sources (seeded by the ``sample_seed`` option) and report
    missing or unreadable records and their bytes, as ``manifest["sample"]``
    (:mod:`shardmove.sampling`).  ``name``: the plan's name (``plan --name``: metadata, never
    part of the plan id; a name another plan holds is :class:`BadInput`).  ``progress_output``: planning progress on stderr, as the
    CLI's ``--progress`` (auto, bar, text, json; none by default: the API prints nothing).
    ``cutoff``: snapshot the map store at that version instead of the current one (no
    ``snapshot`` given); above the current version: :class:`BadInput`.  ``map_store`` /
    ``data_store``: store objects implementing the protocols of :mod:`shardmove.stores`, used
    instead of the configured ones (README "Bring your own store").  ``warn``: where the
    preflight's warnings go (``out`` by default; the CLI sends them to stderr)."""
    cfg = _config(config)
    with _with_stores(cfg, map_store, data_store) as cfg:
        return _plan(cfg, snapshot, target, dry_run, name, sample_hashes, beam_args, out, progress_output, cutoff,
                     warn or out)


def _plan(cfg: Config, snapshot, target, dry_run, name, sample_hashes, beam_args, out, progress_output,
          cutoff, warn) -> Plan:
    written = []
    opened = []  # stores this call opened (not the caller's instances): closed when it ends
    try:
        if _in_memory(target):
            info = write_snapshot(target, cfg.work_dir, cfg.opt("segment_size"), cfg.key_type,
                                  what="target snapshot")
            written.append(info)
            cfg = dataclasses.replace(cfg, target_snapshot=info.location)
        elif target is not None:
            cfg = dataclasses.replace(cfg, target_snapshot=os.fspath(target))
        if _in_memory(snapshot):
            info = write_snapshot(snapshot, cfg.work_dir, cfg.opt("segment_size"), cfg.key_type)
            written.append(info)
            snapshot = info.location
        elif snapshot is not None:
            snapshot = os.fspath(snapshot)
        with before_changes():  # planning only reads the stores: one it cannot use is bad configuration
            map_store = None
            if snapshot is None and cfg.snapshot is None:
                map_store = open_map_store(cfg)
                opened.append((cfg.map_store, map_store))
            data_store = None
            if (sample_hashes or any(s.capacity_bytes for s in cfg.target_shards)
                    or cfg.data_store.get("kind") in ("objects", "instance")):
                data_store = open_data_store(cfg)  # record sizes, or object-name limits checked at plan time
                opened.append((cfg.data_store, data_store))
            res = make_plan(cfg, map_store=map_store, data_store=data_store, snapshot=snapshot, dry_run=dry_run,
                            beam_args=beam_args, out=out, sample_hashes=sample_hashes,
                            sample_seed=cfg.opt("sample_seed"), progress=progress_output, name=name,
                            cutoff=cutoff, warn=warn)
        if res.dry_run and not res.capacity_ok:
            raise _KeepNothing(res)
    except _KeepNothing as k:
        _remove_created(written)
        return Plan(**dataclasses.asdict(k.result))
    except BaseException:
        _remove_created(written)
        raise
    finally:
        close_opened(opened)
    if res.dry_run:
        _remove_created(written)  # a dry run commits nothing
    return Plan(**dataclasses.asdict(res))


class _KeepNothing(Exception):
    def __init__(self, result):
        self.result = result


def _remove_created(infos) -> None:
    for info in infos:
        if info.created:
            workdir.remove_committed(info.location)


# ------------------------------------------------------------------- runs

@dataclass
class RunSummary:
    """What a run did.  ``exit_code`` is the CLI's: 0 complete, 3 complete with Failed keys,
    130 stopped (a signal, or ``cancel``) and resumable, 1 an internal error.
    ``summary`` holds every figure of ``summary.json``."""
    plan_id: str
    exit_code: int
    state: str
    planned: int
    done: int
    failed: int
    failures_by_reason: dict
    done_by_verification: dict
    elapsed_s: float | None
    keys_per_s: float | None
    interrupted: bool
    cancelled: bool
    nothing_to_do: bool
    summary: dict
    metrics: dict = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return self.state.startswith("complete")


def _plan_dir(plan, cfg: Config | None = None, work_dir: str | None = None) -> str:
    if isinstance(plan, Plan):
        if plan.plan_dir is None:
            raise BadInput("plan: a dry run was not committed; plan without dry_run first")
        return plan.plan_dir
    if not isinstance(plan, (str, os.PathLike)):
        raise BadInput(f"plan: expected a Plan, a plan directory or a plan id, got {type(plan).__name__}")
    return workdir.resolve_plan_dir(os.fspath(plan), work_dir or (cfg.work_dir if cfg is not None else None))


def run(config: ConfigLike, plan: Plan | str | os.PathLike, *, progress: Callable[[dict], Any] | None = None,
        cancel: threading.Event | None = None, retry_failed: bool = False, allow_drift: bool = False,
        beam_args: Sequence[str] = (), out: Callable[[str], None] = _discard, progress_output: str = "none",
        map_store=None, data_store=None, warn: Callable[[str], None] | None = None) -> RunSummary:
    """Execute (or resume, or finish) a plan; returns a :class:`RunSummary`.

    ``progress`` is called with each progress event (a dict of counts: ``copied``,
    ``verified``, ``swapped``, ``failed``, ``total``, ``elapsed_s``, ...; never keys) from a
    background thread; an exception it raises is logged and ignored.  ``cancel``: setting the
    event stops the run as SIGINT does -- checkpoints flushed, claim and lease released,
    ``interrupted`` and ``cancelled`` set, exit code 130 -- and a later ``run`` resumes it.
    Signal handlers are installed only when called from the main thread.  ``progress_output``:
    progress on stderr as the CLI's ``--progress`` (none by default).  ``map_store`` /
    ``data_store``: store objects used instead of the configured ones (as in :func:`plan`).
    A store found unusable before the run starts raises ``BadInput`` (the preflight, exit 2);
    a configuration error met while it runs (a table dropped, a permission revoked) stops it
    with no key Failed and raises ``RunHalted`` (exit 1); a later ``run`` resumes it."""
    cfg = _config(config)
    plan_dir = _plan_dir(plan, cfg)
    try:
        with _with_stores(cfg, map_store, data_store) as cfg:
            res = run_plan(cfg, plan_dir, retry_failed=retry_failed, allow_drift=allow_drift, beam_args=beam_args,
                           out=out, progress=progress_output, on_progress=progress, cancel=cancel,
                           warn=warn or out)
    except Interrupted:
        if cancel is None or not cancel.is_set():
            raise  # a signal: the caller's to handle (the CLI exits 130)
        s = plan_status(plan_dir)  # cancelled before the run took its lease: nothing was modified
        res = RunResult(s["plan_id"], s, 130, interrupted=True)
    s = res.summary
    complete = bool(s.get("complete"))
    state = plan_state(s, False) if complete or res.interrupted else "stopped"
    return RunSummary(res.plan_id, res.exit_code, state, int(s["planned"]), int(s["done"]), int(s["failed"]),
                      dict(s.get("failures_by_reason") or {}), dict(s.get("done_by_verification") or {}),
                      s.get("elapsed_s"), s.get("keys_per_s"), res.interrupted,
                      bool(cancel is not None and cancel.is_set() and res.interrupted), res.nothing_to_do, s,
                      res.metrics)


@dataclass
class Status:
    """A plan's state as ``shardmove status`` shows it; ``exit_code`` is the CLI's (0
    complete, 3 complete with failures, 5 running, 6 planned or stopped); ``details`` holds
    every key of ``status --json``."""
    plan_id: str
    state: str
    exit_code: int
    planned: int
    done: int
    failed: int
    details: dict
    name: str | None = None


def status(plan: Plan | str | os.PathLike, *, config: ConfigLike | None = None, work_dir: str | None = None
           ) -> Status:
    """The plan's state and counts (``plan``: a :class:`Plan`, a plan directory, or a plan id
    with ``config`` or ``work_dir``)."""
    cfg = _config(config) if config is not None else None
    d = _plan_dir(plan, cfg, work_dir)
    s = plan_status(d)
    s["name"] = workdir.plan_name(d)
    return Status(s["plan_id"], s["state"], status_exit_code(s), int(s["planned"]), int(s["done"]),
                  int(s["failed"]), s, s["name"])


# --------------------------------------------------------------- operator

def validate(config: ConfigLike, *, compare: Plan | str | None = None):
    """Check the live map (duplicates, unknown shards, digest); with ``compare``, count the
    plan's keys at source, target, elsewhere and missing.  Returns
    :class:`shardmove.validation.ValidationResult`."""
    cfg = _config(config)
    return _validate(cfg, compare_plan_dir=_plan_dir(compare, cfg) if compare is not None else None)


def verify(config: ConfigLike, plan: Plan | str, *, sample: int = 1000, seed: int = 0,
           out: Callable[[str], None] = _discard):
    """Re-verify a sample of Done keys at their target (``shardmove verify``); returns
    :class:`shardmove.ops.VerifyResult`."""
    cfg = _config(config)
    return verify_plan(cfg, _plan_dir(plan, cfg), sample=sample, seed=seed, out=out)


def rollback(config: ConfigLike, plan: Plan | str, *, apply: bool = False, beam_args: Sequence[str] = (),
             out: Callable[[str], None] = _discard):
    """Plan and run the reverse of a plan's Done keys (``shardmove rollback``); without
    ``apply`` only count what it would do (nothing written).  Returns
    :class:`shardmove.ops.RollbackResult`."""
    cfg = _config(config)
    return _rollback(cfg, _plan_dir(plan, cfg), apply=apply, beam_args=beam_args, out=out, progress="none",
                     warn=out)


def cleanup(config: ConfigLike, plan: Plan | str, *, older_than: float, apply: bool = False,
            out: Callable[[str], None] = _discard):
    """Delete source copies of moved keys older than ``older_than`` seconds (a dry run unless
    ``apply``); returns :class:`shardmove.ops.CleanupResult`."""
    cfg = _config(config)
    return _cleanup(cfg, _plan_dir(plan, cfg), older_than=older_than, apply=apply, out=out)


def export_failures(config: ConfigLike, plan: Plan | str, path: str, *, out: Callable[[str], None] = _discard):
    """Write every Failed key (with its reason) to a 0600 Parquet file; returns
    :class:`shardmove.ops.FailuresResult`."""
    cfg = _config(config)
    return _export(cfg, _plan_dir(plan, cfg), path, out=out)


def plans(work_dir: str) -> list[dict]:
    """The work directory's committed plans, newest first: ``plan_id``, ``name``, ``state``
    (as ``status`` derives it), ``planned``/``done``/``failed``, ``created_at``."""
    names = workdir.plan_names(work_dir)
    out = []
    for plan_id in workdir.list_plan_ids(work_dir):
        d = workdir.plan_dir(work_dir, plan_id)
        m = workdir.read_json(workdir.manifest_path(d)) or {}
        try:
            s = plan_status(d)
        except ShardmoveError:  # a damaged plan is listed, not fatal to the list
            s = {"state": "unreadable", "planned": None, "done": None, "failed": None}
        out.append({"plan_id": plan_id, "name": names.get(plan_id), "state": s["state"], "planned": s["planned"],
                    "done": s["done"], "failed": s["failed"], "created_at": m.get("created_at"),
                    "plan_dir": d})
    out.sort(key=lambda r: (r["created_at"] or "", r["plan_id"]), reverse=True)
    return out
