"""Reading a group's checkpoint files back as one row per key.

Never imports Beam.  Part of :mod:`pipeline.checkpoint`.

Damaged files
-------------
A truncated, empty or garbage file, a bad footer, a failed page checksum, a
schema other than :data:`CHECKPOINT_SCHEMA` or out-of-range values are
detected and the file is skipped (never read as data); it is reported by
file name in :attr:`GroupRead.skipped` and one warning line.  A file that
belongs to another plan or group, or was written by a newer format version,
raises :class:`CheckpointError` instead: that is a misconfiguration, not
damage.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import threading
from typing import Iterator, Mapping, Sequence

import pyarrow as pa

from pipeline import fs
from pipeline.checkpoint.merge import merge
from pipeline.checkpoint.schema import (_PART_RE, COMPACTED_NAME, SkippedFile, UnreadablePart, _check_identity,
                                        group_dir, list_groups, parse_part)

__all__ = ["GroupRead", "read_group", "iter_groups", "read_all"]

_log = logging.getLogger("pipeline.checkpoint")  # one logger for the package, as before the split


@dataclasses.dataclass(frozen=True)
class GroupRead:
    """The merged state of one group and what was read to get it."""

    group_id: str
    table: pa.Table                      # one row per key (the winner), sorted by (key_hash, key)
    files: tuple[str, ...]               # file names merged (parts, then compacted.parquet)
    skipped: tuple[SkippedFile, ...]     # unreadable files, not merged
    rows_read: int                       # transition rows read before merging
    metadata: Mapping[str, Mapping[str, str]]  # file name -> key-value metadata (extras)


@dataclasses.dataclass
class _Listing:
    parts: list[str]
    has_compacted: bool
    foreign: list[str]


def _list(gdir: str) -> _Listing:
    parts, foreign, has_compacted = [], [], False
    for name in fs.listdir(gdir):
        name = name.rstrip("/")
        if name == COMPACTED_NAME:
            has_compacted = True
        elif _PART_RE.match(name):
            parts.append(name)
        elif name.startswith(".tmp-"):
            continue  # an uncommitted write (in flight, or left by a crash)
        else:
            foreign.append(name)
    return _Listing(sorted(parts), has_compacted, sorted(foreign))


_POOLS: dict = {}
_POOLS_LOCK = threading.Lock()


def _read_pool(max_workers: int) -> concurrent.futures.ThreadPoolExecutor:
    """The process's pool of ``max_workers`` threads that read parts, made once: a pool
    per call started its threads anew for every group (measured: most of the time
    compacting a run's groups went to starting threads).  Its tasks never submit to
    it, so concurrent callers cannot deadlock it."""
    with _POOLS_LOCK:
        pool = _POOLS.get(max_workers)
        if pool is None:
            pool = _POOLS[max_workers] = concurrent.futures.ThreadPoolExecutor(
                max_workers=max_workers, thread_name_prefix="ckpt-read")
        return pool


def _forget_pools() -> None:  # a forked child has the pools but not their threads
    global _POOLS_LOCK
    _POOLS.clear()
    _POOLS_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools)


_VANISHED = object()


def _load(gdir: str, name: str, plan_id: str, group_id: str):
    """(table, metadata) | SkippedFile | _VANISHED.  Raises CheckpointError for foreign files."""
    try:
        data = fs.read_bytes(fs.join(gdir, name))
    except FileNotFoundError:
        return _VANISHED
    try:
        table, meta = parse_part(data)
        kind = "checkpoint file" if name == COMPACTED_NAME else "checkpoint part"
        _check_identity(f"{kind} {group_id}/{name}", meta, plan_id, group_id)
    except UnreadablePart as e:
        return SkippedFile(name, e.reason)
    return table, meta


def _load_group(gdir: str, plan_id: str, group_id: str, max_workers: int,
                listing: _Listing | None = None):
    """Read every part, then compacted.parquet (see "Compaction" for why in that order)."""
    listing = _list(gdir) if listing is None else listing
    loaded: dict[str, tuple[pa.Table, dict]] = {}
    skipped = [SkippedFile(n, "unexpected file name") for n in listing.foreign]
    vanished = []

    def collect(name, result):
        if result is _VANISHED:
            vanished.append(name)
        elif isinstance(result, SkippedFile):
            skipped.append(result)
        else:
            loaded[name] = result

    if len(listing.parts) > 1 and max_workers > 1:
        results = list(_read_pool(max_workers).map(lambda n: _load(gdir, n, plan_id, group_id), listing.parts))
        for name, result in zip(listing.parts, results):
            collect(name, result)
    else:
        for name in listing.parts:
            collect(name, _load(gdir, name, plan_id, group_id))
    compacted = None
    if listing.has_compacted or vanished:
        result = _load(gdir, COMPACTED_NAME, plan_id, group_id)
        if isinstance(result, SkippedFile):
            skipped.append(result)
            compacted = result
        elif result is not _VANISHED:
            compacted = result
    return listing, loaded, compacted, sorted(skipped)


def _warn_skipped(group_id: str, skipped: Sequence[SkippedFile]) -> None:
    if skipped:
        _log.warning(
            "checkpoint group %s: skipped %d unreadable file(s): %s", group_id, len(skipped),
            ", ".join(f"{s.name} ({s.reason})" for s in skipped))


def read_group(plan_dir: str, plan_id: str, group_id: str, *, max_workers: int = 8) -> GroupRead:
    """Merge a group's parts and compacted file into one row per key.

    Unreadable files are skipped, named in ``GroupRead.skipped`` and in one
    warning line.  Raises :class:`CheckpointError` for a file of another
    plan or group or of a newer format.  A group without checkpoints gives
    an empty table.
    """
    gdir = group_dir(plan_dir, group_id)
    _listing, loaded, compacted, skipped = _load_group(gdir, plan_id, group_id, max_workers)
    tables, files, metadata = [], [], {}
    for name in sorted(loaded):
        table, meta = loaded[name]
        tables.append(table)
        files.append(name)
        metadata[name] = meta
    if isinstance(compacted, tuple):
        tables.append(compacted[0])
        files.append(COMPACTED_NAME)
        metadata[COMPACTED_NAME] = compacted[1]
    _warn_skipped(group_id, skipped)
    return GroupRead(
        group_id=group_id,
        table=merge(tables),
        files=tuple(files),
        skipped=tuple(skipped),
        rows_read=sum(t.num_rows for t in tables),
        metadata=metadata,
    )


def iter_groups(plan_dir: str, plan_id: str, *, max_workers: int = 8) -> Iterator[GroupRead]:
    """:func:`read_group` for every group with checkpoints, in group id order."""
    for gid in list_groups(plan_dir):
        yield read_group(plan_dir, plan_id, gid, max_workers=max_workers)


def read_all(plan_dir: str, plan_id: str) -> dict[str, pa.Table]:
    """group id -> merged table, for every group with checkpoints."""
    return {g.group_id: g.table for g in iter_groups(plan_dir, plan_id)}
