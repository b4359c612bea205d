"""Run history: one JSON record per subcommand that changes data.

Never imports Beam.  Each :func:`record` call commits a NEW file under
``<work>/history/`` with :func:`pipeline.fs.create_if_absent` -- never an
append in place (``gs://`` has no append, and a crash mid-append would leave
a torn line).  File names sort by time::

    <work>/history/<UTC yyyymmddTHHMMSS.ffffff>Z-<pid>-<8 hex>.json

A record holds who (``user@host``), when (UTC ISO 8601 and Unix seconds), the
command, the plan id, the outcome (``ok`` / ``failed_keys`` / ``refused`` /
``bad_input`` / ``interrupted`` / ``error`` or the exit code) and free-form
``details`` -- counts only: callers must never pass key values.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import getpass
import json
import logging
import os
import socket
import uuid

from pipeline import fs
from pipeline import workdir
from pipeline.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, ShardmoveError

__all__ = ["HISTORY_FORMAT_VERSION", "record", "recorded", "read_history", "outcome_for_exit", "who"]

LOG = logging.getLogger("shardmove.history")
HISTORY_FORMAT_VERSION = 1

_OUTCOMES = {0: "ok", 1: "error", 2: "bad_input", 3: "failed_keys", 4: "refused", 5: "in_progress",
             130: "interrupted"}


def outcome_for_exit(code: int) -> str:
    """The outcome word for a CONTRACTS exit code."""
    return _OUTCOMES.get(int(code), f"exit_{int(code)}")


def who() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # no passwd entry (containers): fall back to the uid
        user = f"uid{os.getuid()}" if hasattr(os, "getuid") else "unknown"
    return f"{user}@{socket.gethostname()}"


def _history_dir(work_dir: str) -> str:
    return workdir.history_dir(work_dir)


def record(work_dir: str, command: str, plan_id: str | None, outcome, details: dict | None = None, *,
           strict: bool = False) -> str | None:
    """Commit one history record; returns its path.

    ``outcome`` is a word or an exit code (mapped by :func:`outcome_for_exit`).
    Idempotent by construction: each call creates a uniquely named file with
    create-if-absent, so nothing is ever overwritten.  Best effort unless
    ``strict``: a failure to record is logged (one warning) and returns None,
    so the audit trail never turns a finished migration into an error.
    """
    now = _dt.datetime.now(_dt.timezone.utc)
    doc = {
        "format_version": HISTORY_FORMAT_VERSION,
        "when": now.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "unix_time": round(now.timestamp(), 6),
        "who": who(),
        "command": command,
        "plan_id": plan_id,
        "outcome": outcome_for_exit(outcome) if isinstance(outcome, int) and not isinstance(outcome, bool)
        else str(outcome),
        "details": details or {},
    }
    if isinstance(outcome, int) and not isinstance(outcome, bool):
        doc["exit_code"] = int(outcome)
    name = f"{now.strftime('%Y%m%dT%H%M%S.%f')}Z-{os.getpid()}-{uuid.uuid4().hex[:8]}.json"
    path = fs.join(_history_dir(work_dir), name)
    try:
        data = json.dumps(doc, sort_keys=True, default=str).encode("utf-8")
        fs.makedirs(_history_dir(work_dir))
        fs.create_if_absent(path, data)
        return path
    except Exception as e:
        if strict:
            raise
        LOG.warning("history record not written (%s)", type(e).__name__)
        return None


@contextlib.contextmanager
def recorded(work_dir: str, command: str, plan_id: str | None = None):
    """Record one history entry for the ``with`` block, however it ends.

    Yields a dict the block fills in: ``plan_id``, ``code`` (exit code,
    default 0) and ``details`` (counts only).  A refusal (a
    :class:`ShardmoveError` with ``nothing_modified``) is not recorded: it
    changed nothing.  Any other :class:`ShardmoveError` is
    recorded with its exit code and its (key-free) message, an interrupt as
    130, anything else as 1 with the exception type only; the exception is
    re-raised unchanged.
    """
    h: dict = {"plan_id": plan_id, "code": None, "details": {}}
    try:
        yield h
    except ShardmoveError as e:
        if not e.nothing_modified:  # a refusal changes nothing, not even the history
            record(work_dir, command, h["plan_id"], e.exit_code, {**h["details"], "error": str(e)})
        raise
    except KeyboardInterrupt:
        record(work_dir, command, h["plan_id"], EXIT_INTERRUPTED, h["details"])
        raise
    except Exception as e:
        record(work_dir, command, h["plan_id"], EXIT_INTERNAL, {**h["details"], "error": type(e).__name__})
        raise
    else:
        record(work_dir, command, h["plan_id"], 0 if h["code"] is None else h["code"], h["details"])


def read_history(work_dir: str, *, plan_id: str | None = None, limit: int | None = None) -> list[dict]:
    """History records, oldest first (optionally of one plan, optionally the last ``limit``).

    Unreadable records are skipped with one warning line naming how many.
    """
    d = _history_dir(work_dir)
    names = sorted(n.rstrip("/").rsplit("/", 1)[-1] for n in fs.listdir(d))
    out, bad = [], 0
    for n in names:
        if not n.endswith(".json") or n.startswith(".tmp-"):
            continue
        try:
            doc = json.loads(fs.read_bytes(fs.join(d, n)))
        except (OSError, ValueError):
            bad += 1
            continue
        if not isinstance(doc, dict):
            bad += 1
            continue
        if plan_id is not None and doc.get("plan_id") != plan_id:
            continue
        out.append(doc)
    if bad:
        LOG.warning("history: skipped %d unreadable record(s)", bad)
    if limit is not None and limit >= 0:
        out = out[-limit:] if limit else []
    return out
