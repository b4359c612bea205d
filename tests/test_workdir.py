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


def test_a_removal_killed_midway_never_leaves_a_marked_directory_with_files_missing(tmp_path, monkeypatch):
    """``remove_committed`` takes the directory away in one step: a kill while its files
    are deleted leaves no marked, partial snapshot for the next commit to trust; the next
    commit of the same content commits it anew, and the next removal sweeps the litter."""
    snaps = tmp_path / "snapshots"
    final = str(snaps / "d")
    workdir.commit_staged(_staged(snaps, workdir.SNAPSHOT_META), final, workdir.SNAPSHOT_META)
    real = fs.rmtree

    def killed(path):  # dies after deleting one file, before the rest
        os.unlink(os.path.join(path, sorted(os.listdir(path))[0]))
        raise KeyboardInterrupt

    monkeypatch.setattr(fs, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        workdir.remove_committed(final)
    monkeypatch.setattr(fs, "rmtree", real)
    assert not os.path.exists(final)
    assert workdir.commit_staged(_staged(snaps, workdir.SNAPSHOT_META), final, workdir.SNAPSHOT_META) is True
    assert (snaps / "d" / "part").read_bytes() == b"data"
    workdir.remove_committed(final)
    assert os.listdir(snaps) == []
    workdir.remove_committed(final)  # already gone: nothing to do


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


def _committed(work, pid):
    d = workdir.plan_dir(str(work), pid)
    os.makedirs(d)
    fs.write_atomic(workdir.manifest_path(d), b"{}")
    return d


def test_resolve_plan_dir_by_prefix_and_name(tmp_path):
    a = _committed(tmp_path, "ab12cd34" + "0" * 56)
    b = _committed(tmp_path, "ab12cd34" + "1" * 56)
    c = _committed(tmp_path, "ffee" + "2" * 60)
    w = str(tmp_path)
    assert workdir.resolve_plan_dir("ab12cd340", w) == a
    assert workdir.resolve_plan_dir("ab12cd341", w) == b
    assert workdir.resolve_plan_dir("ffee2222", w) == c
    with pytest.raises(BadInput, match="ambiguous: it matches 2 plans"):
        workdir.resolve_plan_dir("ab12cd34", w)
    with pytest.raises(BadInput, match="no plan"):
        workdir.resolve_plan_dir("ab12cd3", w)  # fewer than 8 digits: never a prefix
    with pytest.raises(BadInput, match="no plan"):
        workdir.resolve_plan_dir("99999999", w)
    workdir.claim_plan_name(w, "add-s4", os.path.basename(c))
    workdir.claim_plan_name(w, "add-s4", os.path.basename(c))  # the same claim again: a no-op
    assert workdir.resolve_plan_dir("add-s4", w) == c
    assert workdir.plan_name(c) == "add-s4" and workdir.plan_name(a) is None
    with pytest.raises(BadInput, match="already used by plan ffee22222222"):
        workdir.check_plan_name(w, "add-s4", os.path.basename(a))
    with pytest.raises(BadInput, match="already exists with the name 'add-s4'"):
        workdir.check_plan_name(w, "other", os.path.basename(c))
    workdir.check_plan_name(w, "add-s4", os.path.basename(c))  # its own name: fine
    with pytest.raises(BadInput, match="already used"):
        workdir.claim_plan_name(w, "add-s4", os.path.basename(a))
    with pytest.raises(BadInput, match="without a work directory"):
        workdir.resolve_plan_dir("add-s4", None)


@pytest.mark.parametrize("bad", ["", "-x", "a b", "a/b", "x" * 65, "deadbeef", "é", "a\nb"])
def test_plan_names_are_validated(bad):
    with pytest.raises(BadInput, match="plan --name"):
        workdir.validate_plan_name(bad)


def test_a_bare_word_that_is_another_directory_is_still_a_name(tmp_path, monkeypatch):
    c = _committed(tmp_path / "work", "ce" * 32)
    w = str(tmp_path / "work")
    workdir.claim_plan_name(w, "demo", "ce" * 32)
    (tmp_path / "demo").mkdir()  # ./run_local.sh's folder, in the current directory
    monkeypatch.chdir(tmp_path)
    assert workdir.resolve_plan_dir("demo", w) == c
    with pytest.raises(BadInput, match="no committed plan at demo"):
        workdir.resolve_plan_dir("demo/", w)


@pytest.mark.parametrize("how, want", [({}, ["file", "dir"]), ({"sync_dir": False}, ["file"]),
                                        ({"durable": False}, [])])
def test_write_atomic_fsyncs_what_it_is_asked_to(tmp_path, monkeypatch, how, want):
    """write_atomic always replaces atomically (a temporary renamed over the name, none left
    behind); by default it fsyncs the data and then the directory; ``sync_dir=False`` leaves
    the directory to one later fs.sync_dir (many files into one directory); ``durable=False``
    fsyncs nothing (scratch files a crash discards with their directory)."""
    import stat

    synced = []
    real = os.fsync

    def fsync(fd):
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    path = str(tmp_path / "out.json")
    fs.write_atomic(path, b"old", **how)
    fs.write_atomic(path, b"new", **how)
    assert open(path, "rb").read() == b"new" and os.listdir(tmp_path) == ["out.json"]
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o600)
    assert synced == want * 2
    synced.clear()
    fs.sync_dir(str(tmp_path))
    assert synced == ["dir"]


def test_staging_directories_of_killed_processes_are_swept_by_the_next_one(tmp_path):
    """A process killed while it staged a plan or snapshot leaves its staging directory
    (move files, key values); the next staging under the same parent removes those whose
    owner is gone, and leaves a live owner's, another host's and unnamed ones alone."""
    import subprocess
    import sys

    from pipeline import procs

    plans = str(tmp_path / "plans")
    child = subprocess.run(
        [sys.executable, "-c", "import sys; from pipeline import workdir, fs\n"
         "s = workdir.new_staging(sys.argv[1]); fs.write_atomic(fs.join(s, 'moves'), b'k' * 100)\n"
         "print(s)", plans],
        capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)), check=True)
    dead = child.stdout.strip()
    assert os.path.isdir(dead)  # the child exited without cleaning up, as a killed one would
    mine = workdir.new_staging(plans)
    other_host = os.path.join(plans, ".staging-elsewhere~1~1~" + "0" * 32)
    unnamed = os.path.join(plans, ".staging-" + "1" * 32)
    os.makedirs(other_host)
    os.makedirs(unnamed)
    again = workdir.new_staging(plans)
    assert not os.path.exists(dead)
    assert all(os.path.isdir(p) for p in (mine, again, other_host, unnamed))
    assert procs.owner_gone(os.path.basename(dead)[len(".staging-"):].rpartition("~")[0])
    assert not procs.owner_gone(procs.owner_tag())
    assert workdir.sweep_staging(plans) == 0


@pytest.mark.parametrize("unnamed", [True, False], ids=["O_TMPFILE", "named-temporary"])
def test_create_if_absent_fsyncs_before_the_name_appears_and_leaves_nothing_behind(tmp_path, monkeypatch, unnamed):
    """Both ways of create-if-absent (an unnamed O_TMPFILE file linked into place, and the
    named temporary file hard-linked where a file system has no O_TMPFILE): the bytes are
    fsynced before the name exists, the mode is exactly the one asked whatever the umask,
    a missing directory is made, an equal file counts as committed, a different one is a
    conflict that leaves it untouched, and no temporary file is ever left in the directory."""
    import stat

    if not unnamed:
        monkeypatch.setattr(fs, "_CAN_LINK_UNNAMED", False)
    events = []
    real_fsync, real_link = os.fsync, os.link

    def fsync(fd):
        events.append("fsync-dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync-file")
        real_fsync(fd)

    def link(src, dst, **kw):
        events.append("link")
        return real_link(src, dst, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "link", link)
    old_umask = os.umask(0o077)
    try:
        path = str(tmp_path / "new" / "part.parquet")
        assert fs.create_if_absent(path, b"x" * 200_000, 0o644) is True
        assert oct(os.stat(path).st_mode & 0o777) == oct(0o644)
    finally:
        os.umask(old_umask)
    assert events == ["fsync-file", "link", "fsync-dir"]
    assert open(path, "rb").read() == b"x" * 200_000
    assert fs.create_if_absent(path, b"x" * 200_000) is False
    with pytest.raises(fs.CommitConflict):
        fs.create_if_absent(path, b"other")
    assert open(path, "rb").read() == b"x" * 200_000
    assert os.listdir(tmp_path / "new") == ["part.parquet"]
    assert (fs._NO_TMPFILE == set()) or not unnamed


def test_create_if_absent_falls_back_where_the_file_system_has_no_unnamed_files(tmp_path, monkeypatch):
    """A file system that refuses O_TMPFILE (EOPNOTSUPP) gets the named temporary file, and
    the directory is remembered so it is not asked again."""
    import errno

    real_open = os.open
    asked = []

    def refuse_tmpfile(path, flags, *a, **kw):
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            asked.append(path)
            raise OSError(errno.EOPNOTSUPP, "not supported")
        return real_open(path, flags, *a, **kw)

    monkeypatch.setattr(os, "open", refuse_tmpfile)
    monkeypatch.setattr(fs, "_NO_TMPFILE", set())
    for i in range(3):
        assert fs.create_if_absent(str(tmp_path / f"p{i}"), b"data") is True
    assert asked == [str(tmp_path)]
    assert sorted(os.listdir(tmp_path)) == ["p0", "p1", "p2"]


def test_watched_file_reads_again_exactly_when_the_file_changed(tmp_path, monkeypatch):
    """fs.WatchedFile (the lease fence's read): the same file costs no read; a replacement
    (write_atomic), an in-place rewrite and a removal are each seen at the next call."""
    path = str(tmp_path / "lease.json")
    fs.write_atomic(path, b'{"epoch": 1}')
    w = fs.WatchedFile(path)
    reads = []
    real_read = os.read
    monkeypatch.setattr(os, "read", lambda fd, n: reads.append(fd) or real_read(fd, n))
    assert w.read() == b'{"epoch": 1}'
    n = len(reads)
    assert n >= 1
    for _ in range(5):
        assert w.read() == b'{"epoch": 1}'
    assert len(reads) == n  # unchanged: stat only
    fs.write_atomic(path, b'{"epoch": 1}')  # replaced whole, same bytes: a new inode
    assert w.read() == b'{"epoch": 1}' and len(reads) > n
    fs.write_atomic(path, b'{"epoch": 2}')
    assert w.read() == b'{"epoch": 2}'
    with open(path, "r+b") as f:  # written in place (not how leases are written): size changes
        f.write(b'{"epoch": 33}')
    assert w.read() == b'{"epoch": 33}'
    os.unlink(path)
    with pytest.raises(FileNotFoundError):
        w.read()
    w.close()
    assert w._held is None


def test_watched_file_keeps_the_file_it_read_open_so_its_inode_is_not_reused(tmp_path):
    """Identity is compared by inode: the file read is held open (its inode cannot go to a
    new file while held), and an older one is closed once replaced."""
    path = str(tmp_path / "lease.json")
    fs.write_atomic(path, b"a")
    w = fs.WatchedFile(path)
    w.read()
    fd = w._held[1]
    assert os.fstat(fd).st_ino == os.stat(path).st_ino
    fs.write_atomic(path, b"b")
    assert w.read() == b"b"
    with pytest.raises(OSError):
        os.fstat(fd)  # the replaced file's descriptor was closed
    w.close()


def test_watched_file_reads_every_time_off_a_local_file_system_and_after_close(tmp_path, monkeypatch):
    """On NFS and other network file systems a stat may answer from the client's cache while
    an open revalidates: WatchedFile then reads at every call, as it does after close()."""
    path = str(tmp_path / "lease.json")
    fs.write_atomic(path, b"a")
    monkeypatch.setattr(fs, "local_fs_type", lambda p: "nfs4")
    remote = fs.WatchedFile(path)
    monkeypatch.undo()
    local = fs.WatchedFile(path)
    reads = []
    real_read, real_read_bytes = os.read, fs.read_bytes
    monkeypatch.setattr(os, "read", lambda fd, n: reads.append(fd) or real_read(fd, n))
    monkeypatch.setattr(fs, "read_bytes", lambda p: reads.append(p) or real_read_bytes(p))
    for w in (remote, local):
        reads.clear()
        for _ in range(3):
            assert w.read() == b"a"
        # every call reads the file, or only the first (until EOF: two reads)
        assert len(reads) == (3 if w is remote else 2)
    local.close()
    assert local._held is None
    reads.clear()
    assert local.read() == b"a" and local._held is None  # read, not held: nothing left open
    assert reads == [path]


def test_mount_type_finds_the_innermost_mount_with_escaped_names():
    lines = ["22 1 0:21 / / rw - ext4 /dev/vda rw",
             "30 22 0:40 / /mnt/my\\040share rw,relatime shared:1 - nfs4 srv:/x rw",
             "31 22 0:41 / /mnt/my rw - tmpfs t rw",
             "32 22 0:42 / /mnt/my rw master:3 - overlay o rw"]  # mounted over the tmpfs
    assert fs.mount_type("/mnt/my share/plans/a/lease.json", lines) == "nfs4"
    assert fs.mount_type("/mnt/my/x", lines) == "overlay"
    assert fs.mount_type("/mnt/mysh", lines) == "ext4"
    assert fs.mount_type("/", lines) == "ext4"
    assert fs.local_fs_type(os.getcwd()) is not None


def test_create_if_absent_falls_back_where_linking_through_proc_is_refused(tmp_path, monkeypatch):
    """An unnamed file opened but refused its name (linkat through /proc: EXDEV or EPERM under
    some sandboxes and FUSE file systems) falls back to the named temporary file."""
    import errno

    real_link = os.link

    def link(src, dst, **kw):
        if str(src).startswith("/proc/self/fd/"):
            raise OSError(errno.EXDEV, "cross-device link")
        return real_link(src, dst, **kw)

    monkeypatch.setattr(os, "link", link)
    monkeypatch.setattr(fs, "_NO_TMPFILE", set())
    assert fs.create_if_absent(str(tmp_path / "a"), b"data") is True
    assert fs.create_if_absent(str(tmp_path / "a"), b"data") is False
    assert fs._NO_TMPFILE == {str(tmp_path)}
    assert os.listdir(tmp_path) == ["a"] and open(tmp_path / "a", "rb").read() == b"data"


def test_a_temporary_whose_close_fails_is_removed(tmp_path, monkeypatch):
    """An error first reported at close (NFS, quotas) fails the write and leaves no
    temporary file behind."""
    import errno

    real_close = os.close
    failed = []

    def close(fd):
        real_close(fd)
        if not failed:
            failed.append(fd)
            raise OSError(errno.EIO, "I/O error at close")

    monkeypatch.setattr(fs, "_CAN_LINK_UNNAMED", False)
    monkeypatch.setattr(os, "close", close)
    with pytest.raises(OSError, match="I/O error"):
        fs.write_atomic(str(tmp_path / "x.json"), b"{}")
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []
