"""Beam pipeline options whose views are made once.

Beam asks the pipeline's options for a view (``options.view_as(TypeOptions)``,
``StandardOptions``, ...) about a hundred times while a pipeline is built, validated,
translated and started -- twice per applied transform -- and every view builds a new
``argparse`` parser and parses the flags again: about 0.15 s per plan, whatever its
size.  A view holds nothing of its own (its values live in the options' shared
``_all_options``), so the same view object can be handed out every time.

A module of its own: it imports Beam, which :mod:`transforms.runner` must not do at
import time.
"""
from __future__ import annotations

from apache_beam.options.pipeline_options import PipelineOptions

__all__ = ["CachedViewOptions"]


class CachedViewOptions(PipelineOptions):
    """:class:`PipelineOptions` whose :meth:`view_as` returns one view per class.

    Same flags, same values, same sharing as Beam's own: a value set through any view
    is seen by every other view (they share ``_all_options``).  Copies (Beam deep-copies
    a pipeline's options) carry their own views, bound to the copy's values."""

    def view_as(self, cls):
        views = self.__dict__.get("_views")
        if views is None:
            views = {}
            object.__setattr__(self, "_views", views)
        view = views.get(cls)
        if view is None:
            view = views[cls] = super().view_as(cls)
        return view

    def __getstate__(self):
        state = dict(super().__getstate__())
        state.pop("_views", None)  # views are rebuilt on demand, bound to the copy's values
        return state
