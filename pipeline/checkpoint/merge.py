"""The merge rule: many transition records per key -> the one that wins.

Never imports Beam.  Part of :mod:`pipeline.checkpoint`; also the summaries
of a merged table (rows per state, Failed reasons, Done verify methods).

Merge rule
----------
Per key, the winning record is the maximum of all its records under the
total order on

    (epoch, attempts, state rank, time_ms, content_hash, reason,
     verify_method, source_version)

compared left to right; integers numerically, ``content_hash``/strings as
unsigned bytes, and a null below every value.  Records equal in all of these
(and in ``key``) are identical, so which copy is kept does not matter.
Because it is a maximum under a total order, the merged result does not
depend on how files are listed, read or concatenated, is idempotent
(merging a merged table with its inputs changes nothing) and associative
(merging the merge of some parts with the rest equals merging everything),
which is what makes compaction safe.  Within one epoch a key's transitions
are monotone in (attempts, rank): a re-copy (``verifying -> copying``,
``verified -> copying``) raises ``attempts``, so it outranks the records
before it, and repeated records of one state (retry loops) are ordered by
``time_ms``.  The one exception is a rolled-back swap (``swapping ->
verified``, same attempts): the merge keeps showing Swapping until the key
moves on, which is safe because a resumed Swapping key repeats the swap's
compare-and-set -- exactly what a Verified key does next.  A later epoch (a
rerun) supersedes everything earlier, which is how ``--retry-failed`` resets
Failed keys, and why a stale executor that lost its lease can never
overwrite a newer run's records.

The merged table has one row per key, sorted by (key_hash, key) -- the
order of moves within a group.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.checkpoint.schema import CHECKPOINT_SCHEMA, _conform
from pipeline.states import State

__all__ = ["merge", "state_counts", "failed_reasons", "done_verify_methods"]

# Merge order (see the module docstring): most significant first, all
# compared descending, nulls lowest.
_ORDER = ("epoch", "attempts", "state", "time_ms", "content_hash", "reason",
          "verify_method", "source_version")
_NUMERIC_ORDER = ("epoch", "attempts", "state", "time_ms")


def _sort_indices(table: pa.Table, keys: Sequence[tuple[str, str]]) -> pa.Array:
    try:
        return pc.sort_indices(table, sort_keys=[(k, o, "at_end") for k, o in keys])
    except (TypeError, ValueError, pa.ArrowInvalid):  # pyarrow without per-key null placement
        return pc.sort_indices(table, sort_keys=list(keys), null_placement="at_end")


_REFERENCE_KEYS = [("key_hash", "ascending"), ("key", "ascending")] + [(c, "descending") for c in _ORDER]


def _first_per_key(kh_sorted: np.ndarray, keys_sorted: pa.Array) -> np.ndarray:
    """Boolean mask of the rows that start a new (key_hash, key) run."""
    n = len(kh_sorted)
    first = np.ones(n, dtype=bool)
    if n > 1:
        same_hash = kh_sorted[1:] == kh_sorted[:-1]
        same_key = pc.equal(keys_sorted.slice(1), keys_sorted.slice(0, n - 1))
        first[1:] = ~(same_hash & same_key.to_numpy(zero_copy_only=False))
    return first


def _reference_winners(table: pa.Table) -> np.ndarray:
    """Winner row indices, in (key_hash, key) order, by one full comparison sort."""
    if table.num_rows == 0:
        return np.empty(0, dtype=np.int64)
    order = _sort_indices(table, _REFERENCE_KEYS).to_numpy()
    kh = table.column("key_hash").to_numpy()[order]
    ks = table.column("key").take(order)
    if isinstance(ks, pa.ChunkedArray):
        ks = ks.combine_chunks()
    return order[_first_per_key(kh, ks)]


def _winners(table: pa.Table) -> np.ndarray:
    """Winner row indices, in (key_hash, key) order (fast path of :func:`merge`).

    Sorts only the uint64 key hashes, narrows each run of equal hashes to
    its maximum on the numeric order columns with segment reductions, and
    sends only the groups still tied after that (identical or near-identical
    duplicates) through the full comparison sort.  Distinct keys sharing a
    hash (a 64-bit collision) make the whole table take the full sort.
    """
    n = table.num_rows
    if n == 0:
        return np.empty(0, dtype=np.int64)
    kh = table.column("key_hash").to_numpy()
    order = np.argsort(kh)  # ties are reduced per group below, so stability is moot
    kh_s = kh[order]
    new_hash = np.ones(n, dtype=bool)
    new_hash[1:] = kh_s[1:] != kh_s[:-1]
    if not new_hash.all():
        ks = table.column("key").take(order)
        if isinstance(ks, pa.ChunkedArray):
            ks = ks.combine_chunks()
        if not np.array_equal(_first_per_key(kh_s, ks), new_hash):
            return _reference_winners(table)  # a hash collision between distinct keys
    else:
        return order  # every key has exactly one record

    starts = np.flatnonzero(new_hash)
    gid = np.cumsum(new_hash) - 1
    cand = np.ones(n, dtype=bool)
    floor = np.iinfo(np.int64).min
    for name in _NUMERIC_ORDER:
        v = table.column(name).to_numpy().astype(np.int64, copy=False)[order]
        v = np.where(cand, v, floor)
        cand &= v == np.maximum.reduceat(v, starts)[gid]
    pos = np.flatnonzero(cand)
    first = np.ones(len(pos), dtype=bool)
    first[1:] = gid[pos[1:]] != gid[pos[:-1]]
    winner_pos = pos[first]                      # one per group, in group order
    per_group = np.add.reduceat(cand.astype(np.int64), starts)
    tied = np.flatnonzero(per_group > 1)
    if len(tied):
        # rows still in the running in tied groups: decide by the full order
        in_tied = np.zeros(len(starts), dtype=bool)
        in_tied[tied] = True
        sub_pos = pos[in_tied[gid[pos]]]
        sub_rows = order[sub_pos]
        sub_win = _reference_winners(table.take(sub_rows))   # (key_hash, key) order == group order
        winner_pos[tied] = sub_pos[sub_win]
    return order[winner_pos]


def merge(tables: Iterable[pa.Table]) -> pa.Table:
    """One row per key: the winner under the merge rule, sorted by (key_hash, key)."""
    tables = [_conform(t) for t in tables]
    if not tables:
        return CHECKPOINT_SCHEMA.empty_table()
    table = pa.concat_tables(tables).combine_chunks() if len(tables) > 1 else tables[0]
    return table.take(_winners(table))


def _merge_reference(tables: Iterable[pa.Table]) -> pa.Table:
    """:func:`merge` by one full comparison sort (for tests)."""
    tables = [_conform(t) for t in tables]
    if not tables:
        return CHECKPOINT_SCHEMA.empty_table()
    table = pa.concat_tables(tables).combine_chunks()
    return table.take(_reference_winners(table))


# ----------------------------------------------------------------- summaries

def _value_counts(arr) -> dict:
    out = {}
    for item in pc.value_counts(arr).to_pylist():
        out[item["values"]] = item["counts"]
    return out


def state_counts(table: pa.Table) -> dict[str, int]:
    """Rows of a merged table per state, by lowercase state name (every state present)."""
    counts = _value_counts(table.column("state")) if table.num_rows else {}
    return {str(s): int(counts.get(int(s), 0)) for s in State}


def failed_reasons(table: pa.Table) -> dict[str, int]:
    """Failed keys per reason code (a missing reason counts as ``"unspecified"``), sorted."""
    failed = table.filter(pc.equal(table.column("state"), int(State.FAILED)))
    counts = _value_counts(failed.column("reason")) if failed.num_rows else {}
    return {("unspecified" if k is None else k): int(v) for k, v in
            sorted(counts.items(), key=lambda kv: (kv[0] is not None, kv[0] or ""))}


def done_verify_methods(table: pa.Table) -> dict[str, int]:
    """Done keys per verification method (missing: ``"unspecified"``), sorted."""
    done = table.filter(pc.equal(table.column("state"), int(State.DONE)))
    counts = _value_counts(done.column("verify_method")) if done.num_rows else {}
    return {("unspecified" if k is None else k): int(v) for k, v in
            sorted(counts.items(), key=lambda kv: (kv[0] is not None, kv[0] or ""))}
