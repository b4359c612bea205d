"""Bulk files through Beam's GCS IO, and Beam's credential lookup cut short for emulators.

The Beam side of ``gs://`` locations; :mod:`pipeline.gcs` is the Beam-free
side (object reads, listings and atomic commits through google-cloud-storage).

Bulk files
----------
:func:`write_bulk` / :func:`open_bulk` move large, deterministic Parquet
files (move files, spill data).  Local: :func:`pipeline.fs.write_atomic` /
``open``.  ``gs://``: Beam's GCS IO, the layer under ``FileSystems``, with
one cached client per process (upload finalised on close -- atomic, but an
overwrite, not create-if-absent; ranged reads on open, so a footer read does
not download the file).  Use them only for files whose rewrite with the same
bytes is harmless.

Emulators
---------
With ``STORAGE_EMULATOR_HOST`` set, :func:`configure_for_emulator` does what
:func:`pipeline.gcs.configure_for_emulator` does and stops Beam from
spending ~20 s on credential discovery: at once if Beam's auth module is
loaded, else right after it gets imported (an import hook), so merely
calling it never imports that module.  :func:`beam_gcsio` calls it, so it
runs in every process that does bulk ``gs://`` IO, Beam workers included:
the in-process FnApiRunner shares the launcher's state, and multi-process
workers inherit the environment variable.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import threading

from pipeline import fs, gcs

__all__ = [
    "configure_for_emulator",
    "short_circuit_beam_credentials",
    "beam_gcsio",
    "write_bulk",
    "open_bulk",
]

_BEAM_AUTH = "apache_beam.internal.gcp.auth"
_LOCK = threading.Lock()
_BEAM_DONE = False


def _patch_beam_auth(auth) -> bool:
    creds = getattr(auth, "_Credentials", None)
    lock = getattr(creds, "_credentials_lock", None)
    if creds is None or lock is None or not hasattr(creds, "_credentials_init"):
        return False
    with lock:
        creds._credentials = None
        creds._credentials_init = True
    return True


def short_circuit_beam_credentials() -> bool:
    """Make Beam's GCS IO use an anonymous client without credential discovery.

    Beam (``apache_beam/internal/gcp/auth.py``) caches the result of its
    credential lookup in ``_Credentials``; its first lookup retries
    ``google.auth.default()`` with exponential backoff (about 20 s when no
    credentials exist).  Marking the cache as initialised with no credentials
    makes ``gcsio.create_storage_client`` return
    ``storage.Client.create_anonymous_client()`` at once, which honours
    ``STORAGE_EMULATOR_HOST``.  Process-wide.  Imports Beam's auth module;
    False if this Beam has no such cache (then nothing is changed).
    """
    try:
        auth = importlib.import_module(_BEAM_AUTH)
    except ImportError:  # Beam without the gcp extra: nothing to short-circuit
        return False
    return _patch_beam_auth(auth)


class _BeamAuthImportHook:
    """Patch Beam's credential cache right after its module is first imported.

    Lets :func:`configure_for_emulator` run before Beam's GCS modules are
    imported without importing them.
    """

    def find_spec(self, name, path=None, target=None):
        if name != _BEAM_AUTH:
            return None
        sys.meta_path[:] = [f for f in sys.meta_path if f is not self]  # one shot
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _PatchingLoader(spec.loader)
        return spec


class _PatchingLoader:
    def __init__(self, inner):
        self._inner = inner

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        self._inner.exec_module(module)
        _patch_beam_auth(module)


_HOOK = _BeamAuthImportHook()


def configure_for_emulator() -> bool:
    """Prepare this process, Beam included, for a GCS emulator; a no-op without
    ``STORAGE_EMULATOR_HOST``.

    :func:`pipeline.gcs.configure_for_emulator` (``NO_GCE_CHECK``), then
    Beam's credential lookup short-circuited (:func:`short_circuit_beam_credentials`)
    -- at once if Beam's auth module is loaded, else right after it gets
    imported.  Idempotent and cheap.  Returns True when an emulator is
    configured.
    """
    global _BEAM_DONE
    if not gcs.configure_for_emulator():
        return False
    if not _BEAM_DONE:
        with _LOCK:
            if not _BEAM_DONE:
                auth = sys.modules.get(_BEAM_AUTH)
                if auth is not None:
                    _patch_beam_auth(auth)
                elif _HOOK not in sys.meta_path:
                    sys.meta_path.insert(0, _HOOK)
                _BEAM_DONE = True
    return True


_GCSIO: dict = {}


def beam_gcsio():
    """Beam's ``GcsIO`` for this process (one per emulator endpoint), created on first use.

    Beam's ``FileSystems.open/create`` build a new ``GcsIO`` -- a new storage
    client and HTTP session -- on every call (~45 ms each against an
    emulator); :func:`open_bulk` / :func:`write_bulk` reuse this one.  Built
    with the pipeline options Beam's ``FileSystems`` was given (on workers:
    the job's options), so credentials, impersonation and bucket metrics
    behave as in Beam's own IO.
    """
    configure_for_emulator()
    ident = (os.getpid(), gcs.emulator_host())
    io_ = _GCSIO.get(ident)
    if io_ is None:
        # deferred: Beam's GCS IO (google-cloud clients, seconds to import) only for bulk gs:// files
        from apache_beam.io.filesystems import FileSystems
        from apache_beam.io.gcp import gcsio

        with _LOCK:
            io_ = _GCSIO.get(ident)
            if io_ is None:
                io_ = _GCSIO[ident] = gcsio.GcsIO(
                    pipeline_options=getattr(FileSystems, "_pipeline_options", None))
    return io_


def write_bulk(path: str, data: bytes, mode: int = 0o600) -> None:
    """Write a bulk file (Parquet, spill data) in one piece.

    Local: :func:`pipeline.fs.write_atomic`.  ``gs://``: Beam's GCS IO
    (``GcsIO.open(path, "wb")`` -- what ``FileSystems.create`` uses -- then
    close: one upload, finalised atomically on close; overwrites an existing
    object).  Idempotent for deterministic bytes.
    """
    if not fs.is_gcs(path):
        fs.write_atomic(path, data, mode)
        return
    f = beam_gcsio().open(path, "wb", mime_type="application/octet-stream")
    f.write(bytes(data))
    f.close()  # never reached after a failed write: an unclosed upload is never finalised


def open_bulk(path: str):
    """A seekable binary file object for reading a bulk file (Parquet).

    Local: ``open(path, "rb")``.  ``gs://``: Beam's GCS IO (``GcsIO.open(path,
    "rb")`` -- what ``FileSystems.open`` uses, with one cached client): ranged
    reads, so pyarrow reads footers and row groups without downloading the
    whole object.  A missing file raises FileNotFoundError.
    """
    if not fs.is_gcs(path):
        return open(path, "rb")
    # deferred: google-api-core (with Beam's gcp extra) is needed for gs:// paths only
    from google.api_core.exceptions import NotFound

    try:
        return beam_gcsio().open(path, "rb")
    except NotFound as e:
        raise FileNotFoundError(f"no such object: {path}") from e
