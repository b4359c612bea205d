"""Plan and run reports: one self-contained HTML file plus the PNG charts beside it.

Never imports Beam.  Charts are drawn with matplotlib's Agg backend at fixed
sizes (:data:`CHARTS`: name -> (width px, height px)), written next to the
HTML and embedded in it as ``data:`` URIs, so ``report.html`` can be mailed or
attached to a ticket on its own.  No scripts, no external resources.

* :func:`write_plan_report` works from a manifest alone -- the committed
  ``manifest.json`` or the in-memory ``PlanResult.manifest`` of a dry run --
  and draws the plan: the source x target move matrix, keys per shard before
  and after (with capacity lines), the moved fraction against the optimum,
  and the phased window.
* :func:`write_report` adds, for a plan that has run, the progress timeline
  (copied / verified / swapped / failed over time, from ``progress/*.json``),
  throughput, per-stage latency distributions (``progress/timings-*.json``),
  copy attempts per key (retries), failures by reason and Done keys by
  verification method (:func:`shardmove.executor.summarize`, exact from the
  checkpoints).

Reports hold counts, shard ids and timings only -- never a key value.  Files
are replaced atomically (:func:`pipeline.fs.write_atomic`); rewriting a
report is idempotent.
"""
from __future__ import annotations

import base64
import calendar
import datetime as _dt
import html
import io
import logging
import time

import numpy as np
import pyarrow.compute as pc

from pipeline import checkpoint as ckpt
from pipeline import fs
from pipeline import workdir
from shardmove.executor import summarize

__all__ = ["CHARTS", "write_plan_report", "write_report", "collect_run_data", "render_html"]

LOG = logging.getLogger("shardmove.report")

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


def _png(fig) -> bytes:
    plt = _plt()
    buf = io.BytesIO()
    try:
        fig.tight_layout()
    except Exception:  # tight_layout gives up on odd layouts; the chart is still fine
        pass
    fig.savefig(buf, format="png", dpi=_DPI, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def _rc():
    # deferred: matplotlib takes ~0.5 s to load, and only charts need it
    import matplotlib

    # shard ids are data: never let "$" start mathtext
    return matplotlib.rc_context({"text.parse_math": False, "font.size": 9, "axes.titlesize": 11})


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#666")
    ax.set_xticks([])
    ax.set_yticks([])


def _shard_order(ids) -> list:
    return sorted(set(ids), key=lambda s: s.encode())


def chart_move_matrix(manifest: dict) -> bytes:
    with _rc():
        plt, fig = _figure("move_matrix")
        ax = fig.add_subplot(111)
        pairs = manifest.get("pairs") or []
        if not pairs:
            _empty(ax, "no moves")
        else:
            # every shard that holds keys before (rows) / after (columns): empty pairs show grey
            src = _shard_order([p["source"] for p in pairs] + list(manifest.get("shards_before") or {}))
            tgt = _shard_order([p["target"] for p in pairs] + list(manifest.get("shards_after") or {}))
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
        return _png(fig)


def chart_shard_counts(manifest: dict) -> bytes:
    with _rc():
        plt, fig = _figure("shard_counts")
        ax = fig.add_subplot(111)
        before = manifest.get("shards_before") or {}
        after = manifest.get("shards_after") or {}
        cap = {r["shard"]: r for r in manifest.get("capacity") or []}
        shards = _shard_order(list(before) + list(after) + list(cap))
        if not shards:
            _empty(ax, "empty keyspace")
        else:
            x = np.arange(len(shards))
            w = 0.4
            ax.bar(x - w / 2, [before.get(s, 0) for s in shards], w, label="before", color="#9ecae1")
            colors = ["#d62728" if cap.get(s, {}).get("over") else "#3182bd" for s in shards]
            ax.bar(x + w / 2, [after.get(s, 0) for s in shards], w, label="after", color=colors)
            drawn = False
            for i, s in enumerate(shards):
                c = cap.get(s, {}).get("capacity_keys")
                if c:
                    ax.hlines(c, i - 0.45, i + 0.45, colors="#e6550d", linestyles="--",
                              label=None if drawn else "capacity_keys")
                    drawn = True
            ax.set_xticks(x, shards, rotation=45 if len(shards) > 12 else 0,
                          ha="right" if len(shards) > 12 else "center")
            top = max([before.get(s, 0) for s in shards] + [after.get(s, 0) for s in shards]
                      + [cap.get(s, {}).get("capacity_keys") or 0 for s in shards] + [1])
            ax.set_ylim(0, top * 1.2)
            ax.set_ylabel("keys")
            ax.legend(loc="upper left", ncol=3)
        ax.set_title("Keys per shard before and after the plan")
        return _png(fig)


def chart_moved_fraction(manifest: dict) -> bytes:
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
        return _png(fig)


def _window_bounds(window) -> tuple[int, int] | None:
    if not window:
        return None
    if isinstance(window, (list, tuple)):
        return int(window[0]), int(window[1])
    a, b = str(window).split("-")
    return int(a, 16), int(b, 16)


def chart_window(manifest: dict) -> bytes:
    with _rc():
        plt, fig = _figure("window")
        ax = fig.add_subplot(111)
        w = _window_bounds(manifest.get("window"))
        lo, hi = (0, 255) if w is None else w
        ax.axvspan(lo, hi + 1, color="#3182bd", alpha=0.7)
        ax.set_xlim(0, 256)
        ax.set_yticks([])
        ax.set_xticks([0, 32, 64, 96, 128, 160, 192, 224, 256], ["00", "20", "40", "60", "80", "A0", "C0", "E0", "100"])
        ax.set_xlabel("top byte of the stable key hash")
        examined = int(manifest.get("keys_examined") or 0)
        inw = int(manifest.get("keys_in_window") or 0)
        label = "all keys (no window)" if w is None else f"window {lo:02X}-{hi:02X}"
        share = f"{100.0 * inw / examined:.1f}%" if examined else "0%"
        ax.set_title(f"Phased window: {label}; {inw:,} of {examined:,} keys in window ({share})")
        return _png(fig)


def _parse_time(text: str) -> float | None:
    try:
        return float(calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%SZ")))
    except (TypeError, ValueError):
        return None


def _timeline(events: list) -> tuple[list, list]:
    """Events on one time axis (seconds since the first run started) and run start times."""
    by_epoch: dict = {}
    for ev in events:
        by_epoch.setdefault(int(ev.get("epoch", 0)), []).append(ev)
    starts = {}
    for ep, evs in by_epoch.items():
        cands = [t - float(e.get("elapsed_s", 0)) for e in evs if (t := _parse_time(e.get("time"))) is not None]
        starts[ep] = min(cands) if cands else 0.0
    t0 = min(starts.values()) if starts else 0.0
    rows = []
    for ep in sorted(by_epoch):
        for e in sorted(by_epoch[ep], key=lambda e: float(e.get("elapsed_s", 0))):
            rows.append((starts[ep] - t0 + float(e.get("elapsed_s", 0)), ep, e))
    return rows, sorted((starts[ep] - t0, ep) for ep in starts)


def chart_progress(events: list, planned: int) -> bytes:
    with _rc():
        plt, fig = _figure("progress_timeline")
        ax = fig.add_subplot(111)
        rows, starts = _timeline(events)
        if not rows:
            _empty(ax, "no progress events")
        else:
            for series in ("copied", "verified", "swapped", "failed"):
                for ep in sorted({r[1] for r in rows}):
                    pts = [(t, int(e.get(series, 0))) for t, e_ep, e in rows if e_ep == ep]
                    # copied is drawn wide underneath: it often coincides with verified
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3,
                            linewidth=4 if series == "copied" else 1.6, alpha=0.5 if series == "copied" else 1.0,
                            color=_COLORS[series], label=series if ep == rows[0][1] else None)
            for t, ep in starts:
                ax.axvline(t, color="#999", linestyle=":", linewidth=1)
                ax.text(t, planned * 1.02 if planned else 1, f" run {ep}", fontsize=8, color="#666")
            ax.axhline(planned, color="#444", linestyle="--", linewidth=1, label="planned")
            ax.set_ylim(0, max(1, planned) * 1.08)
            ax.set_xlabel("seconds since the first run started")
            ax.set_ylabel("keys")
            ax.legend(loc="lower right")
        ax.set_title("Progress over time")
        return _png(fig)


def chart_throughput(events: list, keys_per_s: float | None) -> bytes:
    with _rc():
        plt, fig = _figure("throughput")
        ax = fig.add_subplot(111)
        rows, _starts = _timeline(events)
        by_ep: dict = {}
        for t, ep, e in rows:
            by_ep.setdefault(ep, []).append((t, int(e.get("swapped", 0)) + int(e.get("failed", 0)),
                                             float(e.get("elapsed_s", 0))))
        runs = []  # one rate series per run: keys finished between consecutive events of that run
        for ep in sorted(by_ep):
            pts, prev_n, prev_el = [], None, 0.0
            for t, n, el in by_ep[ep]:
                if prev_n is not None and el > prev_el:
                    pts.append((t, (n - prev_n) / (el - prev_el)))
                prev_n, prev_el = n, el
            if pts:
                runs.append(pts)
        pts = [p for r in runs for p in r]
        if not pts:
            _empty(ax, "not enough progress events for a rate")
        else:
            for i, r in enumerate(runs):
                ax.step([p[0] for p in r], [p[1] for p in r], where="pre", color="#3182bd",
                        label="keys finished per second (between events)" if i == 0 else None)
            if keys_per_s:
                ax.axhline(keys_per_s, color="#e6550d", linestyle="--", label=f"last run average {keys_per_s:,.0f}/s")
            ax.set_ylim(0, max([p[1] for p in pts] + [keys_per_s or 0, 1]) * 1.25)
            ax.set_xlabel("seconds since the first run started")
            ax.set_ylabel("keys / s")
            ax.legend(loc="upper right")
        ax.set_title("Throughput")
        return _png(fig)


def chart_latency(timings: list) -> bytes:
    with _rc():
        plt, fig = _figure("latency")
        stages = [s for s in ("copy", "verify", "swap") if any(t and t[0] == s for t in timings)]
        if not stages:
            ax = fig.add_subplot(111)
            _empty(ax, "no timings recorded")
            ax.set_title("Latency per stage")
            return _png(fig)
        for i, stage in enumerate(stages):
            ax = fig.add_subplot(1, len(stages), i + 1)
            ms = np.array([float(t[1]) for t in timings if t and t[0] == stage])
            ax.hist(ms, bins=min(40, max(5, len(ms) // 3)), color="#3182bd")
            p50, p95 = np.percentile(ms, 50), np.percentile(ms, 95)
            ax.axvline(p50, color="#2ca02c", linestyle="--", label=f"p50 {p50:.1f} ms")
            ax.axvline(p95, color="#d62728", linestyle="--", label=f"p95 {p95:.1f} ms")
            ax.set_xlabel("ms per store call")
            ax.set_ylabel("calls")
            ax.set_title(f"{stage} ({len(ms):,} calls)")
            ax.legend(loc="upper right", fontsize=8)
        fig.suptitle("Latency per stage (all runs)")
        return _png(fig)


def chart_outcomes(attempts: dict, reasons: dict, methods: dict) -> bytes:
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
        return _png(fig)


# ---------------------------------------------------------------- data

def collect_run_data(plan_dir: str, manifest: dict) -> dict:
    """Everything a run report shows, read from the plan directory (counts only).

    ``summary``: exact totals from the checkpoints (``summarize``) with the
    last run's elapsed time, rate, retries and timings from ``summary.json``;
    ``events``: progress events; ``timings``: per-call ``[stage, ms, keys]``
    lists of every run; ``attempts``: keys per number of copy attempts.
    """
    summary = summarize(plan_dir, manifest)
    prev = workdir.read_summary(plan_dir) or {}
    for k in ("elapsed_s", "total_elapsed_s", "keys_per_s", "runs", "retries_this_run", "timings"):
        if k in prev:
            summary[k] = prev[k]
    events, timings = [], []
    pdir = workdir.progress_dir(plan_dir)
    for path in fs.walk_files(pdir) if fs.exists(pdir) else []:
        name = path.rsplit("/", 1)[-1]
        if not name.endswith(".json") or name.startswith(".tmp-"):
            continue
        doc = workdir.read_json(path)
        if name.startswith("timings-"):
            if isinstance(doc, list):
                timings.extend(t for t in doc if isinstance(t, list) and len(t) >= 2)
        elif isinstance(doc, dict) and "epoch" in doc:
            events.append(doc)
    attempts: dict = {}
    plan_id = manifest["plan_id"]
    for f in manifest["files"]:
        t = ckpt.read_group(plan_dir, plan_id, f["group"]).table
        if t.num_rows:
            for v in pc.value_counts(t.column("attempts")):
                a = int(v["values"].as_py())
                attempts[a] = attempts.get(a, 0) + int(v["counts"].as_py())
    not_started = int(summary["planned"]) - sum(attempts.values())  # keys without any checkpoint yet
    if not_started > 0 and attempts:
        attempts[0] = attempts.get(0, 0) + not_started
    return {"summary": summary, "events": events, "timings": timings, "attempts": attempts,
            "has_run": bool(events or timings or attempts or prev)}


# ---------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:24px;color:#222;
background:#fff;max-width:1240px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
.sub{color:#666;font-size:13px;word-break:break-all}
table{border-collapse:collapse;font-size:13px;margin:8px 0}th,td{border:1px solid #ddd;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}.over{background:#fde0dd}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:12px 0}.card{border:1px solid #ddd;border-radius:6px;padding:8px 14px;
min-width:120px}.card b{display:block;font-size:20px}.card span{color:#666;font-size:12px}
img{max-width:100%;height:auto;border:1px solid #eee;margin:6px 0}
.ok{color:#2ca02c}.bad{color:#d62728}
"""


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _table(header: list, rows: list, classes: list | None = None) -> str:
    out = ["<table><tr>" + "".join(f'<th class="l">{_e(header[0])}</th>' if i == 0 else f"<th>{_e(h)}</th>"
                                   for i, h in enumerate(header)) + "</tr>"]
    for k, r in enumerate(rows):
        cls = f' class="{classes[k]}"' if classes and classes[k] else ""
        out.append(f"<tr{cls}>" + "".join(f'<td class="l">{_e(c)}</td>' if i == 0 else f"<td>{_e(c)}</td>"
                                          for i, c in enumerate(r)) + "</tr>")
    out.append("</table>")
    return "".join(out)


def _img(name: str, png: bytes, alt: str) -> str:
    w, h = CHARTS[name]
    data = base64.b64encode(png).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" width="{w}" height="{h}" alt="{_e(alt)}" id="{name}">'


def _card(value, label) -> str:
    return f"<div class=card><b>{_e(value)}</b><span>{_e(label)}</span></div>"


def render_html(manifest: dict, charts: dict, run: dict | None = None, *, title: str | None = None) -> str:
    """The report page: ``charts`` maps chart names to PNG bytes."""
    m = manifest
    snap = m.get("snapshot") or {}
    generated = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    parts = [
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>",
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; img-src data:; style-src \'unsafe-inline\'">',
        f"<title>{_e(title or 'shardmove report ' + m.get('plan_id', '')[:12])}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(title or 'shardmove migration report')}</h1>",
        f"<div class=sub>plan id {_e(m.get('plan_id', ''))} &middot; planned {_e(m.get('created_at', '?'))} "
        f"&middot; key type {_e(m.get('key_type', '?'))} &middot; report generated {generated}</div>",
    ]
    cards = [
        _card(f"{int(m.get('keys_examined', 0)):,}", "keys examined"),
        _card(f"{int(m.get('moves', 0)):,}", "keys to move"),
        _card(f"{100 * float(m.get('moved_fraction') or 0):.2f}%", "moved fraction"),
        _card(f"{100 * float(m.get('optimum_moved_fraction') or 0):.2f}%", "optimum"),
        _card(m.get("window") or "all", "window"),
    ]
    if run is not None:
        s = run["summary"]
        state = s.get("state") or ("complete" if s.get("complete") else "in progress")
        cards += [_card(f"{int(s['done']):,}", "done"), _card(f"{int(s['failed']):,}", "failed"), _card(state, "state")]
    parts.append("<div class=cards>" + "".join(cards) + "</div>")
    parts.append("<h2>Plan</h2>")
    parts.append(f"<p class=sub>snapshot digest {_e(snap.get('digest', ''))} &middot; version cutoff "
                 f"{_e(snap.get('cutoff'))} &middot; rows above cutoff {_e(snap.get('rows_above_cutoff', 0))}</p>")
    parts.append(_img("move_matrix", charts["move_matrix"], "moves by source and target shard"))
    parts.append(_table(["source", "target", "moves"], [[p["source"], p["target"], f"{int(p['moves']):,}"]
                                                        for p in m.get("pairs") or []]))
    parts.append(_img("shard_counts", charts["shard_counts"], "keys per shard before and after"))
    cap = m.get("capacity") or []
    if cap:
        rows, cls = [], []
        with_bytes = any("capacity_bytes" in r for r in cap)
        for r in cap:
            row = [r["shard"], f"{r['before']:,}", f"{r['after']:,}",
                   f"{r['capacity_keys']:,}" if "capacity_keys" in r else "",
                   f"{r['headroom_keys_pct']:.1f}%" if "headroom_keys_pct" in r else ""]
            if with_bytes:
                row += [f"{r['bytes_after']:,}" if "bytes_after" in r else "",
                        f"{r['capacity_bytes']:,}" if "capacity_bytes" in r else "",
                        f"{r['headroom_bytes_pct']:.1f}%" if "headroom_bytes_pct" in r else ""]
            rows.append(row + ["OVER" if r.get("over") else "ok"])
            cls.append("over" if r.get("over") else "")
        header = ["shard", "before", "after", "capacity_keys", "headroom"]
        if with_bytes:
            header += ["bytes_after", "capacity_bytes", "headroom_bytes"]
        parts.append(_table(header + ["capacity check"], rows, cls))
    else:
        parts.append(_table(["shard", "before", "after"],
                            [[s, f"{(m.get('shards_before') or {}).get(s, 0):,}", f"{n:,}"]
                             for s, n in (m.get("shards_after") or {}).items()]))
    parts.append(_img("moved_fraction", charts["moved_fraction"], "moved fraction against the optimum"))
    parts.append(_img("window", charts["window"], "phased window"))
    if run is not None:
        s = run["summary"]
        parts.append("<h2>Execution</h2>")
        st = s.get("states", {})
        parts.append(_table(["state", "keys"], [[k, f"{int(v):,}"] for k, v in st.items()]))
        facts = [["runs", s.get("runs", "")], ["last run elapsed (s)", s.get("elapsed_s", "")],
                 ["all runs elapsed (s)", s.get("total_elapsed_s", "")],
                 ["last run keys/s", s.get("keys_per_s", "")], ["copy attempts (all runs)", s.get("copy_attempts", "")],
                 ["retries (last run)", s.get("retries_this_run", "")],
                 ["skipped checkpoint files", s.get("skipped_checkpoint_files", 0)]]
        parts.append(_table(["measure", "value"], facts))
        parts.append(_img("progress_timeline", charts["progress_timeline"], "progress over time"))
        parts.append(_img("throughput", charts["throughput"], "throughput"))
        parts.append(_img("latency", charts["latency"], "latency per stage"))
        tm = s.get("timings") or {}
        if tm:
            parts.append(_table(["stage (last run)", "calls", "p50 ms", "p95 ms", "max ms"],
                                [[k, v.get("calls"), v.get("p50_ms"), v.get("p95_ms"), v.get("max_ms")]
                                 for k, v in sorted(tm.items())]))
        parts.append(_img("outcomes", charts["outcomes"], "retries, failures and verification methods"))
        fr = s.get("failures_by_reason") or {}
        dv = s.get("done_by_verification") or {}
        parts.append(_table(["outcome", "keys"], [[f"failed: {k}", f"{v:,}"] for k, v in fr.items()]
                            + [[f"done by {k} verification", f"{v:,}"] for k, v in dv.items()]))
    else:
        parts.append("<h2>Execution</h2><p class=sub>This plan has not run yet.</p>")
    parts.append("<p class=sub>Counts, shard ids and timings only: this report holds no key values.</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


# -------------------------------------------------------------- writers

def _write(out_dir: str, name: str, data: bytes) -> str:
    path = fs.join(out_dir, name)
    fs.write_atomic(path, data, mode=0o644)
    return path


def _plan_charts(manifest: dict) -> dict:
    return {
        "move_matrix": chart_move_matrix(manifest),
        "shard_counts": chart_shard_counts(manifest),
        "moved_fraction": chart_moved_fraction(manifest),
        "window": chart_window(manifest),
    }


def write_plan_report(manifest_like: dict, out_dir: str) -> str:
    """Write ``report.html`` and the plan charts into ``out_dir``; returns the HTML path.

    ``manifest_like``: a committed manifest or a dry run's ``PlanResult.manifest``
    (nothing needs to be committed).
    """
    fs.makedirs(out_dir, mode=0o755)
    charts = _plan_charts(manifest_like)
    for name, png in charts.items():
        _write(out_dir, f"{name}.png", png)
    return _write(out_dir, "report.html", render_html(manifest_like, charts).encode("utf-8"))


def write_report(plan_dir: str, *, out_dir: str | None = None) -> str:
    """The full report of a committed plan into ``<plan>/reports/`` (or ``out_dir``)."""
    manifest = workdir.load_manifest(plan_dir)
    out_dir = out_dir or workdir.reports_dir(plan_dir)
    fs.makedirs(out_dir, mode=0o755)
    run = collect_run_data(plan_dir, manifest)
    charts = _plan_charts(manifest)
    s = run["summary"]
    if run["has_run"]:
        charts["progress_timeline"] = chart_progress(run["events"], int(s["planned"]))
        charts["throughput"] = chart_throughput(run["events"], s.get("keys_per_s"))
        charts["latency"] = chart_latency(run["timings"])
        charts["outcomes"] = chart_outcomes(run["attempts"], s.get("failures_by_reason") or {},
                                            s.get("done_by_verification") or {})
    for name, png in charts.items():
        _write(out_dir, f"{name}.png", png)
    page = render_html(manifest, charts, run if run["has_run"] else None)
    path = _write(out_dir, "report.html", page.encode("utf-8"))
    LOG.info("report of plan %s written (%d charts)", manifest["plan_id"][:12], len(charts))
    return path
