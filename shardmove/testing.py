"""Store contract suites: what every map store and data store must do, whichever it is.

shardmove's own stores (SQLite, PostgreSQL, Redis, object store) are tested with
these classes, and so can yours.  Subclass one in a pytest test module, tell it
how to build a fresh, empty store, and pytest collects its ``test_*`` methods::

    from shardmove.testing import MapStoreContract

    class TestMyMapStore(MapStoreContract):
        def make_map_store(self, key_type):
            return MyMapStore.create(..., key_type)   # fresh and empty on every call

* :class:`MapStoreContract` -- the :class:`~pipeline.stores.base.MapStore`
  protocol: snapshots, look-ups, all-or-nothing compare-and-set swaps, change
  numbers, pickling as configuration; and, for a store with a run registry
  (:class:`~pipeline.stores.base.RunRegistry`), the claim rule of
  :func:`pipeline.stores.claims.decide_claim` over :data:`CLAIM_CASES` and the
  fencing token of ``swap_batch(..., token=)``.
* :class:`DataStoreContract` -- the :class:`~pipeline.stores.base.DataStore`
  protocol: idempotent copies that report missing sources per key, reads,
  hashes, sizes, version-guarded deletes.

pytest is imported only when a test runs (``import shardmove.testing`` does not
need it).  Keys are never printed: assertion messages show counts only.
"""
from __future__ import annotations

import pickle
import random
import time
from typing import Any, Iterable, Sequence

from pipeline.errors import Refused, SourceMissing
from pipeline.keys import KeyType, text_form
from pipeline.lease import LeaseLost
from pipeline.stores.base import (SNAPSHOT_SCHEMA, DataStore, ExternalClock, MapStore, RunRegistry, SchemaSetup,
                                  SwapItem, content_hash)
from pipeline.stores.claims import ClaimRow, decide_claim
from shardmove.demo import demo_keys

__all__ = ["MapStoreContract", "DataStoreContract", "CLAIM_CASES", "sample_keys", "claim_outcome"]

ALL_KEY_TYPES = (KeyType.STRING, KeyType.INT64, KeyType.UUID, KeyType.BYTES)


def _pytest():
    import pytest  # deferred: only a running test suite needs it

    return pytest


def sample_keys(n: int, key_type: KeyType = KeyType.STRING, *, seed: int = 0) -> list[bytes]:
    """``n`` distinct canonical keys of ``key_type`` (deterministic), with awkward ones first."""
    extra: list[bytes] = []
    if key_type is KeyType.INT64:
        extra = [(-1).to_bytes(8, "big", signed=True), (2**63 - 1).to_bytes(8, "big"),
                 (-(2**63)).to_bytes(8, "big", signed=True)]
    elif key_type is KeyType.STRING:
        extra = ["ключ-é-🙂".encode(), b"with\ttab", b"new\nline"]
    elif key_type is KeyType.BYTES:
        extra = [b"\x00", b"\xff" * 40]
    keys = extra + [k for k in demo_keys(n, key_type, seed=seed) if k not in extra]
    return keys[:n]


def snapshot_rows(store, segment_size: int = 1000) -> tuple[list, Any, list]:
    """(rows as (key, shard, version), stats, batches) of one complete snapshot."""
    with store.snapshot(segment_size) as snap:
        batches = list(snap)
        stats = snap.stats()
    rows = []
    for b in batches:
        assert b.schema == SNAPSHOT_SCHEMA
        assert b.num_rows <= segment_size
        rows += list(zip(b.column(0).to_pylist(), b.column(1).to_pylist(), b.column(2).to_pylist()))
    return rows, stats, batches


# ------------------------------------------------------------- the claim rule

#: Cases of the run-claim rule: (name, registered rows as (plan, epoch, lo, hi,
#: holder, expires_at), the claim as (plan, epoch, (lo, hi), now), expected
#: outcome as (kind, plan id named or None)).  Every store with a run registry
#: must decide them as :func:`pipeline.stores.claims.decide_claim` does.
CLAIM_CASES: tuple = (
    ("empty registry", [], ("a" * 64, 1, (0, 127), 100.0), ("ok", None)),
    ("own row, same epoch", [("a" * 64, 1, 0, 127, "h1", 150.0)], ("a" * 64, 1, (0, 127), 100.0), ("ok", None)),
    ("own row, older epoch: superseded", [("a" * 64, 1, 0, 127, "h1", 150.0)], ("a" * 64, 2, (0, 127), 100.0),
     ("ok", None)),
    ("own row, newer epoch", [("a" * 64, 3, 0, 127, "h1", 150.0)], ("a" * 64, 2, (0, 127), 100.0),
     ("newer", "a" * 64)),
    ("own row, newer epoch, expired", [("a" * 64, 3, 0, 127, "h1", 50.0)], ("a" * 64, 2, (0, 127), 100.0),
     ("newer", "a" * 64)),
    ("other plan, live, overlapping", [("b" * 64, 1, 100, 200, "h2", 150.0)], ("a" * 64, 1, (0, 127), 100.0),
     ("overlap", "b" * 64)),
    ("other plan, live, touching at one end", [("b" * 64, 1, 127, 200, "h2", 150.0)],
     ("a" * 64, 1, (0, 127), 100.0), ("overlap", "b" * 64)),
    ("other plan, live, disjoint", [("b" * 64, 1, 128, 255, "h2", 150.0)], ("a" * 64, 1, (0, 127), 100.0),
     ("ok", None)),
    ("other plan, expired, overlapping", [("b" * 64, 1, 0, 255, "h2", 50.0)], ("a" * 64, 1, (0, 127), 100.0),
     ("ok", None)),
    ("other plan, expiring exactly now", [("b" * 64, 1, 0, 255, "h2", 100.0)], ("a" * 64, 1, (0, 127), 100.0),
     ("ok", None)),
    ("other plan, released (expires_at 0)", [("b" * 64, 1, 0, 255, "h2", 0.0)], ("a" * 64, 1, (0, 127), 100.0),
     ("ok", None)),
    ("other plan inside this window", [("b" * 64, 1, 10, 20, "h2", 150.0)], ("a" * 64, 1, (0, 255), 100.0),
     ("overlap", "b" * 64)),
    ("two overlapping plans: the smallest plan id is named",
     [("d" * 64, 1, 0, 255, "h4", 150.0), ("c" * 64, 1, 0, 255, "h3", 150.0)], ("a" * 64, 1, (0, 127), 100.0),
     ("overlap", "c" * 64)),
    ("newer epoch wins over an overlap",
     [("c" * 64, 1, 0, 255, "h3", 150.0), ("a" * 64, 5, 0, 127, "h1", 150.0)], ("a" * 64, 4, (0, 127), 100.0),
     ("newer", "a" * 64)),
    ("older own epoch and a disjoint live plan",
     [("a" * 64, 1, 0, 127, "h1", 150.0), ("b" * 64, 1, 128, 255, "h2", 150.0)], ("a" * 64, 2, (0, 127), 100.0),
     ("ok", None)),
    ("older own epoch and an overlapping live plan",
     [("a" * 64, 1, 0, 127, "h1", 150.0), ("b" * 64, 1, 64, 255, "h2", 150.0)], ("a" * 64, 2, (0, 127), 100.0),
     ("overlap", "b" * 64)),
)


def seed_claims(store, rows: Iterable[Sequence]) -> None:
    """Register ``rows`` through ``claim_run`` itself: each claimed at a time after every
    expiry of the case (so no claim is live while seeding), with the ttl that gives
    the row its ``expires_at``."""
    rows = list(rows)
    at = max([r[5] for r in rows], default=0.0) + 1.0
    for plan_id, epoch, lo, hi, holder, expires_at in rows:
        store.claim_run(plan_id, epoch, (lo, hi), holder, expires_at - at, at)


def claim_outcome(store, plan_id: str, epoch: int, window: tuple[int, int], now: float) -> tuple[str, str | None]:
    """What the store did with a claim, as (``ok`` | ``newer`` | ``overlap``, plan id named or None)."""
    try:
        store.claim_run(plan_id, epoch, window, "claimant:1", 60.0, now)
    except LeaseLost:
        return "newer", plan_id[:12]
    except Refused as e:
        return "overlap", str(e).split()[1]  # "plan <id[:12]> (held by ...) ..."
    return "ok", None


def expected_claim(rows: Iterable[Sequence], plan_id: str, epoch: int, window, now: float) -> tuple[str, str | None]:
    d = decide_claim(plan_id, epoch, window, now, [ClaimRow(*r) for r in rows])
    return d.kind, (d.row.plan_id if d.row is not None else None)


def _short(outcome: tuple[str, str | None]) -> tuple[str, str | None]:
    kind, pid = outcome
    return kind, (pid[:12] if pid else None)


# ------------------------------------------------------------------ map stores


class MapStoreContract:
    """The map store contract.  Subclasses define :meth:`make_map_store`.

    Optional hooks: :meth:`raw_state` (everything the store holds, to prove a
    call wrote nothing; the default compares a snapshot and ``max_version``),
    :meth:`stored_keys` (the key texts as stored, to pin their text form),
    ``point_in_time_snapshot`` (False for a store whose snapshot leaves out rows
    changed while it runs instead of exporting their old values),
    ``awkward_keys`` (more keys of a key type to round-trip, e.g.
    ``{KeyType.STRING: [b"", b"with\\x00nul"]}``).
    """

    point_in_time_snapshot = True
    awkward_keys: dict = {}

    def make_map_store(self, key_type: KeyType = KeyType.STRING):
        """A fresh, empty map store of ``key_type`` (every call a new one)."""
        raise NotImplementedError

    def raw_state(self, store) -> Any:
        rows, _, _ = snapshot_rows(store)
        return sorted(rows), store.max_version()

    def stored_keys(self, store) -> list[str] | None:
        return None

    def _map(self, rows=(), key_type: KeyType = KeyType.STRING):
        store = self.make_map_store(key_type)
        rows = list(rows)
        if rows:
            store.put_many(rows)
        return store

    # -- protocol and configuration

    def test_map_store_implements_the_protocol_and_pickles_as_configuration(self):
        keys = sample_keys(5, KeyType.INT64)
        store = self._map([(k, "s1") for k in keys], KeyType.INT64)
        assert isinstance(store, MapStore)
        found = store.lookup(keys)  # opens a connection
        clone = pickle.loads(pickle.dumps(store))
        assert clone.key_type is KeyType.INT64 and clone.lookup(keys) == found
        assert not store.supports_fence(object())
        clone.close()

    def test_initialize_of_a_set_up_map_creates_nothing_and_keeps_its_rows(self):
        """Stores with ``initialize`` (``shardmove init``): on a map already in use it
        only reports what exists, and every row stays as it was."""
        store = self._map([(k, "s1") for k in sample_keys(20)])
        if not isinstance(store, SchemaSetup):
            _pytest().skip("this map store has no initialize()")
        before = self.raw_state(store)
        steps = store.initialize()
        assert all(status == "exists" for status, _what in steps), steps
        assert store.initialize() == steps and self.raw_state(store) == before

    def test_a_map_written_by_the_store_has_no_rows_above_its_clock(self):
        store = self._map([(k, "s1") for k in sample_keys(20)])
        if not isinstance(store, ExternalClock):
            _pytest().skip("this map store's change counter is max(version)")
        store.swap_batch([(k, "s1", "s2") for k in sample_keys(5)])
        assert store.rows_above_clock() == (0, 0)

    # -- snapshot

    def test_snapshot_streams_every_row_in_bounded_segments(self):
        keys = sample_keys(250)
        store = self._map([(k, f"s{i % 3}") for i, k in enumerate(keys)])
        for segment_size in (1, 7, 250, 5000):
            rows, stats, batches = snapshot_rows(store, segment_size)
            assert sorted((k, s) for k, s, _ in rows) == sorted((k, f"s{i % 3}") for i, k in enumerate(keys))
            assert len(batches) == -(-250 // segment_size)
            assert stats.rows == 250 and stats.invalid_keys == 0 and stats.rows_above_cutoff == 0
            assert stats.cutoff == store.max_version() == max(v for _, _, v in rows)

    def test_snapshot_of_an_empty_map_and_statistics_need_a_complete_read(self):
        pytest = _pytest()
        store = self._map()
        rows, stats, batches = snapshot_rows(store)
        assert rows == [] and batches == []
        assert (stats.cutoff, stats.rows, stats.invalid_keys, stats.rows_above_cutoff) == (0, 0, 0, 0)
        assert store.max_version() == 0 and store.count_above(0) == 0
        store.put_many([(k, "a") for k in sample_keys(30)])
        with store.snapshot(10) as snap:
            next(iter(snap))
            with pytest.raises(RuntimeError, match="not read to the end"):
                snap.stats()
            with pytest.raises(RuntimeError, match="only once"):
                iter(snap)
        with pytest.raises(ValueError, match="segment_size must be a positive integer, got 0"):
            store.snapshot(0)

    def test_rows_written_after_the_cutoff_are_not_exported_but_counted(self):
        keys = sample_keys(100)
        store = self._map([(k, "a") for k in keys])
        before, _, _ = snapshot_rows(store)
        other = pickle.loads(pickle.dumps(store))  # another client: the applications
        moved = [keys[0], keys[99]]
        with store.snapshot(10) as snap:
            it = iter(snap)
            first = next(it)
            other.put_many([(f"new-{i}".encode(), "b") for i in range(5)])
            assert other.swap_batch([(k, "a", "b") for k in moved]).committed
            rest = list(it)
            stats = snap.stats()
        exported = [r for b in [first] + rest for r in zip(*(c.to_pylist() for c in b.columns))]
        assert all(v <= snap.cutoff for _, _, v in exported)
        unchanged = [r for r in before if r[0] not in moved]
        if self.point_in_time_snapshot:
            assert sorted(exported) == sorted(before)  # the map as it was at the cutoff
        else:  # rows changed while it ran are left out, never exported with their new values
            assert set(unchanged) <= set(exported) <= set(before)
        assert stats.rows == len(exported)
        assert stats.rows_above_cutoff == 7 == store.count_above(snap.cutoff)
        other.close()

    def test_all_key_types_round_trip_through_the_map_store(self):
        for kt in ALL_KEY_TYPES:
            keys = sample_keys(200, kt, seed=3) + list(self.awkward_keys.get(kt, ()))
            store = self._map([(k, "s1") for k in keys], kt)
            stored = self.stored_keys(store)
            if stored is not None:
                assert sorted(stored) == sorted(text_form(k, kt) for k in keys), kt  # the text form is stored
            rows, stats, _ = snapshot_rows(store, 64)
            assert sorted(k for k, _, _ in rows) == sorted(keys) and stats.invalid_keys == 0, kt
            found = store.lookup(keys + keys[:3])
            assert set(found) == set(keys) and all(s == "s1" for s, _ in found.values()), kt

    def test_lookup_returns_current_shard_and_version_of_existing_keys(self):
        keys = sample_keys(1200)
        store = self._map([(k, f"s{i % 2}") for i, k in enumerate(keys)])
        got = store.lookup(keys + [b"nope-1", b"nope-2"] + keys[:3])
        assert len(got) == 1200
        v = store.max_version()
        assert got[keys[1]] == ("s1", got[keys[1]][1]) and got[keys[0]][0] == "s0"
        assert all(0 < ver <= v for _, ver in got.values())
        assert store.lookup([]) == {}

    # -- swap

    def test_swap_applies_a_batch_and_stamps_one_new_higher_version(self):
        keys = sample_keys(10)
        store = self._map([(k, "a") for k in keys])
        top = store.max_version()
        res = store.swap_batch([SwapItem(k, "a", "b") for k in keys[:4]])
        assert res.committed and res.applied == (0, 1, 2, 3) and res.already == () and res.version == top + 1
        found = store.lookup(keys)
        assert all(found[k] == ("b", top + 1) for k in keys[:4])
        assert all(found[k] == ("a", top) for k in keys[4:])
        assert store.swap_batch([(k, "a", "c") for k in keys[4:6]]).version == top + 2  # a new, higher number
        assert store.lookup([keys[0], b"nope"]) == {keys[0]: ("b", top + 1)}
        assert store.count_above(top) == 6 and store.max_version() == top + 2

    def test_swap_rerun_writes_nothing_and_mixes_applied_with_already(self):
        keys = sample_keys(10)
        store = self._map([(k, "a") for k in keys])
        items = [(k, "a", "b") for k in keys[:5]]
        store.swap_batch(items)
        before = self.raw_state(store)
        res = store.swap_batch(items)
        assert res.committed and res.applied == () and res.already == (0, 1, 2, 3, 4) and res.version is None
        assert self.raw_state(store) == before  # nothing rewritten, no version consumed
        v1 = store.lookup([keys[0]])[keys[0]][1]
        res = store.swap_batch([(keys[0], "a", "b"), (keys[6], "a", "b"), (keys[1], "a", "b")])
        assert res.applied == (1,) and res.already == (0, 2)
        assert store.lookup([keys[0]])[keys[0]][1] == v1  # not rewritten
        assert store.swap_batch([]).committed

    def test_a_conflict_rolls_back_the_whole_batch(self):
        keys = sample_keys(10)
        store = self._map([(k, "a") for k in keys])
        store.swap_batch([(keys[3], "a", "b")])
        before = self.raw_state(store)
        items = [(keys[0], "a", "c"), (keys[1], "a", "c"), (keys[3], "a", "c"),  # keys[3] is on b: conflict
                 (b"absent", "a", "c"), (keys[2], "x", "c")]
        res = store.swap_batch(items)
        assert not res.committed and res.conflicts == (2, 3, 4) and res.applied == () and res.version is None
        assert self.raw_state(store) == before  # nothing applied, no version consumed

    def test_swap_of_duplicate_keys_in_one_batch(self):
        keys = sample_keys(10)
        store = self._map([(k, "a") for k in keys])
        res = store.swap_batch([(keys[5], "a", "b"), (keys[5], "a", "b"), (keys[6], "a", "b")])
        assert res.applied == (0, 1, 2)
        before = self.raw_state(store)
        res = store.swap_batch([(keys[7], "a", "b"), (keys[7], "a", "c"), (keys[8], "a", "b")])
        assert res.conflicts == (0, 1) and res.applied == () and self.raw_state(store) == before

    # -- run registry (stores that have one)

    def _registry(self, rows=()):
        store = self._map(rows)
        if not isinstance(store, RunRegistry):
            _pytest().skip("this map store has no run registry")
        return store

    def test_run_registry_refuses_overlaps_and_fences_stale_epochs(self):
        pytest = _pytest()
        keys = sample_keys(6)
        store = self._registry([(k, "a") for k in keys])
        now = time.time()
        a, b = "a" * 64, "b" * 64
        store.claim_run(a, 1, (0x00, 0x7F), "host-a:1", 60, now)
        with pytest.raises(Refused, match=r"plan aaaaaaaaaaaa \(held by host-a:1\) may move the same keys"):
            store.claim_run(b, 1, (0x70, 0xFF), "host-b:2", 60, now)
        store.claim_run(b, 1, (0x80, 0xFF), "host-b:2", 60, now)  # a disjoint window runs beside it
        store.renew_run(a, 1, 60, now + 1)
        assert store.swap_batch([(keys[0], "a", "b")], token=(a, 1)).applied == (0,)
        store.claim_run(a, 2, (0x00, 0x7F), "host-c:3", 60, now + 2)  # a newer executor of plan a
        with pytest.raises(LeaseLost, match="claimed by a newer executor"):
            store.claim_run(a, 1, (0x00, 0x7F), "host-a:1", 60, now + 3)
        with pytest.raises(LeaseLost, match="was taken over"):
            store.renew_run(a, 1, 60, now + 3)
        before = store.lookup(keys)
        with pytest.raises(LeaseLost, match="epoch 1 no longer holds the map store"):
            store.swap_batch([(keys[1], "a", "b")], token=(a, 1))
        with pytest.raises(LeaseLost, match=r"now none"):
            store.swap_batch([(keys[1], "a", "b")], token=("c" * 64, 1))
        assert store.lookup(keys) == before  # nothing applied
        store.release_run(a, 2)
        with pytest.raises(Refused, match="bbbbbbbbbbbb"):  # b still holds 80-FF
            store.claim_run("d" * 64, 1, (0x00, 0xFF), "host-d:4", 60, now + 4)
        store.release_run(b, 1)
        store.claim_run("d" * 64, 1, (0x00, 0xFF), "host-d:4", 60, now + 4)
        assert store.swap_batch([(keys[1], "a", "b")], token=("d" * 64, 1)).applied == (0,)

    def test_run_claims_follow_the_one_claim_rule(self):
        """Every case of :data:`CLAIM_CASES`, on a fresh registry: the store decides as
        :func:`pipeline.stores.claims.decide_claim` does (and as the table says)."""
        for name, rows, (plan_id, epoch, window, now), expected in CLAIM_CASES:
            want = expected_claim(rows, plan_id, epoch, window, now)
            assert want == expected, name  # the table and the pure rule agree
            store = self._registry()
            seed_claims(store, rows)
            got = claim_outcome(store, plan_id, epoch, window, now)
            assert got == _short(want), (name, got)
            if want[0] == "ok":
                store.renew_run(plan_id, epoch, 60.0, now)  # the claim was written for this epoch
            store.close()


    def test_run_claims_follow_the_one_claim_rule_on_random_registries(self):
        """As above, over registries drawn at random (seeded: every run draws the same ones)."""
        rng = random.Random(14)
        plans = [c * 64 for c in "abcd"]
        for i in range(40):
            rows = []
            for pid in rng.sample(plans, rng.randint(0, 4)):
                lo = rng.randint(0, 15)
                rows.append((pid, rng.randint(1, 3), lo, rng.randint(lo, 15), f"h{i}",
                             rng.choice([0.0, 50.0, 100.0, 150.0, 200.0, 250.0])))
            lo = rng.randint(0, 15)
            claim = (rng.choice(plans), rng.randint(1, 3), (lo, rng.randint(lo, 15)), 100.0)
            want = expected_claim(rows, *claim)
            store = self._registry()
            seed_claims(store, rows)
            got = claim_outcome(store, *claim)
            assert got == _short(want), (i, got, want)
            store.close()


# ----------------------------------------------------------------- data stores


class DataStoreContract:
    """The data store contract.  Subclasses define :meth:`make_data_store`.

    ``shards``: three shard ids the store accepts (the third is left empty).
    ``keeps_newer_target``: False for a store that cannot tell a newer target
    record (no version order), whose late copy then replaces it.
    ``key_types``: the key types the store takes; ``awkward_keys``: more keys
    of a key type to round-trip (``{KeyType.STRING: [b""]}``).
    ``reads_back_values``: False for a store whose ``read`` returns an encoding
    of the record rather than the bytes ``put_many`` wrote.
    """

    shards: tuple[str, str, str] = ("s0", "s1", "s2")
    keeps_newer_target = True
    reads_back_values = True
    key_types: tuple = ALL_KEY_TYPES
    awkward_keys: dict = {}

    def make_data_store(self, key_type: KeyType = KeyType.STRING):
        """A fresh, empty data store of ``key_type`` (every call a new one)."""
        raise NotImplementedError

    @staticmethod
    def values_for(keys, size: int = 120) -> list[bytes]:
        return [bytes([i % 251]) * (size - 8) + i.to_bytes(8, "big") for i in range(len(keys))]

    def test_data_store_implements_the_protocol_and_pickles_as_configuration(self):
        store = self.make_data_store(KeyType.STRING)
        s0 = self.shards[0]
        assert isinstance(store, DataStore)
        keys = sample_keys(3)
        store.put_many(s0, zip(keys, self.values_for(keys)))
        clone = pickle.loads(pickle.dumps(store))
        assert clone.key_type is KeyType.STRING and clone.read(keys, s0) == store.read(keys, s0)
        clone.close()

    def test_copy_returns_hashes_and_source_versions_and_is_idempotent(self):
        s0, s1, _ = self.shards
        store = self.make_data_store()
        keys = sample_keys(300)
        assert store.put_many(s0, zip(keys, self.values_for(keys))) == len(keys)
        src = store.read(keys, s0)
        out = store.copy(keys, s0, s1)
        assert [o.key for o in out] == keys and all(o.ok and o.written for o in out)
        assert [o.content_hash for o in out] == [content_hash(src[k][0]) for k in keys]
        assert [o.source_version for o in out] == [src[k][1] for k in keys]
        assert store.hashes(keys, s0) == {k: (content_hash(v), ver) for k, (v, ver) in src.items()}
        assert {k: v for k, (v, _) in store.read(keys, s1).items()} == {k: v for k, (v, _) in src.items()}
        tgt = store.read(keys, s1)
        again = store.copy(keys, s0, s1)
        assert [(o.content_hash, o.source_version) for o in again] == [(o.content_hash, o.source_version) for o in out]
        assert store.read(keys, s1) == tgt  # nothing rewritten
        assert {k: h for k, (h, _) in store.hashes(keys, s1).items()} == {k: h for k, (h, _) in store.hashes(keys, s0).items()}
        assert store.key_sizes(keys, s1) == {k: len(v) for k, (v, _) in src.items()}
        assert store.count(s0) == store.count(s1) == len(keys)
        assert store.shard_bytes(s1) == store.shard_bytes(s0) == sum(len(v) for v, _ in src.values())
        assert store.shard_exists(s0) and store.shard_exists(s1)

    def test_copy_reports_missing_source_records_per_key(self):
        s0, s1, _ = self.shards
        store = self.make_data_store()
        keys = sample_keys(6)
        store.put_many(s0, zip(keys[:4], self.values_for(keys[:4])))
        out = store.copy(keys, s0, s1)
        assert [o.ok for o in out] == [True, True, True, True, False, False]
        for o, k in zip(out[4:], keys[4:]):
            assert isinstance(o.error, SourceMissing) and o.error.reason == "source_missing"
            assert o.content_hash is None and o.source_version is None
            assert k not in str(o.error).encode()  # never a key in a message
        assert set(store.read(keys, s1)) == set(keys[:4])

    def test_copy_edge_cases(self):
        pytest = _pytest()
        s0, s1, _ = self.shards
        store = self.make_data_store()
        with pytest.raises(ValueError, match="same shard"):
            store.copy([b"k1"], s0, s0)
        assert store.copy([], s0, s1) == []

    def test_a_late_copy_and_a_newer_target_record(self):
        """A late duplicate copy never clobbers a record written on the target after the
        first copy -- unless the store cannot tell which is newer
        (``keeps_newer_target`` False): then the copy replaces it, and says so."""
        s0, s1, _ = self.shards
        store = self.make_data_store()
        keys = sample_keys(3)
        store.put_many(s0, [(k, b"old" * 20) for k in keys])
        store.copy(keys, s0, s1)
        store.put_many(s1, [(keys[0], b"newer" * 20)])  # the application writes on the new owner
        newer = store.read([keys[0]], s1)[keys[0]]
        out = store.copy(keys, s0, s1)  # a late duplicate copy
        assert all(o.ok for o in out)
        if self.keeps_newer_target:
            assert out[0].written is False and store.read([keys[0]], s1)[keys[0]] == newer
        else:
            assert out[0].written is True and store.read([keys[0]], s1) == store.read([keys[0]], s0)

    def test_all_key_types_round_trip_through_the_data_store(self):
        s0, s1, _ = self.shards
        for kt in self.key_types:
            store = self.make_data_store(kt)
            keys = sample_keys(100, kt, seed=9) + list(self.awkward_keys.get(kt, ()))
            vals = self.values_for(keys)
            store.put_many(s0, zip(keys, vals))
            src = store.read(keys, s0)
            assert set(src) == set(keys), kt
            if self.reads_back_values:
                assert {k: v for k, (v, _) in src.items()} == dict(zip(keys, vals)), kt
            assert all(o.ok for o in store.copy(keys, s0, s1)), kt
            assert {k: v for k, (v, _) in store.read(keys, s1).items()} == {k: v for k, (v, _) in src.items()}, kt
            assert store.key_sizes(keys, s1) == {k: len(v) for k, (v, _) in src.items()}, kt
            store.close()

    def test_sizes_counts_and_version_guarded_deletes(self):
        s0, _, empty = self.shards
        store = self.make_data_store()
        keys = sample_keys(10)
        store.put_many(s0, [(k, b"x" * (50 + i)) for i, k in enumerate(keys)])
        sizes = store.key_sizes(keys, s0)
        assert store.shard_bytes(s0) == sum(sizes.values()) and store.count(s0) == 10
        assert store.shard_bytes(empty) == 0 and store.count(empty) == 0 and store.read(keys, empty) == {}
        versions = store.read(keys, s0)
        stale = [versions[k][1] + (1 if i < 2 else 0) for i, k in enumerate(keys[:4])]
        assert store.delete(keys[:4], s0, versions=stale) == 2  # only where the version still matches
        assert store.delete(keys, s0) == 8
        assert store.delete(keys, s0) == 0  # idempotent
        assert store.delete(keys, empty) == 0
        assert store.read(keys, s0) == {} and store.count(s0) == 0 and store.shard_bytes(s0) == 0

    def test_rewriting_a_record_gives_it_a_new_version(self):
        s0 = self.shards[0]
        store = self.make_data_store()
        store.put_many(s0, [(b"a", b"1" * 30), (b"b", b"2" * 30)])
        v = store.read([b"a"], s0)[b"a"][1]
        store.put_many(s0, [(b"a", b"3" * 30)])
        assert store.read([b"a"], s0)[b"a"][1] != v
        assert store.read([b"b"], s0)[b"b"][1] != store.read([b"a"], s0)[b"a"][1] or not self.reads_back_values
