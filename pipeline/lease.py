"""The executor lease: only one executor acts on a plan at a time.

``<plan>/lease.json`` records holder (host, pid, process start time), an
epoch and an expiry.  Acquiring bumps the epoch; the epoch stamps every
checkpoint transition of the run (and is what the merge rule orders runs
by).  A live lease held by someone else refuses the run (exit 4) naming the
holder and expiry; a holder proven dead on this host (pid gone, a zombie not yet
reaped, or the pid reused by a process with another start time) is taken over at once, any other holder
after its expiry.  The lease is kept after release (``released: true``) so
the epoch never goes back.

Commits are atomic (``fs.write_atomic`` locally under an exclusive lock
file; on gs:// a generation-matched replace) so two acquirers cannot both
win.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
from dataclasses import dataclass

from pipeline import fs
from pipeline import workdir
from pipeline.procs import process_start_time
from pipeline.errors import Refused

__all__ = ["Lease", "LeaseLost", "acquire", "live_holder", "read_lease", "process_start_time"]

FORMAT_VERSION = 1


class LeaseLost(Refused):
    """This executor's lease was taken over: it must not apply anything more."""

    nothing_modified = False  # raised mid-run, after work was done


def _holder_dead(holder: dict) -> bool:
    if holder.get("host") != socket.gethostname():
        return False
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return False
    st = process_start_time(pid)
    return st is None or st != holder.get("start_time")


def read_lease(plan_dir: str) -> dict | None:
    return _read_versioned(plan_dir)[0]


def _read_versioned(plan_dir: str) -> tuple[dict | None, int]:
    """(lease document or None, version for a compare-and-swap replace)."""
    data, version = fs.read_versioned(workdir.lease_path(plan_dir))
    if data is None:
        return None, version
    try:
        return json.loads(data), version
    except ValueError:
        return None, version


def _commit(plan_dir: str, doc: dict, version: int) -> None:
    """Replace lease.json only if it is still the version read (CAS; on gs:// by generation)."""
    try:
        fs.write_atomic(workdir.lease_path(plan_dir), json.dumps(doc).encode(), if_version=version)
    except fs.CommitConflict as e:
        raise LeaseLost("lease changed while it was being written (another executor raced this one)") from e


@contextlib.contextmanager
def _local_lock(plan_dir: str):
    if fs.is_gcs(plan_dir):
        yield
        return
    fd = os.open(os.path.join(plan_dir, ".lease.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


@dataclass
class Lease:
    plan_dir: str
    plan_id: str
    epoch: int
    ttl: float
    host: str
    pid: int
    start_time: str | None
    _stop: threading.Event | None = None
    _thread: threading.Thread | None = None
    lost: bool = False

    def _doc(self, released=False) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "plan_id": self.plan_id,
            "epoch": self.epoch,
            "holder": {"host": self.host, "pid": self.pid, "start_time": self.start_time},
            "expires_at": 0 if released else time.time() + self.ttl,
            "released": released,
        }

    def check(self) -> int:
        """Raise LeaseLost if another executor has taken the plan over; else the lease's version."""
        cur, version = _read_versioned(self.plan_dir)
        if cur is None or cur.get("epoch") != self.epoch or cur.get("released"):
            self.lost = True
            raise LeaseLost(f"lease lost: plan is now held by epoch {cur.get('epoch') if cur else '?'}")
        return version

    def renew(self) -> None:
        with _local_lock(self.plan_dir):
            version = self.check()
            _commit(self.plan_dir, self._doc(), version)

    def start_renewing(self, also=None) -> None:
        """Renew every ttl/3 in a thread; ``also()`` renews other claims (the map store's)."""
        self._stop = threading.Event()

        def loop():
            while not self._stop.wait(self.ttl / 3):
                try:
                    self.renew()
                    if also is not None:
                        also()
                except LeaseLost:
                    self.lost = True
                    return
                except Exception:  # transient storage error: try again next tick
                    continue

        self._thread = threading.Thread(target=loop, name="lease-renewal", daemon=True)
        self._thread.start()

    def release(self) -> None:
        if self._stop is not None:
            self._stop.set()
            if self._thread is not None:
                self._thread.join(timeout=5)
        with _local_lock(self.plan_dir):
            cur, version = _read_versioned(self.plan_dir)
            if cur is not None and cur.get("epoch") == self.epoch:
                try:
                    _commit(self.plan_dir, self._doc(released=True), version)
                except LeaseLost:
                    pass  # someone took it over meanwhile: theirs now


def acquire(plan_dir: str, plan_id: str, ttl: float, *, min_epoch: int = 0, now=time.time) -> Lease:
    host = socket.gethostname()
    pid = os.getpid()
    start = process_start_time(pid)
    with _local_lock(plan_dir):
        cur, version = _read_versioned(plan_dir)
        epoch = max(min_epoch, 0)
        if cur is not None:
            epoch = max(epoch, int(cur.get("epoch", 0)))
            holder = cur.get("holder") or {}
            live = not cur.get("released") and cur.get("expires_at", 0) > now()
            if live and not _holder_dead(holder):
                expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(cur.get("expires_at", 0)))
                raise Refused(
                    f"plan is leased by {holder.get('host')}:{holder.get('pid')} (epoch {cur.get('epoch')}) "
                    f"until {expires}"
                )
        lease = Lease(plan_dir, plan_id, epoch + 1, ttl, host, pid, start)
        try:
            _commit(plan_dir, lease._doc(), version)
        except LeaseLost as e:
            raise Refused("another executor took the plan's lease at the same moment; try again") from e
    return lease


def live_holder(plan_dir: str, *, now=time.time) -> str | None:
    """Who holds the plan's lease now (the refusal ``acquire`` would give), or
    None when nobody does: no lease, released, expired, or its holder proven
    dead on this host.  Reads only; takes nothing."""
    cur = read_lease(plan_dir)
    if cur is None or cur.get("released") or cur.get("expires_at", 0) <= now():
        return None
    holder = cur.get("holder") or {}
    if _holder_dead(holder):
        return None
    expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(cur.get("expires_at", 0)))
    return f"{holder.get('host')}:{holder.get('pid')} (epoch {cur.get('epoch')}) until {expires}"
