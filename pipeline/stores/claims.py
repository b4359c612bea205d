"""The run-claim rule, defined once: may (plan, epoch) claim a map store's run registry?

Every map store with a run registry (:class:`~pipeline.stores.base.RunRegistry`)
keeps one row per plan: ``(plan_id, epoch, window_lo, window_hi, holder,
expires_at)``.  A claim is decided against all of them by :func:`decide_claim`,
a pure function; the SQLite and PostgreSQL stores call it inside their claim
transaction, and the Redis store's claim script implements the same rule in Lua
(one atomic script).  ``tests/test_claim_rule.py`` checks all three against
this function over one table of cases.

The rule, in the order it is applied:

1. the same plan registered with a NEWER epoch -> ``newer``: this executor
   has been superseded (:class:`~pipeline.lease.LeaseLost`), whether or not
   that claim is live;
2. another plan with a LIVE claim (``expires_at > now``) whose key window
   overlaps this one (both ends inclusive) -> ``overlap``
   (:class:`~pipeline.errors.Refused`); when several do, the one with the
   smallest plan id (by its UTF-8 bytes) is named;
3. otherwise ``ok``: the row of this plan is written (inserted, or replaced
   when it held the same or an older epoch) with ``expires_at = now + ttl``.

Never imports Beam.  No key value is involved: windows are ring positions.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable, Optional

from pipeline.errors import Refused
from pipeline.lease import LeaseLost

__all__ = ["ClaimRow", "ClaimDecision", "decide_claim", "raise_for", "renew_holds"]


@dataclass(frozen=True)
class ClaimRow:
    """One plan's registered claim."""

    plan_id: str
    epoch: int
    lo: int
    hi: int
    holder: str
    expires_at: float


@dataclass(frozen=True)
class ClaimDecision:
    """``kind`` is ``ok``, ``newer`` or ``overlap``; ``row`` is the claim that decided it
    (None for ``ok``)."""

    kind: str
    row: Optional[ClaimRow] = None


def decide_claim(plan_id: str, epoch: int, window: tuple[int, int], now: float,
                 rows: Iterable[ClaimRow]) -> ClaimDecision:
    """The claim rule (module docstring) over the registry's rows; pure."""
    rows = list(rows)
    for r in rows:
        if r.plan_id == plan_id and r.epoch > epoch:
            return ClaimDecision("newer", r)
    lo, hi = int(window[0]), int(window[1])
    blocking = [r for r in rows
                if r.plan_id != plan_id and r.expires_at > now and r.lo <= hi and lo <= r.hi]
    if blocking:
        return ClaimDecision("overlap", min(blocking, key=lambda r: r.plan_id.encode()))
    return ClaimDecision("ok")


def renew_holds(row: Optional[ClaimRow], epoch: int) -> bool:
    """A renewal (or a fenced swap) holds only while the plan's row carries this epoch."""
    return row is not None and row.epoch == epoch


def _iso(t: float) -> str:
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(t)))
    except (OverflowError, ValueError, OSError):
        return "?"


def raise_for(decision: ClaimDecision, plan_id: str) -> None:
    """Raise what a refused claim means (the one wording for every store); return on ``ok``."""
    r = decision.row
    if decision.kind == "newer":
        raise LeaseLost(f"plan {plan_id[:12]} is already claimed by a newer executor (epoch {r.epoch})")
    if decision.kind == "overlap":
        raise Refused(f"plan {r.plan_id[:12]} (held by {r.holder}) may move the same keys and is running "
                      f"on this map store until {_iso(r.expires_at)}; refusing to run plan {plan_id[:12]}")
