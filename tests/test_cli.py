"""End to end through the real console script: demo -> snapshot -> plan -> run -> status."""
import os
import re

import pytest

from conftest import run_cli

PLAN_RE = re.compile(r"^plan id: ([0-9a-f]{64})$", re.M)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    d = tmp_path_factory.mktemp("demo")
    r = run_cli("demo", str(d), "--keys", "3000", "--shards", "4")
    assert r.returncode == 0, r.stderr
    return str(d / "shardmove.yaml")


def one_error_line(r, code):
    assert r.returncode == code, (r.stdout, r.stderr)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr
    return lines[0]


def test_help_on_every_subcommand():
    for sub in ("demo", "snapshot", "plan", "run", "status"):
        r = run_cli(sub, "--help")
        assert r.returncode == 0 and "usage: shardmove " + sub in r.stdout


def test_plan_twice_same_plan_id_then_run_and_status(demo):
    ids = []
    for _ in range(2):
        r = run_cli("plan", "--config", demo)
        assert r.returncode == 0, r.stderr
        ids += PLAN_RE.findall(r.stdout)
    assert len(set(ids)) == 1
    plan_id = ids[0]
    dry = run_cli("plan", "--config", demo, "--dry-run")
    assert dry.returncode == 0 and PLAN_RE.findall(dry.stdout) == [plan_id] and "dry run: no plan committed" in dry.stdout
    st = run_cli("status", plan_id, "--config", demo)
    # planned, nobody running: exit 6, no summary line (CONTRACTS prints it for a complete plan only)
    assert st.returncode == 6 and "state: planned" in st.stdout and "summary: planned=" not in st.stdout
    r = run_cli("run", plan_id, "--config", demo)
    assert r.returncode == 0, r.stderr
    m = re.search(r"^summary: planned=(\d+) done=(\d+) failed=0$", r.stdout, re.M)
    assert m and m.group(1) == m.group(2)
    again = run_cli("run", plan_id, "--config", demo)
    assert again.returncode == 0 and "nothing to do: plan already complete" in again.stdout
    st = run_cli("status", plan_id, "--config", demo, "--json")
    assert st.returncode == 0 and '"complete": true' in st.stdout


def test_snapshot_command(demo):
    r = run_cli("snapshot", "--config", demo)
    assert r.returncode == 0 and "snapshot digest: " in r.stdout


@pytest.mark.parametrize("args,match", [
    (["--copy-concurrency", "0"], r"option copy_concurrency: '0' is out of range"),
    (["--verification", "psychic"], r"option verification: expected one of full, hash, sampled"),
    (["--window", "F0-10"], r"option window: start F0 is after end 10"),
])
def test_bad_flags_exit_2(demo, args, match):
    line = one_error_line(run_cli("plan", "--config", demo, *args), 2)
    assert re.search(match, line), line


def test_bad_config_files_exit_2(tmp_path, demo):
    bad = tmp_path / "bad.yaml"
    bad.write_text("key_type: string\ntarget: {shards: [a, b]\n")
    assert "malformed YAML" in one_error_line(run_cli("plan", "--config", str(bad)), 2)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text(open(demo).read() + "\ncopy_concurency: 3\n")
    assert "unknown option copy_concurency" in one_error_line(run_cli("plan", "--config", str(unknown)), 2)
    zero = tmp_path / "zero.yaml"
    zero.write_text(open(demo).read().replace("weight: 1", "weight: 0", 1))
    line = one_error_line(run_cli("plan", "--config", str(zero)), 2)
    assert "weight: must be > 0" in line


def test_missing_map_store_exit_2(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("map_store: {kind: sqlite, path: nowhere.sqlite}\ncurrent_shards: [a]\ntarget: {shards: [a, b]}\n")
    assert "map store not found" in one_error_line(run_cli("plan", "--config", str(cfg)), 2)


def test_unknown_plan_exit_2(demo):
    line = one_error_line(run_cli("run", "0" * 64, "--config", demo), 2)
    assert "no committed plan" in line


def test_version_names_shardmove_and_the_beam_pin():
    from importlib.metadata import version

    r = run_cli("--version")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert r.stdout.strip() == (f"shardmove {version('shardmove')} (apache-beam {version('apache-beam')}, "
                                f"pyarrow {version('pyarrow')})")
    assert version("apache-beam") == "2.77.0"


def test_shardmove_config_and_env_references_in_store_settings(tmp_path):
    """SHARDMOVE_CONFIG stands in for --config; ${VAR} in store settings comes from the
    environment, and an unset one is one error line naming the variable, nothing written."""
    import yaml

    d = tmp_path / "ks"
    assert run_cli("demo", str(d), "--keys", "2000", "--shards", "4").returncode == 0
    raw = yaml.safe_load(open(d / "shardmove.yaml"))
    real_map, real_shards = raw["map_store"]["path"], raw["data_store"]["directory"]
    raw["map_store"]["path"] = "${SM_TEST_MAP_DIR}/" + os.path.basename(real_map)
    raw["data_store"]["directory"] = "${SM_TEST_SHARDS}"
    cfg = d / "env.yaml"  # beside the demo's own config: relative paths resolve the same way
    cfg.write_text(yaml.safe_dump(raw))
    env = {"SHARDMOVE_CONFIG": str(cfg), "SM_TEST_MAP_DIR": os.path.dirname(real_map),
           "SM_TEST_SHARDS": real_shards}
    # unset: refused before anything is written, the variable named (its value never printed)
    work = raw["work_dir"] if os.path.isabs(raw["work_dir"]) else str(d / raw["work_dir"])
    r = run_cli("plan", env={k: v for k, v in env.items() if k != "SM_TEST_SHARDS"}, cwd=str(tmp_path))
    line = one_error_line(r, 2)
    assert "SM_TEST_SHARDS is not set" in line and "data_store.directory" in line
    assert not os.path.exists(work) or not os.listdir(work)
    # set: the plan and the run find the stores through the variables, with no --config at all
    r = run_cli("plan", env=env, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    plan_id = PLAN_RE.findall(r.stdout)[0]
    r = run_cli("run", plan_id, env=env, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert re.search(r"^summary: planned=(\d+) done=\1 failed=0$", r.stdout, re.M)
    assert "SM_TEST" not in r.stdout + r.stderr


def _demo_variant(tmp_path, name, edit):
    import yaml

    d = tmp_path / name
    assert run_cli("demo", str(d), "--keys", "2000", "--shards", "4").returncode == 0
    raw = yaml.safe_load(open(d / "shardmove.yaml"))
    edit(d, raw)
    cfg = d / "variant.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    return str(cfg)


def test_a_zero_move_plan_says_nothing_to_move_and_is_complete(tmp_path):
    # the demo's keys sit where the ring of its 4 shards puts them: a target of those 4 moves nothing
    cfg = _demo_variant(tmp_path, "zero", lambda d, raw: raw["target"].update(
        shards=[s for s in raw["target"]["shards"] if s["id"] in raw["current_shards"]]))
    r = run_cli("plan", "--config", cfg)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    i = next(n for n, l in enumerate(lines) if l.startswith("plan id: "))
    assert lines[i + 1] == "nothing to move"
    plan_id = PLAN_RE.findall(r.stdout)[0]
    r = run_cli("run", plan_id, "--config", cfg)
    assert r.returncode == 0 and "nothing to do: plan already complete" in r.stdout, r.stdout + r.stderr
    assert "summary: planned=0 done=0 failed=0" in r.stdout


def test_dry_run_warns_when_the_placement_is_not_the_rings(tmp_path):
    import sqlite3

    def modulo_placement(d, raw):
        path = d / raw["map_store"]["path"]
        with sqlite3.connect(path) as c:  # n % 4, not the ring: most keys would move
            c.execute("UPDATE shard_map SET shard_id = 's' || (rowid % 4)")

    cfg = _demo_variant(tmp_path, "modulo", modulo_placement)
    r = run_cli("plan", "--config", cfg, "--dry-run")
    assert r.returncode == 0, r.stderr
    warnings = [l for l in r.stdout.splitlines() if l.startswith("warning: ")]
    assert len(warnings) == 1 and "not this ring's" in warnings[0] and "target.profile" in warnings[0]
    # the ring's own placement gets no such warning
    plain = _demo_variant(tmp_path, "plain", lambda d, raw: None)
    r = run_cli("plan", "--config", plain, "--dry-run")
    assert r.returncode == 0 and "warning: " not in r.stdout, r.stdout


def test_demo_config_header_names_its_own_shard_count(tmp_path):
    r = run_cli("demo", str(tmp_path / "d8"), "--keys", "800", "--shards", "8")
    assert r.returncode == 0, r.stderr
    first = open(tmp_path / "d8" / "shardmove.yaml").readline()
    assert first.startswith("# shardmove demo keyspace: 8 shards today, the target adds s8"), first


def test_a_run_with_failed_keys_prints_the_next_two_commands_and_they_work(tmp_path):
    import shlex

    cfg = _demo_variant(tmp_path, "faulty", lambda d, raw: raw.update(faults={"copy": {"permanent_rate": 0.05}}))
    plan_id = PLAN_RE.findall(run_cli("plan", "--config", cfg).stdout)[0]
    r = run_cli("run", plan_id, "--config", cfg)
    assert r.returncode == 3, r.stdout + r.stderr
    nexts = [l[len("next: "):].split("#")[0].strip() for l in r.stdout.splitlines() if l.startswith("next: ")]
    assert [shlex.split(n)[1] for n in nexts] == ["failures", "run"] and "--retry-failed" in nexts[1]
    exported = run_cli(*shlex.split(nexts[0])[1:], cwd=str(tmp_path))
    assert exported.returncode == 0 and os.path.exists(tmp_path / "failed.parquet"), exported.stderr
    # a clean run prints no such hint
    clean = _demo_variant(tmp_path, "clean", lambda d, raw: None)
    plan_id = PLAN_RE.findall(run_cli("plan", "--config", clean).stdout)[0]
    r = run_cli("run", plan_id, "--config", clean)
    assert r.returncode == 0 and "next: " not in r.stdout


def test_catchup_is_plan_since_same_lines_same_exit_code(tmp_path):
    """``catchup PLAN`` and ``plan --since PLAN`` are one command: for the same case they print the
    same lines and exit with the same code (CONTRACTS: 4 for a capacity refusal), and both record
    the plan in the history."""
    from pipeline.keys import KeyType
    from pipeline.stores.sqlite import SqliteMapStore

    d = tmp_path / "ks"
    assert run_cli("demo", str(d), "--keys", "400", "--shards", "2").returncode == 0
    cfg = str(d / "shardmove.yaml")
    r = run_cli("plan", "--config", cfg)
    assert r.returncode == 0, r.stderr
    (plan_id,) = PLAN_RE.findall(r.stdout)
    SqliteMapStore(str(d / "keyspace" / "map.sqlite"), KeyType.STRING).put_many(
        [(f"late-{i:03d}".encode(), "s0") for i in range(60)])

    def files():
        return sorted(os.path.relpath(os.path.join(p, f), d / "work") for p, _, fs in os.walk(d / "work") for f in fs)

    def both(*extra):
        since = run_cli("plan", "--since", plan_id, "--config", cfg, *extra)
        catchup = run_cli("catchup", plan_id, "--config", cfg, *extra)
        assert (catchup.returncode, catchup.stdout, catchup.stderr) == (since.returncode, since.stdout, since.stderr)
        return since

    before = files()
    for extra in (["--dry-run", "--min-headroom-percent", "99"], ["--min-headroom-percent", "99"]):
        r = both(*extra)
        assert r.returncode == 4, (extra, r.stdout, r.stderr)
        assert "catch-up: 60 of 460 keys written since cutoff" in r.stdout
        assert files() == before, extra  # refused: the work directory as it was found
    r = both("--dry-run")
    assert r.returncode == 0 and "dry run: no plan committed" in r.stdout, r.stderr
    r = both()
    assert r.returncode == 0 and "plan dir: " in r.stdout, r.stderr
    catchup_id = PLAN_RE.findall(r.stdout)
    assert catchup_id and catchup_id != [plan_id]
    h = run_cli("history", "--config", cfg)
    assert h.returncode == 0 and h.stdout.count(f"since={plan_id}") == 2, h.stdout


def test_the_process_exits_with_the_commands_code_after_pythons_own_shutdown():
    """The console script ends through ``exit_process``: atexit handlers run, buffered output is
    flushed, non-daemon threads are joined, and the code is the command's -- native thread
    pools (Arrow's) are never torn down at exit, where they sometimes abort (-6)."""
    import subprocess
    import sys

    code = ("import atexit, threading, time\n"
            "from shardmove.console import exit_process\n"
            "atexit.register(lambda: print('atexit ran'))\n"
            "threading.Thread(target=lambda: (time.sleep(0.2), print('thread joined'))).start()\n"
            "print('buffered', end='')\n"
            "exit_process(4)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 4, r.stderr
    assert r.stdout.splitlines() == ["bufferedthread joined", "atexit ran"], r.stdout


def test_demo_config_is_written_whole_and_an_existing_one_is_kept(tmp_path, monkeypatch):
    """The demo's config appears whole or not at all (a kill while writing it leaves no
    truncated file that a rerun would keep), is owner-only, and is never overwritten."""
    import stat

    from shardmove import api

    d = tmp_path / "d"
    real = api.fs.create_if_absent
    seen = []

    def watch(path, data, *a, **kw):
        seen.append(os.path.exists(path))  # the name does not exist before its bytes are whole
        return real(path, data, *a, **kw)

    monkeypatch.setattr(api.fs, "create_if_absent", watch)
    api.create_demo_keyspace(str(d), keys=200)
    cfg = d / "shardmove.yaml"
    assert seen == [False] and stat.S_IMODE(os.stat(cfg).st_mode) == 0o600
    assert [n for n in os.listdir(d) if n.startswith(".tmp-")] == []
    cfg.write_text("# mine\n")
    again = api.create_demo_keyspace(str(d), keys=200)
    assert again["created"] is False and cfg.read_text() == "# mine\n"
