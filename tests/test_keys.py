"""Keys: canonical bytes, text forms, stable hash (CONTRACTS "Keys")."""
import uuid

import pyarrow as pa
import pytest
from hypothesis import given, strategies as st

from pipeline import keys as K
from pipeline.keys import KeyType


def test_canonical_bytes_golden():
    assert K.canonical_bytes("abc", KeyType.STRING) == b"abc"
    assert K.canonical_bytes("é", KeyType.STRING) == b"\xc3\xa9"
    assert K.canonical_bytes("1", KeyType.INT64) == b"\x00" * 7 + b"\x01"
    assert K.canonical_bytes(-1, KeyType.INT64) == b"\xff" * 8
    assert K.canonical_bytes("-9223372036854775808", KeyType.INT64) == b"\x80" + b"\x00" * 7
    u = "12345678-1234-5678-1234-567812345678"
    assert K.canonical_bytes(u, KeyType.UUID) == bytes.fromhex("12345678123456781234567812345678")
    assert K.canonical_bytes("00ff", KeyType.BYTES) == b"\x00\xff"


def test_text_forms_golden():
    assert K.text_form(b"\x00" * 7 + b"\x2a", KeyType.INT64) == "42"
    assert K.text_form(bytes(range(16)), KeyType.UUID) == "00010203-0405-0607-0809-0a0b0c0d0e0f"
    assert K.text_form(b"\xde\xad", KeyType.BYTES) == "dead"


def test_stable_hash_golden():
    # xxh3-64 of canonical bytes, unsigned
    assert K.stable_hash(b"") == 0x2D06800538D394C2
    assert K.stable_hash(b"k0") == K.stable_hashes([b"k0"])[0]
    assert K.short_hash(0x0123456789ABCDEF) == "0123456789ab"


@pytest.mark.parametrize("kt,bad", [
    (KeyType.INT64, "12a"), (KeyType.INT64, "99999999999999999999"), (KeyType.INT64, "01"),
    (KeyType.UUID, "not-a-uuid"), (KeyType.UUID, "12345678123456781234567812345678"),
    (KeyType.BYTES, "zz"), (KeyType.BYTES, "abc"),
])
def test_invalid_text_rejected_without_value(kt, bad):
    with pytest.raises(K.InvalidKeyError) as e:
        K.parse_text(bad, kt)
    assert bad not in str(e.value)


@given(st.integers(min_value=-2**63, max_value=2**63 - 1))
def test_int64_roundtrip(v):
    b = K.canonical_bytes(v, KeyType.INT64)
    assert K.parse_text(K.text_form(b, KeyType.INT64), KeyType.INT64) == b
    assert K.from_canonical(b, KeyType.INT64) == v


@given(st.uuids())
def test_uuid_roundtrip(u):
    b = K.canonical_bytes(str(u), KeyType.UUID)
    assert b == u.bytes
    assert K.parse_text(K.text_form(b, KeyType.UUID), KeyType.UUID) == b


@given(st.binary(max_size=64))
def test_bytes_roundtrip(b):
    assert K.parse_text(K.text_form(b, KeyType.BYTES), KeyType.BYTES) == b


@given(st.text(max_size=40))
def test_string_roundtrip(s):
    b = K.canonical_bytes(s, KeyType.STRING)
    assert K.text_form(b, KeyType.STRING) == s


def test_canonical_array_counts_invalid():
    arr, bad = K.canonical_array(pa.array(["1", "x", None, "3"]), KeyType.INT64)
    assert bad == 2
    assert arr.to_pylist() == [K.canonical_bytes(1, KeyType.INT64), None, None, K.canonical_bytes(3, KeyType.INT64)]
    ints, bad = K.canonical_array(pa.array([1, -2], pa.int64()), KeyType.INT64)
    assert bad == 0 and ints.to_pylist() == [K.canonical_bytes(1, KeyType.INT64), K.canonical_bytes(-2, KeyType.INT64)]
    u, bad = K.canonical_array(pa.array([b"x" * 16, b"short"], pa.binary()), KeyType.UUID)
    assert bad == 1


def test_stable_hashes_array_is_xxh3_of_every_length_and_layout():
    """The numpy xxh3 (pipeline.xxh3) against the xxhash package: every length 0-300 (each
    of XXH3's length classes, and the per-key fallback above 240 bytes), mixed lengths
    (gathered reads) and one length (strided reads), a sliced array, string and large
    types, a chunked array, and nulls (the per-key path's error)."""
    import random

    import numpy as np
    import xxhash

    rng = random.Random(7)
    vals = [rng.randbytes(n) for n in range(301) for _ in range(3)]
    rng.shuffle(vals)
    want = np.array([xxhash.xxh3_64_intdigest(v) for v in vals], np.uint64)
    arr = pa.array(vals, pa.binary())
    assert (K.stable_hashes_array(arr) == want).all()
    assert (K.stable_hashes_array(arr.slice(11, 500)) == want[11:511]).all()
    assert (K.stable_hashes_array(pa.chunked_array([arr.slice(0, 5), arr.slice(5)])) == want).all()
    assert (K.stable_hashes_array(arr.cast(pa.large_binary())) == want).all()
    for n in (0, 1, 3, 4, 8, 9, 16, 17, 33, 65, 97, 128, 129, 200, 240, 241):
        same = [rng.randbytes(n) for _ in range(7)]
        assert (K.stable_hashes_array(pa.array(same, pa.binary())) ==
                np.array([xxhash.xxh3_64_intdigest(v) for v in same], np.uint64)).all(), n
    texts = [f"user-{i:012d}" for i in range(50)] + ["é" * 9]
    assert (K.stable_hashes_array(pa.array(texts)) == K.stable_hashes([t.encode() for t in texts])).all()
    assert len(K.stable_hashes_array(pa.array([], pa.binary()))) == 0
    with pytest.raises(TypeError):
        K.stable_hashes_array(pa.array([b"a", None], pa.binary()))


def test_xxh3_mul_fold_is_the_128_bit_product_folded():
    """The in-place 128-bit multiply-fold: low xor high 64 bits of each product (edge words too)."""
    import numpy as np

    from pipeline import xxh3 as X

    rng = np.random.default_rng(11)
    a = np.concatenate([rng.integers(0, 2**64, 5000, dtype=np.uint64, endpoint=False),
                        np.array([0, 1, 2**32 - 1, 2**32, 2**64 - 1, 2**63], dtype=np.uint64)])
    b = np.concatenate([rng.integers(0, 2**64, 5000, dtype=np.uint64, endpoint=False),
                        np.array([2**64 - 1, 2**64 - 1, 2**32 - 1, 2**32 + 1, 2**64 - 1, 3], dtype=np.uint64)])
    got = X._mul_fold(a.copy(), b.copy())
    ref = [((int(x) * int(y)) & (2**64 - 1)) ^ ((int(x) * int(y)) >> 64) for x, y in zip(a, b)]
    assert got.tolist() == ref
