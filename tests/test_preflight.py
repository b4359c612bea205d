"""Preflight: Beam flags and where the workers run, checked before anything is written.

Every refusal is one ``error:`` line, exit 2, and leaves the work directory and
the history untouched (the work directory is not even created)."""
import os
import shutil
import sys

import pytest
import yaml

from shardmove import api
from pipeline.config import load_config
from pipeline.errors import BadInput
from transforms.preflight import canonical_runner, preflight, unknown_flags

from conftest import ROOT, run_cli

VENV_BIN = os.path.dirname(sys.executable)


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    d = tmp_path_factory.mktemp("pf") / "ks"
    api.create_demo_keyspace(str(d), keys=200, shards=4)
    return d


@pytest.fixture
def ks(template, tmp_path):
    d = tmp_path / "ks"
    shutil.copytree(template, d)
    return str(d / "shardmove.yaml")


def _refused(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    assert "Traceback" not in r.stderr
    return lines[0]


def _untouched(cfgpath):
    assert not os.path.exists(load_config(cfgpath).work_dir)  # no snapshot, plan, lease, history record


@pytest.mark.parametrize("cmd", ["plan", "run"])
def test_unknown_beam_flags_are_refused_by_name(ks, cmd):
    args = ["plan", "--config", ks] if cmd == "plan" else ["run", "0" * 64, "--config", ks]
    r = run_cli(*args, "--", "--runner=FnApiRunner", "--no_such_flag=1", "--direct_num_workrs", "2")
    _refused(r, "--no_such_flag", "--direct_num_workrs", "unknown Beam flags")
    _untouched(ks)


def test_unknown_flags_spares_every_known_flag():
    assert unknown_flags(["--runner=FlinkRunner", "--flink_master=[local]", "--parallelism=2",
                          "--environment_type=LOOPBACK", "--prism_location=/x", "--dry_run=True",
                          "--direct_running_mode=multi_processing", "--direct_num_workers=2"]) == []
    assert unknown_flags(["--no-such-flag=2", "--ok_not"]) == ["--no-such-flag", "--ok_not"]


def test_unknown_runner_is_one_line(ks):
    r = run_cli("plan", "--config", ks, "--", "--runner=NoSuchRunner")
    _refused(r, "--runner=NoSuchRunner: unknown runner")
    _untouched(ks)
    r = run_cli("plan", "--config", ks, "--", "--runner=no.such.module.Runner")
    _refused(r, "no such runner class")


def test_runner_names_as_beam_accepts_them():
    assert canonical_runner("flink") == "FlinkRunner"
    assert canonical_runner("directrunner") == "DirectRunner"
    assert canonical_runner("FnApiRunner") == canonical_runner("fn_api_runner") == canonical_runner("fnapi") == "FnApiRunner"
    assert canonical_runner("Prism") == "PrismRunner"
    with pytest.raises(BadInput, match="unknown runner"):
        canonical_runner("Flinck")


@pytest.mark.parametrize("flags,why", [
    (["--runner=FlinkRunner", "--flink_master=flink-jobmanager:8081"], "--flink_master=flink-jobmanager:8081"),
    (["--runner=SparkRunner", "--spark_master_url=spark://spark-master:7077"], "--spark_master_url="),
    (["--runner=PortableRunner", "--job_endpoint=jobs.example:8099"], "--job_endpoint=jobs.example:8099"),
    (["--runner=PortableRunner", "--job_endpoint=localhost:8099", "--environment_type=EXTERNAL",
      "--environment_config=workers.example:50000"], "worker pool is on another machine"),
    (["--runner=DataflowRunner", "--project=p-1", "--region=us-central1", "--temp_location=gs://b/t"],
     "DataflowRunner runs its workers"),
])
def test_remote_workers_refuse_sqlite_stores(ks, flags, why):
    r = run_cli("plan", "--config", ks, "--", *flags)
    line = _refused(r, "a SQLite store cannot be used", "SQLite locking is unsafe on network filesystems", why)
    assert "(and 2 more)" in line  # the data store and the local work_dir too
    _untouched(ks)


def _network_cfg(tmp_path, **changes):
    """configs/flink.yaml (PostgreSQL stores, gs:// work dir) with some fields changed; never connects."""
    with open(os.path.join(ROOT, "configs", "flink.yaml")) as f:
        raw = yaml.safe_load(f)
    raw.update(changes)
    p = tmp_path / "net.yaml"
    p.write_text(yaml.safe_dump(raw))
    return load_config(str(p))


REMOTE_PORTABLE = ["--runner=PortableRunner", "--job_endpoint=jobs.example:8099"]


def test_remote_workers_and_a_local_work_dir(tmp_path):
    cfg = _network_cfg(tmp_path, work_dir=str(tmp_path / "work"))
    with pytest.raises(BadInput, match=r"work_dir .* is a local path .*shared_paths: true \(--shared-paths\)"):
        preflight(cfg, REMOTE_PORTABLE)
    shared = _network_cfg(tmp_path, work_dir=str(tmp_path / "work"), shared_paths=True)
    pf = preflight(shared, REMOTE_PORTABLE)
    assert pf.runner == "PortableRunner" and pf.remote and not pf.warnings
    assert preflight(_network_cfg(tmp_path), REMOTE_PORTABLE).remote  # gs:// work dir: fine
    # local workers: a local work dir needs no declaration
    assert preflight(cfg, ["--runner=PortableRunner", "--job_endpoint=localhost:8099"]).remote is None


def test_remote_workers_and_local_object_store_shards(tmp_path):
    shards = {s: f"gs://bucket/{s}" for s in ("s0", "s1", "s2", "s3")}
    shards["s4"] = str(tmp_path / "s4")
    cfg = _network_cfg(tmp_path, data_store={"kind": "objects", "shards": shards})
    with pytest.raises(BadInput, match=r"data_store.shards: 1 object-store shards are local paths \(s4\)"):
        preflight(cfg, REMOTE_PORTABLE)
    ok = _network_cfg(tmp_path, data_store={"kind": "objects", "shards": shards}, shared_paths=True)
    preflight(ok, REMOTE_PORTABLE)


def test_shared_paths_never_excuses_sqlite(tmp_path, ks):
    with open(ks, "a") as f:
        f.write("shared_paths: true\n")
    r = run_cli("plan", "--config", ks, "--", *REMOTE_PORTABLE)
    line = _refused(r, "map_store: a SQLite store cannot be used")
    assert "(and 1 more)" in line and "work_dir" not in line
    r = run_cli("plan", "--config", ks, "--shared-paths", "false", "--", *REMOTE_PORTABLE)
    _refused(r, "(and 2 more)")


# The Dataflow --dry_run=True translation with warnings: tests/test_runners.py::test_dataflow_cli_plan_dry_run


def test_local_runners_pass_untouched(ks):
    cfg = load_config(ks)
    pf = preflight(cfg, [])
    assert pf.runner == "FnApiRunner" and pf.remote is None and pf.args[-1] == "--runner=FnApiRunner"
    pf = preflight(cfg, ["--direct_running_mode=multi_processing", "--direct_num_workers=2"])
    assert pf.remote is None and not pf.warnings


# ------------------------------------------------------ missing tools: one line, exit 2

def test_missing_java_is_one_line(ks, tmp_path):
    jar = tmp_path / "fake-job-server.jar"
    jar.write_bytes(b"PK")
    r = run_cli("plan", "--config", ks, "--", "--runner=FlinkRunner", "--flink_master=[local]",
                f"--flink_job_server_jar={jar}", env={"PATH": VENV_BIN})
    _refused(r, "FlinkRunner starts Beam's job server, a Java program", "install Java 17")
    _untouched(ks)


@pytest.mark.skipif(shutil.which("java") is None, reason="needs java on PATH to get past the Java check")
def test_missing_job_server_jar_names_the_coordinates(ks, tmp_path):
    env = {"HOME": str(tmp_path)}  # no ~/.m2 or Beam jar cache to find a jar in
    r = run_cli("plan", "--config", ks, "--", "--runner=FlinkRunner", "--flink_master=[local]",
                "--flink_version=1.19", env=env)
    import apache_beam

    v = apache_beam.__version__
    _refused(r, f"org.apache.beam:beam-runners-flink-1.19-job-server:{v}", "mvn dependency:copy",
             f"--flink_job_server_jar=DIR/beam-runners-flink-1.19-job-server-{v}.jar")
    r = run_cli("plan", "--config", ks, "--", "--runner=SparkRunner", env=env)
    _refused(r, f"org.apache.beam:beam-runners-spark-3-job-server:{v}", "--spark_job_server_jar=")
    r = run_cli("plan", "--config", ks, "--", "--runner=FlinkRunner", "--flink_master=[local]",
                f"--flink_job_server_jar={tmp_path}/nope.jar", env=env)
    _refused(r, f"--flink_job_server_jar: {tmp_path}/nope.jar does not exist")
    _untouched(ks)


def test_missing_go_for_prism_is_one_line(ks, tmp_path):
    env = {"PATH": VENV_BIN, "SHARDMOVE_CACHE": str(tmp_path / "cache"), "HOME": str(tmp_path),
           "SHARDMOVE_PRISM": ""}
    r = run_cli("plan", "--config", ks, "--", "--runner=PrismRunner", env=env)
    _refused(r, "Prism v", "Go is not installed", "install Go", "--prism_location=PATH")
    _untouched(ks)


def test_prism_is_built_with_go_install_of_the_pinned_tag_into_the_cache(tmp_path, monkeypatch):
    """A stand-in ``go`` records its arguments and writes the binary where GOBIN says."""
    import apache_beam

    from transforms import engines

    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "go.log"
    fake = bindir / "go"
    fake.write_text(f'#!/bin/sh\necho "$@" > {log}\n[ "$FAIL" = 1 ] && {{ echo "go: boom" >&2; exit 1; }}\n'
                    'printf "#!/bin/sh\\n" > "$GOBIN/prism"; chmod +x "$GOBIN/prism"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:/usr/bin:/bin")  # the stand-in go first
    monkeypatch.setenv("SHARDMOVE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("SHARDMOVE_PRISM", raising=False)
    v = apache_beam.__version__
    monkeypatch.setenv("FAIL", "1")
    with pytest.raises(BadInput, match=rf"Prism v{v}: go install .*@v{v} failed \(go: boom\)"):
        engines.ensure_prism()
    assert engines.find_prism() is None and os.listdir(tmp_path / "cache" / "prism") == []  # nothing half-built
    monkeypatch.setenv("FAIL", "0")
    path = engines.ensure_prism()
    assert log.read_text().split() == ["install", f"github.com/apache/beam/sdks/v2/go/cmd/prism@v{v}"]
    assert path == os.path.join(engines.prism_cache_dir(), "prism") and engines.find_prism() == path
    assert str(tmp_path / "cache") in path and ROOT not in path  # never inside the repository
    log.unlink()
    assert engines.ensure_prism() == path and not log.exists()  # cached: not built again
