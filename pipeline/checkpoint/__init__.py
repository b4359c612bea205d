"""Per-key state transitions, checkpointed as Arrow Parquet files.

Never imports Beam: ``transforms/`` wraps the writer in a DoFn.

Layout
------
Under a plan directory (local path or ``gs://...``)::

    <plan>/checkpoints/<group_id>/part-<epoch:08d>-<uuid hex>.parquet   parts
    <plan>/checkpoints/<group_id>/compacted.parquet                    compacted

One module per capability; this package face re-exports their public names,
so callers import :mod:`pipeline.checkpoint` only:

* :mod:`~pipeline.checkpoint.schema` -- :data:`CHECKPOINT_SCHEMA`, file and
  group names, one file's bytes (:func:`serialize_table`,
  :func:`parse_part`) and the errors;
* :mod:`~pipeline.checkpoint.merge` -- the merge rule (per key, the maximum
  of its records under one total order) and the summaries of a merged table;
* :mod:`~pipeline.checkpoint.writer` -- :class:`Transitions` (the buffer)
  and :class:`CheckpointWriter` (idempotent part commits);
* :mod:`~pipeline.checkpoint.reader` -- :func:`read_group`: parts, then the
  compacted file, merged; damaged files skipped and named;
* :mod:`~pipeline.checkpoint.compaction` -- :func:`compact_group`: fold the
  parts into ``compacted.parquet``, crash-safe at every point.
"""
from __future__ import annotations

from pipeline import fs  # noqa: F401  (``checkpoint.fs``: the file layer the writer commits through)
from pipeline.checkpoint.compaction import CompactionResult, compact_all, compact_group
from pipeline.checkpoint.compaction import _compact  # noqa: F401  (tests crash it part-way)
from pipeline.checkpoint.merge import done_verify_methods, failed_reasons, merge, state_counts
from pipeline.checkpoint.merge import _merge_reference  # noqa: F401  (the tests' oracle for merge)
from pipeline.checkpoint.reader import GroupRead, iter_groups, read_all, read_group
from pipeline.checkpoint.schema import (CHECKPOINT_SCHEMA, COMPACTED_NAME, FORMAT_VERSION,
                                        CheckpointError, SkippedFile, UnreadablePart, checkpoints_dir,
                                        group_dir, list_groups, parse_part, part_name, read_file_metadata,
                                        serialize_table)
from pipeline.checkpoint.writer import CheckpointWriter, Transitions, WriterStats

__all__ = [
    "CHECKPOINT_SCHEMA",
    "FORMAT_VERSION",
    "COMPACTED_NAME",
    "CheckpointError",
    "UnreadablePart",
    "Transitions",
    "CheckpointWriter",
    "WriterStats",
    "GroupRead",
    "SkippedFile",
    "CompactionResult",
    "checkpoints_dir",
    "group_dir",
    "part_name",
    "list_groups",
    "serialize_table",
    "parse_part",
    "read_file_metadata",
    "merge",
    "read_group",
    "iter_groups",
    "read_all",
    "compact_group",
    "compact_all",
    "state_counts",
    "failed_reasons",
    "done_verify_methods",
]
