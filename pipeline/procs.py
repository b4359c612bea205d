"""Processes of this host: is the one that left something behind still alive?

Never imports Beam.  A pid alone is not an identity (pids are reused), so an owner
is ``(host, pid, start time)``: the start time comes from ``/proc/<pid>/stat``.
"""
from __future__ import annotations

import os
import socket

__all__ = ["process_start_time", "owner_tag", "owner_gone"]


#: states of a task that has exited, although its /proc entry (and pid) still exists
_DEAD = ("Z", "X", "x")


def _stat(pid: int) -> tuple[str, str] | None:
    """``(state, start time)`` of ``pid`` from ``/proc/<pid>/stat``; None when it has no
    entry.  Raises OSError (or IndexError, a line that does not parse) when it cannot be
    read."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode("ascii", "replace")
    except FileNotFoundError:
        return None
    fields = data.rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, ...
    return fields[0], fields[19]


def process_start_time(pid: int) -> str | None:
    """Start time of a live process (clock ticks since boot, from /proc), or None if it is
    gone -- or dead but not yet reaped: a zombie (state ``Z``) or a dying task (``X``) has
    exited and holds nothing, although its /proc entry (and pid) still exists."""
    try:
        st = _stat(pid)
    except (OSError, IndexError):
        return None
    return None if st is None or st[0] in _DEAD else st[1]


def _pid_namespace() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def owner_tag() -> str:
    """``<host>~<pid namespace>~<pid>~<start time>`` of this process, for names of things it
    may leave behind."""
    pid = os.getpid()
    return f"{socket.gethostname()}~{_pid_namespace()}~{pid}~{process_start_time(pid) or 0}"


def owner_gone(tag: str) -> bool:
    """The process an :func:`owner_tag` names is known to be gone: it ran on this host, in
    this PID namespace (two containers may share a host name, not their pids), and no
    process has its pid and start time any more (its /proc entry is gone, or it is a zombie,
    or the pid was reused).  A tag of another host or namespace, one that does not parse, or
    a /proc entry that cannot be read is never known to be gone."""
    parts = tag.split("~")
    if len(parts) != 4 or not parts[1].isdigit() or not parts[2].isdigit():
        return False
    host, ns, pid, start = parts[0], int(parts[1]), int(parts[2]), parts[3]
    if host != socket.gethostname() or ns != _pid_namespace():
        return False
    if not os.path.isdir("/proc/self"):  # a system without /proc: the pid alone decides
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except OSError:
            return False
        return False
    try:
        st = _stat(pid)
    except (OSError, IndexError):
        return False
    return st is None or st[0] in _DEAD or st[1] != start
