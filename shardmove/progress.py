"""Progress on stderr, for a person at a terminal and for a scheduler's log.

``--progress`` (``run`` and ``plan``) picks how:

- ``bar``: one line redrawn in place (``\\r``), for a terminal;
- ``text``: one ``progress: ...`` line per ``progress_log_interval``, and a last one at the end
  when any was written, for CI, Airflow or Kubernetes logs;
- ``json``: the same cadence, one JSON object per line;
- ``none``: nothing;
- ``auto`` (the default): ``bar`` when stderr is a terminal, ``text`` otherwise.

Lines carry counts, rate, ETA and elapsed time, never a key.

While a bar is drawn, every other write to the terminal (log records, warnings, ``print``)
first clears the bar's line and the bar is redrawn after it (:class:`ProgressDisplay`
guards ``sys.stderr``, ``sys.stdout`` on a terminal, and the root logger's stream handlers),
so a log line never runs into the bar.
"""
from __future__ import annotations

import json
import logging
import sys
import threading
import time

from pipeline.errors import BadInput

__all__ = ["MODES", "ProgressDisplay", "resolve_mode", "run_counts_text", "run_fields", "status_progress_lines"]

MODES = ("auto", "bar", "text", "json", "none")

_CLEAR = "\r\x1b[K"


def resolve_mode(mode: str | None, stream) -> str:
    """``auto`` (or None) -> ``bar`` on a terminal, ``text`` otherwise."""
    mode = mode or "auto"
    if mode not in MODES:
        raise BadInput(f"progress: expected one of {', '.join(MODES)}, got {mode!r}")
    if mode == "auto":
        try:
            tty = stream.isatty()
        except (AttributeError, ValueError):
            tty = False
        return "bar" if tty else "text"
    return mode


def _eta_text(eta) -> str:
    return "?" if eta is None else f"{eta:.0f}s"


def run_fields(*, plan_id: str, total: int, copied: int, verified: int, swapped: int, failed: int,
               done_this_run: int, elapsed_s: float) -> dict:
    """The fields of a run's progress line: cumulative counts (every epoch), and the rate and
    ETA of this run."""
    done = swapped + failed
    rate = done_this_run / elapsed_s if elapsed_s > 0 else 0.0
    left = max(0, total - done)
    return {"phase": "run", "plan_id": plan_id, "total": total, "done": done, "copied": copied,
            "verified": verified, "swapped": swapped, "failed": failed, "remaining": left,
            "rate_keys_per_s": round(rate, 1), "eta_s": round(left / rate, 1) if rate > 0 else None,
            "elapsed_s": round(elapsed_s, 1)}


def run_counts_text(f: dict) -> str:
    """``26000/40000 (65.0%) copied=... verified=... swapped=... failed=...`` (also in ``status``)."""
    pct = 100.0 * f["done"] / f["total"] if f["total"] else 100.0
    return (f"{f['done']}/{f['total']} ({pct:.1f}%) copied={f['copied']} verified={f['verified']} "
            f"swapped={f['swapped']} failed={f['failed']}")


#: ``status`` text lists at most this many pairs and shards (``--json`` lists all)
STATUS_ROWS = 50


def status_progress_lines(s: dict) -> list[str]:
    """The progress part of ``status``: the cumulative counts (as the bar shows them), the keys'
    current states, and progress per (source, target) pair and per shard."""
    lines = []
    if "progress" in s:
        lines.append("progress: " + run_counts_text(s["progress"]))
    lines.append("states now: " + " ".join(f"{name}={n}" for name, n in s["states"].items()))
    pairs, shards = s.get("pairs", []), s.get("shards", [])
    for p in pairs[:STATUS_ROWS]:
        lines.append(f"pair {p['source']} -> {p['target']}: {p['done']}/{p['planned']} done failed={p['failed']} "
                     f"remaining={p['remaining']} ({p['progress']})")
    if len(pairs) > STATUS_ROWS:
        lines.append(f"pairs: {len(pairs) - STATUS_ROWS} more (status --json lists every pair)")
    for sh in shards[:STATUS_ROWS]:
        lines.append(f"shard {sh['shard']}: out {sh['out_done']}/{sh['out_planned']} done "
                     f"remaining={sh['out_remaining']}; in {sh['in_done']}/{sh['in_planned']} done "
                     f"remaining={sh['in_remaining']}")
    if len(shards) > STATUS_ROWS:
        lines.append(f"shards: {len(shards) - STATUS_ROWS} more (status --json lists every shard)")
    return lines


def _line(f: dict) -> str:
    tail = f"rate={f['rate_keys_per_s']:.0f} keys/s eta={_eta_text(f['eta_s'])} elapsed={f['elapsed_s']:.0f}s"
    if f["phase"] == "run":
        return f"progress: run {run_counts_text(f)} {tail}"
    seg = f"{f['segments']}" + (f"/{f['segments_total']}" if f.get("segments_total") else "")
    keys = f"{f['keys_examined']}" + (f"/{f['keys_total']}" if f.get("keys_total") is not None else "")
    pct = f" ({100.0 * f['keys_examined'] / f['keys_total']:.1f}%)" if f.get("keys_total") else ""
    return f"progress: plan segments={seg} keys_examined={keys}{pct} {tail}"


def _bar(f: dict) -> str:
    width = 30
    if f["phase"] == "run":
        n, total = f["done"], f["total"]
        what = (f"{n}/{total} copied={f['copied']} verified={f['verified']} failed={f['failed']}")
    else:
        n, total = f["keys_examined"], f.get("keys_total") or 0
        what = f"segments={f['segments']} keys_examined={n}" + (f"/{total}" if total else "")
    frac = min(1.0, n / total) if total else (1.0 if f.get("final") else 0.0)
    bar = "#" * int(width * frac) + "-" * (width - int(width * frac))
    return (f"[{bar}] {what} {f['rate_keys_per_s']:.0f} keys/s ETA {_eta_text(f['eta_s'])}")


class _GuardedStream:
    """A stream whose writes clear the progress bar first and redraw it after a full line."""

    def __init__(self, inner, display: "ProgressDisplay"):
        self._inner = inner
        self._display = display

    def write(self, s):
        d = self._display
        with d.lock:
            d._clear()
            n = self._inner.write(s)
            if s.endswith("\n"):
                try:
                    self._inner.flush()
                except (OSError, ValueError):
                    pass
                d._redraw()
            return n

    def flush(self):
        self._inner.flush()

    def __getattr__(self, name):
        return getattr(self._inner, name)


class ProgressDisplay:
    """Shows progress fields (:func:`run_fields`, or the planner's) as ``mode`` says.

    Use as a context manager: in bar mode it guards the terminal's streams for its lifetime.
    ``show`` is thread-safe; ``clock`` is injectable for tests."""

    def __init__(self, mode: str | None, log_interval: float, *, stream=None, clock=time.monotonic):
        self.stream = stream if stream is not None else sys.stderr
        self.mode = resolve_mode(mode, self.stream)
        self.log_interval = float(log_interval)
        self.lock = threading.RLock()
        self._clock = clock
        self._last_line = clock()
        self._lines = 0
        self._bar_text = ""
        self._drawn = False
        self._saved: list = []

    @property
    def tick(self) -> float | None:
        """How often the caller should call :meth:`show` for lines to keep their cadence."""
        return self.log_interval if self.mode in ("text", "json") else None

    # -- the terminal guard (bar mode)
    def __enter__(self):
        if self.mode == "bar":
            self._guard()
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def _guard(self) -> None:
        real = self.stream
        guarded = _GuardedStream(real, self)
        self._saved.append(("stderr", sys.stderr))
        if sys.stderr is real:
            sys.stderr = guarded
        out = sys.stdout
        try:
            out_tty = out is not real and out.isatty()
        except (AttributeError, ValueError):
            out_tty = False
        if out_tty:
            self._saved.append(("stdout", out))
            sys.stdout = _GuardedStream(out, self)
        for h in logging.getLogger().handlers:
            if isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) is real:
                h.setStream(guarded)
                self._saved.append((h, real))

    def close(self) -> None:
        with self.lock:
            if self._drawn:
                self.stream.write("\n")
                self.stream.flush()
                self._drawn = False
            self._bar_text = ""
            for what, old in reversed(self._saved):
                if what == "stderr":
                    sys.stderr = old
                elif what == "stdout":
                    sys.stdout = old
                else:
                    what.setStream(old)
            self._saved = []

    def _clear(self) -> None:
        if self._drawn:
            self.stream.write(_CLEAR)
            self.stream.flush()
            self._drawn = False

    def _redraw(self) -> None:
        if self._bar_text and not self._drawn:
            self.stream.write("\r" + self._bar_text)
            self.stream.flush()
            self._drawn = True

    # -- showing
    def show(self, fields: dict, *, final: bool = False) -> None:
        """Draw the bar, or write a line when ``log_interval`` has passed since the last one
        (and at ``final``, when a line was written before: the log then ends at the end)."""
        if self.mode == "none":
            return
        fields = dict(fields, final=final)
        with self.lock:
            if self.mode == "bar":
                self._clear()
                self._bar_text = _bar(fields)
                self._redraw()
                if final:
                    self.stream.write("\n")
                    self.stream.flush()
                    self._drawn = False
                    self._bar_text = ""
                return
            now = self._clock()
            if final and not self._lines:
                return
            if not final and now - self._last_line < self.log_interval:
                return
            self._last_line = now
            self._lines += 1
            if self.mode == "json":
                text = json.dumps(dict(fields, time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())),
                                  sort_keys=True)
            else:
                text = _line(fields)
            self.stream.write(text + "\n")
            self.stream.flush()
