"""Operator subcommands: ``failures``, ``verify``, ``rollback``, ``cleanup``, ``catchup``.

Registered by :mod:`shardmove.cli` through ``register(subparsers, add_common,
commands)``.  Each command parses, calls one function of :mod:`shardmove.ops`
and maps its result to a CONTRACTS exit code (``catchup PLAN`` is ``plan
--since PLAN``: it runs the plan command itself); errors are raised as
:class:`~pipeline.errors.ShardmoveError` and printed by ``cli.main`` as one
``error: ...`` line.  No command prints a key: only counts and key hash
prefixes.
"""
from __future__ import annotations

import json

from shardmove import cli_common
from shardmove.cli_common import preflight as _preflight
from pipeline.config import parse_duration
from pipeline.errors import EXIT_OK, BadInput

__all__ = ["register"]


def _plan_arg(p) -> None:
    p.add_argument("plan", metavar="PLAN", help="plan directory, plan id, 8+ hex digits of one, or plan name")


def register(subparsers, add_common, commands) -> None:
    f = subparsers.add_parser("failures", help="export every Failed key (owner-only Parquet); print counts by reason")
    add_common(f, options=False)
    _plan_arg(f)
    f.add_argument("--out", required=True, metavar="FILE.parquet",
                   help="output file (created 0600: it holds key values)")
    commands["failures"] = cmd_failures

    v = subparsers.add_parser("verify", help="post-verify a seeded sample of moved and of unmoved keys; "
                                             "exit 0 clean, 3 mismatches")
    add_common(v, options=False)
    _plan_arg(v)
    v.add_argument("--sample", type=int, default=1000, metavar="N", help="keys sampled per population (default 1000)")
    v.add_argument("--seed", type=int, default=0, metavar="S", help="sample seed (default 0)")
    v.add_argument("--json", action="store_true", help="print the report as JSON")
    commands["verify"] = cmd_verify

    r = subparsers.add_parser("rollback", help="reverse migration of the plan's Done keys (copy back, verify, "
                                               "swap back), resumable (dry run unless --apply)")
    add_common(r)
    _plan_arg(r)
    r.add_argument("--apply", action="store_true", help="roll back (without it: print what would be rolled back)")
    commands["rollback"] = cmd_rollback

    c = subparsers.add_parser("cleanup", help="delete source copies of Done keys and target copies of Failed keys "
                                              "(dry run unless --apply)")
    add_common(c, options=False)
    _plan_arg(c)
    c.add_argument("--older-than", required=True, metavar="DURATION",
                   help="only keys whose terminal transition is older than this (e.g. 24h, 7d): the verification window")
    c.add_argument("--apply", action="store_true", help="delete (default: only print what would be deleted)")
    commands["cleanup"] = cmd_cleanup

    k = subparsers.add_parser("catchup", help="plan the keys created or reassigned since PLAN's snapshot "
                                              "(the same as plan --since PLAN)")
    add_common(k)
    _plan_arg(k)
    k.add_argument("--dry-run", action="store_true", help="print counts and the capacity check; commit nothing")
    commands["catchup"] = _as_plan_since(subparsers.choices["plan"], commands)


def _cfg_and_plan(args):
    cfg = cli_common.load(args)
    return cfg, cli_common.plan_dir(args, cfg)


def cmd_failures(args, beam_args) -> int:
    # deferred: the workflows load Arrow Parquet and the stores; start-up stays light
    from shardmove.ops import export_failures

    cfg, plan_dir = _cfg_and_plan(args)
    export_failures(cfg, plan_dir, args.out)
    return EXIT_OK


def cmd_verify(args, beam_args) -> int:
    # deferred: the workflows load Arrow Parquet and the stores; start-up stays light
    from shardmove.ops import verify_plan

    if args.sample < 0:
        raise BadInput(f"verify: --sample must be >= 0, got {args.sample}")
    cfg, plan_dir = _cfg_and_plan(args)
    res = verify_plan(cfg, plan_dir, sample=args.sample, seed=args.seed, out=None if args.json else print)
    if args.json:
        print(json.dumps(res.to_dict(), indent=1, sort_keys=True))
    return res.exit_code


def cmd_rollback(args, beam_args) -> int:
    # deferred: the workflows load Arrow Parquet and the stores; start-up stays light
    from shardmove.ops import rollback

    cfg, plan_dir = _cfg_and_plan(args)
    _preflight(cfg, beam_args)  # bad Beam flags etc.: exit 2 before the rollback plan is written
    return rollback(cfg, plan_dir, apply=args.apply, beam_args=beam_args).exit_code


def cmd_cleanup(args, beam_args) -> int:
    # deferred: the workflows load Arrow Parquet and the stores; start-up stays light
    from shardmove.ops import cleanup

    older = parse_duration(args.older_than, "--older-than")
    cfg, plan_dir = _cfg_and_plan(args)
    cleanup(cfg, plan_dir, older_than=older, apply=args.apply)
    return EXIT_OK


def _as_plan_since(plan_parser, commands):
    """``catchup PLAN`` runs ``plan --since PLAN``: the plan command's own code path
    (preflight, history record, capacity check, printed lines, exit codes), with
    the plan command's other flags at their defaults."""

    def cmd_catchup(args, beam_args) -> int:
        plan_args = plan_parser.parse_args([])
        vars(plan_args).update(vars(args))
        plan_args.since = args.plan
        return commands["plan"](plan_args, beam_args)

    return cmd_catchup
