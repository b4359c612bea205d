"""Reports: the plan report from a dry run, the full report of a run plan, rendered in
headless Chromium; and the run history behind ``shardmove history``.

Chromium is started by the test.  Without it the rendering test is skipped with a visible
reason -- unless CI=true, where it fails (``./run_local.sh test`` installs it).
"""
import glob
import os
import re
import shutil
import sqlite3
import subprocess
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from shardmove import api
from shardmove import history as H
from shardmove import report as R
from pipeline.config import load_config

from conftest import run_cli


def quiet(_line):
    pass


def _imread(path):
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.image as mpimg

    return mpimg.imread(path)


@pytest.fixture(scope="module")
def ran_plan(tmp_path_factory):
    """A demo keyspace, planned and run to completion (once for the module)."""
    d = tmp_path_factory.mktemp("report")
    info = api.create_demo_keyspace(str(d / "ks"), keys=2000, shards=4)
    cfg = load_config(info["config"]).with_options(swap_batch_size=100, hash_buckets=2, progress_interval="100ms",
                                                   checkpoint_flush_interval="50ms")
    res = api.plan(cfg, out=quiet)
    run = api.run(cfg, res.plan_dir, out=quiet)
    assert run.exit_code == 0, run.summary
    con = sqlite3.connect(cfg.map_store["path"])
    keys = [k for (k,) in con.execute("SELECT key FROM shard_map")]
    con.close()
    return info["config"], cfg, res, keys


def _no_keys_in(text, keys):
    leaked = [k for k in keys if k in text]
    assert not leaked, f"{len(leaked)} key values leaked into a report"


def test_plan_report_from_dry_run_manifest_commits_nothing(ran_plan, tmp_path):
    _path, cfg, ran, _keys = ran_plan
    committed = sorted(glob.glob(os.path.join(cfg.work_dir, "plans", "*", "manifest.json")))
    cfg = cfg.with_options(window="00-7F")
    res = api.plan(cfg, dry_run=True, out=quiet)
    assert res.plan_id != ran.plan_id and res.plan_dir is None
    out = tmp_path / "dry-report"
    path = R.write_plan_report(res.manifest, str(out))
    assert path == str(out / "report.html")
    assert sorted(os.listdir(out)) == sorted(["report.html"] + [f"{n}.png" for n in R.PLAN_CHARTS])
    for name in R.PLAN_CHARTS:
        w, h = R.CHARTS[name]
        assert _imread(str(out / f"{name}.png")).shape[:2] == (h, w)
    page = (out / "report.html").read_text()
    assert page.count("<figure id=") == len(R.PLAN_CHARTS) and page.count("<svg") == len(R.PLAN_CHARTS)
    assert "This plan has not run yet" in page and res.plan_id in page and "00-7F" in page
    assert sorted(glob.glob(os.path.join(cfg.work_dir, "plans", "*", "manifest.json"))) == committed  # no new plan


@pytest.fixture(scope="module")
def cli_report(ran_plan):
    """``shardmove report`` of the run plan (rendered once for the module)."""
    path, _cfg, res, _keys = ran_plan
    r = run_cli("report", res.plan_id, "--config", path)
    assert r.returncode == 0, r.stderr
    return r, os.path.join(res.plan_dir, "reports", "report.html")


def test_report_cli_writes_html_and_pngs_of_expected_size(ran_plan, cli_report):
    path, cfg, res, keys = ran_plan
    r, html_path = cli_report
    assert r.stdout.strip() == f"report: {html_path}"
    page = open(html_path, encoding="utf-8").read()
    for name, (w, h) in R.CHARTS.items():
        png = os.path.join(res.plan_dir, "reports", f"{name}.png")
        img = _imread(png)
        assert img.shape[:2] == (h, w), name
        assert float(np.var(img[..., :3])) > 1e-4, f"{name}.png is blank"
        assert f'id="{name}"' in page
    assert page.count("<svg") == len(R.CHARTS)
    assert "src=\"http" not in page and "href=\"http" not in page.replace('"http://www.w3.org', "") and "<script" not in page  # self-contained, no scripts
    assert f"{res.manifest['moves']:,}" in page and "complete" in page
    _no_keys_in(page, keys)


def test_run_data_matches_summary(ran_plan):
    _path, cfg, res, _keys = ran_plan
    from shardmove.planner import load_manifest

    data = R.collect_run_data(res.plan_dir, load_manifest(res.plan_dir))
    s = data["summary"]
    assert s["done"] == res.manifest["moves"] and s["complete"]
    assert sum(data["attempts"].values()) == s["planned"]
    assert sum(a * n for a, n in data["attempts"].items()) == s["copy_attempts"]
    last = data["events"][-1]
    assert last["final"] and last["swapped"] == s["done"] and last["failed"] == 0
    assert {t[0] for t in data["timings"]} == {"copy", "verify", "swap"}


def test_report_charts_from_synthetic_data_two_runs_and_odd_shard_ids(tmp_path):
    """Charts never need Beam: a manifest-like dict and events of an interrupted + resumed plan."""
    manifest = {"plan_id": "f" * 64, "moves": 30, "keys_examined": 100, "keys_in_window": 100, "window": None,
                "moved_fraction": 0.3, "optimum_moved_fraction": 0.25, "key_type": "string",
                "snapshot": {"digest": "0" * 64, "cutoff": 5},
                "pairs": [{"source": "a$b$", "target": "<x&y>", "moves": 30}],
                "shards_before": {"a$b$": 100}, "shards_after": {"a$b$": 70, "<x&y>": 30},
                "capacity": [{"shard": "<x&y>", "before": 0, "after": 30, "capacity_keys": 31,
                              "headroom_keys_pct": 3.2, "over": True}]}
    path = R.write_plan_report(manifest, str(tmp_path))
    page = open(path, encoding="utf-8").read()
    assert "&lt;x&amp;y&gt;" in page and "<x&y>" not in page and "OVER" in page
    ev = [{"epoch": 1, "time": "2026-01-01T00:00:01Z", "elapsed_s": 1.0, "copied": 10, "verified": 5, "swapped": 0,
           "failed": 0}, {"epoch": 1, "time": "2026-01-01T00:00:02Z", "elapsed_s": 2.0, "copied": 20, "verified": 20,
                          "swapped": 10, "failed": 0},
          {"epoch": 2, "time": "2026-01-01T00:01:01Z", "elapsed_s": 0.5, "copied": 20, "verified": 20, "swapped": 10,
           "failed": 0}, {"epoch": 2, "time": "2026-01-01T00:01:02Z", "elapsed_s": 1.5, "copied": 30,
                          "verified": 30, "swapped": 28, "failed": 2}]
    for name, png in (("progress_timeline", R.chart_progress(ev, 30)), ("throughput", R.chart_throughput(ev, 9.5)),
                      ("latency", R.chart_latency([["copy", 3.0, 10], ["swap", 5.0, 10], ["copy", 4.0, 10]])),
                      ("outcomes", R.chart_outcomes({1: 28, 2: 2}, {"verify_mismatch": 2}, {"hash": 28}))):
        (tmp_path / f"{name}.png").write_bytes(png.png)
        w, h = R.CHARTS[name]
        img = _imread(str(tmp_path / f"{name}.png"))
        assert img.shape[:2] == (h, w) and float(np.var(img[..., :3])) > 1e-4, name
    runs = R.runs_from_events(ev)
    assert [(r.epoch, r.start, r.base, r.finished) for r in runs] == [(1, 1767225600.0, 0, 10), (2, 1767225660.5, 10, 20)]
    assert runs[0].keys_per_s == 5.0 and round(runs[1].keys_per_s, 3) == round(20 / 1.5, 3)


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        p = shutil.which(name)
        if p:
            return p
    return None


def _in_chromium(tmp_path, html_path, *args):
    """Run headless Chromium on the page; its CompletedProcess (skip, or fail under CI,
    when Chromium is missing or cannot render)."""
    browser = _chromium()
    if browser is None:
        msg = "chromium is not installed (apt-get install -y chromium); report rendering not checked"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", *args, "file://" + os.path.abspath(html_path)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    except subprocess.TimeoutExpired:
        p = None
    if p is None or p.returncode != 0:
        msg = f"chromium could not render the report (rc={getattr(p, 'returncode', 'timeout')})"
        if os.environ.get("CI") == "true":
            pytest.fail(msg + "\n" + (p.stderr[-2000:] if p else ""))
        pytest.skip(msg)
    return p


_SVG = "{http://www.w3.org/2000/svg}"


def _figure_svg(dom: str, name: str):
    """The inline SVG of chart ``name`` as the browser holds it (its DOM, dumped)."""
    m = re.search(rf'<figure id="{name}"[^>]*>(.*?)</figure>', dom, re.S)
    assert m, f"chart {name} is not on the page"
    return ET.fromstring(m.group(1))


def _texts(el) -> list:
    return [t.text or "" for t in el.iter(_SVG + "text")]


def _groups(svg, prefix: str) -> list:
    return [g for g in svg.iter(_SVG + "g") if (g.get("id") or "").startswith(prefix)]


def _x_tick_labels(svg) -> list:
    """Per axes, the labels of its x ticks, in order."""
    return [[t for tick in _groups(axis, "xtick_") for t in _texts(tick)]
            for axis in _groups(svg, "matplotlib.axis_") if _groups(axis, "xtick_")]


def test_report_renders_in_headless_chromium(cli_report, tmp_path):
    _r, html_path = cli_report
    shot = tmp_path / "shot.png"
    _in_chromium(tmp_path, html_path, f"--screenshot={shot}", "--window-size=1200,900")
    assert shot.exists()
    img = _imread(str(shot))
    assert img.shape[:2] == (900, 1200)
    rgb = img[..., :3]
    assert float(np.var(rgb)) > 1e-3, "screenshot is blank"
    # the first chart is on screen: a good share of non-white, non-grey (coloured) pixels
    coloured = (rgb.max(axis=2) - rgb.min(axis=2)) > 0.15
    assert coloured.mean() > 0.02, "no chart visible in the screenshot"


def test_run_report_in_chromium_reads_per_run_wall_clock_and_labelled_latency(cli_report, tmp_path):
    """What an operator reads: each run on its own wall-clock axis (UTC times as tick labels),
    the last run's latency per call and per key, with the table beside built from the same
    records, and the window axis in hex up to FF."""
    _r, html_path = cli_report
    dom = _in_chromium(tmp_path, html_path, "--dump-dom").stdout
    tp = _figure_svg(dom, "throughput")
    ticks = _x_tick_labels(tp)
    assert len(ticks) == 1 and len(ticks[0]) >= 2, ticks  # one run: one panel, readable ticks
    assert all(re.fullmatch(r"\d\d:\d\d:\d\d(\.\d)?", t) for t in ticks[0]), ticks
    assert any(t.startswith("run 1: ") for t in _texts(tp))
    legend = [t for g in _groups(tp, "legend_") for t in _texts(g)]
    assert "run average" in legend and any("between progress events" in t for t in legend)
    lat = _figure_svg(dom, "latency")
    texts = " ".join(_texts(lat))
    assert "run 1, the last" in texts and "ms per call" in texts and "ms per key" in texts
    assert "Latency per stage (all runs)" not in texts
    assert "p50 ms/call" in dom and "p50 ms/key" in dom and "stage (run 1, the last)" in dom
    assert _x_tick_labels(_figure_svg(dom, "window"))[0][-1] == "FF"


def test_dry_run_report_over_capacity_in_chromium(ran_plan, tmp_path):
    """A dry run that fails the capacity check: a banner says so, the red bar has its legend
    entry, a drained shard says drained (not ok), and the window axis ends at FF."""
    import yaml

    path, cfg, _res, keys = ran_plan
    doc = yaml.safe_load(open(path))
    shards = [t["id"] for t in doc["target"]["shards"]]  # where the run left the keys
    doc["current_shards"] = shards
    kept = shards[1:]  # the first shard is drained
    doc["target"] = {"profile": "native", "shards": [{"id": s, "weight": 1, "capacity_keys": 100} for s in kept]}
    conf = tmp_path / "tight.yaml"
    for k in ("work_dir",):  # relative paths are relative to the config file: make them absolute
        doc[k] = os.path.join(os.path.dirname(path), doc[k])
    doc["map_store"]["path"] = os.path.join(os.path.dirname(path), doc["map_store"]["path"])
    doc["data_store"]["directory"] = os.path.join(os.path.dirname(path), doc["data_store"]["directory"])
    conf.write_text(yaml.safe_dump(doc))
    out = tmp_path / "dry"
    r = run_cli("plan", "--config", str(conf), "--dry-run", "--report-dir", str(out))
    assert r.returncode == 4, r.stderr  # refused by the capacity check
    assert "capacity check: FAILED" in r.stdout
    html_path = out / "report.html"
    dom = _in_chromium(tmp_path, html_path, "--dump-dom").stdout
    banner = re.search(r'<div class="banner" id="capacity-banner">(.*?)</div>', dom, re.S)
    assert banner and banner.group(1).startswith(f"capacity check FAILED: {len(kept)} of {len(kept) + 1} shards")
    assert "nothing was committed" in banner.group(1) and 'id="dry-run-banner"' in dom
    sc = _figure_svg(dom, "shard_counts")
    legend = [t for g in _groups(sc, "legend_") for t in _texts(g)]
    assert legend == ["before", "after: over capacity", "capacity_keys"], legend  # every shard kept is over
    assert "drained" in _texts(sc)
    rows = re.findall(r"<tr[^>]*><td class=\"l\">([^<]*)</td>(?:<td>[^<]*</td>)*?<td>(OVER|ok|drained)</td></tr>", dom)
    assert (shards[0], "drained") in rows and all(w == "OVER" for s, w in rows if s in kept), rows
    win = _figure_svg(dom, "window")
    labels = _x_tick_labels(win)[0]
    assert labels[0] == "00" and labels[-1] == "FF" and "100" not in labels
    assert any("all keys (no window)" in t for t in _texts(win))
    _no_keys_in(dom, keys)


def test_throughput_of_a_resumed_plan_gives_each_short_run_its_own_axis(tmp_path):
    """Two 1-second runs an hour apart: two panels, each spanning about its own run (not one
    axis where both are spikes), each with the run's own average (not the last run's)."""
    ev = []
    for ep, hour, done in ((1, 10, (100, 400)), (2, 11, (500, 1000))):
        ev += [{"epoch": ep, "time": f"2026-01-01T{hour}:00:01Z", "elapsed_s": 0.5, "swapped": done[0], "failed": 0},
               {"epoch": ep, "time": f"2026-01-01T{hour}:00:01Z", "elapsed_s": 1.0, "swapped": done[1], "failed": 0,
                "final": True}]
    chart = R.chart_throughput(ev, 600.0)
    svg = ET.fromstring(chart.svg)
    ticks = _x_tick_labels(svg)
    assert len(ticks) == 2, ticks
    for labels, hour in zip(ticks, ("10", "11")):
        assert labels and all(t.startswith(f"{hour}:00:0") for t in labels), labels  # seconds, not hours
    texts = _texts(svg)
    assert "400/s" in texts and "600/s" in texts  # run 1 from its events, run 2 from summary.json
    assert any(t.startswith("Throughput per run (2 runs)") for t in texts)
    runs = R.runs_from_events(ev)
    assert [r.keys_per_s for r in runs] == [400.0, 600.0]


def test_failed_counts_are_highlighted(tmp_path):
    manifest = {"plan_id": "e" * 64, "moves": 10, "keys_examined": 40, "pairs": [{"source": "a", "target": "b",
                                                                                  "moves": 10}],
                "shards_before": {"a": 40}, "shards_after": {"a": 30, "b": 10}}
    charts = {n: R.chart_window(manifest) for n in R.CHARTS}
    run = {"summary": {"done": 7, "failed": 3, "states": {"done": 7, "failed": 3}, "complete": True,
                       "failures_by_reason": {"verify_mismatch": 3}}, "last_timings": [], "last_epoch": 1}
    page = R.render_html(manifest, charts, run)
    assert '<div class="card bad"><b>3</b><span>failed</span>' in page
    assert '<tr class="over"><td class="l">failed</td>' in page
    assert '<tr class="over"><td class="l">failed: verify_mismatch</td>' in page
    ok = R.render_html(manifest, charts, {**run, "summary": {**run["summary"], "failed": 0, "states": {"done": 10},
                                                              "failures_by_reason": {}}})
    assert "card bad" not in ok and 'class="over"' not in ok and "capacity-banner" not in ok


# ----------------------------------------------------------------- history

def test_history_records_are_new_files_and_read_back_in_order(tmp_path):
    work = str(tmp_path / "work")
    a = H.record(work, "plan", "ab" * 32, 0, {"moves": 12})
    b = H.record(work, "run", "ab" * 32, 3, {"done": 10, "failed": 2})
    c = H.record(work, "run", "cd" * 32, "ok", {})
    assert len({a, b, c}) == 3 and all(os.path.dirname(p) == os.path.join(work, "history") for p in (a, b, c))
    for p in (a, b, c):
        assert oct(os.stat(p).st_mode & 0o777) == "0o600"
    recs = H.read_history(work)
    assert [r["command"] for r in recs] == ["plan", "run", "run"]
    assert [r["outcome"] for r in recs] == ["ok", "failed_keys", "ok"]
    assert recs[1]["exit_code"] == 3 and recs[1]["details"] == {"done": 10, "failed": 2}
    assert "@" in recs[0]["who"] and recs[0]["when"].endswith("Z")
    assert [r["command"] for r in H.read_history(work, plan_id="ab" * 32)] == ["plan", "run"]
    assert len(H.read_history(work, limit=1)) == 1 and H.read_history(work, limit=1)[0]["plan_id"] == "cd" * 32
    # a torn / foreign file is skipped, not fatal
    with open(os.path.join(work, "history", "zzz-broken.json"), "w") as f:
        f.write("{not json")
    assert len(H.read_history(work)) == 3


def test_history_never_overwrites_and_is_best_effort(tmp_path):
    work = tmp_path / "work"
    names = {os.path.basename(H.record(str(work), "run", None, 0)) for _ in range(50)}
    assert len(names) == 50 and len(os.listdir(work / "history")) == 50
    blocker = tmp_path / "file-not-dir"
    blocker.write_text("x")
    assert H.record(str(blocker), "run", None, 0) is None  # a failing audit write never fails the command
    with pytest.raises(OSError):
        H.record(str(blocker), "run", None, 0, strict=True)


def test_history_cli(tmp_path):
    work = tmp_path / "work"
    H.record(str(work), "plan", "ef" * 32, 0, {"moves": 7})
    r = run_cli("history", "--work-dir", str(work))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[-1] == "history: 1 records"
    assert " plan " + "ef" * 6 + " ok moves=7" in lines[0]
    j = run_cli("history", "--work-dir", str(work), "--json")
    assert j.returncode == 0 and '"command": "plan"' in j.stdout
    # a full id filters even when its plan directory is gone (a deleted plan keeps its records)
    f = run_cli("history", "--work-dir", str(work), "--plan", "ef" * 32)
    assert f.returncode == 0 and f.stdout.splitlines()[-1] == "history: 1 records", f.stderr


def test_history_recorded_context_records_success_and_failure(tmp_path):
    from pipeline.errors import BadInput, Refused
    from pipeline.lease import LeaseLost

    work = str(tmp_path / "work")
    with H.recorded(work, "run", "12" * 32) as h:
        h["code"], h["details"] = 3, {"done": 5, "failed": 1}
    for refusal in (Refused("plan: 2 keys drifted since the plan's snapshot"), BadInput("plan: 1 keys are empty")):
        with pytest.raises(type(refusal)):  # a refusal changed nothing: not even the history
            with H.recorded(work, "run", "12" * 32) as h:
                raise refusal
    with pytest.raises(LeaseLost):  # exit 4 too, but the run had done work: recorded
        with H.recorded(work, "run", "12" * 32) as h:
            raise LeaseLost("plan 121212121212: this executor's lease (epoch 2) was taken over")
    recs = H.read_history(work)
    assert [(r["outcome"], r.get("exit_code")) for r in recs] == [("failed_keys", 3), ("refused", 4)]
    assert recs[1]["details"]["error"].startswith("plan 121212121212: this executor's lease")
