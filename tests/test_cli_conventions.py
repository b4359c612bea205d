"""CLI conventions through the real console script: ``--json`` (one object on stdout), PLAN
resolution (directory, id, 8+ hex prefix, name), ``plan --name``, ``shardmove plans``, and the
same ways to find the work directory for every read-only command."""
import json
import os
import re
import shutil
import time

import pytest

from conftest import run_cli

PLAN_RE = re.compile(r"^plan id: ([0-9a-f]{64})$", re.M)


def one_json(r) -> dict:
    """stdout holds exactly one JSON object, nothing else."""
    doc = json.loads(r.stdout)  # raises on anything but one JSON document
    assert isinstance(doc, dict), r.stdout
    return doc


def one_error_line(r, code):
    assert r.returncode == code, (r.stdout, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr
    return lines[0]


@pytest.fixture(scope="module")
def named(tmp_path_factory):
    """A demo keyspace with one plan named ``add-s4``, planned with --json."""
    d = tmp_path_factory.mktemp("conv")
    r = run_cli("demo", str(d), "--keys", "800", "--shards", "4")
    assert r.returncode == 0, r.stderr
    cfg = str(d / "shardmove.yaml")
    r = run_cli("plan", "--config", cfg, "--name", "add-s4", "--json")
    assert r.returncode == 0, r.stderr
    doc = one_json(r)
    # the human block went to stderr, the JSON object alone to stdout
    assert PLAN_RE.findall(r.stderr) == [doc["plan_id"]] and "name: add-s4" in r.stderr
    work = str(d / "work")
    return {"dir": d, "cfg": cfg, "work": work, "plan_id": doc["plan_id"], "plan": doc,
            "plan_dir": os.path.join(work, "plans", doc["plan_id"])}


def test_plan_json_carries_id_name_and_counts(named):
    doc = named["plan"]
    assert re.fullmatch(r"[0-9a-f]{64}", doc["plan_id"])
    assert doc["name"] == "add-s4" and doc["exit_code"] == 0 and doc["created"] and not doc["dry_run"]
    assert doc["keys_examined"] == 800 and doc["planned"] == doc["moves"] > 0
    assert sum(p["moves"] for p in doc["pairs"]) == doc["moves"]
    assert doc["plan_dir"] == named["plan_dir"]
    dry = run_cli("plan", "--config", named["cfg"], "--dry-run", "--json")
    d = one_json(dry)
    assert dry.returncode == 0 and d["dry_run"] and not d["created"] and d["plan_id"] == doc["plan_id"]
    assert d["plan_dir"] is None and "dry run: no plan committed" in dry.stderr


def test_same_inputs_same_id_whatever_the_name(named):
    again = run_cli("plan", "--config", named["cfg"], "--name", "add-s4")
    assert again.returncode == 0 and PLAN_RE.findall(again.stdout) == [named["plan_id"]]
    unnamed = run_cli("plan", "--config", named["cfg"])  # keeps its name
    assert unnamed.returncode == 0 and PLAN_RE.findall(unnamed.stdout) == [named["plan_id"]]
    assert "name: add-s4" not in unnamed.stdout
    other = run_cli("plan", "--config", named["cfg"], "--name", "other-name")
    assert "already exists with the name 'add-s4'" in one_error_line(other, 2)
    assert not os.path.exists(os.path.join(named["work"], "names", "other-name.json"))


def test_a_name_used_by_another_plan_exits_2_and_commits_nothing(named):
    plans = os.path.join(named["work"], "plans")
    before = sorted(os.listdir(plans))
    r = run_cli("plan", "--config", named["cfg"], "--window", "00-7F", "--name", "add-s4", "--json")
    line = one_error_line(r, 2)
    assert f"plan name 'add-s4' is already used by plan {named['plan_id'][:12]}" in line
    doc = one_json(r)  # a script still reads one JSON object: the error and the exit code
    assert doc["exit_code"] == 2 and doc["error"] == line[len("error: "):] and doc["plan_id"] is None
    assert sorted(os.listdir(plans)) == before


@pytest.mark.parametrize("bad", ["-lead", "has space", "x" * 65, "deadbeef00", "a/b"])
def test_bad_names_exit_2(named, bad):
    r = run_cli("plan", "--config", named["cfg"], f"--name={bad}")
    assert "plan --name" in one_error_line(r, 2)


def test_plan_resolution_everywhere(named):
    pid, cfg = named["plan_id"], named["cfg"]
    for ref in (pid, pid[:8], pid[:12], "add-s4", named["plan_dir"], named["plan_dir"] + "/"):
        st = run_cli("status", ref, "--config", cfg)
        assert st.returncode == 6 and PLAN_RE.findall(st.stdout) == [pid], (ref, st.stdout, st.stderr)
    h = run_cli("history", "--config", cfg, "--plan", "add-s4")
    assert h.returncode == 0 and f" plan {pid[:12]} ok" in h.stdout and "name=add-s4" in h.stdout
    v = run_cli("verify", pid[:10], "--config", cfg, "--sample", "5")
    assert v.returncode in (0, 3), v.stderr  # resolved (a bad PLAN would exit 2)
    short = run_cli("status", pid[:7], "--config", cfg)  # fewer than 8 digits: never a prefix
    assert f"no plan '{pid[:7]}'" in one_error_line(short, 2)
    assert "no plan 'nobody'" in one_error_line(run_cli("status", "nobody", "--config", cfg), 2)


def test_an_ambiguous_prefix_exits_2_with_the_match_count(named, tmp_path):
    work = tmp_path / "work"
    pid = named["plan_id"]
    for twin in (pid, pid[:8] + ("0" if pid[8] != "0" else "1") * 56):
        shutil.copytree(named["plan_dir"], work / "plans" / twin)
    line = one_error_line(run_cli("status", pid[:8], "--work-dir", str(work)), 2)
    assert f"plan id prefix {pid[:8]} is ambiguous: it matches 2 plans" in line
    r = run_cli("status", pid[:9], "--work-dir", str(work))
    assert r.returncode == 6 and PLAN_RE.findall(r.stdout) == [pid]


def test_status_shows_the_name_and_json_keeps_its_keys(named):
    st = run_cli("status", "add-s4", "--config", named["cfg"])
    assert st.returncode == 6 and "name: add-s4" in st.stdout.splitlines()
    js = run_cli("status", "add-s4", "--config", named["cfg"], "--json")
    doc = one_json(js)
    assert js.returncode == 6 and doc["name"] == "add-s4" and doc["plan_id"] == named["plan_id"]
    for key in ("states", "planned", "done", "failed", "complete", "state", "failures_by_reason",
                "done_by_verification"):
        assert key in doc, key


def test_read_only_commands_find_the_work_dir_the_same_ways(named, tmp_path):
    pid, cfg = named["plan_id"], named["cfg"]
    env = dict(os.environ, SHARDMOVE_CONFIG=cfg)
    for cmd in (["status", pid[:12]], ["report", "add-s4", "--out-dir", str(tmp_path / "r1")],
                ["metrics", pid[:12], "--out", str(tmp_path / "m.prom")]):
        for how, kw in ((["--config", cfg], {}), ([], {"env": env}), (["--work-dir", named["work"]], {})):
            r = run_cli(*cmd, *how, **kw)
            assert r.returncode in (0, 6), (cmd, how, r.stderr)
        plain = dict(os.environ)
        plain.pop("SHARDMOVE_CONFIG", None)
        by_dir = run_cli(cmd[0], named["plan_dir"], *cmd[2:], env=plain)  # a directory needs nothing else
        assert by_dir.returncode in (0, 6), (cmd, by_dir.stderr)
        line = one_error_line(run_cli(*cmd, env=plain), 2)
        assert "--config FILE, set SHARDMOVE_CONFIG, or pass --work-dir DIR" in line, line
    html = (tmp_path / "r1" / "report.html").read_text()
    assert "add-s4" in html


def test_plans_lists_newest_first_with_name_state_counts_age(named, tmp_path):
    empty = run_cli("plans", "--work-dir", str(tmp_path / "nothing"))
    assert empty.returncode == 0 and empty.stdout.strip().endswith("plans: 0")
    assert one_json(run_cli("plans", "--work-dir", str(tmp_path / "nothing"), "--json"))["plans"] == []
    time.sleep(1.1)  # created_at has one-second resolution: the second plan is newer
    second = run_cli("plan", "--config", named["cfg"], "--window", "00-3F", "--json")
    assert second.returncode == 0, second.stderr
    sid = one_json(second)["plan_id"]
    r = run_cli("plans", "--config", named["cfg"])
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if re.match(r"[0-9a-f]{12} ", line)]
    assert [row[:12] for row in rows][:1] == [sid[:12]]
    mine = next(row for row in rows if row.startswith(named["plan_id"][:12]))
    assert "add-s4" in mine and "planned" in mine
    doc = one_json(run_cli("plans", "--config", named["cfg"], "--json"))
    ids = [p["plan_id"] for p in doc["plans"]]
    assert ids[0] == sid and named["plan_id"] in ids
    p = doc["plans"][ids.index(named["plan_id"])]
    assert p["name"] == "add-s4" and p["state"] == "planned" and p["planned"] == named["plan"]["planned"]
    assert p["done"] == 0 and p["failed"] == 0 and p["age"]


def test_run_json_then_status_complete(named):
    # last in the module: the named plan runs to completion
    r = run_cli("run", "add-s4", "--config", named["cfg"], "--json")
    doc = one_json(r)
    assert r.returncode == 0 and doc["exit_code"] == 0, r.stderr
    assert doc["plan_id"] == named["plan_id"] and doc["name"] == "add-s4"
    assert doc["planned"] == doc["done"] == named["plan"]["planned"] and doc["failed"] == 0
    assert PLAN_RE.findall(r.stderr) == [named["plan_id"]] and "summary: planned=" in r.stderr
    again = one_json(run_cli("run", named["plan_id"][:8], "--config", named["cfg"], "--json"))
    assert again["nothing_to_do"] and again["exit_code"] == 0
    p = one_json(run_cli("plans", "--config", named["cfg"], "--json"))["plans"]
    assert next(x for x in p if x["plan_id"] == named["plan_id"])["state"] == "complete"


def test_validate_json_carries_plan_id_and_ok(named):
    r = run_cli("validate", "--config", named["cfg"], "--compare", "add-s4", "--json")
    doc = one_json(r)
    assert doc["plan_id"] == named["plan_id"] and doc["ok"] == (r.returncode == 0)
    assert "exit_code" in doc and "topology" in doc
    plain = one_json(run_cli("validate", "--config", named["cfg"], "--json"))
    assert plain["plan_id"] is None and plain["ok"] is True


def test_json_errors_are_one_object_too(tmp_path):
    r = run_cli("status", "nobody", "--work-dir", str(tmp_path), "--json")
    line = one_error_line(r, 2)
    assert one_json(r) == {"error": line[len("error: "):], "exit_code": 2, "plan_id": None}


def test_run_local_demo_prints_the_plan_once_then_how_to_look_at_it(tmp_path):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name in ("run_local.sh", "pyproject.toml"):
        shutil.copy(os.path.join(root, name), tmp_path / name)
    venv = tmp_path / ".venv"
    venv.mkdir()
    os.symlink(os.path.dirname(sys.executable), venv / "bin")  # this suite's interpreter and console script
    digest = subprocess.run("sha256sum < pyproject.toml | cut -c1-16", shell=True, cwd=tmp_path,
                            capture_output=True, text=True).stdout.strip()
    (venv / f".installed-{digest}-base").touch()  # installed: the script must not pip install
    env = dict(os.environ, DEMO_KEYS="300")
    env.pop("SHARDMOVE_CONFIG", None)
    r = subprocess.run(["./run_local.sh"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout, r.stderr)
    out = r.stdout
    plan_id = (tmp_path / "demo" / "PLAN").read_text().strip()
    assert PLAN_RE.findall(out) == [plan_id]
    assert len(re.findall(r"^moves: ", out, re.M)) == 1 and "name: demo" in out
    cmds = re.findall(r"^  (\S+ (status|report|verify) (\S+) --config (\S+))$", out, re.M)
    assert [c[1] for c in cmds] == ["status", "report", "verify"]
    assert {c[2] for c in cmds} == {plan_id[:12]} and {c[3] for c in cmds} == {"demo/shardmove.yaml"}
    assert out.index("  " + cmds[0][0]) < out.index("summary: planned=")
    st = subprocess.run(cmds[0][0].split(), cwd=tmp_path, env=env, capture_output=True, text=True)
    assert st.returncode == 0 and PLAN_RE.findall(st.stdout) == [plan_id], st.stderr
    again = subprocess.run(["./run_local.sh"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "nothing to do: plan already complete" in again.stdout
    assert PLAN_RE.findall(again.stdout) == [plan_id] and "  " + cmds[0][0] in again.stdout
