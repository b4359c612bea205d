"""SIGINT/SIGTERM in every phase of ``shardmove run``, through the real CLI.

Each phase is reached deterministically: the run pauses at a named phase
(``SHARDMOVE_TEST_HOLD``, pipeline/faults.py ``hold_point``) and tells the test
by creating a file, or, mid-run, the test waits for committed checkpoint
parts of a slow mover.  Whatever the phase: exit 130, the lease and the
map-store claim are released, and a rerun completes the plan.
"""
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from pipeline.config import load_config
from pipeline.lease import read_lease
from shardmove.planner import load_manifest

from conftest import run_cli
from test_executor import _cli_cfg, _plan_cli, _wait_for_parts

SM = os.path.join(os.path.dirname(sys.executable), "shardmove")


def _start(plan_id, cfgpath, hold=None, hold_file=None):
    env = dict(os.environ)
    if hold:
        env.update(SHARDMOVE_TEST_HOLD=hold, SHARDMOVE_TEST_HOLD_FILE=hold_file)
    return subprocess.Popen([SM, "run", plan_id, "--config", cfgpath], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _wait_file(path, proc, timeout=180):
    t0 = time.time()
    while not os.path.exists(path):
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before the phase: {proc.communicate()}")
        if time.time() - t0 > timeout:
            raise AssertionError("the run never reached the phase")
        time.sleep(0.01)


def _claim_live(cfg, plan_id):
    con = sqlite3.connect(cfg.map_store["path"])
    try:
        rows = con.execute("SELECT expires_at FROM shardmove_runs WHERE plan_id = ?", (plan_id,)).fetchall()
    except sqlite3.OperationalError:  # no registry yet: never claimed
        rows = []
    finally:
        con.close()
    return any(r[0] > time.time() for r in rows)


def _assert_released_and_resumable(cfg, cfgpath, plan_id, plan_dir):
    lease = read_lease(plan_dir)
    assert lease is None or lease["released"], lease
    assert not _claim_live(cfg, plan_id)
    assert not os.path.exists(os.path.join(plan_dir, "stop"))
    r = run_cli("run", plan_id, "--config", cfgpath)
    assert r.returncode == 0, (r.stdout, r.stderr)
    n = load_manifest(plan_dir)["moves"]
    assert f"summary: planned={n} done={n} failed=0" in r.stdout
    saved = json.load(open(os.path.join(plan_dir, "summary.json")))
    assert (saved["planned"], saved["done"], saved["failed"]) == (n, n, 0)
    parts = [f for _d, _s, fs in os.walk(os.path.join(plan_dir, "checkpoints")) for f in fs if f.startswith("part-")]
    assert parts == []  # compacted, whichever run finished the plan
    assert read_lease(plan_dir)["released"] and not _claim_live(cfg, plan_id)


@pytest.fixture
def small_plan(tmp_path):
    cfgpath = _cli_cfg(tmp_path, keys=600, swap_batch_size=20)
    plan_id = _plan_cli(cfgpath)
    cfg = load_config(cfgpath)
    return cfg, cfgpath, plan_id, os.path.join(cfg.work_dir, "plans", plan_id)


@pytest.mark.parametrize("phase,sig", [("startup", signal.SIGTERM), ("lease", signal.SIGTERM),
                                       ("compaction", signal.SIGTERM), ("summary", signal.SIGINT)])
def test_signal_in_each_phase_exits_130_released_and_resumable(small_plan, tmp_path, phase, sig):
    cfg, cfgpath, plan_id, plan_dir = small_plan
    hold_file = str(tmp_path / f"at-{phase}")
    p = _start(plan_id, cfgpath, phase, hold_file)
    try:
        _wait_file(hold_file, p)
        p.send_signal(sig)
        out, err = p.communicate(timeout=180)
    finally:
        p.kill()
    assert p.returncode == 130, (out, err)
    assert "Traceback" not in err and "internal failure" not in err
    if phase == "startup":
        assert not os.path.exists(os.path.join(plan_dir, "lease.json"))  # nothing was taken
        assert "error: interrupted" in err
    else:
        assert "interrupted" in out
    if phase in ("compaction", "summary"):  # the pipeline had finished: the summary is written
        n = load_manifest(plan_dir)["moves"]
        assert f"summary: planned={n} done={n} failed=0" in out
        assert os.path.exists(os.path.join(plan_dir, "summary.json"))
    _assert_released_and_resumable(cfg, cfgpath, plan_id, plan_dir)


@pytest.mark.parametrize("signals", [[signal.SIGINT], [signal.SIGINT, signal.SIGINT], [signal.SIGTERM, signal.SIGINT]])
def test_signals_mid_run_exit_130_released_and_resumable(tmp_path, signals):
    cfgpath = _cli_cfg(tmp_path, keys=2000, checkpoint_flush_interval="20ms", swap_batch_size=50)
    with open(cfgpath, "a") as f:
        f.write("faults: {copy: {latency_ms: 5, keys_per_call: 1}}\n")
    plan_id = _plan_cli(cfgpath)
    cfg = load_config(cfgpath)
    plan_dir = os.path.join(cfg.work_dir, "plans", plan_id)
    p = _start(plan_id, cfgpath)
    try:
        _wait_for_parts(plan_dir, 2)
        for s in signals:  # a double Ctrl-C: the second one while the first is being honoured
            p.send_signal(s)
            time.sleep(0.05)
        out, err = p.communicate(timeout=180)
    finally:
        p.kill()
    assert p.returncode == 130, (out, err)
    assert "interrupted" in out and "internal failure" not in err and "Traceback" not in err
    _assert_released_and_resumable(cfg, cfgpath, plan_id, plan_dir)


@pytest.mark.parametrize("phase", ["compaction", "summary"])
def test_kill_after_the_pipeline_the_rerun_writes_summary_and_compacts(small_plan, tmp_path, phase):
    """SIGKILL once every key is terminal but before the summary: the rerun has nothing to
    run, and still ends the plan with its summary.json and compacted checkpoints."""
    cfg, cfgpath, plan_id, plan_dir = small_plan
    hold_file = str(tmp_path / f"at-{phase}")
    p = _start(plan_id, cfgpath, phase, hold_file)
    try:
        _wait_file(hold_file, p)
        p.send_signal(signal.SIGKILL)
        p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == -signal.SIGKILL
    assert not os.path.exists(os.path.join(plan_dir, "summary.json"))
    r = run_cli("run", plan_id, "--config", cfgpath)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert "nothing to do: plan already complete" in r.stdout
    _assert_released_and_resumable(cfg, cfgpath, plan_id, plan_dir)
    saved = json.load(open(os.path.join(plan_dir, "summary.json")))
    assert saved["complete"] and saved["runs"] == 1


def test_run_local_demo_sigterm_to_the_process_group_exits_130(tmp_path):
    """./run_local.sh execs the executor: SIGTERM to the script's process group stops the
    run gracefully, and the script itself reports 130 (not killed while the run goes on)."""
    import shutil

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name in ("run_local.sh", "pyproject.toml"):
        shutil.copy(os.path.join(root, name), tmp_path / name)
    venv = tmp_path / ".venv"
    venv.mkdir()
    os.symlink(os.path.dirname(sys.executable), venv / "bin")  # this suite's interpreter and console script
    digest = subprocess.run("sha256sum < pyproject.toml | cut -c1-16", shell=True, cwd=tmp_path,
                            capture_output=True, text=True).stdout.strip()
    (venv / f".installed-{digest}-base").touch()  # installed: the script must not pip install
    hold_file = str(tmp_path / "at-lease")
    env = dict(os.environ, DEMO_KEYS="600", SHARDMOVE_TEST_HOLD="lease", SHARDMOVE_TEST_HOLD_FILE=hold_file)
    p = subprocess.Popen(["./run_local.sh"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _wait_file(hold_file, p)
        os.killpg(p.pid, signal.SIGTERM)
        out, err = p.communicate(timeout=180)
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert p.returncode == 130, (out, err)
    plan_id = (tmp_path / "demo" / "PLAN").read_text().strip()
    plan_dir = tmp_path / "demo" / "work" / "plans" / plan_id
    assert read_lease(str(plan_dir))["released"]


def _catches_sigterm(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    return False


def test_sigterm_at_the_first_moment_exits_130(small_plan):
    """The console script installs the handler before importing the CLI: SIGTERM as soon as
    the process catches it (long before the lease) exits 130 and holds nothing."""
    cfg, cfgpath, plan_id, plan_dir = small_plan
    p = _start(plan_id, cfgpath)
    try:
        t0 = time.time()
        while not _catches_sigterm(p.pid):
            assert p.poll() is None and time.time() - t0 < 60
            time.sleep(0.001)
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=120)
    finally:
        p.kill()
    assert p.returncode == 130, (out, err)
    assert "error: interrupted" in err and "Traceback" not in err
    assert not os.path.exists(os.path.join(plan_dir, "lease.json"))
    _assert_released_and_resumable(cfg, cfgpath, plan_id, plan_dir)
