"""The executor as Beam transforms: copy -> verify -> grouped swap, checkpointed.

Flow (read top to bottom in :func:`build_run_graph`; one module per stage in
``transforms/stages/``)::

    LoadWork         group file + merged checkpoints -> chunks of <= swap_batch_size
    (stages/load)    keys in plan order (chunk ids derived from plan order);
                     terminal keys are skipped
    StableInput      Reshuffle of chunks (Dataflow's stable-input idiom)
    CopyKeys         every key not yet verified is looked up in the map (one at
    (stages/copy)    its target is confirmed by the swap, never copied, verified
                     or failed); Planned/Copying keys: idempotent batched copies, up to
                     copy_concurrency calls in flight, transient retries on the one
                     retry schedule (pipeline/retry.py), permanent errors -> Failed(reason)
    CopyBarrier      only with interleave_copy_and_verify=false: every copy
                     finishes before any verification starts
    VerifyCopies     Copied/Verifying keys: full | hash | sampled; a mismatch
    (stages/verify)  re-copies (bounded) then Failed(verify_mismatch)
    SwapBatches      Verified/Swapping keys: one all-or-nothing compare-and-set
    (stages/swap)    batch per chunk; conflicts -> Failed(map_changed) and the
                     rest retried as a new batch; Done only after commit

Copy, verify and swap are fused (one shuffle, before the copy); inside a
worker they overlap: the copy stage keeps a window of chunks whose mover
calls run on a thread pool (``stages/window.py``), checkpoint parts are
encoded and committed by a background thread, and swaps run on one swapper
thread per worker while the bundle thread copies and verifies the next chunks.

Mover calls (copies and re-copies) pass through per-shard throttles
(:mod:`transforms.throttle`, built on Beam's ``AdaptiveThrottler``): caps on
calls in flight and keys per second per shard, and an adaptive concurrency
limit that backs off when a shard's latency or error rate rises.  The
throttles are shared by every DoFn of a worker process
(``apache_beam.utils.shared.Shared``); time spent throttled is reported as
the ``throttled_ms`` counter and Beam's ``cumulativeThrottlingSeconds``
(what Dataflow's autoscaler reads).

Every stage records its transitions through a checkpoint writer per work
group (``stages/common.py``: flushed by count, by interval -- a timer thread
per stage -- and always at bundle end), so a rerun resumes each key from its
last committed state.  Each record names the state its keys leave, and the
writer refuses any transition the state machine (``pipeline/states.py``) does
not allow.  Every side effect is idempotent (copy = upsert that never
clobbers a newer record; swap = CAS that treats "already at target" as
applied), so a retried or duplicated bundle changes nothing twice.  Keys never
appear in logs: only short hash prefixes.

The stages read their options as one typed, frozen
:class:`~pipeline.config.RunOptions` (``spec.options``).
"""
from __future__ import annotations

import apache_beam as beam
from apache_beam.utils.shared import Shared

from transforms.stages.common import Chunk, ExecSpec, throttle_config
from transforms.stages.copy import CopyKeys
from transforms.stages.load import LoadWork
from transforms.stages.swap import SwapBatches
from transforms.stages.verify import VerifyCopies

__all__ = ["ExecSpec", "Chunk", "LoadWork", "CopyKeys", "VerifyCopies", "SwapBatches", "build_run_graph",
           "throttle_config"]


def build_run_graph(p: beam.Pipeline, spec: ExecSpec) -> None:
    """The executor's flowchart (see the module docstring)."""
    throttles = Shared()  # one per-process throttle registry for all stages
    chunks = (
        p
        | "LoadWork" >> LoadWork(spec)
        | "StableInput" >> beam.Reshuffle()
    )
    copied = chunks | "CopyKeys" >> CopyKeys(spec, throttles)
    if not spec.options.interleave_copy_and_verify:
        # a barrier: every copy finishes before any verification starts
        copied = (
            copied
            | "KeyForBarrier" >> beam.Map(lambda ch: (0, ch))
            | "CopyBarrier" >> beam.GroupByKey()
            | "Unbarrier" >> beam.FlatMap(lambda kv: kv[1])
        )
    verified = copied | "VerifyCopies" >> VerifyCopies(spec, throttles)
    verified | "SwapBatches" >> SwapBatches(spec, throttles)
