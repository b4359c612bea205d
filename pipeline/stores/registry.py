"""Which store a configuration section names: built-in kinds, plugins, instances.

Never imports Beam.  A ``map_store`` / ``data_store`` section names its store by
``kind``:

* the built-in kinds (:data:`BUILTIN_KINDS`);
* a **plugin**: a factory registered under the entry-point group
  ``shardmove.stores`` (:data:`ENTRY_POINT_GROUP`), whose entry-point name is
  the kind.  The factory (a module, a class or an object) has a
  ``map_store(spec, key_type)`` and/or a ``data_store(spec, key_type)``
  callable (:class:`StoreFactory`); ``spec`` is the whole section.  Workers
  load the same entry point, so the plugin's distribution must be installed
  wherever the runner's workers run.  A built-in kind wins over a plugin of the
  same name;
* an **instance** handed to the API (``shardmove.plan(..., map_store=obj)``):
  :func:`instance_section` wraps it as ``{"kind": "instance", "ref": StoreRef}``
  (never written in YAML).  The driver and the workers of an in-process runner
  use that very object (so it must be thread-safe, and stay usable after
  ``close()``, which each worker calls at teardown); workers in other
  processes get a copy unpickled from the bytes the driver pickled (so it must
  then be picklable and hold configuration only, opening connections lazily).

A store -- or a plugin's factory -- whose state lives in the process sets
``in_process_only = True``: the preflight then refuses runners whose workers
are other processes (:func:`in_process_only`), as it does for a memory store
and for an instance that cannot be pickled.

An unknown kind is bad configuration (exit 2): one line naming the known kinds.
"""
from __future__ import annotations

import os
import pickle
import threading
import uuid
from typing import Any, Mapping, Protocol

from pipeline.errors import BadInput, PermanentError

__all__ = ["ENTRY_POINT_GROUP", "BUILTIN_KINDS", "INSTANCE_KIND", "StoreFactory", "StoreRef", "plugin_kinds",
           "known_kinds", "check_kind", "plugin_store", "instance_section", "in_process_only"]

ENTRY_POINT_GROUP = "shardmove.stores"
#: kind -> the sections it serves
BUILTIN_KINDS: dict[str, tuple[str, ...]] = {
    "memory": ("map_store", "data_store"),
    "none": ("data_store",),
    "objects": ("data_store",),
    "postgres": ("map_store", "data_store"),
    "redis": ("map_store",),
    "sqlite": ("map_store", "data_store"),
}
#: the section of an instance given to the API (reserved: never a YAML kind)
INSTANCE_KIND = "instance"


class StoreFactory(Protocol):
    """What an entry point of the ``shardmove.stores`` group loads; either callable may be absent."""

    def map_store(self, spec: Mapping[str, Any], key_type) -> Any: ...

    def data_store(self, spec: Mapping[str, Any], key_type) -> Any: ...


def plugin_kinds() -> dict:
    """Entry points of :data:`ENTRY_POINT_GROUP` by name (read afresh: sys.path may change)."""
    from importlib.metadata import entry_points

    out = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in BUILTIN_KINDS and ep.name != INSTANCE_KIND:
            out.setdefault(ep.name, ep)
    return out


def known_kinds(what: str) -> list[str]:
    """The kinds that can build a ``what`` (``map_store`` or ``data_store``); a plugin that
    cannot be loaded is listed (opening it says why)."""
    def serves(ep) -> bool:
        try:
            return callable(getattr(ep.load(), what, None))
        except Exception:  # noqa: BLE001
            return True

    return sorted([k for k, roles in BUILTIN_KINDS.items() if what in roles]
                  + [name for name, ep in plugin_kinds().items() if serves(ep)])


def check_kind(kind: Any, what: str) -> None:
    """BadInput (one line listing the known kinds) unless ``kind`` names a store for ``what``."""
    if isinstance(kind, str) and (what in BUILTIN_KINDS.get(kind, ()) or kind in plugin_kinds()):
        return
    raise BadInput(f"config {what}.kind: unknown kind {kind!r} (known: {', '.join(known_kinds(what))})")


def plugin_store(spec: Mapping[str, Any], key_type, what: str):
    """The store a plugin's factory builds from ``spec`` (BadInput for an unknown kind)."""
    kind = spec.get("kind")
    ep = plugin_kinds().get(kind) if isinstance(kind, str) else None
    if ep is None:
        check_kind(kind, what)
    try:
        factory = ep.load()
    except Exception as e:  # noqa: BLE001 - a plugin that cannot be imported: say which, not its message
        raise BadInput(f"config {what}.kind: store plugin {kind!r} ({ep.value}) cannot be loaded "
                       f"({type(e).__name__})") from e
    make = getattr(factory, what, None)
    if not callable(make):
        raise BadInput(f"config {what}.kind: store plugin {kind!r} provides no {what.replace('_', ' ')} "
                       f"(its factory has no {what}(spec, key_type))")
    return make(spec, key_type)


# ------------------------------------------------------------------ instances

_LIVE: dict[str, Any] = {}
_LIVE_LOCK = threading.Lock()


class StoreRef:
    """An API caller's store object inside a configuration section.

    Pickled (Beam pickles every DoFn with its configuration) as a token, the
    process id and, when the object can be pickled, its bytes: unpickled in the
    same process while the call is running, it is the same object again;
    elsewhere, a copy made from the bytes.  ``close()`` ends its life in the
    registry of live objects (the object itself is the caller's to close).
    """

    def __init__(self, obj: Any, token: str | None = None):
        self.obj = obj
        self.token = token or uuid.uuid4().hex
        with _LIVE_LOCK:
            _LIVE[self.token] = obj

    def __reduce__(self):
        return _resolve, (self.token, os.getpid(), _payload(self.obj), type(self.obj).__name__)

    def close(self) -> None:
        with _LIVE_LOCK:
            _LIVE.pop(self.token, None)


def _payload(obj) -> bytes | None:
    try:
        return pickle.dumps(obj)
    except Exception:  # noqa: BLE001 - not picklable by reference: try by value
        pass
    try:
        import cloudpickle  # Beam's own pickler (a dependency of apache-beam)

        return cloudpickle.dumps(obj)
    except Exception:  # noqa: BLE001 - then only the same process can use it
        return None


def _resolve(token: str, pid: int, payload: bytes | None, type_name: str) -> StoreRef:
    with _LIVE_LOCK:
        obj = _LIVE.get(token) if pid == os.getpid() else None
    if obj is not None:
        ref = StoreRef.__new__(StoreRef)
        ref.obj, ref.token = obj, token
        return ref
    if payload is None:
        raise PermanentError(f"store instance {type_name} lives in process {pid} and cannot be pickled: "
                             f"use an in-process runner, or register a factory under the entry-point group "
                             f"{ENTRY_POINT_GROUP}", reason="not_shared")
    ref = StoreRef.__new__(StoreRef)
    ref.obj, ref.token = pickle.loads(payload), token
    return ref


def instance_section(obj: Any) -> dict:
    """A configuration section holding an API caller's store object."""
    return {"kind": INSTANCE_KIND, "ref": StoreRef(obj)}


def in_process_only(section: Mapping[str, Any] | None) -> str | None:
    """Why the store of ``section`` can only be used in this process -- a memory store; an
    instance or a plugin factory with a true ``in_process_only`` attribute; an instance that
    cannot be pickled -- or None.  A runner whose workers are other processes cannot use it."""
    if not section:
        return None
    kind = section.get("kind")
    if kind == "memory":
        return "a memory store lives in this process"
    if kind == INSTANCE_KIND:
        obj = getattr(section.get("ref"), "obj", None)
        if getattr(obj, "in_process_only", False):
            return f"the store object {type(obj).__name__} keeps its state in this process (in_process_only)"
        if _payload(obj) is None:
            return f"the store object {type(obj).__name__} cannot be pickled"
        return None
    ep = plugin_kinds().get(kind) if isinstance(kind, str) and kind not in BUILTIN_KINDS else None
    if ep is None:
        return None
    try:
        bound = bool(getattr(ep.load(), "in_process_only", False))
    except Exception:  # noqa: BLE001 - opening the store says why it cannot be loaded
        return None
    return f"the store plugin {kind!r} keeps its state in this process (in_process_only)" if bound else None
