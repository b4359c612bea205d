"""The per-key migration state machine (migration usage guide, "Execution Flow").

    Planned -> Copying -> Copied -> Verifying -> Verified -> Swapping -> Done | Failed

Plain Python; never imports Beam.  ``State`` is an ``IntEnum`` whose value is
the state's *rank*: the checkpoint stores it as ``int8`` and the merge rule
(:mod:`pipeline.checkpoint`) compares ranks, so the numbering is part of the
checkpoint wire format and must never be renumbered.

``str(state)`` is the lowercase name used in summaries and JSON
(``"copied"``); ``state.label`` is the capitalised name used in the guide and
in human-readable reports (``"Copied"``).

Transitions
-----------
``TRANSITIONS`` lists, for every state, the states a key may move to next
*within one run* (one epoch).  Besides the forward path it holds:

* retry loops: ``copying -> copying`` (a transient copy error, re-attempted
  with ``attempts + 1``), ``verifying -> verifying`` (a transient verify
  error), ``swapping -> swapping`` (a transient swap error; the swap is a
  compare-and-set on the expected source, so repeating it is safe);
* re-copy: ``verifying -> copying`` after a verify mismatch while copy
  attempts remain (the copy is an idempotent upsert), and
  ``verified -> copying`` when the source record changed after it was
  verified (its version moved before the swap), so stale data is never swapped.
  The write fence finds that change while the key is Swapping: the swap did
  not happen, so the key is first rolled back (``swapping -> verified``),
  then re-copied, and re-verified through ``copied -> verifying``;
* roll-back: ``swapping -> verified`` when a swap batch was rolled back and
  the key is re-queued for another batch (it keeps its attempts, so the
  merged checkpoint shows Swapping until the key moves on; harmless, since a
  resumed Swapping key repeats the swap's compare-and-set);
* already at target: ``planned -> verified`` / ``copying -> verified`` /
  ``verifying -> verified`` (with verify method ``already_swapped``) when the
  shard map already routes the key to its target -- an earlier run's swap
  applied but its later records were lost with an unflushed checkpoint
  buffer; the swap's compare-and-set then confirms it as Done.  A Copied key
  gets there through Verifying (``copied -> verifying``, its resume entry);
  a key is looked up before it is copied or verified and again before a copy
  or verification failure is recorded, so a migrated key is never Failed;
* ``-> failed`` from every non-terminal state, with a reason code.

``Done`` and ``Failed`` are terminal within an epoch.

The table is enforced where transitions are written: the executor passes
the state each key leaves with every record, and
:class:`pipeline.checkpoint.CheckpointWriter` refuses what the table does
not allow (:func:`check_transitions`, a :class:`TransitionError`: exit 1).

Resume
------
A later run (a new epoch) continues each key from the state the merged
checkpoint holds; ``RESUME_ENTRY`` names the first state it records for it,
and every entry is itself an allowed transition of ``TRANSITIONS``:
an interrupted ``Copying``/``Verifying``/``Swapping`` is simply repeated
(all three operations are idempotent), ``Copied`` goes on to ``Verifying``,
``Verified`` to ``Swapping``.  ``Done`` keys are never touched again.
``Failed`` keys stay Failed unless the run is started with
``--retry-failed``: then the key starts over as Planned -- ``failed -> copying``
(``RETRY_FAILED_ENTRY``), or ``failed -> verified`` when it is found at its
target -- and, because the new epoch's record supersedes every earlier one, the
key is reset.
"""
from __future__ import annotations

import enum
import types
from typing import Mapping

from pipeline.errors import ShardmoveError

__all__ = [
    "State",
    "TRANSITIONS",
    "RESUME_ENTRY",
    "RETRY_FAILED_ENTRY",
    "TERMINAL",
    "ranks",
    "TransitionError",
    "check_transition",
    "check_transitions",
    "can_transition",
    "is_terminal",
    "resume_entry",
    "SOURCE_MISSING",
    "SHARD_MISSING",
    "COPY_FAILED",
    "VERIFY_MISMATCH",
    "VERIFY_FAILED",
    "MAP_CHANGED",
    "SWAP_FAILED",
    "SOURCE_CHANGING",
    "DRIFTED",
    "PERMANENT",
    "KEY_TOO_LONG",
    "CONSTRAINT",
    "REASONS",
    "failure_reason",
    "VERIFY_FULL",
    "VERIFY_HASH",
    "VERIFY_SAMPLED",
    "VERIFY_FORCED",
    "VERIFY_UNCHECKED",
    "VERIFY_ALREADY",
    "VERIFY_METHODS",
]


class State(enum.IntEnum):
    """A key's migration state; the value is its rank (stored as int8)."""

    PLANNED = 0
    COPYING = 1
    COPIED = 2
    VERIFYING = 3
    VERIFIED = 4
    SWAPPING = 5
    DONE = 6
    FAILED = 7

    def __str__(self) -> str:  # "copied": summaries, JSON, CLI
        return self.name.lower()

    def __format__(self, spec: str) -> str:
        if spec and spec[-1] in "bcdoxXn":  # numeric format asked for: the rank
            return format(int(self), spec)
        return format(str(self), spec)

    @property
    def label(self) -> str:
        """The capitalised name used in the guide: ``"Copied"``."""
        return self.name.capitalize()

    @classmethod
    def parse(cls, value: "str | int | State") -> "State":
        """A state from its rank or its name in any case (``"Copied"``, ``"copied"``)."""
        if isinstance(value, State):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            try:
                return cls(value)
            except ValueError:
                raise ValueError(f"state rank must be 0..{len(cls) - 1} (got {value})") from None
        if isinstance(value, str):
            try:
                return cls[value.strip().upper()]
            except KeyError:
                pass
        names = ", ".join(str(s) for s in cls)
        raise ValueError(f"state must be one of {names} (got {value!r})")


P, CG, CD, VG, VD, SG, D, F = State  # local shorthands for the table

#: Allowed next states within one run (one epoch).
TRANSITIONS: Mapping[State, frozenset[State]] = types.MappingProxyType({
    P: frozenset({CG, VD, F}),                 # copy, already at target, fatal
    CG: frozenset({CG, CD, VD, F}),            # retry loop, success, already at target, fatal
    CD: frozenset({VG, F}),
    VG: frozenset({VG, VD, CG, F}),            # retry loop, success, re-copy after mismatch, fatal
    VD: frozenset({SG, CG, F}),                # swap, re-copy (source changed), fatal
    SG: frozenset({SG, D, VD, F}),             # retry loop, success, batch rolled back, fatal
    D: frozenset(),
    F: frozenset(),
})

TERMINAL: frozenset[State] = frozenset({D, F})


def ranks(*states: State) -> frozenset[int]:
    """The plain int ranks of ``states``: a chunk holds its rows' states as ints, and
    testing an int against a set of ints is cheaper than against a set of enum members."""
    return frozenset(int(s) for s in states)


#: First state a resumed run records for a key found in the given state
#: (``None``: the key is not worked on).
RESUME_ENTRY: Mapping[State, "State | None"] = types.MappingProxyType({
    P: CG,
    CG: CG,    # interrupted copy: copy again (idempotent upsert)
    CD: VG,
    VG: VG,    # interrupted verification: verify again
    VD: SG,
    SG: SG,    # interrupted swap: compare-and-set again (already applied -> Done)
    D: None,
    F: None,   # unless --retry-failed, see RETRY_FAILED_ENTRY
})

#: With ``--retry-failed`` a Failed key restarts here, in the new epoch.
RETRY_FAILED_ENTRY: State = CG


class TransitionError(ShardmoveError):
    """A transition the state machine does not allow: a bug in the caller (exit 1)."""


def is_terminal(state: "State | int") -> bool:
    return State(state) in TERMINAL


def can_transition(a: "State | int", b: "State | int", *, retry_failed: bool = False) -> bool:
    """Whether a key in state ``a`` may next record state ``b``.

    ``retry_failed`` (a new epoch started with ``--retry-failed``): a Failed
    key starts over as Planned, so it may go wherever a Planned key may --
    ``failed -> copying`` (:data:`RETRY_FAILED_ENTRY`), or ``failed -> verified``
    (``already_swapped``) when the map already routes it to its target.
    """
    a, b = State(a), State(b)
    if retry_failed and a is State.FAILED:
        return b in TRANSITIONS[State.PLANNED]
    return b in TRANSITIONS[a]


def check_transition(a: "State | int", b: "State | int", *, retry_failed: bool = False) -> None:
    """Raise :class:`TransitionError` unless ``a -> b`` is allowed."""
    if not can_transition(a, b, retry_failed=retry_failed):
        a, b = State(a), State(b)
        allowed = ", ".join(str(s) for s in sorted(TRANSITIONS[a])) or "nothing (terminal)"
        raise TransitionError(
            f"state transition {a} -> {b} is not allowed (from {a}: {allowed})"
        )


def _allowed_matrix(retry_failed: bool):
    """``m[a, b]``: whether ``a -> b`` is allowed (:func:`can_transition`), as a numpy table."""
    import numpy as np

    m = np.zeros((len(State), len(State)), dtype=bool)
    for a in State:
        for b in State:
            m[int(a), int(b)] = can_transition(a, b, retry_failed=retry_failed)
    m.setflags(write=False)
    return m


_ALLOWED: dict = {}


def check_transitions(prev, state: "State | int", *, retry_failed: bool = False) -> None:
    """Raise :class:`TransitionError` unless every ``prev[i] -> state`` is allowed.

    ``prev``: the states (ranks) the keys were in, one per transition recorded (a
    sequence or an integer array; checked in one table look-up per call).  The
    message counts the offending transitions by kind; it never names a key."""
    import numpy as np

    b = State(int(state))
    p = np.asarray(prev)
    if p.size == 0:
        return
    if p.dtype.kind not in "iub":
        p = np.array([int(a) for a in prev], dtype=np.int64)
    p = p.astype(np.int64, copy=False).ravel()
    lo, hi = int(p.min()), int(p.max())
    if lo < 0 or hi >= len(State):
        State(lo if lo < 0 else hi)  # raises ValueError: not a state rank
    m = _ALLOWED.get(retry_failed)
    if m is None:
        m = _ALLOWED[retry_failed] = _allowed_matrix(retry_failed)
    ok = m[p, int(b)]
    if ok.all():
        return
    ranks, counts = np.unique(p[~ok], return_counts=True)
    kinds = ", ".join(f"{int(n)} x {State(int(a))} -> {b}" for a, n in zip(ranks, counts))
    raise TransitionError(f"state transitions not allowed by the state machine: {kinds}")


def resume_entry(found: "State | int", *, retry_failed: bool = False) -> "State | None":
    """The first state a resumed run records for a key whose checkpoint says ``found``."""
    found = State(found)
    if found is State.FAILED and retry_failed:
        return RETRY_FAILED_ENTRY
    return RESUME_ENTRY[found]


# ------------------------------------------------------------- reason codes
# Stored in the checkpoint's ``reason`` column (mostly on Failed records; a
# retry record may carry the reason of the attempt that preceded it).  A Failed
# record holds one of REASONS and nothing else (:func:`failure_reason`); the
# README lists each with its meaning.  A store's configuration error (a missing
# table, a refused permission) is no key's reason: it stops the run instead.

SOURCE_MISSING = "source_missing"     # the key has no record on its source shard
SHARD_MISSING = "shard_missing"       # the source or target shard does not exist
COPY_FAILED = "copy_failed"           # copy retries exhausted
VERIFY_MISMATCH = "verify_mismatch"   # target differs from source after every re-copy
VERIFY_FAILED = "verify_failed"       # verification could not run (retries exhausted)
MAP_CHANGED = "map_changed"           # the shard map no longer holds the expected source
SWAP_FAILED = "swap_failed"           # swap retries exhausted / batch could not apply
SOURCE_CHANGING = "source_changing"   # the source record kept changing during the move
DRIFTED = "drifted"                   # the keyspace drifted from the plan's snapshot
PERMANENT = "permanent"               # any other permanent store error
KEY_TOO_LONG = "key_too_long"         # the key cannot be named on the target (object-name limit)
CONSTRAINT = "constraint"             # the target refused the key's rows (a constraint of its tables)

REASONS: frozenset[str] = frozenset({
    SOURCE_MISSING, SHARD_MISSING, COPY_FAILED, VERIFY_MISMATCH, VERIFY_FAILED,
    MAP_CHANGED, SWAP_FAILED, SOURCE_CHANGING, DRIFTED, PERMANENT, KEY_TOO_LONG, CONSTRAINT,
})


def failure_reason(code: "str | None") -> str:
    """The Failed reason for a store error's ``reason`` code: itself when it is one of
    :data:`REASONS`, else :data:`PERMANENT` (the store's message is logged where it occurs)."""
    return code if code in REASONS else PERMANENT

# ------------------------------------------------------- verification methods
# Stored in the checkpoint's ``verify_method`` column of Verified/Done records.

VERIFY_FULL = "full"
VERIFY_HASH = "hash"
VERIFY_SAMPLED = "sampled"
VERIFY_FORCED = "forced"   # force_swap_on_verification_failure let a mismatch through
VERIFY_UNCHECKED = "unchecked"   # sampled mode: outside the sample of a batch whose sample passed
VERIFY_ALREADY = "already_swapped"  # found at its target before copying (an earlier run's lost Done)

VERIFY_METHODS: frozenset[str] = frozenset(
    {VERIFY_FULL, VERIFY_HASH, VERIFY_SAMPLED, VERIFY_FORCED, VERIFY_UNCHECKED, VERIFY_ALREADY})

del P, CG, CD, VG, VD, SG, D, F
