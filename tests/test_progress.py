"""Progress in an operator's hands: status counts that agree with the bar (cumulative over
runs), progress per pair and per shard, progress lines for schedulers (text, JSON) while a
run or a plan goes, and a bar that log lines never tear."""
import io
import json
import logging
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time

from shardmove import api
from pipeline.config import load_config
from shardmove.progress import ProgressDisplay, resolve_mode

from conftest import run_cli

SM = os.path.join(os.path.dirname(sys.executable), "shardmove")
PROGRESS_RE = re.compile(r"^progress: (\d+)/(\d+) \([\d.]+%\) copied=(\d+) verified=(\d+) swapped=(\d+) "
                         r"failed=(\d+)$", re.M)
RUN_LINE_RE = re.compile(r"^progress: run (\d+)/(\d+) \([\d.]+%\) copied=\d+ verified=\d+ swapped=\d+ failed=\d+ "
                         r"rate=\d+ keys/s eta=(\d+s|\?) elapsed=\d+s$")


def _slow_cfg(tmp_path, keys=3000):
    info = api.create_demo_keyspace(str(tmp_path / "ks"), keys=keys, shards=4)
    with open(info["config"], "a") as f:
        f.write("checkpoint_flush_interval: 20ms\nswap_batch_size: 50\nprogress_interval: 100ms\n"
                "copy_concurrency: 2\nfaults: {copy: {latency_ms: 25, keys_per_call: 1}}\n")
    return info["config"]


def _plan(cfgpath):
    r = run_cli("plan", "--config", cfgpath)
    assert r.returncode == 0, r.stderr
    return next(l.split(": ", 1)[1] for l in r.stdout.splitlines() if l.startswith("plan id: "))


def _parts(plan_dir, epoch=None):
    root = os.path.join(plan_dir, "checkpoints")
    prefix = "part-" if epoch is None else f"part-{epoch:08d}-"
    return sum(len([f for f in fs if f.startswith(prefix)]) for _d, _s, fs in os.walk(root))


def _wait(cond, timeout=120, what="the run"):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"{what} never got there")


def _keys(cfgpath):
    con = sqlite3.connect(load_config(cfgpath).map_store["path"])
    keys = [k for (k,) in con.execute("SELECT key FROM shard_map")]
    con.close()
    return keys


def _status_progress(text):
    m = PROGRESS_RE.search(text)
    assert m, text
    done, total, copied, verified, swapped, failed = map(int, m.groups())
    return {"done": done, "total": total, "copied": copied, "verified": verified, "swapped": swapped,
            "failed": failed}


def _latest_event(plan_dir):
    d = os.path.join(plan_dir, "progress")
    names = sorted(n for n in os.listdir(d) if n.endswith(".json") and not n.startswith("timings"))
    return json.load(open(os.path.join(d, names[-1]))) if names else None


def test_status_is_cumulative_per_pair_and_lines_reach_a_log_while_running(tmp_path):
    cfgpath = _slow_cfg(tmp_path)
    plan_id = _plan(cfgpath)
    plan_dir = os.path.join(load_config(cfgpath).work_dir, "plans", plan_id)

    # 1. a first run, JSON progress lines, stopped by SIGTERM half-way
    with open(tmp_path / "run1.log", "w") as log1:
        p = subprocess.Popen([SM, "run", plan_id, "--config", cfgpath, "--progress", "json",
                              "--progress-log-interval", "100ms"], stdout=subprocess.PIPE, stderr=log1, text=True)
        _wait(lambda: _parts(plan_dir) >= 4)
        _wait(lambda: '"phase": "run"' in open(tmp_path / "run1.log").read(), what="a JSON progress line")
        p.send_signal(signal.SIGTERM)
        p.communicate(timeout=120)
    assert p.returncode == 130
    for line in open(tmp_path / "run1.log").read().splitlines():
        if line.startswith("{"):
            ev = json.loads(line)  # one object per line
            assert ev["phase"] == "run" and ev["plan_id"] == plan_id and ev["total"] > 0
            assert {"copied", "verified", "swapped", "failed", "rate_keys_per_s", "eta_s", "elapsed_s"} <= set(ev)
    st = run_cli("status", plan_id, "--config", cfgpath)
    assert st.returncode == 6 and "state: stopped" in st.stdout
    first = _status_progress(st.stdout)
    assert 0 < first["copied"] and first["done"] < first["total"]

    # 2. the rerun, stderr to a file (not a terminal): text lines while it runs; status read meanwhile
    log = tmp_path / "run2.log"
    with open(log, "w") as log2:
        p = subprocess.Popen([SM, "run", plan_id, "--config", cfgpath, "--progress-log-interval", "200ms"],
                             stdout=subprocess.PIPE, stderr=log2, text=True)
        try:
            _wait(lambda: _parts(plan_dir, epoch=2) >= 3)
            _wait(lambda: "progress: run " in log.read_text() or p.poll() is not None, what="a progress line")
            assert p.poll() is None, "the run ended before a progress line reached its log"
            live_lines = [l for l in log.read_text().splitlines() if l.startswith("progress: ")]
            ev = _latest_event(plan_dir)
            st = run_cli("status", plan_id, "--config", cfgpath)
            js = run_cli("status", plan_id, "--config", cfgpath, "--json")
        finally:
            out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out
    assert st.returncode == 5 and "state: running" in st.stdout, st.stdout  # read while the run was live
    live = _status_progress(st.stdout)
    # cumulative: the first run's keys count, and never less than the bar showed before status looked
    # (a key the first run copied but did not verify may be re-copied, so only the Done count is monotonic)
    assert live["swapped"] >= first["swapped"] and live["copied"] >= live["verified"] >= live["swapped"]
    assert live["copied"] > 0
    if ev is not None and ev["epoch"] == 2:
        assert live["swapped"] >= ev["swapped"]
    assert live_lines and all(RUN_LINE_RE.match(l) for l in live_lines), live_lines

    s = json.loads(js.stdout)
    # every key status --json had before, and the new ones
    assert {"plan_id", "planned", "done", "failed", "states", "failures_by_reason", "done_by_verification",
            "complete", "state", "max_epoch", "copy_attempts"} <= set(s)
    assert s["progress"]["swapped"] >= live["swapped"] and s["progress"]["total"] == s["planned"]
    assert sum(r["planned"] for r in s["pairs"]) == s["planned"]
    assert sum(r["out_planned"] for r in s["shards"]) == sum(r["in_planned"] for r in s["shards"]) == s["planned"]
    for r in s["pairs"]:
        assert r["done"] + r["failed"] + r["remaining"] == r["planned"]
        assert r["progress"] in ("not started", "moving", "done")

    # 3. complete: 100%, every pair done, the log ends with the final line, and no key anywhere
    st = run_cli("status", plan_id, "--config", cfgpath)
    assert st.returncode == 0
    fin = _status_progress(st.stdout)
    assert fin["done"] == fin["total"] == fin["swapped"] == fin["copied"]
    pair_lines = [l for l in st.stdout.splitlines() if l.startswith("pair ")]
    assert pair_lines and all(l.endswith("(done)") for l in pair_lines), pair_lines
    assert [l for l in st.stdout.splitlines() if l.startswith("shard ")]
    last = [l for l in log.read_text().splitlines() if l.startswith("progress: ")][-1]
    assert RUN_LINE_RE.match(last).group(1) == RUN_LINE_RE.match(last).group(2), last
    blob = "\n".join([log.read_text(), open(tmp_path / "run1.log").read(), st.stdout, js.stdout])
    assert not [k for k in _keys(cfgpath) if k in blob]


def test_plan_reports_segments_and_keys_examined(tmp_path):
    info = api.create_demo_keyspace(str(tmp_path / "ks"), keys=5000, shards=4)
    cfgpath = info["config"]
    with open(cfgpath, "a") as f:
        f.write("segment_size: 500\n")
    r = run_cli("plan", "--config", cfgpath, "--dry-run", "--progress", "text", "--progress-log-interval", "100ms")
    assert r.returncode == 0, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.startswith("progress: plan ")]
    assert lines, r.stderr
    m = re.match(r"progress: plan segments=(\d+) keys_examined=(\d+)/5000 ", lines[-1])
    assert m and int(m.group(1)) >= 10 and int(m.group(2)) == 5000, lines[-1]
    r = run_cli("plan", "--config", cfgpath, "--progress", "json", "--progress-log-interval", "100ms")
    assert r.returncode == 0, r.stderr
    evs = [json.loads(l) for l in r.stderr.splitlines() if l.startswith("{")]
    assert evs and evs[-1]["phase"] == "plan" and evs[-1]["keys_examined"] == 5000 and evs[-1]["final"]
    plan_dir = next(l.split(": ", 1)[1] for l in r.stdout.splitlines() if l.startswith("plan dir: "))
    assert not os.path.exists(os.path.join(plan_dir, "planning-progress"))  # marks never reach the plan
    r = run_cli("plan", "--config", cfgpath, "--progress", "none", "--progress-log-interval", "100ms")
    assert r.returncode == 0 and "progress" not in r.stderr, r.stderr
    r = run_cli("plan", "--config", cfgpath, "--progress", "sometimes")
    assert r.returncode == 2 and r.stderr.startswith("error: ")


class _Tty(io.StringIO):
    def isatty(self):
        return True


def _fields(done):
    return {"phase": "run", "plan_id": "0" * 64, "total": 100, "done": done, "copied": done, "verified": done,
            "swapped": done, "failed": 0, "remaining": 100 - done, "rate_keys_per_s": 10.0, "eta_s": 1.0,
            "elapsed_s": 1.0}


def test_log_lines_never_tear_the_bar():
    term = _Tty()
    assert resolve_mode("auto", term) == "bar" and resolve_mode("auto", io.StringIO()) == "text"
    root = logging.getLogger()
    handler = logging.StreamHandler(term)
    root.addHandler(handler)
    old_err = sys.stderr
    sys.stderr = term
    try:
        with ProgressDisplay("auto", 10.0, stream=term) as d:
            d.show(_fields(40))
            logging.getLogger("shardmove.test").warning("a warning while the bar is drawn")
            sys.stderr.write("warning: written straight to stderr\n")
            d.show(_fields(100), final=True)
        assert sys.stderr is term and handler.stream is term  # streams given back
    finally:
        sys.stderr = old_err
        root.removeHandler(handler)
    text = term.getvalue()
    # each line written while the bar was drawn starts on a cleared line, and the bar comes back after it
    for msg in ("a warning while the bar is drawn\n", "warning: written straight to stderr\n"):
        i = text.index(msg)
        assert text[i - 4:i] == "\r\x1b[K", repr(text)
        assert text[i + len(msg):].startswith("\r[") and "40/100" in text[i + len(msg):], repr(text)
    screen_lines = [l.rsplit("\r", 1)[-1].replace("\x1b[K", "") for l in text.split("\n")]
    assert screen_lines[0] == "a warning while the bar is drawn"  # not "[####...] 40/100 ...a warning"
    assert screen_lines[-2].startswith("[##############################] 100/100")


def test_text_lines_keep_their_interval():
    now = [0.0]
    out = io.StringIO()
    d = ProgressDisplay("text", 10.0, stream=out, clock=lambda: now[0])
    d.show(_fields(1))  # 0 s: not yet
    now[0] = 5.0
    d.show(_fields(2))
    assert out.getvalue() == ""
    now[0] = 10.5
    d.show(_fields(3))
    now[0] = 12.0
    d.show(_fields(4))
    d.show(_fields(100), final=True)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("progress: run 3/100 ") and " 100/100 " in lines[1]
    quiet = io.StringIO()
    d = ProgressDisplay("text", 10.0, stream=quiet, clock=lambda: 0.0)
    d.show(_fields(100), final=True)  # a run shorter than one interval writes nothing
    assert quiet.getvalue() == ""


def test_ctrl_c_on_a_terminal_logs_below_the_bar_not_into_it(tmp_path):
    """The bar on a real terminal (a pty); Ctrl-C makes every stage log ``stop requested``
    while the bar is drawn: each of those lines starts on a cleared line."""
    import pty
    import threading

    cfgpath = _slow_cfg(tmp_path)
    plan_id = _plan(cfgpath)
    master, slave = pty.openpty()
    p = subprocess.Popen([SM, "run", plan_id, "--config", cfgpath], stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=slave, text=True)
    os.close(slave)
    chunks = []

    def read():
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO: the run closed the terminal
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        _wait(lambda: b"keys/s ETA" in b"".join(chunks) and b"] 0/" not in b"".join(chunks)[-200:],
              what="the bar")
        p.send_signal(signal.SIGINT)
        out, _ = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
        reader.join(timeout=10)
        os.close(master)
    assert p.returncode == 130 and "interrupted" in out, out
    text = b"".join(chunks).decode("utf-8", "replace").replace("\r\n", "\n")
    # what the terminal shows: per line, what follows its last carriage return, minus erase codes
    screen = [line.split("\r")[-1].replace("\x1b[K", "") for line in text.split("\n")]
    stops = [s for s in screen if "stop requested" in s]
    assert stops, text
    assert not [s for s in screen if "ETA" in s and ("WARNING" in s or "stop requested" in s)], text
    assert all(s.split(" ", 2)[2].startswith("WARNING") for s in stops), stops  # each from its first column


def test_status_text_lists_at_most_50_pairs():
    from shardmove.progress import STATUS_ROWS, status_progress_lines

    pair = {"source": "a", "target": "b", "planned": 2, "done": 1, "failed": 0, "remaining": 1, "progress": "moving"}
    s = {"states": {"planned": 1, "done": 1}, "pairs": [pair] * (STATUS_ROWS + 10), "shards": []}
    lines = status_progress_lines(s)
    assert len([l for l in lines if l.startswith("pair a -> b: 1/2 done")]) == STATUS_ROWS
    assert "pairs: 10 more (status --json lists every pair)" in lines


def test_pair_and_shard_progress_add_up():
    from hypothesis import given, settings, strategies as st

    from shardmove.executor import pair_progress

    states = ("planned", "copying", "copied", "verifying", "verified", "swapping", "done", "failed")

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.tuples(st.sampled_from("abcd"), st.sampled_from("abcd"),
                              st.lists(st.sampled_from(states), max_size=30)), max_size=12))
    def check(groups):
        files, by_group = [], {}
        for i, (src, tgt, keys) in enumerate(groups):
            files.append({"group": f"g{i}", "source": src, "target": tgt, "rows": len(keys)})
            for name in keys:
                by_group.setdefault(f"g{i}", {}).setdefault(name, 0)
                by_group[f"g{i}"][name] += 1
        pairs, shards = pair_progress({"files": files}, by_group)
        total = sum(len(k) for _s, _t, k in groups)
        assert sum(p["planned"] for p in pairs) == total
        assert len({(p["source"], p["target"]) for p in pairs}) == len(pairs)
        for p in pairs:
            assert p["done"] + p["failed"] + p["remaining"] == p["planned"]
            assert p["copied"] >= p["done"]
            assert (p["progress"] == "done") == (p["remaining"] == 0)
        for way in ("planned", "done", "failed", "remaining"):
            assert sum(s[f"out_{way}"] for s in shards) == sum(s[f"in_{way}"] for s in shards) \
                == sum(p[way] for p in pairs)

    check()


def test_planning_fields_in_every_mode():
    fields = {"phase": "plan", "segments": 3, "keys_examined": 300, "keys_total": 1000, "rate_keys_per_s": 150.0,
              "eta_s": 4.7, "elapsed_s": 2.0}
    term = _Tty()
    with ProgressDisplay("bar", 10.0, stream=term) as d:
        d.show(fields)
    assert "[#########---------------------] segments=3 keys_examined=300/1000 150 keys/s ETA 5s" in term.getvalue()
    now = [0.0]
    text, js = io.StringIO(), io.StringIO()
    for mode, out in (("text", text), ("json", js)):
        d = ProgressDisplay(mode, 1.0, stream=out, clock=lambda: now[0])
        now[0] += 2
        d.show(fields)
    assert text.getvalue() == ("progress: plan segments=3 keys_examined=300/1000 (30.0%) rate=150 keys/s eta=5s "
                               "elapsed=2s\n")
    ev = json.loads(js.getvalue())
    assert ev["phase"] == "plan" and ev["keys_examined"] == 300 and ev["final"] is False and "time" in ev


def test_explicit_target_plan_reports_keys_examined(tmp_path):
    """The explicit-target planner (spilled sides, joined per partition) reports planning
    progress too: the snapshot's keys examined, to the last one."""
    import sqlite3

    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    info = api.create_demo_keyspace(str(tmp_path / "ks"), keys=3000, shards=3)
    cfgpath = info["config"]
    doc = yaml.safe_load(open(cfgpath))
    con = sqlite3.connect(os.path.join(os.path.dirname(cfgpath), doc["map_store"]["path"]))
    rows = list(con.execute("SELECT key, shard_id FROM shard_map ORDER BY key"))
    con.close()
    target = pa.table({"key": [k for k, _ in rows], "shard_id": ["s3" if i % 10 == 0 else s for i, (_k, s) in enumerate(rows)]})
    pq.write_table(target, str(tmp_path / "target.parquet"), row_group_size=500)
    doc["target"] = {"snapshot": str(tmp_path / "target.parquet"), "shards": [{"id": f"s{i}"} for i in range(4)]}
    doc["segment_size"] = 500
    with open(cfgpath, "w") as f:
        yaml.safe_dump(doc, f)
    r = run_cli("plan", "--config", cfgpath, "--dry-run", "--progress", "text", "--progress-log-interval", "100ms")
    assert r.returncode == 0, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.startswith("progress: plan ")]
    assert lines and re.match(r"progress: plan segments=\d+ keys_examined=3000/3000 ", lines[-1]), r.stderr
    assert "moves: 300 of 3000 keys (10.00%)" in r.stdout, r.stdout
