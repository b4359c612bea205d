"""Helpers shared by the benchmarks: child processes, peak RSS, figure lines.

Every benchmark prints its figures as ``name: value`` lines, one figure per
line (CONTRACTS "Lines that scripts read").  Measurements that need their own
peak RSS run in a child process started with :func:`run_child`; the child
reports one ``RESULT {json}`` line on stdout, which the parent parses.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

__all__ = ["peak_rss_mb", "tree_memory_mb", "emit", "run_child", "child_result", "bench_root", "fmt", "median"]

RESULT_PREFIX = "RESULT "


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MB (VmHWM, else ru_maxrss)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def fmt(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if value >= 1000:
            return f"{value:.0f}"
        if value >= 10:
            return f"{value:.1f}"
        return f"{value:.3f}"
    return str(value)


def emit(name: str, value) -> None:
    """One figure, alone on its line: ``name: value``."""
    print(f"{name}: {fmt(value)}", flush=True)


def median(values):
    v = sorted(values)
    n = len(v)
    if n == 0:
        return float("nan")
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


def child_result(payload: dict) -> None:
    """Called in a child at its very end: adds peak RSS and prints the result line."""
    payload = dict(payload)
    payload.setdefault("peak_rss_mb", peak_rss_mb())
    sys.stdout.flush()
    print(RESULT_PREFIX + json.dumps(payload), flush=True)


def _tree_pids(root: int) -> list[int]:
    """``root`` and every process descended from it (read from /proc)."""
    parents: dict = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
        parents.setdefault(ppid, []).append(int(name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(parents.get(pid, ()))
    return out


def tree_memory_mb(root: int) -> tuple[float, float]:
    """(PSS, RSS) summed over ``root``'s process tree, MB, from ``/proc/<pid>/smaps_rollup``.

    PSS (proportional set size) divides each shared page among the processes that map
    it, so pages shared after a fork (or a shared library) count once in the sum; RSS
    counts them in every process."""
    pss = rss = 0
    for pid in _tree_pids(root):
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        pss += int(line.split()[1])
                    elif line.startswith("Rss:"):
                        rss += int(line.split()[1])
        except (OSError, ValueError):
            continue  # gone meanwhile
    return pss / 1024.0, rss / 1024.0


def run_child(argv: list, *, timeout: float = 1800, env: dict | None = None, log: str | None = None,
              sample_memory: bool = False, sample_interval: float = 0.1) -> dict:
    """Run ``python argv...`` and return its RESULT payload plus ``process_wall_s``.

    The child's other output goes to ``log`` (or is dropped) so that only the
    parent's figure lines reach stdout.  ``sample_memory``: every ``sample_interval``
    seconds, sum PSS and RSS over the child's process tree (:func:`tree_memory_mb`; the
    child and any worker processes it starts) and add the peaks of those sums,
    ``peak_pss_tree_mb`` and ``peak_rss_tree_mb``, to the payload.
    """
    import threading

    cmd = [sys.executable] + [str(a) for a in argv]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peaks = [0.0, 0.0]
    done = threading.Event()

    def sample():
        while not done.wait(sample_interval):
            pss, rss = tree_memory_mb(proc.pid)
            peaks[0], peaks[1] = max(peaks[0], pss), max(peaks[1], rss)

    sampler = threading.Thread(target=sample, daemon=True) if sample_memory else None
    if sampler:
        sampler.start()
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    finally:
        done.set()
        if sampler:
            sampler.join()
    wall = time.perf_counter() - t0
    if log:
        with open(log, "a") as f:
            f.write(f"$ {' '.join(cmd)}\n{stdout}\n{stderr}\n")
    result = None
    for line in stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            result = json.loads(line[len(RESULT_PREFIX):])
    if proc.returncode != 0 or result is None:
        tail = "\n".join((stderr or "").splitlines()[-25:])
        raise RuntimeError(f"child {' '.join(cmd[1:3])} failed (exit {proc.returncode}):\n{tail}")
    result["process_wall_s"] = wall
    if sample_memory:
        result["peak_pss_tree_mb"], result["peak_rss_tree_mb"] = peaks
    return result


def bench_root() -> str:
    """Where benchmarks keep their cached inputs (``$SHARDMOVE_BENCH_DIR`` or a temp dir)."""
    import tempfile

    root = os.environ.get("SHARDMOVE_BENCH_DIR") or os.path.join(tempfile.gettempdir(), "shardmove-bench")
    os.makedirs(root, mode=0o700, exist_ok=True)
    return root


def install_sleep_mover() -> None:
    """Make the executor's stages (``transforms.stages.common``, where every stage opens
    its stores) open a mover that does no I/O: the fault injector's
    latency is all a copy costs, which separates the executor's concurrency from
    SQLite's one transaction per key.  copy/hashes/read only (no write fence):
    verification sees what the copy reported."""
    from pipeline.stores.base import CopyOutcome
    from transforms.stages import common as stages

    real_open = stages.data_store_from_spec

    class SleepMover:
        def __init__(self, real):
            self._real = real
            self.key_type = real.key_type

        def shard_exists(self, shard):
            return self._real.shard_exists(shard)

        def copy(self, keys, source, target):
            return [CopyOutcome(k, content_hash=b"\0" * 16, source_version=0, written=True) for k in keys]

        def hashes(self, keys, shard):
            return {k: (b"\0" * 16, 0) for k in keys}

        def read(self, keys, shard):
            return {k: (b"", 0) for k in keys}

    stages.data_store_from_spec = lambda spec, key_type: SleepMover(real_open(spec, key_type))
