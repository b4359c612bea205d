"""Running a plan: the launcher around the Beam executor graph.

``run_plan`` checks the plan files, reads the merged checkpoint state (so a
complete plan is reported without starting Beam), takes the lease (which
gives the run its epoch), installs graceful SIGINT/SIGTERM handling (a stop
marker the DoFns honour: they flush checkpoints and stop; exit 130), runs
``transforms/execute.py``, compacts checkpoints, and writes ``summary.json``
from the checkpoints -- so the totals of a finished plan are the same however
many times it was interrupted.  Progress events are derived from committed
checkpoint parts, at most one per ``progress_interval`` plus a final one.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import checkpoint as ckpt
from pipeline import fs
from pipeline import states as S
from pipeline.config import Config
from pipeline.errors import BadInput, Refused
from pipeline.planner import load_manifest

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
        path = fs.join(plan_dir, "moves", f["group"] + ".parquet")
        try:
            data = fs.read_bytes(path)
        except OSError:
            bad += 1
            continue
        if hashlib.sha256(data).hexdigest() != f["sha256"]:
            bad += 1
    if bad:
        raise BadInput(f"plan: {bad} of {len(manifest['files'])} move files are missing or damaged")


def summarize(plan_dir: str, manifest: dict, *, compact: bool = False) -> dict:
    """Totals from the merged checkpoints (exact, however many runs it took)."""
    plan_id = manifest["plan_id"]
    counts = {st.name.lower(): 0 for st in S.State}
    reasons: dict = {}
    methods: dict = {}
    attempts = 0
    max_epoch = 0
    seen = 0
    skipped = 0
    for f in manifest["files"]:
        gid = f["group"]
        if compact:
            try:
                ckpt.compact_group(plan_dir, plan_id, gid)
            except ckpt.CheckpointError:
                raise
            except Exception as e:  # compaction is an optimisation; reading still works
                LOG.warning("checkpoint compaction of a group failed (%s); continuing", type(e).__name__)
        g = ckpt.read_group(plan_dir, plan_id, gid)
        skipped += len(g.skipped)
        t = g.table
        seen += t.num_rows
        if t.num_rows == 0:
            continue
        st = t.column("state").to_numpy(zero_copy_only=False)
        for rank, n in zip(*_unique(st)):
            counts[S.State(int(rank)).name.lower()] += int(n)
        failed = pc.equal(t.column("state"), int(S.State.FAILED))
        if pc.any(failed).as_py():
            for r, n in _value_counts(t.column("reason").filter(failed)):
                reasons[r or "unknown"] = reasons.get(r or "unknown", 0) + n
        done = pc.equal(t.column("state"), int(S.State.DONE))
        if pc.any(done).as_py():
            for m, n in _value_counts(t.column("verify_method").filter(done)):
                methods[m or "unknown"] = methods.get(m or "unknown", 0) + n
        attempts += int(pc.sum(t.column("attempts")).as_py() or 0)
        max_epoch = max(max_epoch, int(pc.max(t.column("epoch")).as_py() or 0))
    planned = int(manifest["moves"])
    counts["planned"] += planned - seen  # keys with no checkpoint yet
    done = counts["done"]
    failed = counts["failed"]
    return {
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


def _unique(a):
    import numpy as np

    return np.unique(a, return_counts=True)


def _value_counts(col):
    vc = pc.value_counts(col)
    return [(v["values"].as_py(), v["counts"].as_py()) for v in vc]


def status_exit_code(summary: dict) -> int:
    if not summary["complete"]:
        return 5
    return 3 if summary["failed"] else 0


def plan_status(plan_dir: str) -> dict:
    manifest = load_manifest(plan_dir)
    s = summarize(plan_dir, manifest)
    prev = _read_json(fs.join(plan_dir, "summary.json"))
    if prev:
        for k in ("elapsed_s", "keys_per_s", "runs"):
            if k in prev:
                s[k] = prev[k]
    rate = _recent_rate(plan_dir)
    if rate is not None and not s["complete"]:
        s["rate_keys_per_s"] = round(rate, 1)
        left = s["planned"] - s["done"] - s["failed"]
        s["eta_s"] = round(left / rate, 1) if rate > 0 else None
    from pipeline.lease import read_lease

    lease = read_lease(plan_dir)
    if lease and not lease.get("released") and lease.get("expires_at", 0) > time.time():
        h = lease.get("holder") or {}
        s["lease"] = {"host": h.get("host"), "pid": h.get("pid"), "epoch": lease.get("epoch"),
                      "expires_at": lease.get("expires_at")}
    return s


def _recent_rate(plan_dir: str, window: int = 30):
    """Keys finished per second over the latest progress events (None without events)."""
    d = fs.join(plan_dir, "progress")
    names = [n for n in fs.listdir(d) if n.endswith(".json") and not n.startswith("timings")]
    if len(names) < 2:
        return None
    evs = [_read_json(fs.join(d, n)) for n in names[-window:]]
    evs = [e for e in evs if e]
    if len(evs) < 2 or evs[-1].get("epoch") != evs[0].get("epoch"):
        evs = [e for e in evs if e.get("epoch") == evs[-1].get("epoch")]
    if len(evs) < 2:
        return None
    dt = evs[-1]["elapsed_s"] - evs[0]["elapsed_s"]
    dk = (evs[-1]["swapped"] + evs[-1]["failed"]) - (evs[0]["swapped"] + evs[0]["failed"])
    return dk / dt if dt > 0 else None


def _read_json(path: str):
    try:
        return json.loads(fs.read_bytes(path)) if fs.exists(path) else None
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------- progress

class _Progress:
    """Derives progress events from committed checkpoint parts (this epoch)."""

    def __init__(self, plan_dir: str, plan_id: str, epoch: int, base: dict, total: int, interval: float,
                 tty: bool):
        self.plan_dir, self.plan_id, self.epoch = plan_dir, plan_id, epoch
        self.total = total
        self.interval = interval
        self.tty = tty
        self.seen: set = set()
        self.base = base
        self.delta = {"copied": 0, "verified": 0, "swapped": 0, "failed": 0}
        self.active = {"copy": 0, "verify": 0}
        self.timings: list = []
        self.seq = 0
        self.t0 = time.time()
        self._stop = threading.Event()
        self._thread = None
        self.events: list = []

    def _scan(self):
        root = fs.join(self.plan_dir, "checkpoints")
        prefix = f"part-{self.epoch:08d}-"
        for path in fs.walk_files(root):
            name = path.rsplit("/", 1)[-1]
            if not name.startswith(prefix) or path in self.seen:
                continue
            self.seen.add(path)
            try:  # the footer only: parts carry their rows per state
                meta = ckpt.read_file_metadata(path)
                counts = {int(r): int(n) for r, n in json.loads(meta["state_counts"]).items()}
            except (KeyError, ValueError, ckpt.UnreadablePart):
                try:  # a part without state_counts: read its rows
                    table, meta = ckpt.parse_part(fs.read_bytes(path))
                except Exception:
                    continue
                ranks, ns = np.unique(table.column("state").to_numpy(zero_copy_only=False), return_counts=True)
                counts = {int(r): int(n) for r, n in zip(ranks, ns)}
            except Exception:
                continue
            self.delta["copied"] += counts.get(int(S.State.COPIED), 0)
            self.delta["verified"] += counts.get(int(S.State.VERIFIED), 0)
            self.delta["swapped"] += counts.get(int(S.State.DONE), 0)
            self.delta["failed"] += counts.get(int(S.State.FAILED), 0)
            stage = meta.get("stage")
            if stage in self.active:
                try:  # the highest in-flight count reported since the last event
                    self.active[stage] = max(self.active[stage], int(meta.get(f"active_{stage}", 0)))
                except ValueError:
                    pass
            try:
                self.timings.extend(json.loads(meta.get("timings", "[]")))
            except ValueError:
                pass

    def event(self, exact: dict | None = None) -> dict:
        if exact is not None:
            counts = exact
        else:
            b = self.base
            counts = {
                "copied": min(self.total, b["copied"] + self.delta["copied"]),
                "verified": min(self.total, b["verified"] + self.delta["verified"]),
                "swapped": min(self.total, b["swapped"] + self.delta["swapped"]),
                "failed": min(self.total, b["failed"] + self.delta["failed"]),
            }
        ev = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "elapsed_s": round(time.time() - self.t0, 3),
            "plan_id": self.plan_id,
            "epoch": self.epoch,
            "total": self.total,
            **counts,
            "active_copy": 0 if exact is not None else self.active["copy"],
            "active_verify": 0 if exact is not None else self.active["verify"],
            "final": exact is not None,
        }
        self.active = {"copy": 0, "verify": 0}
        self.seq += 1
        name = f"{self.epoch:06d}-{self.seq:06d}.json"
        try:
            fs.create_if_absent(fs.join(self.plan_dir, "progress", name), json.dumps(ev, sort_keys=True).encode())
        except Exception as e:  # progress is best effort
            LOG.debug("progress event not written: %s", type(e).__name__)
        self.events.append(ev)
        if self.tty:
            self._bar(ev)
        return ev

    def _bar(self, ev):
        done = ev["swapped"] + ev["failed"]
        el = max(1e-6, ev["elapsed_s"])
        rate = (done - self.base["swapped"] - self.base["failed"]) / el
        left = self.total - done
        eta = f"{left / rate:.0f}s" if rate > 0 else "?"
        width = 30
        frac = done / self.total if self.total else 1.0
        bar = "#" * int(width * frac) + "-" * (width - int(width * frac))
        sys.stderr.write(f"\r[{bar}] {done}/{self.total} copied={ev['copied']} verified={ev['verified']} "
                         f"failed={ev['failed']} {rate:.0f} keys/s ETA {eta}   ")
        if ev["final"]:
            sys.stderr.write("\n")
        sys.stderr.flush()

    def start(self):
        def loop():
            while not self._stop.wait(self.interval):
                try:
                    self._scan()
                    self.event()
                except Exception as e:  # never kill the run for progress
                    LOG.debug("progress scan failed: %s", type(e).__name__)

        self._thread = threading.Thread(target=loop, name="progress", daemon=True)
        self._thread.start()

    def stop(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:  # one last event from the parts committed since the previous one
            self._scan()
            if self.seen:
                self.event()
        except Exception:
            pass


def _base_counts(summary: dict) -> dict:
    st = summary["states"]
    return {
        "copied": st["copied"] + st["verifying"] + st["verified"] + st["swapping"] + st["done"],
        "verified": st["verified"] + st["swapping"] + st["done"],
        "swapped": st["done"],
        "failed": st["failed"],
    }


# ---------------------------------------------------------------- run

def _metrics(result) -> dict:
    out = {}
    try:
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


def check_shards(cfg: Config, manifest: dict, data_store) -> None:
    """Every source shard of the plan must exist in the data store (exit 2 otherwise)."""
    if data_store is None or not hasattr(data_store, "shard_exists"):
        return
    missing = sorted({p["source"] for p in manifest["pairs"] if not data_store.shard_exists(p["source"])})
    if missing:
        raise BadInput(f"data store: {len(missing)} source shards of the plan do not exist ({', '.join(missing[:3])})")


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
    import pyarrow.parquet as pq

    drift: dict = {}
    if _unchanged_since_snapshot(manifest, map_store):
        return drift
    for f in manifest["files"]:
        gid = f["group"]
        with fs.open_input(fs.join(plan_dir, "moves", gid + ".parquet")) as fh:
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
    import numpy as np

    for gid, items in drift.items():
        w = ckpt.CheckpointWriter(plan_dir, plan_id, gid, epoch)
        w.record_many([k for k, _ in items], np.array([h for _, h in items], dtype=np.uint64),
                      int(S.State.FAILED), 0, S.DRIFTED)
        w.flush()


def _stderr_line(line: str) -> None:
    sys.stderr.write(line + "\n")


def run_plan(cfg: Config, plan_dir: str, *, retry_failed: bool = False, beam_args: Sequence[str] = (),
             out: Callable[[str], None] = print, install_signals: bool = True,
             allow_drift: bool = False) -> RunResult:
    from pipeline.lease import acquire
    from pipeline.preflight import preflight
    from pipeline.runner import dry_run_line, dry_run_stages, is_dry_run, make_pipeline, run_pipeline
    from transforms.execute import ExecSpec, build_run_graph

    pf = preflight(cfg, beam_args, log=_stderr_line)  # bad flags, unreachable stores, missing tools: exit 2 now
    manifest = load_manifest(plan_dir)
    plan_id = manifest["plan_id"]
    out(f"plan id: {plan_id}")
    if manifest["key_type"] != cfg.key_type.value:
        raise BadInput(f"plan key_type {manifest['key_type']} differs from the configuration's {cfg.key_type.value}")
    verify_plan_files(plan_dir, manifest)
    before = summarize(plan_dir, manifest)
    if before["complete"] and not (retry_failed and before["failed"]):
        out("nothing to do: plan already complete")
        out(summary_line(before))
        return RunResult(plan_id, before, 3 if before["failed"] else 0, nothing_to_do=True)

    from pipeline.backends import open_data_store, open_map_store

    map_store = open_map_store(cfg)
    check_shards(cfg, manifest, open_data_store(cfg))
    drift = find_drift(plan_dir, manifest, map_store)
    ndrift = sum(len(v) for v in drift.values())
    if ndrift and not allow_drift:
        raise Refused(f"plan: {ndrift} keys drifted since the plan's snapshot (their current shard is neither "
                      "source nor target, or they were deleted); rerun with --allow-drift to skip them as "
                      "Failed(drifted)")

    def exec_spec(epoch: int, stop_path: str, lease_path: str) -> ExecSpec:
        from pipeline.faults import validate_faults

        return ExecSpec(
            plan_dir=plan_dir,
            plan_id=plan_id,
            epoch=epoch,
            key_type=cfg.key_type,
            map_store=dict(cfg.map_store),
            data_store=dict(cfg.data_store),
            options=dict(cfg.options),
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

    lease = acquire(plan_dir, plan_id, cfg.opt("lease_ttl"), min_epoch=before["max_epoch"])
    renew_claim = None
    if hasattr(map_store, "claim_run"):
        import socket

        window = _window_range(manifest)
        try:
            map_store.claim_run(plan_id, lease.epoch, window, f"{socket.gethostname()}:{os.getpid()}",
                                cfg.opt("lease_ttl"), time.time())
        except BaseException:
            lease.release()
            raise
        claim_store = open_map_store(cfg)  # its own connection for the renewal thread

        def renew_claim():
            claim_store.renew_run(plan_id, lease.epoch, cfg.opt("lease_ttl"), time.time())
    if ndrift:
        _mark_drifted(plan_dir, plan_id, lease.epoch, drift)
        out(f"drift: {ndrift} keys skipped as Failed(drifted)")
    stop_path = fs.join(plan_dir, "stop")
    fs.remove(stop_path)
    interrupted = {"flag": False}
    old_handlers = {}

    def on_signal(signum, _frame):
        interrupted["flag"] = True
        try:
            fs.write_atomic(stop_path, b"stop\n")
        except Exception:
            pass
        # a second signal stops at once
        signal.signal(signum, old_handlers.get(signum) or signal.SIG_DFL)

    if install_signals and threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            old_handlers[sig] = signal.getsignal(sig)
            signal.signal(sig, on_signal)
    lease.start_renewing(also=renew_claim)
    progress = _Progress(plan_dir, plan_id, lease.epoch, _base_counts(before), before["planned"],
                         cfg.opt("progress_interval"), sys.stderr.isatty())
    t0 = time.time()
    metrics = {}
    try:
        spec = exec_spec(lease.epoch, stop_path, fs.join(plan_dir, "lease.json"))
        progress.start()
        p = make_pipeline(args)
        build_run_graph(p, spec)
        result = run_pipeline(p)
        metrics = _metrics(result)
    except BaseException as e:
        # the run failed (or lost its lease): give up our claims, keep every checkpoint
        for release in (lambda: map_store.release_run(plan_id, lease.epoch) if hasattr(map_store, "release_run")
                        else None, lease.release):
            try:
                release()
            except Exception:
                pass
        fs.remove(stop_path)
        from pipeline.lease import LeaseLost

        if isinstance(e, LeaseLost) or lease.lost:
            raise LeaseLost(f"plan {plan_id[:12]}: this executor's lease (epoch {lease.epoch}) was taken over; "
                            "it stopped without applying anything more") from e
        raise
    finally:
        progress.stop()
        for sig, h in old_handlers.items():
            signal.signal(sig, h)
    elapsed = time.time() - t0
    summary = summarize(plan_dir, manifest, compact=True)
    prev = _read_json(fs.join(plan_dir, "summary.json")) or {}
    summary["elapsed_s"] = round(elapsed, 3)
    summary["total_elapsed_s"] = round(prev.get("total_elapsed_s", 0) + elapsed, 3)
    processed = (summary["done"] + summary["failed"]) - (before["done"] + before["failed"])
    summary["keys_per_s"] = round(processed / elapsed, 1) if elapsed > 0 else 0.0
    summary["runs"] = int(prev.get("runs", 0)) + 1
    summary["retries_this_run"] = int(metrics.get("retries", 0))
    summary["throttled_s"] = round(metrics.get("throttled_ms", 0) / 1000.0, 3)
    summary["metrics_this_run"] = metrics
    summary["timings"] = _timing_stats(progress.timings)
    fs.write_atomic(fs.join(plan_dir, "summary.json"), json.dumps(summary, indent=1, sort_keys=True).encode())
    if progress.timings:
        fs.create_if_absent(fs.join(plan_dir, "progress", f"timings-{lease.epoch:06d}.json"),
                            json.dumps(progress.timings).encode())
    progress.event(exact={"copied": _base_counts(summary)["copied"], "verified": _base_counts(summary)["verified"],
                          "swapped": summary["done"], "failed": summary["failed"]})
    stopped = interrupted["flag"] or fs.exists(stop_path)
    fs.remove(stop_path)
    if hasattr(map_store, "release_run"):
        map_store.release_run(plan_id, lease.epoch)
    lease.release()
    for reason, n in summary["failures_by_reason"].items():
        out(f"failed[{reason}]: {n}")
    for method, n in summary["done_by_verification"].items():
        out(f"done_by_verification[{method}]: {n}")
    out(f"elapsed: {summary['elapsed_s']:.1f}s keys_per_s: {summary['keys_per_s']:.0f} "
        f"retries: {summary['retries_this_run']}")
    out(summary_line(summary))
    if stopped and not summary["complete"]:
        out("interrupted: checkpoints flushed; rerun to resume")
        return RunResult(plan_id, summary, 130, interrupted=True, metrics=metrics)
    if not summary["complete"]:
        code = 1  # the pipeline ended without finishing every key: a bug
        LOG.error("run ended with %d keys not terminal", summary["planned"] - summary["done"] - summary["failed"])
        return RunResult(plan_id, summary, code, metrics=metrics)
    return RunResult(plan_id, summary, 3 if summary["failed"] else 0, metrics=metrics)


def _window_range(manifest: dict) -> tuple[int, int]:
    from pipeline.config import parse_window

    return parse_window(manifest.get("window")) or (0, 255)


def _timing_stats(timings: list) -> dict:
    import numpy as np

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
