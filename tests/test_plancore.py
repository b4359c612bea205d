"""Properties of the planning core (no Beam): it equals the brute-force reference,
moves only keys whose owner changed, and is deterministic."""
import numpy as np
import pyarrow as pa
from hypothesis import given, settings, strategies as st

from pipeline import plancore as core
from pipeline.keys import KeyType, stable_hashes
from pipeline.ring import Ring

shard_sets = st.lists(st.sampled_from([f"s{i}" for i in range(12)]), min_size=1, max_size=6, unique=True)
key_sets = st.lists(st.binary(min_size=1, max_size=24), min_size=0, max_size=300, unique=True)


def _ctx(ring, window=None, buckets=4):
    return core.PlanContext(KeyType.BYTES, ring, window, None, buckets)


def _ring_batch(keys, current, target, window):
    """(window in order, target ring, rows at their current ring's shards, the rows as a batch)."""
    if window is not None and window[0] > window[1]:
        window = (window[1], window[0])
    cur_ring = Ring.build("native", [(s, 1.0) for s in current], virtual_nodes=50)
    tgt_ring = Ring.build("native", [(s, 1.0) for s in target], virtual_nodes=50)
    rows = [(k, cur_ring.assign_one(k)) for k in keys]
    batch = pa.table({"key": pa.array([k for k, _ in rows], pa.binary()),
                      "shard_id": pa.array([s for _, s in rows], pa.string())})
    return window, tgt_ring, rows, batch


@settings(max_examples=60, deadline=None)
@given(key_sets, shard_sets, shard_sets, st.one_of(st.none(), st.tuples(st.integers(0, 255), st.integers(0, 255))))
def test_plan_batch_equals_reference_and_moves_only_changed_keys(keys, current, target, window):
    window, tgt_ring, rows, batch = _ring_batch(keys, current, target, window)
    moves, stats, hashes = core.plan_batch(batch, _ctx(tgt_ring, window))
    got = sorted(zip(moves["key"].to_pylist(), moves["source"].to_pylist(), moves["target"].to_pylist(),
                     moves["key_hash"].to_pylist()))
    want = sorted(core.reference_plan(rows, ring=tgt_ring, window=window))
    assert got == want
    assert all(s != t and t == tgt_ring.assign_one(k) for k, s, t, _h in got)
    assert stats.moved == len(got) and stats.rows == len(keys)
    assert sum(stats.after.values()) == sum(stats.before.values()) == len(keys)
    again = core.plan_batch(batch, _ctx(tgt_ring, window))[0]
    assert again.equals(moves)


@settings(max_examples=60, deadline=None)
@given(key_sets, shard_sets, shard_sets, st.one_of(st.none(), st.tuples(st.integers(0, 255), st.integers(0, 255))))
def test_plan_batch_counts_before_after_and_pairs(keys, current, target, window):
    """Per-shard counts: ``before`` of the sources, ``after`` of each row's shard once the
    moves are made (outside the window nothing moves), ``pairs`` of the moves; shards
    with no row are absent (the coded path derives ``after`` from the moved rows)."""
    from collections import Counter

    window, tgt_ring, rows, batch = _ring_batch(keys, current, target, window)
    _moves, stats, _h = core.plan_batch(batch, _ctx(tgt_ring, window))
    moved = {k: t for k, _s, t, _h in core.reference_plan(rows, ring=tgt_ring, window=window)}
    assert stats.before == dict(Counter(s for _k, s in rows))
    assert stats.after == dict(Counter(moved.get(k, s) for k, s in rows))
    assert stats.pairs == dict(Counter(f"{s}\x1f{moved[k]}" for k, s in rows if k in moved))
    assert stats.moved == len(moved)


@settings(max_examples=30, deadline=None)
@given(key_sets, st.integers(2, 8))
def test_adding_a_shard_moves_keys_only_onto_it(keys, n):
    cur = [f"s{i}" for i in range(n)]
    cur_ring = Ring.build("native", [(s, 1.0) for s in cur], virtual_nodes=100)
    new_ring = Ring.build("native", [(s, 1.0) for s in cur + ["new"]], virtual_nodes=100)
    rows = [(k, cur_ring.assign_one(k)) for k in keys]
    moves = core.reference_plan(rows, ring=new_ring)
    assert all(t == "new" for _k, _s, t, _h in moves)


@given(key_sets, st.randoms())
def test_digest_is_order_independent_and_sensitive(keys, rnd):
    shards = [f"s{len(k) % 3}" for k in keys]
    h = stable_hashes(keys, len(keys))
    sh = core._shard_hash_array(pa.array(shards, pa.string()))
    d1 = core.digest_hex(*core.digest_lanes(h, sh))
    order = list(range(len(keys)))
    rnd.shuffle(order)
    d2 = core.digest_hex(*core.digest_lanes(h[order], sh[order]))
    assert d1 == d2
    if keys:
        moved = list(shards)
        moved[0] = "elsewhere"
        d3 = core.digest_hex(*core.digest_lanes(h, core._shard_hash_array(pa.array(moved, pa.string()))))
        assert d3 != d1


def test_bucket_is_monotone_in_hash():
    h = np.sort(np.random.default_rng(1).integers(0, 2**64, 10000, dtype=np.uint64))
    b = core.bucket_of(h, 7)
    assert (np.diff(b) >= 0).all() and b.min() == 0 and b.max() == 6


def test_plan_id_golden():
    pid = core.plan_id_for("ab" * 32, {"profile": "native"}, KeyType.STRING, (0, 0x7F))
    assert pid == core.plan_id_for("ab" * 32, {"profile": "native"}, "string", (0, 0x7F))
    assert pid != core.plan_id_for("ab" * 32, {"profile": "native"}, KeyType.STRING, None)
    assert len(pid) == 64 and int(pid, 16) >= 0


def _side(rows, hashes=None):
    keys = [k for k, _ in rows]
    h = stable_hashes(keys, len(keys)) if hashes is None else np.array(hashes, dtype=np.uint64)
    return pa.table({"key": pa.array(keys, pa.binary()), "shard_id": pa.array([s for _, s in rows], pa.string()),
                     "key_hash": pa.array(h, pa.uint64())})


@settings(max_examples=80, deadline=None)
@given(key_sets, key_sets, shard_sets, st.booleans(),
       st.one_of(st.none(), st.tuples(st.integers(0, 255), st.integers(0, 255))), st.data())
def test_join_sorted_equals_join_batch(keys, extra, shards, collide, window, data):
    """The explicit-target merge join on stable hashes gives join_batch's moves and stats:
    keys missing from the target, target-only keys, a forced 64-bit hash collision (two
    different keys, one hash) and duplicated target keys included."""
    if window is not None and window[0] > window[1]:
        window = (window[1], window[0])
    pick = st.sampled_from(shards)
    src_rows = [(k, data.draw(pick)) for k in keys]
    tgt_keys = [k for k in keys if data.draw(st.booleans())] + [k for k in extra if k not in set(keys)]
    tgt_rows = [(k, data.draw(pick)) for k in tgt_keys]
    src_h = list(stable_hashes(keys, len(keys)))
    tgt_h = list(stable_hashes(tgt_keys, len(tgt_keys)))
    only_t = [i for i, k in enumerate(tgt_keys) if k not in set(keys)]
    if keys and only_t and not collide and src_h[-1] not in tgt_h:
        tgt_h[only_t[0]] = src_h[-1]  # a target-only key with a source key's hash: not a match
    if collide and len(keys) >= 2:
        src_h[1] = src_h[0]  # a collision on the source side
    if collide and tgt_rows and data.draw(st.booleans()):
        tgt_rows.append(tgt_rows[0])  # a duplicated target key
        tgt_h.append(tgt_h[0])
    src, tgt = _side(src_rows, src_h), _side(tgt_rows, tgt_h)
    ctx = _ctx(None, window)
    a_moves, a_stats = core.join_batch(src, tgt, ctx)
    b_moves, b_stats = core.join_sorted(src, tgt, ctx)
    assert core.sort_moves(b_moves).equals(core.sort_moves(a_moves))
    assert (b_stats.before, b_stats.after, b_stats.moved, b_stats.in_window) == \
        (a_stats.before, a_stats.after, a_stats.moved, a_stats.in_window)
    # as the planner reads them back: chunks with their own shard-id dictionaries
    c_moves, c_stats, dups = core.join_counted(_dictionary_chunks(src), _dictionary_chunks(tgt), ctx)
    assert core.sort_moves(c_moves).equals(core.sort_moves(a_moves))
    assert (c_stats.before, c_stats.after, c_stats.moved, c_stats.in_window, c_stats.pairs) == \
        (a_stats.before, a_stats.after, a_stats.moved, a_stats.in_window, a_stats.pairs)
    assert dups == sum(len(rows) - len({k for k, _ in rows}) for rows in (src_rows, tgt_rows))


def _dictionary_chunks(t):
    """``t`` in two chunks, each with its own shard-id dictionary (in reverse order for the second)."""
    half = t.num_rows // 2
    parts = []
    for piece, flip in ((t.slice(0, half), False), (t.slice(half), True)):
        ids = sorted(set(piece["shard_id"].to_pylist()), reverse=flip)
        codes = pa.array([ids.index(s) for s in piece["shard_id"].to_pylist()], pa.int32())
        parts.append(piece.set_column(1, "shard_id", pa.DictionaryArray.from_arrays(codes, pa.array(ids, pa.string()))))
    return pa.concat_tables(parts)


def test_sort_moves_numpy_order_is_arrows_with_and_without_ties():
    """sort_moves sorts on (source, target, hash) in numpy and falls back to Arrow's sort on
    the key bytes as well when a (source, target, hash) repeats: the order is Arrow's
    (CONTRACTS order) either way, with shard ids compared as bytes."""
    import random

    import pyarrow.compute as pc

    rng = random.Random(5)
    ids = ["s1", "s10", "s2", "é", "a", "B"]
    for trial in range(60):
        n = rng.randrange(0, 50)
        t = pa.table({"key": pa.array([rng.randbytes(rng.randrange(1, 4)) for _ in range(n)], pa.binary()),
                      "source": pa.array([rng.choice(ids[:1 + trial % 6]) for _ in range(n)]),
                      "target": pa.array([rng.choice(ids) for _ in range(n)]),
                      "key_hash": pa.array([rng.randrange(4) if trial % 2 else rng.randrange(2**64)
                                            for _ in range(n)], pa.uint64())})
        want = t.take(pc.sort_indices(t, sort_keys=[("source", "ascending"), ("target", "ascending"),
                                                    ("key_hash", "ascending"), ("key", "ascending")]))
        assert core.sort_moves(t).equals(want), trial


def test_sort_pair_moves_is_sort_moves_for_one_pair():
    """A move file's group (one source, one target): sort_pair_moves gives sort_moves's rows
    in sort_moves's order -- already sorted runs, interleaved runs, several chunks, equal
    hashes (then by key bytes) -- and write_moves_bytes(one_pair=True) the same bytes."""
    import random

    from transforms.plan import write_moves_bytes

    rng = random.Random(7)
    for trial in range(80):
        n = rng.randrange(0, 60)
        hashes = [rng.randrange(3) if trial % 4 == 3 else rng.randrange(2**64) for _ in range(n)]
        if trial % 4 == 1:
            hashes.sort()  # one spilled run: already in order
        rows = {"key": pa.array([rng.randbytes(rng.randrange(1, 4)) for _ in range(n)], pa.binary()),
                "source": pa.array(["s1"] * n), "target": pa.array(["s10"] * n),
                "key_hash": pa.array(hashes, pa.uint64())}
        t = pa.table(rows)
        cut = rng.randrange(0, n + 1)
        if trial % 4 == 2:  # two sorted runs, as two chunks' spills of one group
            t = pa.concat_tables([core.sort_moves(t.slice(0, cut)), core.sort_moves(t.slice(cut))])
        else:
            t = pa.concat_tables([t.slice(0, cut), t.slice(cut)])
        got = core.sort_pair_moves(t)
        assert got.equals(core.sort_moves(t)), trial
        assert write_moves_bytes(t, one_pair=True) == write_moves_bytes(t), trial
