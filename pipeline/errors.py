"""Exit codes (CONTRACTS "Exit status") and the exception taxonomy.

Error messages say what, where and how many -- never a key value.
"""
from __future__ import annotations

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
    "TransientError",
    "PermanentError",
    "SourceMissing",
]

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_BAD_INPUT = 2
EXIT_FAILED_KEYS = 3
EXIT_REFUSED = 4
EXIT_IN_PROGRESS = 5
EXIT_INTERRUPTED = 130


class ShardmoveError(Exception):
    """An error with a one-line, key-free message and an exit code."""

    exit_code = EXIT_INTERNAL


class BadInput(ShardmoveError):
    """Bad input or configuration; nothing was modified (exit 2)."""

    exit_code = EXIT_BAD_INPUT


class Refused(ShardmoveError):
    """Lease held elsewhere, capacity exceeded, drift detected (exit 4)."""

    exit_code = EXIT_REFUSED


class Interrupted(ShardmoveError):
    """SIGINT/SIGTERM: checkpoints flushed, resumable (exit 130)."""

    exit_code = EXIT_INTERRUPTED


# ------------------------------------------------------- store-level taxonomy

class StoreError(Exception):
    """Base of the mover / swapper taxonomy.  ``reason`` is a short code."""

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
