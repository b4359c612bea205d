"""Safe, reversible file names for shard ids and work groups."""
from __future__ import annotations

import functools
import re

__all__ = ["safe_name", "unsafe_name", "group_id", "parse_group_id"]

_SAFE = re.compile(rb"[A-Za-z0-9_\-]")


@functools.lru_cache(maxsize=4096)  # a pure function of a few shard ids, met once per group
def safe_name(shard_id: str) -> str:
    """Escape a shard id to a file-name-safe string (reversible).

    Bytes outside ``[A-Za-z0-9_-]`` become ``%XX``; so ``.``, ``/``, NUL and
    ``..`` can never form a path component.  The empty id becomes ``%``.
    """
    raw = shard_id.encode("utf-8")
    if not raw:
        return "%"
    return "".join(chr(b) if _SAFE.match(bytes([b])) else f"%{b:02X}" for b in raw)


def unsafe_name(name: str) -> str:
    if name == "%":
        return ""
    out = bytearray()
    i = 0
    while i < len(name):
        c = name[i]
        if c == "%":
            out.append(int(name[i + 1:i + 3], 16))
            i += 3
        else:
            out.append(ord(c))
            i += 1
    return out.decode("utf-8")


def group_id(source: str, target: str, bucket: int) -> str:
    """The work group (source, target, hash bucket) as a file-name-safe id."""
    return f"{safe_name(source)}~{safe_name(target)}~{bucket:05d}"


def parse_group_id(gid: str) -> tuple[str, str, int]:
    s, t, b = gid.split("~")
    return unsafe_name(s), unsafe_name(t), int(b)
