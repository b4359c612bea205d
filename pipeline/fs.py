"""Locations: local paths and ``gs://bucket/prefix``, with atomic commits.

CONTRACTS "Atomic commit":

* local: write a temporary file in the same directory, fsync, then rename
  (replace) or hard-link (create-if-absent) it into place;
* ``gs://``: create-if-absent with generation precondition 0; replace only
  with the generation read.  A commit that finds its object already present
  with the same content counts as committed.

Files that hold key values are created owner-only (0600, directories 0700).
Never imports Beam; ``gs://`` paths go through :mod:`pipeline.gcs`, which
loads the GCS client library on first use.  Bulk Parquet files through Beam's
GCS IO are :mod:`transforms.bulkio`'s.

Versions (compare-and-swap)
---------------------------
:func:`read_versioned` returns the bytes with an opaque integer version (0 =
absent) and ``write_atomic(..., if_version=v)`` replaces only if the version
is still ``v``, else :class:`CommitConflict`.  ``gs://``: the version is the
object generation and the check is the server's generation precondition
(atomic).  Local: the version is derived from (inode, mtime, ctime, size)
and checked just before the rename -- not atomic against another process, so
local callers also hold a lock (``lease.py`` holds an ``flock``).

:func:`read_range` reads a byte range (``gs://``: one ranged GET).
"""
from __future__ import annotations

import hashlib
import io
import os
import shutil
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Sequence

from pipeline import gcs
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
    "sync_dir",
    "sync_file",
    "create_if_absent",
    "read_versioned",
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


def exists(path: str) -> bool:
    if is_gcs(path):
        return gcs.exists(path)
    return os.path.exists(path)


def isfile(path: str) -> bool:
    """A file (an object, on ``gs://``) at exactly ``path``: one metadata read, no listing.

    Prefer it to :func:`exists` for marker files polled often (``stop``,
    ``lease.json``, ``manifest.json``): on ``gs://`` :func:`exists` must also
    list the prefix when the object is absent.
    """
    if is_gcs(path):
        return gcs.stat(path) is not None
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
        return gcs.listdir(path)
    try:
        return sorted(os.listdir(path))
    except FileNotFoundError:
        return []


def walk_files(path: str) -> list[str]:
    """Every file below ``path``, as full locations, sorted."""
    if is_gcs(path):
        return gcs.walk_files(path)
    out = []
    for root, _dirs, files in os.walk(path):
        for f in files:
            out.append(os.path.join(root, f))
    return sorted(out)


def size(path: str) -> int:
    if is_gcs(path):
        return gcs.size(path)
    return os.path.getsize(path)


def read_bytes(path: str) -> bytes:
    if is_gcs(path):
        return gcs.read_bytes(path)
    with open(path, "rb") as f:
        return f.read()


def open_input(path: str):
    """A seekable binary file object (pyarrow reads Parquet from it)."""
    if is_gcs(path):
        return io.BytesIO(gcs.read_bytes(path))
    return open(path, "rb")


def _tmp_write(directory: str, data: bytes, mode: int, sync: bool = True) -> str:
    os.makedirs(directory, mode=0o700, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if sync:
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
    _fsync(directory)


def _fsync(path: str) -> None:
    """fsync a local file or directory; best effort (a path that cannot be opened or
    synced is left as it is)."""
    try:
        fd = os.open(path, os.O_RDONLY)
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
    return int.from_bytes(hashlib.blake2b(token, digest_size=7).digest(), "big") | 1


def read_versioned(path: str) -> tuple[bytes | None, int]:
    """``(bytes, version)``, or ``(None, 0)`` if absent; the version feeds ``write_atomic(if_version=)``."""
    if is_gcs(path):
        return gcs.read_with_generation(path)
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


def write_atomic(path: str, data: bytes, mode: int = 0o600, *, if_version: int | None = None,
                 sync_dir: bool = True, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` atomically (readers see old or new, never half).

    ``if_version`` (from :func:`read_versioned`; 0 = must be absent): replace
    only if the file is still that version, else :class:`CommitConflict`
    ("stale replace").  On ``gs://`` every replace is generation-matched:
    without ``if_version`` against the generation read just before.

    ``sync_dir=False`` (local files): the data is fsynced before the rename, but the
    rename itself is made durable only by a later :func:`sync_dir` of the directory --
    for writers of many files into one directory, who sync it once after the last.
    ``durable=False`` (local files): nothing is fsynced -- still atomic, for scratch files
    that a crash discards with their directory.
    """
    if is_gcs(path):
        gcs.replace(path, data, generation=if_version)
        return
    directory = os.path.dirname(path) or "."
    tmp = _tmp_write(directory, data, mode, sync=durable)
    if if_version is not None and _local_version(path) != if_version:
        os.unlink(tmp)
        raise CommitConflict(f"stale replace: {os.path.basename(path)} changed since it was read")
    os.replace(tmp, path)
    if sync_dir and durable:
        _fsync_dir(directory)


def sync_dir(path: str) -> None:
    """Make the renames and links into directory ``path`` durable (after
    ``write_atomic(..., sync_dir=False)`` or ``create_if_absent(..., sync_dir=False)``).
    Nothing to do on ``gs://``, where an object is durable once written."""
    if not is_gcs(path):
        _fsync_dir(path)


def sync_file(path: str) -> None:
    """fsync a local file's bytes (best effort, as :func:`sync_dir`); nothing to do on
    ``gs://``, where an object is durable once written."""
    if not is_gcs(path):
        _fsync(path)


def read_range(path: str, offset: int, length: int) -> bytes:
    """``length`` bytes at ``offset`` (``gs://``: one ranged GET); short at end of file."""
    if is_gcs(path):
        return gcs.read_range(path, offset, length)
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def create_if_absent(path: str, data: bytes, mode: int = 0o600, *, sync_dir: bool = True) -> bool:
    """Create ``path`` only if it does not exist.

    Returns True when this call created it, False when it already held the
    same bytes (already committed).  Raises CommitConflict when it holds
    different bytes.  The bytes are always fsynced before the name appears, so
    a file present is whole; ``sync_dir=False`` leaves the directory's fsync (the
    name's durability across a power loss) to a later :func:`sync_dir`.
    """
    if is_gcs(path):
        return gcs.create_if_absent(path, data)
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
        if sync_dir:
            _fsync_dir(directory)
        return True
    with open(path, "rb") as f:
        existing = f.read()
    if existing == data:
        return False
    raise CommitConflict(f"{os.path.basename(path)} already exists with different content")


def remove(path: str) -> None:
    if is_gcs(path):
        gcs.remove(path)
        return
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def rmtree(path: str) -> None:
    if is_gcs(path):
        gcs.rmtree(path)
        return
    shutil.rmtree(path, ignore_errors=True)


def rename_dir(src: str, dst: str, *, markers: Sequence[str]) -> bool:
    """Move a finished directory into place; False if ``dst`` already exists.

    ``markers``: the file names whose presence means a directory is complete
    (the work directory's commit markers, :data:`pipeline.workdir.COMMIT_MARKERS`).
    ``gs://`` has no rename: ``dst`` holding one of them counts as already
    there, and the copy writes them last (:func:`copy_tree`).
    """
    if is_gcs(src) or is_gcs(dst):
        if any(exists(join(dst, m)) for m in markers):
            return False
        copy_tree(src, dst, markers=markers)
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


def _copy_order(rel: str, markers: Sequence[str]) -> tuple:
    top = "/" not in rel
    return (top, top and rel in markers, rel)


def copy_tree(src: str, dst: str, *, markers: Sequence[str] = (), workers: int = 16) -> None:
    """Copy every file below ``src`` to ``dst`` (gs:// -> gs:// copies server-side).

    Files in sub-directories first, then top-level files, and the top-level
    ``markers`` (file names that mean "this directory is complete") only
    after every other file is in place, so a crash mid-copy never leaves a
    destination that looks complete.
    """
    root = src.rstrip("/")
    rels = sorted((f[len(root) + 1:] for f in walk_files(src)), key=lambda rel: _copy_order(rel, markers))
    last = [r for r in rels if r in markers]
    rest = [r for r in rels if r not in markers]

    def one(rel: str) -> None:
        source, target = join(src, rel), join(dst, rel)
        if is_gcs(source) and is_gcs(target):
            gcs.copy_object(source, target)
            return
        if not is_gcs(target):
            os.makedirs(os.path.dirname(target), mode=0o700, exist_ok=True)
        write_atomic(target, read_bytes(source))

    if len(rest) > 1 and workers > 1:
        with ThreadPoolExecutor(max_workers=min(workers, len(rest)), thread_name_prefix="copy-tree") as pool:
            for _ in pool.map(one, rest):
                pass
    else:
        for rel in rest:
            one(rel)
    for rel in last:
        one(rel)


def unique_name(prefix: str, suffix: str = "") -> str:
    return f"{prefix}{uuid.uuid4().hex}{suffix}"


def iter_lines(path: str) -> Iterator[str]:
    yield from read_bytes(path).decode("utf-8").splitlines()
