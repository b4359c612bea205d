"""The executor's stages, one module each: load, copy, verify, swap.

Each stage DoFn composes small collaborators (``common``: context, metrics,
checkpoint recorder; ``window``: chunks in flight; ``guard``: map lookups)
rather than inheriting another stage.  The run graph that wires them is
:func:`transforms.execute.build_run_graph`.
"""
