"""Configuration: validation errors name the option and the bad value."""
import pytest

from pipeline.config import OPTIONS, load_config, parse_duration, parse_window
from pipeline.errors import BadInput

BASE = {
    "map_store": {"kind": "sqlite", "path": "map.sqlite"},
    "current_shards": ["s0", "s1"],
    "target": {"shards": [{"id": "s0"}, {"id": "s1"}, {"id": "s2"}]},
}


def cfg(**over):
    raw = dict(BASE)
    raw.update(over)
    return load_config(None, raw=raw)


def test_defaults_match_contracts():
    c = cfg()
    assert c.copy_concurrency == 32 and c.verify_concurrency == 32 and c.swap_batch_size == 500
    assert c.max_retries == 5 and c.retry_base_delay == pytest.approx(0.1)
    assert c.interleave_copy_and_verify is True and c.force_swap_on_verification_failure is False
    assert c.checkpoint_flush_interval == 2.0 and c.checkpoint_flush_every_transitions == 1000
    assert c.segment_size == 20000 and c.verification == "hash"


@pytest.mark.parametrize("name,value,match", [
    ("copy_concurrency", 0, r"option copy_concurrency: 0 is out of range"),
    ("copy_concurrency", "many", r"option copy_concurrency: expected an integer, got 'many'"),
    ("retry_base_delay", "soon", r"option retry_base_delay: expected a duration"),
    ("verification", "maybe", r"option verification: expected one of full, hash, sampled, got 'maybe'"),
    ("window", "80-10", r"option window: start 80 is after end 10"),
    ("window", "zz", r"option window: expected AA-BB"),
    ("interleave_copy_and_verify", "perhaps", r"option interleave_copy_and_verify: expected true or false"),
])
def test_bad_option_named(name, value, match):
    with pytest.raises(BadInput, match=match):
        cfg(**{name: value})


def test_unknown_option():
    with pytest.raises(BadInput, match="unknown option copy_concurency"):
        cfg(copy_concurency=3)


def test_weights_and_empty_target():
    with pytest.raises(BadInput, match=r"target.shards\[1\].weight: must be > 0"):
        cfg(target={"shards": [{"id": "a"}, {"id": "b", "weight": 0}]})
    with pytest.raises(BadInput, match="target shard set is empty"):
        cfg(target={"shards": []})


def test_flag_override_wins():
    c = load_config(None, {"swap_batch_size": "7"}, raw=dict(BASE))
    assert c.swap_batch_size == 7


def test_duration_and_window_parsing():
    assert parse_duration("100ms", "x") == pytest.approx(0.1)
    assert parse_duration("2s", "x") == 2
    assert parse_duration("5m", "x") == 300
    assert parse_window("00-7f") == (0, 0x7F)
    assert parse_window(None) is None


def test_every_option_has_doc_and_default_in_range():
    for o in OPTIONS:
        assert o.doc
        if o.default is not None:
            o.parse(o.default)


def test_malformed_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("target: [unclosed\n")
    with pytest.raises(BadInput, match=r"malformed YAML at line"):
        load_config(str(p))
