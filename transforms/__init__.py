"""shardmove Beam transforms (PTransforms and DoFns wrapping the core).

Importing this package caps Beam's loggers below INFO in this process
(``pipeline.logsafe.cap_beam_loggers``): Beam prints elements (keys) at
DEBUG.  SDK workers import it when they unpickle shardmove's DoFns, and the
executor's DoFns cap again in ``setup()``, so no worker prints an element,
whatever its log level.
"""
from pipeline.logsafe import cap_beam_loggers as _cap_beam_loggers

_cap_beam_loggers()
