"""The one retry schedule (pipeline/retry.py) and the typed run options (pipeline/config.RunOptions)."""
from __future__ import annotations

import dataclasses
import math
import pickle
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.config import OPTIONS, RunOptions, load_config
from pipeline.errors import BadInput, PermanentError, StoreError, TransientError
from pipeline.retry import MAX_DELAY_S, RetrySchedule, backoff_delay, is_transient


# ------------------------------------------------------------------ schedule

@given(attempt=st.integers(0, 200), base=st.floats(0.0, 60.0), seed=st.integers(0, 2**32))
def test_delay_is_equal_jitter_within_half_and_whole_of_the_capped_exponential(attempt, base, seed):
    d = backoff_delay(attempt, base, rng=random.Random(seed))
    ceiling = min(MAX_DELAY_S, math.ldexp(base, attempt))  # base * 2**attempt, exactly
    assert ceiling / 2 <= d <= ceiling + 1e-12
    assert d <= MAX_DELAY_S


def test_delay_doubles_then_caps_at_30_seconds():
    lo = [backoff_delay(n, 0.1, rng=_Fixed(0.0)) for n in range(12)]
    hi = [backoff_delay(n, 0.1, rng=_Fixed(1.0)) for n in range(12)]
    assert lo[:4] == pytest.approx([0.05, 0.1, 0.2, 0.4])
    assert hi[:4] == pytest.approx([0.1, 0.2, 0.4, 0.8])
    assert hi[-1] == MAX_DELAY_S and lo[-1] == MAX_DELAY_S / 2  # 0.1 * 2^11 = 204.8 s: capped
    assert backoff_delay(10**6, 0.1, rng=_Fixed(1.0)) == MAX_DELAY_S  # no overflow far out


def test_delay_is_deterministic_with_a_seeded_rng_and_jittered_across_seeds():
    a = [backoff_delay(n, 0.5, rng=random.Random(7)) for n in range(6)]
    b = [backoff_delay(n, 0.5, rng=random.Random(7)) for n in range(6)]
    assert a == b
    spread = {backoff_delay(3, 0.5, rng=random.Random(s)) for s in range(50)}
    assert len(spread) > 40  # workers that failed together do not retry together


def test_zero_base_never_waits_and_negative_attempt_is_refused():
    assert backoff_delay(5, 0.0) == 0.0
    with pytest.raises(ValueError):
        backoff_delay(-1, 0.1)


def test_call_retries_transient_errors_then_raises_the_last():
    sleeps, retried = [], []
    calls = []

    def flaky():
        calls.append(1)
        raise TransientError(f"down {len(calls)}")

    sched = RetrySchedule(0.1, 3)
    with pytest.raises(TransientError, match="down 4"):
        sched.call(flaky, sleep=sleeps.append, rng=random.Random(1),
                   on_retry=lambda e, a: retried.append(a))
    assert len(calls) == 4 and retried == [0, 1, 2]
    assert [0.05 <= sleeps[0] <= 0.1, 0.1 <= sleeps[1] <= 0.2, 0.2 <= sleeps[2] <= 0.4] == [True] * 3


def test_call_returns_after_recovery_and_never_retries_other_errors():
    sleeps = []
    state = {"n": 0}

    def recovers(x):
        state["n"] += 1
        if state["n"] < 3:
            raise TransientError("busy")
        return x * 2

    assert RetrySchedule(0.01, 5).call(recovers, 21, sleep=sleeps.append) == 42
    assert len(sleeps) == 2
    for err in (PermanentError("gone"), ValueError("bug"), StoreError("store")):
        n = []

        def fails(err=err):
            n.append(1)
            raise err

        with pytest.raises(type(err)):
            RetrySchedule(0.01, 5).call(fails, sleep=sleeps.append)
        assert n == [1]  # not retried


def test_zero_retries_means_one_try():
    n = []

    def fails():
        n.append(1)
        raise TransientError("x")

    with pytest.raises(TransientError):
        RetrySchedule(0.0, 0).call(fails, sleep=lambda s: None)
    assert n == [1]
    assert RetrySchedule(0.0, 0).exhausted(0) and not RetrySchedule(0.0, 1).exhausted(0)


def test_schedule_pickles():
    s = RetrySchedule(0.1, 5)
    assert pickle.loads(pickle.dumps(s)) == s


# ------------------------------------------------------------------ filter

def test_transient_filter_names_the_stores_and_libraries_transient_errors():
    import sqlite3

    import psycopg
    import redis

    assert is_transient(TransientError("x"))
    assert not is_transient(PermanentError("x"))
    assert not is_transient(ValueError("x"))
    assert is_transient(redis.exceptions.ConnectionError("x"))
    assert is_transient(redis.exceptions.TimeoutError("x"))
    assert not is_transient(redis.exceptions.ResponseError("WRONGTYPE"))
    assert is_transient(psycopg.errors.DeadlockDetected())
    assert is_transient(psycopg.errors.SerializationFailure())
    assert not is_transient(psycopg.errors.UniqueViolation())
    assert is_transient(sqlite3.OperationalError("database is locked"))
    assert not is_transient(sqlite3.OperationalError("no such table: records"))


def test_transient_filter_names_google_client_errors():
    from google.api_core import exceptions

    from pipeline import gcs

    assert is_transient(exceptions.ServiceUnavailable("x"))
    assert is_transient(exceptions.TooManyRequests("x"))
    assert is_transient(gcs.StorageUnavailable("x"))
    assert not is_transient(exceptions.NotFound("x"))
    assert not is_transient(exceptions.PreconditionFailed("x"))


# ------------------------------------------------------------------ options

def test_run_options_are_every_option_with_config_defaults_and_pickle():
    o = RunOptions.from_mapping({})
    assert [f.name for f in dataclasses.fields(o)] == [s.name for s in OPTIONS]
    assert o.as_dict() == {s.name: s.default for s in OPTIONS}  # no second set of defaults
    assert pickle.loads(pickle.dumps(o)) == o
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.copy_concurrency = 1  # type: ignore[misc]


def test_run_options_parse_and_validate_what_they_are_given():
    o = RunOptions.from_mapping({"retry_base_delay": "250ms", "write_fence": "recheck", "window": "0a-1f"})
    assert o.retry_base_delay == pytest.approx(0.25) and o.write_fence == "recheck" and o.window == "0A-1F"
    with pytest.raises(BadInput, match="option copy_concurrency"):
        RunOptions.from_mapping({"copy_concurrency": 0})
    with pytest.raises(BadInput, match="unknown option"):
        RunOptions.from_mapping({"copy_concurency": 4})


def test_config_run_options_match_its_options(tmp_path):
    cfg = load_config(None, {"copy_concurrency": "7"}, raw={
        "map_store": {"kind": "sqlite", "path": str(tmp_path / "m.db")},
        "target": {"shards": ["s0"]}, "verification": "full"})
    o = cfg.run_options
    assert o.copy_concurrency == 7 and o.verification == "full"
    assert o.as_dict() == dict(cfg.options)


def test_exec_spec_takes_a_mapping_as_run_options():
    from pipeline.keys import KeyType
    from transforms.execute import ExecSpec

    spec = ExecSpec("d", "p", 1, KeyType("string"), {}, {}, {"swap_batch_size": 7}, ())
    assert isinstance(spec.options, RunOptions) and spec.options.swap_batch_size == 7
    assert pickle.loads(pickle.dumps(spec)) == spec


class _Fixed:
    def __init__(self, u):
        self.u = u

    def random(self):
        return self.u
