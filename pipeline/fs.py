"""Locations: local paths and ``gs://bucket/prefix``, with atomic commits.

CONTRACTS "Atomic commit":

* local: write a temporary file in the same directory, fsync, then rename
  (replace) or hard-link (create-if-absent) it into place;
* ``gs://``: create-if-absent with generation precondition 0; replace only
  with the generation read.  A commit that finds its object already present
  with the same content counts as committed.

Files that hold key values are created owner-only (0600, directories 0700).
Never imports Beam at module level; the GCS client (:mod:`pipeline.gcs`) is
imported lazily, and Beam's filesystem layer only by :func:`open_bulk` /
:func:`write_bulk` for ``gs://`` paths.

Versions (compare-and-swap)
---------------------------
:func:`read_versioned` returns the bytes with an opaque integer version (0 =
absent) and ``write_atomic(..., if_version=v)`` replaces only if the version
is still ``v``, else :class:`CommitConflict`.  ``gs://``: the version is the
object generation and the check is the server's generation precondition
(atomic).  Local: the version is derived from (inode, mtime, ctime, size)
and checked just before the rename -- not atomic against another process, so
local callers also hold a lock (``lease.py`` holds an ``flock``).

Bulk files
----------
:func:`write_bulk` / :func:`open_bulk` move large, deterministic Parquet
files (snapshot parts, move files, spill data).  Local: :func:`write_atomic`
/ ``open``.  ``gs://``: Beam's GCS IO, the layer under ``FileSystems``, with
one cached client per process (upload finalised on close -- atomic, but an
overwrite, not create-if-absent; ranged reads on open, so a footer read does
not download the file).  Use them only for files whose rewrite with the same
bytes is harmless.  :func:`read_range` reads a byte range (one ranged GET).
"""
from __future__ import annotations

import io
import os
import shutil
import tempfile
import uuid
from typing import Iterator

from pipeline.errors import CommitConflict

__all__ = [
    "CommitConflict",
    "is_gcs",
    "join",
    "exists",
    "isfile",
    "makedirs",
    "listdir",
    "walk_files",
    "read_bytes",
    "open_input",
    "write_atomic",
    "create_if_absent",
    "read_versioned",
    "write_bulk",
    "open_bulk",
    "read_range",
    "remove",
    "rmtree",
    "rename_dir",
    "copy_tree",
    "size",
]


def is_gcs(path: str) -> bool:
    return str(path).startswith("gs://")


def join(base: str, *parts: str) -> str:
    base = str(base)
    if is_gcs(base):
        out = base.rstrip("/")
        for p in parts:
            out = out + "/" + str(p).strip("/")
        return out
    return os.path.join(base, *[str(p) for p in parts])


# ------------------------------------------------------------------ GCS side

def _gcs():
    from pipeline import gcs  # lazy: only gs:// users pay for the client

    return gcs


def exists(path: str) -> bool:
    if is_gcs(path):
        return _gcs().exists(path)
    return os.path.exists(path)


def isfile(path: str) -> bool:
    """A file (an object, on ``gs://``) at exactly ``path``: one metadata read, no listing.

    Prefer it to :func:`exists` for marker files polled often (``stop``,
    ``lease.json``, ``manifest.json``): on ``gs://`` :func:`exists` must also
    list the prefix when the object is absent.
    """
    if is_gcs(path):
        return _gcs().stat(path) is not None
    return os.path.isfile(path)


def makedirs(path: str, mode: int = 0o700) -> None:
    if is_gcs(path):
        return  # prefixes need no creation
    os.makedirs(path, mode=mode, exist_ok=True)


class NewDirs:
    """Remembers which of some local directories did not exist yet, so that a
    refused command can remove the ones it created (only while still empty:
    never anything another process put there).  ``gs://`` prefixes need no
    creation and are ignored."""

    def __init__(self) -> None:
        self._absent: list[str] = []

    def watch(self, *paths: str) -> None:
        for p in paths:
            if p and not is_gcs(p) and not os.path.exists(p) and p not in self._absent:
                self._absent.append(p)

    def remove_created(self) -> None:
        for p in sorted(self._absent, key=len, reverse=True):  # deepest first
            try:
                os.rmdir(p)
            except OSError:  # absent, not empty, or not ours to remove
                pass


def listdir(path: str) -> list[str]:
    """Names directly below ``path`` (files and sub-directories), sorted."""
    if is_gcs(path):
        return _gcs().listdir(path)
    try:
        return sorted(os.listdir(path))
    except FileNotFoundError:
        return []


def walk_files(path: str) -> list[str]:
    """Every file below ``path``, as full locations, sorted."""
    if is_gcs(path):
        return _gcs().walk_files(path)
    out = []
    for root, _dirs, files in os.walk(path):
        for f in files:
            out.append(os.path.join(root, f))
    return sorted(out)


def size(path: str) -> int:
    if is_gcs(path):
        return _gcs().size(path)
    return os.path.getsize(path)


def read_bytes(path: str) -> bytes:
    if is_gcs(path):
        return _gcs().read_bytes(path)
    with open(path, "rb") as f:
        return f.read()


def open_input(path: str):
    """A seekable binary file object (pyarrow reads Parquet from it)."""
    if is_gcs(path):
        return io.BytesIO(_gcs().read_bytes(path))
    return open(path, "rb")


def _tmp_write(directory: str, data: bytes, mode: int) -> str:
    os.makedirs(directory, mode=0o700, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return tmp


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


def _local_version(path: str) -> int:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return 0
    token = f"{st.st_ino}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_size}".encode()
    import hashlib

    return int.from_bytes(hashlib.blake2b(token, digest_size=7).digest(), "big") | 1


def read_versioned(path: str) -> tuple[bytes | None, int]:
    """``(bytes, version)``, or ``(None, 0)`` if absent; the version feeds ``write_atomic(if_version=)``."""
    if is_gcs(path):
        return _gcs().read_with_generation(path)
    while True:
        before = _local_version(path)
        if not before:
            return None, 0
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            continue
        if _local_version(path) == before:  # not replaced while being read
            return data, before


def write_atomic(path: str, data: bytes, mode: int = 0o600, *, if_version: int | None = None) -> None:
    """Replace ``path`` with ``data`` atomically (readers see old or new, never half).

    ``if_version`` (from :func:`read_versioned`; 0 = must be absent): replace
    only if the file is still that version, else :class:`CommitConflict`
    ("stale replace").  On ``gs://`` every replace is generation-matched:
    without ``if_version`` against the generation read just before.
    """
    if is_gcs(path):
        _gcs().replace(path, data, generation=if_version)
        return
    directory = os.path.dirname(path) or "."
    tmp = _tmp_write(directory, data, mode)
    if if_version is not None and _local_version(path) != if_version:
        os.unlink(tmp)
        raise CommitConflict(f"stale replace: {os.path.basename(path)} changed since it was read")
    os.replace(tmp, path)
    _fsync_dir(directory)


def write_bulk(path: str, data: bytes, mode: int = 0o600) -> None:
    """Write a bulk file (Parquet, spill data) in one piece.

    Local: :func:`write_atomic`.  ``gs://``: Beam's GCS IO (``GcsIO.open(path,
    "wb")`` -- what ``FileSystems.create`` uses -- then close: one upload,
    finalised atomically on close; overwrites an existing object).
    Idempotent for deterministic bytes.
    """
    if not is_gcs(path):
        write_atomic(path, data, mode)
        return
    f = _gcs().beam_gcsio().open(path, "wb", mime_type="application/octet-stream")
    f.write(bytes(data))
    f.close()  # never reached after a failed write: an unclosed upload is never finalised


def open_bulk(path: str):
    """A seekable binary file object for reading a bulk file (Parquet).

    Local: ``open(path, "rb")``.  ``gs://``: Beam's GCS IO (``GcsIO.open(path,
    "rb")`` -- what ``FileSystems.open`` uses, with one cached client): ranged
    reads, so pyarrow reads footers and row groups without downloading the
    whole object.  A missing file raises FileNotFoundError.
    """
    if not is_gcs(path):
        return open(path, "rb")
    from google.api_core.exceptions import NotFound

    try:
        return _gcs().beam_gcsio().open(path, "rb")
    except NotFound as e:
        raise FileNotFoundError(f"no such object: {path}") from e


def read_range(path: str, offset: int, length: int) -> bytes:
    """``length`` bytes at ``offset`` (``gs://``: one ranged GET); short at end of file."""
    if is_gcs(path):
        return _gcs().read_range(path, offset, length)
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def create_if_absent(path: str, data: bytes, mode: int = 0o600) -> bool:
    """Create ``path`` only if it does not exist.

    Returns True when this call created it, False when it already held the
    same bytes (already committed).  Raises CommitConflict when it holds
    different bytes.
    """
    if is_gcs(path):
        return _gcs().create_if_absent(path, data)
    directory = os.path.dirname(path) or "."
    tmp = _tmp_write(directory, data, mode)
    try:
        os.link(tmp, path)  # atomic: fails if the name exists
        created = True
    except FileExistsError:
        created = False
    finally:
        os.unlink(tmp)
    if created:
        _fsync_dir(directory)
        return True
    with open(path, "rb") as f:
        existing = f.read()
    if existing == data:
        return False
    raise CommitConflict(f"{os.path.basename(path)} already exists with different content")


def remove(path: str) -> None:
    if is_gcs(path):
        _gcs().remove(path)
        return
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def rmtree(path: str) -> None:
    if is_gcs(path):
        _gcs().rmtree(path)
        return
    shutil.rmtree(path, ignore_errors=True)


def rename_dir(src: str, dst: str) -> bool:
    """Move a finished directory into place; False if ``dst`` already exists."""
    if is_gcs(src) or is_gcs(dst):
        if any(exists(join(dst, m)) for m in COMMIT_MARKERS):
            return False
        copy_tree(src, dst)
        rmtree(src)
        return True
    try:
        os.rename(src, dst)
    except OSError:
        if os.path.exists(dst):
            return False
        raise
    _fsync_dir(os.path.dirname(dst) or ".")
    return True


#: Files whose presence means "this directory is complete": copied last.
COMMIT_MARKERS = ("manifest.json", "snapshot.json")


def _copy_order(rel: str) -> tuple:
    top = "/" not in rel
    return (top, top and rel in COMMIT_MARKERS, rel)


def copy_tree(src: str, dst: str, *, workers: int = 16) -> None:
    """Copy every file below ``src`` to ``dst`` (gs:// -> gs:// copies server-side).

    Files in sub-directories first, then top-level files, and the commit
    markers (:data:`COMMIT_MARKERS`) only after every other file is in place,
    so a crash mid-copy never leaves a destination that looks complete.
    """
    root = src.rstrip("/")
    rels = sorted((f[len(root) + 1:] for f in walk_files(src)), key=_copy_order)
    markers = [r for r in rels if r in COMMIT_MARKERS]
    rest = [r for r in rels if r not in COMMIT_MARKERS]

    def one(rel: str) -> None:
        source, target = join(src, rel), join(dst, rel)
        if is_gcs(source) and is_gcs(target):
            _gcs().copy_object(source, target)
            return
        if not is_gcs(target):
            os.makedirs(os.path.dirname(target), mode=0o700, exist_ok=True)
        write_atomic(target, read_bytes(source))

    if len(rest) > 1 and workers > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=min(workers, len(rest)), thread_name_prefix="copy-tree") as pool:
            for _ in pool.map(one, rest):
                pass
    else:
        for rel in rest:
            one(rel)
    for rel in markers:
        one(rel)


def unique_name(prefix: str, suffix: str = "") -> str:
    return f"{prefix}{uuid.uuid4().hex}{suffix}"


def iter_lines(path: str) -> Iterator[str]:
    yield from read_bytes(path).decode("utf-8").splitlines()
