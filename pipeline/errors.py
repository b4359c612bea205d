"""Exit codes (CONTRACTS "Exit status") and the exception taxonomy.

Error messages say what, where and how many -- never a key value.

One tree: every error shardmove raises on purpose is a
:class:`ShardmoveError` and carries its exit code; the CLI prints its message
as one ``error:`` line.  Exit 1 with ``internal failure`` is left for bugs
(any other exception).  Store errors (:class:`StoreError`) are environment
errors: exit 1 with a message that names what failed and where -- except
inside :func:`before_changes`, the phase of a command before it modifies
anything, where a store that cannot be opened, reached, authenticated or
read (missing database or table, wrong schema, not a database) is bad
configuration: exit 2, nothing modified.
"""
from __future__ import annotations

import contextlib
import re

__all__ = [
    "EXIT_OK",
    "EXIT_INTERNAL",
    "EXIT_BAD_INPUT",
    "EXIT_FAILED_KEYS",
    "EXIT_REFUSED",
    "EXIT_IN_PROGRESS",
    "EXIT_INTERRUPTED",
    "ShardmoveError",
    "BadInput",
    "Refused",
    "Interrupted",
    "StoreError",
    "StoreConfigError",
    "TransientError",
    "PermanentError",
    "SourceMissing",
    "ConfigurationError",
    "RunHalted",
    "CommitConflict",
    "CONFIG_REASONS",
    "before_changes",
    "redact",
]

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_BAD_INPUT = 2
EXIT_FAILED_KEYS = 3
EXIT_REFUSED = 4
EXIT_IN_PROGRESS = 5
EXIT_INTERRUPTED = 130


class ShardmoveError(Exception):
    """An error with a one-line, key-free message and an exit code.

    ``nothing_modified``: raised before the command changed anything (a
    refusal); the command leaves the work directory as it found it and adds
    no history record."""

    exit_code = EXIT_INTERNAL
    nothing_modified = False


class BadInput(ShardmoveError):
    """Bad input or configuration; nothing was modified (exit 2)."""

    exit_code = EXIT_BAD_INPUT
    nothing_modified = True


class Refused(ShardmoveError):
    """Lease held elsewhere, capacity exceeded, drift detected (exit 4)."""

    exit_code = EXIT_REFUSED
    nothing_modified = True


class Interrupted(ShardmoveError):
    """SIGINT/SIGTERM: checkpoints flushed, resumable (exit 130)."""

    exit_code = EXIT_INTERRUPTED


# ------------------------------------------------------- store-level taxonomy

class StoreError(ShardmoveError):
    """Base of the mover / swapper taxonomy.  ``reason`` is a short code.

    An environment error (exit 1, its message printed); inside
    :func:`before_changes` a configuration error (exit 2) unless the store was
    merely busy.  Messages never hold a key or a password."""

    reason = "store_error"

    def __init__(self, message: str = "", reason: str | None = None):
        super().__init__(message or self.reason)
        if reason:
            self.reason = reason


class TransientError(StoreError):
    """Retry eligible: timeouts, locks, connection resets."""

    reason = "transient"


class PermanentError(StoreError):
    """Not retried: the key is marked Failed with ``reason``."""

    reason = "permanent"


class SourceMissing(PermanentError):
    reason = "source_missing"


class ConfigurationError(PermanentError):
    """A store cannot serve a shard as configured: a missing database, schema,
    table or column, a refused permission, a shard file, directory or bucket
    that is not there.  Raised by the stores' error classifiers (PostgreSQL
    SQLSTATE 42P01/42703/3F000/3D000/42501/28xxx, SQLite "no such table" and
    read-only files, object-store 403/404 and EACCES); ``reason`` keeps the
    store's short code (``schema``, ``permission``, ``cannot_connect``...).

    Not a per-key outcome, so no key is ever Failed for it: before a command
    modifies anything it is bad configuration (exit 2, :func:`before_changes`);
    during a run it stops the run (:class:`RunHalted`, exit 1) with every key
    left in its state, and a rerun resumes once the store is fixed."""

    reason = "schema"


class RunHalted(ShardmoveError):
    """A run stopped by a :class:`ConfigurationError` found while it ran (exit 1):
    checkpoints flushed, claim and lease released, no key Failed for it."""

    exit_code = EXIT_INTERNAL


#: Store failures that, before anything is modified, mean the configuration
#: points at the wrong thing (or at something unreachable): exit 2.  Busy
#: stores (locks, serialization conflicts) are not in it: rerunning helps.
CONFIG_REASONS = frozenset({
    "cannot_connect", "cannot_open", "connection", "timeout", "not_a_database", "map_missing", "schema",
    "permission", "shard_missing", "store_error", "permanent", "closed",
})


class StoreConfigError(BadInput):
    """A store a command could not use before it modified anything (exit 2)."""


@contextlib.contextmanager
def before_changes():
    """The phase of a command before anything is modified: a store that cannot
    be opened, reached, authenticated or read here is bad configuration (exit
    2, same message).  Nested use is harmless."""
    try:
        yield
    except StoreError as e:
        if isinstance(e, ConfigurationError) or e.reason in CONFIG_REASONS:
            raise StoreConfigError(str(e)) from e
        raise


_URI_USERINFO = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.\-]*://[^:/@?#\s]*):[^@/?#\s]*@")
_QUERY_PW = re.compile(r"([?&]password=)[^&#\s]*", re.IGNORECASE)
_KV_PW = re.compile(r"(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s']+)", re.IGNORECASE)


def redact(text: str) -> str:
    """``text`` with every password-looking part of a DSN or URL replaced by
    ``***``: the last line of defence before anything is printed."""
    text = _URI_USERINFO.sub(lambda m: m.group(1) + ":***@", str(text))
    text = _QUERY_PW.sub(lambda m: m.group(1) + "***", text)
    return _KV_PW.sub(lambda m: m.group(1) + "***", text)


class CommitConflict(RuntimeError):
    """create-if-absent found an object with different content (or a stale replace).

    Raised by :mod:`pipeline.fs` and :mod:`pipeline.gcs`; re-exported as
    ``pipeline.fs.CommitConflict``.
    """
