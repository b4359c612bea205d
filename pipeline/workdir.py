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
    <work>/plans/<plan id>/reports/
    <work>/history/                          one record per command

Callers ask this module for paths instead of joining strings, read and write
manifests and summaries through it, and commit a finished staging directory
(a snapshot or a plan) with :func:`commit_staged`, the one staged-directory
commit.  Works for local paths and ``gs://`` alike (through :mod:`pipeline.fs`).
Never imports Beam.
"""
from __future__ import annotations

import json
import re

from pipeline import fs
from pipeline.errors import BadInput, StoreError

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
_SUMMARY = "summary.json"
_LEASE = "lease.json"
_STOP = "stop"
_REPORTS = "reports"

_PLAN_ID = re.compile(r"[0-9a-f]{64}")


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


def summary_path(plan: str) -> str:
    return fs.join(plan, _SUMMARY)


def lease_path(plan: str) -> str:
    return fs.join(plan, _LEASE)


def stop_path(plan: str) -> str:
    return fs.join(plan, _STOP)


def reports_dir(plan: str) -> str:
    return fs.join(plan, _REPORTS)


# ---------------------------------------------------------- staged commits

def new_staging(parent: str) -> str:
    """A fresh, empty staging directory under ``parent`` (``snapshots/`` or ``plans/``)."""
    fs.makedirs(parent)
    staging = fs.join(parent, fs.unique_name(".staging-"))
    fs.makedirs(staging)
    return staging


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


def resolve_plan_dir(plan: str, work_dir: str | None) -> str:
    """PLAN is a plan directory or a plan id under the work directory."""
    if _PLAN_ID.fullmatch(plan or ""):
        if work_dir is None:
            raise BadInput("plan id given without a work directory (--work-dir or config)")
        d = plan_dir(work_dir, plan)
    else:
        d = plan.rstrip("/")
    if not has_manifest(d):
        raise BadInput(f"no committed plan at {d} (manifest.json missing)")
    return d


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
