"""The load stage: a work group's plan file and checkpoints -> chunks of its open keys.

Chunks hold up to ``swap_batch_size`` keys in plan order; chunk ids come from
plan order, so a rerun (or a retried bundle) cuts the same chunks.  Keys whose
merged checkpoint state is terminal (Done; Failed unless ``--retry-failed``)
are skipped.  Reads only.
"""
from __future__ import annotations

import apache_beam as beam
import pyarrow.parquet as pq
from apache_beam.metrics import Metrics

from pipeline import checkpoint as ckpt
from pipeline import fs
from pipeline import states as S
from pipeline import workdir
from pipeline.names import parse_group_id
from transforms.stages.common import NS, Chunk, ExecSpec

__all__ = ["LoadWork"]


class _LoadWorkFn(beam.DoFn):
    """group id -> Chunks of its non-terminal keys, in plan order."""

    def __init__(self, spec: ExecSpec):
        self._spec = spec
        self._planned = Metrics.counter(NS, "planned")
        self._skipped = Metrics.counter(NS, "skipped_terminal")

    def process(self, element):
        gid, _rows = element
        spec = self._spec
        source, target, _bucket = parse_group_id(gid)
        path = workdir.move_file(spec.plan_dir, gid)
        with fs.open_input(path) as f:
            plan = pq.read_table(f, columns=["key", "key_hash"])
        n = plan.num_rows
        self._planned.inc(n)
        keys = plan.column("key").to_pylist()
        hashes = plan.column("key_hash").to_numpy().tolist()
        state = ckpt.read_group(spec.plan_dir, spec.plan_id, gid).table
        known = {}
        if state.num_rows:
            sk = state.column("key").to_pylist()
            cols = {c: state.column(c).to_pylist() for c in
                    ("state", "attempts", "content_hash", "source_version", "verify_method", "reason")}
            for j, k in enumerate(sk):
                known[k] = j
        B = int(spec.options.swap_batch_size)
        planned = int(S.State.PLANNED)
        for start in range(0, n, B):
            end = min(n, start + B)
            if not known:  # nothing recorded for this group yet (a first run): every key is Planned
                m = end - start
                yield Chunk(gid, start // B, source, target, keys[start:end], hashes[start:end],
                            [planned] * m, [0] * m, [None] * m, [None] * m, [None] * m, [None] * m)
                continue
            ch = Chunk(gid, start // B, source, target, [], [], [], [], [], [], [], [])
            for i in range(start, end):
                k = keys[i]
                j = known.get(k)
                if j is None:
                    st, att, chh, sv, vm, rs = int(S.State.PLANNED), 0, None, None, None, None
                else:
                    st = cols["state"][j]
                    att = cols["attempts"][j]
                    chh, sv = cols["content_hash"][j], cols["source_version"][j]
                    vm, rs = cols["verify_method"][j], cols["reason"][j]
                if st == S.State.DONE or (st == S.State.FAILED and not spec.retry_failed):
                    self._skipped.inc()
                    continue
                if st == S.State.FAILED:  # --retry-failed: start over in this epoch
                    st, chh, sv, vm, rs = int(S.State.PLANNED), None, None, None, None
                ch.keys.append(k)
                ch.hashes.append(hashes[i])
                ch.states.append(st)
                ch.attempts.append(att)
                ch.chash.append(chh)
                ch.sver.append(sv)
                ch.method.append(vm)
                ch.reason.append(rs)
            if ch.keys:
                yield ch


class LoadWork(beam.PTransform):
    """The run's work: one :class:`Chunk` per ``swap_batch_size`` open keys of each group.

    Input: the pipeline's root (PBegin); the groups come from ``spec.groups``.
    Output: a PCollection of :class:`Chunk` (keys in plan order, with their last
    committed state, attempts, copy-time hash and version).  Side effects: none
    (reads the group files and checkpoints).  Idempotent: the same checkpoints
    give the same chunks.
    """

    def __init__(self, spec: ExecSpec):
        super().__init__()
        self._spec = spec

    def expand(self, pbegin):
        return (
            pbegin
            | "ListGroups" >> beam.Create(list(self._spec.groups))
            | "ReadGroupWork" >> beam.ParDo(_LoadWorkFn(self._spec))
        )
