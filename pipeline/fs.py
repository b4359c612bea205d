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

import errno
import hashlib
import io
import os
import re
import shutil
import tempfile
import threading
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
    "WatchedFile",
    "local_fs_type",
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


#: File systems whose ``stat`` is authoritative for this host (no client-side attribute
#: cache): :class:`WatchedFile` trusts an unchanged identity only on these.
LOCAL_FS_TYPES = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "tmpfs", "ramfs", "overlay", "zfs"})


def local_fs_type(path: str) -> str | None:
    """The type of the file system holding local ``path`` (``/proc/self/mountinfo``), or
    None if unknown."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            return mount_type(os.path.realpath(path), f)
    except OSError:
        return None


_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def mount_type(real: str, mountinfo_lines) -> str | None:
    """The file system type of the last-mounted of the longest mount points holding
    ``real`` (a resolved path), from lines in ``/proc/<pid>/mountinfo``'s format (mount
    point in field 5, with space, tab, newline and backslash octal-escaped; the type after
    the ``-`` separator)."""
    best, kind = -1, None
    for line in mountinfo_lines:
        fields = line.split()
        try:
            mount = _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), fields[4])
            fstype = fields[fields.index("-", 6) + 1]
        except (IndexError, ValueError):
            continue
        if (real == mount or real.startswith(mount.rstrip("/") + "/")) and len(mount) >= best:
            best, kind = len(mount), fstype
    return kind


class WatchedFile:
    """A small file read again only once it is no longer the file read last.

    For a file polled on a hot path and only ever replaced whole (:func:`write_atomic`:
    a new inode renamed into place) -- ``lease.json``, read before each swap batch and
    each checkpoint part.  On a local file system (:data:`LOCAL_FS_TYPES`) a call that
    finds the same file costs one ``stat`` instead of an open, reads and a close: device,
    inode, size, mtime and ctime must all match the file read, which is kept open so that
    its inode number cannot go to another file while it is compared.  Elsewhere -- NFS
    and other network file systems, whose ``stat`` may answer from a cache while an open
    revalidates, and ``gs://`` -- every call reads.  Thread-safe.  Raises what
    :func:`read_bytes` raises (``FileNotFoundError`` when absent)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._held: tuple[tuple, int, bytes] | None = None  # (identity, open fd, bytes)
        self._closed = False
        self._watch = not is_gcs(path) and local_fs_type(os.path.dirname(os.path.abspath(path))) in LOCAL_FS_TYPES

    def read(self) -> bytes:
        if not self._watch or self._closed:
            return read_bytes(self.path)
        with self._lock:  # the held file stays open (its inode not reusable) while compared
            held = self._held
            if held is not None and _stat_identity(os.stat(self.path)) == held[0]:
                return held[2]
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            while True:
                before = _stat_identity(os.fstat(fd))
                chunks = []
                while chunk := os.read(fd, 1 << 16):
                    chunks.append(chunk)
                if _stat_identity(os.fstat(fd)) == before:  # not written in place meanwhile
                    break
                os.lseek(fd, 0, os.SEEK_SET)
        except BaseException:
            os.close(fd)
            raise
        data = b"".join(chunks)
        with self._lock:
            if self._closed:  # read, not held: nothing is left open
                os.close(fd)
                return data
            old, self._held = self._held, (before, fd, data)
            if old is not None:
                os.close(old[1])
        return data

    def close(self) -> None:
        with self._lock:
            self._closed = True
            old, self._held = self._held, None
            if old is not None:
                os.close(old[1])

    def __del__(self) -> None:  # a context never closed (teardown is best effort) keeps no fd
        held = getattr(self, "_held", None)
        if held is not None:
            try:
                os.close(held[1])
            except OSError:
                pass


def open_input(path: str):
    """A seekable binary file object (pyarrow reads Parquet from it)."""
    if is_gcs(path):
        return io.BytesIO(gcs.read_bytes(path))
    return open(path, "rb")


def _in_made_dir(directory: str, create):
    """``create()`` (a file in ``directory``), making the directory first only when it is
    missing: no ``makedirs`` system calls on every write."""
    try:
        return create()
    except FileNotFoundError:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        return create()


def _tmp_write(directory: str, data: bytes, mode: int, sync: bool = True) -> str:
    fd, tmp = _in_made_dir(directory, lambda: tempfile.mkstemp(prefix=".tmp-", dir=directory))
    try:
        os.fchmod(fd, mode)
        _write_all(fd, data)
        if sync:
            os.fsync(fd)
        fd, _fd = -1, fd
        os.close(_fd)  # inside the try: an error at close (NFS, quotas) still removes the file
    except BaseException:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return tmp


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view):]


#: Directories whose file system refused an unnamed temporary file (``O_TMPFILE``).
_NO_TMPFILE: set[str] = set()
_NO_TMPFILE_ERRNOS = (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL)
_NO_LINK_ERRNOS = (errno.EXDEV, errno.EPERM, errno.EACCES, errno.EOPNOTSUPP, errno.ENOENT, errno.EINVAL)
_CAN_LINK_UNNAMED = hasattr(os, "O_TMPFILE") and os.path.isdir("/proc/self/fd")


_ROOT_FD: list[int] = []
_ROOT_FD_LOCK = threading.Lock()


def _root_fd() -> int:
    """A descriptor of ``/`` (the absolute source path ignores it; it only makes
    ``os.link`` use ``linkat``).  Opened once per process; a forked child's copy still
    names ``/``."""
    if not _ROOT_FD:
        with _ROOT_FD_LOCK:
            if not _ROOT_FD:
                _ROOT_FD.append(os.open("/", os.O_PATH | os.O_CLOEXEC))
    return _ROOT_FD[0]


def _create_unnamed(directory: str, path: str, data: bytes, mode: int) -> bool | None:
    """Create-if-absent through an unnamed temporary file (Linux ``O_TMPFILE``): written,
    fsynced, then given its name by ``linkat``, which fails if the name exists.  True if
    created, False if ``path`` already existed, None where the file system cannot (the
    caller then uses a named temporary file).

    Six system calls instead of about eleven, each of which gives up the GIL and waits to
    take it back when stages run Python -- and a crash leaves no temporary file behind."""
    if not _CAN_LINK_UNNAMED or directory in _NO_TMPFILE:
        return None
    flags = os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC
    try:
        fd = _in_made_dir(directory, lambda: os.open(directory, flags, mode))
    except OSError as e:
        if e.errno in _NO_TMPFILE_ERRNOS:  # a file system (or kernel) without O_TMPFILE
            _NO_TMPFILE.add(directory)
        return None  # the named temporary file's way, which reports any real error
    try:
        os.fchmod(fd, mode)  # exactly ``mode``, whatever the umask
        _write_all(fd, data)
        os.fsync(fd)
        try:
            # linkat(AT_SYMLINK_FOLLOW): CPython calls plain link() -- which does not follow
            # /proc's link to the open file -- unless a directory fd is given
            os.link(f"/proc/self/fd/{fd}", path, src_dir_fd=_root_fd(), follow_symlinks=True)
        except FileExistsError:
            return False
        except OSError as e:  # linking through /proc refused here (FUSE, sandboxes, no /proc...)
            if e.errno in _NO_LINK_ERRNOS:
                _NO_TMPFILE.add(directory)
            return None  # the named temporary file's way, which reports any real error
        return True
    finally:
        os.close(fd)


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


def _stat_identity(st: os.stat_result) -> tuple:
    """What tells one local file (version) from another: equal for a file unchanged, and
    different once it is replaced (a new inode) or written (size, mtime, ctime)."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _local_version(path: str) -> int:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return 0
    token = ":".join(map(str, _stat_identity(st))).encode()
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
    created = _create_unnamed(directory, path, data, mode)
    if created is None:
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
