"""shardmove's Beam-free core: keys, the ring, planning on Arrow batches, states,
checkpoints, stores, file systems and the work directory.

No module of this package imports Apache Beam (``tests/test_layers.py``
proves it); the Beam layer is ``transforms`` and the application ``shardmove``.
"""
