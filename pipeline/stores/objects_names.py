"""Object-store data mover, the object names: a key's reversible, prefix-safe object name.

Never imports Beam.  The encoding (``k/<hh>/<b32>``, base32hex of the key's
canonical bytes under a 256-way fan-out, cut into 200-character components)
and its limits are described in :mod:`pipeline.stores.objects`, the store
that uses it; :func:`encode_key` and :func:`decode_name` are inverse, and
decoding is strict, so keys and names are in one-to-one correspondence.
"""
from __future__ import annotations

import base64
import re

import xxhash

from pipeline.errors import PermanentError

NAMESPACE = "k"
SEGMENT_CHARS = 200
GCS_MAX_NAME_BYTES = 1024
LOCAL_MAX_NAME_BYTES = 1024
LOCAL_MAX_PATH_BYTES = 4095
WRITTEN_NS_METADATA = "shardmove-written-ns"

_B32 = re.compile(r"\A[0-9a-v]+\Z")
_HH = re.compile(r"\A[0-9a-f]{2}\Z")
_VALID_B32_TAIL = {0, 2, 4, 5, 7}  # base32 lengths mod 8 that whole bytes produce


class KeyTooLong(PermanentError):
    """A key whose object name exceeds the store's limit."""

    reason = "key_too_long"


# ------------------------------------------------------------ key <-> name


def _b32(key: bytes) -> str:
    return base64.b32hexencode(key).decode("ascii").rstrip("=").lower()


def encode_key(key: bytes) -> str:
    """The object name of a key (relative to its shard location); see the module docstring."""
    key = bytes(key)
    if not key:
        raise ValueError("an empty key has no object name")
    s = _b32(key)
    segs = [s[i:i + SEGMENT_CHARS] for i in range(0, len(s), SEGMENT_CHARS)]
    hh = f"{xxhash.xxh3_64_intdigest(key) >> 56:02x}"
    return "/".join([NAMESPACE, hh] + [x + "_" for x in segs[:-1]] + [segs[-1]])


def decode_name(name: str) -> bytes:
    """The key of an object name made by :func:`encode_key` (strict: ValueError otherwise)."""
    parts = name.split("/")
    if len(parts) < 3 or parts[0] != NAMESPACE or not _HH.match(parts[1]):
        raise ValueError("not an object name of this store")
    segs = parts[2:]
    for x in segs[:-1]:
        if len(x) != SEGMENT_CHARS + 1 or not x.endswith("_") or not _B32.match(x[:-1]):
            raise ValueError("not an object name of this store")
    last = segs[-1]
    if not (0 < len(last) <= SEGMENT_CHARS) or not _B32.match(last):
        raise ValueError("not an object name of this store")
    s = "".join(x[:-1] for x in segs[:-1]) + last
    if len(s) % 8 not in _VALID_B32_TAIL:
        raise ValueError("not an object name of this store")
    try:
        key = base64.b32hexdecode(s.upper() + "=" * (-len(s) % 8))
    except (ValueError, base64.binascii.Error) as e:
        raise ValueError("not an object name of this store") from e
    if _b32(key) != s or f"{xxhash.xxh3_64_intdigest(key) >> 56:02x}" != parts[1]:
        raise ValueError("not an object name of this store")
    return key


def name_length(key_bytes: int) -> int:
    """Bytes of the object name of a ``key_bytes``-byte key."""
    if key_bytes <= 0:
        return 0
    chars = -(-8 * key_bytes // 5)
    segs = -(-chars // SEGMENT_CHARS)
    return len(NAMESPACE) + 4 + chars + 2 * (segs - 1)
