"""shardmove: plan and execute key migrations of sharded keyspaces on Apache Beam.

The application floor: the launchers (``planner``, ``executor``), the
operator workflows (``workflows``, gathered in ``ops``), reports, the
command line and the public Python API (``shardmove.api``).  It builds on
two floors below it and is imported by neither: ``transforms`` (the Beam
layer) and ``pipeline`` (the Beam-free core).  Importing this package loads
nothing else.
"""
