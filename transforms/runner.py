"""Beam pipeline options: the in-memory engine unless the user names another.

Local runs and tests pin ``FnApiRunner`` explicitly so nothing reaches for the
network (FIELD-NOTES: ``DirectRunner``/``TestPipeline`` first try to download
Prism).  Any other runner is chosen with the standard Beam flags, passed
through after ``--`` on the command line or listed under ``beam.options`` in
the config file (``beam.runner`` is a shortcut for ``--runner``).

The same graphs run unchanged on:

- ``FnApiRunner`` in memory (the default), or with SDK workers in separate
  processes: ``--direct_running_mode=multi_processing --direct_num_workers=N``
  (the runner object reads both options when the pipeline runs; its workers
  are started with this interpreter, ``sys.executable``);
- ``PrismRunner``, and ``DirectRunner`` (which hands pipelines to Prism): the
  preflight (:mod:`transforms.preflight`) adds ``--prism_location`` with the local
  binary of :mod:`transforms.engines`, so nothing is downloaded;
- ``PortableRunner`` against a job service (``--job_endpoint``), for example
  Beam's local job service with an external worker pool, or Flink/Spark job
  servers;
- ``DataflowRunner``; with ``--dry_run=True`` the job is only translated,
  offline: :func:`dry_run_stages` tells the launchers, which then report the
  translated stages and commit nothing.
"""
from __future__ import annotations

import contextlib
import gc
import importlib
import sys
import threading
from typing import Mapping, Sequence

from pipeline.errors import BadInput
from pipeline.logsafe import cap_beam_loggers

__all__ = [
    "DEFAULT_RUNNER",
    "canonical_runner",
    "pipeline_args",
    "make_pipeline",
    "run_pipeline",
    "runner_name",
    "is_dry_run",
    "in_process",
    "dry_run_stages",
    "dry_run_line",
]

DEFAULT_RUNNER = "FnApiRunner"
_IN_MEMORY = ("FnApiRunner", "fn_api_runner")
_DATAFLOW = ("DataflowRunner", "dataflow", "TestDataflowRunner")


def pipeline_args(beam_cfg: Mapping | None, extra: Sequence[str] = ()) -> list[str]:
    """Config ``beam.options`` first, then the command line's flags (which win)."""
    args: list[str] = []
    beam_cfg = beam_cfg or {}
    runner = beam_cfg.get("runner")
    for opt in beam_cfg.get("options", []) or []:
        args.append(str(opt))
    args.extend(extra)
    if not any(a.startswith("--runner") for a in args):
        args.append(f"--runner={runner or DEFAULT_RUNNER}")
    return args


def canonical_runner(name: str) -> str:
    """Beam's class name for a runner name as Beam accepts it (``flink`` → ``FlinkRunner``)."""
    # deferred: Beam takes seconds to load; importing this module must not
    from apache_beam.options.pipeline_options import StandardOptions

    known = {p.rsplit(".", 1)[-1].lower(): p.rsplit(".", 1)[-1] for p in StandardOptions.ALL_KNOWN_RUNNERS}
    known["fn_api_runner"] = "FnApiRunner"  # shardmove's own alias of the in-memory engine
    key = name.lower()
    if key in known:
        return known[key]
    if key + "runner" in known:
        return known[key + "runner"]
    if "." in name:
        module, cls = name.rsplit(".", 1)
        try:
            getattr(importlib.import_module(module), cls)
        except (ImportError, AttributeError):
            raise BadInput(f"--runner={name}: no such runner class") from None
        return name
    raise BadInput(f"--runner={name}: unknown runner (use one of DirectRunner, FnApiRunner, PrismRunner, "
                   f"FlinkRunner, SparkRunner, PortableRunner, DataflowRunner)")


def _options(args: Sequence[str]):
    # deferred: Beam takes seconds to load; importing this module must not
    from transforms.beamopts import CachedViewOptions

    return CachedViewOptions(list(args))


def runner_name(args: Sequence[str]) -> str:
    return _options(args).get_all_options().get("runner") or DEFAULT_RUNNER


def is_dry_run(args: Sequence[str]) -> bool:
    """True for a Dataflow job that is only translated (``--dry_run=True``).

    Only Dataflow honours ``--dry_run``; any other runner would execute the
    pipeline, so the flag is not a dry run there."""
    # deferred: Beam takes seconds to load; importing this module must not
    from apache_beam.options.pipeline_options import TestOptions

    opts = _options(args)
    name = opts.get_all_options().get("runner") or DEFAULT_RUNNER
    return name in _DATAFLOW and bool(opts.view_as(TestOptions).dry_run)


def in_process(args: Sequence[str]) -> bool:
    """True when the pipeline runs in this one process on one bundle at a time: the
    in-memory ``FnApiRunner`` in its ``in_memory`` mode (the default).  The launchers
    then add threads of their own (``plan_threads``); every other engine or mode
    (SDK worker processes or threads, Prism, Flink, Dataflow) has its own parallelism."""
    # deferred: Beam takes seconds to load; importing this module must not
    from apache_beam.options.pipeline_options import DirectOptions

    opts = _options(args)
    name = canonical_runner(opts.get_all_options().get("runner") or DEFAULT_RUNNER)
    mode = opts.view_as(DirectOptions).direct_running_mode or "in_memory"
    return name in _IN_MEMORY and mode == "in_memory"


def make_pipeline(args: Sequence[str]):
    # deferred: Beam takes seconds to load; importing this module must not
    import apache_beam as beam

    cap_beam_loggers()  # Beam prints elements (keys) at DEBUG: never below INFO

    opts = _options(args)
    name = canonical_runner(opts.get_all_options().get("runner") or DEFAULT_RUNNER)
    if name in _IN_MEMORY:
        # FnApiRunner.run_pipeline reads --direct_running_mode (in_memory,
        # multi_threading, multi_processing) and --direct_num_workers from
        # these options: the runner object needs no arguments of its own.
        return beam.Pipeline(runner=_fn_api_runner(), options=opts)
    return beam.Pipeline(options=opts)


def _fn_api_runner():
    """``FnApiRunner`` whose SDK worker subprocesses (multi_processing mode)
    ignore SIGINT and SIGTERM.

    Ctrl-C reaches every process of the terminal's process group.  Workers
    that died of it would fail the pipeline (exit 1, tracebacks) instead of
    the graceful stop: the launcher writes the stop marker, the DoFns flush
    their checkpoints and return, and the run exits 130.  Shielded workers
    still end when the launcher's control channel closes, or on SIGKILL."""
    # deferred: Beam takes seconds to load; importing this module must not
    from apache_beam.portability import python_urns
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    class _ShieldedFnApiRunner(FnApiRunner):
        def run_via_runner_api(self, pipeline_proto, options):
            for env in pipeline_proto.components.environments.values():
                if env.urn == python_urns.SUBPROCESS_SDK and not env.payload.startswith(_SHIELD):
                    env.payload = _SHIELD + env.payload  # the payload is a /bin/sh command line
            return super().run_via_runner_api(pipeline_proto, options)

    return _ShieldedFnApiRunner()


_SHIELD = b"trap '' INT TERM; exec "


class _HeldSetting:
    """A process-wide interpreter setting changed while anyone holds it: the first
    :meth:`hold` saves the value found and applies ``adjust(found)``, the last
    :meth:`release` restores it (a release with no hold left is ignored).  Thread-safe."""

    def __init__(self, get, put, adjust):
        self._get, self._put, self._adjust = get, put, adjust
        self._guard = threading.Lock()
        self._holders = 0
        self._found = None

    def hold(self) -> None:
        with self._guard:
            if self._holders == 0:
                self._found = self._get()
                self._put(self._adjust(self._found))
            self._holders += 1

    def release(self) -> None:
        with self._guard:
            if self._holders == 0:
                return
            self._holders -= 1
            if self._holders == 0:
                self._put(self._found)


#: the young-generation threshold of Python's cyclic garbage collector while a pipeline
#: runs here (CPython's default is 700 allocations): an executor run of 101k moves
#: collected 270 times, 0.3-0.45 s with the GIL held; at 20000, twice, 0.04 s
GC_YOUNG_THRESHOLD = 20000
_FEWER_COLLECTIONS = _HeldSetting(gc.get_threshold, lambda t: gc.set_threshold(*t),
                                  lambda t: (max(t[0], GC_YOUNG_THRESHOLD), *t[1:]))


@contextlib.contextmanager
def fewer_collections():
    """Raise the collector's young threshold to :data:`GC_YOUNG_THRESHOLD` (never lower it)
    while any pipeline of this process runs; the thresholds found are restored after the
    last one.  Chunks, futures and row lists are short-lived, so the collections that
    allocation triggers find little but take the GIL from the stages."""
    _FEWER_COLLECTIONS.hold()
    try:
        yield
    finally:
        _FEWER_COLLECTIONS.release()


#: Python's GIL switch interval while executor stages run in a process (CPython's
#: default is 5 ms).  The serial swap thread gives up the GIL at every SQLite call and
#: waits, each time, for whichever thread runs Python to reach the end of its slice:
#: at 0.5 ms, a 500k-key run's swap batch took 26.9 ms against 28.3 ms (medians of five
#: interleaved runs each) and the run was ~5% faster.
STAGE_SWITCH_INTERVAL_S = 0.0005
_QUICK_HANDOFFS = _HeldSetting(sys.getswitchinterval, sys.setswitchinterval,
                               lambda found: min(found, STAGE_SWITCH_INTERVAL_S))

#: Lower the switch interval to :data:`STAGE_SWITCH_INTERVAL_S` (never raise it) while any
#: executor stage of this process is set up (``StageDoFn.setup``); the release at its
#: teardown restores the interval found once the last one goes.
hold_quick_handoffs = _QUICK_HANDOFFS.hold
release_quick_handoffs = _QUICK_HANDOFFS.release


def run_pipeline(p) -> object:
    """Run and block until the job finishes (a remote job: the launcher stays
    attached, and its lease keeps being renewed by its own thread)."""
    with fewer_collections():
        result = p.run()
        wait = getattr(result, "wait_until_finish", None)
        if wait is not None:
            wait()
    return result


def dry_run_stages(result) -> list[str] | None:
    """The top-level stage names of a translated (dry-run) Dataflow job, or
    None when ``result`` is not a dry run's.  Read from the job's portable
    pipeline proto (``result.job.proto_pipeline``)."""
    job = getattr(result, "job", None)
    proto = getattr(job, "proto_pipeline", None)
    if proto is None:
        return None
    comps = proto.components.transforms
    names = []
    for root in proto.root_transform_ids:
        t = comps[root]
        children = list(t.subtransforms) if t.subtransforms and not t.spec.urn else [root]
        names.extend(comps[c].unique_name for c in children)
    return names


def dry_run_line(stages: Sequence[str]) -> str:
    return f"dataflow dry run: job translated, {len(stages)} stages ({', '.join(stages)}); nothing executed"
