"""The planner's algorithm on Arrow batches: no Beam here.

A *batch* of assignments (``key``, ``shard_id``) is turned into

* the moves of its keys whose shard changes (key, source, target, key_hash,
  bucket), and
* mergeable statistics: per-shard counts before and after, per-pair counts,
  validation counts (invalid/oversize keys, unknown shard ids) and the
  partial snapshot digest.

``transforms/plan.py`` wraps these functions in Beam; ``reference_plan`` is
an independent, brute-force planner used by the tests.

Snapshot digest (CONTRACTS "Plan identity"): an order-independent multiset
hash.  Each row (key, shard) contributes two 64-bit lanes derived with a
splitmix64 finaliser from xxh3-64(key) and xxh3-64(shard id); the lanes are
summed modulo 2^64 and, with the row count, hashed with SHA-256.  It does not
depend on row order, file layout or segment size.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import xxhash

from pipeline import keys as K
from pipeline.keys import KeyType

__all__ = [
    "PLAN_FORMAT_VERSION",
    "SNAPSHOT_SCHEMA",
    "TARGET_SCHEMA",
    "MOVES_SCHEMA",
    "PlanContext",
    "Stats",
    "prepare_batch",
    "plan_batch",
    "join_batch",
    "join_sorted",
    "join_counted",
    "prepare_side",
    "bucket_of",
    "digest_lanes",
    "digest_hex",
    "sort_moves",
    "plan_id_for",
    "optimum_moved_fraction",
    "reference_plan",
]

PLAN_FORMAT_VERSION = 1

SNAPSHOT_SCHEMA = pa.schema([("key", pa.binary()), ("shard_id", pa.string()), ("version", pa.int64())])
TARGET_SCHEMA = pa.schema([("key", pa.binary()), ("shard_id", pa.string())])
MOVES_SCHEMA = pa.schema(
    [("key", pa.binary()), ("source", pa.string()), ("target", pa.string()), ("key_hash", pa.uint64())]
)

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_G = np.uint64(0x9E3779B97F4A7C15)
_C2 = np.uint64(0x632BE59BD9B4E019)


def _mix(z: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = z + _G
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def digest_lanes(key_hashes: np.ndarray, shard_hashes: np.ndarray) -> tuple[int, int, int]:
    """(count, lane1 sum, lane2 sum) of rows given per-row key and shard hashes."""
    if len(key_hashes) == 0:
        return 0, 0, 0
    with np.errstate(over="ignore"):
        a = _mix(key_hashes ^ _mix(shard_hashes))
        b = _mix((key_hashes + _C2) ^ _mix(shard_hashes ^ _C2))
        return int(len(key_hashes)), int(a.sum(dtype=np.uint64)), int(b.sum(dtype=np.uint64))


def _mix_owned(z: np.ndarray) -> np.ndarray:
    """:func:`_mix` in place, on an array the caller owns (fewer temporaries)."""
    with np.errstate(over="ignore"):
        z += _G
        t = z >> np.uint64(30)
        z ^= t
        z *= _M1
        np.right_shift(z, np.uint64(27), out=t)
        z ^= t
        z *= _M2
        np.right_shift(z, np.uint64(31), out=t)
        z ^= t
    return z


def digest_lanes_coded(key_hashes: np.ndarray, name_hashes: np.ndarray, codes: np.ndarray) -> tuple[int, int, int]:
    """:func:`digest_lanes` where row ``i``'s shard hash is ``name_hashes[codes[i]]``:
    the shard-side mixes run once per distinct shard id, not once per row."""
    if len(key_hashes) == 0:
        return 0, 0, 0
    with np.errstate(over="ignore"):
        ma = _mix(name_hashes)[codes]
        mb = _mix(name_hashes ^ _C2)[codes]
        a = _mix_owned(key_hashes ^ ma)
        b = key_hashes + _C2
        b ^= mb
        b = _mix_owned(b)
        return int(len(key_hashes)), int(a.sum(dtype=np.uint64)), int(b.sum(dtype=np.uint64))


def digest_hex(count: int, lane1: int, lane2: int) -> str:
    text = f"shardmove-assignments-v1|{count}|{lane1 % 2**64:016x}|{lane2 % 2**64:016x}"
    return hashlib.sha256(text.encode()).hexdigest()


def _shard_hash_array(shards: pa.Array) -> np.ndarray:
    """xxh3-64 of each row's shard id, computed once per distinct id."""
    enc = pc.dictionary_encode(shards) if not pa.types.is_dictionary(shards.type) else shards
    dict_hashes = np.fromiter(
        (xxhash.xxh3_64_intdigest(s.encode("utf-8")) for s in enc.dictionary.to_pylist()),
        dtype=np.uint64,
    )
    idx = enc.indices.to_numpy(zero_copy_only=False)
    return dict_hashes[idx] if len(dict_hashes) else np.zeros(len(shards), np.uint64)


def bucket_of(hashes: np.ndarray, buckets: int) -> np.ndarray:
    """Bucket = a contiguous range of the hash space: monotone in the hash."""
    with np.errstate(over="ignore"):
        return ((hashes >> np.uint64(32)) * np.uint64(buckets) >> np.uint64(32)).astype(np.int32)


@dataclass
class Stats:
    """Mergeable statistics of one or more batches (plain dicts: picklable, JSON-able)."""

    rows: int = 0
    invalid_keys: int = 0
    oversize_keys: int = 0
    unknown_shard_rows: int = 0
    unknown_shards: int = 0  # distinct ids (merged as a set below)
    unknown_shard_ids: set = field(default_factory=set)
    in_window: int = 0
    moved: int = 0
    before: dict = field(default_factory=dict)
    after: dict = field(default_factory=dict)
    pairs: dict = field(default_factory=dict)  # "source\x1ftarget" -> n
    digest: tuple = (0, 0, 0)
    target_rows: int = 0
    target_invalid_keys: int = 0
    target_oversize_keys: int = 0
    target_digest: tuple = (0, 0, 0)
    target_unknown_shard_rows: int = 0

    def merge(self, o: "Stats") -> "Stats":
        self.rows += o.rows
        self.invalid_keys += o.invalid_keys
        self.oversize_keys += o.oversize_keys
        self.unknown_shard_rows += o.unknown_shard_rows
        self.unknown_shard_ids |= o.unknown_shard_ids
        self.unknown_shards = len(self.unknown_shard_ids)
        self.in_window += o.in_window
        self.moved += o.moved
        for mine, theirs in ((self.before, o.before), (self.after, o.after), (self.pairs, o.pairs)):
            for k, v in theirs.items():
                mine[k] = mine.get(k, 0) + v
        self.digest = _add_digest(self.digest, o.digest)
        self.target_rows += o.target_rows
        self.target_invalid_keys += o.target_invalid_keys
        self.target_oversize_keys += o.target_oversize_keys
        self.target_digest = _add_digest(self.target_digest, o.target_digest)
        self.target_unknown_shard_rows += o.target_unknown_shard_rows
        return self


def _add_digest(a, b):
    return (a[0] + b[0], (a[1] + b[1]) % 2**64, (a[2] + b[2]) % 2**64)


@dataclass(frozen=True)
class PlanContext:
    """Picklable planning inputs (the ring is an immutable value)."""

    key_type: KeyType
    ring: object | None  # pipeline.ring.Ring, or None for an explicit target
    window: tuple[int, int] | None
    known_shards: frozenset | None  # None: accept any shard id
    hash_buckets: int
    target_shards: frozenset | None = None  # explicit target: allowed target ids

    def __reduce__(self):
        # The ring travels as its defining parameters and is rebuilt through a
        # per-process cache: Beam unpickles each DoFn (and so this context)
        # several times per pipeline, and a native ring build takes ~0.1 s.
        ring_args = self.ring.__reduce__() if self.ring is not None else None
        if ring_args is not None:  # this process's own unpickles reuse this ring (a build is ~0.2 s)
            _cache_ring((ring_args[0], ring_args[1]), self.ring)
        return (_rebuild_context, (self.key_type, ring_args, self.window, self.known_shards, self.hash_buckets,
                                   self.target_shards))


_RING_CACHE: dict = {}


def _cache_ring(key, ring) -> None:
    if key in _RING_CACHE:
        return
    if len(_RING_CACHE) >= 8:
        _RING_CACHE.clear()
    _RING_CACHE[key] = ring


def _rebuild_context(key_type, ring_args, window, known_shards, hash_buckets, target_shards):
    ring = None
    if ring_args is not None:
        ctor, args = ring_args[0], ring_args[1]
        key = (ctor, args)
        ring = _RING_CACHE.get(key)
        if ring is None:
            ring = ctor(*args)
            _cache_ring(key, ring)
    return PlanContext(key_type, ring, window, known_shards, hash_buckets, target_shards)


def _canonical_keys(keys_col, key_type: KeyType):
    """:func:`pipeline.keys.canonical_array`, with a vectorised fast path for
    the common case (string keys already stored as binary canonical bytes):
    Arrow's cast to ``string`` validates UTF-8 in C++, so the per-key Python
    check runs only when some key is invalid."""
    if KeyType(key_type) is KeyType.STRING:
        col = keys_col.combine_chunks() if isinstance(keys_col, pa.ChunkedArray) else keys_col
        if pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type):
            arr = col.cast(pa.binary())
            try:
                arr.cast(pa.string())
            except pa.ArrowInvalid:
                return K.canonical_array(keys_col, key_type)
            return arr, arr.null_count
    return K.canonical_array(keys_col, key_type)


def input_error(invalid: int, oversize: int, key_type: KeyType, *, what: str = "snapshot") -> str | None:
    """The one-line refusal of a snapshot (``what="snapshot"``) or an explicit target
    (``"target snapshot"``) holding invalid or over-long keys, or None; counts only."""
    kt = KeyType(key_type).value
    if invalid:
        tail = " (or are empty)" if what == "snapshot" else ""
        return f"plan: {invalid} keys in the {what} cannot be represented as key_type {kt}{tail}"
    if oversize:
        where = "" if what == "snapshot" else f" in the {what}"
        return f"plan: {oversize} keys{where} are longer than {K.MAX_KEY_BYTES} bytes"
    return None


def prepare_batch(batch: pa.RecordBatch | pa.Table, key_type: KeyType, stats: Stats, known: frozenset | None,
                  *, target_side: bool = False):
    """Canonical keys, shard ids and stable hashes of a batch; invalid rows dropped and counted."""
    keys_col = batch.column(batch.schema.get_field_index("key"))
    shard_col = batch.column(batch.schema.get_field_index("shard_id"))
    if isinstance(shard_col, pa.ChunkedArray):
        shard_col = shard_col.combine_chunks()
    shard_col = shard_col.cast(pa.string())
    canon, bad = _canonical_keys(keys_col, key_type)
    n = len(canon)
    valid = pc.is_valid(canon)
    if bad == 0:
        lengths = pc.binary_length(canon)
        too_long = pc.greater(lengths, K.MAX_KEY_BYTES)
        empty = pc.equal(lengths, 0) if key_type in (KeyType.STRING, KeyType.BYTES) else None
        nlong = pc.sum(too_long.cast(pa.int64())).as_py() or 0
        nempty = (pc.sum(empty.cast(pa.int64())).as_py() or 0) if empty is not None else 0
    else:
        lengths = pc.binary_length(canon)
        too_long = pc.fill_null(pc.greater(lengths, K.MAX_KEY_BYTES), False)
        empty = pc.fill_null(pc.equal(lengths, 0), False) if key_type in (KeyType.STRING, KeyType.BYTES) else None
        nlong = pc.sum(too_long.cast(pa.int64())).as_py() or 0
        nempty = (pc.sum(empty.cast(pa.int64())).as_py() or 0) if empty is not None else 0
    shard_null = pc.is_null(shard_col)
    nshard_null = pc.sum(shard_null.cast(pa.int64())).as_py() or 0
    if target_side:  # counted apart: a key in both files is one over-long snapshot key, not two
        stats.target_invalid_keys += bad + nempty + nshard_null
        stats.target_oversize_keys += nlong
    else:
        stats.invalid_keys += bad + nempty + nshard_null
        stats.oversize_keys += nlong
    if bad or nlong or nempty or nshard_null:
        keep = pc.and_(valid, pc.invert(too_long))
        if empty is not None:
            keep = pc.and_(keep, pc.invert(empty))
        keep = pc.and_(keep, pc.invert(shard_null))
        canon = canon.filter(keep)
        shard_col = shard_col.filter(keep)
    if known is not None and len(shard_col):
        ok = pc.is_in(shard_col, value_set=pa.array(sorted(known), pa.string()))
        nbad = len(shard_col) - (pc.sum(ok.cast(pa.int64())).as_py() or 0)
        if nbad:
            if target_side:
                stats.target_unknown_shard_rows += nbad
            else:
                stats.unknown_shard_rows += nbad
            stats.unknown_shard_ids |= set(pc.unique(shard_col.filter(pc.invert(ok))).to_pylist())
            stats.unknown_shards = len(stats.unknown_shard_ids)
    hashes = K.stable_hashes_array(canon)
    return canon, shard_col, hashes


def _window_mask(hashes: np.ndarray, window) -> np.ndarray | None:
    if window is None:
        return None
    top = (hashes >> np.uint64(56)).astype(np.int32)
    return (top >= window[0]) & (top <= window[1])


def _count_by(values: pa.Array, weights_mask: np.ndarray | None = None) -> dict:
    if len(values) == 0:
        return {}
    if weights_mask is not None:
        values = values.filter(pa.array(weights_mask))
    vc = pc.value_counts(values)
    return {v["values"].as_py(): v["counts"].as_py() for v in vc}


def _universe(ring, names: list) -> tuple[list, np.ndarray]:
    """Shard universe = the ring's shards, then any other id in ``names``;
    returns (universe ids, universe index of each of ``names``)."""
    uni = list(ring.shard_ids)
    pos = {s: i for i, s in enumerate(uni)}
    idx = np.empty(len(names), np.int32)
    for j, s in enumerate(names):
        if s not in pos:
            pos[s] = len(uni)
            uni.append(s)
        idx[j] = pos[s]
    return uni, idx


def _coded_rows(batch, key_type: KeyType):
    """``(canonical keys, shard names, shard codes)`` of a batch with no invalid row (no
    invalid, over-long or empty key, no null shard id), shard ids dictionary-encoded once
    (row ``i``'s id is ``names[codes[i]]``); None when some row is invalid (then
    :func:`prepare_batch`'s general path gives the same results)."""
    keys_col = batch.column(batch.schema.get_field_index("key"))
    shard_col = batch.column(batch.schema.get_field_index("shard_id"))
    if isinstance(shard_col, pa.ChunkedArray):
        shard_col = shard_col.combine_chunks()
    if shard_col.null_count:
        return None
    canon, bad = _canonical_keys(keys_col, key_type)
    if bad or canon.null_count:
        return None
    if len(canon):
        lengths = pc.binary_length(canon).to_numpy(zero_copy_only=False)
        if int(lengths.max()) > K.MAX_KEY_BYTES:
            return None
        if key_type in (KeyType.STRING, KeyType.BYTES) and int(lengths.min()) == 0:
            return None
    enc = shard_col if pa.types.is_dictionary(shard_col.type) else pc.dictionary_encode(shard_col)
    names = enc.dictionary.cast(pa.string()).to_pylist()
    codes = enc.indices.to_numpy(zero_copy_only=False).astype(np.intp, copy=False)
    return canon, names, codes


def _count_unknown(st: Stats, names: list, codes: np.ndarray, known: frozenset | None, target_side: bool) -> None:
    """Rows (and ids) of coded shard ids not in ``known``, counted as :func:`prepare_batch` does."""
    if known is None or not len(codes):
        return
    unknown = [j for j, s in enumerate(names) if s not in known]
    if unknown:
        per = np.bincount(codes, minlength=len(names))
        nbad = int(per[unknown].sum())
        if nbad:
            if target_side:
                st.target_unknown_shard_rows += nbad
            else:
                st.unknown_shard_rows += nbad
            st.unknown_shard_ids |= {names[j] for j in unknown if per[j]}
            st.unknown_shards = len(st.unknown_shard_ids)


def _name_hashes(names: list) -> np.ndarray:
    return np.fromiter((xxhash.xxh3_64_intdigest(s.encode("utf-8")) for s in names), np.uint64, count=len(names))


def prepare_side(batch, key_type: KeyType, st: Stats, known: frozenset | None, *, target_side: bool = False):
    """One side of an explicit-target plan (the snapshot, or the target with
    ``target_side``): ``(canonical keys, shard names, shard codes, stable hashes)`` of the
    batch's valid rows (row ``i``'s shard id is ``names[codes[i]]``), with its rows,
    validation counts and digest lanes added to ``st`` (``rows``/``digest`` or
    ``target_rows``/``target_digest``).  The same figures as :func:`prepare_batch` and
    :func:`digest_lanes`; invalid rows take prepare_batch's general path."""
    coded = _coded_rows(batch, key_type)
    if coded is None:
        canon, shard, hashes = prepare_batch(batch, key_type, st, known, target_side=target_side)
        enc = pc.dictionary_encode(shard)
        names = enc.dictionary.to_pylist()
        codes = enc.indices.to_numpy(zero_copy_only=False).astype(np.intp, copy=False)
    else:
        canon, names, codes = coded
        _count_unknown(st, names, codes, known, target_side)
        hashes = K.stable_hashes_array(canon)
    lanes = digest_lanes_coded(hashes, _name_hashes(names), codes)
    if target_side:
        st.target_rows += batch.num_rows
        st.target_digest = _add_digest(st.target_digest, lanes)
    else:
        st.rows += batch.num_rows
        st.digest = _add_digest(st.digest, lanes)
    return canon, names, codes, hashes


def _coded_moves(canon, uni: list, src_u: np.ndarray, tgt_u: np.ndarray, hashes: np.ndarray, changed: np.ndarray,
                 st: Stats, ctx: PlanContext, key_rows: np.ndarray | None = None) -> pa.Table:
    """The moves (rows where ``changed``) and the before/after/pair counts of rows whose
    source and target shard ids are codes into ``uni``: numpy on codes, strings built only
    for the moved rows.  Row ``i``'s key is ``canon[i]``, or ``canon[key_rows[i]]``."""
    u = len(uni)
    before = np.bincount(src_u, minlength=u) if len(src_u) else np.zeros(u, np.int64)
    st.before = {uni[i]: int(before[i]) for i in np.flatnonzero(before)}
    moved = np.flatnonzero(changed)
    st.moved = len(moved)
    if not len(moved):
        st.after = dict(st.before)
        return _no_moves(ctx)
    ms, mt, mh = src_u[moved], tgt_u[moved], hashes[moved]
    # after = before, less the moved rows at their source, plus them at their target
    after = before - np.bincount(ms, minlength=u) + np.bincount(mt, minlength=u)
    st.after = {uni[i]: int(after[i]) for i in np.flatnonzero(after)}
    uni_arr = pa.array(uni, pa.string())
    pc_ = np.bincount(ms.astype(np.intp) * len(uni) + mt, minlength=len(uni) * len(uni))
    st.pairs = {f"{uni[i // len(uni)]}\x1f{uni[i % len(uni)]}": int(pc_[i]) for i in np.flatnonzero(pc_)}
    return pa.table(
        {
            "key": canon.take(pa.array(moved if key_rows is None else key_rows[moved])),
            "source": uni_arr.take(pa.array(ms)),
            "target": uni_arr.take(pa.array(mt)),
            "key_hash": pa.array(mh, pa.uint64()),
            "bucket": pa.array(bucket_of(mh, ctx.hash_buckets), pa.int32()),
        }
    )


def _no_moves(ctx: PlanContext) -> pa.Table:
    return _finish(pa.array([], pa.binary()), pa.array([], pa.string()), pa.array([], pa.string()),
                   np.zeros(0, np.uint64), np.zeros(0, bool), Stats(), ctx)[0]


def _plan_batch_coded(batch, ctx: PlanContext):
    """:func:`plan_batch` on integer shard codes: the common case, no invalid
    rows.  Shard ids are dictionary-encoded once per batch; comparisons and
    counts are numpy on codes, strings are built only for the moved rows.
    Returns None when the batch needs the general path (any invalid key,
    over-long or empty key, null shard id): results are identical."""
    if ctx.ring is None:
        return None
    coded = _coded_rows(batch, ctx.key_type)
    if coded is None:
        return None
    canon, names, codes = coded
    n = len(canon)
    st = Stats()
    st.rows = batch.num_rows
    _count_unknown(st, names, codes, ctx.known_shards, False)
    hashes = K.stable_hashes_array(canon)
    st.digest = digest_lanes_coded(hashes, _name_hashes(names), codes)
    ring = ctx.ring
    uni, name_uni = _universe(ring, names)
    src_u = name_uni[codes] if n else np.zeros(0, np.int32)
    tgt_u = ring.assign(canon, hashes).astype(np.int32, copy=False)
    changed = src_u != tgt_u
    wmask = _window_mask(hashes, ctx.window)
    if wmask is not None:
        changed &= wmask
        st.in_window = int(wmask.sum())
    else:
        st.in_window = n
    return _coded_moves(canon, uni, src_u, tgt_u, hashes, changed, st, ctx), st, hashes


def plan_batch(batch, ctx: PlanContext) -> tuple[pa.Table, Stats, np.ndarray]:
    """Moves of one batch against the target ring.

    Returns ``(moves, stats, hashes)`` where ``moves`` has MOVES_SCHEMA plus a
    ``bucket`` column, and ``hashes`` are the stable hashes of every valid row
    (for duplicate detection).
    """
    fast = _plan_batch_coded(batch, ctx)
    if fast is not None:
        return fast
    st = Stats()
    st.rows = batch.num_rows
    canon, src, hashes = prepare_batch(batch, ctx.key_type, st, ctx.known_shards)
    st.digest = digest_lanes(hashes, _shard_hash_array(src))
    st.before = _count_by(src)
    ring = ctx.ring
    idx = ring.assign(canon, hashes)
    tgt = pa.DictionaryArray.from_arrays(pa.array(idx, pa.int32()), pa.array(ring.shard_ids, pa.string()))
    tgt = tgt.cast(pa.string())
    wmask = _window_mask(hashes, ctx.window)
    changed = pc.not_equal(src, tgt).to_numpy(zero_copy_only=False)
    if wmask is not None:
        changed &= wmask
        st.in_window = int(wmask.sum())
    else:
        st.in_window = len(hashes)
    after = pc.if_else(pa.array(changed), tgt, src)
    st.after = _count_by(after)
    return _finish(canon, src, tgt, hashes, changed, st, ctx)


def _finish(canon, src, tgt, hashes, changed, st, ctx):
    n = int(changed.sum())
    st.moved = n
    if n:
        m = pa.array(changed)
        mh = hashes[changed]
        moves = pa.table(
            {
                "key": canon.filter(m),
                "source": src.filter(m),
                "target": tgt.filter(m),
                "key_hash": pa.array(mh, pa.uint64()),
                "bucket": pa.array(bucket_of(mh, ctx.hash_buckets), pa.int32()),
            }
        )
        pairs = pc.value_counts(pc.binary_join_element_wise(moves["source"], moves["target"], "\x1f"))
        st.pairs = {v["values"].as_py(): v["counts"].as_py() for v in pairs}
    else:
        moves = pa.table(
            {
                "key": pa.array([], pa.binary()),
                "source": pa.array([], pa.string()),
                "target": pa.array([], pa.string()),
                "key_hash": pa.array([], pa.uint64()),
                "bucket": pa.array([], pa.int32()),
            }
        )
    return moves, st, hashes


def join_batch(source: pa.Table, target: pa.Table, ctx: PlanContext) -> tuple[pa.Table, Stats]:
    """Moves for an explicit target: ``source``/``target`` are prepared rows of
    one hash partition (columns key, shard_id, key_hash).  Keys absent from
    the target do not move."""
    st = Stats()
    src_shard = source["shard_id"].combine_chunks() if source.num_rows else pa.array([], pa.string())
    st.before = _count_by(src_shard)
    if source.num_rows == 0:
        return _finish(pa.array([], pa.binary()), pa.array([], pa.string()), pa.array([], pa.string()),
                       np.zeros(0, np.uint64), np.zeros(0, bool), st, ctx)[:2]
    t = target.select(["key", "shard_id"]).rename_columns(["key", "target"])
    j = source.join(t, keys="key", join_type="left outer")
    # deterministic row order inside the partition
    j = j.sort_by([("key_hash", "ascending"), ("key", "ascending")])
    canon = j["key"].combine_chunks()
    src = j["shard_id"].combine_chunks()
    tgt = pc.coalesce(j["target"], j["shard_id"]).combine_chunks()
    hashes = j["key_hash"].combine_chunks().to_numpy(zero_copy_only=False)
    return _joined_moves(canon, src, tgt, hashes, st, ctx)


def _joined_moves(canon, src, tgt, hashes: np.ndarray, st: Stats, ctx: PlanContext) -> tuple[pa.Table, Stats]:
    """The moves and stats of joined rows (hash order): the keys whose target differs from
    their source, within the window; shared by :func:`join_batch` and :func:`join_sorted`."""
    wmask = _window_mask(hashes, ctx.window)
    changed = pc.not_equal(src, tgt).to_numpy(zero_copy_only=False)
    if wmask is not None:
        changed &= wmask
        st.in_window = int(wmask.sum())
    else:
        st.in_window = len(hashes)
    st.after = _count_by(pc.if_else(pa.array(changed), tgt, src))
    moves, st, _ = _finish(canon, src, tgt, hashes, changed, st, ctx)
    return moves, st


def join_sorted(source: pa.Table, target: pa.Table, ctx: PlanContext) -> tuple[pa.Table, Stats]:
    """:func:`join_batch` by stable hash (:func:`join_counted`, without its duplicate count)."""
    moves, st, _dups = join_counted(source, target, ctx)
    return moves, st


def join_counted(source: pa.Table, target: pa.Table, ctx: PlanContext) -> tuple[pa.Table, Stats, int]:
    """:func:`join_batch` on the stable hash, and the rows of either side whose key appears
    earlier on that side (duplicates).  ``source``/``target``: prepared rows of one hash
    partition (key, shard_id as strings or dictionary-encoded, key_hash; chunked as read).

    Both sides are sorted by hash (numpy) and the source's hashes looked up in the
    target's (a merge: sorted queries); shard ids are compared as integer codes.  Only
    rows whose target shard differs from their source shard (within the window) are
    confirmed by key bytes: an equal hash of a different key (a 64-bit collision) with the
    same shard id changes nothing, so it need not be told from a match.  Moves come in
    hash order.  Duplicates are counted from the sorted hashes, by key bytes only when a
    hash repeats; then (a duplicate key, or a collision on one side) the join is
    :func:`join_batch`'s, so the result is the same in every case."""
    sh, th = _hash_column(source), _hash_column(target)
    sorder, torder = np.argsort(sh), np.argsort(th)
    shs, ths = sh[sorder], th[torder]
    srep, trep = _repeats(shs), _repeats(ths)
    dups = (_key_duplicates(source) if srep else 0) + (_key_duplicates(target) if trep else 0)
    if srep or trep or not len(sh) or source["shard_id"].null_count or target["shard_id"].null_count:
        moves, st = join_batch(_string_shards(source), _string_shards(target), ctx)
        return moves, st, dups
    pos: dict = {}
    src_u = _shard_codes(source["shard_id"], pos)[sorder]
    tgt_all = _shard_codes(target["shard_id"], pos)
    uni = list(pos)
    st = Stats()
    changed = np.zeros(len(shs), bool)
    tgt_u = src_u
    if len(ths):
        at = np.searchsorted(ths, shs)
        np.minimum(at, len(ths) - 1, out=at)
        hit = ths[at] == shs
        tidx = torder[at]
        tgt_u = np.where(hit, tgt_all[tidx], src_u)
        changed = tgt_u != src_u
    wmask = _window_mask(shs, ctx.window)
    if wmask is not None:
        changed &= wmask
        st.in_window = int(wmask.sum())
    else:
        st.in_window = len(shs)
    skeys = source["key"]
    cand = np.flatnonzero(changed)
    if len(cand):  # equal hashes: confirmed by key bytes (a collision is not a match)
        same = pc.equal(skeys.take(pa.array(sorder[cand])), target["key"].take(pa.array(tidx[cand])))
        changed[cand[~same.to_numpy(zero_copy_only=False)]] = False
    return _coded_moves(skeys, uni, src_u, tgt_u, shs, changed, st, ctx, key_rows=sorder), st, dups


def _hash_column(t: pa.Table) -> np.ndarray:
    col = t["key_hash"]
    if col.num_chunks == 0:
        return np.zeros(0, np.uint64)
    return col.combine_chunks().to_numpy(zero_copy_only=False).astype(np.uint64, copy=False)


def _repeats(sorted_hashes: np.ndarray) -> bool:
    return len(sorted_hashes) > 1 and bool(np.any(sorted_hashes[1:] == sorted_hashes[:-1]))


def _key_duplicates(t: pa.Table) -> int:
    """Rows of ``t`` whose key appears earlier in ``t``."""
    return t.num_rows - len(pc.unique(t["key"].combine_chunks()))


def _string_shards(t: pa.Table) -> pa.Table:
    i = t.schema.get_field_index("shard_id")
    return t.set_column(i, "shard_id", t["shard_id"].cast(pa.string()))


def _shard_codes(col: pa.ChunkedArray, pos: dict) -> np.ndarray:
    """Each row's code in ``pos`` (shard id -> code; ids not yet in it are added in the
    order met), from a chunked string or dictionary column without nulls (the chunks'
    dictionaries are unified by Arrow: one mapping per column)."""
    col = col.combine_chunks() if col.num_chunks else pa.array([], col.type)
    enc = col if pa.types.is_dictionary(col.type) else pc.dictionary_encode(col)
    code_of = np.array([pos.setdefault(s, len(pos)) for s in enc.dictionary.cast(pa.string()).to_pylist()], np.intp)
    idx = enc.indices.to_numpy(zero_copy_only=False)
    return code_of[idx] if len(code_of) else np.zeros(len(idx), np.intp)


def _byte_ranks(col) -> np.ndarray:
    """Each row's rank of its value in byte order among the column's distinct values
    (a string column of a few distinct shard ids)."""
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    enc = col if pa.types.is_dictionary(col.type) else pc.dictionary_encode(col)
    names = [v.encode("utf-8") if isinstance(v, str) else v for v in enc.dictionary.to_pylist()]
    rank = np.empty(len(names), np.int64)
    rank[sorted(range(len(names)), key=names.__getitem__)] = np.arange(len(names))
    return rank[enc.indices.to_numpy(zero_copy_only=False)]


def sort_moves(table: pa.Table) -> pa.Table:
    """CONTRACTS order: (source, target, stable hash, canonical key bytes).

    Usually a numpy sort on (source rank, target rank, hash); only when two rows share
    all three (a duplicate key or a 64-bit collision) does Arrow sort on the key bytes
    too.  Either way the same rows in the same order."""
    n = table.num_rows
    if n > 1 and not any(table[c].null_count for c in ("source", "target", "key_hash")):
        h = table["key_hash"].combine_chunks().to_numpy(zero_copy_only=False)
        src, tgt = _byte_ranks(table["source"]), _byte_ranks(table["target"])
        pair = src * (int(tgt.max()) + 1) + tgt
        idx = np.argsort(h)
        if pair.min() != pair.max():  # then by pair, stably (a radix sort for small codes)
            small = np.uint16 if pair.max() < 1 << 16 else np.int64
            idx = idx[np.argsort(pair[idx].astype(small), kind="stable")]
        hs, ps = h[idx], pair[idx]
        if not np.any((hs[1:] == hs[:-1]) & (ps[1:] == ps[:-1])):
            return table.take(pa.array(idx))
    order = pc.sort_indices(
        table,
        sort_keys=[("source", "ascending"), ("target", "ascending"), ("key_hash", "ascending"), ("key", "ascending")],
    )
    return table.take(order)


def sort_pair_moves(table: pa.Table) -> pa.Table:
    """:func:`sort_moves` of moves that all share one (source, target) pair -- a move
    file's group: the same rows in the same order, without ranking the shard ids.

    Rows already in stable hash order (the usual group: one chunk's spilled run, or
    runs that do not interleave) are not reordered, only combined into one chunk as a
    sort's ``take`` would leave them; equal hashes take :func:`sort_moves` (key bytes)."""
    n = table.num_rows
    if n < 2 or table["key_hash"].null_count:
        return sort_moves(table)
    h = table["key_hash"].combine_chunks().to_numpy(zero_copy_only=False)
    if bool(np.all(h[1:] > h[:-1])):
        return table.combine_chunks()
    idx = np.argsort(h)
    hs = h[idx]
    if np.any(hs[1:] == hs[:-1]):
        return sort_moves(table)
    return table.take(pa.array(idx))


def plan_id_for(snapshot_digest: str, target_canonical: Mapping, key_type: KeyType, window) -> str:
    ident = {
        "format_version": PLAN_FORMAT_VERSION,
        "snapshot_digest": snapshot_digest,
        "target": target_canonical,
        "key_type": KeyType(key_type).value,
        "window": None if window is None else [f"{window[0]:02X}", f"{window[1]:02X}"],
    }
    text = json.dumps(ident, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def optimum_moved_fraction(before: Mapping[str, int], weights: Mapping[str, float]) -> float:
    """Least fraction of keys that must move to reach the target weights exactly."""
    total = sum(before.values())
    if total == 0:
        return 0.0
    wsum = sum(weights.values())
    excess = 0.0
    for s in set(before) | set(weights):
        ideal = total * weights.get(s, 0.0) / wsum
        excess += max(0.0, before.get(s, 0) - ideal)
    return excess / total


def reference_plan(assignments: Iterable[tuple[bytes, str]], *, ring=None, target: Mapping[bytes, str] | None = None,
                   window=None) -> list[tuple[bytes, str, str, int]]:
    """Brute-force planner (one key at a time), the oracle for the Beam planner."""
    out = []
    for key, shard in assignments:
        h = K.stable_hash(key)
        if window is not None and not (window[0] <= (h >> 56) <= window[1]):
            continue
        if target is not None:
            t = target.get(key, shard)
        else:
            t = ring.assign_one(key)
        if t != shard:
            out.append((key, shard, t, h))
    out.sort(key=lambda m: (m[1].encode(), m[2].encode(), m[3], m[0]))
    return out
