"""Running a plan: the launcher around the Beam executor graph.

``run_plan`` checks the plan files, reads the merged checkpoint state (so a
complete plan is reported without starting Beam), takes the lease (which
gives the run its epoch), runs ``transforms/execute.py``, compacts
checkpoints, and writes ``summary.json`` from the checkpoints -- so the
totals of a finished plan are the same however many times it was
interrupted.  SIGINT/SIGTERM stop every phase with exit 130, the claim and
the lease released (:mod:`pipeline.interrupts`; during the pipeline through
a stop marker the DoFns honour).  A configuration error a stage meets while
the run goes (a table dropped, a permission revoked:
:class:`~pipeline.errors.ConfigurationError`) stops it the same way, no key
Failed for it, and exits 1 (:class:`~pipeline.errors.RunHalted`) with one
line naming the shard and the object; a rerun resumes.  A complete plan whose last run was killed
before its final phase gets that phase (compaction, summary) from the rerun.  Progress events are derived from committed
checkpoint parts (:mod:`shardmove.run_progress`), at most one per ``progress_interval`` plus a final one, and shown
on stderr as a bar or as lines (:mod:`shardmove.progress`).  ``plan_status`` counts cumulatively (every run) and per
(source, target) pair and per shard.
"""
from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import checkpoint as ckpt
from pipeline import fs
from pipeline import interrupts
from pipeline import states as S
from pipeline.config import OPTIONS, Config, parse_window
from pipeline.errors import BadInput, Interrupted, Refused, RunHalted, before_changes
from pipeline.faults import hold_point, validate_faults
from pipeline.lease import LeaseLost, acquire, live_holder, read_lease
from pipeline.stores import open_data_store, open_map_store
from pipeline.stores.base import RunRegistry
from pipeline import workdir
from pipeline.workdir import load_manifest
from shardmove.progress import ProgressDisplay
from shardmove.run_progress import _base_counts, _Progress, _recent_rate, cumulative_counts, pair_progress
from transforms.preflight import check_stores, preflight

__all__ = ["RunResult", "run_plan", "plan_status", "summarize", "SUMMARY_FORMAT_VERSION"]

LOG = logging.getLogger("shardmove.run")
SUMMARY_FORMAT_VERSION = 1


@dataclass
class RunResult:
    plan_id: str
    summary: dict
    exit_code: int
    nothing_to_do: bool = False
    interrupted: bool = False
    metrics: dict = field(default_factory=dict)


def summary_line(s: dict) -> str:
    return f"summary: planned={s['planned']} done={s['done']} failed={s['failed']}"


def verify_plan_files(plan_dir: str, manifest: dict) -> None:
    bad = 0
    for f in manifest["files"]:
        path = workdir.move_file(plan_dir, f["group"])
        try:
            data = fs.read_bytes(path)
        except OSError:
            bad += 1
            continue
        if hashlib.sha256(data).hexdigest() != f["sha256"]:
            bad += 1
    if bad:
        raise BadInput(f"plan: {bad} of {len(manifest['files'])} move files are missing or damaged")


def summarize(plan_dir: str, manifest: dict, *, compact: bool = False, should_stop=None,
              by_group: dict | None = None, epoch: int | None = None) -> dict:
    """Totals from the merged checkpoints (exact, however many runs it took).

    ``compact``: fold each group's parts into its compacted file first; once
    ``should_stop()`` holds (a signal), the remaining groups are only read.
    ``by_group``: when given, filled with each group's per-state counts.
    ``epoch``: also count, as ``finished_this_run``, the keys whose merged state
    is terminal (Done or Failed) and was recorded by that run -- what the run
    finished, also when it turned Failed keys into Done keys (``--retry-failed``)."""
    plan_id = manifest["plan_id"]
    counts = {st.name.lower(): 0 for st in S.State}
    reasons: dict = {}
    methods: dict = {}
    attempts = 0
    max_epoch = 0
    seen = 0
    skipped = 0
    finished = 0

    def group(gid: str):
        if compact and not (should_stop is not None and should_stop()):
            try:
                ckpt.compact_group(plan_dir, plan_id, gid)
            except ckpt.CheckpointError:
                raise
            except Exception as e:  # compaction is an optimisation; reading still works
                LOG.warning("checkpoint compaction of a group failed (%s); continuing", type(e).__name__)
            hold_point("compaction", should_stop)
        return ckpt.read_group(plan_dir, plan_id, gid)

    gids = [f["group"] for f in manifest["files"]]
    for gid, g in zip(gids, _in_order(group, gids)):
        skipped += len(g.skipped)
        t = g.table
        seen += t.num_rows
        if t.num_rows == 0:
            continue
        st = t.column("state").to_numpy(zero_copy_only=False)
        for rank, n in zip(*_unique(st)):
            counts[S.State(int(rank)).name.lower()] += int(n)
            if by_group is not None:
                g_counts = by_group.setdefault(gid, {})
                name = S.State(int(rank)).name.lower()
                g_counts[name] = g_counts.get(name, 0) + int(n)
        failed = pc.equal(t.column("state"), int(S.State.FAILED))
        if pc.any(failed).as_py():
            for r, n in _value_counts(t.column("reason").filter(failed)):
                reasons[r or "unknown"] = reasons.get(r or "unknown", 0) + n
        done = pc.equal(t.column("state"), int(S.State.DONE))
        if pc.any(done).as_py():
            for m, n in _value_counts(t.column("verify_method").filter(done)):
                methods[m or "unknown"] = methods.get(m or "unknown", 0) + n
        if epoch is not None:
            terminal = pc.or_(done, failed)
            finished += int(pc.sum(pc.and_(terminal, pc.equal(t.column("epoch"), int(epoch)))).as_py() or 0)
        attempts += int(pc.sum(t.column("attempts")).as_py() or 0)
        max_epoch = max(max_epoch, int(pc.max(t.column("epoch")).as_py() or 0))
    planned = int(manifest["moves"])
    counts["planned"] += planned - seen  # keys with no checkpoint yet
    done = counts["done"]
    failed = counts["failed"]
    out = {
        "format_version": SUMMARY_FORMAT_VERSION,
        "plan_id": plan_id,
        "planned": planned,
        "done": done,
        "failed": failed,
        "states": counts,
        "failures_by_reason": dict(sorted(reasons.items())),
        "done_by_verification": dict(sorted(methods.items())),
        "copy_attempts": attempts,
        "complete": done + failed == planned,
        "max_epoch": max_epoch,
        "skipped_checkpoint_files": skipped,
    }
    if epoch is not None:
        out["finished_this_run"] = finished
    return out


#: groups compacted and read at once by :func:`summarize`: their part reads, Parquet
#: encoding and fsyncs overlap (the work is mostly GIL-free)
SUMMARY_GROUP_THREADS = 4


def _in_order(fn, items: list):
    """``fn(item)`` for every item, up to SUMMARY_GROUP_THREADS at a time, results in
    ``items``' order (so the totals are summed in the same order whatever the timing).
    At most 2 x SUMMARY_GROUP_THREADS results wait to be taken (a group's merged table
    each: memory stays bounded whatever the number of groups).  The first exception
    raised is re-raised once the calls already running have finished."""
    if len(items) <= 1:
        for i in items:
            yield fn(i)
        return
    ahead = 2 * SUMMARY_GROUP_THREADS
    with ThreadPoolExecutor(max_workers=min(SUMMARY_GROUP_THREADS, len(items)),
                            thread_name_prefix="summary") as pool:
        futures = collections.deque(pool.submit(fn, i) for i in items[:ahead])
        rest = iter(items[ahead:])
        try:
            while futures:
                result = futures.popleft().result()
                for i in rest:
                    futures.append(pool.submit(fn, i))
                    break
                yield result
        finally:
            for fut in futures:
                fut.cancel()


def _unique(a):
    return np.unique(a, return_counts=True)


def _value_counts(col):
    vc = pc.value_counts(col)
    return [(v["values"].as_py(), v["counts"].as_py()) for v in vc]


#: ``status`` states and their exit codes (CONTRACTS, "Exit status")
STATUS_EXIT = {"complete": 0, "complete with failures": 3, "running": 5, "planned": 6, "stopped": 6}


def plan_state(summary: dict, running: bool) -> str:
    """complete | complete with failures | running (a live executor holds the lease) |
    planned (nothing started, no live executor) | stopped (started, no live executor: rerun ``run``)."""
    if summary["complete"]:
        return "complete with failures" if summary["failed"] else "complete"
    if running:
        return "running"
    untouched = summary["states"].get("planned", 0) == summary["planned"]
    return "planned" if untouched and not summary.get("runs") else "stopped"


def status_exit_code(status: dict) -> int:
    """The exit code of ``status`` for a :func:`plan_status` result."""
    return STATUS_EXIT[status["state"]]


def plan_status(plan_dir: str) -> dict:
    manifest = load_manifest(plan_dir)
    by_group: dict = {}
    s = summarize(plan_dir, manifest, by_group=by_group)
    c = cumulative_counts(s["states"])
    s["progress"] = {"total": s["planned"], "done": s["done"] + s["failed"], **c,
                     "remaining": s["planned"] - s["done"] - s["failed"]}
    s["pairs"], s["shards"] = pair_progress(manifest, by_group)
    prev = workdir.read_summary(plan_dir)
    if prev:
        for k in ("elapsed_s", "keys_per_s", "runs"):
            if k in prev:
                s[k] = prev[k]
    lease = read_lease(plan_dir)
    # a live executor: an unreleased, unexpired lease whose holder is not proven dead
    running = not s["complete"] and live_holder(plan_dir) is not None
    if running:
        h = lease.get("holder") or {}
        s["lease"] = {"host": h.get("host"), "pid": h.get("pid"), "epoch": lease.get("epoch"),
                      "expires_at": lease.get("expires_at")}
        rate = _recent_rate(plan_dir)  # rate and ETA only while something runs
        if rate is not None:
            s["rate_keys_per_s"] = round(rate, 1)
            left = s["planned"] - s["done"] - s["failed"]
            s["eta_s"] = round(left / rate, 1) if rate > 0 else None
    s["state"] = plan_state(s, running)
    return s


# ---------------------------------------------------------------- run

def _metrics(result) -> dict:
    out = {}
    try:
        # deferred: Beam takes seconds to load; status and reports import this module without running anything
        from apache_beam.metrics.metric import MetricsFilter

        m = result.metrics().query(MetricsFilter())
        for c in m.get("counters", []):
            out[c.key.metric.name] = out.get(c.key.metric.name, 0) + (c.committed or c.attempted or 0)
        for d in m.get("distributions", []):
            v = d.committed or d.attempted
            if v is not None and v.count:
                out[d.key.metric.name] = {"count": v.count, "sum": v.sum, "min": v.min, "max": v.max}
        for g in m.get("gauges", []):
            v = g.committed or g.attempted
            if v is not None:
                out[g.key.metric.name] = max(out.get(g.key.metric.name, 0), v.value)
    except Exception as e:  # metrics are informative only
        LOG.debug("metrics unavailable: %s", type(e).__name__)
    return out


def find_drift(plan_dir: str, manifest: dict, map_store, chunk: int = 5000) -> dict:
    """Non-terminal plan keys whose current shard is neither source nor target, or
    that were deleted from the map: {group id: [(key, key_hash), ...]}.

    Fast path: where the map store counts cheaply (an index), a map with no row
    above the snapshot's cutoff and as many rows as the snapshot had cannot
    have drifted (CONTRACTS: every write stamps a new, higher version; a
    deletion lowers the count), so no key is looked up.  Otherwise every
    non-terminal key is.  A writer that reuses version numbers (e.g. max + 1
    after deleting the top rows) defeats the fast path, as it defeats
    snapshots and catch-up plans; the swap's compare-and-set still guards
    every key (such keys end Failed(map_changed))."""
    drift: dict = {}
    if _unchanged_since_snapshot(manifest, map_store):
        return drift
    for f in manifest["files"]:
        gid = f["group"]
        with fs.open_input(workdir.move_file(plan_dir, gid)) as fh:
            t = pq.read_table(fh, columns=["key", "key_hash"])
        state = ckpt.read_group(plan_dir, manifest["plan_id"], gid).table
        terminal = set()
        if state.num_rows:
            mask = pc.is_in(state.column("state"), value_set=pa.array([int(S.State.DONE), int(S.State.FAILED)], pa.int8()))
            terminal = set(state.column("key").filter(mask).to_pylist())
        keys = t.column("key").to_pylist()
        hashes = t.column("key_hash").to_pylist()
        todo = [(k, h) for k, h in zip(keys, hashes) if k not in terminal]
        for a in range(0, len(todo), chunk):
            part = todo[a:a + chunk]
            cur = map_store.lookup([k for k, _ in part])
            for k, h in part:
                c = cur.get(k)
                if c is None or c[0] not in (f["source"], f["target"]):
                    drift.setdefault(gid, []).append((k, h))
    return drift


def _unchanged_since_snapshot(manifest: dict, map_store) -> bool:
    snap = manifest.get("snapshot") or {}
    cutoff = snap.get("cutoff")
    if cutoff is None or not getattr(map_store, "cheap_counts", False) or manifest.get("rollback_of"):
        return False
    try:
        return map_store.count_above(int(cutoff)) == 0 and map_store.count() == int(manifest["keys_examined"])
    except Exception:  # noqa: BLE001 - the full check decides
        return False


def _mark_drifted(plan_dir: str, plan_id: str, epoch: int, drift: dict) -> None:
    for gid, items in drift.items():
        w = ckpt.CheckpointWriter(plan_dir, plan_id, gid, epoch)
        w.record_many([k for k, _ in items], np.array([h for _, h in items], dtype=np.uint64),
                      int(S.State.FAILED), 0, S.DRIFTED)
        w.flush()


def _unsafe_lines(cfg: Config) -> list[str]:
    return [f"warning: {o.name} is on: {o.doc}" for o in OPTIONS if o.unsafe and cfg.options.get(o.name)]


def warn_unsafe_options(cfg: Config, stream=None) -> list[str]:
    """One ``warning:`` line on stderr per unsafe option that is on, as a run starts."""
    lines = _unsafe_lines(cfg)
    for line in lines:
        (stream or sys.stderr).write(line + "\n")
    (stream or sys.stderr).flush()
    return lines


def _stderr_line(line: str) -> None:
    sys.stderr.write(line + "\n")


def run_plan(cfg: Config, plan_dir: str, *, retry_failed: bool = False, beam_args: Sequence[str] = (),
             out: Callable[[str], None] = print, install_signals: bool = True,
             allow_drift: bool = False, progress: str = "auto", on_progress: Callable[[dict], object] | None = None,
             cancel: threading.Event | None = None, warn: Callable[[str], None] = _stderr_line) -> RunResult:
    """Run (or resume, or finish) a plan; see the module docstring.  SIGINT/SIGTERM are
    handled for the whole call (:mod:`pipeline.interrupts`): every phase stops with 130.
    ``progress``: how progress shows on stderr (:mod:`shardmove.progress`; auto, bar, text, json, none).
    ``on_progress`` is called with each progress event; ``cancel`` (set from any thread) stops
    the run as a signal does.  ``warn`` gets the preflight's warnings and the unsafe-option
    lines (stderr by default; the API passes its ``out``)."""
    irq = interrupts.install(install_signals)
    finished = threading.Event()
    if cancel is not None:
        def watch():
            while not finished.is_set():
                if cancel.wait(0.1):
                    irq.request_stop()
                    return

        threading.Thread(target=watch, name="cancel", daemon=True).start()
    try:
        return _run_plan(cfg, plan_dir, irq, retry_failed=retry_failed, beam_args=beam_args, out=out,
                         allow_drift=allow_drift, progress_mode=progress, on_event=on_progress, warn=warn)
    finally:
        finished.set()
        irq.restore()


def _run_plan(cfg: Config, plan_dir: str, irq, *, retry_failed: bool, beam_args: Sequence[str],
              out: Callable[[str], None], allow_drift: bool, progress_mode: str = "auto",
              on_event=None, warn: Callable[[str], None] = _stderr_line) -> RunResult:
    # deferred, with the graph: building it loads Beam (seconds); status and reports import this module
    from transforms.runner import dry_run_line, dry_run_stages, is_dry_run, make_pipeline, run_pipeline
    from transforms.execute import ExecSpec, build_run_graph

    pf = preflight(cfg, beam_args, log=warn)  # bad flags, unreachable stores, missing tools: exit 2 now
    display = ProgressDisplay(progress_mode, cfg.opt("progress_log_interval"))  # a bad mode: exit 2 now
    manifest = load_manifest(plan_dir)
    plan_id = manifest["plan_id"]
    out(f"plan id: {plan_id}")
    if manifest["key_type"] != cfg.key_type.value:
        raise BadInput(f"plan key_type {manifest['key_type']} differs from the configuration's {cfg.key_type.value}")
    verify_plan_files(plan_dir, manifest)
    before = summarize(plan_dir, manifest)
    if before["complete"] and not (retry_failed and before["failed"]):
        return _already_complete(cfg, plan_dir, manifest, before, irq, out)

    with before_changes():  # nothing modified yet: a store we cannot use is bad configuration
        map_store = open_map_store(cfg)
        data_store = open_data_store(cfg)
        try:  # every source readable, every target writable, tables in place (transforms.preflight)
            check_stores(manifest, data_store)
        finally:
            data_store.close()
        drift = find_drift(plan_dir, manifest, map_store)
    ndrift = sum(len(v) for v in drift.values())
    if ndrift and not allow_drift:
        raise Refused(f"plan: {ndrift} keys drifted since the plan's snapshot (their current shard is neither "
                      "source nor target, or they were deleted); rerun with --allow-drift to skip them as "
                      "Failed(drifted)")

    def exec_spec(epoch: int, stop_path: str, lease_path: str) -> ExecSpec:
        return ExecSpec(
            plan_dir=plan_dir,
            plan_id=plan_id,
            epoch=epoch,
            key_type=cfg.key_type,
            map_store=dict(cfg.map_store),
            data_store=dict(cfg.data_store),
            options=cfg.run_options,
            groups=tuple((f["group"], f["rows"]) for f in manifest["files"]),
            retry_failed=retry_failed,
            faults=validate_faults(cfg.faults),
            stop_path=stop_path,
            lease_path=lease_path,
        )

    args = pf.args
    if is_dry_run(args):  # only translate the job (Dataflow --dry_run): no lease, no claim, nothing modified
        for w in pf.warnings:
            out(w)
        p = make_pipeline(args)
        build_run_graph(p, exec_spec(before["max_epoch"] + 1, "", ""))
        out(dry_run_line(dry_run_stages(run_pipeline(p)) or []))
        return RunResult(plan_id, before, 0)

    stop_path = workdir.stop_path(plan_dir)
    halt_path = workdir.halt_path(plan_dir)
    if irq.interrupted:  # a cancel before the lease (a signal raises on its own): nothing was modified
        raise Interrupted("interrupted before the run took its lease; nothing was modified")
    # from here on a signal never raises: the run gives back what it holds, then exits 130
    irq.deferred = True
    lease = acquire(plan_dir, plan_id, cfg.opt("lease_ttl"), min_epoch=before["max_epoch"])
    claimed = False
    for line in _unsafe_lines(cfg):
        warn(line)
    renew_claim = None
    claim_store = None
    progress = None
    try:
        display.__enter__()  # in bar mode, other writes to the terminal clear and redraw the bar
        if isinstance(map_store, RunRegistry):
            claim_window(map_store, cfg, manifest, lease)
            claimed = True
            claim_store = open_map_store(cfg)  # its own connection for the renewal thread

            def renew_claim():
                claim_store.renew_run(plan_id, lease.epoch, cfg.opt("lease_ttl"), time.time())
        fs.remove(stop_path)
        fs.remove(halt_path)  # a finding of an earlier run: this run looks again
        irq.stop_path = stop_path
        if irq.interrupted:  # a signal while taking the lease: the DoFns must see it too
            irq.write_stop_marker()
        if ndrift:
            _mark_drifted(plan_dir, plan_id, lease.epoch, drift)
            out(f"drift: {ndrift} keys skipped as Failed(drifted)")
        lease.start_renewing(also=renew_claim)
        hold_point("lease", lambda: irq.interrupted)
        progress = _Progress(plan_dir, plan_id, lease.epoch, _base_counts(before), before["planned"],
                             cfg.opt("progress_interval"), display, on_event=on_event)
        t0 = time.time()
        metrics = {}
        if not irq.interrupted:  # stopped before the pipeline started: nothing to stop
            spec = exec_spec(lease.epoch, stop_path, workdir.lease_path(plan_dir))
            progress.start()
            p = make_pipeline(args)
            build_run_graph(p, spec)
            try:
                result = run_pipeline(p)
            except BaseException as e:
                # the run failed (or lost its lease): keep every checkpoint; the claims go below
                if isinstance(e, LeaseLost) or lease.lost:
                    raise LeaseLost(f"plan {plan_id[:12]}: this executor's lease (epoch {lease.epoch}) was "
                                    "taken over; it stopped without applying anything more") from e
                raise
            finally:
                progress.stop()
            metrics = _metrics(result)
        elapsed = time.time() - t0
        # the final phase: a signal stops the compaction between groups; the summary is written
        summary = summarize(plan_dir, manifest, compact=True, should_stop=lambda: irq.interrupted,
                            epoch=lease.epoch)
        summary.update(_run_figures(plan_dir, summary, before, elapsed, metrics, progress.timings))
        hold_point("summary", lambda: irq.interrupted)
        _write_summary(plan_dir, summary)
        if progress.timings:
            fs.create_if_absent(workdir.progress_path(plan_dir, f"timings-{lease.epoch:06d}.json"),
                                json.dumps(progress.timings).encode())
        progress.event(exact={"copied": _base_counts(summary)["copied"], "verified": _base_counts(summary)["verified"],
                              "swapped": summary["done"], "failed": summary["failed"]})
        halt = workdir.read_json(halt_path)
        stopped = irq.interrupted or fs.exists(stop_path)
    finally:
        # whatever happened (success, failure, a signal in any phase): give back the claim and
        # the lease; every committed checkpoint stays
        display.close()
        _release(map_store if claimed else None, plan_id, lease)
        if claim_store is not None:  # the renewal thread's own connection (the lease has stopped it)
            try:
                claim_store.close()
            except Exception as e:  # noqa: BLE001 - closing is tidying up
                LOG.debug("claim store not closed: %s", type(e).__name__)
        fs.remove(stop_path)
        fs.remove(halt_path)
    for reason, n in summary["failures_by_reason"].items():
        out(f"failed[{reason}]: {n}")
    for method, n in summary["done_by_verification"].items():
        out(f"done_by_verification[{method}]: {n}")
    out(f"elapsed: {summary['elapsed_s']:.1f}s keys_per_s: {summary['keys_per_s']:.0f} "
        f"retries: {summary['retries_this_run']}")
    out(summary_line(summary))
    if halt:
        raise RunHalted(f"the run stopped on a configuration error: {halt.get('message')}; no key was failed "
                        "for it, checkpoints are flushed and the lease released: fix it, then rerun to resume")
    if stopped:
        out("interrupted: checkpoints flushed; rerun to resume" if not summary["complete"] else
            "interrupted: checkpoints flushed; the plan is complete (a rerun finishes what is left)")
        return RunResult(plan_id, summary, 130, interrupted=True, metrics=metrics)
    if not summary["complete"]:
        code = 1  # the pipeline ended without finishing every key: a bug
        LOG.error("run ended with %d keys not terminal", summary["planned"] - summary["done"] - summary["failed"])
        return RunResult(plan_id, summary, code, metrics=metrics)
    return RunResult(plan_id, summary, 3 if summary["failed"] else 0, metrics=metrics)


def _release(map_store, plan_id: str, lease) -> None:
    """Give back the map-store claim (if taken) and the lease; each is tried even if the
    other fails, and a failure to release never hides the run's outcome."""
    _release_claim(map_store, plan_id, lease)
    try:
        lease.release()
    except Exception as e:  # noqa: BLE001 - the lease then expires after lease_ttl
        LOG.warning("lease not released (%s); it expires after lease_ttl", type(e).__name__)


def _release_claim(map_store, plan_id: str, lease, level: int = logging.WARNING) -> None:
    """Give back the map-store claim of ``lease``'s epoch (if ``map_store`` has a registry);
    a failure is logged at ``level``, never raised: the claim then expires after lease_ttl."""
    if isinstance(map_store, RunRegistry):
        try:
            map_store.release_run(plan_id, lease.epoch)
        except Exception as e:  # noqa: BLE001 - the claim then expires after lease_ttl
            LOG.log(level, "run claim not released (%s); it expires after lease_ttl", type(e).__name__)


def _run_figures(plan_dir: str, summary: dict, before: dict, elapsed: float, metrics: dict,
                 timings: list) -> dict:
    """This run's figures, added to the summary (totals carried over from summary.json)."""
    prev = workdir.read_summary(plan_dir) or {}
    # the keys this run finished: with --retry-failed a Failed key that ends Done leaves the
    # totals' done + failed unchanged, so the totals' difference would say 0
    processed = summary.pop("finished_this_run", None)
    if processed is None:
        processed = (summary["done"] + summary["failed"]) - (before["done"] + before["failed"])
    return {
        "elapsed_s": round(elapsed, 3),
        "total_elapsed_s": round(prev.get("total_elapsed_s", 0) + elapsed, 3),
        "keys_per_s": round(processed / elapsed, 1) if elapsed > 0 else 0.0,
        "runs": int(prev.get("runs", 0)) + 1,
        "retries_this_run": int(metrics.get("retries", 0)),
        "throttled_s": round(metrics.get("throttled_ms", 0) / 1000.0, 3),
        "metrics_this_run": metrics,
        "timings": _timing_stats(timings),
    }


def _write_summary(plan_dir: str, summary: dict) -> None:
    workdir.write_summary(plan_dir, summary)


_COUNTED = ("planned", "done", "failed", "states", "failures_by_reason", "done_by_verification")


def _finished(plan_dir: str, before: dict) -> bool:
    """A complete plan is finished when its summary.json holds its final counts and no
    readable checkpoint part is left uncompacted (unreadable parts stay, by design)."""
    saved = workdir.read_summary(plan_dir)
    if not saved or any(saved.get(k) != before[k] for k in _COUNTED):
        return False
    parts = [p for p in fs.walk_files(ckpt.checkpoints_dir(plan_dir))
             if p.rsplit("/", 1)[-1].startswith("part-")]
    return len(parts) <= before["skipped_checkpoint_files"]


def claim_window(map_store, cfg: Config, manifest: dict, lease) -> None:
    """Claim the plan's window on ``map_store``'s run registry under ``lease``'s epoch, held
    by this process (the claim rule, :mod:`pipeline.stores.claims`: a newer epoch of the
    same plan supersedes its older claim; a live, overlapping other plan refuses)."""
    map_store.claim_run(manifest["plan_id"], lease.epoch, _window_range(manifest),
                        f"{socket.gethostname()}:{os.getpid()}", cfg.opt("lease_ttl"), time.time())


def open_claim(cfg: Config, manifest: dict, lease):
    """A map store of its own with the plan's window claimed under ``lease``'s epoch
    (:func:`claim_window`), or None when the map store has no run registry; raises what
    the claim raises, the store then closed."""
    map_store = open_map_store(cfg)
    if not isinstance(map_store, RunRegistry):
        _close_store(map_store)
        return None
    try:
        claim_window(map_store, cfg, manifest, lease)
    except BaseException:
        _close_store(map_store)
        raise
    return map_store


def _close_store(store) -> None:
    close = getattr(store, "close", None)
    if close is not None:
        close()


def _supersede_claim(cfg: Config, manifest: dict, lease):
    """Claim the run on the map store with this lease's (newer) epoch, which supersedes the
    claim a killed run left live, so that releasing it frees the map at once; the map store
    (to release it with), or None when there is no registry or another plan holds it."""
    try:
        return open_claim(cfg, manifest, lease)
    except Exception as e:  # noqa: BLE001 - a claim left by a killed run then expires after lease_ttl
        LOG.info("run claim not superseded (%s)", type(e).__name__)
        return None


def free_stale_claim(cfg: Config, manifest: dict, lease) -> None:
    """Before another plan runs under this plan's lease (its rollback): a killed run of
    this plan may have left its claim on the map store live for up to ``lease_ttl``,
    refusing every plan whose window overlaps.  This lease's newer epoch supersedes that
    claim, and releasing it frees the map at once; the lease itself is kept."""
    store = _supersede_claim(cfg, manifest, lease)
    if store is None:
        return
    try:
        _release_claim(store, manifest["plan_id"], lease, logging.INFO)
    finally:
        _close_store(store)


def _already_complete(cfg: Config, plan_dir: str, manifest: dict, before: dict, irq,
                      out: Callable[[str], None]) -> RunResult:
    """A complete plan: nothing to run.  If the run that completed it was killed before
    its final phase, finish that phase now (compaction, summary.json) under the lease."""
    plan_id = manifest["plan_id"]
    summary = before
    if not _finished(plan_dir, before):
        irq.deferred = True
        try:
            lease = acquire(plan_dir, plan_id, cfg.opt("lease_ttl"), min_epoch=before["max_epoch"])
        except Refused:  # a live executor holds the plan: it finishes the final phase itself
            lease = None
        if lease is not None:
            claim_store = _supersede_claim(cfg, manifest, lease)
            try:
                summary = summarize(plan_dir, manifest, compact=True, should_stop=lambda: irq.interrupted)
                summary.update(_run_figures(plan_dir, summary, summary, 0.0, {}, []))
                hold_point("summary", lambda: irq.interrupted)
                _write_summary(plan_dir, summary)
                LOG.info("plan %s: summary written and checkpoints compacted (its last run stopped before)",
                         plan_id[:12])
            finally:
                _release(claim_store, plan_id, lease)
    out("nothing to do: plan already complete")
    out(summary_line(summary))
    if irq.interrupted:
        out("interrupted: the plan is complete (a rerun finishes what is left)")
        return RunResult(plan_id, summary, 130, nothing_to_do=True, interrupted=True)
    return RunResult(plan_id, summary, 3 if summary["failed"] else 0, nothing_to_do=True)


def _window_range(manifest: dict) -> tuple[int, int]:
    return parse_window(manifest.get("window")) or (0, 255)


def _timing_stats(timings: list) -> dict:
    out = {}
    for stage in ("copy", "verify", "swap", "fence"):
        ms = np.array([t[1] for t in timings if t and t[0] == stage], dtype=float)
        if len(ms):
            out[stage] = {
                "calls": int(len(ms)),
                "p50_ms": round(float(np.percentile(ms, 50)), 3),
                "p95_ms": round(float(np.percentile(ms, 95)), 3),
                "max_ms": round(float(ms.max()), 3),
            }
    return out
