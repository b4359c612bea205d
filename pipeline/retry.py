"""The one retry schedule: exponential backoff with equal jitter, capped.

Attempt ``n`` (0 = the first retry) waits ``d/2 + U(0, d/2)`` seconds, where
``d = min(30 s, retry_base_delay * 2**n)``: equal jitter.  Half of the delay
is kept, so a retry never comes back at once into the outage it waits out;
the other half is random, so the workers that failed together do not retry
together.  A schedule gives up after ``max_retries`` retries.

Only transient errors are retried (:func:`is_transient`): the stores'
:class:`~pipeline.errors.TransientError` (every store classifies its
library's errors into it), plus the library errors that are transient by
their class, should one reach a caller unclassified.

Beam-free and import-light: a library's classes are looked at only when that
library is already imported (an error of a library never imported cannot be
raised).
"""
from __future__ import annotations

import math
import random
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

from pipeline.errors import TransientError

__all__ = ["MAX_DELAY_S", "RetrySchedule", "backoff_delay", "is_transient", "TRANSIENT_LIBRARY_ERRORS"]

#: The cap on any one wait, in seconds.
MAX_DELAY_S = 30.0

#: Library exception classes that are transient whatever their message, by module and name.
TRANSIENT_LIBRARY_ERRORS: tuple[tuple[str, str], ...] = (
    ("redis.exceptions", "ConnectionError"),
    ("redis.exceptions", "TimeoutError"),
    ("redis.exceptions", "BusyLoadingError"),
    ("psycopg.errors", "SerializationFailure"),  # SQLSTATE 40001
    ("psycopg.errors", "DeadlockDetected"),  # 40P01
    ("psycopg.errors", "LockNotAvailable"),  # 55P03 (lock_timeout)
    ("psycopg.errors", "QueryCanceled"),  # 57014 (statement_timeout)
    ("psycopg", "InterfaceError"),  # a connection lost under us
    ("google.api_core.exceptions", "RetryError"),  # the client's own retries ran out
    ("google.api_core.exceptions", "TooManyRequests"),
    ("google.api_core.exceptions", "RequestTimeout"),
    ("google.api_core.exceptions", "InternalServerError"),
    ("google.api_core.exceptions", "BadGateway"),
    ("google.api_core.exceptions", "ServiceUnavailable"),
    ("google.api_core.exceptions", "GatewayTimeout"),
)


def _library_classes() -> tuple[type, ...]:
    out = []
    for module, name in TRANSIENT_LIBRARY_ERRORS:
        mod = sys.modules.get(module)
        cls = getattr(mod, name, None) if mod is not None else None
        if isinstance(cls, type):
            out.append(cls)
    return tuple(out)


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is worth retrying: a TransientError, a library error that is transient
    by its class, or SQLite's busy/locked (its only transient condition)."""
    if isinstance(exc, TransientError):
        return True
    if isinstance(exc, _library_classes()):
        return True
    sqlite3 = sys.modules.get("sqlite3")
    if sqlite3 is not None and isinstance(exc, sqlite3.OperationalError):
        msg = str(exc).lower()
        return "locked" in msg or "busy" in msg
    return False


def backoff_delay(attempt: int, base_delay: float, *, cap: float = MAX_DELAY_S,
                  rng: random.Random | None = None) -> float:
    """Seconds to wait before retry ``attempt`` (0-based): equal jitter on
    ``min(cap, base_delay * 2**attempt)``, so within [d/2, d]."""
    if attempt < 0:
        raise ValueError("attempt must be >= 0")
    ceiling = min(cap, math.ldexp(base_delay, min(attempt, 1000)))  # base * 2**attempt, never overflowing
    u = (rng or random).random()
    return ceiling / 2 + u * ceiling / 2


@dataclass(frozen=True)
class RetrySchedule:
    """``max_retries`` retries of transient errors, waiting :func:`backoff_delay` between.

    Picklable (it travels inside a Beam DoFn); ``rng`` and ``sleep`` are
    arguments, not state, so tests can seed and record them."""

    base_delay: float
    max_retries: int
    cap: float = MAX_DELAY_S

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        return backoff_delay(attempt, self.base_delay, cap=self.cap, rng=rng)

    def exhausted(self, attempt: int) -> bool:
        """True when retry ``attempt`` would be one too many."""
        return attempt >= self.max_retries

    def wait(self, attempt: int, *, sleep: Callable[[float], Any] = time.sleep,
             rng: random.Random | None = None) -> None:
        sleep(self.delay(attempt, rng))

    def call(self, fn: Callable[..., Any], *args: Any,
             retry_on: Callable[[BaseException], bool] = is_transient,
             on_retry: Callable[[BaseException, int], Any] | None = None,
             sleep: Callable[[float], Any] = time.sleep,
             rng: random.Random | None = None) -> Any:
        """``fn(*args)``, retried on ``retry_on`` errors; the last one is raised."""
        attempt = 0
        while True:
            try:
                return fn(*args)
            except Exception as e:  # noqa: BLE001 - filtered: everything else is raised as it is
                if not retry_on(e) or self.exhausted(attempt):
                    raise
                if on_retry is not None:
                    on_retry(e, attempt)
                self.wait(attempt, sleep=sleep, rng=rng)
                attempt += 1
