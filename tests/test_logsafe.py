"""No key bytes at any log level (pipeline/logsafe.py).

Every subcommand runs through the real CLI at ``--log-level DEBUG --debug``
against a keyspace whose keys carry a marker, with an explicit target (Beam
elements are then Arrow tables of keys) and under faults; stdout and stderr
are searched for the keys' text, their hex (either case, as Arrow's repr
prints binary) and their Python repr.  Beam runs on the in-memory engine
(``FnApiRunner``), also with SDK workers in separate processes.
"""
import json
import logging
import os
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from pipeline import logsafe
from pipeline.errors import TransientError
from pipeline.stores.sqlite import SqliteDataStore, SqliteMapStore

from conftest import run_cli

MARK = "QZXKEYMARK"
CURRENT = ["s0", "s1", "s2"]
TARGET = CURRENT + ["s3"]


def marked_keyspace(tmp_path, n=300, faults=None):
    """Keys ``QZXKEYMARK0000Z``...; an explicit target snapshot; configs with and without faults."""
    d = str(tmp_path)
    keys = [f"{MARK}{i:04d}Z".encode() for i in range(n)]
    ms = SqliteMapStore.create(os.path.join(d, "map.sqlite"))
    ms.put_many([(k, CURRENT[i % 3]) for i, k in enumerate(keys)])
    ms.close()
    ds = SqliteDataStore(os.path.join(d, "shards"))
    for s in TARGET:
        ds.ensure_shard(s)
    for s in CURRENT:
        ds.put_many(s, [(k, b"value of " + k) for i, k in enumerate(keys) if CURRENT[i % 3] == s])
    ds.close()
    pq.write_table(pa.table({"key": pa.array(keys, pa.binary()),
                             "shard_id": pa.array([TARGET[(i * 7) % 4] for i in range(n)])}),
                   os.path.join(d, "target.parquet"))
    base = {"work_dir": os.path.join(d, "work"),
            "map_store": {"kind": "sqlite", "path": os.path.join(d, "map.sqlite")},
            "data_store": {"kind": "sqlite", "directory": os.path.join(d, "shards")},
            "current_shards": CURRENT,
            "target": {"snapshot": os.path.join(d, "target.parquet"),
                       "shards": [{"id": s, "weight": 1, "capacity_keys": 1000} for s in TARGET]},
            "swap_batch_size": 40, "hash_buckets": 2, "retry_base_delay": "1ms", "max_retries": 2,
            "checkpoint_flush_interval": "50ms"}
    paths = []
    for name, extra in (("shardmove.yaml", {}), ("faulty.yaml", {"faults": faults or {}})):
        p = os.path.join(d, name)
        with open(p, "w") as f:
            yaml.safe_dump({**base, **extra}, f)
        paths.append(p)
    return keys, paths[0], paths[1]


def leaks(text: str, keys) -> list:
    """The forms of any key found in ``text``: text, hex (any case), repr."""
    low = text.lower()
    found = []
    for k in keys:
        for form in (k.decode(), k.hex(), repr(k)):
            if form.lower() in low:
                found.append(form)
    # the marker alone, in text or hex: catches truncated and escaped forms too
    for form in (MARK, MARK.encode().hex()):
        if form.lower() in low:
            found.append(form)
    return found


DEBUG = ("--log-level", "DEBUG", "--debug")


def test_every_subcommand_at_debug_prints_no_key_bytes(tmp_path):
    faults = {"seed": 4, "copy": {"transient_rate": 0.2, "permanent_rate": 0.05},
              "verify": {"mismatch_rate": 0.05}, "swap": {"transient_first": 1}}
    keys, cfg, faulty = marked_keyspace(tmp_path, faults=faults)
    outs = {}

    def cli(name, *args, codes=(0,)):
        # shardmove's own flags go before "--": what follows it is Beam's (an unknown one is refused)
        cut = args.index("--") if "--" in args else len(args)
        r = run_cli(*args[:cut], *DEBUG, *args[cut:])
        outs[name] = r.stdout + r.stderr
        assert r.returncode in codes, (name, r.returncode, r.stderr[-2000:])
        return r

    cli("validate", "validate", "--config", cfg)
    cli("snapshot", "snapshot", "--config", cfg)
    cli("dry run", "plan", "--config", cfg, "--dry-run", "--report-dir", str(tmp_path / "dry"))
    r = cli("plan", "plan", "--config", cfg)
    plan_id = next(line.split(": ", 1)[1] for line in r.stdout.splitlines() if line.startswith("plan id: "))
    cli("compare", "validate", "--config", cfg, "--compare", plan_id)
    cli("verify before", "verify", plan_id, "--config", cfg, "--sample", "50")
    r = cli("run with faults", "run", plan_id, "--config", faulty, codes=(3,))
    assert "failed=0" not in r.stdout
    cli("status", "status", plan_id, "--config", cfg, codes=(3,))
    cli("status json", "status", plan_id, "--config", cfg, "--json", codes=(3,))
    cli("failures", "failures", plan_id, "--config", cfg, "--out", str(tmp_path / "failed.parquet"))
    assert pq.read_table(str(tmp_path / "failed.parquet")).num_rows > 0  # the file may hold keys; output not
    # the failed keys retried with SDK workers in two processes, whose own Beam loggers are at DEBUG
    cli("retry, workers at debug", "run", plan_id, "--config", cfg, "--retry-failed", "--",
        "--direct_running_mode=multi_processing", "--direct_num_workers=2",
        "--default_sdk_harness_log_level=DEBUG")
    cli("post-verify", "verify", plan_id, "--config", cfg, "--sample", "50")
    cli("report", "report", plan_id, "--config", cfg)
    cli("metrics", "metrics", plan_id, "--config", cfg, "--out", str(tmp_path / "m.prom"))
    cli("history", "history", "--config", cfg)
    cli("catchup", "catchup", plan_id, "--config", cfg, "--dry-run")
    cli("rollback dry run", "rollback", plan_id, "--config", faulty)
    cli("rollback", "rollback", plan_id, "--config", faulty, "--apply", codes=(0, 3))
    cli("cleanup", "cleanup", plan_id, "--config", cfg, "--older-than", "0s", codes=(0, 4))
    cli("cleanup apply", "cleanup", plan_id, "--config", cfg, "--older-than", "0s", "--apply", codes=(0, 4))
    assert " INFO shardmove." in outs["plan"]  # the level was below WARNING
    found = {name: leaks(text, keys) for name, text in outs.items()}
    assert {n: f for n, f in found.items() if f} == {}


def test_beam_element_logs_and_third_party_tracebacks_are_withheld(capsys):
    """The root of the leak: Beam's operations logger prints each element's repr at DEBUG,
    and an exception's message may quote a key.  Configured like the CLI at DEBUG."""
    key = f"{MARK}0001Z".encode()
    table = pa.table({"key": pa.array([key], pa.binary())})
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    # Beam's loggers as a fresh process has them (an in-process CLI call of an earlier test
    # in this worker may have quieted "apache_beam")
    beam_levels = {n: logging.getLogger(n).level for n in ("apache_beam", "apache_beam.runners.worker.operations")}
    for h in saved[1]:
        root.removeHandler(h)
    try:
        for n in beam_levels:
            logging.getLogger(n).setLevel(logging.NOTSET)
        logsafe.configure(logging.DEBUG, sys.stderr)
        beam_ops = logging.getLogger("apache_beam.runners.worker.operations")
        beam_ops.debug("Processing [%s] in %s", table, "op")
        logging.getLogger("apache_beam.runners.worker.operations").info("element %s %r", table, key)
        logging.getLogger("thirdparty.urllib3").debug("GET /o/%s", key.decode())
        logging.log(logging.INFO, table)  # a non-string message (Beam logs values like this)
        from pipeline.stores.objects import encode_key

        name = encode_key(key)  # an object store's record name encodes its key (base32hex)
        # (loggers of the test's own: other tests may have tuned the real libraries' ones)
        logging.getLogger("thirdparty.urllib3").warning(
            "Retrying (%r) after connection broken by '%r': %s", "Retry(total=2)", "reset",
            "/storage/v1/b/bkt/o/shards%2Fs0%2F" + name.replace("/", "%2F"))
        logging.getLogger("thirdparty.storage").warning("object %s failed", "gs://bkt/s0/" + name)
        own = logging.getLogger("shardmove.test")
        own.debug("own debug line %d", 7)
        try:
            try:
                {}[key]
            except KeyError as e:
                raise ValueError(f"bad {key!r}") from e
        except ValueError:
            own.exception("internal failure")
        try:
            raise TransientError("map swap: database is locked")
        except TransientError:
            own.exception("store failure")
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        root.setLevel(saved[0])
        for h in saved[1]:
            root.addHandler(h)
        for n, level in beam_levels.items():
            logging.getLogger(n).setLevel(level)
    err = capsys.readouterr().err
    assert leaks(err, [key]) == [], err
    assert name.split("/", 2)[2] not in err and name.split("/", 2)[2][:20] not in err
    assert err.count("<key withheld>") == 2
    assert "own debug line 7" in err
    assert "element <Table> '<bytes>'" in err and "INFO root: <Table>" in err
    assert "KeyError: <message withheld" in err and "ValueError: <message withheld" in err
    assert "TransientError: map swap: database is locked" in err  # shardmove's own messages stay
    assert "Traceback (most recent call last)" in err and "test_logsafe.py" in err


def test_chunk_repr_names_the_batch_never_its_keys():
    from transforms.execute import Chunk

    key = f"{MARK}0002Z".encode()
    ch = Chunk("s0~s3~0", 3, "s0", "s3", [key], [1], [0], [0], [None], [None], [None], [None])
    assert repr(ch) == "Chunk(s0~s3~0#000003, 1 keys)" and str(ch) == repr(ch)
    assert leaks(json.dumps(repr([ch])), [key]) == []


def test_python_api_at_debug_prints_no_key_bytes(tmp_path):
    """Without the CLI's handler: an application's own DEBUG logging around ``shardmove.api``
    (a dry run with an explicit target, and a run) shows no element either."""
    import subprocess

    keys, cfg, _faulty = marked_keyspace(tmp_path)
    script = (
        "import logging, sys\n"
        "logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)\n"
        "from shardmove import api\n"
        "from pipeline.config import load_config\n"
        f"cfg = load_config({cfg!r})\n"
        "api.plan(cfg, dry_run=True)\n"
        "res = api.plan(cfg)\n"
        "print('exit', api.run(cfg, res.plan_dir).exit_code)\n"
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0 and "exit 0" in r.stdout, r.stderr[-3000:]
    assert "DEBUG" in r.stderr  # the application's debug logging was on
    assert leaks(r.stdout + r.stderr, keys) == []
