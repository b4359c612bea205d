"""What every subcommand module of the command line shares.

The parsed arguments become a configuration and a plan directory here, and
the work-directory folders a command creates are tracked here, so that a
refused command can leave the work directory as it found it.  ``cli``,
``cli_reports`` and ``cli_ops`` all import this module; it imports none of them.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys

from pipeline import fs
from pipeline import workdir
from pipeline.config import OPTIONS, load_config
from pipeline.errors import BadInput

__all__ = ["load", "plan_dir", "work_dir", "preflight", "track_new_dirs", "remove_created", "with_last_run",
           "NO_WORK_DIR"]

#: The one line of a command that needs a work directory and was given none.
NO_WORK_DIR = "no work directory: pass --config FILE, set SHARDMOVE_CONFIG, or pass --work-dir DIR"

#: Work-directory folders the current command may create (a ``fs.NewDirs``), or None.
_NEW_DIRS = None


def track_new_dirs(tracker) -> None:
    """Start (a ``fs.NewDirs``) or stop (None) tracking the folders a command creates."""
    global _NEW_DIRS
    _NEW_DIRS = tracker


def remove_created() -> None:
    """A refused command: remove the work-directory folders it created."""
    if _NEW_DIRS is not None:
        _NEW_DIRS.remove_created()


def _watch_work_dir(work_dir: str) -> None:
    if _NEW_DIRS is not None:
        _NEW_DIRS.watch(work_dir, workdir.snapshots_dir(work_dir), workdir.plans_dir(work_dir), workdir.history_dir(work_dir))


def load(args):
    """The configuration of ``--config``, with the option flags and ``--work-dir`` applied."""
    overrides = {o.name: getattr(args, o.name, None) for o in OPTIONS}
    cfg = load_config(args.config, overrides)
    if getattr(args, "work_dir", None):
        cfg = dataclasses.replace(cfg, work_dir=os.path.abspath(args.work_dir))
    _watch_work_dir(cfg.work_dir)
    return cfg


def work_dir(args, cfg=None) -> str | None:
    """The work directory, the same way for every command: ``--work-dir``, else the work_dir of
    the configuration (``cfg``, else ``--config`` / ``$SHARDMOVE_CONFIG``); None when neither is given."""
    if getattr(args, "work_dir", None):
        return os.path.abspath(args.work_dir)
    if cfg is not None:
        return cfg.work_dir
    if getattr(args, "config", None):
        return load_config(args.config).work_dir
    return None


def plan_dir(args, cfg=None) -> str:
    """The plan directory of ``args.plan`` (:func:`pipeline.workdir.resolve_plan_dir`: a directory,
    a plan id, a unique id prefix of 8+ hex digits, or a plan name) under :func:`work_dir`."""
    if not getattr(args, "plan", None):
        raise BadInput("PLAN is empty: give a plan directory, a plan id (or 8+ hex digits of one) or a plan name")
    as_dir = args.plan.rstrip("/")
    if fs.is_gcs(as_dir) or "/" in args.plan or workdir.has_manifest(as_dir):  # needs no work directory
        return workdir.resolve_plan_dir(args.plan, None)
    return workdir.resolve_plan_dir(args.plan, work_dir(args, cfg))


def preflight(cfg, beam_args) -> list[str]:
    """Bad Beam flags, stores remote workers cannot reach, missing Java/Go/jar: exit 2
    before anything (snapshot, lease, history record) is written."""
    from transforms.preflight import preflight as _preflight  # deferred: the preflight loads Beam

    return _preflight(cfg, beam_args, log=lambda s: sys.stderr.write(s + "\n")).args


def with_last_run(plan_dir: str, s: dict) -> dict:
    """Add the last run's total time, retries and stage timings (``summary.json``) to a status dict."""
    path = workdir.summary_path(plan_dir)
    if fs.exists(path):
        try:
            prev = json.loads(fs.read_bytes(path))
        except ValueError:
            prev = {}
        for k in ("total_elapsed_s", "retries_this_run", "timings"):
            if k in prev and k not in s:
                s[k] = prev[k]
    return s
