"""Locations: local paths and ``gs://bucket/prefix``, with atomic commits.

CONTRACTS "Atomic commit":

* local: write a temporary file in the same directory, fsync, then rename
  (replace) or hard-link (create-if-absent) it into place;
* ``gs://``: create-if-absent with generation precondition 0; replace only
  with the generation read.  A commit that finds its object already present
  with the same content counts as committed.

Files that hold key values are created owner-only (0600, directories 0700).
Never imports Beam; the GCS client is imported lazily.
"""
from __future__ import annotations

import io
import os
import shutil
import tempfile
import uuid
from typing import Iterator

__all__ = [
    "CommitConflict",
    "is_gcs",
    "join",
    "exists",
    "makedirs",
    "listdir",
    "walk_files",
    "read_bytes",
    "open_input",
    "write_atomic",
    "create_if_absent",
    "remove",
    "rmtree",
    "rename_dir",
    "copy_tree",
    "size",
]


class CommitConflict(RuntimeError):
    """create-if-absent found an object with different content (or a stale replace)."""


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


def makedirs(path: str, mode: int = 0o700) -> None:
    if is_gcs(path):
        return  # prefixes need no creation
    os.makedirs(path, mode=mode, exist_ok=True)


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


def write_atomic(path: str, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` atomically (readers see old or new, never half)."""
    if is_gcs(path):
        _gcs().replace(path, data)
        return
    directory = os.path.dirname(path) or "."
    tmp = _tmp_write(directory, data, mode)
    os.replace(tmp, path)
    _fsync_dir(directory)


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
        if exists(join(dst, "manifest.json")):
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


def copy_tree(src: str, dst: str) -> None:
    for f in walk_files(src):
        rel = f[len(src.rstrip("/")) + 1:]
        target = join(dst, rel)
        if not is_gcs(target):
            os.makedirs(os.path.dirname(target), mode=0o700, exist_ok=True)
        write_atomic(target, read_bytes(f))


def unique_name(prefix: str, suffix: str = "") -> str:
    return f"{prefix}{uuid.uuid4().hex}{suffix}"


def iter_lines(path: str) -> Iterator[str]:
    yield from read_bytes(path).decode("utf-8").splitlines()
