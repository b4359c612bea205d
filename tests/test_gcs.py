"""gs:// locations against local emulators: commits, listings, Beam bulk IO, retries.

fake-gcs-server enforces generation preconditions (412), so the commit
semantics are proven there; Beam's gs:// IO is exercised on both emulators.
"""
from __future__ import annotations

import ast
import http.server
import json
import os
import subprocess
import sys
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gcs_emulators import *  # noqa: F401,F403 -- fixtures
from pipeline import checkpoint as ckpt
from pipeline import fs, gcs, workdir
from pipeline import lease as lease_mod
from pipeline.errors import Refused, TransientError
from transforms import bulkio

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parquet_bytes(n=50_000, row_group=5_000) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"key": [f"k{i}".encode() for i in range(n)], "v": list(range(n))}), sink,
                   row_group_size=row_group)
    return sink.getvalue().to_pybytes()


# ------------------------------------------------------------ preconditions


def test_emulator_answers_412_on_generation_precondition(use_fake_gcs):
    """The premise of the commit tests: fake-gcs-server refuses a second create."""
    from google.api_core.exceptions import PreconditionFailed

    bucket = use_fake_gcs.new_bucket()
    path = f"gs://{bucket}/x"
    gen = gcs.upload(path, b"one", if_generation_match=0)
    assert gen > 0
    with pytest.raises(PreconditionFailed):
        gcs.upload(path, b"two", if_generation_match=0)
    with pytest.raises(PreconditionFailed):
        gcs.upload(path, b"two", if_generation_match=gen + 1)
    assert gcs.read_bytes(path) == b"one"


def test_create_if_absent_same_bytes_committed_different_conflict(use_fake_gcs):
    bucket = use_fake_gcs.new_bucket()
    path = f"gs://{bucket}/plans/p/progress/000001-000001.json"
    assert fs.create_if_absent(path, b"event") is True
    assert fs.create_if_absent(path, b"event") is False  # already committed
    with pytest.raises(fs.CommitConflict, match="already exists with different content"):
        fs.create_if_absent(path, b"other")
    assert fs.read_bytes(path) == b"event"


def test_checkpoint_part_second_create_is_handled(use_fake_gcs):
    bucket = use_fake_gcs.new_bucket()
    plan_dir = f"gs://{bucket}/work/plans/" + "a" * 64
    gid = "s0~s1~00000"
    w = ckpt.CheckpointWriter(plan_dir, "a" * 64, gid, 1, flush_every=1000, flush_interval_s=3600)
    w.record_many([b"k1", b"k2"], [11, 12], 2, [1, 1], [None, None], [b"\x01" * 16, b"\x02" * 16],
                  [5, 6], [None, None])
    name = w.flush()
    assert name and ckpt.part_name(1)[:14] == name[:14]
    part = fs.join(ckpt.group_dir(plan_dir, gid), name)
    data = fs.read_bytes(part)
    # a retried bundle commits the very same part again: precondition 412 -> already committed
    assert fs.create_if_absent(part, data) is False
    # a different writer reusing the name: conflict, the committed part is untouched
    with pytest.raises(fs.CommitConflict):
        fs.create_if_absent(part, data[:-8] + b"garbage!")
    assert fs.read_bytes(part) == data
    g = ckpt.read_group(plan_dir, "a" * 64, gid)
    assert g.table.num_rows == 2 and not g.skipped
    # compaction on gs:// (atomic replace + deletion of the folded parts)
    res = ckpt.compact_group(plan_dir, "a" * 64, gid)
    assert res.written and res.parts_deleted == 1
    assert fs.listdir(ckpt.group_dir(plan_dir, gid)) == [ckpt.COMPACTED_NAME]
    assert ckpt.read_group(plan_dir, "a" * 64, gid).table.num_rows == 2


def test_lease_object_conflicts_and_stale_replace(use_fake_gcs):
    bucket = use_fake_gcs.new_bucket()
    plan_dir = f"gs://{bucket}/work/plans/" + "b" * 64
    lease = lease_mod.acquire(plan_dir, "b" * 64, ttl=60)
    path = fs.join(plan_dir, "lease.json")
    doc = fs.read_bytes(path)
    assert json.loads(doc)["epoch"] == 1
    # a second create of the lease object: same bytes = committed, other bytes = conflict
    assert fs.create_if_absent(path, doc) is False
    with pytest.raises(fs.CommitConflict):
        fs.create_if_absent(path, doc.replace(b'"epoch": 1', b'"epoch": 7'))
    # a live holder refuses another acquirer
    with pytest.raises(Refused, match="leased by"):
        lease_mod.acquire(plan_dir, "b" * 64, ttl=60)
    # compare-and-swap: a replace based on a stale read is refused
    data, gen = fs.read_versioned(path)
    assert data == doc and gen > 0
    lease.renew()  # another writer (the renewal) replaces the object meanwhile
    with pytest.raises(fs.CommitConflict, match="stale replace"):
        fs.write_atomic(path, b'{"stolen": true}', if_version=gen)
    with pytest.raises(fs.CommitConflict, match="stale replace"):
        gcs.replace(path, b'{"stolen": true}', generation=gen)
    assert b"stolen" not in fs.read_bytes(path)
    # expected-absent (generation 0) on an existing object is stale too
    with pytest.raises(fs.CommitConflict):
        gcs.replace(path, b"{}", generation=0)
    lease.release()
    assert json.loads(fs.read_bytes(path))["released"] is True


def test_replace_whose_bytes_already_landed_counts_as_committed(use_fake_gcs):
    """A retried upload whose first attempt landed sees 412 but the object holds our bytes."""
    bucket = use_fake_gcs.new_bucket()
    path = f"gs://{bucket}/summary.json"
    g1 = gcs.replace(path, b"v1", generation=0)
    g2 = gcs.replace(path, b"v2", generation=g1)
    assert gcs.replace(path, b"v2", generation=g1) == g2  # stale generation, same bytes
    assert fs.read_bytes(path) == b"v2"


# ----------------------------------------------------------------- listings


def test_listing_reading_and_removal(use_fake_gcs):
    bucket = use_fake_gcs.new_bucket()
    base = f"gs://{bucket}/w"
    for rel in ("a.json", "d/x.parquet", "d/e/y.parquet", "d2/z"):
        fs.write_atomic(fs.join(base, rel), rel.encode())
    assert fs.listdir(base) == ["a.json", "d", "d2"]
    assert fs.listdir(fs.join(base, "d")) == ["e", "x.parquet"]
    assert fs.listdir(fs.join(base, "nothing")) == []
    assert fs.walk_files(fs.join(base, "d")) == [f"{base}/d/e/y.parquet", f"{base}/d/x.parquet"]
    assert fs.exists(fs.join(base, "d")) and fs.exists(fs.join(base, "a.json"))
    assert fs.isfile(fs.join(base, "a.json")) and not fs.isfile(fs.join(base, "d"))
    assert not fs.exists(fs.join(base, "a")) and not fs.exists(fs.join(base, "d/e/y"))
    assert fs.size(fs.join(base, "d2/z")) == 4
    with pytest.raises(FileNotFoundError):
        fs.read_bytes(fs.join(base, "missing"))
    with pytest.raises(FileNotFoundError):
        fs.size(fs.join(base, "missing"))
    with fs.open_input(fs.join(base, "a.json")) as f:
        assert f.read() == b"a.json"
    fs.remove(fs.join(base, "a.json"))
    fs.remove(fs.join(base, "a.json"))  # idempotent
    # rename_dir: everything moves, and the commit marker is there at the end
    fs.write_atomic(fs.join(base, "d", "manifest.json"), b"{}")
    assert fs.rename_dir(fs.join(base, "d"), fs.join(base, "final"), markers=workdir.COMMIT_MARKERS) is True
    assert [p.rsplit("/w/", 1)[1] for p in fs.walk_files(fs.join(base, "final"))] == [
        "final/e/y.parquet", "final/manifest.json", "final/x.parquet"]
    assert not fs.exists(fs.join(base, "d"))
    assert fs.rename_dir(fs.join(base, "d2"), fs.join(base, "final"), markers=workdir.COMMIT_MARKERS) is False  # already committed
    fs.rmtree(base)
    assert fs.walk_files(base) == [] and not fs.exists(base)
    nob = "gs://no-such-bucket-" + bucket[-12:]  # a missing bucket looks like a missing directory
    assert fs.listdir(nob) == [] and fs.walk_files(nob + "/x") == [] and not fs.exists(nob + "/x")
    with pytest.raises(FileNotFoundError):
        fs.read_bytes(nob + "/x")


def test_copy_tree_copies_commit_markers_last(tmp_path):
    """Local and gs:// share the order: sub-directories, top-level files, markers."""
    order = sorted(["manifest.json", "moves/a.parquet", "z.json", "snapshot.json", "a/b/c"], key=lambda r: fs._copy_order(r, workdir.COMMIT_MARKERS))
    assert order[:2] == ["a/b/c", "moves/a.parquet"]
    assert set(order[-2:]) == {"manifest.json", "snapshot.json"}
    src = tmp_path / "src"
    (src / "moves").mkdir(parents=True)
    (src / "moves" / "g.parquet").write_bytes(b"m")
    (src / "manifest.json").write_bytes(b"{}")
    fs.copy_tree(str(src), str(tmp_path / "dst"), markers=workdir.COMMIT_MARKERS)
    assert (tmp_path / "dst" / "manifest.json").read_bytes() == b"{}"
    assert (tmp_path / "dst" / "moves" / "g.parquet").read_bytes() == b"m"


def test_local_versions_and_stale_replace(tmp_path):
    path = str(tmp_path / "lease.json")
    assert fs.read_versioned(path) == (None, 0)
    fs.write_atomic(path, b"one", if_version=0)
    data, v = fs.read_versioned(path)
    assert data == b"one" and v != 0
    fs.write_atomic(path, b"two", if_version=v)
    with pytest.raises(fs.CommitConflict, match="stale replace"):
        fs.write_atomic(path, b"three", if_version=v)
    with pytest.raises(fs.CommitConflict):
        fs.write_atomic(path, b"three", if_version=0)
    assert open(path, "rb").read() == b"two"
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]


# ---------------------------------------------------------- Beam bulk IO


@pytest.mark.parametrize("emulator", ["use_gcs_emulator", "use_fake_gcs"])
def test_bulk_parquet_through_beam_filesystems(emulator, request):
    emu = request.getfixturevalue(emulator)
    bucket = emu.new_bucket()
    data = parquet_bytes()
    path = f"gs://{bucket}/work/plans/x/moves/s0~s1~00000.parquet"
    t0 = time.monotonic()
    bulkio.write_bulk(path, data)
    bulkio.write_bulk(path, data)  # idempotent for deterministic bytes
    assert fs.read_bytes(path) == data
    assert fs.read_range(path, 0, 4) == b"PAR1" and fs.read_range(path, len(data) - 4, 100) == b"PAR1"
    with bulkio.open_bulk(path) as f:
        pf = pq.ParquetFile(f)
        assert pf.metadata.num_rows == 50_000 and pf.num_row_groups == 10
        assert pf.read_row_group(7, columns=["v"]).column(0).to_pylist()[:2] == [35_000, 35_001]
    assert time.monotonic() - t0 < 10, "Beam waited for credentials"
    with pytest.raises(FileNotFoundError):
        bulkio.open_bulk(f"gs://{bucket}/work/none.parquet")


def test_bulk_local_is_atomic_write(tmp_path):
    path = str(tmp_path / "m" / "g.parquet")
    os.makedirs(os.path.dirname(path))
    bulkio.write_bulk(path, b"PAR1")
    with bulkio.open_bulk(path) as f:
        assert f.read() == b"PAR1"
    assert fs.read_range(path, 1, 2) == b"AR" and fs.isfile(path) and not fs.isfile(str(tmp_path))
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"


_CHILD = r"""
import os, sys, time
import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from transforms import bulkio
path = sys.argv[1]
t1 = time.monotonic()
bulkio.write_bulk(path + "/in.bin", b"payload")  # Beam's first gs:// call: where the ~20 s wait would be
with bulkio.open_bulk(path + "/in.bin") as f:
    assert f.read() == b"payload"
from apache_beam.io.filesystems import FileSystems  # Beam's own entry point, short-circuited too
assert FileSystems.open(path + "/in.bin").read() == b"payload"
print("gcs_seconds", round(time.monotonic() - t1, 3))

def read(p):
    import os, time
    from transforms import bulkio
    t = time.monotonic()
    with bulkio.open_bulk(p) as f:
        return os.getpid(), time.monotonic() - t, f.read()

def write(r, name):
    bulkio.write_bulk(path + "/" + name, repr((r[0], r[1] < 10, r[2])).encode())

with beam.Pipeline(runner=FnApiRunner()) as p:  # in-process worker
    p | beam.Create([path + "/in.bin"]) | beam.Map(read) | beam.Map(write, "in_process")
opts = PipelineOptions(direct_running_mode="multi_processing", direct_num_workers=1)
with beam.Pipeline(runner=FnApiRunner(), options=opts) as p:  # a separate SDK worker process
    p | beam.Create([path + "/in.bin"]) | beam.Map(read) | beam.Map(write, "worker")
from apache_beam.internal.gcp import auth
print("short_circuited", auth._Credentials._credentials_init, auth._Credentials._credentials)
print("launcher_pid", os.getpid())
"""


def test_beam_credential_lookup_short_circuited_in_fresh_process(fake_gcs):
    """A fresh process (a CLI run), its in-process workers and a separate SDK worker
    process (multi_processing) do Beam gs:// IO without the ~20 s credential wait."""
    bucket = fake_gcs.new_bucket()
    env = dict(os.environ, **fake_gcs.env, PYTHONPATH=ROOT)
    env.pop("NO_GCE_CHECK", None)  # configure_for_emulator sets it itself
    r = subprocess.run([sys.executable, "-c", _CHILD, f"gs://{bucket}/w"], capture_output=True, text=True,
                       env=env, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "short_circuited True None" in r.stdout
    secs = float(r.stdout.split("gcs_seconds")[1].split()[0])
    assert secs < 10, f"gs:// IO took {secs}s: Beam waited for credentials"
    launcher = int(r.stdout.split("launcher_pid")[1].split()[0])
    blobs = fake_gcs.client().bucket(bucket)
    pid, fast, data = ast.literal_eval(blobs.blob("w/in_process").download_as_bytes().decode())
    assert (pid, fast, data) == (launcher, True, b"payload")
    pid, fast, data = ast.literal_eval(blobs.blob("w/worker").download_as_bytes().decode())
    assert pid != launcher and fast and data == b"payload"  # the worker inherited the emulator


@pytest.mark.parametrize("configure", [gcs.configure_for_emulator, bulkio.configure_for_emulator])
def test_configure_for_emulator_is_idempotent_and_noop_without_emulator(monkeypatch, configure):
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    assert configure() is False
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:9")
    monkeypatch.delenv("NO_GCE_CHECK", raising=False)
    assert configure() is True
    assert configure() is True
    assert os.environ["NO_GCE_CHECK"] == "true"


def test_beam_side_of_configure_for_emulator_short_circuits_beam_credentials(monkeypatch):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:9")
    assert bulkio.configure_for_emulator() is True
    from apache_beam.internal.gcp import auth

    assert auth._Credentials._credentials_init is True and auth._Credentials._credentials is None


def test_the_core_side_never_imports_beam():
    code = ("import os, sys\n"
            "os.environ['STORAGE_EMULATOR_HOST'] = 'http://127.0.0.1:9'\n"
            "from pipeline import fs, gcs\n"
            "assert gcs.configure_for_emulator() is True\n"
            "sys.exit(3 if any(m.startswith('apache_beam') for m in sys.modules) else 0)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


# ----------------------------------------------------------------- retries


class _FlakyHandler(http.server.BaseHTTPRequestHandler):
    failures = 0
    calls = 0

    def do_GET(self):  # noqa: N802
        if not self.path.startswith("/download/"):  # the client's background bucket-metadata probe
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        type(self).calls += 1
        if type(self).calls <= type(self).failures:
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = b"hello"
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def _flaky_server(failures: int):
    handler = type("H", (_FlakyHandler,), {"failures": failures, "calls": 0})
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, handler


def test_transient_503_is_retried_with_backoff(monkeypatch):
    srv, handler = _flaky_server(failures=1)
    try:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{srv.server_address[1]}")
        assert gcs.read_bytes("gs://bkt/obj") == b"hello"
        assert handler.calls == 2
    finally:
        srv.shutdown()


def test_transient_errors_exhausted_become_storage_unavailable(monkeypatch):
    srv, handler = _flaky_server(failures=10**6)
    try:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{srv.server_address[1]}")
        monkeypatch.setenv("SHARDMOVE_GCS_RETRY_TIMEOUT", "1.5")
        t0 = time.monotonic()
        with pytest.raises(gcs.StorageUnavailable) as ei:
            gcs.read_bytes("gs://bkt/obj")
        assert time.monotonic() - t0 < 15
        assert isinstance(ei.value, TransientError) and isinstance(ei.value, OSError)
        assert handler.calls >= 2
    finally:
        srv.shutdown()


def test_is_transient_classification():
    from google.api_core import exceptions as E

    assert gcs.is_transient(E.ServiceUnavailable("x"))
    assert gcs.is_transient(E.TooManyRequests("x"))
    assert gcs.is_transient(ConnectionResetError())
    assert not gcs.is_transient(E.Forbidden("x"))
    assert not gcs.is_transient(E.PreconditionFailed("x"))
    assert not gcs.is_transient(E.NotFound("x"))


def test_parse_locations():
    assert gcs.parse("gs://b/a/c") == ("b", "a/c")
    assert gcs.parse("gs://b") == ("b", "")
    with pytest.raises(ValueError):
        gcs.parse("gs:///x")
    with pytest.raises(ValueError):
        gcs.parse("/local")


class _ReplacedHandler(http.server.BaseHTTPRequestHandler):
    """An object whose first ``replaced`` downloads find it replaced since its stat (412)."""

    replaced = 0
    downloads = 0

    def _send(self, code, body=b"", ctype="application/octet-stream"):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802
        if self.path.startswith("/download/"):
            type(self).downloads += 1
            if type(self).downloads <= type(self).replaced:
                return self._send(412)
            return self._send(200, b"hello")
        if self.path.startswith("/storage/v1/b/bkt/o/obj"):
            meta = {"kind": "storage#object", "bucket": "bkt", "name": "obj", "generation": "7", "size": "5",
                    "updated": "2026-01-01T00:00:00.000Z"}
            return self._send(200, json.dumps(meta).encode(), "application/json")
        return self._send(404)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("replaced,attempts,found", [(2, 5, True), (10, 3, False)])
def test_read_object_rereads_a_replaced_object_on_the_retry_schedule(monkeypatch, replaced, attempts, found):
    handler = type("H", (_ReplacedHandler,), {"replaced": replaced, "downloads": 0})
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{srv.server_address[1]}")
        monkeypatch.setattr(gcs, "_READ_RETRY_BASE_S", 0.1)
        t0 = time.monotonic()
        if found:
            data, st = gcs.read_object("gs://bkt/obj", attempts=attempts)
            assert data == b"hello" and st.generation == 7
            assert handler.downloads == replaced + 1
            assert time.monotonic() - t0 >= 0.05 + 0.1  # waited between re-reads: equal jitter of 0.1, 0.2
        else:
            with pytest.raises(gcs.StorageUnavailable, match="keeps changing"):
                gcs.read_object("gs://bkt/obj", attempts=attempts)
            assert handler.downloads == attempts
    finally:
        srv.shutdown()
