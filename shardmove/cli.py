"""The ``shardmove`` command line: parse -> validate -> act -> report.

Every subcommand exits with a CONTRACTS code; errors are one line on stderr
(``error: ...``) with no traceback unless ``--debug``.  Beam flags go after
``--`` (for example ``-- --runner=DataflowRunner --project=...``).
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import re
import sys
import time
from typing import Sequence

from pipeline import interrupts
from pipeline import logsafe
from pipeline import workdir
from pipeline.fs import NewDirs
from shardmove.history import recorded
from shardmove.progress import MODES, status_progress_lines
from shardmove.prom import summary_to_prometheus, write_textfile
from transforms.runner import is_dry_run
from shardmove import cli_common
from shardmove.cli_common import load as _load, plan_dir as _plan_dir, preflight as _preflight, with_last_run
from pipeline.config import OPTIONS, load_config
from pipeline.errors import (EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK, EXIT_REFUSED, BadInput,
                             ShardmoveError, before_changes, redact)

__all__ = ["main", "build_parser"]

LOG = logging.getLogger("shardmove")


class _Parser(argparse.ArgumentParser):
    """Exact option names only: argparse's prefix matching let ``--force true``
    reach ``--force-swap-on-verification-failure``."""

    def __init__(self, *args, **kwargs):
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def error(self, message):  # one line, exit 2
        sys.stderr.write(f"error: {message}\n")
        raise SystemExit(EXIT_BAD_INPUT)


def version_line() -> str:
    """``shardmove X (apache-beam Y, pyarrow Z)``: the installed distributions' own versions."""
    # deferred: importlib.metadata loads ~30 modules (email, zipfile); only --version needs it
    from importlib.metadata import PackageNotFoundError, version

    def v(dist: str) -> str:
        try:
            return version(dist)
        except PackageNotFoundError:
            return "not installed"

    return f"shardmove {v('shardmove')} (apache-beam {v('apache-beam')}, pyarrow {v('pyarrow')})"


def _add_common(p: argparse.ArgumentParser, *, options: bool = True) -> None:
    p.add_argument("--config", "-c", default=os.environ.get("SHARDMOVE_CONFIG") or None,
                   help="YAML configuration file (default: $SHARDMOVE_CONFIG)")
    p.add_argument("--work-dir", help="work directory (overrides work_dir in the config)")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    p.add_argument("--log-level", default=None, choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    if options:
        g = p.add_argument_group("options (override the config file)")
        for o in OPTIONS:
            g.add_argument(o.flag, dest=o.name, default=None, metavar=o.kind.upper(), help=f"{o.doc} Default {o.default_text()}.".replace("%", "%%"))


def _add_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument("--progress", default="auto", choices=MODES,
                   help="progress on stderr: a bar, one text or JSON line per progress_log_interval, or none; "
                        "auto (default): a bar on a terminal, text otherwise")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="shardmove", description="Plan and execute key migrations of sharded keyspaces on Apache Beam.")
    parser.add_argument("--version", action="version", version=version_line())
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    d = sub.add_parser("demo", help="create an embedded (SQLite) demo keyspace and its config")
    d.add_argument("directory")
    d.add_argument("--keys", type=int, default=20000)
    d.add_argument("--shards", type=int, default=4)
    d.add_argument("--key-type", default="string", choices=["string", "int64", "uuid", "bytes"])
    d.add_argument("--debug", action="store_true")
    d.add_argument("--log-level", default=None, choices=["DEBUG", "INFO", "WARNING", "ERROR"])

    s = sub.add_parser("snapshot", help="export the current assignments at a version cutoff")
    _add_common(s)
    s.add_argument("--cutoff", metavar="V", type=int, default=None,
                   help="export the map at version V instead of its current version (refused above it)")

    p = sub.add_parser("plan", help="compute (or --dry-run) a migration plan")
    _add_common(p)
    p.add_argument("--snapshot", help="plan from an existing Parquet snapshot (file or directory)")
    p.add_argument("--cutoff", metavar="V", type=int, default=None,
                   help="snapshot the map at version V instead of its current version (refused above it)")
    p.add_argument("--dry-run", action="store_true", help="print counts and the capacity check; commit nothing")
    p.add_argument("--report-dir", metavar="DIR", help="also write the plan report (report.html + PNG charts) into DIR")
    p.add_argument("--sample-hashes", metavar="N", type=int, default=0,
                   help="with --dry-run: read N seeded moves at their sources; report missing or unreadable "
                        "records and their bytes (seeded by the sample_seed option)")
    _add_progress(p)
    p.add_argument("--since", metavar="PLAN",
                   help="catch-up: plan only the keys created or reassigned after PLAN's snapshot cutoff")
    p.add_argument("--name", metavar="NAME",
                   help="name the plan (1-64 letters, digits, . _ -): PLAN arguments accept it; never part of the id")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object on stdout (plan_id, name, counts); the plan block goes to stderr")
    r = sub.add_parser("run", help="execute a plan (copy, verify, swap), resumable")
    _add_common(r)
    r.add_argument("plan", metavar="PLAN", help="plan directory, plan id, 8+ hex digits of one, or plan name")
    r.add_argument("--retry-failed", action="store_true", help="retry keys that are Failed")
    _add_progress(r)
    r.add_argument("--prometheus", metavar="FILE", help="write the final summary as a Prometheus textfile")
    r.add_argument("--allow-drift", action="store_true",
                   help="skip keys whose map entry drifted since the snapshot, as Failed(drifted)")
    r.add_argument("--json", action="store_true",
                   help="print one JSON object on stdout (plan_id, summary counts); the run's lines go to stderr")

    st = sub.add_parser("status", help="per-state counts of a plan; exit 0 complete, 3 complete with failed keys, "
                                               "5 running, 6 planned or stopped (rerun run)")
    _add_common(st, options=False)
    st.add_argument("plan", metavar="PLAN", help="plan directory, plan id, 8+ hex digits of one, or plan name")
    st.add_argument("--json", action="store_true", help="print the status as JSON")
    st.add_argument("--prometheus", metavar="FILE", help="also write the status as a Prometheus textfile")
    st.add_argument("--watch", nargs="?", const=2.0, type=float, metavar="SECONDS",
                    help="refresh in place every SECONDS (default 2) until the plan completes")
    for mod in _EXTENSIONS:
        mod.register(sub, _add_common, COMMANDS)
    return parser


def _extensions():
    """Operator subcommands live in their own modules; each has
    ``register(subparsers, add_common, commands)``."""
    mods = []
    for name in ("shardmove.cli_reports", "shardmove.cli_ops", "shardmove.cli_init"):
        try:
            mods.append(importlib.import_module(name))
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
    return mods


def _configure_logging(args) -> None:
    """No key bytes at any level (pipeline/logsafe.py): Beam's loggers never
    below INFO (they print elements at DEBUG), third-party records show only
    plain arguments, and tracebacks only shardmove's own messages."""
    level = args.log_level or ("DEBUG" if getattr(args, "debug", False) else "WARNING")
    logsafe.configure(getattr(logging, level), sys.stderr)
    if level != "DEBUG":
        for noisy in ("google", "urllib3"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        # a missing credential is reported as one error line, not as google.auth's warnings
        logging.getLogger("google.auth").setLevel(logging.ERROR)
        # Beam logs a failed bundle's traceback itself; our error line says what failed
        logging.getLogger("apache_beam").setLevel(logging.CRITICAL)


def _to_stderr(line: str) -> None:
    """Warnings of the preflight and of unsafe options: stderr, as they always were."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def cmd_demo(args, beam_args) -> int:
    # deferred: the API loads the planner and executor (Arrow Parquet, stores); start-up stays light
    from shardmove.api import create_demo_keyspace

    if args.keys < 0 or args.shards < 1:
        raise BadInput("demo: --keys must be >= 0 and --shards >= 1")
    info = create_demo_keyspace(args.directory, keys=args.keys, shards=args.shards, key_type=args.key_type)
    print(f"demo keyspace: {info['keys']} keys on {args.shards} shards")
    print(f"config: {info['config']}")
    return EXIT_OK


def cmd_snapshot(args, beam_args) -> int:
    # deferred: the API loads the planner and executor (Arrow Parquet, stores); start-up stays light
    from shardmove.api import snapshot

    cfg = _load(args)
    info = snapshot(cfg, cutoff=args.cutoff)
    print(f"snapshot: {info.location}")
    print(f"snapshot digest: {info.digest}")
    print(f"rows: {info.rows} cutoff: {info.cutoff} rows_above_cutoff: {info.rows_above_cutoff}")
    return EXIT_OK


def _stderr_line(line: str) -> None:
    sys.stderr.write(line + "\n")


def _say(args):
    """Where a command's human lines go: stdout, or stderr under ``--json`` (stdout then holds
    exactly one JSON object)."""
    return _stderr_line if getattr(args, "json", False) else print


def _print_json(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    sys.stdout.flush()


def _plan_json(res, args, code: int) -> dict:
    m = res.manifest or {}
    return {"plan_id": res.plan_id, "name": res.name, "plan_dir": res.plan_dir, "dry_run": bool(args.dry_run),
            "created": bool(res.created) and not args.dry_run, "capacity_ok": bool(res.capacity_ok),
            "keys_examined": m.get("keys_examined"), "keys_in_window": m.get("keys_in_window"),
            "moves": m.get("moves"), "planned": m.get("moves"), "moved_fraction": m.get("moved_fraction"),
            "optimum_moved_fraction": m.get("optimum_moved_fraction"), "window": m.get("window"),
            "pairs": m.get("pairs", []), "capacity": m.get("capacity", []), "exit_code": code}


def cmd_plan(args, beam_args) -> int:
    # deferred: the API loads the planner and executor (Arrow Parquet, stores); start-up stays light
    from shardmove.api import plan

    cfg = _load(args)
    say = _say(args)

    def make():
        if args.since:
            if args.snapshot or args.cutoff is not None:
                raise BadInput(f"plan: --since and {'--snapshot' if args.snapshot else '--cutoff'} cannot be combined")
            # deferred: the workflows load Arrow Parquet and the stores; start-up stays light
            from shardmove.ops import plan_since

            work = os.path.abspath(args.work_dir) if args.work_dir else cfg.work_dir
            return plan_since(cfg, workdir.resolve_plan_dir(args.since, work), dry_run=args.dry_run,
                              beam_args=beam_args, out=say, name=args.name, sample_hashes=args.sample_hashes,
                              progress=args.progress)
        return plan(cfg, snapshot=args.snapshot, dry_run=args.dry_run, beam_args=beam_args, out=say, name=args.name,
                    sample_hashes=args.sample_hashes, progress_output=args.progress, cutoff=args.cutoff,
                    warn=_to_stderr)

    translate_only = is_dry_run(_preflight(cfg, beam_args))  # Dataflow --dry_run: nothing committed
    if args.dry_run or translate_only:
        res = make()
        if translate_only:
            if args.json:  # a translated job: no plan id, nothing committed
                _print_json({**_plan_json(res, args, EXIT_OK), "plan_id": res.plan_id or None, "dry_run": True})
            return EXIT_OK
    else:
        with recorded(cfg.work_dir, "plan") as h:
            res = make()
            m = res.manifest
            h["plan_id"] = res.plan_id
            h["details"] = {"moves": m["moves"], "keys_examined": m["keys_examined"], "window": m["window"],
                            "created": res.created, "since": args.since, "name": res.name}
    report = None
    if args.report_dir:
        # deferred: reports load the checkpoint reader and the executor; start-up stays light
        from shardmove.report import write_plan_report

        report = write_plan_report(res.manifest, os.path.abspath(args.report_dir), dry_run=args.dry_run,
                                   plan_name=res.name)
        say(f"report: {report}")
    code = EXIT_OK
    if args.dry_run and not res.capacity_ok:
        say("capacity check: FAILED (a target shard would fall below the configured headroom)")
        cli_common.remove_created()  # refused: leave the work directory as it was found
        code = EXIT_REFUSED
    elif not args.dry_run:
        say(f"plan dir: {res.plan_dir}")
    if args.json:
        _print_json({**_plan_json(res, args, code), "report": report})
    return code


def cmd_run(args, beam_args) -> int:
    # deferred: pipeline.faults loads the stores; start-up stays light
    from pipeline.faults import hold_point

    # a signal before the run holds anything exits 130 (pipeline.interrupts); the console
    # script (shardmove.console) installed the same handler before importing the CLI
    irq = interrupts.install()
    hold_point("startup")
    # deferred: the API loads the planner and executor (Arrow Parquet, stores); start-up stays light
    from shardmove.api import run

    cfg = _load(args)
    say = _say(args)
    translate_only = is_dry_run(_preflight(cfg, beam_args))
    plan_dir = _plan_dir(args, cfg)
    if translate_only:  # Dataflow --dry_run: translate only, record nothing
        res = run(cfg, plan_dir, beam_args=beam_args, out=say, warn=_to_stderr)
        if args.json:
            _print_json({"plan_id": res.plan_id, "dry_run": True, "exit_code": res.exit_code})
        return res.exit_code
    name = workdir.plan_name(plan_dir)
    with recorded(cfg.work_dir, "run", os.path.basename(plan_dir.rstrip("/"))) as h:
        res = run(cfg, plan_dir, retry_failed=args.retry_failed, allow_drift=args.allow_drift,
                  beam_args=beam_args, out=say, progress_output=args.progress, warn=_to_stderr)
        irq.deferred = True  # the run has given everything back: a signal now only sets the exit code
        s = res.summary
        h["plan_id"], h["code"] = res.plan_id, res.exit_code
        h["details"] = {"planned": s["planned"], "done": s["done"], "failed": s["failed"],
                        "elapsed_s": s.get("elapsed_s"), "nothing_to_do": res.nothing_to_do,
                        "retry_failed": args.retry_failed, "allow_drift": args.allow_drift, "name": name}
    if args.prometheus:
        write_textfile(args.prometheus, summary_to_prometheus(res.summary, res.plan_id))
    if res.summary.get("failed") and not irq.interrupted:
        # what to do about Failed keys: look at them, then retry them (the key values go to the file only)
        cfg_arg = f" --config {args.config}" if args.config else ""
        say(f"next: shardmove failures {res.plan_id}{cfg_arg} --out failed.parquet   # which keys, and why")
        say(f"next: shardmove run {res.plan_id}{cfg_arg} --retry-failed             # retry them")
    code = EXIT_INTERRUPTED if irq.interrupted else res.exit_code
    if args.json:
        s = res.summary
        _print_json({"plan_id": res.plan_id, "name": name, "exit_code": code, "nothing_to_do": res.nothing_to_do,
                     "interrupted": bool(irq.interrupted), "complete": bool(s.get("complete")),
                     **{k: s.get(k) for k in ("planned", "done", "failed", "states", "failures_by_reason",
                                              "done_by_verification", "elapsed_s", "keys_per_s",
                                              "retries_this_run")}})
    return code


def _status_lines(s: dict) -> list[str]:
    # deferred: the executor loads checkpoints (Arrow Parquet) and stores; start-up stays light
    from shardmove.executor import summary_line

    lines = [f"plan id: {s['plan_id']}"]
    if s.get("name"):
        lines.append(f"name: {s['name']}")
    lines += status_progress_lines(s)  # cumulative counts, current states, per pair and per shard
    for reason, n in s["failures_by_reason"].items():
        lines.append(f"failed[{reason}]: {n}")
    for method, n in s["done_by_verification"].items():
        lines.append(f"done_by_verification[{method}]: {n}")
    if "rate_keys_per_s" in s:
        eta = s.get("eta_s")
        lines.append(f"rate: {s['rate_keys_per_s']} keys/s eta: {'?' if eta is None else f'{eta:.0f}s'}")
    if "lease" in s:
        L = s["lease"]
        lines.append(f"lease: held by {L['host']}:{L['pid']} epoch {L['epoch']}")
    lines.append("state: " + s["state"])
    if s["complete"]:  # CONTRACTS: the summary line is printed for a complete plan only
        lines.append(summary_line(s))
    elif s["state"] in ("planned", "stopped"):
        lines.append("next: rerun `shardmove run` to resume")
    return lines


def cmd_status(args, beam_args) -> int:
    # deferred: the executor loads checkpoints (Arrow Parquet) and stores; start-up stays light
    from shardmove.executor import plan_status as status
    from shardmove.executor import status_exit_code

    cfg = None
    if args.config:
        cfg = load_config(args.config)
    plan_dir = _plan_dir(args, cfg)
    while True:
        s = status(plan_dir)
        s["name"] = workdir.plan_name(plan_dir)
        if args.prometheus:
            write_textfile(args.prometheus, summary_to_prometheus(with_last_run(plan_dir, dict(s)), s["plan_id"]))
        if args.json:
            text = json.dumps(s, indent=1, sort_keys=True)
        else:
            text = "\n".join(_status_lines(s))
        if args.watch and sys.stdout.isatty():
            sys.stdout.write("\x1b[H\x1b[2J" + text + "\n")
        else:
            print(text)
        sys.stdout.flush()
        if not args.watch or s["state"] != "running":  # --watch ends when the state leaves running
            return status_exit_code(s)
        time.sleep(max(0.2, args.watch))


#: Commands that never write to a store (their work-directory files are theirs
#: alone): every store error they meet is met before anything is modified.
_READ_ONLY = frozenset({"snapshot", "plan", "catchup", "validate", "status", "report", "metrics", "history",
                        "failures", "verify", "plans"})

COMMANDS = {"demo": cmd_demo, "snapshot": cmd_snapshot, "plan": cmd_plan, "run": cmd_run, "status": cmd_status}
_EXTENSIONS = _extensions()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    beam_args: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, beam_args = argv[:i], argv[i + 1:]
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    except ShardmoveError as e:  # a signal while parsing (pipeline.interrupts): one line, its code
        sys.stderr.write(f"error: {e}\n")
        return e.exit_code
    except Exception as e:  # a bug in the parser set-up: one line, no traceback
        sys.stderr.write(f"error: internal failure parsing arguments ({type(e).__name__})\n")
        return EXIT_INTERNAL
    if not args.command:
        parser.print_help()
        return EXIT_BAD_INPUT
    _configure_logging(args)
    cli_common.track_new_dirs(NewDirs())
    try:
        return _dispatch(args, beam_args)
    finally:
        cli_common.track_new_dirs(None)


def _dispatch(args, beam_args) -> int:
    try:
        if args.command in _READ_ONLY:  # modifies no store: a store it cannot use is bad configuration
            with before_changes():
                return COMMANDS[args.command](args, beam_args)
        return COMMANDS[args.command](args, beam_args)
    except ShardmoveError as e:
        if args.debug:
            LOG.exception("failed")
        if e.nothing_modified:
            cli_common.remove_created()
        line = _one_line(e)
        sys.stderr.write(f"error: {line}\n")
        _json_error(args, line, e.exit_code)
        return e.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        _json_error(args, "interrupted", EXIT_INTERRUPTED)
        return EXIT_INTERRUPTED
    except OSError as e:  # the environment (a file, a disk, a socket), not a bug: say what and where
        if args.debug:
            LOG.exception("environment error")
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        what = e.strerror or (str(e).strip().splitlines() or [""])[0][:200] or "environment error"
        line = _no_object_names(redact(f"{what}{where} ({type(e).__name__})"))
        sys.stderr.write(f"error: {line}\n")
        _json_error(args, line, EXIT_INTERNAL)
        return EXIT_INTERNAL
    except Exception as e:  # a bug: never echo messages (they may hold values)
        if args.debug:
            LOG.exception("internal failure")
        line = f"internal failure ({type(e).__name__}); rerun with --debug for details"
        sys.stderr.write(f"error: {line}\n")
        _json_error(args, line, EXIT_INTERNAL)
        return EXIT_INTERNAL


def _json_error(args, line: str, code: int) -> None:
    """Under ``--json`` a failed command still prints one JSON object on stdout: ``error``
    (the same line as on stderr, without ``error: ``) and ``exit_code``."""
    if getattr(args, "json", False):
        try:
            # one line: also a valid record for the JSON-lines readers of ``history --json``
            sys.stdout.write(json.dumps({"error": line, "exit_code": code, "plan_id": None}, sort_keys=True) + "\n")
            sys.stdout.flush()
        except OSError:  # stdout gone: the stderr line and the exit code remain
            pass


_OBJECT_NAME = re.compile(r"/k/[0-9a-f]{2}/[0-9a-v_/]+")


def _no_object_names(text: str) -> str:
    """An object data store's file names encode key bytes (base32hex): cut them
    to their fan-out directory, so no key reaches a message."""
    return _OBJECT_NAME.sub(lambda m: m.group(0)[:6] + "…", text)


def _one_line(e: BaseException) -> str:
    """The message of a ShardmoveError as one redacted line (a runner may have
    appended its own context on further lines)."""
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    return _no_object_names(redact(re.sub(r"\s*\[while running '[^\]]*'\]\s*$", "", line)))
