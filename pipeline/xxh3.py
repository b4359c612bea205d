"""xxh3-64 (seed 0, default secret) of every value of an Arrow binary array, in numpy.

The planner hashes every key of a snapshot.  ``xxhash.xxh3_64_intdigest`` over
``to_pylist()`` builds one Python ``bytes`` and one ``int`` per key and holds the
GIL throughout (about 110 ns a key); here the key bytes are read straight from
the array's data buffer and the hash is computed with whole-array numpy
operations, which release the GIL, so two planning threads overlap.  The
result is bit for bit the reference algorithm's (xxHash 0.8, ``XXH3_64bits``):
keys of 0-240 bytes are computed here, longer ones (rare) fall back to the
``xxhash`` package per key.  ``tests/test_keys.py`` checks every length 0-300
against ``xxhash``.

Pure numpy/pyarrow; never imports Beam.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import xxhash

__all__ = ["xxh3_64_array"]

_SECRET = bytes.fromhex(
    "b8fe6c3923a44bbe7c01812cf721ad1cded46de9839097db7240a4a4b7b3671f"
    "cb79e64eccc0e578825ad07dccff7221b8084674f743248ee03590e6813a264c"
    "3c2852bb91c300cb88d0658b1b532ea371644897a20df94e3819ef46a9deacd8"
    "a8fa763fe39c343ff9dcbbc7c70b4f1d8a51e04bcdb45931c89f7ec9d9787364"
    "eac5ac8334d3ebc3c581a0fffa1363eb170ddd51b7f0da49d316552629d4689e"
    "2b16be587d47a1fc8ff8b8d17ad031ce45cb3a8f95160428afd7fbcabb4b407e"
)

_U = np.uint64
_M32 = _U(0xFFFFFFFF)
_P32_1 = _U(0x9E3779B1)
_P64_1 = _U(0x9E3779B185EBCA87)
_P64_2 = _U(0xC2B2AE3D27D4EB4F)
_P64_3 = _U(0x165667B19E3779F9)
_MX1 = _U(0x165667919E3779F9)
_MX2 = _U(0x9FB21C651E98DF25)
#: the longest key hashed here (XXH3_MIDSIZE_MAX); longer ones go to xxhash
MIDSIZE_MAX = 240


def _s64(off: int) -> np.uint64:
    return _U(int.from_bytes(_SECRET[off:off + 8], "little"))


def _s32(off: int) -> int:
    return int.from_bytes(_SECRET[off:off + 4], "little")


def _mul_fold(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Low 64 bits xor high 64 bits of the 128-bit products ``a * b``, computed in place:
    both arguments are overwritten (pass copies of arrays still needed)."""
    a_hi = a >> _U(32)
    a &= _M32  # a_lo
    b_hi = b >> _U(32)
    b &= _M32  # b_lo
    ll = a * b
    b *= a_hi  # hl
    a *= b_hi  # lh
    a_hi *= b_hi  # hh
    cross = ll >> _U(32)
    np.bitwise_and(b, _M32, out=b_hi)
    cross += b_hi
    cross += a
    b >>= _U(32)
    b += a_hi
    np.right_shift(cross, _U(32), out=a_hi)
    b += a_hi  # upper
    cross <<= _U(32)
    ll &= _M32
    cross |= ll  # lower
    cross ^= b
    return cross


def _avalanche(h: np.ndarray) -> np.ndarray:  # XXH3_avalanche, in place
    h ^= h >> _U(37)
    h *= _MX1
    h ^= h >> _U(32)
    return h


def _xxh64_avalanche(h: np.ndarray) -> np.ndarray:  # XXH64_avalanche, in place
    h ^= h >> _U(33)
    h *= _P64_2
    h ^= h >> _U(29)
    h *= _P64_3
    h ^= h >> _U(32)
    return h


def _rotl(x: np.ndarray, r: int) -> np.ndarray:
    return (x << _U(r)) | (x >> _U(64 - r))


class _Strided:
    """Reads of rows that all have one length ``L`` (back to back in the buffer): the
    word at byte ``k`` of every row is a strided view, copied once (no gather)."""

    def __init__(self, data: np.ndarray, n: int, length: int):
        self.data, self.n, self.length = data, n, length

    def r64(self, k: int) -> np.ndarray:
        return np.ndarray((self.n,), dtype="<u8", buffer=self.data, offset=k,
                          strides=(self.length,)).astype(np.uint64)

    def r32(self, k: int) -> np.ndarray:
        return np.ndarray((self.n,), dtype="<u4", buffer=self.data, offset=k,
                          strides=(self.length,)).astype(np.uint64)

    def r8(self, k: int) -> np.ndarray:
        return np.ndarray((self.n,), dtype=np.uint8, buffer=self.data, offset=k,
                          strides=(self.length,)).astype(np.uint64)


class _Gather:
    """Reads at ``starts + rel`` (``rel`` a scalar or one offset per row) from the padded
    buffer viewed as aligned words: two aligned gathers and shifts per unaligned read."""

    def __init__(self, words: np.ndarray, starts: np.ndarray):
        self.words, self.starts = words, starts

    def sub(self, sel: np.ndarray) -> "_Gather":
        return _Gather(self.words, self.starts[sel])

    def r64(self, rel) -> np.ndarray:
        p = self.starts + rel
        q = p >> 3
        sh = ((p & 7) << 3).astype(np.uint64)
        w0 = self.words[q]
        w0 >>= sh
        w1 = self.words[q + 1]
        sh ^= _U(63)  # 63 - sh, then one more: a shift by 64 would not give 0
        w1 <<= sh
        w1 <<= _U(1)
        w0 |= w1
        return w0

    def r32(self, rel) -> np.ndarray:
        return self.r64(rel) & _M32

    def r8(self, rel) -> np.ndarray:
        return self.r64(rel) & _U(0xFF)


def _mix16(rd, rel, soff: int) -> np.ndarray:
    lo = rd.r64(rel)
    lo ^= _s64(soff)
    hi = rd.r64(rel + 8)
    hi ^= _s64(soff + 8)
    return _mul_fold(lo, hi)  # lo, hi: fresh reads, not needed after


# each: (reader of the rows, their length: an int when uniform, else an int64 array) -> hashes

def _len_1to3(rd, ln):
    combined = rd.r8(0) << _U(16)
    combined |= rd.r8(ln >> 1) << _U(24)
    combined |= rd.r8(ln - 1)
    combined |= _U(ln) << _U(8) if isinstance(ln, int) else ln.astype(np.uint64) << _U(8)
    combined ^= _U(_s32(0) ^ _s32(4))
    return _xxh64_avalanche(combined)


def _len_4to8(rd, ln):
    keyed = rd.r32(0) << _U(32)
    keyed += rd.r32(ln - 4)
    keyed ^= _s64(8) ^ _s64(16)
    keyed ^= _rotl(keyed, 49) ^ _rotl(keyed, 24)
    keyed *= _MX2
    keyed ^= (keyed >> _U(35)) + (_U(ln) if isinstance(ln, int) else ln.astype(np.uint64))
    keyed *= _MX2
    keyed ^= keyed >> _U(28)
    return keyed


def _len_9to16(rd, ln):
    lo = rd.r64(0)
    lo ^= _s64(24) ^ _s64(32)
    hi = rd.r64(ln - 8)
    hi ^= _s64(40) ^ _s64(48)
    acc = _mul_fold(lo.copy(), hi.copy())  # lo and hi are added below
    acc += _U(ln) if isinstance(ln, int) else ln.astype(np.uint64)
    acc += lo.byteswap()
    acc += hi
    return _avalanche(acc)


def _len_17to128(rd, ln):
    acc = _mix16(rd, 0, 0)
    acc += _mix16(rd, ln - 16, 16)
    for lim, k in ((32, 1), (64, 2), (96, 3)):
        if isinstance(ln, int):
            if ln <= lim:
                break
            acc += _mix16(rd, 16 * k, 32 * k)
            acc += _mix16(rd, ln - 16 * (k + 1), 32 * k + 16)
            continue
        sel = np.flatnonzero(ln > lim)
        if not len(sel):
            break
        sub, sl = rd.sub(sel), ln[sel]
        acc[sel] += _mix16(sub, 16 * k, 32 * k) + _mix16(sub, sl - 16 * (k + 1), 32 * k + 16)
    acc += (_U(ln) if isinstance(ln, int) else ln.astype(np.uint64)) * _P64_1
    return _avalanche(acc)


def _len_129to240(rd, ln):
    acc = _mix16(rd, 0, 0)
    for i in range(1, 8):
        acc += _mix16(rd, 16 * i, 16 * i)
    acc += (_U(ln) if isinstance(ln, int) else ln.astype(np.uint64)) * _P64_1
    acc = _avalanche(acc)
    acc += _mix16(rd, ln - 16, 136 - 17)
    for i in range(8, MIDSIZE_MAX // 16):
        if isinstance(ln, int):
            if ln // 16 <= i:
                break
            acc += _mix16(rd, 16 * i, 16 * (i - 8) + 3)
            continue
        sel = np.flatnonzero(ln // 16 > i)
        if not len(sel):
            break
        acc[sel] += _mix16(rd.sub(sel), 16 * i, 16 * (i - 8) + 3)
    return _avalanche(acc)


_EMPTY = _U(xxhash.xxh3_64_intdigest(b""))
_CLASSES = ((1, 3, _len_1to3), (4, 8, _len_4to8), (9, 16, _len_9to16), (17, 128, _len_17to128),
            (129, MIDSIZE_MAX, _len_129to240))


def xxh3_64_array(arr) -> np.ndarray:
    """``xxhash.xxh3_64_intdigest`` of every value of ``arr`` (binary, string or their
    large variants, or a chunked array of them; no nulls) as a uint64 array."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    n = len(arr)
    out = np.empty(n, dtype=np.uint64)
    if n == 0:
        return out
    if arr.null_count:
        raise ValueError("xxh3_64_array: null values")
    t = arr.type
    if pa.types.is_large_binary(t) or pa.types.is_large_string(t):
        otype = np.int64
    elif pa.types.is_binary(t) or pa.types.is_string(t):
        otype = np.int32
    else:
        raise TypeError(f"xxh3_64_array: not a binary array ({t})")
    _validity, obuf, dbuf = arr.buffers()
    offsets = np.frombuffer(obuf, dtype=otype, count=n + 1, offset=arr.offset * np.dtype(otype).itemsize)
    lo, hi = int(offsets[0]), int(offsets[-1])
    # the values' bytes, copied once into an 8-byte aligned buffer padded for 8-byte reads
    words = np.zeros((hi - lo) // 8 + 3, dtype=np.uint64)
    data = words.view(np.uint8)
    if hi > lo:
        data[:hi - lo] = np.frombuffer(dbuf, dtype=np.uint8, count=hi - lo, offset=lo)
    lens = np.diff(offsets)
    first, last = int(lens.min()), int(lens.max())
    with np.errstate(over="ignore"):
        if first == last:  # the usual case: one key length, rows back to back
            if first == 0:
                out[:] = _EMPTY
            elif first > MIDSIZE_MAX:
                out[:] = _fallback(arr, np.arange(n))
            else:
                out[:] = _class_of(first)(_Strided(data, n, first), first)
            return out
        lens = lens.astype(np.int64)
        starts = offsets[:-1].astype(np.int64)
        starts -= lo
        rd = _Gather(words, starts)
        for a, b, fn in _CLASSES:
            if last < a or first > b:
                continue
            sel = np.flatnonzero((lens >= a) & (lens <= b))
            if len(sel):
                out[sel] = fn(rd.sub(sel), lens[sel])
        out[lens == 0] = _EMPTY
        longer = np.flatnonzero(lens > MIDSIZE_MAX)
        if len(longer):
            out[longer] = _fallback(arr, longer)
    return out


def _class_of(length: int):
    for a, b, fn in _CLASSES:
        if a <= length <= b:
            return fn
    raise ValueError(length)


def _fallback(arr, rows: np.ndarray) -> np.ndarray:
    vals = arr.take(pa.array(rows)).cast(pa.large_binary()).to_pylist()
    return np.fromiter(map(xxhash.xxh3_64_intdigest, vals), dtype=np.uint64, count=len(vals))
