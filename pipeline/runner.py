"""Beam pipeline options: the in-memory engine unless the user names another.

Local runs and tests pin ``FnApiRunner`` explicitly so nothing reaches for the
network (FIELD-NOTES: ``DirectRunner``/``TestPipeline`` first try to download
Prism).  Any other runner is chosen with the standard Beam flags, passed
through after ``--`` on the command line or listed under ``beam.options`` in
the config file (``beam.runner`` is a shortcut for ``--runner``).
"""
from __future__ import annotations

from typing import Mapping, Sequence

__all__ = ["DEFAULT_RUNNER", "pipeline_args", "make_pipeline", "run_pipeline"]

DEFAULT_RUNNER = "FnApiRunner"


def pipeline_args(beam_cfg: Mapping | None, extra: Sequence[str] = ()) -> list[str]:
    args: list[str] = []
    beam_cfg = beam_cfg or {}
    runner = beam_cfg.get("runner")
    for opt in beam_cfg.get("options", []) or []:
        args.append(str(opt))
    args.extend(extra)
    if not any(a.startswith("--runner") for a in args):
        args.append(f"--runner={runner or DEFAULT_RUNNER}")
    return args


def make_pipeline(args: Sequence[str]):
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    opts = PipelineOptions(list(args))
    runner_name = opts.get_all_options().get("runner") or DEFAULT_RUNNER
    if runner_name in ("FnApiRunner", "fn_api_runner"):
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner

        return beam.Pipeline(runner=FnApiRunner(), options=opts)
    return beam.Pipeline(options=opts)


def run_pipeline(p) -> object:
    result = p.run()
    wait = getattr(result, "wait_until_finish", None)
    if wait is not None:
        wait()
    return result
