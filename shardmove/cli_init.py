"""``shardmove init``: create what the configured map store needs.

Registered by :mod:`shardmove.cli` through ``register(subparsers, add_common,
commands)``.  The store does the work (:class:`~pipeline.stores.base.SchemaSetup`):
PostgreSQL creates its schema, map table, version index and run registry from
the one DDL definition (:func:`pipeline.stores.postgres_map.map_ddl`); SQLite
creates its map file with the CONTRACTS schema; Redis has nothing to create, so
init checks its keys' types and prints the seeding rule.  Idempotent: what exists
is checked, reported as ``exists: ...`` and left alone; an existing object of an
incompatible shape is one ``error:`` line, exit 2, and nothing is created.
``--print-sql`` prints the statements (or the seeding rule) and connects to nothing.
"""
from __future__ import annotations

from shardmove import cli_common
from pipeline.errors import EXIT_OK, BadInput, before_changes

__all__ = ["register", "cmd_init"]


def register(subparsers, add_common, commands) -> None:
    p = subparsers.add_parser("init", help="create the configured map store's table, index and run registry "
                                           "(PostgreSQL) or map file (SQLite); idempotent")
    add_common(p, options=False)
    p.add_argument("--print-sql", action="store_true",
                   help="print the DDL (PostgreSQL, SQLite) or the seeding rule (Redis); connect to nothing")
    commands["init"] = cmd_init


def _describe(spec) -> str:
    # deferred: validation loads Arrow Parquet and the stores; start-up stays light (the CLI imports this module for every command)
    from shardmove.validation import describe_map

    cols = spec.get("columns")
    return describe_map(spec) + (f" (columns {', '.join(f'{k}={v}' for k, v in cols.items())})"
                                 if isinstance(cols, dict) and cols else "")


def _ddl_lines(store, kind: str) -> list[str]:
    if kind == "postgres":
        # deferred: psycopg, only for a PostgreSQL map
        from pipeline.stores.postgres_map import ddl_text

        return ddl_text(store.table, store.columns).splitlines()
    if kind == "sqlite":
        # deferred: the stores; start-up stays light (the CLI imports this module for every command)
        from pipeline.stores.sqlite import map_ddl

        return [stmt + ";" for stmt in map_ddl()]
    return []


def cmd_init(args, beam_args) -> int:
    # deferred: the stores; start-up stays light (the CLI imports this module for every command)
    from pipeline.stores import map_store_from_spec
    from pipeline.stores.base import SchemaSetup

    if not args.config:
        raise BadInput("init: --config is required")
    cfg = cli_common.load(args)
    spec = cfg.map_store
    kind = spec.get("kind")
    store = map_store_from_spec(spec, cfg.key_type, must_exist=False)  # the spec is validated here
    try:
        if args.print_sql:
            for line in _ddl_lines(store, kind):
                print(line)
            if kind == "redis":
                _print_seeding(store.prefix)
            return EXIT_OK
        if not isinstance(store, SchemaSetup):
            raise BadInput(f"init: map store kind {kind} has nothing shardmove can create")
        print(f"map store: {_describe(spec)}")
        with before_changes():  # nothing is created before the checks pass: a store that fails here is config
            steps = store.initialize()
    finally:
        store.close()
    for status, what in steps:
        print(f"{status}: {what}")
    created = sum(1 for status, _ in steps if status == "created")
    if kind == "redis":
        print("init: nothing to create: a Redis map is its keys, which the first write creates; to seed one:")
        _print_seeding(store.prefix)
    elif created:
        print(f"init: created {created}, already present {len(steps) - created}")
    else:
        print("init: nothing to do: everything already exists")
    return EXIT_OK


def _print_seeding(prefix: str) -> None:
    # deferred: redis-py, only for a Redis map
    from pipeline.stores.redis_store import seeding_rule

    for line in seeding_rule(prefix):
        print(f"seed: {line}")
