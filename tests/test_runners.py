"""The same plan and run on every runner that works offline, with identical results.

- in-memory FnApiRunner (the default): the reference;
- FnApiRunner with SDK workers in 2 separate processes
  (``--direct_running_mode=multi_processing --direct_num_workers=2``):
  pickling and module-level state, as on Dataflow/Flink workers;
- PortableRunner against Beam's local job service with an external worker
  pool started here (the pool starts ``python`` from PATH: the venv's);
- DataflowRunner with ``--dry_run=True``: the jobs are translated offline.

"Identical" means: plan files byte-identical (plan id and file hashes), the
final map, every record, the summary counts, and every map row written once.
"""
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time

import pytest
import yaml

from shardmove import api
from pipeline.config import load_config
from shardmove.planner import load_manifest

from conftest import ROOT, run_cli
from test_executor import install_write_witness, map_rows, quiet, write_counts

VENV_BIN = os.path.dirname(sys.executable)
OPTS = {"swap_batch_size": 50, "hash_buckets": 2, "retry_base_delay": "1ms", "checkpoint_flush_interval": "50ms"}
MULTI_PROCESS = ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]


# ---------------------------------------------------------------- helpers

@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """One demo keyspace (600 keys, 4 shards -> 5), copied afresh per runner."""
    d = tmp_path_factory.mktemp("template") / "ks"
    api.create_demo_keyspace(str(d), keys=600, shards=4)
    with open(d / "shardmove.yaml", "a") as f:
        for k, v in OPTS.items():
            f.write(f"{k}: {v}\n")
    return d


def fresh(template, where):
    d = where / "ks"
    shutil.copytree(template, d)
    cfgpath = str(d / "shardmove.yaml")
    install_write_witness(load_config(cfgpath).map_store["path"])
    return cfgpath


def all_shard_records(cfg):
    out = {}
    for s in sorted(cfg.known_shards()):
        path = os.path.join(cfg.data_store["directory"], f"{s}.sqlite")
        if os.path.exists(path):
            con = sqlite3.connect(path)
            out[s] = dict(con.execute("SELECT key, value FROM records").fetchall())
            con.close()
    return out


def outcome(cfgpath, plan_id):
    """Everything that must not depend on the runner."""
    cfg = load_config(cfgpath)
    plan_dir = os.path.join(cfg.work_dir, "plans", plan_id)
    m = load_manifest(plan_dir)
    s = api.status(plan_dir).details
    writes = write_counts(cfg)
    return {
        "plan_id": plan_id,
        "files": [(f["group"], f["rows"], f["sha256"]) for f in m["files"]],
        "map": map_rows(cfg),
        "records": all_shard_records(cfg),
        "summary": {k: s[k] for k in ("planned", "done", "failed", "states", "failures_by_reason",
                                      "done_by_verification", "complete")},
        "writes": (len(writes), set(writes.values())),
    }


def plan_and_run_api(cfgpath, beam_args):
    cfg = load_config(cfgpath)
    res = api.plan(cfg, beam_args=beam_args, out=quiet)
    run = api.run(cfg, res.plan_dir, beam_args=beam_args, out=quiet)
    assert run.exit_code == 0, run.summary
    return res.plan_id, run


def plan_and_run_cli(cfgpath, beam_args, env=None):
    r = run_cli("plan", "--config", cfgpath, "--", *beam_args, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    plan_id = next(l.split(": ", 1)[1] for l in r.stdout.splitlines() if l.startswith("plan id: "))
    r = run_cli("run", plan_id, "--config", cfgpath, "--", *beam_args, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return plan_id, r.stdout


@pytest.fixture(scope="module")
def reference(template, tmp_path_factory):
    cfgpath = fresh(template, tmp_path_factory.mktemp("in_memory"))
    plan_id, run = plan_and_run_api(cfgpath, [])
    out = outcome(cfgpath, plan_id)
    assert out["summary"]["done"] == out["summary"]["planned"] > 50
    assert out["writes"] == (out["summary"]["done"], {1})
    return out


# ------------------------------------------------------- multi-processing

def test_multi_process_plan_and_run_match_in_memory(template, reference, tmp_path):
    cfgpath = fresh(template, tmp_path)
    plan_id, run = plan_and_run_api(cfgpath, MULTI_PROCESS)
    assert outcome(cfgpath, plan_id) == reference
    # metrics come back from the worker processes
    assert run.metrics["copied"] == run.metrics["swapped"] == reference["summary"]["done"]


def test_multi_process_ctrl_c_stops_gracefully_then_resumes(template, reference, tmp_path):
    """Ctrl-C reaches the launcher and its SDK worker processes (one process
    group): the workers ignore it, honour the stop marker and flush; exit 130."""
    cfgpath = fresh(template, tmp_path)
    with open(cfgpath, "a") as f:
        f.write("copy_concurrency: 2\nfaults: {copy: {latency_ms: 25, keys_per_call: 1}}\n")
        f.write("beam: {options: [%s]}\n" % ", ".join(MULTI_PROCESS))
    in_memory = ["--", "--direct_running_mode=in_memory", "--direct_num_workers=1"]  # flags after -- win
    r = run_cli("plan", "--config", cfgpath, *in_memory)
    assert r.returncode == 0, r.stderr[-2000:]
    plan_id = reference["plan_id"]
    assert f"plan id: {plan_id}" in r.stdout
    plan_dir = os.path.join(load_config(cfgpath).work_dir, "plans", plan_id)
    p = subprocess.Popen([os.path.join(VENV_BIN, "shardmove"), "run", plan_id, "--config", cfgpath],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _wait_for_parts(plan_dir, 3)
        os.killpg(p.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        out, err = p.communicate(timeout=300)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 130, err[-3000:]
    assert "interrupted: checkpoints flushed; rerun to resume" in out
    assert "Traceback" not in err
    with open(cfgpath, "a") as f:
        f.write("faults: {}\n")
    r = run_cli("run", plan_id, "--config", cfgpath, *in_memory)
    assert r.returncode == 0, r.stderr[-3000:]
    assert outcome(cfgpath, plan_id) == reference


def _wait_for_parts(plan_dir, n, timeout=300):
    root = os.path.join(plan_dir, "checkpoints")
    t0 = time.time()
    while time.time() - t0 < timeout:
        found = sum(len([f for f in fs if f.startswith("part-")]) for _d, _s, fs in os.walk(root))
        if found >= n:
            return found
        time.sleep(0.05)
    raise AssertionError("the run never committed a checkpoint")


# --------------------------------------------------------------- portable

def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _wait_port(port, proc, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"service exited with {proc.returncode}")
        try:
            with socket.create_connection(("localhost", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"nothing listens on port {port}")


@pytest.fixture(scope="module")
def portable_services(tmp_path_factory):
    """Beam's local job service and an external worker pool, on free ports.
    The pool starts ``python`` from PATH for each worker: the venv's first."""
    logs = tmp_path_factory.mktemp("portable")
    env = dict(os.environ, PATH=VENV_BIN + os.pathsep + os.environ.get("PATH", ""))
    pool_port, job_port = _free_port(), _free_port()
    procs = []
    try:
        for cmd, port, name in (
            (["-m", "apache_beam.runners.worker.worker_pool_main", f"--service_port={pool_port}"], pool_port, "pool"),
            (["-m", "apache_beam.runners.portability.local_job_service_main", f"--port={job_port}"], job_port, "jobs"),
        ):
            log = open(logs / f"{name}.log", "wb")
            procs.append(subprocess.Popen([sys.executable, *cmd], env=env, stdout=log, stderr=subprocess.STDOUT))
            _wait_port(port, procs[-1])
        yield ["--runner=PortableRunner", f"--job_endpoint=localhost:{job_port}",
               "--environment_type=EXTERNAL", f"--environment_config=localhost:{pool_port}"]
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


def test_portable_plan_and_run_match_in_memory(template, reference, tmp_path, portable_services):
    """Through the real CLI, Beam flags after ``--``."""
    cfgpath = fresh(template, tmp_path)
    plan_id, stdout = plan_and_run_cli(cfgpath, portable_services)
    assert f"summary: planned={reference['summary']['planned']} done={reference['summary']['done']} failed=0" in stdout
    assert outcome(cfgpath, plan_id) == reference


# ------------------------------------------------------------------ prism

ON_CI = os.environ.get("CI", "").lower() == "true"


@pytest.fixture(scope="module")
def prism_binary():
    """Prism for the installed Beam version, built once with ``go install`` into
    shardmove's cache (``./run_local.sh test`` builds it before the suite).
    Under CI a missing binary or Go is a failure, never a skip."""
    from transforms import engines
    from pipeline.errors import BadInput

    try:
        return engines.ensure_prism(log=lambda s: sys.stderr.write(s + "\n"))
    except BadInput as e:
        if ON_CI:
            pytest.fail(f"CI=true: the Prism tests must run: {e}")
        pytest.skip(f"no Prism binary: {e}")


def _prism_ran(stderr, times):
    """Prism's own log lines: the pipelines really executed on Prism (DirectRunner would
    otherwise fall back to the in-process engine without saying so)."""
    assert stderr.count("PrismRunner: pipeline done!") == times, stderr[-3000:]


def test_prism_runner_plan_and_run_match_in_memory(template, reference, tmp_path, prism_binary):
    cfgpath = fresh(template, tmp_path)
    args = ["--runner=PrismRunner", f"--prism_location={prism_binary}"]
    r = run_cli("plan", "--config", cfgpath, "--", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    _prism_ran(r.stderr, 1)
    plan_id = reference["plan_id"]
    assert f"plan id: {plan_id}" in r.stdout
    r = run_cli("run", plan_id, "--config", cfgpath, "--", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    _prism_ran(r.stderr, 1)
    assert f"summary: planned={reference['summary']['planned']} done={reference['summary']['done']} failed=0" in r.stdout
    assert outcome(cfgpath, plan_id) == reference


def test_prism_config_as_shipped(template, reference, tmp_path, prism_binary):
    """configs/prism.yaml's command, verbatim (no Beam flags: the config names PrismRunner and
    shardmove finds the binary it built), on a copy of the demo keyspace."""
    with open(os.path.join(ROOT, "configs", "prism.yaml")) as f:
        raw = yaml.safe_load(f)
    assert raw["beam"] == {"runner": "PrismRunner"}
    d = tmp_path / "ks"
    shutil.copytree(template, d)
    with open(d / "shardmove.yaml") as f:
        demo = yaml.safe_load(f)
    for k in ("map_store", "data_store", "current_shards", "target", "work_dir", *OPTS):
        raw[k] = demo[k]
    cfgpath = d / "prism.yaml"
    cfgpath.write_text(yaml.safe_dump(raw))
    install_write_witness(load_config(str(cfgpath)).map_store["path"])
    env = {"SHARDMOVE_PRISM": ""} if os.path.dirname(prism_binary) == _prism_cache() else {"SHARDMOVE_PRISM": prism_binary}
    r = run_cli("plan", "--config", str(cfgpath), env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    _prism_ran(r.stderr, 1)
    plan_id = reference["plan_id"]
    r = run_cli("run", plan_id, "--config", str(cfgpath), env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    _prism_ran(r.stderr, 1)
    assert outcome(str(cfgpath), plan_id) == reference


def _prism_cache():
    from transforms.engines import prism_cache_dir

    return prism_cache_dir()


def test_prism_as_users_type_it_direct_runner_finds_the_local_binary(template, reference, tmp_path, prism_binary):
    """``--runner=DirectRunner`` with no --prism_location: shardmove points Beam at the
    cached binary (found through SHARDMOVE_PRISM here, as on a machine where
    ``python -m transforms.engines prism`` built it), so nothing is downloaded and the
    pipelines run on Prism, not on the fallback engine."""
    cfgpath = fresh(template, tmp_path)
    env = {"SHARDMOVE_PRISM": prism_binary}
    r = run_cli("plan", "--config", cfgpath, "--", "--runner=DirectRunner", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    _prism_ran(r.stderr, 1)
    plan_id = reference["plan_id"]
    r = run_cli("run", plan_id, "--config", cfgpath, "--", "--runner=DirectRunner", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    _prism_ran(r.stderr, 1)
    assert outcome(cfgpath, plan_id) == reference


def _slow_prism_run(template, reference, tmp_path, prism_binary, *, copy_concurrency, latency_ms):
    """Plan on Prism, then start a run with slow copies in its own session and wait until it has
    committed checkpoint parts: (config, Beam args, plan id, plan dir, the running process)."""
    cfgpath = fresh(template, tmp_path)
    args = ["--runner=PrismRunner", f"--prism_location={prism_binary}"]
    r = run_cli("plan", "--config", cfgpath, "--", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    plan_id = reference["plan_id"]
    with open(cfgpath, "a") as f:
        f.write(f"copy_concurrency: {copy_concurrency}\n"
                f"faults: {{copy: {{latency_ms: {latency_ms}, keys_per_call: 1}}}}\n")
    plan_dir = os.path.join(load_config(cfgpath).work_dir, "plans", plan_id)
    p = subprocess.Popen([os.path.join(VENV_BIN, "shardmove"), "run", plan_id, "--config", cfgpath, "--", *args],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _wait_for_parts(plan_dir, 3)
    except BaseException:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        raise
    return cfgpath, args, plan_id, plan_dir, p


def test_prism_sigkill_then_rerun_loses_nothing(template, reference, tmp_path, prism_binary):
    """SIGKILL of the whole run (launcher, Prism, its SDK workers) mid-copy; a rerun on
    Prism takes the dead holder's lease over and completes: same map and records, each
    map row written once (a Done lost with the kill is found at its target, not rewritten)."""
    cfgpath, args, plan_id, plan_dir, p = _slow_prism_run(template, reference, tmp_path, prism_binary,
                                                          copy_concurrency=2, latency_ms=20)
    try:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == -signal.SIGKILL
    before = api.status(plan_dir).details
    assert not before["complete"]  # killed mid-run ...
    assert before["states"].get("Planned", 0) < before["planned"]  # ... after checkpointed progress
    with open(cfgpath, "a") as f:
        f.write("faults: {}\n")
    r = run_cli("run", plan_id, "--config", cfgpath, "--", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    _prism_ran(r.stderr, 1)
    got = outcome(cfgpath, plan_id)
    for k in ("plan_id", "files", "map", "records", "writes"):
        assert got[k] == reference[k], k
    for k in ("planned", "done", "failed", "states", "failures_by_reason", "complete"):
        assert got["summary"][k] == reference["summary"][k], k


def test_prism_sigterm_exits_130_then_rerun_completes(template, reference, tmp_path, prism_binary):
    """SIGTERM to the launcher of a run on Prism: the DoFns on Prism's SDK worker honour
    the stop marker and flush, the job ends, the run exits 130; a rerun completes identically."""
    cfgpath, args, plan_id, plan_dir, p = _slow_prism_run(template, reference, tmp_path, prism_binary,
                                                          copy_concurrency=1, latency_ms=30)
    try:
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=300)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 130, err[-3000:]
    assert "interrupted: checkpoints flushed; rerun to resume" in out
    assert "Traceback" not in err
    assert not api.status(plan_dir).details["complete"]
    with open(cfgpath, "a") as f:
        f.write("faults: {}\n")
    r = run_cli("run", plan_id, "--config", cfgpath, "--", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert outcome(cfgpath, plan_id) == reference


# --------------------------------------------------------------- dataflow

def _dataflow_config(template, where, setup_file=True):
    """configs/dataflow.yaml as shipped (runner, options, tuning), pointed at a local keyspace."""
    with open(os.path.join(ROOT, "configs", "dataflow.yaml")) as f:
        raw = yaml.safe_load(f)
    d = where / "ks"
    shutil.copytree(template, d)
    with open(d / "shardmove.yaml") as f:
        demo = yaml.safe_load(f)
    for k in ("map_store", "data_store", "current_shards", "target", "work_dir"):
        raw[k] = demo[k]
    if not setup_file:
        raw["beam"]["options"] = [o for o in raw["beam"]["options"] if not o.startswith("--setup_file")]
    path = d / "dataflow.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.fixture
def offline_gcp(monkeypatch):
    """A dry run never calls Google; make sure nothing even looks for credentials."""
    from apache_beam.internal.gcp import auth

    monkeypatch.setenv("NO_GCE_CHECK", "true")
    monkeypatch.setattr(auth._Credentials, "_credentials_init", True)
    monkeypatch.setattr(auth._Credentials, "_credentials", None)


def _capture_results(monkeypatch):
    import transforms.runner as runner

    results = []
    real = runner.run_pipeline

    def capture(p):
        results.append(real(p))
        return results[-1]

    monkeypatch.setattr(runner, "run_pipeline", capture)
    return results


def _transforms(result):
    return {t.unique_name for t in result.job.proto_pipeline.components.transforms.values()}


def test_dataflow_dry_run_translates_plan_and_run_offline(template, tmp_path, offline_gcp, monkeypatch):
    from transforms.runner import dry_run_stages

    import dataclasses

    cfgpath = _dataflow_config(template, tmp_path, setup_file=False)  # the CLI test below builds the sdist
    cfg = load_config(cfgpath)
    assert cfg.beam["runner"] == "DataflowRunner"
    # a committed plan to translate the run of (planned on the in-memory engine)
    plan_dir = api.plan(dataclasses.replace(cfg, beam={"runner": "FnApiRunner"}), out=quiet).plan_dir
    before = sorted(os.listdir(plan_dir))
    results = _capture_results(monkeypatch)
    lines = []
    fast = ["--dry_run=True", "--experiments=disable_logging_submission_environment"]  # no `pip freeze`
    t0 = time.time()
    res = api.plan(cfg, beam_args=fast, out=lines.append)
    assert res.plan_dir is None and res.dry_run
    run = api.run(cfg, plan_dir, beam_args=fast, out=lines.append)
    elapsed = time.time() - t0
    assert run.exit_code == 0
    plan_job, run_job = results
    assert dry_run_stages(plan_job) == ["ListChunks", "PlanChunks", "DetectDuplicates", "WriteMoveFiles",
                                        "FinalizeStart", "Finalize"]
    assert dry_run_stages(run_job) == ["LoadWork", "StableInput", "CopyKeys", "VerifyCopies", "SwapBatches"]
    assert {"PlanChunks/PlanChunk", "WriteMoveFiles/GroupByWorkGroup", "WriteMoveFiles/WriteGroupFiles"} <= _transforms(plan_job)
    assert {"LoadWork/ReadGroupWork", "CopyKeys/CopyChunk", "VerifyCopies/VerifyChunk",
            "SwapBatches/SwapChunk"} <= _transforms(run_job)
    assert any(l.startswith("dataflow dry run: job translated, 5 stages (LoadWork,") for l in lines)
    # a Dataflow job: Docker workers, the options of configs/dataflow.yaml
    for r in results:
        envs = r.job.proto_pipeline.components.environments.values()
        assert all(e.urn == "beam:env:docker:v1" for e in envs)
        opts = r.job.options.get_all_options()
        assert opts["project"] == "my-project" and opts["region"] == "us-central1"
        assert opts["temp_location"].startswith("gs://")
    # nothing executed, nothing committed, no lease taken
    assert sorted(os.listdir(plan_dir)) == before
    assert sorted(n for n in os.listdir(os.path.dirname(plan_dir)) if not n.startswith(".")) == [
        os.path.basename(plan_dir)]
    assert elapsed < 60


def _cli_plan_id(cfgpath):
    r = run_cli("plan", "--config", cfgpath, "--", "--runner=FnApiRunner")
    assert r.returncode == 0, r.stderr[-3000:]
    return next(l.split(": ", 1)[1] for l in r.stdout.splitlines() if l.startswith("plan id: "))


def test_dataflow_cli_run_dry_run_with_setup_file(template, tmp_path):
    """The user's command, verbatim: configs/dataflow.yaml (with --setup_file=./pyproject.toml,
    relative to the repository root: an sdist of this project is built for the workers)
    and ``-- --dry_run=True``."""
    pytest.importorskip("build")
    cfgpath = _dataflow_config(template, tmp_path)
    plan_id = _cli_plan_id(cfgpath)  # planned on the in-memory engine (flags after -- win)
    plan_dir = os.path.join(load_config(cfgpath).work_dir, "plans", plan_id)
    before = sorted(os.listdir(plan_dir))
    r = run_cli("run", plan_id, "--config", cfgpath, "--", "--dry_run=True", env={"NO_GCE_CHECK": "true"},
                cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "dataflow dry run: job translated, 5 stages (LoadWork, StableInput, CopyKeys," in r.stdout
    assert sorted(os.listdir(plan_dir)) == before  # no lease, no checkpoint, no summary


def test_dataflow_cli_plan_dry_run(template, tmp_path):
    cfgpath = _dataflow_config(template, tmp_path, setup_file=False)
    r = run_cli("plan", "--config", cfgpath, "--", "--dry_run=True", env={"NO_GCE_CHECK": "true"}, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "dataflow dry run: job translated, 6 stages (ListChunks, PlanChunks," in r.stdout
    assert "plan dir:" not in r.stdout
    # the preflight's findings for workers on other machines, as warnings: the translation still happens
    warnings = [l for l in r.stdout.splitlines() if l.startswith("warning: ")]
    assert len(warnings) == 3, r.stdout
    assert warnings[0].startswith("warning: map_store: a SQLite store cannot be used")
    assert "SQLite locking is unsafe on network filesystems" in warnings[0]
    assert warnings[1].startswith("warning: data_store: a SQLite store cannot be used")
    assert warnings[2].startswith("warning: work_dir ") and "DataflowRunner runs its workers" in warnings[2]
    plans = os.path.join(load_config(cfgpath).work_dir, "plans")
    assert not [n for n in os.listdir(plans) if not n.startswith(".")] if os.path.exists(plans) else True


@pytest.mark.parametrize("name,runner", [("flink", "FlinkRunner"), ("spark", "SparkRunner")])
def test_flink_and_spark_configs_are_well_formed(name, runner):
    """Untested against a cluster (no job-server jar here): the configs load and
    Beam accepts every flag they pass."""
    from apache_beam.options.pipeline_options import FlinkRunnerOptions, PortableOptions, SparkRunnerOptions

    from transforms.runner import is_dry_run, pipeline_args, runner_name

    cfg = load_config(os.path.join(ROOT, "configs", f"{name}.yaml"))
    args = pipeline_args(cfg.beam)
    assert runner_name(args) == runner and not is_dry_run(args)
    from apache_beam.options.pipeline_options import PipelineOptions

    opts = PipelineOptions(args)
    assert opts.view_as(PortableOptions).environment_type in ("EXTERNAL", "DOCKER")
    view = opts.view_as(FlinkRunnerOptions if name == "flink" else SparkRunnerOptions)
    assert (view.flink_master if name == "flink" else view.spark_master_url)
    assert set(opts.get_all_options(retain_unknown_options=True)) == set(opts.get_all_options())  # no unknown flag


def test_one_beam_version_everywhere():
    """The Python SDK pin, Prism's tag, the job-server jars and the SDK image tags
    in the README and configs name one Beam version: the installed one."""
    import re

    import apache_beam

    v = apache_beam.__version__
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        assert re.findall(r'"apache-beam\[gcp\]==([^"]+)"', f.read()) == [v]
    texts = {}
    for name in ["README.md", "run_local.sh"] + [os.path.join("configs", n) for n in os.listdir(os.path.join(ROOT, "configs"))]:
        with open(os.path.join(ROOT, name)) as f:
            texts[name] = f.read()
    patterns = (r"beam_python3\.\d+_sdk:(\d+\.\d+\.\d+)", r"job[-_]server[-:](\d+\.\d+\.\d+)",
                r"_job_server:(\d+\.\d+\.\d+)", r"prism@v(\d+\.\d+\.\d+)", r"Prism v(\d+\.\d+\.\d+)")
    seen = {(name, m) for name, t in texts.items() for p in patterns for m in re.findall(p, t)}
    assert seen and {m for _n, m in seen} == {v}, sorted(seen)
    assert any(n == "README.md" for n, _m in seen) and any(n.startswith("configs") for n, _m in seen)


_SEEN_THRESHOLDS: list = []


def _note_threshold(x):
    import gc

    _SEEN_THRESHOLDS.append(gc.get_threshold())
    return x


def test_pipelines_run_with_fewer_young_collections_and_restore_the_thresholds():
    """While a pipeline runs, the collector's young threshold is at least GC_YOUNG_THRESHOLD
    (never lowered); the caller's thresholds come back after it, also when it fails."""
    import gc

    import apache_beam as beam

    from transforms import runner

    def pipeline(fn):
        p = beam.Pipeline(runner=runner._fn_api_runner(), options=beam.options.pipeline_options.PipelineOptions())
        _ = p | beam.Create([1]) | beam.Map(fn)
        return p

    _SEEN_THRESHOLDS.clear()
    old = gc.get_threshold()
    try:
        gc.set_threshold(500, 7, 9)
        runner.run_pipeline(pipeline(_note_threshold))
        assert _SEEN_THRESHOLDS == [(runner.GC_YOUNG_THRESHOLD, 7, 9)]
        assert gc.get_threshold() == (500, 7, 9)

        def boom(_x):
            raise RuntimeError("boom")

        with pytest.raises(Exception, match="boom"):
            runner.run_pipeline(pipeline(boom))
        assert gc.get_threshold() == (500, 7, 9)

        gc.set_threshold(50000, 3, 4)  # a caller's higher threshold is kept
        with runner.fewer_collections():
            with runner.fewer_collections():
                assert gc.get_threshold() == (50000, 3, 4)
        assert gc.get_threshold() == (50000, 3, 4)
    finally:
        gc.set_threshold(*old)


def test_pipeline_options_views_are_made_once_and_stay_shared():
    """transforms.runner's options hand out one view per options class (Beam asks ~100
    times per plan, and each new view re-parses the flags): values set through one view are
    seen through the others and in get_all_options; a copy (Beam deep-copies a pipeline's
    options) and a pickle round trip keep the values and have views of their own."""
    import copy
    import pickle

    from apache_beam.options.pipeline_options import DirectOptions, StandardOptions, TypeOptions

    from transforms.runner import _options

    opts = _options(["--runner=FnApiRunner", "--direct_num_workers=3"])
    assert opts.view_as(StandardOptions) is opts.view_as(StandardOptions)
    assert opts.view_as(DirectOptions).direct_num_workers == 3
    opts.view_as(TypeOptions).pipeline_type_check = False
    assert opts.view_as(TypeOptions).pipeline_type_check is False
    assert opts.get_all_options()["pipeline_type_check"] is False
    dup = copy.deepcopy(opts)
    assert dup.view_as(StandardOptions) is not opts.view_as(StandardOptions)
    dup.view_as(DirectOptions).direct_num_workers = 5
    assert opts.view_as(DirectOptions).direct_num_workers == 3 and dup.get_all_options()["direct_num_workers"] == 5
    back = pickle.loads(pickle.dumps(opts))
    assert back.view_as(StandardOptions).runner == "FnApiRunner"
    assert back.view_as(TypeOptions).pipeline_type_check is False
