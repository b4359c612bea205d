"""Operator workflows after a run: failures, post-verification, rollback,
cleanup and catch-up plans (migration usage guide, "Operational sequence",
steps 6-7).  Each lives in its own module of :mod:`shardmove.workflows`;
this module gathers their public names.  The CLI (:mod:`shardmove.cli_ops`)
is a thin wrapper around these functions; schedulers and notebooks call them
directly.

    from shardmove import ops
    ops.export_failures(cfg, plan_dir, "failed.parquet")   # -> FailuresResult
    ops.verify_plan(cfg, plan_dir, sample=1000, seed=7)     # -> VerifyResult
    ops.rollback(cfg, plan_dir)                             # -> RollbackResult
    ops.cleanup(cfg, plan_dir, older_than=86400, apply=True)  # -> CleanupResult
    ops.plan_since(cfg, plan_dir)                           # -> planner.PlanResult

Never imports Beam itself (``rollback`` and ``plan_since`` start the
executor / planner, which do).  Keys never reach ``out`` or the log: a key is
identified only by :func:`pipeline.keys.short_hash` of its stable hash.  The
only file written here that holds key values is the failures export (0600).

Everything reads the plan's merged checkpoints (:func:`pipeline.checkpoint.read_group`),
so results do not depend on how many runs it took.  Store calls go in batches
of ``swap_batch_size`` keys.
"""
from __future__ import annotations

from shardmove.workflows.catchup import plan_since
from shardmove.workflows.cleanup import CleanupResult, cleanup
from shardmove.workflows.failures import FAILURES_SCHEMA, FailuresResult, export_failures
from shardmove.workflows.rollback import (RollbackPlan, RollbackResult, build_rollback_plan, rollback,
                                          rollback_plan_id)
from shardmove.workflows.verify import SampleReport, VerifyResult, verify_plan

__all__ = [
    "FAILURES_SCHEMA",
    "FailuresResult",
    "export_failures",
    "SampleReport",
    "VerifyResult",
    "verify_plan",
    "RollbackPlan",
    "RollbackResult",
    "build_rollback_plan",
    "rollback",
    "rollback_plan_id",
    "CleanupResult",
    "cleanup",
    "plan_since",
]
