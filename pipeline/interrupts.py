"""Graceful SIGINT/SIGTERM for ``run``: every phase stops with exit 130.

A run moves through phases; what a signal does depends on whether the run
holds anything yet:

* **Before the lease** (start-up, reading the plan and its checkpoints, the
  drift check) nothing is held or modified, so the handler raises
  :class:`~pipeline.errors.Interrupted` at once: one ``error:`` line, exit 130.
* **From taking the lease on** (``deferred``) the handler never raises: it
  counts the signal and writes the stop marker, which the DoFns honour (they
  flush their checkpoints and return).  The launcher looks at
  :attr:`Interrupts.count` at each phase boundary: it skips the pipeline if
  it has not started, stops compacting between groups, writes the summary,
  releases the map-store claim and the lease, and exits 130.

A second (third...) signal is absorbed: it says once, on stderr, that the
stop is under way.  Raising in the middle of Beam or of a commit would lose
the very releases and flushes the first signal asked for; SIGKILL remains
the way to abandon a run (its lease is then taken over as soon as the holder
is seen dead).  The handler only counts, writes one small file and calls
``os.write``, so it is safe wherever the main thread happens to be.
"""
from __future__ import annotations

import os
import signal
import threading

from pipeline.errors import Interrupted

__all__ = ["Interrupts", "install"]

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupts:
    """The process's SIGINT/SIGTERM handler during a run (see the module docstring)."""

    def __init__(self):
        self.count = 0
        self.deferred = False
        self.stop_path = ""
        self._previous: dict = {}

    def __call__(self, signum, _frame):
        self.count += 1
        if self.stop_path:
            self.write_stop_marker()
        if not self.deferred:
            raise Interrupted("interrupted before the run took its lease; nothing was modified")
        if self.count == 2:
            try:
                # on a terminal, start from a clean line: a progress bar may be drawn there
                os.write(2, (b"\r\x1b[K" if os.isatty(2) else b"") + b"stopping: already interrupted; flushing checkpoints and releasing the lease "
                            b"(SIGKILL abandons the run)\n")
            except OSError:
                pass

    def request_stop(self) -> None:
        """Stop as a signal would, asked from any thread (the API's ``cancel`` event): it
        never raises; before the lease the launcher checks :attr:`interrupted` itself."""
        self.count += 1
        if self.stop_path:
            self.write_stop_marker()

    @property
    def interrupted(self) -> bool:
        return self.count > 0

    def write_stop_marker(self) -> None:
        # deferred: the console installs this handler before anything else is imported
        from pipeline import fs

        try:
            fs.write_atomic(self.stop_path, b"stop\n")
        except Exception:  # noqa: BLE001 - the launcher also checks count
            pass

    def restore(self) -> None:
        """Put the previous handlers back.  A previous :class:`Interrupts` (the CLI's
        start-up handler) comes back deferred: the run has given back what it held, so a
        later signal must not claim it came before the lease -- it only counts."""
        for sig, h in self._previous.items():
            if isinstance(h, Interrupts):
                h.deferred = True
            signal.signal(sig, h)
        self._previous = {}


def install(enabled: bool = True) -> Interrupts:
    """A fresh :class:`Interrupts`, installed for SIGINT and SIGTERM when ``enabled`` and
    on the main thread (signals reach only the main thread); :meth:`Interrupts.restore`
    puts the previous handlers back."""
    irq = Interrupts()
    if enabled and threading.current_thread() is threading.main_thread():
        for sig in SIGNALS:
            irq._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, irq)
    return irq
