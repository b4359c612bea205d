"""The ``shardmove`` console script's first step: graceful signals before any import.

``run`` must stop with exit 130 on SIGINT/SIGTERM from its first moment
(:mod:`pipeline.interrupts`).  Importing the CLI (configuration, Arrow,
numpy) takes a few hundred milliseconds; a signal in that time would kill the
process (-15).  So for ``run`` the handler is installed here, before the CLI
is imported; until the run takes its lease it only exits 130, holding nothing.

The process ends through :func:`exit_process`: Python's own shutdown (atexit
handlers, non-daemon threads, buffered output) runs as usual, then the process
exits without running C++ static destructors.  Arrow's (and gRPC's) native
thread pools, torn down there while a worker thread is still alive, sometimes
abort the process (``terminate called without an active exception``, exit -6)
after the command has finished -- which turned a printed exit 2 or 4 into -6
on a loaded machine.
"""
from __future__ import annotations

import os
import sys
from typing import NoReturn

__all__ = ["main", "exit_process"]


def exit_process(code: int) -> NoReturn:
    """End the process with ``code``, after Python's shutdown work, before native teardown."""
    import atexit
    import threading

    from pipeline.errors import EXIT_INTERRUPTED

    code = code if isinstance(code, int) else 1
    # what Py_FinalizeEx does first: executors' exit hooks, then join non-daemon threads;
    # then the atexit handlers (logging.shutdown, weakref finalizers: temporary directories)
    for step in (getattr(threading, "_shutdown", None), atexit._run_exitfuncs):
        if step is None:
            continue
        try:
            step()
        except KeyboardInterrupt:  # Ctrl-C while shutting down: the code says so, the rest still runs
            code = EXIT_INTERRUPTED
        except BaseException:  # noqa: BLE001 - each step on its own: one failing never skips the next
            pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed pipe: nothing more can be said
            pass
    os._exit(code)


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


def run() -> None:
    """The console script: :func:`main`, then :func:`exit_process` with its code."""
    from pipeline.errors import EXIT_INTERRUPTED

    try:
        code = main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except KeyboardInterrupt:  # Ctrl-C before a command's own handling (imports, start-up)
        sys.stderr.write("error: interrupted\n")
        code = EXIT_INTERRUPTED
    exit_process(int(code or 0))


if __name__ == "__main__":
    run()
