"""Compaction: folding a group's parts into one ``compacted.parquet``.

Never imports Beam.  Part of :mod:`pipeline.checkpoint`.

Compaction
----------
:func:`compact_group` merges the parts it listed with the existing
``compacted.parquet`` into a new ``compacted.parquet`` committed by atomic
replace, then deletes exactly the parts it folded -- never a part that
appeared after the listing, nor an unreadable one.  It is crash-safe at every
point: before the replace the old state is intact; after the replace but
before (or during) the deletions the folded parts are still there and merge
idempotently with the new compacted file (the next compaction deletes them).
Readers read the parts first and ``compacted.parquet`` last, so a part that
vanishes mid-read (folded by a concurrent compaction) is found in the newer
compacted file.  Compaction is meant to be run by the holder of the plan
lease (one compactor per group at a time); as a second line of defence it
re-reads the compacted file's ``compaction_id`` before the replace and after
it, and raises :class:`pipeline.fs.CommitConflict` (deleting nothing) when
another compaction got in between.
"""
from __future__ import annotations

import dataclasses
import logging
import uuid
from typing import Callable

import pyarrow.compute as pc

from pipeline import fs
from pipeline.checkpoint.merge import merge
from pipeline.checkpoint.reader import _list, _load_group, _warn_skipped
from pipeline.checkpoint.schema import (COMPACTED_NAME, FORMAT_VERSION, CheckpointError, SkippedFile, group_dir,
                                        list_groups, read_file_metadata, serialize_table)

__all__ = ["CompactionResult", "compact_group", "compact_all"]

_log = logging.getLogger("pipeline.checkpoint")  # one logger for the package, as before the split


@dataclasses.dataclass(frozen=True)
class CompactionResult:
    group_id: str
    written: bool                        # a new compacted.parquet was committed
    parts_folded: int                    # parts merged into it
    parts_deleted: int                   # of those, deleted afterwards
    rows_in: int                         # transition rows read (parts + old compacted)
    keys_out: int                        # rows of the new compacted file
    bytes_written: int
    skipped: tuple[SkippedFile, ...]     # unreadable parts, left in place


def _compaction_id(path: str) -> str | None:
    """The ``compaction_id`` of the compacted file now at ``path`` (None if absent)."""
    try:
        return read_file_metadata(path).get("compaction_id", "")
    except FileNotFoundError:
        return None


def compact_group(plan_dir: str, plan_id: str, group_id: str, *,
                  fence: Callable[[], None] | None = None, min_parts: int = 1) -> CompactionResult:
    """Fold a group's parts into ``compacted.parquet``, then delete the folded parts.

    Crash-safe (see the module docstring): the new compacted file is
    committed by atomic replace before any part is deleted, and only the
    parts read from the initial listing are deleted.  Unreadable parts are
    left in place and reported.  Does nothing when fewer than ``min_parts``
    parts are listed.  Raises :class:`CheckpointError` if the existing
    compacted file is unreadable (it is never overwritten then) and
    :class:`pipeline.fs.CommitConflict` if another compaction of the group
    committed meanwhile.  ``fence`` is called before the replace and before
    the deletions.
    """
    return _compact(plan_dir, plan_id, group_id, fence=fence, min_parts=min_parts,
                    remove=fs.remove)


def _compact(plan_dir, plan_id, group_id, *, fence, min_parts, remove) -> CompactionResult:
    gdir = group_dir(plan_dir, group_id)
    listing = _list(gdir)
    nothing = CompactionResult(group_id, False, 0, 0, 0, 0, 0, ())
    if not listing.parts or len(listing.parts) < min_parts:
        return nothing
    _listing, loaded, compacted, skipped = _load_group(gdir, plan_id, group_id, max_workers=8,
                                                       listing=listing)
    skipped = tuple(s for s in skipped if s.name != COMPACTED_NAME)
    if isinstance(compacted, SkippedFile):
        raise CheckpointError(
            f"checkpoint file {group_id}/{COMPACTED_NAME} is unreadable ({compacted.reason}); "
            f"move it aside to compact this group again")
    _warn_skipped(group_id, skipped)
    folded = sorted(loaded)
    if not folded:
        return dataclasses.replace(nothing, skipped=skipped)
    tables = [loaded[n][0] for n in folded]
    old_token = None
    if compacted is not None:
        tables.append(compacted[0])
        old_token = compacted[1].get("compaction_id", "")
    rows_in = sum(t.num_rows for t in tables)
    table = merge(tables)
    token = uuid.uuid4().hex
    epoch = pc.max(table.column("epoch")).as_py() if table.num_rows else 0
    data = serialize_table(table, {
        "format_version": FORMAT_VERSION,
        "plan_id": plan_id,
        "group_id": group_id,
        "epoch": epoch,
        "kind": "compacted",
        "compaction_id": token,
        "folded_parts": len(folded),
    })
    cpath = fs.join(gdir, COMPACTED_NAME)
    if fence is not None:
        fence()
    if _compaction_id(cpath) != old_token:
        raise fs.CommitConflict(
            f"{group_id}/{COMPACTED_NAME} changed during compaction; nothing was replaced or deleted")
    fs.write_atomic(cpath, data)
    if _compaction_id(cpath) != token:
        raise fs.CommitConflict(
            f"{group_id}/{COMPACTED_NAME} was replaced by another compaction; no part was deleted")
    if fence is not None:
        fence()
    deleted = 0
    for name in folded:
        remove(fs.join(gdir, name))
        deleted += 1
    _log.info("checkpoint group %s: compacted %d part(s), %d rows into %d keys (%d bytes)",
              group_id, len(folded), rows_in, table.num_rows, len(data))
    return CompactionResult(group_id, True, len(folded), deleted, rows_in, table.num_rows,
                            len(data), skipped)


def compact_all(plan_dir: str, plan_id: str, *, fence: Callable[[], None] | None = None,
                min_parts: int = 1) -> list[CompactionResult]:
    """:func:`compact_group` for every group with checkpoints."""
    return [compact_group(plan_dir, plan_id, gid, fence=fence, min_parts=min_parts)
            for gid in list_groups(plan_dir)]
