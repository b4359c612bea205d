"""Operator subcommands: ``validate``, ``report``, ``metrics``, ``history``, ``plans``.

Registered by :mod:`shardmove.cli` through ``register(subparsers, add_common,
commands)``.  Each command returns a CONTRACTS exit code; findings go to
stdout as ``name: value`` lines, and a non-zero verdict also writes one
``error: ...`` line on stderr.  Nothing here prints a key value.
"""
from __future__ import annotations

import calendar
import json
import re
import sys
import time

from pipeline import workdir
from shardmove.cli_common import NO_WORK_DIR, load as _load, plan_dir as _plan_dir, with_last_run, \
    work_dir as _work_dir
from pipeline.errors import EXIT_OK, BadInput
from shardmove.history import read_history
from shardmove.prom import summary_to_prometheus, write_textfile

__all__ = ["register", "cmd_validate", "cmd_report", "cmd_metrics", "cmd_history", "cmd_plans", "export_summary",
           "with_last_run"]


def register(subparsers, add_common, commands) -> None:
    v = subparsers.add_parser(
        "validate",
        help="check the live map (duplicates, unknown shards, digest); --compare PLAN reports drift "
             "(exit 0 clean, 2 bad topology, 4 drift)")
    add_common(v)
    v.add_argument("--compare", metavar="PLAN", help="plan (directory, id, 8+ hex prefix or name) to compare with the live map")
    v.add_argument("--json", action="store_true", help="print the findings as JSON")
    commands["validate"] = cmd_validate

    r = subparsers.add_parser("report", help="write <plan>/reports/report.html and its PNG charts")
    add_common(r, options=False)
    r.add_argument("plan", metavar="PLAN", help="plan directory, plan id, 8+ hex digits of one, or plan name")
    r.add_argument("--out-dir", help="write the report here instead of <plan>/reports/")
    commands["report"] = cmd_report

    m = subparsers.add_parser("metrics", help="write the plan's status as a Prometheus textfile")
    add_common(m, options=False)
    m.add_argument("plan", metavar="PLAN", help="plan directory, plan id, 8+ hex digits of one, or plan name")
    m.add_argument("--out", required=True, metavar="FILE",
                   help="textfile to replace atomically (e.g. /var/lib/node_exporter/textfile/shardmove.prom)")
    commands["metrics"] = cmd_metrics

    h = subparsers.add_parser("history", help="who ran what, when, with which outcome (from <work>/history/)")
    add_common(h, options=False)
    h.add_argument("--plan", metavar="PLAN", help="only records of this plan (id, 8+ hex prefix or name)")
    h.add_argument("--limit", type=int, default=None, metavar="N", help="only the last N records")
    h.add_argument("--json", action="store_true", help="print the records as JSON lines")
    commands["history"] = cmd_history

    ls = subparsers.add_parser("plans", help="list the work directory's plans, newest first: id, name, state, "
                                             "counts, age")
    add_common(ls, options=False)
    ls.add_argument("--json", action="store_true", help="print one JSON object: {\"plans\": [...]}")
    commands["plans"] = cmd_plans


def _cfg_and_work(args):
    """The configuration (None without one) and the work directory; BadInput when neither
    ``--config`` / ``$SHARDMOVE_CONFIG`` nor ``--work-dir`` is given."""
    cfg = _load(args) if args.config else None
    work = _work_dir(args, cfg)
    if work is None:
        raise BadInput(f"{args.command}: {NO_WORK_DIR}")
    return cfg, work


def _cfg_or_none(args):
    return _load(args) if args.config else None


def cmd_validate(args, beam_args) -> int:
    # deferred: validation loads Arrow Parquet and the stores; start-up stays light
    from shardmove.validation import error_lines, format_lines, validate

    if not args.config:
        raise BadInput("validate: --config is required")
    cfg = _load(args)
    plan_dir = workdir.resolve_plan_dir(args.compare, cfg.work_dir) if args.compare else None
    res = validate(cfg, compare_plan_dir=plan_dir)
    if args.json:
        d = res.to_dict()
        d["plan_id"] = res.drift.plan_id if res.drift is not None else None
        d["ok"] = res.exit_code == EXIT_OK
        print(json.dumps(d, indent=1, sort_keys=True))
    else:
        for line in format_lines(res):
            print(line)
    for line in error_lines(res, cfg.map_store):
        sys.stderr.write(f"error: {line}\n")
    return res.exit_code


def cmd_report(args, beam_args) -> int:
    # deferred: reports load the checkpoint reader and the executor; start-up stays light
    from shardmove.report import write_report

    path = write_report(_plan_dir(args, _cfg_or_none(args)), out_dir=args.out_dir)
    print(f"report: {path}")
    return EXIT_OK


def export_summary(plan_dir: str) -> dict:
    """The plan's current status (exact, from the checkpoints) with the last run's figures."""
    # deferred: the executor loads checkpoints (Arrow Parquet) and stores; start-up stays light
    from shardmove.executor import plan_status

    return with_last_run(plan_dir, plan_status(plan_dir))


def cmd_metrics(args, beam_args) -> int:
    s = export_summary(_plan_dir(args, _cfg_or_none(args)))
    write_textfile(args.out, summary_to_prometheus(s, s["plan_id"]))
    print(f"plan id: {s['plan_id']}")
    print(f"metrics: {args.out}")
    return EXIT_OK


def _details_text(details: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(details.items()) if v is not None and not isinstance(v, (dict, list)))


def cmd_history(args, beam_args) -> int:
    _cfg, work = _cfg_and_work(args)
    if args.limit is not None and args.limit < 0:
        raise BadInput("history: --limit must be >= 0")
    plan_id = None
    if args.plan and re.fullmatch(r"[0-9a-f]{64}", args.plan):
        plan_id = args.plan  # a full id: also the records of a plan since deleted
    elif args.plan:
        plan_id = workdir.resolve_plan_dir(args.plan, work).rstrip("/").rsplit("/", 1)[-1]
    records = read_history(work, plan_id=plan_id, limit=args.limit)
    for r in records:
        if args.json:
            print(json.dumps(r, sort_keys=True))
        else:
            pid = (r.get("plan_id") or "-")[:12]
            print(f"{r.get('when', '?')} {r.get('who', '?')} {r.get('command', '?')} {pid} {r.get('outcome', '?')}"
                  + (f" {_details_text(r.get('details') or {})}" if r.get("details") else ""))
    if not args.json:
        print(f"history: {len(records)} records")
    return EXIT_OK


def _age(created_at: str | None, now: float) -> str:
    try:
        t = calendar.timegm(time.strptime(created_at or "", "%Y-%m-%dT%H:%M:%SZ"))
    except ValueError:
        return "?"
    s = max(0, int(now - t))
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= n:
            return f"{s // n}{unit}"
    return f"{s}s"


def _n(v) -> str:
    return "-" if v is None else str(v)


def cmd_plans(args, beam_args) -> int:
    # deferred: the API loads the planner and executor (Arrow Parquet, stores); start-up stays light
    from shardmove.api import plans

    _cfg, work = _cfg_and_work(args)
    rows = plans(work)
    now = time.time()
    if args.json:
        for r in rows:
            r["age"] = _age(r["created_at"], now)
        print(json.dumps({"work_dir": work, "plans": rows}, indent=1, sort_keys=True))
        return EXIT_OK
    if rows:
        print(f"{'PLAN':<12}  {'NAME':<20}  {'STATE':<24}  {'PLANNED':>9}  {'DONE':>9}  {'FAILED':>7}  AGE")
    for r in rows:
        print(f"{r['plan_id'][:12]:<12}  {r['name'] or '-':<20}  {r['state']:<24}  {_n(r['planned']):>9}  "
              f"{_n(r['done']):>9}  {_n(r['failed']):>7}  {_age(r['created_at'], now)}")
    print(f"plans: {len(rows)}")
    return EXIT_OK
