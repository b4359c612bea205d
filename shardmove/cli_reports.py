"""Operator subcommands: ``validate``, ``report``, ``metrics``, ``history``.

Registered by :mod:`shardmove.cli` through ``register(subparsers, add_common,
commands)``.  Each command returns a CONTRACTS exit code; findings go to
stdout as ``name: value`` lines, and a non-zero verdict also writes one
``error: ...`` line on stderr.  Nothing here prints a key value.
"""
from __future__ import annotations

import json
import os
import sys

from pipeline import workdir
from shardmove.cli_common import load as _load, plan_dir as _plan_dir, with_last_run
from pipeline.errors import EXIT_OK, BadInput
from shardmove.history import read_history
from shardmove.prom import summary_to_prometheus, write_textfile

__all__ = ["register", "cmd_validate", "cmd_report", "cmd_metrics", "cmd_history", "export_summary",
           "with_last_run"]


def register(subparsers, add_common, commands) -> None:
    v = subparsers.add_parser(
        "validate",
        help="check the live map (duplicates, unknown shards, digest); --compare PLAN reports drift "
             "(exit 0 clean, 2 bad topology, 4 drift)")
    add_common(v)
    v.add_argument("--compare", metavar="PLAN", help="plan directory or plan id to compare with the live map")
    v.add_argument("--json", action="store_true", help="print the findings as JSON")
    commands["validate"] = cmd_validate

    r = subparsers.add_parser("report", help="write <plan>/reports/report.html and its PNG charts")
    add_common(r, options=False)
    r.add_argument("plan", metavar="PLAN", help="plan directory, or plan id under the work directory")
    r.add_argument("--out-dir", help="write the report here instead of <plan>/reports/")
    commands["report"] = cmd_report

    m = subparsers.add_parser("metrics", help="write the plan's status as a Prometheus textfile")
    add_common(m, options=False)
    m.add_argument("plan", metavar="PLAN", help="plan directory, or plan id under the work directory")
    m.add_argument("--out", required=True, metavar="FILE",
                   help="textfile to replace atomically (e.g. /var/lib/node_exporter/textfile/shardmove.prom)")
    commands["metrics"] = cmd_metrics

    h = subparsers.add_parser("history", help="who ran what, when, with which outcome (from <work>/history/)")
    add_common(h, options=False)
    h.add_argument("--plan", metavar="PLAN_ID", help="only records of this plan id")
    h.add_argument("--limit", type=int, default=None, metavar="N", help="only the last N records")
    h.add_argument("--json", action="store_true", help="print the records as JSON lines")
    commands["history"] = cmd_history


def _cfg_and_work(args):
    if not args.config and not getattr(args, "work_dir", None):
        raise BadInput("a configuration (--config) or a work directory (--work-dir) is required")
    if args.config:
        cfg = _load(args)
        return cfg, cfg.work_dir
    return None, os.path.abspath(args.work_dir)


def cmd_validate(args, beam_args) -> int:
    # deferred: validation loads Arrow Parquet and the stores; start-up stays light
    from shardmove.validate import format_lines, validate

    if not args.config:
        raise BadInput("validate: --config is required")
    cfg = _load(args)
    plan_dir = workdir.resolve_plan_dir(args.compare, cfg.work_dir) if args.compare else None
    res = validate(cfg, compare_plan_dir=plan_dir)
    if args.json:
        print(json.dumps(res.to_dict(), indent=1, sort_keys=True))
    else:
        for line in format_lines(res):
            print(line)
    t, d = res.topology, res.drift
    if t.bad:
        sys.stderr.write(f"error: validate: bad topology: {t.duplicate_keys} duplicate keys, "
                         f"{t.unknown_shard_rows} rows on {len(t.unknown_shards)} unknown shard ids, "
                         f"{t.invalid_keys} invalid keys\n")
    elif d is not None and d.drift:
        sys.stderr.write(f"error: validate: drift detected against plan {d.plan_id[:12]}: "
                         f"{d.elsewhere} plan keys on another shard, {d.missing} deleted, "
                         f"{d.rewritten_at_source} rewritten at source, {d.other_changed or 0} other keys changed "
                         "since the snapshot\n")
    return res.exit_code


def cmd_report(args, beam_args) -> int:
    # deferred: reports load the checkpoint reader and the executor; start-up stays light
    from shardmove.report import write_report

    cfg, _work = _cfg_and_work(args)
    path = write_report(_plan_dir(args, cfg), out_dir=args.out_dir)
    print(f"report: {path}")
    return EXIT_OK


def export_summary(plan_dir: str) -> dict:
    """The plan's current status (exact, from the checkpoints) with the last run's figures."""
    # deferred: the executor loads checkpoints (Arrow Parquet) and stores; start-up stays light
    from shardmove.executor import plan_status

    return with_last_run(plan_dir, plan_status(plan_dir))


def cmd_metrics(args, beam_args) -> int:
    cfg, _work = _cfg_and_work(args)
    s = export_summary(_plan_dir(args, cfg))
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
    records = read_history(work, plan_id=args.plan, limit=args.limit)
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
