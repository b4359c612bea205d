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
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import xxhash

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
    "short_hash",
    "short_hash_of_key",
    "canonical_array",
    "text_array",
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
    """Text form of canonical bytes, for stores that need text."""
    kt = KeyType(key_type)
    if kt is KeyType.STRING:
        return data.decode("utf-8")
    if kt is KeyType.INT64:
        return str(from_canonical(data, kt))
    if kt is KeyType.UUID:
        return str(from_canonical(data, kt))
    return data.hex()


def parse_text(text: str, key_type: KeyType) -> bytes:
    """Canonical bytes from a key's text form; raises InvalidKeyError."""
    return canonical_bytes(text, key_type)


def stable_hash(data: bytes) -> int:
    return xxhash.xxh3_64_intdigest(data)


def stable_hashes(keys: Iterable[bytes], count: int = -1) -> np.ndarray:
    """xxh3-64 of each canonical key, as a uint64 array (about 18M keys/s)."""
    return np.fromiter(map(xxhash.xxh3_64_intdigest, keys), dtype=np.uint64, count=count)


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
    kt = KeyType(key_type)
    if kt is KeyType.STRING:
        return [b.decode("utf-8") for b in canonical]
    return [text_form(b, kt) for b in canonical]
