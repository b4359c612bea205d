"""Coders for values Beam has no correct coder for.

Stable key hashes are unsigned 64-bit integers (CONTRACTS "Keys").  Beam
infers ``VarIntCoder`` for ``int`` elements and keys, which encodes *signed*
64-bit integers: half of all hashes (those >= 2**63) raise OverflowError in
it.  Every Beam element or grouping key that is a stable hash is declared
:data:`Uint64` instead, whose registered coder is :class:`Uint64Coder`.
"""
from __future__ import annotations

import struct

from apache_beam import coders

__all__ = ["Uint64", "Uint64Coder"]

_BE = struct.Struct(">Q")


class Uint64(int):
    """Type hint for an unsigned 64-bit integer element (a plain ``int`` at run time)."""


class Uint64Coder(coders.Coder):
    """Fixed 8 bytes, big-endian: deterministic (a valid grouping key) and
    order-preserving.  Values outside [0, 2**64) are refused, never wrapped."""

    def encode(self, value) -> bytes:
        v = int(value)
        if not 0 <= v < 1 << 64:
            raise OverflowError(f"Uint64Coder: {v} is not an unsigned 64-bit integer")
        return _BE.pack(v)

    def decode(self, encoded: bytes) -> int:
        return _BE.unpack(encoded)[0]

    def is_deterministic(self) -> bool:
        return True

    def to_type_hint(self):
        return Uint64

    def __eq__(self, other):
        return type(self) is type(other)

    def __hash__(self):
        return hash(type(self))


coders.registry.register_coder(Uint64, Uint64Coder)
