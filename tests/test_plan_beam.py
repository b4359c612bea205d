"""Each public PTransform of the planner, tested the Beam way: a TestPipeline on the
in-memory engine (FnApiRunner) with ``assert_that`` on what it emits, then its side
effects (spill files, move files) read back and checked against the brute-force planner."""
from __future__ import annotations

import hashlib
import os

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import BeamAssertException, assert_that, equal_to

from pipeline import plancore as core
from pipeline.keys import KeyType
from pipeline.ring import Ring
from pipeline.snapshot import list_parts
from transforms.plan import DetectDuplicates, PlanChunks, WriteMoveFiles, _moves_table, make_chunks

SHARDS = ["s0", "s1", "s2"]


def _pipeline() -> BeamTestPipeline:
    return BeamTestPipeline(runner="FnApiRunner")  # the in-memory engine, pinned


def _snapshot(tmp_path, n=3000, dup=0, row_group=500):
    ring = Ring.build("native", [(s, 1.0) for s in SHARDS])
    keys = [f"user-{i:06d}".encode() for i in range(n)] + [f"user-{i:06d}".encode() for i in range(dup)]
    rows = [(k, ring.assign_one(k)) for k in keys]
    path = tmp_path / "snap.parquet"
    pq.write_table(pa.table({"key": pa.array([k for k, _ in rows], pa.binary()),
                             "shard_id": [s for _, s in rows]}), path, row_group_size=row_group)
    return rows, list_parts(str(path), "snapshot", KeyType.STRING)


def _ctx():
    ring = Ring.build("native", [(s, 1.0) for s in SHARDS + ["s3"]])
    return core.PlanContext(KeyType.STRING, ring, None, frozenset(SHARDS), 2), ring


def test_plan_chunks_emit_stats_and_pointers_to_the_reference_moves(tmp_path):
    rows, parts = _snapshot(tmp_path)
    ctx, ring = _ctx()
    staging = str(tmp_path / "staging")
    chunks = make_chunks(parts, 500)
    want = core.reference_plan(rows, ring=ring)
    assert want

    def are_the_reference_moves(pointers):
        got = []
        for gid, ptr in pointers:
            t = _moves_table(ptr)
            got += list(zip(t["key"].to_pylist(), t["source"].to_pylist(), t["target"].to_pylist(),
                            t["key_hash"].to_pylist()))
            if {(s, d) for s, d in zip(t["source"].to_pylist(), t["target"].to_pylist())} != {tuple(gid.split("~")[:2])}:
                raise BeamAssertException(f"group {gid} holds moves of another pair")
        if sorted(got) != sorted(want):
            raise BeamAssertException(f"{len(got)} moves, the reference has {len(want)}")

    with _pipeline() as p:
        out = p | beam.Create(chunks) | PlanChunks(ctx, staging, 500)
        assert_that(out.stats | "Rows" >> beam.Map(lambda s: s.rows) | beam.CombineGlobally(sum),
                    equal_to([len(rows)]), label="every row examined once")
        assert_that(out.hashes | "Parts" >> beam.Map(lambda kv: 0 <= kv[0] < 256) | "AllIn" >> beam.CombineGlobally(all),
                    equal_to([True]), label="hash pointers by partition")
        assert_that(out.moves, are_the_reference_moves, label="moves")
    spill = os.path.join(staging, "spill")
    assert all(os.stat(os.path.join(spill, f)).st_mode & 0o777 == 0o600 for f in os.listdir(spill))  # keys
    # a second run (as a retried bundle) writes the same spill bytes under the same names
    before = {f: open(os.path.join(staging, "spill", f), "rb").read() for f in os.listdir(os.path.join(staging, "spill"))}
    with _pipeline() as p:
        _ = p | beam.Create(chunks) | PlanChunks(ctx, staging, 500)
    after = {f: open(os.path.join(staging, "spill", f), "rb").read() for f in os.listdir(os.path.join(staging, "spill"))}
    assert after == before


@pytest.mark.parametrize("threads", [1, 2])
def test_detect_duplicates_counts_each_repeated_key(tmp_path, threads):
    rows, parts = _snapshot(tmp_path, n=2000, dup=3)
    ctx, _ring = _ctx()
    staging = str(tmp_path / "staging")
    chunks = make_chunks(parts, 500)
    with _pipeline() as p:
        chunk_pc = p | beam.Create(chunks)
        planned = chunk_pc | PlanChunks(ctx, staging, 500, threads)
        dups = planned.hashes | DetectDuplicates(chunk_pc, 500, KeyType.STRING, threads)
        assert_that(dups | beam.CombineGlobally(sum), equal_to([3]))


def test_detect_duplicates_is_empty_without_duplicates():
    h = np.array([1, 2, 3], dtype=np.uint64)
    with _pipeline() as p:
        chunks = p | "NoChunks" >> beam.Create([(0, ())])
        dups = p | beam.Create([(0, h)]) | DetectDuplicates(chunks, 500, KeyType.STRING)
        assert_that(dups, equal_to([]))


def test_write_move_files_writes_one_sorted_file_per_group_the_same_bytes_twice(tmp_path):
    staging = str(tmp_path / "staging")
    keys = [f"k{i:04d}".encode() for i in range(200)]
    from pipeline.keys import stable_hashes

    h = stable_hashes(keys, len(keys))
    table = pa.table({"key": pa.array(keys, pa.binary()), "source": ["s0"] * 200, "target": ["s1"] * 200,
                      "key_hash": pa.array(h, pa.uint64())})
    halves = [("s0~s1~00000", table.slice(0, 120)), ("s0~s1~00000", table.slice(120))]  # one group, two inputs

    def run():
        with _pipeline() as p:
            files = p | beam.Create(halves) | WriteMoveFiles(staging)
            assert_that(files | beam.Map(lambda r: (r["group"], r["rows"])), equal_to([("s0~s1~00000", 200)]))
        path = os.path.join(staging, "moves", "s0~s1~00000.parquet")
        data = open(path, "rb").read()
        return data, hashlib.sha256(data).hexdigest()

    first, sha = run()
    again, sha2 = run()
    assert first == again and sha == sha2
    t = pq.read_table(os.path.join(staging, "moves", "s0~s1~00000.parquet"))
    assert t.num_rows == 200 and t["key_hash"].to_pylist() == sorted(h.tolist())


@pytest.mark.parametrize("reshuffle", [False, True])
def test_plan_graph_reshuffles_the_chunk_list_only_for_engines_that_share_it(tmp_path, monkeypatch, reshuffle):
    """build_plan_graph: the chunk list is redistributed (beam.Create's reshuffle) for
    engines whose workers share the chunks, not on the in-process engine (one bundle at a
    time: the reshuffle cost it a stage); either graph writes the same plan outputs, and
    Finalize runs once."""
    import json

    from pipeline import workdir
    from transforms.plan import PlanGraphSpec, build_plan_graph

    monkeypatch.setattr("transforms.planio.SPILL_ROWS", 1000)  # chunks of 5 row groups: several chunks
    rows, parts = _snapshot(tmp_path, row_group=200)
    ctx, _ring = _ctx()
    assert len(make_chunks(parts, 200)) > 1  # Create reshuffles only lists of several elements
    staging = str(tmp_path / "staging")
    p = _pipeline()
    build_plan_graph(p, PlanGraphSpec(parts, (), ctx, staging, 200, reshuffle=reshuffle))
    names = [t.unique_name for t in p.to_runner_api().components.transforms.values()]
    assert any("Reshuffle" in n for n in names) == reshuffle
    p.run().wait_until_finish()
    stats = json.loads(open(workdir.plan_output_path(staging, workdir.PLAN_STATS)).read())
    files = json.loads(open(workdir.plan_output_path(staging, workdir.PLAN_FILES)).read())
    assert stats["rows"] == len(rows) and sum(f["rows"] for f in files) == stats["moved"] > 0
    assert sorted(f["group"] for f in files) == sorted(
        f[: -len(".parquet")] for f in os.listdir(workdir.moves_dir(staging)))
    assert not os.path.exists(os.path.join(staging, "spill"))  # Finalize ran


def test_detect_duplicates_confirms_every_partition_in_one_read_and_drops_collisions(tmp_path, monkeypatch):
    """Duplicates spread over many hash partitions are confirmed by ONE read of the snapshot
    (at the bundle's end, not one per partition); a candidate hash that no two keys share by
    bytes (a collision, here a made-up hash repeated) is not a duplicate: nothing is emitted."""
    import transforms.plan as plan_mod

    rows, parts = _snapshot(tmp_path, n=2000, dup=40)
    ctx, _ring = _ctx()
    chunks = make_chunks(parts, 500)
    reads = []
    real = plan_mod._read_units
    monkeypatch.setattr(plan_mod, "_read_units", lambda units, *a, **k: reads.append(units) or real(units, *a, **k))
    with _pipeline() as p:
        chunk_pc = p | beam.Create(chunks)
        planned = chunk_pc | PlanChunks(ctx, str(tmp_path / "staging"), 500, 2)  # planning threads read elsewhere
        dups = planned.hashes | DetectDuplicates(chunk_pc, 500, KeyType.STRING, 2)
        assert_that(dups | beam.CombineGlobally(sum), equal_to([40]))
    assert sorted(reads) == sorted(units for _c, units in chunks)  # each chunk read once
    reads.clear()
    fake = np.array([5, 5, 7], dtype=np.uint64)  # 5 repeats, but no key hashes to 5
    with _pipeline() as p:
        chunk_pc = p | "Chunks" >> beam.Create(chunks)
        dups = p | beam.Create([(0, fake)]) | DetectDuplicates(chunk_pc, 500, KeyType.STRING)
        assert_that(dups, equal_to([]))
    assert len(reads) == len(chunks)  # the candidate was checked against the key bytes


def test_spill_chunk_writes_each_hash_partition_as_one_sorted_run(tmp_path):
    """A chunk's spilled hashes are sorted: pointer ``p`` covers exactly the hashes of
    partition ``p`` (top bits), in ascending order; the partitions' contents are those of
    :func:`transforms.planio.partition_order`'s grouping."""
    from transforms.planio import SPILL_PARTITION_BITS, partition_order, sorted_partition_edges, spill_chunk

    rng = np.random.default_rng(5)
    parts = [rng.integers(0, 2**64, 3000, dtype=np.uint64, endpoint=False) for _ in range(3)]
    parts.append(np.array([0, 2**64 - 1, 2**56, 2**56 - 1, 7, 7], dtype=np.uint64))
    everything = np.concatenate(parts)
    out = spill_chunk(str(tmp_path), 0, 0, [p.copy() for p in parts], [])
    order, edges = partition_order(everything, SPILL_PARTITION_BITS)
    grouped = everything[order]
    seen = 0
    for tag, p, (path, offset, length) in out:
        assert tag == "hashes"
        with open(path, "rb") as f:
            f.seek(offset)
            got = np.frombuffer(f.read(length), "<u8")
        assert np.all(got[1:] >= got[:-1])
        assert np.all(got >> np.uint64(64 - SPILL_PARTITION_BITS) == p)
        assert np.array_equal(got, np.sort(grouped[edges[p]:edges[p + 1]]))
        seen += len(got)
    assert seen == len(everything)
    h = everything.copy()
    e = sorted_partition_edges(h, SPILL_PARTITION_BITS)
    assert np.array_equal(e, edges) and np.array_equal(h, np.sort(everything))
    h0 = everything.copy()
    assert list(sorted_partition_edges(h0, 0)) == [0, len(everything)]


def test_read_range_stitches_short_reads_and_refuses_a_short_file(tmp_path, monkeypatch):
    """A spill range is read with pread: short reads are continued, and a file shorter
    than the pointer says is an error (never a silently truncated range)."""
    import os as _os

    from transforms.planio import _read_range

    path = tmp_path / "spill.bin"
    payload = bytes(range(256)) * 40
    path.write_bytes(payload)
    assert _read_range(str(path), 100, 5000) == payload[100:5100]
    real = _os.pread
    monkeypatch.setattr(_os, "pread", lambda fd, n, off: real(fd, min(n, 7), off))
    assert _read_range(str(path), 3, 1000) == payload[3:1003]
    with pytest.raises(IOError, match="is short"):
        _read_range(str(path), len(payload) - 10, 20)


def test_ipc_spill_blob_is_the_default_stream_and_round_trips():
    """A spilled group is the IPC stream pyarrow's default writer makes (explicit options,
    same bytes), handed over as a buffer; it reads back as the same table."""
    from transforms.planio import _ipc_bytes

    t = pa.table({"key": pa.array([b"a", b"bc"], pa.binary()), "source": ["s0", "s0"], "target": ["s1", "s1"],
                  "key_hash": pa.array([1, 2], pa.uint64())})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, t.schema) as w:
        w.write_table(t)
    blob = _ipc_bytes(t)
    assert bytes(blob) == sink.getvalue().to_pybytes() and len(blob) == len(bytes(blob))
    assert _moves_table(t).equals(t)
    assert pa.ipc.open_stream(blob).read_all().equals(t)
