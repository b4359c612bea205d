"""Consistent-hash rings (pipeline/ring.py): golden vectors, determinism,
minimal movement, placement figures, weights, compatibility, validation."""
from __future__ import annotations

import hashlib
import json
import pickle
import struct
import subprocess
import sys
import uuid

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.keys import InvalidKeyError, KeyType, stable_hashes
from pipeline.ring import DEFAULT_VIRTUAL_NODES, PROFILES, Ring

N_KEYS = 1_000_000


def shards(n, prefix="s", weight=1.0):
    return [(f"{prefix}{i}", weight) for i in range(n)]


def ids_of(ring, idx):
    return [ring.shard_ids[i] for i in idx]


@pytest.fixture(scope="module")
def keys_1m():
    keys = [b"key-%d" % i for i in range(N_KEYS)]
    return keys, stable_hashes(keys, N_KEYS)


@pytest.fixture(scope="module")
def keys_10k():
    keys = [b"key-%d" % i for i in range(10_000)]
    return keys, stable_hashes(keys, len(keys))


# ------------------------------------------------------------ golden vectors

def test_golden_native_assignments():
    ring = Ring.build("native", shards(4))
    got = [ring.assign_one(b"key-%d" % i) for i in range(12)]
    assert got == ["s0", "s2", "s3", "s1", "s1", "s2", "s0", "s1", "s1", "s1", "s3", "s2"]
    ring = Ring.build("native", [("s0", 1.0), ("s1", 2.0), ("s2", 0.5)], virtual_nodes=100)
    got = [ring.assign_one(b"key-%d" % i) for i in range(12)]
    assert got == ["s2", "s2", "s0", "s2", "s1", "s1", "s2", "s1", "s1", "s0", "s0", "s0"]


def test_golden_shardis_hash_vectors():
    ring = Ring.build("shardis", shards(2))
    assert ring.key_hashes([b"k0", b"hello", b"s1-replica-0"]).tolist() == [2595005905, 3125670444, 1431244272]
    # the label vector is a point of shard s1
    assert 1431244272 in ring._points.tolist()
    assert ring.point_count == 200


def test_golden_shardis_key_encodings():
    def sha32(b):
        return int.from_bytes(hashlib.sha256(b).digest()[:4], "little")

    r_int = Ring.build("shardis", shards(4), key_type="int64")
    ints = [0, 1, -1, 42]
    got = r_int.key_hashes([struct.pack(">q", i) for i in ints]).tolist()
    assert got == [sha32(struct.pack("<q", i)) for i in ints]  # .NET BitConverter: little-endian
    assert got == [4117779887, 916561788, 1152295698, 143721709]
    assert [r_int.assign_one(struct.pack(">q", i)) for i in (0, 1, -1, 42, 2**40)] == ["s2", "s0", "s0", "s3", "s0"]

    r_uuid = Ring.build("shardis", shards(4), key_type="uuid")
    u = uuid.UUID("00112233-4455-6677-8899-aabbccddeeff")
    assert r_uuid.key_hashes([u.bytes]).tolist() == [sha32(u.bytes_le)] == [2895331310]
    assert r_uuid.assign_one(u.bytes) == "s1"

    r_str = Ring.build("shardis", shards(4))
    got = [r_str.assign_one(b"key-%d" % i) for i in range(12)]
    assert got == ["s1", "s0", "s0", "s0", "s2", "s1", "s3", "s0", "s2", "s1", "s1", "s2"]
    r_bytes = Ring.build("shardis", shards(4), key_type="bytes")
    assert r_bytes.key_hashes([b"\x00\xff"]).tolist() == [sha32(b"\x00\xff")]


def test_golden_ketama_vectors():
    ring = Ring.build("ketama", shards(4))
    # md5("hello") = 5d41402a... -> little-endian uint32 0x2a40415d
    assert ring.key_hashes([b"k0", b"hello"]).tolist() == [2065684008, 708854109]
    assert ring.point_count == 4 * 40 * 4
    got = [ring.assign_one(b"key-%d" % i) for i in range(12)]
    assert got == ["s2", "s3", "s3", "s2", "s2", "s1", "s1", "s1", "s0", "s1", "s2", "s1"]


def test_shardis_collision_probes_to_next_slot_in_configuration_order():
    # a50-replica-2515 and b50-replica-4912 share point 2600726804 at 5000 replicas;
    # k890 hashes just below it, so it goes to whichever shard placed the point first.
    ab = Ring.build("shardis", [("a50", 1), ("b50", 1)], virtual_nodes=5000)
    ba = Ring.build("shardis", [("b50", 1), ("a50", 1)], virtual_nodes=5000)
    for ring in (ab, ba):
        assert ring.point_count == 10_000  # probing keeps every virtual node
        assert {2600726804, 2600726805} <= set(ring._points.tolist())
    assert ab.assign_one(b"k890") == "a50"
    assert ba.assign_one(b"k890") == "b50"
    assert ab.canonical()["order"] == ba.canonical()["order"] == "configuration"
    assert ab.canonical() != ba.canonical()


# ------------------------------------------------------------- determinism

@pytest.mark.parametrize("profile", PROFILES)
def test_determinism_build_twice_same_assignments(profile, keys_10k):
    keys, hashes = keys_10k
    a = Ring.build(profile, shards(7)).assign(keys, hashes)
    b = Ring.build(profile, shards(7)).assign(keys, hashes)
    assert a.dtype == np.int32 and len(a) == len(keys)
    assert np.array_equal(a, b)
    assert Ring.build(profile, shards(7)) == Ring.build(profile, shards(7))


def test_determinism_native_independent_of_shard_order(keys_10k):
    keys, hashes = keys_10k
    fwd = Ring.build("native", [("a", 1.0), ("b", 2.0), ("c", 1.0)], virtual_nodes=300)
    rev = Ring.build("native", [("c", 1.0), ("b", 2.0), ("a", 1.0)], virtual_nodes=300)
    assert ids_of(fwd, fwd.assign(keys, hashes)) == ids_of(rev, rev.assign(keys, hashes))
    assert fwd.canonical() == rev.canonical()


@pytest.mark.parametrize("profile", PROFILES)
def test_determinism_pickle_round_trip_rebuilds_small(profile, keys_10k):
    keys, hashes = keys_10k
    ring = Ring.build(profile, shards(5))
    data = pickle.dumps(ring)
    assert len(data) < 2000  # points are rebuilt, not shipped
    back = pickle.loads(data)
    assert back == ring
    assert np.array_equal(back.assign(keys, hashes), ring.assign(keys, hashes))


shard_sets = st.lists(
    st.tuples(
        st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=6),
        st.sampled_from([0.5, 1.0, 1.0, 2.0, 3.0]),
    ),
    min_size=1,
    max_size=6,
    unique_by=lambda t: t[0],
)
key_lists = st.lists(st.binary(max_size=12), min_size=1, max_size=40)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(profile=st.sampled_from(PROFILES), shard_set=shard_sets, vnodes=st.integers(1, 64), keys=key_lists)
def test_determinism_assignment_is_pure_function(profile, shard_set, vnodes, keys):
    kt = KeyType.BYTES
    r1 = Ring.build(profile, shard_set, vnodes, key_type=kt)
    r2 = Ring.build(profile, list(shard_set), vnodes, key_type=kt)
    hashes = stable_hashes(keys, len(keys))
    a1 = r1.assign(keys, hashes)
    a2 = r2.assign(pa.array(keys, pa.binary()), hashes)
    assert np.array_equal(a1, a2)
    assert ids_of(r1, a1) == [r1.assign_one(k) for k in keys]
    assert json.dumps(r1.canonical(), sort_keys=True) == json.dumps(r2.canonical(), sort_keys=True)


# ----------------------------------------------------- minimal movement

@settings(max_examples=40, deadline=None)
@given(profile=st.sampled_from(PROFILES), n=st.integers(2, 8), gone=st.integers(0, 7),
       weights=st.lists(st.sampled_from([1, 2, 3]), min_size=8, max_size=8))
def test_removing_a_shard_moves_only_its_keys(profile, n, gone, weights, keys_10k):
    keys, hashes = keys_10k
    if profile == "ketama":
        weights = [1] * 8  # ketama renormalises weights over the node count: only equal weights are minimal
    before_set = [(f"n{i}", float(weights[i])) for i in range(n)]
    gone %= n
    after_set = [s for i, s in enumerate(before_set) if i != gone]
    vn = 50
    before = Ring.build(profile, before_set, vn)
    after = Ring.build(profile, after_set, vn)
    b = np.array(ids_of(before, before.assign(keys, hashes)))
    a = np.array(ids_of(after, after.assign(keys, hashes)))
    moved = b != a
    assert np.all(b[moved] == f"n{gone}")
    assert not np.any(a == f"n{gone}")


@settings(max_examples=40, deadline=None)
@given(profile=st.sampled_from(PROFILES), n=st.integers(1, 8), w_new=st.sampled_from([0.5, 1.0, 2.0]))
def test_adding_a_shard_moves_keys_only_onto_it(profile, n, w_new, keys_10k):
    keys, hashes = keys_10k
    if profile == "ketama":
        w_new = 1.0
    before = Ring.build(profile, shards(n, "m"), 50)
    after = Ring.build(profile, shards(n, "m") + [("new", w_new)], 50)
    b = np.array(ids_of(before, before.assign(keys, hashes)))
    a = np.array(ids_of(after, after.assign(keys, hashes)))
    moved = b != a
    assert moved.any()
    assert np.all(a[moved] == "new")


# ------------------------------------------------------ placement figures

def test_native_placement_figures(keys_1m):
    """1M keys: 16 equal shards max/mean <= 1.05; every N in 2..64, adding one
    shard moves within 5% (relative) of 1/(N+1), all onto the new shard."""
    _, hashes = keys_1m
    worst = (0.0, None)
    prev = Ring.build("native", shards(2)).assign(None, hashes)
    for n in range(2, 65):
        ring = Ring.build("native", shards(n + 1))
        cur = ring.assign(None, hashes)
        moved = prev != cur
        assert np.all(cur[moved] == n), f"N={n}: a key moved between old shards"
        err = abs(np.count_nonzero(moved) / N_KEYS * (n + 1) - 1)
        worst = max(worst, (err, n))
        if n + 1 == 16:
            counts = np.bincount(cur, minlength=16)
            assert counts.max() / counts.mean() <= 1.05, f"16 shards: max/mean {counts.max() / counts.mean():.4f}"
        prev = cur
    assert worst[0] <= 0.05, f"moved fraction off by {worst[0]:.2%} of 1/(N+1) at N={worst[1]}"


def _probes_and_searched_owners(ring, seed: int, random: int):
    """Hashes to look up (random ones, every ring point and its neighbours, the extremes)
    and their owners by binary search: the owner of the first point >= the hash, wrapping."""
    pts = ring._points
    rng = np.random.default_rng(seed)
    probes = np.concatenate([
        rng.integers(0, 2**64, random, dtype=np.uint64, endpoint=False),
        pts, pts - np.uint64(1), pts + np.uint64(1),
        np.array([0, 1, 2**63, 2**64 - 1], dtype=np.uint64),
    ])
    idx = np.searchsorted(pts, probes, side="left")
    idx[idx == len(pts)] = 0
    return probes, ring._owners[idx]


def test_native_lookup_table_matches_binary_search():
    ring = Ring.build("native", shards(5), virtual_nodes=300)
    probes, want = _probes_and_searched_owners(ring, seed=7, random=200_000)
    assert np.array_equal(ring.assign(None, probes), want)


@pytest.mark.parametrize("n,weights", [(1, None), (2, None), (17, None), (65, [1.0 + i % 3 for i in range(65)]),
                                       (130, None)])
def test_native_owner_table_matches_binary_search(n, weights):
    """The owner table (one gather for buckets of a single owner) gives every hash the
    owner of the first point >= it, as a binary search does, and so does the fallback
    search on its own; int16 tables (>= 128 shards) too."""
    ids = [f"s{i}" for i in range(n)]
    ring = Ring.build("native", list(zip(ids, weights or [1.0] * n)))
    probes, want = _probes_and_searched_owners(ring, seed=n, random=300_000)
    got = ring.assign(None, probes)
    assert got.dtype == np.int32 and np.array_equal(got, want)
    assert np.array_equal(ring._search_native(probes), want)
    assert ring._table.dtype == (np.int8 if n < 128 else np.int16)
    assert (ring._table >= 0).mean() > 0.5  # most buckets resolved without a search


@pytest.mark.parametrize("profile", PROFILES)
def test_wraps_around_past_the_last_point(profile):
    ring = Ring.build(profile, shards(3), 10)
    first_owner = ring.shard_ids[int(ring._owners[0])]
    if profile == "native":
        assert ring.shard_ids[int(ring.assign(None, np.array([2**64 - 1], np.uint64))[0])] == first_owner
        assert ring.shard_ids[int(ring.assign(None, np.array([0], np.uint64))[0])] == first_owner
    else:
        assert ring.shard_ids[int(ring._lookup_u32(np.array([2**32 - 1], np.uint32))[0])] == first_owner


# ----------------------------------------------------------------- weights

@pytest.mark.parametrize("profile,vnodes", [("native", None), ("shardis", 2000), ("ketama", 500)])
def test_weights_double_weight_gets_twice_the_keys(profile, vnodes, keys_1m):
    keys, hashes = keys_1m
    ring = Ring.build(profile, [("a", 1.0), ("b", 1.0), ("heavy", 2.0), ("c", 1.0)], vnodes)
    n = 200_000
    counts = np.bincount(ring.assign(keys[:n], hashes[:n]), minlength=4)
    ratio = counts[2] / np.mean(counts[[0, 1, 3]])
    assert 1.85 <= ratio <= 2.15, f"{profile}: weight-2 shard got {ratio:.3f}x the keys"


# -------------------------------------------------- ketama == uhashring

KETAMA_NODE_SETS = [
    [f"s{i}" for i in range(5)],
    {"a": 1, "b": 2, "c": 3},
    {f"node{i}": (i % 4) + 1 for i in range(20)},
    {"small": 1, "big": 100},  # 'small' gets no points: 40*2*1 // 101 == 0
]


@pytest.mark.parametrize("nodes", KETAMA_NODE_SETS, ids=["equal5", "w123", "w20", "zero-points"])
def test_ketama_equals_uhashring(nodes):
    uhashring = pytest.importorskip("uhashring")
    oracle = uhashring.HashRing(nodes, hash_fn="ketama")
    pairs = list(nodes.items()) if isinstance(nodes, dict) else [(n, 1) for n in nodes]
    ring = Ring.build("ketama", pairs)
    assert ring.point_count == len(set(oracle.get_points()))
    keys = [f"key-{i}" for i in range(10_000)]
    got = ids_of(ring, ring.assign([k.encode() for k in keys]))
    assert got == [oracle.get_node(k) for k in keys]


def test_ketama_equals_uhashring_int_and_uuid_keys():
    uhashring = pytest.importorskip("uhashring")
    oracle = uhashring.HashRing({"x": 1, "y": 2, "z": 1}, hash_fn="ketama")
    pairs = [("x", 1), ("y", 2), ("z", 1)]
    r_int = Ring.build("ketama", pairs, key_type="int64")
    ints = list(range(-1000, 1000)) + [2**63 - 1, -(2**63)]
    assert [r_int.assign_one(struct.pack(">q", i)) for i in ints] == [oracle.get_node(i) for i in ints]
    r_uuid = Ring.build("ketama", pairs, key_type="uuid")
    uuids = [uuid.UUID(int=(i * 0x9E3779B97F4A7C15F39CC0605CEDC835) % 2**128) for i in range(1000)]
    assert [r_uuid.assign_one(u.bytes) for u in uuids] == [oracle.get_node(u) for u in uuids]


def test_ketama_shared_point_goes_to_last_listed_node():
    # a180 and b180 share point 2813372607 at vnodes=2000; key k1530 hashes into its arc
    uhashring = pytest.importorskip("uhashring")
    for order in (["a180", "b180"], ["b180", "a180"]):
        oracle = uhashring.HashRing({n: {"weight": 1, "vnodes": 2000} for n in order}, hash_fn="ketama")
        ring = Ring.build("ketama", [(n, 1) for n in order], virtual_nodes=2000)
        assert ring.point_count == 15_999
        assert ring.canonical()["order"] == "configuration"
        assert ring.assign_one(b"k1530") == oracle.get_node("k1530") == order[-1]


# -------------------------------------------------------------- validation

@pytest.mark.parametrize(
    "profile,shard_set,vnodes,match",
    [
        ("native", [], None, r"ring shards must not be empty"),
        ("native", [("s0", 1.0), ("s0", 2.0)], None, r"ring shards\[1\] duplicate shard id 's0'"),
        ("native", [("s0", 0)], None, r"ring weight of shard 's0' must be a finite number > 0 \(got 0.0\)"),
        ("shardis", [("s0", -1.5)], None, r"ring weight of shard 's0' .* \(got -1.5\)"),
        ("native", [("s0", float("nan"))], None, r"ring weight of shard 's0' .* \(got nan\)"),
        ("native", [("s0", float("inf"))], None, r"ring weight of shard 's0' .* \(got inf\)"),
        ("native", [("s0", True)], None, r"ring weight of shard 's0'"),
        ("native", [("s0", "1")], None, r"ring weight of shard 's0'"),
        ("native", [("s0", 1.0)], 0, r"ring virtual_nodes must be an integer >= 1 \(got 0\)"),
        ("ketama", [("s0", 1.0)], -3, r"ring virtual_nodes must be an integer >= 1 \(got -3\)"),
        ("native", [("s0", 1.0)], 2.5, r"ring virtual_nodes must be an integer >= 1 \(got 2.5\)"),
        ("native", [("", 1.0)], None, r"ring shards\[0\] id must be a non-empty string"),
        ("native", [(7, 1.0)], None, r"ring shards\[0\] id must be a non-empty string \(got 7\)"),
        ("native", ["s0"], None, r"ring shards\[0\] must be an \(id, weight\) pair"),
        ("maglev", [("s0", 1.0)], None, r"ring profile must be one of native, shardis, ketama \(got 'maglev'\)"),
        ("native", [("s0", 1e9)], None, r"ring virtual_nodes x weights gives \d+ points"),
    ],
)
def test_validation_errors(profile, shard_set, vnodes, match):
    with pytest.raises(ValueError, match=match):
        Ring.build(profile, shard_set, vnodes)


def test_validation_key_type():
    with pytest.raises(ValueError, match=r"ring key_type must be one of string, int64, uuid, bytes \(got 'float'\)"):
        Ring.build("native", shards(2), key_type="float")


def test_validation_assign_inputs_never_echo_keys():
    ring = Ring.build("native", shards(2), 10)
    with pytest.raises(ValueError, match=r"ring assign: 2 keys but 1 hashes"):
        ring.assign([b"a", b"b"], np.array([1], np.uint64))
    r_int = Ring.build("shardis", shards(2), key_type="int64")
    with pytest.raises(InvalidKeyError, match=r"ring assign: 1 int64 keys are not 8 bytes") as e:
        r_int.assign([b"secret-key"], None)
    assert "secret" not in str(e.value)
    with pytest.raises(InvalidKeyError, match=r"ring assign: 1 null keys"):
        Ring.build("ketama", shards(2)).assign(pa.array([b"x", None], pa.binary()))


def test_assign_empty_batch():
    for profile in PROFILES:
        out = Ring.build(profile, shards(3), 10).assign([], np.array([], np.uint64))
        assert out.dtype == np.int32 and len(out) == 0


# ------------------------------------------------------------ canonical form

def test_canonical_describes_the_ring():
    ring = Ring.build("native", [("s9", 1), ("s10", 2.0)])
    c = ring.canonical()
    assert c == {
        "format": "shardmove-ring/1",
        "profile": "native",
        "key_type": "string",
        "virtual_nodes": DEFAULT_VIRTUAL_NODES,
        "order": "shard_id",
        "shards": [{"id": "s10", "weight": 2.0}, {"id": "s9", "weight": 1.0}],
    }
    assert json.loads(json.dumps(c)) == c
    assert Ring.build("native", [("s9", 1), ("s10", 3.0)]).canonical() != c
    assert Ring.build("native", [("s9", 1), ("s10", 2.0)], 100).canonical() != c
    assert Ring.build("shardis", [("s9", 1), ("s10", 2.0)]).canonical()["virtual_nodes"] == 100
    assert Ring.build("ketama", [("s9", 1), ("s10", 2.0)]).canonical()["virtual_nodes"] == 40


def test_ring_module_never_imports_beam():
    code = "import sys, pipeline.ring; sys.exit(1 if 'apache_beam' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_rings_of_the_same_fields_share_their_points():
    """A plan builds its ring twice in one process (the launcher, then the planning DoFn
    unpickled): the second build reuses the first's read-only arrays; other fields build
    their own; the cache holds a few rings only."""
    from pipeline import ring as ring_mod

    ring_mod._BUILT.clear()
    a = Ring.build("native", [("a", 1.0), ("b", 1.0)])
    b = pickle.loads(pickle.dumps(a))
    assert b == a and b._points is a._points and b._lut is a._lut
    assert not a._points.flags.writeable and not a._lut.flags.writeable
    c = Ring.build("native", [("a", 1.0), ("b", 2.0)])
    assert c._points is not a._points and len(c._points) > len(a._points)
    keys = [b"k%d" % i for i in range(1000)]
    fresh = ring_mod._build("native", a.shard_ids, a.weights, a.virtual_nodes)
    assert np.array_equal(fresh[0], a._points) and np.array_equal(fresh[1], a._owners)
    assert a.assign(keys).tolist() == b.assign(keys).tolist()
    for i in range(ring_mod._BUILT_MAX + 2):
        Ring.build("native", [("x%d" % i, 1.0)], virtual_nodes=10)
    assert len(ring_mod._BUILT) == ring_mod._BUILT_MAX
