"""Object-store data mover, one object at a time: shard locations, error mapping, GCS and local I/O.

Never imports Beam.  A shard is a ``gs://bucket[/prefix]`` or an absolute
local directory (:func:`_normalise_location`); an object is read, stat'ed
(:class:`_Head`: version, write time, size) and written atomically with a
precondition on its version by ``_gcs_*`` (:mod:`pipeline.gcs`) or
``_local_*`` (temp file + fsync + link/rename + directory fsync, files 0600, new
directories 0700).  :func:`_store_error` turns a failure into a
:class:`~pipeline.errors.StoreError` that names the operation, never a key.
The store over many keys, and what versions and write times mean, is
:mod:`pipeline.stores.objects`.
"""
from __future__ import annotations

import dataclasses
import errno
import os
import re
import tempfile
from typing import Any, Mapping

from pipeline import gcs
from pipeline.errors import BadInput, ConfigurationError, PermanentError, StoreError, TransientError
from pipeline.stores.objects_names import (
    GCS_MAX_NAME_BYTES,
    LOCAL_MAX_NAME_BYTES,
    LOCAL_MAX_PATH_BYTES,
    NAMESPACE,
    WRITTEN_NS_METADATA,
)

_BUCKET = re.compile(r"\A[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]\Z")


# ------------------------------------------------------------------ shards


@dataclasses.dataclass(frozen=True)
class _Shard:
    id: str
    location: str  # normalised: gs://bucket[/prefix] or an absolute local directory

    @property
    def is_gcs(self) -> bool:
        return self.location.startswith("gs://")

    def path(self, name: str) -> str:
        return self.location + "/" + name if self.is_gcs else os.path.join(self.location, name)

    @property
    def root(self) -> str:
        return self.path(NAMESPACE)

    def name_budget(self) -> int:
        """Longest object name (bytes) this shard allows."""
        if self.is_gcs:
            inner = self.location[5:].partition("/")[2]
            used = len(inner.encode("utf-8")) + 1 if inner else 0
            return GCS_MAX_NAME_BYTES - used
        return min(LOCAL_MAX_NAME_BYTES, LOCAL_MAX_PATH_BYTES - len(os.fsencode(self.location)) - 1)


def _normalise_location(shard: str, loc: Any) -> str:
    what = f"config data_store.shards.{shard}"
    if not isinstance(loc, str) or not loc:
        raise BadInput(f"{what}: expected a gs:// prefix or an absolute directory, got {loc!r}")
    if "\x00" in loc or "\n" in loc:
        raise BadInput(f"{what}: the location contains a NUL or newline")
    if loc.startswith("gs://"):
        bucket, _, prefix = loc[5:].partition("/")
        if not _BUCKET.match(bucket):
            raise BadInput(f"{what}: {bucket!r} is not a valid bucket name")
        parts = [p for p in prefix.split("/") if p != ""] if prefix else []
        if prefix.strip("/") and "//" in prefix.strip("/"):
            raise BadInput(f"{what}: the prefix has an empty path component")
        if any(p in (".", "..") for p in parts):
            raise BadInput(f"{what}: the prefix has a . or .. component")
        return "gs://" + "/".join([bucket] + parts)
    if not os.path.isabs(loc):
        raise BadInput(f"{what}: a local shard location must be an absolute directory (or gs://), got {loc!r}")
    return os.path.normpath(loc)


def _contains(outer: str, inner: str) -> bool:
    return inner == outer or inner.startswith(outer.rstrip("/") + "/")


# ----------------------------------------------------------- error mapping

#: a permission refused or a read-only filesystem: the configuration's to fix, not the key's
_CONFIG_ERRNO = {errno.EACCES, errno.EPERM, errno.EROFS}
_TRANSIENT_ERRNO = {errno.EAGAIN, errno.EINTR, errno.EBUSY, errno.ETIMEDOUT, errno.ESTALE,
                    errno.ENFILE, errno.EMFILE, errno.ECONNRESET}


def _store_error(e: BaseException, what: str) -> StoreError:
    """Classify a failure; the message names the operation, never a key."""
    if isinstance(e, StoreError):
        return e
    if gcs.is_transient(e):
        return TransientError(f"{what}: storage unavailable ({type(e).__name__})", reason="unavailable")
    if isinstance(e, FileNotFoundError) and e.errno is None:  # pipeline.gcs: a 404 (no such bucket)
        return ConfigurationError(f"{what}: bucket not found", reason="shard_missing")
    if isinstance(e, OSError) and not _is_google(e):
        if e.errno in _TRANSIENT_ERRNO:
            return TransientError(f"{what}: {os.strerror(e.errno)}", reason="io_busy")
        cls = ConfigurationError if e.errno in _CONFIG_ERRNO else PermanentError
        return cls(f"{what}: {os.strerror(e.errno) if e.errno else type(e).__name__}", reason="io_error")
    code = getattr(e, "code", None)
    if code in (401, 403):
        return ConfigurationError(f"{what}: access denied ({code})", reason="forbidden")
    if code == 404:
        return ConfigurationError(f"{what}: bucket not found", reason="shard_missing")
    return PermanentError(f"{what}: {type(e).__name__}", reason="storage_error")


def _is_google(e: BaseException) -> bool:
    return type(e).__module__.startswith(("google.", "requests", "urllib3"))


# -------------------------------------------------------------- one object


@dataclasses.dataclass(frozen=True)
class _Head:
    version: int
    written_ns: int
    size: int


def _written_ns(meta: Mapping[str, str], updated_ns: int) -> int:
    v = (meta or {}).get(WRITTEN_NS_METADATA)
    if v is not None:
        try:
            return int(v)
        except ValueError:
            pass
    return updated_ns


def _gcs_head(path: str) -> _Head | None:
    st = gcs.stat(path)
    if st is None:
        return None
    return _Head(st.generation, _written_ns(st.metadata, st.updated_ns), st.size)


def _gcs_get(path: str) -> tuple[bytes, _Head] | None:
    got = gcs.read_object(path)
    if got is None:
        return None
    data, st = got
    return data, _Head(st.generation, _written_ns(st.metadata, st.updated_ns), st.size)


def _gcs_write(path: str, data: bytes, written_ns: int, expect: int) -> bool:
    """Upload if the object still has generation ``expect`` (0: absent); False on a 412."""
    from google.api_core.exceptions import PreconditionFailed

    try:
        gcs.upload(path, data, if_generation_match=expect, metadata={WRITTEN_NS_METADATA: str(written_ns)})
        return True
    except PreconditionFailed:
        return False


_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def _local_head(path: str) -> _Head | None:
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return None
    return _Head(st.st_mtime_ns, st.st_mtime_ns, st.st_size)


def _local_get(path: str) -> tuple[bytes, _Head] | None:
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(fd)  # the version of exactly the file read (writers rename new files in)
        chunks = []
        while True:
            b = os.read(fd, 1 << 20)
            if not b:
                break
            chunks.append(b)
    finally:
        os.close(fd)
    return b"".join(chunks), _Head(st.st_mtime_ns, st.st_mtime_ns, st.st_size)


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _local_write(path: str, data: bytes, written_ns: int, expect: int) -> bool:
    """Write via temp + fsync; create-if-absent (``expect`` 0) or replace version ``expect``."""
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        try:
            os.fchmod(fd, 0o600)
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.utime(fd, ns=(written_ns, written_ns))
            os.fsync(fd)
        finally:
            os.close(fd)
        if expect == 0:
            try:
                os.link(tmp, path)  # atomic create-if-absent
            except FileExistsError:
                return False
        else:
            cur = _local_head(path)
            if cur is None or cur.version != expect:
                return False
            os.replace(tmp, path)
            tmp = None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
    _fsync_dir(directory)
    return True
