"""Keys: canonical bytes, text forms and the stable key hash (CONTRACTS "Keys").

Pure Python + numpy/pyarrow; never imports Beam.

* ``string`` -> UTF-8 bytes; text as is.
* ``int64``  -> 8 bytes big-endian two's complement; text is the decimal form.
* ``uuid``   -> the 16 RFC 4122 bytes; text is lowercase hyphenated.
* ``bytes``  -> the bytes themselves; text is lowercase hex.

The stable key hash is xxh3-64 of the canonical bytes as an unsigned 64-bit
integer.  A key is only ever shown as the first 12 hex digits of that hash.
"""
from __future__ import annotations

import enum
import re
import struct
import uuid
from typing import Callable, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import xxhash

from pipeline.xxh3 import xxh3_64_array

__all__ = [
    "KeyType",
    "KeyError_",
    "InvalidKeyError",
    "canonical_bytes",
    "from_canonical",
    "text_form",
    "parse_text",
    "stable_hash",
    "stable_hashes",
    "stable_hashes_array",
    "short_hash",
    "short_hash_of_key",
    "canonical_array",
    "text_array",
    "text_forms",
    "parse_text_strict",
    "canonical_from_texts",
    "MAX_KEY_BYTES",
]

#: Longest canonical key accepted, in bytes.  Keys longer than this are
#: rejected at plan time (stores index keys; 4 KiB keeps every store happy).
MAX_KEY_BYTES = 4096

_INT64 = struct.Struct(">q")
_HEX_RE = re.compile(r"\A(?:[0-9a-f]{2})*\Z")
_INT_RE = re.compile(r"\A-?(?:0|[1-9][0-9]{0,18})\Z")


class KeyType(str, enum.Enum):
    STRING = "string"
    INT64 = "int64"
    UUID = "uuid"
    BYTES = "bytes"

    @classmethod
    def parse(cls, value: str) -> "KeyType":
        try:
            return cls(value)
        except ValueError:
            raise InvalidKeyError(
                f"key_type must be one of string, int64, uuid, bytes (got {value!r})"
            ) from None


class InvalidKeyError(ValueError):
    """A key value that the chosen key type cannot represent (never carries the value)."""


KeyError_ = InvalidKeyError


def canonical_bytes(value, key_type: KeyType) -> bytes:
    """Canonical bytes of one key given as its text form or native Python value."""
    kt = KeyType(key_type)
    if kt is KeyType.STRING:
        if isinstance(value, bytes):
            value.decode("utf-8")  # validate
            return value
        if not isinstance(value, str):
            raise InvalidKeyError("string key is not text")
        try:
            return value.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidKeyError("string key is not valid UTF-8") from None
    if kt is KeyType.INT64:
        if isinstance(value, bool):
            raise InvalidKeyError("int64 key is a boolean")
        if isinstance(value, str):
            if not _INT_RE.match(value):
                raise InvalidKeyError("int64 key is not a decimal integer")
            value = int(value)
        if not isinstance(value, int):
            raise InvalidKeyError("int64 key is not an integer")
        try:
            return _INT64.pack(value)
        except struct.error:
            raise InvalidKeyError("int64 key out of range") from None
    if kt is KeyType.UUID:
        if isinstance(value, uuid.UUID):
            return value.bytes
        if isinstance(value, (bytes, bytearray)) and len(value) == 16:
            return bytes(value)
        if isinstance(value, str) and len(value) == 36:
            try:
                u = uuid.UUID(value)
            except ValueError:
                raise InvalidKeyError("uuid key is not a hyphenated UUID") from None
            if str(u) != value.lower():
                raise InvalidKeyError("uuid key is not a hyphenated UUID")
            return u.bytes
        raise InvalidKeyError("uuid key is not a hyphenated UUID")
    # bytes
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        low = value.lower()
        if not _HEX_RE.match(low):
            raise InvalidKeyError("bytes key is not lowercase hex")
        return bytes.fromhex(low)
    raise InvalidKeyError("bytes key is neither bytes nor hex text")


def from_canonical(data: bytes, key_type: KeyType):
    """The native Python value for canonical bytes (str, int, uuid.UUID or bytes)."""
    kt = KeyType(key_type)
    if kt is KeyType.STRING:
        return data.decode("utf-8")
    if kt is KeyType.INT64:
        if len(data) != 8:
            raise InvalidKeyError("int64 key is not 8 bytes")
        return _INT64.unpack(data)[0]
    if kt is KeyType.UUID:
        if len(data) != 16:
            raise InvalidKeyError("uuid key is not 16 bytes")
        return uuid.UUID(bytes=data)
    return bytes(data)


def text_form(data: bytes, key_type: KeyType) -> str:
    """Text form of canonical bytes, for stores that need text; InvalidKeyError if not canonical."""
    return _TEXT_OF[KeyType(key_type)](data)


def parse_text(text: str, key_type: KeyType) -> bytes:
    """Canonical bytes from a key's text form; raises InvalidKeyError."""
    return canonical_bytes(text, key_type)


def stable_hash(data: bytes) -> int:
    return xxhash.xxh3_64_intdigest(data)


def stable_hashes(keys: Iterable[bytes], count: int = -1) -> np.ndarray:
    """xxh3-64 of each canonical key, as a uint64 array (about 18M keys/s)."""
    return np.fromiter(map(xxhash.xxh3_64_intdigest, keys), dtype=np.uint64, count=count)


def stable_hashes_array(keys) -> np.ndarray:
    """:func:`stable_hashes` of a pyarrow binary array of canonical keys, computed from the
    array's buffers (:mod:`pipeline.xxh3`): no Python object per key, and numpy releases
    the GIL, so planning threads overlap.  Nulls fall back to :func:`stable_hashes`'s error."""
    if keys.null_count:
        return stable_hashes(keys.to_pylist(), len(keys))
    return xxh3_64_array(keys)


def short_hash(h: int) -> str:
    """The CONTRACTS key identifier: first 12 hex digits of the stable hash."""
    return f"{int(h):016x}"[:12]


def short_hash_of_key(data: bytes) -> str:
    return short_hash(stable_hash(data))


# ---------------------------------------------------------------- arrow forms

def canonical_array(column: pa.Array | pa.ChunkedArray, key_type: KeyType) -> tuple[pa.Array, int]:
    """Convert a key column to canonical bytes (``pa.binary()``).

    Accepts a binary column (already canonical), a string column (text form)
    or, for int64 keys, an integer column.  Returns ``(array, invalid_count)``
    where invalid entries become null; callers report the count, never values.
    """
    kt = KeyType(key_type)
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    t = column.type
    nulls = column.null_count
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
        arr = column.cast(pa.binary())
        if kt is KeyType.STRING:
            # must be valid UTF-8
            bad = 0
            vals = arr.to_pylist()
            out = []
            for v in vals:
                if v is None:
                    out.append(None)
                    continue
                try:
                    v.decode("utf-8")
                    out.append(v)
                except UnicodeDecodeError:
                    out.append(None)
                    bad += 1
            if bad:
                return pa.array(out, pa.binary()), bad + nulls
            return arr, nulls
        if kt in (KeyType.INT64, KeyType.UUID):
            want = 8 if kt is KeyType.INT64 else 16
            lengths = pc.binary_length(arr)
            ok = pc.equal(lengths, want)
            bad = len(arr) - pc.sum(ok.cast(pa.int64())).as_py() if len(arr) else 0
            if bad:
                arr = pc.if_else(ok, arr, pa.scalar(None, pa.binary()))
                return arr, bad
            return arr, nulls
        return arr, nulls
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        if kt is KeyType.STRING:
            return column.cast(pa.string()).cast(pa.binary()), nulls
        if kt is KeyType.INT64:
            vals = column.to_pylist()
        else:
            vals = column.to_pylist()
        out = []
        bad = 0
        for v in vals:
            if v is None:
                out.append(None)
                bad += 1
                continue
            try:
                out.append(canonical_bytes(v, kt))
            except InvalidKeyError:
                out.append(None)
                bad += 1
        return pa.array(out, pa.binary()), bad
    if pa.types.is_integer(t) and kt is KeyType.INT64:
        ints = column.cast(pa.int64()).to_numpy(zero_copy_only=False)
        be = ints.astype(">i8").tobytes()
        arr = pa.FixedSizeBinaryArray.from_buffers(
            pa.binary(8), len(ints), [None, pa.py_buffer(be)]
        ).cast(pa.binary())
        return arr, nulls
    raise InvalidKeyError(f"key column of type {t} cannot hold {kt.value} keys")


def text_array(canonical: Sequence[bytes], key_type: KeyType) -> list[str]:
    return text_forms(canonical, KeyType(key_type))


# ------------------------------------------------------------ key text forms
# The one home of the text forms that stores keep keys in (CONTRACTS "Keys").


def _int64_text(b: bytes) -> str:
    if len(b) != 8:
        raise InvalidKeyError("int64 key is not 8 bytes")
    return str(int.from_bytes(b, "big", signed=True))


def _uuid_text(b: bytes) -> str:
    if len(b) != 16:
        raise InvalidKeyError("uuid key is not 16 bytes")
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _string_text(b: bytes) -> str:
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidKeyError("string key is not valid UTF-8") from None


def _bytes_text(b: bytes) -> str:
    return bytes(b).hex()


_TEXT_OF: dict[KeyType, Callable[[bytes], str]] = {
    KeyType.STRING: _string_text,
    KeyType.INT64: _int64_text,
    KeyType.UUID: _uuid_text,
    KeyType.BYTES: _bytes_text,
}


def text_forms(keys: Sequence[bytes], key_type: KeyType) -> list[str]:
    """Text forms of canonical keys; InvalidKeyError (no value) if one is not canonical."""
    return list(map(_TEXT_OF[key_type], keys))


def parse_text_strict(raw: bytes, key_type: KeyType) -> bytes | None:
    """Canonical bytes of a stored text key, or None if it is not a canonical text form."""
    try:
        text = raw.decode("utf-8")
        canon = parse_text(text, key_type)
        if _TEXT_OF[key_type](canon) != text:
            return None  # e.g. "007", "-0", upper-case hex: would alias another key
        return canon
    except (InvalidKeyError, UnicodeDecodeError, ValueError):
        return None


_UUID_TEXT_RE = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
_HEX_TEXT_RE = r"^(?:[0-9a-f]{2})*$"
_NIBBLE = np.zeros(256, dtype=np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _NIBBLE[_c] = _i


def _hex_decode(arr: pa.Array) -> pa.Array:
    """Decode a null-free array of even-length lowercase hex strings to binary."""
    arr = arr.cast(pa.binary())
    n = len(arr)
    if n == 0:
        return pa.array([], pa.binary())
    bufs = arr.buffers()
    offsets = np.frombuffer(bufs[1], dtype=np.int32)[arr.offset: arr.offset + n + 1]
    start, end = int(offsets[0]), int(offsets[-1])
    chars = np.frombuffer(bufs[2], dtype=np.uint8)[start:end] if bufs[2] is not None and end > start \
        else np.empty(0, np.uint8)
    nib = _NIBBLE[chars]
    out = (nib[0::2] << 4) | nib[1::2]
    new_off = ((offsets - start) // 2).astype(np.int32)
    return pa.Array.from_buffers(pa.binary(), n, [None, pa.py_buffer(new_off), pa.py_buffer(out.tobytes())])


def canonical_from_texts(raw: pa.Array, key_type: KeyType) -> tuple[pa.Array, np.ndarray]:
    """Canonical keys from stored text keys (binary, null-free).

    Returns ``(canonical, valid)``: ``canonical`` holds the keys where
    ``valid`` is True, in order (invalid ones dropped).  A key is valid only
    if its text is exactly the canonical text form of its canonical bytes.
    """
    n = len(raw)
    try:
        if key_type is KeyType.STRING:
            raw.cast(pa.string())  # validates UTF-8
            return raw, np.ones(n, dtype=bool)
        text = raw.cast(pa.string())
        if key_type is KeyType.INT64:
            ints = pc.cast(text, pa.int64())
            ok = pc.equal(pc.cast(ints, pa.string()), text)
            valid = np.asarray(ok.to_numpy(zero_copy_only=False), dtype=bool)
            be = ints.to_numpy(zero_copy_only=False)[valid].astype(">i8")
            canon = pa.Array.from_buffers(pa.binary(8), int(valid.sum()), [None, pa.py_buffer(be.tobytes())])
            return canon.cast(pa.binary()), valid
        pattern = _UUID_TEXT_RE if key_type is KeyType.UUID else _HEX_TEXT_RE
        valid = np.asarray(pc.match_substring_regex(text, pattern).to_numpy(zero_copy_only=False), dtype=bool)
        good = text.filter(pa.array(valid)) if not valid.all() else text
        if key_type is KeyType.UUID:
            good = pc.replace_substring(good, "-", "")
        return _hex_decode(good), valid
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass  # a value the vectorised path cannot take: decide row by row
    parsed = [parse_text_strict(v, key_type) for v in raw.to_pylist()]
    valid = np.fromiter((p is not None for p in parsed), dtype=bool, count=n)
    return pa.array([p for p in parsed if p is not None], pa.binary()), valid
