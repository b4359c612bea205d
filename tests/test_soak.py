"""A small kill/resume soak in the suite (benchmarks/soak.py runs the big one)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_soak_kills_lose_nothing(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "soak.py"), "--keys", "2500",
                        "--kills", "4", "--seed", "3", "--max-delay", "4", "--dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=900)
    figures = dict(l.split(": ", 1) for l in r.stdout.splitlines() if ": " in l)
    assert r.returncode == 0, (r.stdout, r.stderr[-2000:])
    assert int(figures["kills"]) == 4
    assert figures["lost"] == "0" and figures["corrupted"] == "0" and figures["undecided"] == "0"
    assert figures["rewritten_map_rows"] == "0"
    assert int(figures["done"]) + int(figures["failed"]) == int(figures["planned"]) > 0
