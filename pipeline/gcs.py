"""``gs://`` locations through google-cloud-storage, with atomic commits.

:mod:`pipeline.fs` uses this module for every ``gs://`` path; the
object-store data mover (:mod:`pipeline.stores.objects`) uses its
object-level calls.  Never imports Beam: Beam's GCS IO (bulk files) and its
credential short-circuit for emulators live in :mod:`transforms.bulkio`.
The client library itself is imported on first use, so a process that never
touches ``gs://`` never loads it.

Commits (CONTRACTS "Atomic commit")
-----------------------------------
There is no atomic rename on GCS, but a single-object upload is atomic:
readers see the old object or the new one, never a part.

* :func:`create_if_absent` uploads with ``if_generation_match=0``.  A 412
  (PreconditionFailed) means the object exists: the same bytes count as
  already committed (False), different bytes raise
  :class:`pipeline.fs.CommitConflict`.
* :func:`replace` uploads with ``if_generation_match=<generation read>`` (0
  when absent).  A 412 means someone else replaced the object since it was
  read: :class:`~pipeline.fs.CommitConflict` ("stale replace") -- unless the
  object now holds exactly the bytes being written (our own earlier attempt
  whose response was lost and which the client retried), which counts as
  committed.

Retries
-------
Every call goes through the client library's retry with exponential backoff,
narrowed to transient failures (429, 408, 5xx, connection reset/timeout:
``google.cloud.storage.retry``), bounded by ``SHARDMOVE_GCS_RETRY_TIMEOUT``
seconds (default 120).  Uploads are retried only because they carry a
generation precondition (conditionally idempotent).  When the retries are
exhausted, :class:`StorageUnavailable` is raised: both a
:class:`~pipeline.errors.TransientError` (the executor retries the batch) and
an :class:`OSError`.  A missing object raises :class:`FileNotFoundError`.
Other API errors (403, 400, ...) propagate unchanged, chained.

Client and emulators
--------------------
One ``storage.Client`` per process (and per emulator endpoint), created on
first use and never pickled: picklable users (DoFns, stores) keep paths only
and call these functions.  ``STORAGE_EMULATOR_HOST=http://127.0.0.1:PORT``
(scheme required) points the client at a local emulator; the client then
uses anonymous credentials and ``NO_GCE_CHECK=true`` is set when absent
(google-auth never probes the metadata server).  Without the variable the
client uses Application Default Credentials.  ``GOOGLE_CLOUD_PROJECT`` names
the project (optional: object access does not need one).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime as _dt
import os
import threading
from typing import Mapping

from pipeline.errors import CommitConflict, PermanentError, TransientError
from pipeline.retry import RetrySchedule

__all__ = [
    "EMULATOR_ENV",
    "StorageUnavailable",
    "ObjectStat",
    "parse",
    "client",
    "emulator_host",
    "configure_for_emulator",
    "is_transient",
    "exists",
    "listdir",
    "walk_files",
    "list_objects",
    "size",
    "stat",
    "read_bytes",
    "read_range",
    "read_object",
    "read_with_generation",
    "upload",
    "create_if_absent",
    "replace",
    "copy_object",
    "delete",
    "remove",
    "rmtree",
]

EMULATOR_ENV = "STORAGE_EMULATOR_HOST"
_TIMEOUT = (10, 120)  # (connect, read) seconds per HTTP request
_POOL = 64            # HTTP connections kept per client (concurrent movers)


class StorageUnavailable(TransientError, OSError):
    """A GCS call still failed transiently after the client's retries."""

    reason = "storage_unavailable"


@dataclasses.dataclass(frozen=True)
class ObjectStat:
    """What one metadata read of an object tells."""

    generation: int
    size: int
    metadata: Mapping[str, str]
    updated_ns: int   # last write time (server clock), nanoseconds since the epoch


# ------------------------------------------------------------------ paths

def parse(path: str) -> tuple[str, str]:
    """``gs://bucket/name`` -> ``(bucket, name)``; name may be ``""`` (bucket root)."""
    path = str(path)
    if not path.startswith("gs://"):
        raise ValueError(f"not a gs:// location: {path!r}")
    rest = path[5:]
    bucket, _, name = rest.partition("/")
    if not bucket:
        raise ValueError(f"gs:// location without a bucket: {path!r}")
    return bucket, name


def _dir_prefix(name: str) -> str:
    name = name.strip("/")
    return name + "/" if name else ""


# ---------------------------------------------------------------- client

_CLIENTS: dict = {}
_CLIENTS_LOCK = threading.Lock()


def emulator_host() -> str | None:
    """``STORAGE_EMULATOR_HOST`` if set (and not empty)."""
    return os.environ.get(EMULATOR_ENV) or None


def configure_for_emulator() -> bool:
    """Prepare this process for a GCS emulator; a no-op without ``STORAGE_EMULATOR_HOST``.

    Sets ``NO_GCE_CHECK=true`` when absent (google-auth must never probe the
    metadata server).  Idempotent and cheap; called on first client use.
    Beam's side (its own credential lookup) is
    :func:`transforms.bulkio.configure_for_emulator`.  Returns True when an
    emulator is configured.
    """
    if not emulator_host():
        return False
    os.environ.setdefault("NO_GCE_CHECK", "true")
    return True


def _make_client():
    # deferred, as every google.* import here: google-cloud-storage loads in about half a
    # second, and only processes that touch gs:// need it
    from google.cloud import storage

    project = os.environ.get("GOOGLE_CLOUD_PROJECT") or None
    if emulator_host():
        from google.auth.credentials import AnonymousCredentials  # deferred: gs:// only (see above)

        c = storage.Client(project=project or "shardmove-emulator", credentials=AnonymousCredentials())
    else:
        c = storage.Client(project=project)
    try:  # room for concurrent movers: one connection per in-flight request
        import requests.adapters  # deferred: google-cloud-storage's HTTP layer, gs:// only

        adapter = requests.adapters.HTTPAdapter(pool_connections=8, pool_maxsize=_POOL, max_retries=0)
        c._http.mount("https://", adapter)
        c._http.mount("http://", adapter)
    except Exception:  # noqa: BLE001 -- an optimisation only
        pass
    return c


def client():
    """The process's storage client (created on first use; one per emulator endpoint)."""
    configure_for_emulator()
    ident = (os.getpid(), emulator_host())
    c = _CLIENTS.get(ident)
    if c is None:
        with _CLIENTS_LOCK:
            c = _CLIENTS.get(ident)
            if c is None:
                try:
                    c = _make_client()
                except Exception as e:
                    if type(e).__name__ == "DefaultCredentialsError":  # google.auth's: a configuration error

                        raise PermanentError("GCS: no credentials found (Application Default Credentials; set "
                                             "GOOGLE_APPLICATION_CREDENTIALS, or STORAGE_EMULATOR_HOST for an "
                                             "emulator)", reason="cannot_connect") from None
                    raise
                _CLIENTS[ident] = c
    return c


def _retry():
    from google.cloud.storage.retry import DEFAULT_RETRY  # deferred: gs:// only (see _make_client)

    try:
        timeout = float(os.environ.get("SHARDMOVE_GCS_RETRY_TIMEOUT", "120"))
    except ValueError:
        timeout = 120.0
    return DEFAULT_RETRY.with_timeout(timeout)


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is a transient storage failure (429, 408, 5xx, connection)."""
    if isinstance(exc, StorageUnavailable):
        return True
    try:
        from google.api_core.exceptions import RetryError  # deferred: gs:// only (see _make_client)

        if isinstance(exc, RetryError):  # the client's retries on transient errors ran out
            return True
    except ImportError:  # pragma: no cover
        pass
    try:
        from google.cloud.storage.retry import _should_retry  # deferred: gs:// only
    except ImportError:  # pragma: no cover
        return False
    try:
        return bool(_should_retry(exc))
    except Exception:  # noqa: BLE001
        return False


def _not_found():
    from google.api_core import exceptions  # deferred: gs:// only (see _make_client)

    return exceptions.NotFound


def _precondition():
    from google.api_core import exceptions  # deferred: gs:// only (see _make_client)

    return exceptions.PreconditionFailed


class _Calls:
    """Translate library errors: missing -> FileNotFoundError, transient -> StorageUnavailable."""

    def __init__(self, what: str, path: str):
        self.what, self.path = what, path

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is None or isinstance(exc, (FileNotFoundError, StorageUnavailable)):
            return False
        if isinstance(exc, _not_found()):
            raise FileNotFoundError(f"{self.what}: no such object: {self.path}") from exc
        if type(exc).__name__ in ("Forbidden", "Unauthorized"):  # google.api_core's 403 / 401

            raise PermanentError(f"{self.what}: access to {self.path} denied ({type(exc).__name__})",
                                 reason="permission") from None
        if is_transient(exc):
            raise StorageUnavailable(f"{self.what}: storage unavailable for {self.path} "
                                     f"({type(exc).__name__})") from exc
        return False


def _blob(path: str, generation: int | None = None):
    bucket, name = parse(path)
    if not name:
        raise ValueError(f"gs:// location names no object: {path!r}")
    return client().bucket(bucket).blob(name, generation=generation)


def _to_ns(t: _dt.datetime | None) -> int:
    if t is None:
        return 0
    if t.tzinfo is None:
        t = t.replace(tzinfo=_dt.timezone.utc)
    delta = t - _dt.datetime(1970, 1, 1, tzinfo=_dt.timezone.utc)
    return (delta.days * 86400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1000


def _stat_of(blob) -> ObjectStat:
    return ObjectStat(int(blob.generation or 0), int(blob.size or 0), dict(blob.metadata or {}),
                      _to_ns(blob.updated))


# ----------------------------------------------------------------- reads

def stat(path: str) -> ObjectStat | None:
    """Generation, size, custom metadata and write time of an object; None if absent."""
    bucket, name = parse(path)
    with _Calls("stat", path):
        blob = client().bucket(bucket).get_blob(name, retry=_retry(), timeout=_TIMEOUT)
    return None if blob is None else _stat_of(blob)


def exists(path: str) -> bool:
    """An object at ``path``, or any object below ``path/`` (a "directory")."""
    bucket, name = parse(path)
    if name and not name.endswith("/") and stat(path) is not None:
        return True
    try:
        with _Calls("exists", path):
            it = client().list_blobs(bucket, prefix=_dir_prefix(name), max_results=1, retry=_retry(),
                                     timeout=_TIMEOUT)
            return any(True for _ in it)
    except FileNotFoundError:  # no such bucket
        return False


def listdir(path: str) -> list[str]:
    """Names directly below ``path`` (objects and sub-"directories", no slash), sorted.

    Like a missing local directory, a missing prefix or bucket lists as empty.
    """
    bucket, name = parse(path)
    prefix = _dir_prefix(name)
    out = set()
    try:
        with _Calls("listdir", path):
            it = client().list_blobs(bucket, prefix=prefix, delimiter="/", retry=_retry(), timeout=_TIMEOUT)
            for blob in it:
                rest = blob.name[len(prefix):]
                if rest:
                    out.add(rest)
            for p in it.prefixes:
                rest = p[len(prefix):].rstrip("/")
                if rest:
                    out.add(rest)
    except FileNotFoundError:  # no such bucket: as empty as a missing local directory
        return []
    return sorted(out)


def list_objects(path: str) -> list[tuple[str, int]]:
    """``(full location, size)`` of every object below ``path/``, sorted by location."""
    bucket, name = parse(path)
    prefix = _dir_prefix(name)
    out = []
    try:
        with _Calls("list", path):
            for blob in client().list_blobs(bucket, prefix=prefix, retry=_retry(), timeout=_TIMEOUT):
                if blob.name.endswith("/"):  # a "folder" placeholder, not a file
                    continue
                out.append((f"gs://{bucket}/{blob.name}", int(blob.size or 0)))
    except FileNotFoundError:  # no such bucket: as empty as a missing local directory
        return []
    out.sort()
    return out


def walk_files(path: str) -> list[str]:
    """Every object below ``path/``, as full ``gs://`` locations, sorted."""
    return [p for p, _ in list_objects(path)]


def size(path: str) -> int:
    st = stat(path)
    if st is None:
        raise FileNotFoundError(f"size: no such object: {path}")
    return st.size


def read_bytes(path: str) -> bytes:
    """The object's bytes; FileNotFoundError if absent."""
    blob = _blob(path)
    with _Calls("read", path):
        return blob.download_as_bytes(retry=_retry(), timeout=_TIMEOUT)


def read_range(path: str, offset: int, length: int) -> bytes:
    """``length`` bytes at ``offset`` (one ranged GET); short at the end of the object."""
    if length <= 0:
        return b""
    blob = _blob(path)
    with _Calls("read", path):
        return blob.download_as_bytes(start=int(offset), end=int(offset) + int(length) - 1,
                                      retry=_retry(), timeout=_TIMEOUT)


#: Base delay of read_object's re-reads of an object replaced while it was read.
_READ_RETRY_BASE_S = 0.02


def read_object(path: str, *, attempts: int = 5) -> tuple[bytes, ObjectStat] | None:
    """``(bytes, stat)`` of one consistent generation of the object; None if absent.

    Reads the metadata, then downloads with ``if_generation_match`` on that
    generation; if the object is replaced in between (412/404) it starts over
    (at most ``attempts`` times, waiting between them on the retry schedule of
    :mod:`pipeline.retry`, then :class:`StorageUnavailable`).
    """
    Pre = _precondition()
    schedule = RetrySchedule(_READ_RETRY_BASE_S, max(1, attempts) - 1)
    attempt = 0
    while True:
        st = stat(path)
        if st is None:
            return None
        blob = _blob(path)
        try:
            with _Calls("read", path):
                data = blob.download_as_bytes(if_generation_match=st.generation or None,
                                              retry=_retry(), timeout=_TIMEOUT)
        except (FileNotFoundError, Pre):  # replaced or deleted since the stat: look again
            if schedule.exhausted(attempt):
                raise StorageUnavailable(f"read: {path} keeps changing while being read") from None
            schedule.wait(attempt)
            attempt += 1
            continue
        return data, st


def read_with_generation(path: str) -> tuple[bytes | None, int]:
    """``(bytes, generation)``, or ``(None, 0)`` when absent -- the input of a CAS :func:`replace`."""
    got = read_object(path)
    if got is None:
        return None, 0
    return got[0], got[1].generation


# ---------------------------------------------------------------- writes

def upload(path: str, data: bytes, *, if_generation_match: int | None = None,
           metadata: Mapping[str, str] | None = None) -> int:
    """One atomic single-object upload; returns the new generation.

    ``if_generation_match=0`` creates only if absent; ``=G`` replaces only
    generation G.  A failed precondition raises
    ``google.api_core.exceptions.PreconditionFailed`` (HTTP 412).  Retried on
    transient errors only when a precondition is given (otherwise a retry
    could overwrite a newer write): then at most once.
    """
    blob = _blob(path)
    if metadata:
        blob.metadata = dict(metadata)
    retry = _retry() if if_generation_match is not None else None
    with _Calls("write", path):
        blob.upload_from_string(bytes(data), content_type="application/octet-stream",
                                if_generation_match=if_generation_match, retry=retry,
                                timeout=_TIMEOUT)
    return int(blob.generation or 0)


def create_if_absent(path: str, data: bytes) -> bool:
    """Create the object only if absent (generation precondition 0).

    True: this call created it.  False: it already held the same bytes
    (already committed -- e.g. a retried bundle, or a retried upload whose
    first response was lost).  Raises :class:`pipeline.fs.CommitConflict`
    when it holds different bytes.
    """

    Pre = _precondition()
    for _ in range(3):
        try:
            upload(path, data, if_generation_match=0)
            return True
        except Pre:
            pass
        try:
            existing = read_bytes(path)
        except FileNotFoundError:
            continue  # deleted in between: try the create again
        if existing == bytes(data):
            return False
        raise CommitConflict(f"{path.rsplit('/', 1)[-1]} already exists with different content")
    raise StorageUnavailable(f"create: {path} keeps appearing and vanishing")


def replace(path: str, data: bytes, *, generation: int | None = None) -> int:
    """Replace the object only if it still has the generation read; returns the new generation.

    ``generation``: the generation the caller read (0 = expected absent);
    when None the current generation is read first (the object then only
    must not change between that read and the upload).  Raises
    :class:`pipeline.fs.CommitConflict` ("stale replace") when it changed.
    """

    if generation is None:
        st = stat(path)
        generation = st.generation if st is not None else 0
    try:
        return upload(path, data, if_generation_match=int(generation))
    except _precondition() as e:
        try:
            cur = read_object(path)
        except StorageUnavailable:
            cur = None
        if cur is not None and cur[0] == bytes(data):
            return cur[1].generation  # our own lost-response attempt landed: committed
        raise CommitConflict(f"stale replace: {path.rsplit('/', 1)[-1]} changed since generation "
                             f"{generation} was read") from e


def copy_object(src: str, dst: str) -> int:
    """Server-side copy (rewrite) of one object; overwrites ``dst``; returns its generation.

    The destination appears atomically when the rewrite completes.
    FileNotFoundError if ``src`` is absent.
    """
    sbucket, sname = parse(src)
    c = client()
    source = c.bucket(sbucket).blob(sname)
    target = _blob(dst)
    token = None
    with _Calls("copy", src):
        while True:
            token, _done, _total = target.rewrite(source, token=token, retry=_retry(), timeout=_TIMEOUT)
            if token is None:
                break
    return int(target.generation or 0)


def delete(path: str, *, if_generation_match: int | None = None) -> bool:
    """Delete one object; True if this call deleted it.

    Absent -> False; with ``if_generation_match`` a different generation is
    left alone -> False.  (Some emulators ignore the precondition.)
    """
    blob = _blob(path)
    Pre, NotFound = _precondition(), _not_found()
    try:
        with _Calls("delete", path):
            blob.delete(if_generation_match=if_generation_match, retry=_retry(), timeout=_TIMEOUT)
    except FileNotFoundError:
        return False
    except (NotFound, Pre):
        return False
    return True


def remove(path: str) -> None:
    """Delete the object if present (idempotent)."""
    delete(path)


def rmtree(path: str, *, workers: int = 16) -> None:
    """Delete every object below ``path/`` (idempotent; concurrent deletes)."""
    paths = walk_files(path)
    if not paths:
        return
    if len(paths) == 1:
        delete(paths[0])
        return
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(workers, len(paths)),
                                               thread_name_prefix="gcs-rmtree") as pool:
        for _ in pool.map(delete, paths):
            pass

