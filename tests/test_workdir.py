"""The work-directory owner: paths and the one staged-directory commit."""
import os

import pytest

from pipeline import fs, workdir
from pipeline.errors import BadInput, StoreError


def _staged(parent, marker="manifest.json", body=b"{}"):
    staging = workdir.new_staging(str(parent))
    fs.write_atomic(fs.join(staging, "part"), b"data")
    fs.write_atomic(fs.join(staging, marker), body)
    return staging


def test_paths_follow_the_contract_layout():
    w = "/w"
    p = workdir.plan_dir(w, "a" * 64)
    assert p == "/w/plans/" + "a" * 64
    assert workdir.manifest_path(p) == p + "/manifest.json"
    assert workdir.move_file(p, "s0~s1~0000") == p + "/moves/s0~s1~0000.parquet"
    assert [workdir.summary_path(p), workdir.lease_path(p), workdir.stop_path(p)] == \
        [p + "/summary.json", p + "/lease.json", p + "/stop"]
    assert [workdir.checkpoints_dir(p), workdir.progress_dir(p), workdir.reports_dir(p)] == \
        [p + "/checkpoints", p + "/progress", p + "/reports"]
    assert workdir.snapshots_dir(w) == "/w/snapshots" and workdir.history_dir(w) == "/w/history"
    assert workdir.plan_dir("gs://b/w", "x") == "gs://b/w/plans/x"


def test_commit_staged_commits_once(tmp_path):
    final = str(tmp_path / "plans" / "p1")
    first = _staged(tmp_path / "plans")
    assert workdir.commit_staged(first, final, workdir.MANIFEST) is True
    assert sorted(os.listdir(final)) == ["manifest.json", "part"]
    again = _staged(tmp_path / "plans")
    assert workdir.commit_staged(again, final, workdir.MANIFEST) is False
    assert not os.path.exists(again)  # the duplicate staging directory is dropped
    assert sorted(os.listdir(tmp_path / "plans")) == ["p1"]


def test_commit_staged_replaces_a_half_copied_directory(tmp_path):
    final = tmp_path / "snapshots" / "d"
    final.mkdir(parents=True)
    (final / "part").write_bytes(b"half")  # no snapshot.json: a crash mid-copy
    staging = _staged(tmp_path / "snapshots", workdir.SNAPSHOT_META)
    assert workdir.commit_staged(staging, str(final), workdir.SNAPSHOT_META) is True
    assert (final / "part").read_bytes() == b"data"


def test_commit_staged_checks_its_result(tmp_path, monkeypatch):
    staging = _staged(tmp_path / "plans")
    monkeypatch.setattr(fs, "rename_dir", lambda src, dst, **_: True)  # claims success, moved nothing
    with pytest.raises(StoreError, match="manifest.json is missing after the commit"):
        workdir.commit_staged(staging, str(tmp_path / "plans" / "p"), workdir.MANIFEST)


def test_resolve_plan_dir(tmp_path):
    pid = "b" * 64
    d = workdir.plan_dir(str(tmp_path), pid)
    with pytest.raises(BadInput, match="manifest.json missing"):
        workdir.resolve_plan_dir(pid, str(tmp_path))
    os.makedirs(d)
    fs.write_atomic(workdir.manifest_path(d), b"{}")
    assert workdir.resolve_plan_dir(pid, str(tmp_path)) == d
    assert workdir.resolve_plan_dir(d + "/", None) == d
    with pytest.raises(BadInput, match="without a work directory"):
        workdir.resolve_plan_dir(pid, None)


def test_summary_round_trip(tmp_path):
    assert workdir.read_summary(str(tmp_path)) is None
    workdir.write_summary(str(tmp_path), {"done": 3})
    assert workdir.read_summary(str(tmp_path)) == {"done": 3}
