"""Prometheus textfile export: valid exposition format whose numbers equal the summary."""
import math
import os
import re
import stat

from shardmove.prom import summary_to_prometheus, write_textfile

PLAN = "ab" * 32

SUMMARY = {
    "format_version": 1,
    "plan_id": PLAN,
    "planned": 1200,
    "done": 1150,
    "failed": 40,
    "states": {"planned": 3, "copying": 2, "copied": 1, "verifying": 0, "verified": 4, "swapping": 0,
               "done": 1150, "failed": 40},
    "failures_by_reason": {"source_missing": 30, "verify_mismatch": 10},
    "done_by_verification": {"hash": 1100, "already_swapped": 50},
    "copy_attempts": 1315,
    "complete": False,
    "max_epoch": 2,
    "skipped_checkpoint_files": 1,
    "elapsed_s": 12.5,
    "total_elapsed_s": 20.25,
    "keys_per_s": 95.2,
    "runs": 2,
    "retries_this_run": 17,
    "timings": {"copy": {"calls": 10, "p50_ms": 7.5, "p95_ms": 11.0, "max_ms": 14.25},
                "swap": {"calls": 3, "p50_ms": 8.0, "p95_ms": 9.0, "max_ms": 9.5}},
}

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\\\|\\"|\\n)*"'
_SAMPLE = re.compile(rf"^({_NAME})(?:\{{((?:{_LABEL})(?:,{_LABEL})*)\}})? (\S+)$")
_LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\\\|\\"|\\n)*)"')


def parse_exposition(text):
    """A strict little parser: {(name, frozenset(labels)): value}, and {name: type}."""
    assert text.endswith("\n")
    samples, types, helps = {}, {}, {}
    for line in text.splitlines():
        assert line.strip(), "no blank lines"
        if line.startswith("# HELP "):
            name, _, doc = line[7:].partition(" ")
            assert re.fullmatch(_NAME, name) and doc and name not in helps
            helps[name] = doc
        elif line.startswith("# TYPE "):
            name, kind = line[7:].split(" ")
            assert kind in ("counter", "gauge", "summary", "histogram", "untyped") and name not in types
            assert name in helps, "HELP precedes TYPE"
            types[name] = kind
        else:
            m = _SAMPLE.match(line)
            assert m, f"bad sample line {line!r}"
            name, labels, value = m.groups()
            assert name in types, f"sample before its TYPE line: {name}"
            lab = {}
            for k, v in _LABEL_RE.findall(labels or ""):
                assert k not in lab
                lab[k] = v.replace("\\n", "\n").replace('\\"', '"').replace("\\\\", "\\")
            v = float(value) if value not in ("+Inf", "-Inf", "NaN") else float(value.replace("+", ""))
            key = (name, frozenset(lab.items()))
            assert key not in samples, f"duplicate sample {key}"
            samples[key] = v
    return samples, types


def get(samples, name, **labels):
    return samples[(name, frozenset({"plan_id": PLAN, **labels}.items()))]


def test_prometheus_text_parses_and_equals_summary():
    text = summary_to_prometheus(SUMMARY, PLAN, now=1700000000.5)
    samples, types = parse_exposition(text)
    assert get(samples, "shardmove_planned_keys") == 1200
    for state, n in SUMMARY["states"].items():
        assert get(samples, "shardmove_keys", state=state) == n
    for reason, n in SUMMARY["failures_by_reason"].items():
        assert get(samples, "shardmove_failed_keys", reason=reason) == n
    for method, n in SUMMARY["done_by_verification"].items():
        assert get(samples, "shardmove_done_keys", verification=method) == n
    assert get(samples, "shardmove_plan_complete") == 0
    assert get(samples, "shardmove_copy_attempts_total") == 1315 and types["shardmove_copy_attempts_total"] == "counter"
    assert get(samples, "shardmove_runs_total") == 2
    assert get(samples, "shardmove_retries_last_run") == 17
    assert get(samples, "shardmove_elapsed_seconds") == 12.5
    assert get(samples, "shardmove_total_elapsed_seconds") == 20.25
    assert get(samples, "shardmove_keys_per_second") == 95.2
    assert get(samples, "shardmove_skipped_checkpoint_files") == 1
    assert get(samples, "shardmove_export_timestamp_seconds") == 1700000000.5
    for stage, t in SUMMARY["timings"].items():
        assert get(samples, "shardmove_stage_calls", stage=stage) == t["calls"]
        for which, k in (("p50", "p50_ms"), ("p95", "p95_ms"), ("max", "max_ms")):
            assert math.isclose(get(samples, "shardmove_stage_latency_seconds", stage=stage, stat=which), t[k] / 1000)
    assert all(t == "gauge" for n, t in types.items() if not n.endswith("_total"))
    assert all(dict(labels)["plan_id"] == PLAN for _n, labels in samples)


def test_prometheus_label_values_are_escaped():
    s = dict(SUMMARY, failures_by_reason={'we"ird\\reason\nx': 2}, complete=True)
    samples, _ = parse_exposition(summary_to_prometheus(s, PLAN))
    assert get(samples, "shardmove_failed_keys", reason='we"ird\\reason\nx') == 2
    assert get(samples, "shardmove_plan_complete") == 1


def test_prometheus_minimal_summary_from_status():
    """A plan that has not run: summarize() fields only, no timings."""
    s = {k: SUMMARY[k] for k in ("plan_id", "planned", "done", "failed", "states", "failures_by_reason",
                                 "done_by_verification", "complete")}
    samples, types = parse_exposition(summary_to_prometheus(s))
    assert get(samples, "shardmove_planned_keys") == 1200
    assert "shardmove_stage_latency_seconds" not in types and "shardmove_elapsed_seconds" not in types


def test_prometheus_textfile_written_atomically(tmp_path):
    path = tmp_path / "textfile" / "shardmove.prom"
    write_textfile(str(path), "a 1\n")
    write_textfile(str(path), summary_to_prometheus(SUMMARY, PLAN))
    assert parse_exposition(path.read_text())[0]
    assert sorted(os.listdir(path.parent)) == ["shardmove.prom"]  # no temporary left behind
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
