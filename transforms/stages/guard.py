"""The map guard: the map, not the data, says where a key lives.

Every stage asks it before touching data: a key the map already routes to its
target was swapped (by an earlier run, or by this retried bundle) and is
confirmed by the swap -- never copied, verified or failed again, since the
target holds the application's newer writes.
"""
from __future__ import annotations

from pipeline import states as S
from pipeline.errors import ConfigurationError, StoreError
from transforms.stages.common import Chunk, StageContext

__all__ = ["MapGuard"]


class MapGuard:
    """Map lookups of a chunk's rows, on behalf of a stage."""

    def __init__(self, ctx: StageContext):
        self._ctx = ctx

    def keep_at_source(self, ch: Chunk, todo: list) -> list:
        """Only copy keys still mapped to their source: a late (duplicated) copy
        after the swap must never overwrite writes made on the target.  Keys
        already at their target (a lost Done) go to the swap, which confirms them.

        Fails closed: when the map cannot be read (after the retries) nothing is
        copied and the error fails the bundle -- a retried bundle may follow its
        own swaps, so copying unchecked could overwrite the target's newer writes.
        A configuration error (the map's table gone, a permission refused) halts the
        run instead (nothing to copy: ``[]``)."""
        keys, target = ch.keys, ch.target
        try:
            # a store that can answer "which of these are at the target" (SQLite) returns
            # only those: far less to build and decode than every key's shard and version
            keys_at = getattr(self._ctx.map, "keys_at", None)
            if keys_at is not None:
                there = self._ctx.retry_io(keys_at, [keys[i] for i in todo], target)
                at_target = [i for i in todo if keys[i] in there] if there else []
            else:
                current = self._ctx.retry_io(self._ctx.map.lookup, [keys[i] for i in todo])
                none = (None,)
                at_target = [i for i in todo if current.get(keys[i], none)[0] == target]
        except ConfigurationError as e:
            self._ctx.halt(e)
            return []
        if not at_target:
            return todo
        self.confirm_at_target(ch, at_target)
        gone = set(at_target)
        return [i for i in todo if i not in gone]

    def confirm_at_target(self, ch: Chunk, rows: list) -> None:
        """Rows found at their target: Verified(already_swapped), for the swap to confirm
        (a Copied key gets there through Verifying, as the state machine has it)."""
        if not rows:
            return
        self._ctx.record(ch, [i for i in rows if ch.states[i] == S.State.COPIED], S.State.VERIFYING)
        self._ctx.record(ch, rows, S.State.VERIFIED, method=S.VERIFY_ALREADY)

    def spare_swapped(self, ch: Chunk, rows: list) -> list:
        """Of ``rows`` about to be Failed for their data (copy or verification), those the
        map already routes to their target are migrated: the map is the truth, and the
        target holds the application's newer writes.  They become Verified(already_swapped),
        never Failed; the rest are returned.  A map that cannot be read spares nothing."""
        if not rows:
            return rows
        try:
            current = self._ctx.retry_io(self._ctx.map.lookup, [ch.keys[i] for i in rows])
        except StoreError:
            return rows
        at_target = [i for i in rows if current.get(ch.keys[i], (None,))[0] == ch.target]
        self.confirm_at_target(ch, at_target)
        gone = set(at_target)
        return [i for i in rows if i not in gone]

    def close(self) -> None:
        pass
