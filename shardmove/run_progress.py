"""A run's progress, derived from the plan's files (the display is :mod:`shardmove.progress`).

While ``run`` goes, :class:`_Progress` reads the footers of the checkpoint
parts this epoch commits (their rows per state), counts cumulatively (the
counts before the run plus this epoch's parts), writes one progress event per
``progress_interval`` (plus a final one) under the plan's ``progress/`` folder,
and hands the counts to a :class:`~shardmove.progress.ProgressDisplay`.
``plan_status`` (:mod:`shardmove.executor`) uses :func:`cumulative_counts`,
:func:`pair_progress` (per (source, target) pair and per shard) and
:func:`_recent_rate` (keys per second over the latest events).  Never a key.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from typing import Callable

import numpy as np

from pipeline import checkpoint as ckpt
from pipeline import fs
from pipeline import states as S
from pipeline import workdir
from shardmove.progress import run_fields

__all__ = ["cumulative_counts", "pair_progress"]

LOG = logging.getLogger("shardmove.run")


def cumulative_counts(states: dict) -> dict:
    """Keys that have been copied, verified, swapped or failed, in any run (what the bar shows),
    from the keys' current states."""
    return {
        "copied": sum(states.get(n, 0) for n in ("copied", "verifying", "verified", "swapping", "done")),
        "verified": sum(states.get(n, 0) for n in ("verified", "swapping", "done")),
        "swapped": states.get("done", 0),
        "failed": states.get("failed", 0),
    }


def pair_progress(manifest: dict, by_group: dict) -> tuple[list, list]:
    """Progress per (source, target) pair and per shard, like Citus' ``get_rebalance_progress()``:
    ``pairs`` rows (source, target, planned, copied, done, failed, remaining, progress: not started |
    moving | done) and ``shards`` rows (keys out of and into each shard: planned, done, failed,
    remaining)."""
    pairs: dict = {}
    for f in manifest["files"]:
        p = pairs.setdefault((f.get("source", "?"), f.get("target", "?")), {"planned": 0, "states": {}})
        p["planned"] += int(f["rows"])
        for name, n in by_group.get(f["group"], {}).items():
            p["states"][name] = p["states"].get(name, 0) + n
    rows = []
    shards: dict = {}
    for (src, tgt), p in sorted(pairs.items(), key=lambda kv: (kv[0][0].encode(), kv[0][1].encode())):
        c = cumulative_counts(p["states"])
        done, failed = c["swapped"], c["failed"]
        remaining = p["planned"] - done - failed
        touched = sum(p["states"].values()) - p["states"].get("planned", 0)
        rows.append({"source": src, "target": tgt, "planned": p["planned"], "copied": c["copied"], "done": done,
                     "failed": failed, "remaining": remaining,
                     "progress": "done" if remaining == 0 else ("moving" if touched else "not started")})
        for shard, way in ((src, "out"), (tgt, "in")):
            sh = shards.setdefault(shard, {"shard": shard, **{f"{w}_{k}": 0 for w in ("out", "in")
                                                              for k in ("planned", "done", "failed", "remaining")}})
            sh[f"{way}_planned"] += p["planned"]
            sh[f"{way}_done"] += done
            sh[f"{way}_failed"] += failed
            sh[f"{way}_remaining"] += remaining
    return rows, [shards[k] for k in sorted(shards, key=lambda x: x.encode())]


def _recent_rate(plan_dir: str, window: int = 30):
    """Keys finished per second over the latest progress events (None without events)."""
    d = workdir.progress_dir(plan_dir)
    names = [n for n in fs.listdir(d) if n.endswith(".json") and not n.startswith("timings")]
    if len(names) < 2:
        return None
    evs = [workdir.read_json(fs.join(d, n)) for n in names[-window:]]
    evs = [e for e in evs if e]
    if len(evs) < 2 or evs[-1].get("epoch") != evs[0].get("epoch"):
        evs = [e for e in evs if e.get("epoch") == evs[-1].get("epoch")]
    if len(evs) < 2:
        return None
    dt = evs[-1]["elapsed_s"] - evs[0]["elapsed_s"]
    dk = (evs[-1]["swapped"] + evs[-1]["failed"]) - (evs[0]["swapped"] + evs[0]["failed"])
    return dk / dt if dt > 0 else None



class _Progress:
    """Derives progress events from committed checkpoint parts (this epoch)."""

    def __init__(self, plan_dir: str, plan_id: str, epoch: int, base: dict, total: int, interval: float,
                 display=None, on_event: Callable[[dict], object] | None = None):
        self.plan_dir, self.plan_id, self.epoch = plan_dir, plan_id, epoch
        self.total = total
        self.interval = interval
        self.display = display  # shardmove.progress.ProgressDisplay: bar, lines or nothing
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
        self.on_event = on_event

    def _scan(self):
        root = workdir.checkpoints_dir(self.plan_dir)
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

    def _counts(self) -> dict:
        """Cumulative counts (every epoch): the counts before this run plus this epoch's parts."""
        b = self.base
        return {name: min(self.total, b[name] + self.delta[name])
                for name in ("copied", "verified", "swapped", "failed")}

    def _show(self, counts: dict, final: bool = False) -> None:
        if self.display is None:
            return
        done_this_run = counts["swapped"] + counts["failed"] - self.base["swapped"] - self.base["failed"]
        self.display.show(run_fields(plan_id=self.plan_id, total=self.total, done_this_run=max(0, done_this_run),
                                     elapsed_s=time.time() - self.t0, **counts), final=final)

    def event(self, exact: dict | None = None) -> dict:
        counts = exact if exact is not None else self._counts()
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
            fs.create_if_absent(workdir.progress_path(self.plan_dir, name), json.dumps(ev, sort_keys=True).encode())
        except Exception as e:  # progress is best effort
            LOG.debug("progress event not written: %s", type(e).__name__)
        self.events.append(ev)
        self._show(counts, final=exact is not None)
        if self.on_event is not None:
            try:  # the API's progress callback: its failure never stops the run
                self.on_event(dict(ev))
            except Exception as e:  # noqa: BLE001
                LOG.warning("progress callback failed (%s); the run goes on", type(e).__name__)
        return ev

    def start(self):
        # events at most one per progress_interval; progress lines (text, json) keep their own
        # interval, so the loop ticks at the shorter of the two
        line_tick = self.display.tick if self.display is not None else None
        tick = min(self.interval, line_tick) if line_tick else self.interval

        def loop():
            last_event = time.monotonic()
            while not self._stop.wait(tick):
                try:
                    self._scan()
                    if time.monotonic() - last_event >= self.interval - 1e-3:
                        last_event = time.monotonic()
                        self.event()
                    else:
                        self._show(self._counts())
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
    return cumulative_counts(summary["states"])
