"""Prometheus text exposition of a plan's summary (for node_exporter's textfile collector).

Never imports Beam.  :func:`summary_to_prometheus` turns a summary
(``summary.json``, :func:`shardmove.executor.summarize` or ``plan_status``) into
the text exposition format 0.0.4: a ``# HELP`` and a ``# TYPE`` line per
metric family, then one ``name{labels} value`` sample per line, every sample
labelled with ``plan_id``.  :func:`write_textfile` replaces the file
atomically (temporary file in the same directory, fsync, rename), so the
collector never reads half a file.  No key values: only counts, reasons,
verification methods and stage names.

Metrics (all gauges unless noted):

========================================  =========================================================
``shardmove_planned_keys``                keys in the plan
``shardmove_keys{state}``                 keys per state (planned, copying, ..., done, failed)
``shardmove_failed_keys{reason}``         Failed keys per reason code
``shardmove_done_keys{verification}``     Done keys per verification method
``shardmove_plan_complete``               1 when every key is Done or Failed, else 0
``shardmove_copy_attempts_total``         copy attempts over all runs (counter)
``shardmove_runs_total``                  runs that executed the plan (counter)
``shardmove_retries_last_run``            transient retries in the last run
``shardmove_elapsed_seconds``             wall time of the last run
``shardmove_total_elapsed_seconds``       wall time of all runs
``shardmove_keys_per_second``             keys finished per second in the last run
``shardmove_stage_latency_seconds{stage,stat}``  per-call latency of copy/verify/swap (p50, p95, max)
``shardmove_stage_calls{stage}``          store calls per stage in the last run
``shardmove_skipped_checkpoint_files``    unreadable checkpoint files skipped
``shardmove_export_timestamp_seconds``    when this file was written (for staleness alerts)
========================================  =========================================================
"""
from __future__ import annotations

import math
import os
import time

from pipeline import fs

__all__ = ["summary_to_prometheus", "write_textfile", "STATES"]

STATES = ("planned", "copying", "copied", "verifying", "verified", "swapping", "done", "failed")


def _escape_label(value) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _num(v) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return str(v)
    f = float(v)
    if math.isnan(f):
        return "NaN"
    if math.isinf(f):
        return "+Inf" if f > 0 else "-Inf"
    if f.is_integer() and abs(f) < 2**53:
        return str(int(f))
    return repr(f)


class _Families:
    def __init__(self, plan_id: str):
        self.plan_id = plan_id
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str, samples) -> None:
        """``samples``: iterable of (extra labels dict, value); families with no samples are omitted."""
        samples = list(samples)
        if not samples:
            return
        self.lines.append(f"# HELP {name} {_escape_help(help_text)}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            lab = {"plan_id": self.plan_id, **labels}
            text = ",".join(f'{k}="{_escape_label(v)}"' for k, v in lab.items())
            self.lines.append(f"{name}{{{text}}} {_num(value)}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def summary_to_prometheus(summary: dict, plan_id: str | None = None, *, now: float | None = None) -> str:
    """The exposition text of a summary (see the module docstring)."""
    pid = plan_id or summary.get("plan_id") or ""
    f = _Families(pid)
    states = summary.get("states") or {}
    f.family("shardmove_planned_keys", "gauge", "Keys in the plan.", [({}, summary.get("planned", 0))])
    f.family("shardmove_keys", "gauge", "Keys per migration state.",
             [({"state": s}, int(states.get(s, 0))) for s in STATES]
             + [({"state": s}, int(n)) for s, n in sorted(states.items()) if s not in STATES])
    f.family("shardmove_failed_keys", "gauge", "Failed keys per reason code.",
             [({"reason": r}, int(n)) for r, n in sorted((summary.get("failures_by_reason") or {}).items())])
    f.family("shardmove_done_keys", "gauge", "Done keys per verification method.",
             [({"verification": m}, int(n)) for m, n in sorted((summary.get("done_by_verification") or {}).items())])
    f.family("shardmove_plan_complete", "gauge", "1 when every key of the plan is Done or Failed.",
             [({}, 1 if summary.get("complete") else 0)])
    if "copy_attempts" in summary:
        f.family("shardmove_copy_attempts_total", "counter", "Copy attempts over all runs.",
                 [({}, int(summary["copy_attempts"]))])
    if "runs" in summary:
        f.family("shardmove_runs_total", "counter", "Runs that executed the plan.", [({}, int(summary["runs"]))])
    if "retries_this_run" in summary:
        f.family("shardmove_retries_last_run", "gauge", "Transient retries in the last run.",
                 [({}, int(summary["retries_this_run"]))])
    if "elapsed_s" in summary:
        f.family("shardmove_elapsed_seconds", "gauge", "Wall time of the last run in seconds.",
                 [({}, summary["elapsed_s"])])
    if "total_elapsed_s" in summary:
        f.family("shardmove_total_elapsed_seconds", "gauge", "Wall time of all runs in seconds.",
                 [({}, summary["total_elapsed_s"])])
    if "keys_per_s" in summary:
        f.family("shardmove_keys_per_second", "gauge", "Keys finished per second in the last run.",
                 [({}, summary["keys_per_s"])])
    timings = summary.get("timings") or {}
    lat = []
    calls = []
    for stage in sorted(timings):
        t = timings[stage]
        for stat, key in (("p50", "p50_ms"), ("p95", "p95_ms"), ("max", "max_ms")):
            if key in t:
                lat.append(({"stage": stage, "stat": stat}, round(float(t[key]) / 1000.0, 9)))
        if "calls" in t:
            calls.append(({"stage": stage}, int(t["calls"])))
    f.family("shardmove_stage_latency_seconds", "gauge", "Per-call store latency of a stage in the last run.", lat)
    f.family("shardmove_stage_calls", "gauge", "Store calls per stage in the last run.", calls)
    if "skipped_checkpoint_files" in summary:
        f.family("shardmove_skipped_checkpoint_files", "gauge", "Unreadable checkpoint files skipped.",
                 [({}, int(summary["skipped_checkpoint_files"]))])
    f.family("shardmove_export_timestamp_seconds", "gauge", "When this file was written (Unix time).",
             [({}, round(time.time() if now is None else now, 3))])
    return f.text()


def write_textfile(path: str, text: str) -> None:
    """Replace ``path`` atomically (temp file in the same directory, fsync, rename).

    The file is world-readable (0644): it holds counts only, and the
    collector usually runs as another user.
    """
    directory = os.path.dirname(os.path.abspath(path)) if not fs.is_gcs(path) else None
    if directory is not None:
        os.makedirs(directory, exist_ok=True)
    fs.write_atomic(path, text.encode("utf-8"), mode=0o644)
