"""Plan and run reports: one self-contained HTML file plus the PNG charts beside it.

Never imports Beam.  The charts are drawn by :mod:`shardmove.charts`, each saved
twice: as a PNG next to the HTML (to attach on its own), and as SVG inlined in the
HTML, with its text kept as text, so the page is one file that can be mailed, and a
browser (and the tests, through headless Chromium) reads the axis labels, legends
and titles.  No scripts, no external resources.  Times are UTC.

* :func:`write_plan_report` works from a manifest alone -- the committed
  ``manifest.json`` or the in-memory ``PlanResult.manifest`` of a dry run --
  and draws the plan: the source x target move matrix, keys per shard before
  and after (with capacity lines), the moved fraction against the optimum,
  and the phased window.
* :func:`write_report` adds, for a plan that has run, the progress timeline
  and the throughput, one panel per run on a wall-clock axis (from
  ``progress/*.json``), the last run's latency per store call and per key
  (``progress/timings-<epoch>.json``, the same records as the table beside),
  copy attempts per key (retries), failures by reason and Done keys by
  verification method (:func:`shardmove.executor.summarize`, exact from the
  checkpoints).

Reports hold counts, shard ids and timings only -- never a key value.  Files
are replaced atomically (:func:`pipeline.fs.write_atomic`); rewriting a
report is idempotent.
"""
from __future__ import annotations

import datetime as _dt
import html
import logging

import pyarrow.compute as pc

from pipeline import checkpoint as ckpt
from pipeline import fs
from pipeline import workdir
from shardmove.charts import (CHARTS, PLAN_CHARTS, RUN_CHARTS, Chart, chart_latency, chart_move_matrix,
                              chart_moved_fraction, chart_outcomes, chart_progress, chart_shard_counts,
                              chart_throughput, chart_window, drained_shards, runs_from_events, shard_order,
                              timing_table)
from shardmove.executor import summarize

__all__ = ["CHARTS", "PLAN_CHARTS", "RUN_CHARTS", "Chart", "write_plan_report", "write_report", "collect_run_data",
           "render_html", "runs_from_events", "timing_table", "capacity_banner"]

LOG = logging.getLogger("shardmove.report")

# ---------------------------------------------------------------- data

def collect_run_data(plan_dir: str, manifest: dict) -> dict:
    """Everything a run report shows, read from the plan directory (counts only).

    ``summary``: exact totals from the checkpoints (``summarize``) with the
    last run's elapsed time, rate, retries and timings from ``summary.json``;
    ``events``: progress events; ``timings``: per-call ``[stage, ms, keys]``
    lists of every run, and ``last_timings`` those of the last run (``last_epoch``) alone;
    ``attempts``: keys per number of copy attempts.
    """
    summary = summarize(plan_dir, manifest)
    prev = workdir.read_summary(plan_dir) or {}
    for k in ("elapsed_s", "total_elapsed_s", "keys_per_s", "runs", "retries_this_run", "timings"):
        if k in prev:
            summary[k] = prev[k]
    events, timings, by_epoch = [], [], {}
    pdir = workdir.progress_dir(plan_dir)
    for path in fs.walk_files(pdir) if fs.exists(pdir) else []:
        name = path.rsplit("/", 1)[-1]
        if not name.endswith(".json") or name.startswith(".tmp-"):
            continue
        doc = workdir.read_json(path)
        if name.startswith("timings-"):
            if isinstance(doc, list):
                recs = [t for t in doc if isinstance(t, list) and len(t) >= 2]
                timings.extend(recs)
                try:
                    by_epoch.setdefault(int(name[len("timings-"):-len(".json")]), []).extend(recs)
                except ValueError:
                    pass
        elif isinstance(doc, dict) and "epoch" in doc:
            events.append(doc)
    last_epoch = max(by_epoch) if by_epoch else None
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
            "last_epoch": last_epoch, "last_timings": by_epoch.get(last_epoch, []) if last_epoch else [],
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
figure{margin:6px 0;border:1px solid #eee}figure svg{max-width:100%;height:auto;display:block}
.ok{color:#2ca02c}.bad{color:#d62728}.card.bad{border-color:#d62728;background:#fde0dd}
.banner{border:2px solid #d62728;background:#fde0dd;color:#a50f15;padding:10px 14px;margin:12px 0;border-radius:6px;
font-weight:600}.banner.info{border-color:#3182bd;background:#deebf7;color:#08519c}
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


def _chart(name: str, chart: Chart, alt: str) -> str:
    """The chart inlined as SVG (its labels stay text), in a ``<figure id=NAME>``."""
    return f'<figure id="{name}" role="img" aria-label="{_e(alt)}">{chart.svg}</figure>'


def _card(value, label, cls: str = "") -> str:
    return f"<div class=\"card{' ' + cls if cls else ''}\"><b>{_e(value)}</b><span>{_e(label)}</span></div>"


def capacity_banner(manifest: dict, *, dry_run: bool = False) -> str | None:
    """The banner text of a plan that fails the capacity check (None when it passes)."""
    over = [r["shard"] for r in manifest.get("capacity") or [] if r.get("over")]
    if not over:
        return None
    names = ", ".join(over[:8]) + (f" and {len(over) - 8} more" if len(over) > 8 else "")
    verdict = "this dry run would be refused: nothing was committed" if dry_run else "plan refuses it (exit 4)"
    return (f"capacity check FAILED: {len(over)} of {len(manifest.get('capacity') or [])} shards would end "
            f"over capacity ({names}); {verdict}")


def _capacity_word(r: dict, drained: set) -> str:
    if r.get("over"):
        return "OVER"
    return "drained" if r["shard"] in drained else "ok"


def render_html(manifest: dict, charts: dict, run: dict | None = None, *, title: str | None = None,
                dry_run: bool = False, name: str | None = None) -> str:
    """The report page: ``charts`` maps chart names to :class:`Chart`; ``name`` is the plan's name."""
    m = manifest
    snap = m.get("snapshot") or {}
    generated = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    parts = [
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>",
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; img-src data:; style-src \'unsafe-inline\'">',
        f"<title>{_e(title or 'shardmove report ' + (name or m.get('plan_id', '')[:12]))}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(title or 'shardmove migration report')}</h1>",
        f"<div class=sub>{'plan <b id=plan-name>' + _e(name) + '</b> &middot; ' if name else ''}"
        f"plan id {_e(m.get('plan_id', ''))} &middot; planned {_e(m.get('created_at', '?'))} "
        f"&middot; key type {_e(m.get('key_type', '?'))} &middot; report generated {generated} (UTC)</div>",
    ]
    if dry_run:
        parts.append('<div class="banner info" id="dry-run-banner">dry run: this plan was not committed</div>')
    banner = capacity_banner(m, dry_run=dry_run)
    if banner:
        parts.append(f'<div class="banner" id="capacity-banner">{_e(banner)}</div>')
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
        failed = int(s["failed"])
        cards += [_card(f"{int(s['done']):,}", "done"),
                  _card(f"{failed:,}", "failed", "bad" if failed else ""), _card(state, "state")]
    parts.append("<div class=cards>" + "".join(cards) + "</div>")
    parts.append("<h2>Plan</h2>")
    parts.append(f"<p class=sub>snapshot digest {_e(snap.get('digest', ''))} &middot; version cutoff "
                 f"{_e(snap.get('cutoff'))} &middot; rows above cutoff {_e(snap.get('rows_above_cutoff', 0))}</p>")
    parts.append(_chart("move_matrix", charts["move_matrix"], "moves by source and target shard"))
    parts.append(_table(["source", "target", "moves"], [[p["source"], p["target"], f"{int(p['moves']):,}"]
                                                        for p in m.get("pairs") or []]))
    parts.append(_chart("shard_counts", charts["shard_counts"], "keys per shard before and after"))
    cap = m.get("capacity") or []
    drained = drained_shards(m)
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
            rows.append(row + [_capacity_word(r, drained)])
            cls.append("over" if r.get("over") else "")
        header = ["shard", "before", "after", "capacity_keys", "headroom"]
        if with_bytes:
            header += ["bytes_after", "capacity_bytes", "headroom_bytes"]
        parts.append(_table(header + ["capacity check"], rows, cls))
    else:
        before = m.get("shards_before") or {}
        shards = shard_order(list(before) + list(m.get("shards_after") or {}))
        parts.append(_table(["shard", "before", "after", ""],
                            [[s, f"{int(before.get(s, 0)):,}", f"{int((m.get('shards_after') or {}).get(s, 0)):,}",
                              "drained" if s in drained else ""] for s in shards]))
    parts.append(_chart("moved_fraction", charts["moved_fraction"], "moved fraction against the optimum"))
    parts.append(_chart("window", charts["window"], "phased window"))
    if run is not None:
        s = run["summary"]
        parts.append("<h2>Execution</h2>")
        st = s.get("states", {})
        parts.append(_table(["state", "keys"], [[k, f"{int(v):,}"] for k, v in st.items()],
                            ["over" if k == "failed" and int(v) else "" for k, v in st.items()]))
        facts = [["runs", s.get("runs", "")], ["last run elapsed (s)", s.get("elapsed_s", "")],
                 ["all runs elapsed (s)", s.get("total_elapsed_s", "")],
                 ["last run keys/s", s.get("keys_per_s", "")], ["copy attempts (all runs)", s.get("copy_attempts", "")],
                 ["retries (last run)", s.get("retries_this_run", "")],
                 ["skipped checkpoint files", s.get("skipped_checkpoint_files", 0)]]
        parts.append(_table(["measure", "value"], facts))
        parts.append(_chart("progress_timeline", charts["progress_timeline"], "progress over time, per run"))
        parts.append(_chart("throughput", charts["throughput"], "throughput per run"))
        parts.append(_chart("latency", charts["latency"], "latency per stage, last run"))
        tt = timing_table(run.get("last_timings") or [])
        if tt:
            label = f"stage (run {run.get('last_epoch')}, the last)"
            parts.append(_table([label, "calls", "keys", "p50 ms/call", "p95 ms/call", "max ms/call", "p50 ms/key"],
                                [[r["stage"], f"{r['calls']:,}", f"{r['keys']:,}", r["p50_ms_per_call"],
                                  r["p95_ms_per_call"], r["max_ms_per_call"], r["p50_ms_per_key"]] for r in tt]))
        parts.append(_chart("outcomes", charts["outcomes"], "retries, failures and verification methods"))
        fr = s.get("failures_by_reason") or {}
        dv = s.get("done_by_verification") or {}
        parts.append(_table(["outcome", "keys"], [[f"failed: {k}", f"{v:,}"] for k, v in fr.items()]
                            + [[f"done by {k} verification", f"{v:,}"] for k, v in dv.items()],
                            ["over"] * len(fr) + [""] * len(dv)))
    else:
        parts.append("<h2>Execution</h2><p class=sub>This plan has not run yet.</p>")
    parts.append("<p class=sub>Counts, shard ids and timings only: this report holds no key values. "
                 "Times are UTC.</p>")
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


def write_plan_report(manifest_like: dict, out_dir: str, *, dry_run: bool = False,
                      plan_name: str | None = None) -> str:
    """Write ``report.html`` and the plan charts into ``out_dir``; returns the HTML path.

    ``manifest_like``: a committed manifest or a dry run's ``PlanResult.manifest``
    (nothing needs to be committed; ``dry_run`` says so on the page).
    """
    fs.makedirs(out_dir, mode=0o755)
    charts = _plan_charts(manifest_like)
    for name, chart in charts.items():
        _write(out_dir, f"{name}.png", chart.png)
    return _write(out_dir, "report.html", render_html(manifest_like, charts, dry_run=dry_run, name=plan_name).encode("utf-8"))


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
        charts["latency"] = chart_latency(run["last_timings"], f"run {run['last_epoch']}, the last"
                                          if run["last_epoch"] is not None else "")
        charts["outcomes"] = chart_outcomes(run["attempts"], s.get("failures_by_reason") or {},
                                            s.get("done_by_verification") or {})
    for name, chart in charts.items():
        _write(out_dir, f"{name}.png", chart.png)
    page = render_html(manifest, charts, run if run["has_run"] else None, name=workdir.plan_name(plan_dir))
    path = _write(out_dir, "report.html", page.encode("utf-8"))
    LOG.info("report of plan %s written (%d charts)", manifest["plan_id"][:12], len(charts))
    return path
