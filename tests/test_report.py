"""Reports: the plan report from a dry run, the full report of a run plan, rendered in
headless Chromium; and the run history behind ``shardmove history``.

Chromium is started by the test.  Without it the rendering test is skipped with a visible
reason -- unless CI=true, where it fails (``./run_local.sh test`` installs it).
"""
import glob
import os
import shutil
import sqlite3
import subprocess

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
    assert page.count("data:image/png;base64,") == len(R.PLAN_CHARTS)
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
    assert page.count("data:image/png;base64,") == len(R.CHARTS)
    assert "src=\"http" not in page and "<script" not in page  # self-contained, no scripts
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
        (tmp_path / f"{name}.png").write_bytes(png)
        w, h = R.CHARTS[name]
        img = _imread(str(tmp_path / f"{name}.png"))
        assert img.shape[:2] == (h, w) and float(np.var(img[..., :3])) > 1e-4, name
    rows, starts = R._timeline(ev)
    assert [round(t, 3) for t, _ep, _e in rows] == [1.0, 2.0, 61.0, 62.0] and [ep for _t, ep in starts] == [1, 2]


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        p = shutil.which(name)
        if p:
            return p
    return None


def test_report_renders_in_headless_chromium(cli_report, tmp_path):
    _r, html_path = cli_report
    browser = _chromium()
    if browser is None:
        msg = "chromium is not installed (apt-get install -y chromium); report rendering not checked"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    shot = tmp_path / "shot.png"
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,900",
           "file://" + os.path.abspath(html_path)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    except subprocess.TimeoutExpired:
        p = None
    if p is None or p.returncode != 0 or not shot.exists():
        msg = f"chromium could not render the report (rc={getattr(p, 'returncode', 'timeout')})"
        if os.environ.get("CI") == "true":
            pytest.fail(msg + "\n" + (p.stderr[-2000:] if p else ""))
        pytest.skip(msg)
    img = _imread(str(shot))
    assert img.shape[:2] == (900, 1200)
    rgb = img[..., :3]
    assert float(np.var(rgb)) > 1e-3, "screenshot is blank"
    # the first chart is on screen: a good share of non-white, non-grey (coloured) pixels
    coloured = (rgb.max(axis=2) - rgb.min(axis=2)) > 0.15
    assert coloured.mean() > 0.02, "no chart visible in the screenshot"


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
