"""Store protocols and result types shared by every map / data store adapter.

Never imports Beam.  Keys cross these interfaces as canonical bytes
(CONTRACTS "Keys"); each adapter converts them to whatever its storage needs
(SQLite: the key's text form).

Two collaborators, with the seam described in the usage guide ("Key Migration
& Data Mover Semantics"):

* a :class:`MapStore` is the authoritative key -> shard map.  It exports a
  point-in-time snapshot, looks keys up, and swaps keys to their new shard in
  all-or-nothing compare-and-set batches.
* a :class:`DataStore` holds the records.  It copies records between shards
  (an idempotent upsert keyed by the key that never clobbers a newer target
  record), reads them back for verification and deletes them for cleanup.  It
  never touches the shard map.

Expected per-key outcomes (source missing, conflict, source changed) travel as
data in the result types below.  Whole-batch failures are exceptions from
:mod:`pipeline.errors`: :class:`~pipeline.errors.TransientError` (retry the
batch) or :class:`~pipeline.errors.PermanentError` (do not; ``reason`` says
why).  No message, result or log line carries a key value.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, NamedTuple, Optional, Protocol, Sequence, runtime_checkable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import xxhash

from pipeline.errors import BadInput, StoreError
from pipeline.keys import KeyType, canonical_from_texts

__all__ = [
    "SNAPSHOT_SCHEMA",
    "content_hash",
    "SnapshotStats",
    "MapSnapshot",
    "SwapItem",
    "SwapResult",
    "CopyOutcome",
    "MapStore",
    "DataStore",
    "ChangeCounter",
    "RunRegistry",
    "SchemaSetup",
    "ExternalClock",
    "ShardInventory",
    "ShardChecks",
    "WriteFencing",
    "KeyNameLimits",
    "check_cutoff",
]

#: Schema of every RecordBatch a map snapshot yields.
SNAPSHOT_SCHEMA = pa.schema(
    [
        pa.field("key", pa.binary(), nullable=False),  # canonical key bytes
        pa.field("shard_id", pa.string(), nullable=False),
        pa.field("version", pa.int64(), nullable=False),
    ]
)


def content_hash(value: bytes) -> bytes:
    """Content hash of a record: xxh3-128 of its canonical record bytes (16 bytes).

    For the SQLite data store the canonical record bytes are the value bytes,
    prefixed by nothing (CONTRACTS "Embedded SQLite stores").
    """
    return xxhash.xxh3_128_digest(value)


# ------------------------------------------------------------------ map side


@dataclass(frozen=True)
class SnapshotStats:
    """What a finished snapshot export saw.

    ``cutoff``: the map's highest change number when the snapshot opened (or
    the caller's cutoff, at most that); every exported row has ``version <= cutoff``.  ``rows``: rows exported.
    ``invalid_keys``: rows skipped because their key (or shard id) cannot be
    represented in the keyspace's key type; never their values.
    ``rows_above_cutoff``: rows whose version is above the cutoff, counted when
    the export finished -- rows written or swapped while it ran, which the
    snapshot therefore does not reflect (drift).
    """

    cutoff: int
    rows: int
    invalid_keys: int
    rows_above_cutoff: int


class MapSnapshot(Protocol):
    """A point-in-time export of the map, as bounded RecordBatches.

    Used as a context manager; iterate it once to get ``pyarrow.RecordBatch``es
    of :data:`SNAPSHOT_SCHEMA`, each at most ``segment_size`` rows.  ``stats()``
    is final once the iteration is exhausted (or the snapshot closed).
    """

    cutoff: int

    def __iter__(self) -> Iterator[pa.RecordBatch]: ...

    def stats(self) -> SnapshotStats: ...

    def close(self) -> None: ...

    def __enter__(self) -> "MapSnapshot": ...

    def __exit__(self, *exc) -> None: ...


class SwapItem(NamedTuple):
    """One key of a swap batch.  Plain 3-, 4- or 5-tuples are accepted too.

    ``source_version`` is the version of the source record read at copy time
    (:attr:`CopyOutcome.source_version`); only a fenced swap needs it.
    ``check_content``: a fenced swap on SQLite shards also requires the
    source record's bytes to equal its copy's on the target (a rewrite that
    kept the version); False only for a key swapped by force after its
    verification failed (``force_swap_on_verification_failure``).
    """

    key: bytes
    source: str
    target: str
    source_version: Optional[int] = None
    check_content: bool = True


@dataclass(frozen=True)
class SwapResult:
    """Outcome of one all-or-nothing swap batch; indices refer to the input items.

    * ``applied``: rows written by this call (each stamped with ``version``);
    * ``already``: keys already at their target -- nothing written for them, so
      rerunning a committed batch writes nothing;
    * ``conflicts``: keys neither at their expected source nor at their target,
      or absent from the map;
    * ``source_changed``: (fenced swaps only) keys whose source record version
      no longer equals the version read at copy time, that were deleted, or
      (SQLite shards) whose source record no longer holds the bytes of its
      copy on the target -- a rewrite that kept the version.

    If ``conflicts`` or ``source_changed`` is non-empty the whole batch was
    rolled back: ``applied`` is empty and ``committed`` is False (``already``
    still lists the keys found at their target).
    """

    applied: tuple[int, ...] = ()
    already: tuple[int, ...] = ()
    conflicts: tuple[int, ...] = ()
    source_changed: tuple[int, ...] = ()
    version: Optional[int] = None  # change number stamped on ``applied`` rows

    @property
    def committed(self) -> bool:
        return not self.conflicts and not self.source_changed


@runtime_checkable
class ChangeCounter(Protocol):
    """A map that numbers its changes (every map store here): drift is counted against it."""

    def max_version(self) -> int:
        """Highest change number in the map (0 when empty)."""
        ...

    def count_above(self, version: int) -> int:
        """Rows whose version is above ``version`` (written since that point)."""
        ...


@runtime_checkable
class RunRegistry(Protocol):
    """Optional map-store capability: a registry of running executors (fencing).

    ``claim_run`` registers (plan, epoch) atomically under the one claim rule,
    :func:`pipeline.stores.claims.decide_claim`; the epoch is then the fencing
    token a swap checks inside its transaction (``swap_batch(..., token=(plan_id,
    epoch))`` raises :class:`~pipeline.lease.LeaseLost` and applies nothing once
    that epoch no longer holds the claim).  ``renew_run`` raises
    :class:`~pipeline.lease.LeaseLost` once another epoch holds the claim;
    ``release_run`` expires the claim but keeps it, so the epoch never goes back.
    """

    def claim_run(self, plan_id: str, epoch: int, window: tuple[int, int], holder: str, ttl: float,
                  now: float) -> None: ...

    def renew_run(self, plan_id: str, epoch: int, ttl: float, now: float) -> None: ...

    def release_run(self, plan_id: str, epoch: int) -> None: ...


@runtime_checkable
class SchemaSetup(Protocol):
    """Optional map-store capability: create what the store needs (``shardmove init``).

    ``initialize`` creates the missing objects and checks the ones that exist; it
    never drops or alters anything, and raises :class:`~pipeline.errors.BadInput`
    (having created nothing) when an existing object has a shape the store cannot
    use.  Returns ``(status, "kind name")`` pairs, status ``created`` or ``exists``.
    """

    def initialize(self) -> list[tuple[str, str]]: ...


@runtime_checkable
class ExternalClock(Protocol):
    """Optional map-store capability: a change counter kept apart from the rows
    (Redis's ``<prefix>:clock``), so a hand-seeded row can carry a version the
    counter never issued.  Such rows are above every snapshot's cutoff; validate
    refuses them.  (A map whose counter is ``max(version)`` has none.)"""

    def rows_above_clock(self) -> tuple[int, int]:
        """(rows whose version is above the counter, the highest such version)."""
        ...


@runtime_checkable
class MapStore(ChangeCounter, Protocol):
    """The authoritative key -> shard map of one keyspace."""

    key_type: KeyType

    def snapshot(self, segment_size: int = 20000, cutoff: int | None = None) -> MapSnapshot:
        """Open a point-in-time export (one read transaction at a cutoff).

        ``cutoff``: export the rows with ``version <= cutoff`` instead of the
        current version; one above the current version is refused
        (:func:`check_cutoff`: :class:`~pipeline.errors.BadInput`).
        """
        ...

    def lookup(self, keys: Sequence[bytes]) -> dict[bytes, tuple[str, int]]:
        """Current ``(shard_id, version)`` of those keys that exist."""
        ...

    def swap_batch(self, items: Sequence[SwapItem], *, fence: object | None = None) -> SwapResult:
        """Compare-and-set every key from its source to its target, all or nothing.

        Idempotent: a key already at its target is not written again.
        ``fence`` (adapter specific) also checks, inside the same transaction,
        that each source record still has ``source_version``.
        """
        ...

    def supports_fence(self, data_store: object) -> bool:
        """Whether ``swap_batch(..., fence=data_store)`` works with this data store."""
        ...

    def close(self) -> None: ...


# ----------------------------------------------------------------- data side


@dataclass(frozen=True, init=False)
class CopyOutcome:
    """Per-key result of :meth:`DataStore.copy` (aligned with the input keys).

    Success: ``error`` is None, ``content_hash`` is xxh3-128 of the source
    value (16 bytes) and ``source_version`` the version of the source record
    read.  ``written`` is False when the target already held a newer record
    (higher version), which the copy never overwrites.

    Failure: ``error`` is a :class:`~pipeline.errors.PermanentError` (e.g.
    :class:`~pipeline.errors.SourceMissing`, reason ``source_missing``).
    """

    key: bytes
    content_hash: Optional[bytes] = None
    source_version: Optional[int] = None
    written: bool = False
    error: Optional[StoreError] = None

    def __init__(self, key: bytes, content_hash: Optional[bytes] = None, source_version: Optional[int] = None,
                 written: bool = False, error: Optional[StoreError] = None):
        # one per key copied: the fields are set straight in the instance dict, not by the
        # frozen dataclass's object.__setattr__ per field (about 4x cheaper); still frozen
        d = self.__dict__
        d["key"] = key
        d["content_hash"] = content_hash
        d["source_version"] = source_version
        d["written"] = written
        d["error"] = error

    @property
    def ok(self) -> bool:
        return self.error is None


@runtime_checkable
class ShardInventory(Protocol):
    """What a data store can say about a shard as a whole (every data store here)."""

    def shard_exists(self, shard: str) -> bool: ...

    def shard_bytes(self, shard: str) -> int: ...

    def count(self, shard: str) -> int: ...


@runtime_checkable
class ShardChecks(Protocol):
    """Optional data-store capability: the preflight of one shard, changing nothing.

    ``check_shard(shard, write=False)`` -- can a copy read from it (a source);
    ``write=True`` -- can a copy write to it (a target).  Returns None when it
    can, else one short phrase naming the object at fault, never a password or
    a DSN (``"table public.records does not exist"``, ``"no INSERT privilege on
    table public.records"``).  How each store judges "writable" without writing
    is in its docstring."""

    def check_shard(self, shard: str, *, write: bool = False) -> str | None: ...


@runtime_checkable
class WriteFencing(Protocol):
    """Optional data-store capability: hold writers of a shard off around a swap.

    ``write_fence(shard)`` is a context manager yielding ``versions(keys) ->
    {key: (content hash, version)}`` read under the fence; used when the map
    store cannot check the data store inside its own swap transaction.
    """

    def write_fence(self, shard: str): ...


@runtime_checkable
class KeyNameLimits(Protocol):
    """Optional data-store capability: some keys cannot be named on a shard (object names)."""

    def check_keys(self, keys, shard: str | None = None) -> int:
        """How many of ``keys`` are too long for ``shard``."""
        ...

    def max_key_bytes(self, shard: str | None = None) -> int: ...


@runtime_checkable
class DataStore(ShardInventory, Protocol):
    """Records of a keyspace, one shard at a time."""

    key_type: KeyType

    def copy(self, keys: Sequence[bytes], source: str, target: str) -> list[CopyOutcome]:
        """Copy records from ``source`` to ``target``: one read, one target write transaction.

        Idempotent upsert keyed by the key, carrying the source version; a
        target record with a higher version is left alone.
        """
        ...

    def read(self, keys: Sequence[bytes], shard: str) -> dict[bytes, tuple[bytes, int]]:
        """``key -> (value, version)`` for the keys present on ``shard``."""
        ...

    def hashes(self, keys: Sequence[bytes], shard: str) -> dict[bytes, tuple[bytes, int]]:
        """``key -> (content_hash, version)`` for the keys present on ``shard``."""
        ...

    def key_sizes(self, keys: Sequence[bytes], shard: str) -> dict[bytes, int]:
        """``key -> value length in bytes`` for the keys present on ``shard``."""
        ...

    def delete(self, keys: Sequence[bytes], shard: str, *, versions: Sequence[int] | None = None) -> int:
        """Delete those records (only where the version matches, if given); idempotent."""
        ...

    def put_many(self, shard: str, rows: Iterable[tuple[bytes, bytes]]) -> int:
        """Write records (demo and tests), stamping fresh versions."""
        ...

    def close(self) -> None: ...


# ------------------------------------------------- shared by the map store adapters


def check_cutoff(cutoff, current: int) -> int:
    """The cutoff a snapshot exports at: ``current`` (the map's highest change
    number, read in the snapshot's transaction) or the caller's ``cutoff``.

    A cutoff above ``current`` would name changes that have not happened: bad
    input (exit 2), as is one that is not an integer >= 0.
    """
    if cutoff is None:
        return int(current)
    if isinstance(cutoff, bool) or not isinstance(cutoff, int) or cutoff < 0:
        raise BadInput(f"snapshot cutoff: expected a version (an integer >= 0), got {cutoff!r}")
    if cutoff > current:
        raise BadInput(f"snapshot cutoff {cutoff} is above the map store's current version {current}")
    return int(cutoff)


def swap_item(it) -> SwapItem:
    if isinstance(it, SwapItem):
        return it
    if len(it) == 3:
        return SwapItem(it[0], it[1], it[2], None)
    if len(it) == 4:
        return SwapItem(it[0], it[1], it[2], it[3])
    return SwapItem(it[0], it[1], it[2], it[3], bool(it[4]))


def utf8_column(raw: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """Binary -> string, with a validity mask (invalid UTF-8 rows become null)."""
    try:
        return raw.cast(pa.string()), np.ones(len(raw), dtype=bool)
    except pa.ArrowInvalid:
        out = []
        for v in raw.to_pylist():
            try:
                out.append(v.decode("utf-8"))
            except UnicodeDecodeError:
                out.append(None)
        arr = pa.array(out, pa.string())
        return arr, np.asarray(pc.is_valid(arr).to_numpy(zero_copy_only=False), dtype=bool)


class CountingSnapshot:
    """What every map snapshot shares: raw rows -> a SNAPSHOT_SCHEMA batch with rows
    whose key or shard id cannot be represented dropped and counted (never shown),
    and the row counts behind ``stats()``.  Subclasses set ``key_type``, ``cutoff``,
    ``_rows``, ``_invalid``, ``_above`` (None until read to the end) and
    ``_started``, and define ``_batches()`` and ``close()``; a snapshot is
    iterated once."""

    def _columns_to_batch(self, keys, shards, versions) -> pa.RecordBatch:
        canon, key_ok = canonical_from_texts(pa.array(keys, pa.binary()), self.key_type)
        shard_arr, shard_ok = utf8_column(pa.array(shards, pa.binary()))
        version_arr = pa.array(versions, pa.int64())
        if not shard_ok.all():
            # keys were already filtered by key_ok; align the shard mask to them.
            canon = canon.filter(pa.array(shard_ok[key_ok]))
        valid = key_ok & shard_ok
        if not valid.all():
            mask = pa.array(valid)
            shard_arr = shard_arr.filter(mask)
            version_arr = version_arr.filter(mask)
        self._invalid += len(keys) - int(valid.sum())
        self._rows += len(canon)
        return pa.RecordBatch.from_arrays([canon, shard_arr, version_arr], schema=SNAPSHOT_SCHEMA)

    @property
    def rows(self) -> int:
        return self._rows

    @property
    def invalid_keys(self) -> int:
        return self._invalid

    @property
    def rows_above_cutoff(self) -> int | None:
        """None until the export has been read to the end."""
        return self._above

    def stats(self) -> SnapshotStats:
        if self._above is None:
            raise RuntimeError("map snapshot not read to the end: its statistics are incomplete")
        return SnapshotStats(self.cutoff, self._rows, self._invalid, self._above)

    # -- one iteration, then closed (subclasses define _batches() and close())
    def _is_closed(self) -> bool:
        return self._conn is None  # the connection holding the snapshot's read transaction

    def __enter__(self) -> "CountingSnapshot":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __iter__(self) -> Iterator[pa.RecordBatch]:
        if self._started:
            raise RuntimeError("a map snapshot can be iterated only once")
        if self._is_closed():
            raise RuntimeError("map snapshot already closed")
        self._started = True
        return self._batches()
