"""shardmove: plan and execute key migrations of sharded keyspaces on Apache Beam.

``import shardmove`` is the public Python API (:mod:`shardmove.api`, loaded on first
use, so that importing the package -- as the console script does -- loads nothing else)::

    import shardmove
    plan = shardmove.plan("demo/shardmove.yaml")
    summary = shardmove.run("demo/shardmove.yaml", plan, progress=print)

The application floor: the launchers (``planner``, ``executor``), the operator
workflows (``workflows``, gathered in ``ops``), reports, the command line and the API.  It builds
on two floors below it and is imported by neither: ``transforms`` (the Beam layer) and
``pipeline`` (the Beam-free core).
"""
from __future__ import annotations

__all__ = [
    "load_config", "create_demo_keyspace", "snapshot", "plan", "run", "status", "validate", "verify",
    "rollback", "cleanup", "export_failures", "plans", "Plan", "Pair", "RunSummary", "Status",
    "ShardmoveError", "BadInput", "Refused", "RunHalted", "Interrupted",
]


def __getattr__(name: str):
    if name in __all__:
        from shardmove import api  # deferred: the console script imports this package before anything else

        return getattr(api, name)
    raise AttributeError(f"module 'shardmove' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
