"""The lifecycle every stage DoFn shares (setup, bundles, teardown); a stage
adds its own collaborators in ``compose()`` -- stages compose, they do not
inherit one another."""
from __future__ import annotations

import apache_beam as beam
from apache_beam.utils.shared import Shared

from transforms.runner import hold_quick_handoffs, release_quick_handoffs
from transforms.stages.common import ExecSpec, StageContext
from transforms.stages.window import Window

__all__ = ["StageDoFn"]


class StageDoFn(beam.DoFn):
    """The lifecycle every stage DoFn shares: a :class:`StageContext` and a
    :class:`~transforms.stages.window.Window` opened in ``setup()``, the stage's
    own collaborators from :meth:`compose`, bundles flushed at their end, and
    everything closed in ``teardown()`` (collaborators last-built first)."""

    STAGE = "stage"
    MAX_WINDOW_CHUNKS = 0

    def __init__(self, spec: ExecSpec, shared: Shared | None = None):
        self._spec = spec
        # one handle for every stage of a run: the throttles are per process
        self._shared = shared if shared is not None else Shared()

    def compose(self) -> list:
        """Build this stage's collaborators on ``self.ctx`` and ``self.window``; return
        those to close at teardown."""
        return []

    def setup(self):
        hold_quick_handoffs()  # the serial swap waits less for the GIL (transforms.runner)
        self._handoffs = True
        try:
            self.ctx = StageContext(self._spec, self.STAGE, self._shared)
            self.window = Window(self.STAGE, self.MAX_WINDOW_CHUNKS, self.ctx.metrics)
            self._parts = self.compose()
        except BaseException:
            self._handoffs = False
            release_quick_handoffs()
            raise

    def start_bundle(self):
        self.ctx.start_bundle()
        self.window.start_bundle()

    def finish_bundle(self):
        yield from self.window.retire_all()
        self.ctx.finish_bundle()

    def teardown(self):
        try:
            window = getattr(self, "window", None)
            if window is not None:
                window.close()  # queued calls of unfinished chunks never start
            for part in reversed(getattr(self, "_parts", [])):
                part.close()
            ctx = getattr(self, "ctx", None)
            if ctx is not None:
                ctx.close()
        finally:
            if getattr(self, "_handoffs", False):
                self._handoffs = False
                release_quick_handoffs()
