"""The ``shardmove`` console script's first step: graceful signals before any import.

``run`` must stop with exit 130 on SIGINT/SIGTERM from its first moment
(:mod:`pipeline.interrupts`).  Importing the CLI (configuration, Arrow,
numpy) takes a few hundred milliseconds; a signal in that time would kill the
process (-15).  So for ``run`` the handler is installed here, before the CLI
is imported; until the run takes its lease it only exits 130, holding nothing.
"""
from __future__ import annotations

import sys

__all__ = ["main"]


def main() -> int:
    # deferred, all three: the signal handler goes in before the CLI (Arrow, numpy) is imported
    from pipeline.errors import EXIT_INTERRUPTED, Interrupted

    try:
        if sys.argv[1:2] == ["run"]:
            from pipeline import interrupts

            interrupts.install()
        from shardmove.cli import main as cli_main
    except Interrupted as e:  # a signal while the CLI was being imported
        sys.stderr.write(f"error: {e}\n")
        return EXIT_INTERRUPTED
    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
