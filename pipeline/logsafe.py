"""No key bytes at any log level: the rules every log record goes through.

Never imports Beam.  Where key bytes could reach a log, and what stops them:

1. **Beam's worker loggers print elements at DEBUG.**  ``apache_beam.runners.
   worker.operations`` logs ``Processing [%s] in %s`` with each element's repr
   (an Arrow table's repr shows a binary key column as hex; a list of keys as
   text), and the in-memory runner's trigger manager logs values.
   :func:`cap_beam_loggers` puts a filter on every ``apache_beam`` logger that
   drops its records below INFO, in every process that runs shardmove's
   graphs: the launcher (:func:`transforms.runner.make_pipeline`, the CLI) and
   every SDK worker that loads shardmove's transforms (``transforms``
   applies it on import).  It changes no logger's level.
2. **SDK workers in other processes relay their log entries** to the
   launcher, which logs them from Beam's code on the root logger.
   :class:`KeySafeFilter`, on the CLI's handler, drops every record emitted
   from Beam's code (by module path or logger name) or by any other
   third-party logger below INFO: DEBUG is shardmove's own, whose loggers
   (``shardmove.*``) identify a key only by its short hash.  Above that, a
   third-party record's arguments are shown only as plain values: an object
   (an element, a table, bytes) becomes ``<TypeName>``, and an object data
   store's record name (``k/<hh>/<base32hex of the key>``, as in a client
   library's retry warning) is cut to ``k/<hh>/<key withheld>``.
3. **Tracebacks** (``--debug``): an exception's message may quote a value
   (``KeyError(b'...')``, a driver's error).  :class:`KeySafeFormatter` shows
   frames and exception types, and the message only for shardmove's own
   taxonomy (:class:`~pipeline.errors.ShardmoveError`,
   :class:`~pipeline.errors.StoreError`), whose messages never hold a key.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import re
import traceback

from pipeline.errors import ShardmoveError, StoreError

__all__ = ["KeySafeFilter", "KeySafeFormatter", "cap_beam_loggers", "safe_exception_text", "configure"]

_OWN = ("shardmove", "pipeline", "transforms")
_PLAIN = (int, float, bool, type(None))
_WITHHELD = "<message withheld: it may hold key values>"


def _beam_dir() -> str | None:
    try:
        spec = importlib.util.find_spec("apache_beam")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(list(spec.submodule_search_locations)[0], "")


_BEAM_DIR = _beam_dir()


def _own(record: logging.LogRecord) -> bool:
    name = record.name
    return any(name == p or name.startswith(p + ".") for p in _OWN) and not _from_beam(record)


def _from_beam(record: logging.LogRecord) -> bool:
    if record.name == "apache_beam" or record.name.startswith("apache_beam."):
        return True
    return bool(_BEAM_DIR) and str(record.pathname or "").startswith(_BEAM_DIR)


def _below_info(record: logging.LogRecord) -> bool:
    return record.levelno < logging.INFO


class _DropBelowInfo(logging.Filter):
    """A logger filter: records below INFO are never handled."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not _below_info(record)


_DROP = _DropBelowInfo()


# Beam's loggers known to log elements or values below INFO; created here if their
# modules are not imported yet (``getLogger`` returns the same object to them later)
_ELEMENT_LOGGERS = (
    "apache_beam.runners.worker.operations",
    "apache_beam.runners.worker.bundle_processor",
    "apache_beam.runners.worker.sdk_worker",
    "apache_beam.runners.common",
    "apache_beam.runners.portability.fn_api_runner.fn_runner",
    "apache_beam.runners.portability.fn_api_runner.execution",
    "apache_beam.runners.portability.fn_api_runner.trigger_manager",
    "apache_beam.runners.portability.fn_api_runner.worker_handlers",
    "apache_beam.transforms.core",
)


def cap_beam_loggers() -> None:
    """Filter Beam's loggers -- every ``apache_beam`` logger that exists now, and
    those known to print elements whether or not their modules are imported
    yet: nothing below INFO (no element reprs).  Idempotent; levels are left
    as they are."""
    manager = logging.Logger.manager
    names = ["apache_beam", *_ELEMENT_LOGGERS]
    names += [n for n in list(manager.loggerDict) if n.startswith("apache_beam.")]
    for name in names:
        lg = logging.getLogger(name)
        if _DROP not in lg.filters:
            lg.addFilter(_DROP)


def _plain(value):
    if isinstance(value, _PLAIN) or isinstance(value, str):
        return value
    return f"<{type(value).__name__}>"


# An object data store's record name, ``<shard>/k/<hh>/<base32hex of the key>``, plain
# or URL-encoded (a client library's retry warning quotes the request path)
_OBJECT_NAME = re.compile(r"(?i)(^|/|%2F|\s)k(/|%2F)([0-9a-f]{2})(/|%2F)[0-9a-v_]+(?:(?:/|%2F)[0-9a-v_]+)*")


class KeySafeFilter(logging.Filter):
    """A handler filter: third-party records below INFO are dropped, and the
    others show only plain arguments (see the module docstring), with object
    store record names (which encode their key) cut to their hash fan-out."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _own(record):
            return True
        if _below_info(record):
            return False
        if not isinstance(record.msg, str):
            record.msg = f"<{type(record.msg).__name__}>"
            record.args = None
        elif isinstance(record.args, dict):
            record.args = {k: _plain(v) for k, v in record.args.items()}
        elif record.args:
            record.args = tuple(_plain(a) for a in record.args)
        try:
            text = record.getMessage()
        except Exception:  # a malformed record: show its template only
            text, record.args = str(record.msg), None
        if _OBJECT_NAME.search(text):
            record.msg, record.args = _OBJECT_NAME.sub(r"\1k\2\3\4<key withheld>", text), None
        return True


def _message_is_safe(exc: BaseException) -> bool:
    return isinstance(exc, (ShardmoveError, StoreError))


def safe_exception_text(exc: BaseException) -> str:
    """A traceback (frames, chained causes, exception types) in which only
    shardmove's own exceptions show their message."""
    chain = []
    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__ if e.__cause__ is not None else (None if e.__suppress_context__ else e.__context__)
    parts = []
    for i, e in enumerate(reversed(chain)):
        if i:
            parts.append("\nThe above exception led to the following exception:\n\n")
        if e.__traceback__ is not None:
            parts.append("Traceback (most recent call last):\n")
            parts.extend(traceback.format_list(traceback.extract_tb(e.__traceback__)))
        kind = type(e).__module__ + "." + type(e).__qualname__
        if type(e).__module__ == "builtins":
            kind = type(e).__qualname__
        parts.append(f"{kind}: {e if _message_is_safe(e) else _WITHHELD}\n")
    return "".join(parts).rstrip("\n")


class KeySafeFormatter(logging.Formatter):
    """A formatter whose tracebacks never show a third-party exception's message."""

    def formatException(self, ei) -> str:  # noqa: N802 (logging's name)
        if ei and ei[1] is not None:
            return safe_exception_text(ei[1])
        return ""

    def formatStack(self, stack_info: str) -> str:  # noqa: N802
        return stack_info


def configure(level: int, stream) -> None:
    """The CLI's logging, like ``logging.basicConfig``: when the root logger has
    no handler yet, one on ``stream`` at ``level`` with the formatter above.
    Every root handler gets :class:`KeySafeFilter`, and Beam's loggers are
    capped (:func:`cap_beam_loggers`)."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(stream)
        handler.setFormatter(KeySafeFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
        root.setLevel(level)
    for h in root.handlers:
        if not any(isinstance(f, KeySafeFilter) for f in h.filters):
            h.addFilter(KeySafeFilter())
    cap_beam_loggers()
