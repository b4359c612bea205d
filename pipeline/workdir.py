"""The work-directory layout (CONTRACTS "Work directory"): the one module that knows it.

::

    <work>/snapshots/<snapshot digest>/      Parquet parts + snapshot.json
    <work>/plans/<plan id>/manifest.json     written last: its presence means the plan is complete
    <work>/plans/<plan id>/moves/            Parquet, one sorted file per (source, target, bucket)
    <work>/plans/<plan id>/checkpoints/      Parquet parts, then compacted files
    <work>/plans/<plan id>/progress/         progress events
    <work>/plans/<plan id>/summary.json
    <work>/plans/<plan id>/lease.json
    <work>/plans/<plan id>/stop              graceful-stop marker
    <work>/plans/<plan id>/halt.json         why a run stopped itself (a configuration error)
    <work>/plans/<plan id>/reports/
    <work>/history/                          one record per command
    <work>/names/<name>.json                 a plan name -> its plan id (``plan --name``)

Callers ask this module for paths instead of joining strings, read and write
manifests and summaries through it, and commit a finished staging directory
(a snapshot or a plan) with :func:`commit_staged`, the one staged-directory
commit.  Works for local paths and ``gs://`` alike (through :mod:`pipeline.fs`).
Never imports Beam.
"""
from __future__ import annotations

import json
import os
import re
import uuid

from pipeline import fs
from pipeline import procs
from pipeline.errors import BadInput, CommitConflict, StoreError

__all__ = [
    "MANIFEST_FORMAT_VERSION",
    "MANIFEST",
    "SNAPSHOT_META",
    "COMMIT_MARKERS",
    "PLAN_STATS",
    "PLAN_FILES",
    "PLAN_DUPLICATES",
    "PLAN_OUTPUTS",
    "snapshots_dir",
    "snapshot_meta_path",
    "plans_dir",
    "plan_dir",
    "history_dir",
    "manifest_path",
    "moves_dir",
    "move_file",
    "checkpoints_dir",
    "progress_dir",
    "progress_path",
    "summary_path",
    "lease_path",
    "stop_path",
    "halt_path",
    "reports_dir",
    "new_staging",
    "plan_output_path",
    "commit_staged",
    "read_json",
    "read_summary",
    "write_summary",
    "write_manifest",
    "has_manifest",
    "load_manifest",
    "resolve_plan_dir",
    "work_dir_of_plan",
    "list_plan_ids",
    "check_plan_name",
    "validate_plan_name",
    "claim_plan_name",
    "plan_names",
    "plan_name",
]

#: ``format_version`` of ``manifest.json``.
MANIFEST_FORMAT_VERSION = 1

#: The commit markers: a plan / snapshot directory is complete once these exist.
MANIFEST = "manifest.json"
SNAPSHOT_META = "snapshot.json"
COMMIT_MARKERS = (MANIFEST, SNAPSHOT_META)

#: What the planning graph (``transforms/plan.py``) leaves in a plan's staging
#: directory for the planner (``shardmove/planner.py``), which reads them and
#: removes them before it writes the manifest: the merged statistics, one
#: record per move file, and the count of duplicate keys.
PLAN_STATS = "stats.json"
PLAN_FILES = "files.json"
PLAN_DUPLICATES = "duplicates.json"
PLAN_OUTPUTS = (PLAN_STATS, PLAN_FILES, PLAN_DUPLICATES)

_SNAPSHOTS = "snapshots"
_PLANS = "plans"
_HISTORY = "history"
_MOVES = "moves"
CHECKPOINTS = "checkpoints"
_PROGRESS = "progress"
_PLANNING_PROGRESS = "planning-progress"
_SUMMARY = "summary.json"
_LEASE = "lease.json"
_STOP = "stop"
_HALT = "halt.json"
_REPORTS = "reports"
_NAMES = "names"

_PLAN_ID = re.compile(r"[0-9a-f]{64}")
_PLAN_PREFIX = re.compile(r"[0-9a-f]{8,63}")
#: a plan name: letters, digits, ``.``, ``_``, ``-``; starts with a letter or digit; at most 64 characters
_PLAN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


# ------------------------------------------------------------------ paths

def snapshots_dir(work_dir: str) -> str:
    return fs.join(work_dir, _SNAPSHOTS)


def snapshot_meta_path(location: str) -> str:
    """``snapshot.json`` of a snapshot directory."""
    return fs.join(location, SNAPSHOT_META)


def plans_dir(work_dir: str) -> str:
    return fs.join(work_dir, _PLANS)


def plan_dir(work_dir: str, plan_id: str) -> str:
    return fs.join(work_dir, _PLANS, plan_id)


def history_dir(work_dir: str) -> str:
    return fs.join(work_dir, _HISTORY)


def manifest_path(plan: str) -> str:
    return fs.join(plan, MANIFEST)


def moves_dir(plan: str) -> str:
    return fs.join(plan, _MOVES)


def move_file(plan: str, group: str) -> str:
    """The move file of one (source, target, bucket) group."""
    return fs.join(plan, _MOVES, group + ".parquet")


def checkpoints_dir(plan: str) -> str:
    return fs.join(plan, CHECKPOINTS)


def progress_dir(plan: str) -> str:
    return fs.join(plan, _PROGRESS)


def progress_path(plan: str, name: str) -> str:
    return fs.join(plan, _PROGRESS, name)


def planning_progress_dir(staging: str) -> str:
    """Planning progress marks in a plan's staging directory (removed before it is committed)."""
    return fs.join(staging, _PLANNING_PROGRESS)


def planning_progress_mark(staging: str, chunk: int, segments: int, keys: int) -> str:
    """One mark: chunk ``chunk`` has examined ``segments`` segments holding ``keys`` keys.
    The name is the record (the file is empty), so a retried bundle recreates the same names."""
    return fs.join(staging, _PLANNING_PROGRESS, f"c{chunk:06d}-s{segments:09d}-k{keys:013d}")


def read_planning_progress(staging: str) -> tuple[int, int]:
    """(segments, keys examined) over every chunk: per chunk its highest mark."""
    best: dict = {}
    try:
        names = fs.listdir(planning_progress_dir(staging))
    except OSError:
        return 0, 0
    for name in names:
        name = name.rstrip("/").rsplit("/", 1)[-1]
        try:
            c, sg, k = name.split("-")
            chunk, segs, keys = int(c[1:]), int(sg[1:]), int(k[1:])
        except ValueError:
            continue
        if chunk not in best or (segs, keys) > best[chunk]:
            best[chunk] = (segs, keys)
    return sum(v[0] for v in best.values()), sum(v[1] for v in best.values())


def summary_path(plan: str) -> str:
    return fs.join(plan, _SUMMARY)


def lease_path(plan: str) -> str:
    return fs.join(plan, _LEASE)


def stop_path(plan: str) -> str:
    return fs.join(plan, _STOP)


def halt_path(plan: str) -> str:
    """Written (create-if-absent: the first finding wins) by a stage that met a
    configuration error; the launcher reports it and removes it."""
    return fs.join(plan, _HALT)


def reports_dir(plan: str) -> str:
    return fs.join(plan, _REPORTS)


# ---------------------------------------------------------- staged commits

_STAGING = ".staging-"


def new_staging(parent: str) -> str:
    """A fresh, empty staging directory under ``parent`` (``snapshots/`` or ``plans/``),
    named after this process (:func:`pipeline.procs.owner_tag`).  The staging directories
    that processes of this host left when they were killed (their owner is gone) are
    removed first: a plan killed again and again must not fill the disk with copies of
    its move files, which hold key values."""
    fs.makedirs(parent)
    sweep_staging(parent)
    sweep_trash(parent)
    staging = fs.join(parent, fs.unique_name(f"{_STAGING}{procs.owner_tag()}~"))
    fs.makedirs(staging)
    return staging


def sweep_trash(parent: str) -> None:
    """Remove what removals a kill interrupted left under a local ``parent`` (hidden
    ``.<name>.trash-<id>`` folders: :func:`remove_committed`)."""
    if fs.is_gcs(parent):
        return
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in names:
        if name.startswith(".") and _TRASH_RE.search(name):
            fs.rmtree(os.path.join(parent, name))


def sweep_staging(parent: str) -> int:
    """Remove the staging directories under ``parent`` whose owner process is gone; the
    number removed.  A live owner's, another host's and unnamed ones are left alone."""
    removed = 0
    try:
        names = fs.listdir(parent)
    except OSError:
        return 0
    for name in names:
        name = name.rstrip("/")
        if not name.startswith(_STAGING):
            continue
        tag = name[len(_STAGING):].rpartition("~")[0]
        if tag and procs.owner_gone(tag):
            fs.rmtree(fs.join(parent, name))
            removed += 1
    return removed


def plan_output_path(staging: str, name: str) -> str:
    """One of the planning graph's outputs (:data:`PLAN_OUTPUTS`) in a plan's staging directory."""
    if name not in PLAN_OUTPUTS:
        raise ValueError(f"not a planning output: {name!r}")
    return fs.join(staging, name)


def commit_staged(staging: str, final: str, marker: str) -> bool:
    """Move a finished staging directory to ``final``; its ``marker`` file is already in it.

    Idempotent: when ``final`` already holds its marker (an earlier or
    concurrent commit of the same content-addressed directory), the staging
    directory is dropped and False is returned.  A half-copied ``final`` left
    by a crash (``gs://`` has no rename) is replaced.  True when this call
    committed.  Either way the result is checked: a ``final`` without its
    marker afterwards is an environment error, never a silent success.
    """
    marker_path = fs.join(final, marker)
    if fs.exists(marker_path):
        fs.rmtree(staging)
        return False
    if fs.exists(final):
        fs.rmtree(final)  # a half-copied directory from a crash (gs://)
    created = fs.rename_dir(staging, final, markers=COMMIT_MARKERS)
    if not created:  # another process committed the same directory first
        fs.rmtree(staging)
    if not fs.exists(marker_path):
        raise StoreError(f"commit of {final} failed: {marker} is missing after the commit", reason="commit_failed")
    return created


_TRASH_RE = re.compile(r"\.trash-[0-9a-f]{32}\Z")


def remove_committed(final: str) -> None:
    """Delete a committed directory (a snapshot or plan a refused command took back) so
    that a kill at any moment leaves it either whole or without its marker -- which
    :func:`commit_staged` replaces -- never a marked directory with files missing.
    Locally it is first renamed to a hidden name beside it (one atomic step), then
    removed; on ``gs://`` its markers are deleted first."""
    if not fs.is_gcs(final):
        parent, base = os.path.split(os.path.normpath(final))
        trash = os.path.join(parent, f".{base}.trash-{uuid.uuid4().hex}")
        try:
            os.rename(final, trash)
        except FileNotFoundError:
            return
        except OSError:  # cannot rename (it runs in cleanup paths: never raise a new error there)
            fs.rmtree(final)
            return
        fs.rmtree(trash)
        sweep_trash(parent)
        return
    for marker in COMMIT_MARKERS:
        path = fs.join(final, marker)
        if fs.exists(path):
            fs.remove(path)
    fs.rmtree(final)


# ------------------------------------------------------- manifests, summaries

def read_json(path: str):
    """A small JSON document, or None when it is absent or unreadable."""
    try:
        return json.loads(fs.read_bytes(path)) if fs.exists(path) else None
    except (OSError, ValueError):
        return None


def read_summary(plan: str) -> dict | None:
    """The last run's ``summary.json``, or None."""
    return read_json(summary_path(plan))


def write_summary(plan: str, summary: dict) -> None:
    fs.write_atomic(summary_path(plan), json.dumps(summary, indent=1, sort_keys=True).encode())


def write_manifest(directory: str, manifest: dict) -> None:
    """Write ``manifest.json`` (in a staging directory: the last file of a plan)."""
    fs.write_atomic(manifest_path(directory), json.dumps(manifest, indent=1, sort_keys=True).encode())


def has_manifest(plan: str) -> bool:
    """True when ``plan`` is a committed plan directory."""
    return fs.exists(manifest_path(plan))


def _base(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def list_plan_ids(work_dir: str) -> list[str]:
    """The ids of the work directory's committed plans (a manifest), sorted."""
    plans = plans_dir(work_dir)
    return sorted(n for n in (_base(p) for p in fs.listdir(plans))
                  if _PLAN_ID.fullmatch(n) and has_manifest(plan_dir(work_dir, n)))


def work_dir_of_plan(plan: str) -> str:
    """The work directory holding the plan directory ``<work>/plans/<plan id>``."""
    parts = plan.rstrip("/").rsplit("/", 2)
    return parts[0] if len(parts) == 3 else "."


def resolve_plan_dir(plan: str, work_dir: str | None) -> str:
    """The committed plan directory PLAN names, tried in this order:

    1. an existing directory (a path to a plan directory);
    2. a 64-hex plan id under the work directory;
    3. a unique prefix of at least 8 hex digits of a plan id (ambiguous: BadInput with the match count);
    4. a plan name (``plan --name``).

    Everything but a directory needs ``work_dir``; BadInput (exit 2) when nothing matches.
    """
    plan = (plan or "").strip()
    if not plan:
        raise BadInput("PLAN is empty: give a plan directory, a plan id (or 8+ hex digits of one) or a plan name")
    as_dir = plan.rstrip("/")
    if fs.is_gcs(as_dir) or "/" in plan:
        if not has_manifest(as_dir):
            raise BadInput(f"no committed plan at {as_dir} (manifest.json missing)")
        return as_dir
    if _is_local_dir(as_dir) and has_manifest(as_dir):
        return as_dir  # a bare word that is some other directory (``demo``) may still be a name
    if work_dir is None:
        raise BadInput(f"PLAN {plan!r} is not a plan directory and is given without a work directory: "
                       "pass --config FILE, set SHARDMOVE_CONFIG, or pass --work-dir DIR")
    if _PLAN_ID.fullmatch(plan):
        d = plan_dir(work_dir, plan)
        if not has_manifest(d):
            raise BadInput(f"no committed plan {plan[:12]} in {plans_dir(work_dir)} (manifest.json missing)")
        return d
    if _PLAN_PREFIX.fullmatch(plan):
        matches = [i for i in list_plan_ids(work_dir) if i.startswith(plan)]
        if len(matches) > 1:
            raise BadInput(f"plan id prefix {plan} is ambiguous: it matches {len(matches)} plans; give more digits")
        if matches:
            return plan_dir(work_dir, matches[0])
    if _PLAN_NAME.fullmatch(plan):
        doc = read_json(_name_path(work_dir, plan))
        if isinstance(doc, dict) and isinstance(doc.get("plan_id"), str) and _PLAN_ID.fullmatch(doc["plan_id"]):
            d = plan_dir(work_dir, doc["plan_id"])
            if has_manifest(d):
                return d
            raise BadInput(f"plan name {plan!r} names plan {doc['plan_id'][:12]}, which is not committed")
    raise BadInput(f"no plan {plan!r} in {plans_dir(work_dir)}: not a plan directory, plan id, "
                   "8+ hex digit id prefix or plan name")


def _is_local_dir(path: str) -> bool:
    return os.path.isdir(path)


# ------------------------------------------------------------- plan names

def _names_dir(work_dir: str) -> str:
    return fs.join(work_dir, _NAMES)


def _name_path(work_dir: str, name: str) -> str:
    return fs.join(work_dir, _NAMES, name + ".json")


def validate_plan_name(name: str) -> str:
    """``name`` when it is a valid plan name, else BadInput naming the rule."""
    if not isinstance(name, str) or not _PLAN_NAME.fullmatch(name):
        raise BadInput(f"plan --name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or "
                       "digit")
    if _PLAN_PREFIX.fullmatch(name) or _PLAN_ID.fullmatch(name):
        raise BadInput(f"plan --name {name!r}: 8 or more hex digits read as a plan id prefix; choose another name")
    return name


def plan_names(work_dir: str) -> dict[str, str]:
    """plan id -> its name, for every named plan of the work directory."""
    out: dict[str, str] = {}
    for n in (_base(p) for p in fs.listdir(_names_dir(work_dir))):
        if not n.endswith(".json") or n.startswith("."):
            continue
        doc = read_json(fs.join(_names_dir(work_dir), n))
        if isinstance(doc, dict) and isinstance(doc.get("plan_id"), str) and doc.get("name") == n[:-5]:
            out.setdefault(doc["plan_id"], doc["name"])
    return out


def plan_name(plan: str) -> str | None:
    """The name of the plan directory ``plan`` (``<work>/plans/<id>``), or None."""
    return plan_names(work_dir_of_plan(plan)).get(_base(plan))


def check_plan_name(work_dir: str, name: str, plan_id: str) -> None:
    """BadInput (before anything is committed) when ``name`` belongs to another plan, or this
    plan already has another name.  Re-planning a plan under its own name is fine."""
    validate_plan_name(name)
    doc = read_json(_name_path(work_dir, name))
    if isinstance(doc, dict) and doc.get("plan_id") != plan_id:
        other = str(doc.get("plan_id") or "?")[:12]
        raise BadInput(f"plan name {name!r} is already used by plan {other} in this work directory")
    current = plan_names(work_dir).get(plan_id)
    if current is not None and current != name:
        raise BadInput(f"plan {plan_id[:12]} already exists with the name {current!r} (a name is not part of "
                       "the plan id); use that name")


def claim_plan_name(work_dir: str, name: str, plan_id: str) -> None:
    """Record ``name`` -> ``plan_id`` (create-if-absent: two plans racing for one name, one wins;
    the same claim again is a no-op)."""
    fs.makedirs(_names_dir(work_dir))
    data = json.dumps({"format_version": 1, "name": name, "plan_id": plan_id}, sort_keys=True).encode()
    try:
        fs.create_if_absent(_name_path(work_dir, name), data)
    except CommitConflict as e:
        raise BadInput(f"plan name {name!r} is already used by another plan in this work directory") from e


def load_manifest(plan: str) -> dict:
    """The plan's ``manifest.json``, checked field by field (BadInput when damaged)."""
    try:
        m = json.loads(fs.read_bytes(manifest_path(plan)))
    except ValueError as e:
        raise BadInput("manifest.json is not valid JSON") from e
    if not isinstance(m, dict):
        raise BadInput(f"{plan}/manifest.json is damaged: not a JSON object")
    if m.get("format_version") != MANIFEST_FORMAT_VERSION:
        raise BadInput(f"manifest format_version {m.get('format_version')!r} is not supported")
    for name, kind in _MANIFEST_FIELDS:
        if not isinstance(m.get(name), kind):
            raise BadInput(f"{plan}/manifest.json is damaged: field {name} is missing or malformed")
    for f in m["files"]:
        if not isinstance(f, dict) or not all(isinstance(f.get(k), t) for k, t in _FILE_FIELDS):
            raise BadInput(f"{plan}/manifest.json is damaged: a files entry is malformed")
    return m


_MANIFEST_FIELDS = (("plan_id", str), ("key_type", str), ("files", list), ("pairs", list), ("snapshot", dict),
                    ("keys_examined", int), ("moves", int))
_FILE_FIELDS = (("group", str), ("source", str), ("target", str), ("rows", int))
