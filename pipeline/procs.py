"""Processes of this host: is the one that left something behind still alive?

Never imports Beam.  A pid alone is not an identity (pids are reused), so an owner
is ``(host, pid, start time)``: the start time comes from ``/proc/<pid>/stat``.
"""
from __future__ import annotations

import os
import socket

__all__ = ["process_start_time", "owner_tag", "owner_gone"]


def process_start_time(pid: int) -> str | None:
    """Start time of a live process (clock ticks since boot, from /proc), or None if it is
    gone -- or dead but not yet reaped: a zombie (state ``Z``) or a dying task (``X``) has
    exited and holds nothing, although its /proc entry (and pid) still exists."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode("ascii", "replace")
        fields = data.rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, ...
        if fields[0] in ("Z", "X", "x"):
            return None
        return fields[19]
    except (OSError, IndexError):
        return None


def owner_tag() -> str:
    """``<host>~<pid>~<start time>`` of this process, for names of things it may leave behind."""
    return f"{socket.gethostname()}~{os.getpid()}~{process_start_time(os.getpid()) or 0}"


def owner_gone(tag: str) -> bool:
    """The process an :func:`owner_tag` names is known to be gone: it ran on this host and
    no live process has its pid and start time.  Another host's, or a tag that does not
    parse, is never known to be gone."""
    host, sep, rest = tag.partition("~")
    pid, sep2, start = rest.partition("~")
    if not (sep and sep2 and pid.isdigit()) or host != socket.gethostname():
        return False
    now = process_start_time(int(pid))
    if now is not None:
        return now != start
    if os.path.isdir("/proc/self"):
        return True  # no live process with that pid (or a zombie: it holds nothing)
    try:  # a system without /proc: the pid alone, and never "gone" when unsure
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False
