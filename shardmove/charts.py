"""The report's charts: each drawn once with matplotlib's Agg backend at a fixed size
(:data:`CHARTS`: name -> (width px, height px)) and saved twice (:class:`Chart`): as a PNG
(the file beside the page) and as SVG with its text kept as text (inlined in the page, so a
browser -- and a test -- reads the axis labels, legends and titles).

Counts, shard ids and timings only -- never a key value.  Times are UTC.  Never imports Beam;
matplotlib is imported on first use.
"""
from __future__ import annotations

import calendar
import datetime as _dt
import io
import math
import time
from typing import NamedTuple

import numpy as np

__all__ = ["CHARTS", "PLAN_CHARTS", "RUN_CHARTS", "Chart", "Run", "chart_move_matrix", "chart_shard_counts",
           "chart_moved_fraction", "chart_window", "chart_progress", "chart_throughput", "chart_latency",
           "chart_outcomes", "runs_from_events", "timing_table", "drained_shards", "shard_order", "WINDOW_TICKS"]

_DPI = 100
#: chart name -> (width, height) in pixels of its PNG.
CHARTS = {
    "move_matrix": (900, 700),
    "shard_counts": (1000, 500),
    "moved_fraction": (900, 260),
    "window": (900, 220),
    "progress_timeline": (1000, 500),
    "throughput": (1000, 400),
    "latency": (1000, 450),
    "outcomes": (1200, 420),
}
PLAN_CHARTS = ("move_matrix", "shard_counts", "moved_fraction", "window")
RUN_CHARTS = ("progress_timeline", "throughput", "latency", "outcomes")
_COLORS = {"copied": "#1f77b4", "verified": "#2ca02c", "swapped": "#9467bd", "failed": "#d62728"}


# ------------------------------------------------------------- plotting

def _plt():
    # deferred: matplotlib takes ~0.5 s to load, and only charts need it
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _figure(name: str):
    plt = _plt()
    w, h = CHARTS[name]
    fig = plt.figure(figsize=(w / _DPI, h / _DPI), dpi=_DPI)
    return plt, fig


class Chart(NamedTuple):
    """One chart drawn once and saved twice: ``png`` (the file beside the page) and
    ``svg`` (inlined in the page, its text kept as text so a browser -- and a test --
    can read the axis labels, the legend and the titles)."""
    png: bytes
    svg: str


def _render(fig, name: str) -> Chart:
    # deferred: matplotlib takes ~0.5 s to load, and only charts need it
    import matplotlib

    plt = _plt()
    try:
        fig.tight_layout()
    except Exception:  # tight_layout gives up on odd layouts; the chart is still fine
        pass
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, metadata={"Software": None})
    png = buf.getvalue()
    buf = io.BytesIO()
    # the salt makes the ids of clip paths and markers unique per chart within one page
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": name}):
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    plt.close(fig)
    svg = buf.getvalue().decode("utf-8")
    return Chart(png, svg[svg.index("<svg"):])


def _rc():
    # deferred: matplotlib takes ~0.5 s to load, and only charts need it
    import matplotlib

    # shard ids are data: never let "$" start mathtext
    return matplotlib.rc_context({"text.parse_math": False, "font.size": 9, "axes.titlesize": 11})


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#666")
    ax.set_xticks([])
    ax.set_yticks([])


def shard_order(ids) -> list:
    return sorted(set(ids), key=lambda s: s.encode())


def chart_move_matrix(manifest: dict) -> Chart:
    with _rc():
        plt, fig = _figure("move_matrix")
        ax = fig.add_subplot(111)
        pairs = manifest.get("pairs") or []
        if not pairs:
            _empty(ax, "no moves")
        else:
            # every shard that holds keys before (rows) / after (columns): empty pairs show grey
            src = shard_order([p["source"] for p in pairs] + list(manifest.get("shards_before") or {}))
            tgt = shard_order([p["target"] for p in pairs] + list(manifest.get("shards_after") or {}))
            si = {s: i for i, s in enumerate(src)}
            ti = {s: i for i, s in enumerate(tgt)}
            m = np.zeros((len(src), len(tgt)), dtype=np.int64)
            for p in pairs:
                m[si[p["source"]], ti[p["target"]]] += int(p["moves"])
            cmap = plt.get_cmap("viridis").with_extremes(bad="#eeeeee")
            im = ax.imshow(np.ma.masked_equal(m, 0), cmap=cmap, vmin=0, vmax=max(1, int(m.max())),
                           aspect="auto", interpolation="nearest")
            fig.colorbar(im, ax=ax, label="keys moved")
            ax.set_xticks(range(len(tgt)), tgt, rotation=45 if len(tgt) > 8 else 0, ha="right" if len(tgt) > 8 else "center")
            ax.set_yticks(range(len(src)), src)
            if len(src) * len(tgt) <= 400:
                top = m.max() or 1
                for i in range(len(src)):
                    for j in range(len(tgt)):
                        if m[i, j]:
                            ax.text(j, i, f"{m[i, j]:,}", ha="center", va="center", fontsize=8,
                                    color="black" if m[i, j] > 0.6 * top else "white")
            ax.set_xlabel("target shard")
            ax.set_ylabel("source shard")
        ax.set_title(f"Moves by source x target ({int(manifest.get('moves', 0)):,} keys)")
        return _render(fig, "move_matrix")


def _capacity_rows(manifest: dict) -> dict:
    return {r["shard"]: r for r in manifest.get("capacity") or []}


def drained_shards(manifest: dict) -> set:
    """Shards that hold keys before the plan and none after it (a removed shard)."""
    before = manifest.get("shards_before") or {}
    after = manifest.get("shards_after") or {}
    return {s for s, n in before.items() if int(n) > 0 and not int(after.get(s, 0))}


def chart_shard_counts(manifest: dict) -> Chart:
    # deferred: matplotlib takes ~0.5 s to load, and only charts need it
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    with _rc():
        plt, fig = _figure("shard_counts")
        ax = fig.add_subplot(111)
        before = manifest.get("shards_before") or {}
        after = manifest.get("shards_after") or {}
        cap = _capacity_rows(manifest)
        drained = drained_shards(manifest)
        shards = shard_order(list(before) + list(after) + list(cap))
        if not shards:
            _empty(ax, "empty keyspace")
        else:
            x = np.arange(len(shards))
            w = 0.4
            over = [bool(cap.get(s, {}).get("over")) for s in shards]
            ax.bar(x - w / 2, [before.get(s, 0) for s in shards], w, color="#9ecae1")
            ax.bar(x + w / 2, [after.get(s, 0) for s in shards], w,
                   color=["#d62728" if o else "#3182bd" for o in over])
            with_cap = False
            for i, s in enumerate(shards):
                c = cap.get(s, {}).get("capacity_keys")
                if c:
                    ax.hlines(c, i - 0.45, i + 0.45, colors="#e6550d", linestyles="--")
                    with_cap = True
            top = max([before.get(s, 0) for s in shards] + [after.get(s, 0) for s in shards]
                      + [cap.get(s, {}).get("capacity_keys") or 0 for s in shards] + [1])
            for i, s in enumerate(shards):
                if s in drained:
                    ax.text(i + w / 2, top * 0.02, "drained", rotation=90, ha="center", va="bottom",
                            fontsize=8, color="#444")
            ax.set_xticks(x, shards, rotation=45 if len(shards) > 12 else 0,
                          ha="right" if len(shards) > 12 else "center")
            ax.set_ylim(0, top * 1.25)
            ax.set_ylabel("keys")
            # every colour drawn has its legend entry (the red bar too)
            handles = [Patch(color="#9ecae1", label="before")]
            if any(not o and after.get(s, 0) for s, o in zip(shards, over)):  # a blue bar is drawn
                handles.append(Patch(color="#3182bd", label="after"))
            if any(over):
                handles.append(Patch(color="#d62728", label="after: over capacity"))
            if with_cap:
                handles.append(Line2D([0], [0], color="#e6550d", linestyle="--", label="capacity_keys"))
            ax.legend(handles=handles, loc="upper left", ncol=len(handles))
        ax.set_title("Keys per shard before and after the plan")
        return _render(fig, "shard_counts")


def chart_moved_fraction(manifest: dict) -> Chart:
    with _rc():
        plt, fig = _figure("moved_fraction")
        ax = fig.add_subplot(111)
        moved = 100.0 * float(manifest.get("moved_fraction") or 0.0)
        opt = 100.0 * float(manifest.get("optimum_moved_fraction") or 0.0)
        bars = ax.barh(["optimum", "this plan"], [opt, moved], color=["#bdbdbd", "#3182bd"])
        for b, v in zip(bars, (opt, moved)):
            ax.text(b.get_width(), b.get_y() + b.get_height() / 2, f" {v:.2f}%", va="center")
        ax.set_xlim(0, max(1.0, moved, opt) * 1.25)
        ax.set_xlabel("% of keys examined that move")
        ratio = f" ({moved / opt:.3f}x optimum)" if opt > 0 else ""
        ax.set_title(f"Moved fraction against the optimum{ratio}")
        return _render(fig, "moved_fraction")


def _window_bounds(window) -> tuple[int, int] | None:
    if not window:
        return None
    if isinstance(window, (list, tuple)):
        return int(window[0]), int(window[1])
    a, b = str(window).split("-")
    return int(a, 16), int(b, 16)


#: the window chart's ticks: every 0x20, and the last byte value itself.
WINDOW_TICKS = (0x00, 0x20, 0x40, 0x60, 0x80, 0xA0, 0xC0, 0xE0, 0xFF)


def chart_window(manifest: dict) -> Chart:
    with _rc():
        plt, fig = _figure("window")
        ax = fig.add_subplot(111)
        w = _window_bounds(manifest.get("window"))
        lo, hi = (0, 255) if w is None else w
        # byte value b is the cell [b - 0.5, b + 0.5]: the axis runs from 00 to FF, both drawn
        ax.axvspan(lo - 0.5, hi + 0.5, color="#3182bd", alpha=0.7)
        ax.set_xlim(-0.5, 255.5)
        ax.set_yticks([])
        ax.set_xticks(list(WINDOW_TICKS), [f"{t:02X}" for t in WINDOW_TICKS])
        ax.set_xlabel("top byte of the stable key hash (hex)")
        examined = int(manifest.get("keys_examined") or 0)
        inw = int(manifest.get("keys_in_window") or 0)
        label = "all keys (no window)" if w is None else f"window {lo:02X}-{hi:02X}"
        share = f"{100.0 * inw / examined:.1f}%" if examined else "0%"
        ax.set_title(f"Phased window: {label}; {inw:,} of {examined:,} keys in window ({share})")
        return _render(fig, "window")


def _parse_time(text: str) -> float | None:
    try:
        return float(calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%SZ")))
    except (TypeError, ValueError):
        return None


class Run(NamedTuple):
    """One run (epoch) of a plan as its progress events show it."""
    epoch: int
    start: float          # Unix seconds (events carry whole seconds: the start is to about 1 s)
    events: list          # sorted by elapsed_s
    base: int             # keys finished (swapped + failed) when the run started
    end_elapsed_s: float
    finished: int         # keys this run finished
    keys_per_s: float | None


def _finished_keys(e: dict) -> int:
    return int(e.get("swapped", 0)) + int(e.get("failed", 0))


def runs_from_events(events: list) -> list:
    """Progress events grouped by run, oldest first, each with its start on the wall clock
    and its own rate: the keys it finished (from the previous run's last count, 0 for the
    first) over its elapsed time."""
    by_epoch: dict = {}
    for ev in events:
        by_epoch.setdefault(int(ev.get("epoch", 0)), []).append(ev)
    out, base = [], 0
    for ep in sorted(by_epoch):
        evs = sorted(by_epoch[ep], key=lambda e: float(e.get("elapsed_s", 0)))
        cands = [t - float(e.get("elapsed_s", 0)) for e in evs if (t := _parse_time(e.get("time"))) is not None]
        start = min(cands) if cands else 0.0
        end = float(evs[-1].get("elapsed_s", 0))
        finished = max(0, _finished_keys(evs[-1]) - base)
        out.append(Run(ep, start, evs, base, end, finished, finished / end if end > 0 else None))
        base = max(base, _finished_keys(evs[-1]))
    return out


#: at most this many runs get a panel of their own (the latest ones).
MAX_RUN_PANELS = 4


#: tick steps (seconds) a run panel chooses from: 3 to 6 ticks per panel.
_TICK_STEPS = (0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 14400, 21600, 43200, 86400)


def _run_panels(fig, runs: list, *, sharey: bool = True) -> list:
    """One panel per run (the latest MAX_RUN_PANELS), each on its own wall-clock axis (UTC)
    at least 2 s wide, so a 1-second run is as readable as an hour-long one and the hours
    between resumed runs take no room."""
    shown = runs[-MAX_RUN_PANELS:]
    axes, first = [], None
    for i, run in enumerate(shown):
        ax = fig.add_subplot(1, len(shown), i + 1, sharey=first if sharey else None)
        first = first or ax
        t0 = _dt.datetime.fromtimestamp(run.start, tz=_dt.timezone.utc)
        width = max(2.0, run.end_elapsed_s * 1.08)
        pad = 0.04 * width
        ax.set_xlim(_at(t0, -pad), _at(t0, width))
        step = next((st for st in _TICK_STEPS if width / st <= 5), _TICK_STEPS[-1])
        first_tick = math.ceil((run.start - pad) / step) * step
        ticks = [first_tick + k * step for k in range(int((width + pad) / step) + 1)
                 if first_tick + k * step <= run.start + width]
        fmt = "%H:%M:%S.%f" if step < 1 else "%H:%M:%S"
        ax.set_xticks([_dt.datetime.fromtimestamp(t, tz=_dt.timezone.utc) for t in ticks],
                      [_dt.datetime.fromtimestamp(t, tz=_dt.timezone.utc).strftime(fmt)[:10 if step < 1 else 8]
                       for t in ticks])
        ax.set_xlabel(f"time (UTC, {t0:%Y-%m-%d})")
        ax.set_title(f"run {run.epoch}: {run.end_elapsed_s:,.1f} s from {t0:%H:%M:%S}", fontsize=9)
        axes.append((ax, run, t0))
    return axes


def _at(t0, seconds: float):
    return t0 + _dt.timedelta(seconds=float(seconds))


def _runs_title(base: str, runs: list) -> str:
    if len(runs) > MAX_RUN_PANELS:
        return f"{base} (the last {MAX_RUN_PANELS} of {len(runs)} runs)"
    return f"{base} ({len(runs)} run{'s' if len(runs) != 1 else ''})"


def chart_progress(events: list, planned: int) -> Chart:
    with _rc():
        plt, fig = _figure("progress_timeline")
        runs = runs_from_events(events)
        if not runs:
            ax = fig.add_subplot(111)
            _empty(ax, "no progress events")
            ax.set_title("Progress over time")
            return _render(fig, "progress_timeline")
        for i, (ax, run, t0) in enumerate(_run_panels(fig, runs)):
            for series in ("copied", "verified", "swapped", "failed"):
                xs = [_at(t0, e.get("elapsed_s", 0)) for e in run.events]
                ys = [int(e.get(series, 0)) for e in run.events]
                # copied is drawn wide underneath: it often coincides with verified
                ax.plot(xs, ys, marker="o", markersize=3, linewidth=4 if series == "copied" else 1.6,
                        alpha=0.5 if series == "copied" else 1.0, color=_COLORS[series],
                        label=series if i == 0 else None)
            ax.axhline(planned, color="#444", linestyle="--", linewidth=1, label="planned" if i == 0 else None)
            if i == 0:
                ax.set_ylabel("keys (all runs)")
        ax0 = fig.axes[0]
        ax0.set_ylim(0, max(1, planned) * 1.15)
        ax0.legend(loc="upper left", ncol=5, fontsize=8)
        fig.suptitle(_runs_title("Progress over time", runs))
        return _render(fig, "progress_timeline")


def chart_throughput(events: list, keys_per_s: float | None = None) -> Chart:
    """Keys finished per second, per run: the rate between progress events (steps) and the
    run's own average (a dashed line over that run only).  ``keys_per_s``, the last run's
    exact rate from summary.json, replaces the estimate for that run."""
    with _rc():
        plt, fig = _figure("throughput")
        runs = runs_from_events(events)
        if not runs:
            ax = fig.add_subplot(111)
            _empty(ax, "no progress events")
            ax.set_title("Throughput")
            return _render(fig, "throughput")
        top = 1.0
        for i, (ax, run, t0) in enumerate(_run_panels(fig, runs)):
            pts, prev_n, prev_el = [], run.base, 0.0
            for e in run.events:
                el, n = float(e.get("elapsed_s", 0)), _finished_keys(e)
                if el > prev_el:
                    pts.append((prev_el, el, (n - prev_n) / (el - prev_el)))
                prev_n, prev_el = n, el
            for k, (a, b, r) in enumerate(pts):
                ax.plot([_at(t0, a), _at(t0, b)], [r, r], color="#3182bd", linewidth=2, marker="|",
                        label="keys finished per second, between progress events" if i == 0 and k == 0 else None)
                top = max(top, r)
            avg = keys_per_s if (run is runs[-1] and keys_per_s) else run.keys_per_s
            if avg:
                ax.hlines(avg, _at(t0, 0), _at(t0, max(run.end_elapsed_s, 0.001)), colors="#e6550d",
                          linestyles="--", label="run average" if i == 0 else None)
                ax.annotate(f"{avg:,.0f}/s", (_at(t0, max(run.end_elapsed_s, 0.001)), avg), fontsize=8,
                            xytext=(3, 3), textcoords="offset points", color="#e6550d")
                top = max(top, avg)
            if i == 0:
                ax.set_ylabel("keys / s")
        fig.axes[0].set_ylim(0, top * 1.35)
        fig.axes[0].legend(loc="upper left", ncol=2, fontsize=8)
        fig.suptitle(_runs_title("Throughput per run", runs))
        return _render(fig, "throughput")


def timing_table(timings: list) -> list:
    """Per stage: calls, keys, ms per call (p50, p95, max) and ms per key (p50), from the
    same ``[stage, ms, keys]`` records the latency chart draws."""
    rows = []
    for stage in ("copy", "verify", "swap", "fence"):
        recs = [t for t in timings if t and t[0] == stage]
        if not recs:
            continue
        ms = np.array([float(t[1]) for t in recs])
        keys = np.array([max(1, int(t[2])) if len(t) > 2 else 1 for t in recs])
        rows.append({"stage": stage, "calls": int(len(ms)), "keys": int(keys.sum()),
                     "p50_ms_per_call": round(float(np.percentile(ms, 50)), 3),
                     "p95_ms_per_call": round(float(np.percentile(ms, 95)), 3),
                     "max_ms_per_call": round(float(ms.max()), 3),
                     "p50_ms_per_key": round(float(np.percentile(ms / keys, 50)), 4)})
    return rows


def chart_latency(timings: list, run_label: str = "") -> Chart:
    """Histograms of ms per store call (top) and ms per key (bottom) per stage; a call
    handles a chunk of keys (``keys_per_call``, a swap batch), so both are drawn."""
    with _rc():
        plt, fig = _figure("latency")
        stages = [s for s in ("copy", "verify", "swap") if any(t and t[0] == s for t in timings)]
        title = "Latency per stage" + (f" ({run_label})" if run_label else "")
        if not stages:
            ax = fig.add_subplot(111)
            _empty(ax, "no timings recorded")
            ax.set_title(title)
            return _render(fig, "latency")
        for i, stage in enumerate(stages):
            recs = [t for t in timings if t and t[0] == stage]
            ms = np.array([float(t[1]) for t in recs])
            keys = np.array([max(1, int(t[2])) if len(t) > 2 else 1 for t in recs])
            for row, (vals, unit) in enumerate(((ms, "ms per call"), (ms / keys, "ms per key"))):
                ax = fig.add_subplot(2, len(stages), row * len(stages) + i + 1)
                ax.hist(vals, bins=min(40, max(5, len(vals) // 3)), color="#3182bd" if row == 0 else "#6baed6")
                p50, p95 = np.percentile(vals, 50), np.percentile(vals, 95)
                ax.axvline(p50, color="#2ca02c", linestyle="--", label=f"p50 {p50:.3g} {unit}")
                ax.axvline(p95, color="#d62728", linestyle="--", label=f"p95 {p95:.3g} {unit}")
                ax.set_xlabel(unit if row else f"{unit} (median {int(np.median(keys))} keys per call)")
                ax.set_ylabel("calls")
                if row == 0:
                    ax.set_title(f"{stage}: {len(ms):,} calls, {int(keys.sum()):,} keys", fontsize=9)
                ax.legend(loc="upper right", fontsize=7)
        fig.suptitle(title)
        return _render(fig, "latency")


def chart_outcomes(attempts: dict, reasons: dict, methods: dict) -> Chart:
    with _rc():
        plt, fig = _figure("outcomes")
        ax1, ax2, ax3 = (fig.add_subplot(1, 3, i) for i in (1, 2, 3))
        if attempts:
            xs = sorted(attempts)
            ax1.bar([str(x) for x in xs], [attempts[x] for x in xs], color="#3182bd")
            ax1.set_xlabel("copy attempts")
            ax1.set_ylabel("keys")
        else:
            _empty(ax1, "no checkpoints yet")
        ax1.set_title("Keys by copy attempts (retries)")
        if reasons:
            r = sorted(reasons)
            ax2.barh(r, [reasons[k] for k in r], color="#d62728")
            ax2.set_xlabel("keys")
            ax2.set_title(f"FAILED keys by reason ({sum(reasons.values()):,})", color="#d62728")
        else:
            _empty(ax2, "no failed keys")
            ax2.set_title("Failed keys by reason")
        if methods:
            m = sorted(methods)
            ax3.barh(m, [methods[k] for k in m], color="#2ca02c")
            ax3.set_xlabel("keys")
        else:
            _empty(ax3, "no done keys")
        ax3.set_title("Done keys by verification method")
        return _render(fig, "outcomes")
