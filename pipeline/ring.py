"""Consistent-hash rings: an immutable value that maps keys to shards.

Pure Python + numpy; never imports Beam (``transforms/`` wraps it).

A :class:`Ring` is built once from ``(profile, shards, weights, virtual
nodes, key type)`` and is a pure function of them: building twice gives the
same points, and :meth:`Ring.assign` maps a batch of keys to shard indexes
with numpy.  Three profiles:

``native`` (the default)
    Points are xxh3-64 of the UTF-8 label ``f"{shard_id}#{i}"`` for
    ``i in range(max(1, round_half_up(virtual_nodes * weight)))``.  A key goes
    to the first point ``>=`` its stable hash (xxh3-64 of the canonical key
    bytes, see :mod:`pipeline.keys`), wrapping to the first point.  Equal
    points (a 64-bit collision) are ordered by shard id bytes, then label
    index, so the ring does not depend on the order shards are listed in.
    Only the stable hashes are needed to place keys; lookup is a table on the
    top bits of the hash plus a short vectorised scan.

``shardis``
    Compatible with the C# Shardis ``ConsistentHashShardRouter``: points are
    the first 4 bytes, little-endian, of SHA-256 of the UTF-8 label
    ``f"{shard_id}-replica-{i}"``, 100 per shard by default (times the weight;
    Shardis itself has no weights, weight 1 is exactly Shardis).  A point that
    collides with one already placed is moved to the next free uint32 (linear
    probing, shards in configuration order, as current Shardis does).  Key
    hash: the same SHA-256 prefix of the key's Shardis bytes (string: UTF-8;
    int64: 8 bytes little-endian; uuid: .NET ``Guid.ToByteArray()`` order,
    i.e. ``uuid.bytes_le``; bytes: as is).  First point ``>=`` the key hash,
    wrapping.

``ketama``
    Agrees key for key with ``uhashring.HashRing(nodes, hash_fn="ketama")``
    (uhashring 2.3 to 2.5; ``virtual_nodes`` is its ``vnodes``, default 40).
    Shard ``s`` gets ``floor(vnodes * len(shards) * weight(s) / sum(weights))``
    labels ``f"{s}-{j}"`` (exact rational arithmetic; uhashring accepts only
    integer weights) -- a light shard can get no points at all, as in
    uhashring.  Each label gives 4 points: the 4 little-endian uint32 words of
    its MD5.  A point shared by two shards belongs to the one listed last.  Key
    hash: the first little-endian uint32 of MD5 of the key's text form (string:
    its UTF-8 bytes; int64: decimal; uuid: lowercase hyphenated; bytes:
    lowercase hex -- so int and UUID keys also match uhashring given Python
    ``int`` / ``uuid.UUID`` keys).  A key goes to the first point strictly
    ``>`` its hash (uhashring uses ``bisect_right``), wrapping.
"""
from __future__ import annotations

import hashlib
import math
import threading
import types
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import xxhash

from pipeline.keys import InvalidKeyError, KeyType

__all__ = [
    "DEFAULT_VIRTUAL_NODES",
    "DEFAULT_VIRTUAL_NODES_BY_PROFILE",
    "MAX_RING_POINTS",
    "PROFILES",
    "RING_FORMAT",
    "Ring",
]

#: Native points per weight unit, chosen by measurement with 1M keys b"key-%d"
#: (tests/test_ring.py::test_native_placement_figures): 16 equal shards load
#: max/mean 1.027, and adding one shard to N (N = 2..64) moves at worst 2.7% off
#: 1/(N+1) for labels s0, s1, ...; over 8 labellings the worst is 3.8% and
#: 1.027.  At 2000 the same figures reach 7.0% and 1.067 (the 5% bound fails).
#: Build: ~0.2 s for 65 shards (650k points).
DEFAULT_VIRTUAL_NODES = 10_000

PROFILES = ("native", "shardis", "ketama")

DEFAULT_VIRTUAL_NODES_BY_PROFILE: Mapping[str, int] = types.MappingProxyType(
    {"native": DEFAULT_VIRTUAL_NODES, "shardis": 100, "ketama": 40}
)

#: Upper bound on the number of points of one ring (memory guard).
MAX_RING_POINTS = 1 << 25

#: Version of the ring algorithms, part of :meth:`Ring.canonical`.
RING_FORMAT = "shardmove-ring/1"

_KETAMA_REPLICAS = 4  # uhashring KetamaRing(replicas=4): 4 points per label
_U32 = 0xFFFFFFFF


# ----------------------------------------------------------------- key hashes

def _key_list(keys) -> list[bytes]:
    """Canonical key bytes as a list (from a pyarrow array or a sequence)."""
    if isinstance(keys, pa.ChunkedArray):
        keys = keys.combine_chunks()
    if isinstance(keys, pa.Array):
        if keys.null_count:
            raise InvalidKeyError(f"ring assign: {keys.null_count} null keys")
        if pa.types.is_string(keys.type) or pa.types.is_large_string(keys.type):
            keys = keys.cast(pa.binary())
        out = keys.to_pylist()
    else:
        out = keys if isinstance(keys, list) else list(keys)
    for k in out:
        if not isinstance(k, (bytes, bytearray, memoryview)):
            raise InvalidKeyError(f"ring assign: keys must be canonical bytes (got a {type(k).__name__})")
    return out


def _check_len(keys: list[bytes], want: int, kt: KeyType) -> None:
    bad = sum(1 for k in keys if len(k) != want)
    if bad:
        raise InvalidKeyError(f"ring assign: {bad} {kt.value} keys are not {want} bytes")


def _uuid_bytes_le(k: bytes) -> bytes:
    return k[3::-1] + k[5:3:-1] + k[7:5:-1] + k[8:]


def _shardis_bytes(keys: list[bytes], kt: KeyType) -> Iterable[bytes]:
    if kt is KeyType.INT64:  # canonical is big-endian; Shardis hashes BitConverter (little-endian) bytes
        _check_len(keys, 8, kt)
        return [k[::-1] for k in keys]
    if kt is KeyType.UUID:  # .NET Guid.ToByteArray() order
        _check_len(keys, 16, kt)
        return [_uuid_bytes_le(k) for k in keys]
    return keys


def _ketama_text(k: bytes, kt: KeyType) -> bytes:
    if kt is KeyType.INT64:
        return b"%d" % int.from_bytes(k, "big", signed=True)
    if kt is KeyType.UUID:
        h = k.hex()
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}".encode()
    return k.hex().encode()


def _ketama_bytes(keys: list[bytes], kt: KeyType) -> Iterable[bytes]:
    if kt is KeyType.STRING:
        return keys
    if kt in (KeyType.INT64, KeyType.UUID):
        _check_len(keys, 8 if kt is KeyType.INT64 else 16, kt)
    return [_ketama_text(k, kt) for k in keys]


def _sha256_u32(data: Iterable[bytes]) -> np.ndarray:
    """First 4 bytes (little-endian uint32) of SHA-256 of each item."""
    sha = hashlib.sha256
    buf = b"".join([sha(d).digest() for d in data])
    return np.frombuffer(buf, dtype="<u4")[::8].astype(np.uint32)


def _md5_u32(data: Iterable[bytes]) -> np.ndarray:
    """First little-endian uint32 of MD5 of each item (ketama's key hash)."""
    md5 = hashlib.md5
    buf = b"".join([md5(d).digest() for d in data])
    return np.frombuffer(buf, dtype="<u4")[::4].astype(np.uint32)


def _as_hashes(hashes, n: int | None) -> np.ndarray:
    if isinstance(hashes, pa.ChunkedArray):
        hashes = hashes.combine_chunks()
    if isinstance(hashes, pa.Array):
        hashes = hashes.to_numpy(zero_copy_only=False)
    arr = np.asarray(hashes)
    if arr.dtype != np.uint64:
        if arr.size and arr.dtype.kind not in "ui":
            raise TypeError(f"ring assign: hashes must be uint64 stable hashes (got dtype {arr.dtype})")
        arr = np.asarray(hashes, dtype=np.uint64) if arr.dtype.kind != "i" else arr.astype(np.uint64)
    arr = arr.reshape(-1)
    if n is not None and len(arr) != n:
        raise ValueError(f"ring assign: {n} keys but {len(arr)} hashes")
    return arr


# --------------------------------------------------------------- validation

def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def _validate(profile, shard_ids, weights, virtual_nodes, key_type):
    if not isinstance(profile, str) or profile not in PROFILES:
        raise ValueError(f"ring profile must be one of {', '.join(PROFILES)} (got {profile!r})")
    try:
        kt = KeyType(key_type)
    except ValueError:
        raise ValueError(f"ring key_type must be one of string, int64, uuid, bytes (got {key_type!r})") from None
    if len(shard_ids) == 0:
        raise ValueError("ring shards must not be empty (got 0 shards)")
    if len(weights) != len(shard_ids):
        raise ValueError(f"ring weights: {len(weights)} weights for {len(shard_ids)} shards")
    seen = set()
    ids = []
    for i, sid in enumerate(shard_ids):
        if not isinstance(sid, str) or not sid:
            raise ValueError(f"ring shards[{i}] id must be a non-empty string (got {sid!r})")
        try:
            sid.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"ring shards[{i}] id must be valid UTF-8 (got {sid!r})") from None
        if sid in seen:
            raise ValueError(f"ring shards[{i}] duplicate shard id {sid!r}")
        seen.add(sid)
        ids.append(sid)
    ws = []
    for sid, w in zip(ids, weights):
        ok = isinstance(w, (int, float)) and not isinstance(w, bool)
        if ok:
            w = float(w)
            ok = math.isfinite(w) and w > 0
        if not ok:
            raise ValueError(f"ring weight of shard {sid!r} must be a finite number > 0 (got {w!r})")
        ws.append(w)
    if isinstance(virtual_nodes, bool) or not isinstance(virtual_nodes, (int, np.integer)) or virtual_nodes < 1:
        raise ValueError(f"ring virtual_nodes must be an integer >= 1 (got {virtual_nodes!r})")
    return kt, tuple(ids), tuple(ws), int(virtual_nodes)


def _too_many(total: int) -> None:
    if total > MAX_RING_POINTS:
        raise ValueError(
            f"ring virtual_nodes x weights gives {total} points (max {MAX_RING_POINTS}); lower them"
        )


# --------------------------------------------------------------- ring builds

def _build_native(ids, ws, vn):
    counts = [max(1, _round_half_up(vn * w)) for w in ws]
    total = sum(counts)
    _too_many(total)
    digits = [b"%d" % i for i in range(max(counts))]
    h = xxhash.xxh3_64_intdigest
    # laid out in shard-id byte order, so a stable sort breaks ties by (shard id, label index)
    order = sorted(range(len(ids)), key=lambda j: ids[j].encode("utf-8"))
    pts = np.empty(total, dtype=np.uint64)
    own = np.empty(total, dtype=np.int32)
    at = 0
    for j in order:
        prefix = ids[j].encode("utf-8") + b"#"
        n = counts[j]
        pts[at:at + n] = [h(prefix + d) for d in digits[:n]]
        own[at:at + n] = j
        at += n
    srt = np.argsort(pts)
    sp = pts[srt]
    if np.any(sp[1:] == sp[:-1]):  # a 64-bit collision: redo with the deterministic tie-break
        srt = np.argsort(pts, kind="stable")
        sp = pts[srt]
    return sp, own[srt], False


def _build_shardis(ids, ws, vn):
    counts = [max(1, _round_half_up(vn * w)) for w in ws]
    _too_many(sum(counts))
    labels = [f"{sid}-replica-{i}".encode("utf-8") for sid, n in zip(ids, counts) for i in range(n)]
    pts = _sha256_u32(labels)
    own = np.repeat(np.arange(len(ids), dtype=np.int32), counts)
    probed = len(np.unique(pts)) != len(pts)
    if probed:
        # Shardis: a colliding point takes the next free uint32, in insertion order.
        taken: set[int] = set()
        out = pts.tolist()
        for i, p in enumerate(out):
            while p in taken:
                p = (p + 1) & _U32
            taken.add(p)
            out[i] = p
        pts = np.asarray(out, dtype=np.uint32)
    srt = np.argsort(pts, kind="stable")
    return pts[srt], own[srt], probed


def _build_ketama(ids, ws, vn):
    n = len(ids)
    fw = [Fraction(w) for w in ws]
    total_w = sum(fw)
    ks = [math.floor(Fraction(vn * n) * w / total_w) for w in fw]
    _too_many(sum(ks) * _KETAMA_REPLICAS)
    labels = [f"{sid}-{j}".encode("utf-8") for sid, k in zip(ids, ks) for j in range(k)]
    md5 = hashlib.md5
    pts = np.frombuffer(b"".join([md5(b).digest() for b in labels]), dtype="<u4").astype(np.uint32)
    own = np.repeat(np.arange(n, dtype=np.int32), [k * _KETAMA_REPLICAS for k in ks])
    srt = np.argsort(pts, kind="stable")
    pts, own = pts[srt], own[srt]
    # uhashring keeps one owner per point value: the last written (last in configuration order).
    last = np.ones(len(pts), dtype=bool)
    last[:-1] = pts[1:] != pts[:-1]
    shared = _owners_differ(pts, own)
    return pts[last], own[last], shared


def _owners_differ(pts: np.ndarray, own: np.ndarray) -> bool:
    """True if some point value is held by two different shards."""
    same_val = pts[1:] == pts[:-1]
    return bool(np.any(same_val & (own[1:] != own[:-1])))


def _lut_bits(n_points: int) -> int:
    # about 2 buckets per point, within [2^8, 2^21] entries
    return int(min(21, max(8, math.ceil(math.log2(max(n_points, 1))) + 1)))


#: Rings built lately, by their defining fields: a plan builds its ring in the launcher
#: and again where its planning DoFn is unpickled (the points are not pickled), in the
#: same process on the in-memory engine; ~60 ms for 17 shards.  A few entries: a native
#: ring of 65 shards holds ~8 MB of points.
_BUILT: dict = {}
_BUILT_MAX = 4
_BUILT_LOCK = threading.Lock()


#: Bits of a native ring's owner table (:func:`_owner_table`): its bucket count is 8 times
#: the LUT's, at most 2^22 entries (4 MB of int8 for rings of up to 127 shards).
_TABLE_EXTRA_BITS = 3
_TABLE_MAX_BITS = 22


def _owner_table(pts: np.ndarray, own: np.ndarray, lut_bits: int, n_shards: int):
    """``(table, shift)``: ``table[h >> shift]`` is the owner of every hash of that bucket
    when one shard owns them all, else -1.  The owner of ``h`` is that of the first point
    >= ``h`` (wrapping to point 0): for a hash of bucket ``t`` it is one of the points in
    the bucket or the first point after it, so when those candidates share one owner
    (most buckets, ~96%) the bucket's owner needs no search."""
    bits = int(min(_TABLE_MAX_BITS, lut_bits + _TABLE_EXTRA_BITS))
    shift = 64 - bits
    per = np.bincount((pts >> np.uint64(shift)).astype(np.intp), minlength=1 << bits)
    first = np.zeros((1 << bits) + 1, np.int64)  # first[t] = index of the first point >= t << shift
    np.cumsum(per, out=first[1:])
    own_w = np.append(own, own[:1])  # index len(pts) wraps to point 0
    changes = np.zeros(len(own_w), np.int64)  # owner changes among points 0..i
    np.cumsum(own_w[1:] != own_w[:-1], out=changes[1:])
    # candidates of bucket t: points first[t] .. first[t + 1] (inclusive)
    uniform = changes[first[1:]] == changes[first[:-1]]
    dtype = np.int8 if n_shards < 2**7 else np.int16 if n_shards < 2**15 else np.int32
    table = np.where(uniform, own_w[first[:-1]], -1).astype(dtype)
    table.setflags(write=False)
    return table, shift


def _build(profile: str, ids, ws, vn):
    """``(points, owners, order_matters, lut, lut_shift, owner table, table shift)``, read-only arrays."""
    builder = {"native": _build_native, "shardis": _build_shardis, "ketama": _build_ketama}[profile]
    pts, own, order_matters = builder(ids, ws, vn)
    pts.setflags(write=False)
    own.setflags(write=False)
    lut, shift, table, tshift = None, 0, None, 0
    if profile == "native":
        bits = _lut_bits(len(pts))
        shift = 64 - bits
        # lut[t] = index of the first point >= t << shift = number of points in buckets < t
        per_bucket = np.bincount((pts >> np.uint64(shift)).astype(np.intp), minlength=1 << bits)
        lut = np.zeros((1 << bits) + 1, dtype=np.int32 if len(pts) < 2**31 else np.int64)
        np.cumsum(per_bucket, out=lut[1:])
        lut.setflags(write=False)
        if len(pts):
            table, tshift = _owner_table(pts, own, bits, len(ids))
    return pts, own, order_matters, lut, shift, table, tshift


def _built(profile: str, ids, ws, vn):
    """:func:`_build`, shared by rings of the same (validated) fields: the arrays are
    read-only, so rings may share them.  The key type plays no part in the points."""
    key = (profile, ids, ws, vn)
    with _BUILT_LOCK:
        hit = _BUILT.get(key)
    if hit is not None:
        return hit
    out = _build(profile, ids, ws, vn)
    with _BUILT_LOCK:
        if len(_BUILT) >= _BUILT_MAX:
            _BUILT.pop(next(iter(_BUILT)))
        _BUILT[key] = out
    return out


# ---------------------------------------------------------------------- Ring

@dataclass(frozen=True)
class Ring:
    """An immutable consistent-hash ring (see the module docstring).

    Build it with :meth:`build`.  Equality and hashing use the public fields,
    which determine the points.  Pickling carries only the public fields; the
    points are rebuilt on unpickling (a native ring of 65 shards holds ~8 MB
    of points, too much to ship inside a pipeline graph).
    """

    profile: str
    shard_ids: tuple[str, ...]
    weights: tuple[float, ...]
    virtual_nodes: int
    key_type: KeyType = KeyType.STRING
    _points: np.ndarray = field(init=False, repr=False, compare=False)
    _owners: np.ndarray = field(init=False, repr=False, compare=False)
    _lut: np.ndarray | None = field(init=False, repr=False, compare=False)
    _lut_shift: int = field(init=False, repr=False, compare=False)
    _table: np.ndarray | None = field(init=False, repr=False, compare=False)
    _table_shift: int = field(init=False, repr=False, compare=False)
    _order_matters: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        kt, ids, ws, vn = _validate(
            self.profile, tuple(self.shard_ids), tuple(self.weights), self.virtual_nodes, self.key_type
        )
        s = object.__setattr__
        s(self, "key_type", kt)
        s(self, "shard_ids", ids)
        s(self, "weights", ws)
        s(self, "virtual_nodes", vn)
        pts, own, order_matters, lut, shift, table, tshift = _built(self.profile, ids, ws, vn)
        s(self, "_points", pts)
        s(self, "_owners", own)
        s(self, "_order_matters", order_matters)
        s(self, "_lut", lut)
        s(self, "_lut_shift", shift)
        s(self, "_table", table)
        s(self, "_table_shift", tshift)

    def __reduce__(self):
        return (Ring, (self.profile, self.shard_ids, self.weights, self.virtual_nodes, self.key_type.value))

    # ------------------------------------------------------------ construction
    @classmethod
    def build(
        cls,
        profile: str,
        shards: Sequence[tuple[str, float]] | Mapping[str, float],
        virtual_nodes: int | None = None,
        key_type: KeyType | str = KeyType.STRING,
    ) -> "Ring":
        """Build a ring; ``virtual_nodes=None`` takes the profile's default
        (native :data:`DEFAULT_VIRTUAL_NODES`, shardis 100, ketama 40).

        Raises ValueError with a one-line message naming the bad field.
        """
        if not isinstance(profile, str) or profile not in PROFILES:
            raise ValueError(f"ring profile must be one of {', '.join(PROFILES)} (got {profile!r})")
        if isinstance(shards, Mapping):
            shards = list(shards.items())
        ids, ws = [], []
        for i, entry in enumerate(shards):
            if isinstance(entry, (str, bytes)) or not isinstance(entry, Sequence) or len(entry) != 2:
                raise ValueError(f"ring shards[{i}] must be an (id, weight) pair (got {entry!r})")
            ids.append(entry[0])
            ws.append(entry[1])
        if virtual_nodes is None:
            virtual_nodes = DEFAULT_VIRTUAL_NODES_BY_PROFILE[profile]
        return cls(profile, tuple(ids), tuple(ws), virtual_nodes, key_type)

    # ---------------------------------------------------------------- lookups
    @property
    def point_count(self) -> int:
        """Number of distinct points on the ring."""
        return len(self._points)

    def key_hashes(self, keys) -> np.ndarray:
        """The profile's own hash of each key (uint64 for native, uint32 otherwise)."""
        kl = _key_list(keys)
        if self.profile == "native":
            return np.fromiter(map(xxhash.xxh3_64_intdigest, kl), dtype=np.uint64, count=len(kl))
        if self.profile == "shardis":
            return _sha256_u32(_shardis_bytes(kl, self.key_type))
        return _md5_u32(_ketama_bytes(kl, self.key_type))

    def assign(self, keys, hashes: np.ndarray | None = None) -> np.ndarray:
        """Owner of each key, as int32 indexes into :attr:`shard_ids`.

        ``keys``: a pyarrow binary array or a sequence of canonical key bytes;
        ``hashes``: their stable hashes (uint64 xxh3-64), as computed by
        :func:`pipeline.keys.stable_hashes`.  The native profile uses only
        ``hashes`` (``keys`` may then be None; without hashes they are
        computed from ``keys``).  shardis and ketama hash the key bytes
        themselves (``hashes`` is then only checked for length).
        """
        if self.profile == "native":
            if hashes is None:
                if keys is None:
                    raise ValueError("ring assign: need keys or hashes")
                return self._lookup_native(self.key_hashes(keys))
            n = None if keys is None else len(keys)
            return self._lookup_native(_as_hashes(hashes, n))
        if keys is None:
            raise ValueError(f"ring assign: the {self.profile} profile needs the key bytes")
        kh = self.key_hashes(keys)
        if hashes is not None:
            _as_hashes(hashes, len(kh))
        return self._lookup_u32(kh)

    def assign_one(self, key: bytes) -> str:
        """Shard id of one key given as canonical bytes."""
        if self.profile == "native":
            h = np.array([xxhash.xxh3_64_intdigest(key)], dtype=np.uint64)
            return self.shard_ids[int(self._lookup_native(h)[0])]
        return self.shard_ids[int(self._lookup_u32(self.key_hashes([key]))[0])]

    def _lookup_native(self, h: np.ndarray) -> np.ndarray:
        """Owner of each hash: the shard of the first point >= it (wrapping).  Most hashes
        take their bucket's owner from the owner table (one gather); the others
        (buckets where the owner changes) search the points, :meth:`_search_native`."""
        if len(h) == 0 or self._table is None:
            return self._search_native(h)
        out = self._table[(h >> np.uint64(self._table_shift)).astype(np.intp)].astype(np.int32)
        rest = np.flatnonzero(out < 0)
        if len(rest):
            out[rest] = self._search_native(h[rest])
        return out

    def _search_native(self, h: np.ndarray) -> np.ndarray:
        pts, lut = self._points, self._lut
        if len(h) == 0:
            return np.empty(0, dtype=np.int32)
        t = (h >> np.uint64(self._lut_shift)).astype(np.intp)
        idx = lut[t].astype(np.intp)
        hi = lut[t + 1]
        # the first point >= h lies in [lut[t], lut[t+1]]; step over the bucket's points below h
        act = np.flatnonzero(idx < hi)
        while act.size:
            below = pts[idx[act]] < h[act]
            act = act[below]
            idx[act] += 1
            act = act[idx[act] < hi[act]]
        idx[idx == len(pts)] = 0
        return self._owners[idx]

    def _lookup_u32(self, kh: np.ndarray) -> np.ndarray:
        # shardis: first point >= hash (Array.BinarySearch); ketama: first point > hash (bisect_right)
        side = "left" if self.profile == "shardis" else "right"
        idx = np.searchsorted(self._points, kh.astype(np.uint32, copy=False), side=side)
        idx[idx == len(self._points)] = 0
        return self._owners[idx]

    # ---------------------------------------------------------------- identity
    def canonical(self) -> dict[str, Any]:
        """JSON-able, deterministic description of the ring, for the plan id.

        Two rings with the same description assign every key alike.  Shards
        are listed by shard id bytes, except when the profile's collision rule
        made configuration order matter for this ring (shardis probing,
        ketama shared points) -- then in configuration order, and ``order``
        says so.
        """
        pairs = list(zip(self.shard_ids, self.weights))
        if not self._order_matters:
            pairs.sort(key=lambda p: p[0].encode("utf-8"))
        return {
            "format": RING_FORMAT,
            "profile": self.profile,
            "key_type": self.key_type.value,
            "virtual_nodes": self.virtual_nodes,
            "order": "configuration" if self._order_matters else "shard_id",
            "shards": [{"id": sid, "weight": w} for sid, w in pairs],
        }
