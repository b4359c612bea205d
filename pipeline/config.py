"""Configuration: one YAML file, flag overrides, one frozen validated object.

Every tunable option is declared once in ``OPTIONS`` (name, default, meaning,
valid range); the YAML key is its snake_case name and the CLI flag the same
name in ``--kebab-case`` (CONTRACTS "Options").  Structured sections
(``map_store``, ``data_store``, ``target``, ``beam``, ``faults``) describe the
keyspace.  Relative paths are resolved against the config file's directory.

Errors name the option and the bad value (never a key) and exit 2.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import yaml

from pipeline.errors import BadInput
from pipeline.keys import KeyType

__all__ = [
    "OptionSpec",
    "OPTIONS",
    "OPTION_NAMES",
    "RunOptions",
    "Config",
    "TargetShard",
    "load_config",
    "parse_duration",
    "parse_window",
]


def parse_duration(value: Any, name: str) -> float:
    """Seconds from ``"100ms"``, ``"2s"``, ``"5m"``, ``"1h"``, ``"7d"`` or a number of seconds."""
    if isinstance(value, bool):
        raise BadInput(f"option {name}: expected a duration like 100ms or 2s, got {value!r}")
    if isinstance(value, (int, float)):
        secs = float(value)
    else:
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h|d)\s*", str(value))
        if not m:
            raise BadInput(f"option {name}: expected a duration like 100ms or 2s, got {value!r}")
        secs = float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    if not math.isfinite(secs) or secs < 0:
        raise BadInput(f"option {name}: duration must be >= 0, got {value!r}")
    return secs


def parse_window(value: Any, name: str = "window") -> tuple[int, int] | None:
    """``"AA-BB"`` (hex top bytes of the stable hash, inclusive) -> (0xAA, 0xBB)."""
    if value is None or value == "":
        return None
    m = re.fullmatch(r"([0-9A-Fa-f]{2})-([0-9A-Fa-f]{2})", str(value).strip())
    if not m:
        raise BadInput(f"option {name}: expected AA-BB (two hex bytes), got {value!r}")
    lo, hi = int(m.group(1), 16), int(m.group(2), 16)
    if lo > hi:
        raise BadInput(f"option {name}: start {m.group(1)} is after end {m.group(2)}")
    return lo, hi


@dataclass(frozen=True)
class OptionSpec:
    name: str
    default: Any
    kind: str  # int | float | bool | duration | choice | window | str
    doc: str
    lo: float | None = None
    hi: float | None = None
    choices: tuple[str, ...] = ()
    #: Unsafe when on: the run warns when it starts (and flags never abbreviate).
    unsafe: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def range_text(self) -> str:
        if self.kind == "bool":
            return "true | false"
        if self.kind == "choice":
            return " | ".join(self.choices)
        if self.kind == "window":
            return "AA-BB hex, AA <= BB, or empty"
        if self.kind == "duration":
            return f"{_fmt_dur(self.lo)} .. {_fmt_dur(self.hi)}"
        if self.lo is not None:
            return f"{_fmt_num(self.lo)} .. {_fmt_num(self.hi)}"
        return "any"

    def default_text(self) -> str:
        if self.kind == "duration":
            return _fmt_dur(self.default)
        if self.kind == "bool":
            return "true" if self.default else "false"
        if self.default is None:
            return "(none)"
        return str(self.default)

    def parse(self, value: Any) -> Any:
        n = self.name
        if self.kind == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
                return value.lower() in ("true", "yes", "1")
            raise BadInput(f"option {n}: expected true or false, got {value!r}")
        if self.kind == "choice":
            if value not in self.choices:
                raise BadInput(f"option {n}: expected one of {', '.join(self.choices)}, got {value!r}")
            return value
        if self.kind == "window":
            parse_window(value, n)
            return None if value in (None, "") else str(value).strip().upper()
        if self.kind == "str":
            return None if value is None else str(value)
        if self.kind == "duration":
            v = parse_duration(value, n)
        elif self.kind == "int":
            if isinstance(value, bool):
                raise BadInput(f"option {n}: expected an integer, got {value!r}")
            try:
                v = int(str(value).strip()) if not isinstance(value, int) else value
            except ValueError:
                raise BadInput(f"option {n}: expected an integer, got {value!r}") from None
        else:
            if isinstance(value, bool):
                raise BadInput(f"option {n}: expected a number, got {value!r}")
            try:
                v = float(value)
            except (TypeError, ValueError):
                raise BadInput(f"option {n}: expected a number, got {value!r}") from None
            if not math.isfinite(v):
                raise BadInput(f"option {n}: expected a finite number, got {value!r}")
        if self.lo is not None and v < self.lo or self.hi is not None and v > self.hi:
            raise BadInput(f"option {n}: {value!r} is out of range ({self.range_text()})")
        return v


def _fmt_num(x):
    return str(int(x)) if float(x).is_integer() else str(x)


def _fmt_dur(secs):
    if secs is None:
        return "-"
    if secs < 1:
        return f"{int(round(secs * 1000))}ms"
    if secs < 60 or secs % 60:
        return f"{_fmt_num(secs)}s"
    if secs % 3600 == 0 and secs >= 3600:
        return f"{_fmt_num(secs / 3600)}h"
    return f"{_fmt_num(secs / 60)}m"


#: Every option, once.  The README's configuration reference is checked against this.
OPTIONS: tuple[OptionSpec, ...] = (
    OptionSpec("copy_concurrency", 32, "int", "Copies in flight per worker (I/O-bound movers).", 1, 1024),
    OptionSpec("verify_concurrency", 32, "int", "Verifications in flight per worker.", 1, 1024),
    OptionSpec("swap_batch_size", 500, "int", "Keys per atomic map swap batch; also the unit of copy/verify work.", 1, 100000),
    OptionSpec("max_retries", 5, "int", "Transient retries (and re-copies after a verify mismatch) before a key is Failed.", 0, 100),
    OptionSpec("retry_base_delay", 0.1, "duration", "Base of the exponential backoff: retry n waits d/2 + random(0, d/2), d = min(30s, base * 2^n) (equal jitter).", 0.0, 60.0),
    OptionSpec("interleave_copy_and_verify", True, "bool", "Verify each batch right after its copy (true) or copy everything first (false)."),
    OptionSpec("force_swap_on_verification_failure", False, "bool", "Swap keys whose verification failed (unsafe; one loud warning per batch).", unsafe=True),
    OptionSpec("checkpoint_flush_interval", 2.0, "duration", "Flush checkpoint transitions at least this often.", 0.0, 3600.0),
    OptionSpec("checkpoint_flush_every_transitions", 1000, "int", "Flush checkpoint transitions after this many.", 1, 10_000_000),
    OptionSpec("segment_size", 20000, "int", "Rows per Arrow segment when reading snapshots and plans (bounds memory).", 100, 10_000_000),
    OptionSpec("plan_threads", 0, "int", "Planning threads per worker process; 0 = automatic: two per core (at most 8) on the in-memory engine for snapshots of 1M keys or more, else 1 (other engines' workers already use every core).", 0, 64),
    OptionSpec("verification", "hash", "choice", "full: byte equality; hash: content hash vs hash read at copy; sampled: seeded sample verified fully, escalating on mismatch.", choices=("full", "hash", "sampled")),
    OptionSpec("sample_fraction", 0.05, "float", "Fraction of keys per batch verified fully in sampled mode.", 0.0001, 1.0),
    OptionSpec("sample_seed", 0, "int", "Seed of the sampled verification (deterministic sample).", 0, 2**63 - 1),
    OptionSpec("hash_buckets", 16, "int", "Hash buckets per (source, target) pair: parallelism of copy/verify/swap work.", 1, 4096),
    OptionSpec("window", None, "window", "Phased window AA-BB: only keys whose stable hash top byte is in [AA, BB]."),
    OptionSpec("min_headroom_percent", 10.0, "float", "Dry-run capacity check: refuse when a shard's headroom would fall below this % of its capacity.", 0.0, 100.0),
    OptionSpec("write_fence", "auto", "choice", "auto: check source versions inside the swap transaction where the stores allow it, else re-check them under the source's write lock just before the swap; recheck: always the latter.", choices=("auto", "recheck")),
    OptionSpec("lease_ttl", 60.0, "duration", "Executor lease expiry; renewed every third of it while running.", 5.0, 86400.0),
    OptionSpec("progress_interval", 1.0, "duration", "Minimum time between progress events.", 0.1, 3600.0),
    OptionSpec("progress_log_interval", 10.0, "duration", "Time between progress lines on stderr when it is not a terminal (--progress text or json).", 0.1, 86400.0),
    OptionSpec("shard_max_in_flight", 0, "int", "Per-shard cap on copy calls in flight, per worker process (0 = no cap).", 0, 100000),
    OptionSpec("shard_max_keys_per_s", 0.0, "float", "Per-shard cap on keys copied per second, per worker process (0 = no cap).", 0.0, 1e9),
    OptionSpec("adaptive_throttling", True, "bool", "Back off a shard's copy concurrency when its latency or error rate rises; ramp up when it recovers."),
    OptionSpec("shared_paths", False, "bool", "Declare that a local work_dir and local object-store shards are mounted at the same path on every worker (required for runners whose workers may be on other machines)."),
)
OPTION_NAMES = tuple(o.name for o in OPTIONS)
_SPEC = {o.name: o for o in OPTIONS}

#: The type of each option kind (what ``OptionSpec.parse`` returns), as RunOptions annotates it.
KIND_TYPES: Mapping[str, str] = {"int": "int", "float": "float", "bool": "bool", "duration": "float",
                                 "choice": "str", "window": "str | None", "str": "str | None"}


@dataclass(frozen=True)
class RunOptions:
    """Every option of :data:`OPTIONS`, typed, as one frozen (picklable) object.

    What the stages of a run read.  It declares no defaults of its own: build
    it with :meth:`from_mapping`, which takes what ``OPTIONS`` says for any
    option the mapping leaves out.  Its fields are ``OPTIONS``, in order, typed
    by their kind (checked when this module is imported)."""

    copy_concurrency: int
    verify_concurrency: int
    swap_batch_size: int
    max_retries: int
    retry_base_delay: float
    interleave_copy_and_verify: bool
    force_swap_on_verification_failure: bool
    checkpoint_flush_interval: float
    checkpoint_flush_every_transitions: int
    segment_size: int
    plan_threads: int
    verification: str
    sample_fraction: float
    sample_seed: int
    hash_buckets: int
    window: str | None
    min_headroom_percent: float
    write_fence: str
    lease_ttl: float
    progress_interval: float
    progress_log_interval: float
    shard_max_in_flight: int
    shard_max_keys_per_s: float
    adaptive_throttling: bool
    shared_paths: bool

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any] | None = None) -> "RunOptions":
        """Validated options: each given value parsed by its OptionSpec, the rest its default."""
        options = dict(options or {})
        unknown = sorted(set(options) - set(_SPEC))
        if unknown:
            raise BadInput(f"unknown option {unknown[0]}")
        values = {}
        for o in OPTIONS:
            v = options.get(o.name, o.default)
            values[o.name] = o.parse(v) if v is not None or o.kind in ("window", "str") else v
        return cls(**values)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


if [(f.name, f.type) for f in dataclasses.fields(RunOptions)] != [(o.name, KIND_TYPES[o.kind]) for o in OPTIONS]:
    raise RuntimeError("RunOptions must declare OPTIONS' names, in order, typed by their kind")  # pragma: no cover


_SECTIONS = ("key_type", "work_dir", "map_store", "data_store", "current_shards", "target", "beam", "faults", "snapshot")


@dataclass(frozen=True)
class TargetShard:
    id: str
    weight: float = 1.0
    capacity_keys: int | None = None
    capacity_bytes: int | None = None


@dataclass(frozen=True)
class Config:
    """The validated configuration.  Build with :func:`load_config`."""

    key_type: KeyType
    work_dir: str
    map_store: Mapping[str, Any]
    data_store: Mapping[str, Any]
    current_shards: tuple[str, ...]
    target_profile: str
    target_shards: tuple[TargetShard, ...]
    target_virtual_nodes: int | None
    target_snapshot: str | None
    snapshot: str | None
    beam: Mapping[str, Any]
    faults: Mapping[str, Any]
    options: Mapping[str, Any]
    base_dir: str = "."

    def opt(self, name: str) -> Any:
        return self.options[name]

    @property
    def run_options(self) -> RunOptions:
        """The options as one typed, frozen object (what a run's stages read)."""
        return RunOptions.from_mapping(self.options)

    def __getattr__(self, name):  # options as attributes: cfg.copy_concurrency
        opts = object.__getattribute__(self, "options")
        if name in opts:
            return opts[name]
        raise AttributeError(name)

    @property
    def window(self) -> tuple[int, int] | None:
        return parse_window(self.options["window"])

    def known_shards(self) -> set[str]:
        return set(self.current_shards) | {s.id for s in self.target_shards}

    def with_options(self, **overrides) -> "Config":
        opts = dict(self.options)
        for k, v in overrides.items():
            if k not in _SPEC:
                raise BadInput(f"unknown option {k}")
            opts[k] = _SPEC[k].parse(v)
        return dataclasses.replace(self, options=opts)


def _resolve(base: str, path: Any, what: str) -> str:
    if not isinstance(path, str) or not path:
        raise BadInput(f"config {what}: expected a path, got {path!r}")
    if path.startswith("gs://") or os.path.isabs(path):
        return path
    return os.path.normpath(os.path.join(base, path))


def _store_section(raw: Any, base: str, what: str) -> dict:
    if not isinstance(raw, Mapping) or "kind" not in raw:
        raise BadInput(f"config {what}: expected a mapping with a 'kind'")
    from pipeline.stores.registry import check_kind  # built-in kinds and shardmove.stores plugins

    check_kind(raw["kind"], what)
    out = dict(raw)
    for k in ("path", "directory"):
        if k in out:
            out[k] = _resolve(base, out[k], f"{what}.{k}")
    if isinstance(out.get("shards"), Mapping):  # object / per-shard locations
        shards = {}
        for sid, loc in out["shards"].items():
            shards[sid] = _resolve(base, loc, f"{what}.shards.{sid}") if isinstance(loc, str) and "://" not in loc \
                and not loc.startswith("postgres") and "=" not in loc else loc
        out["shards"] = shards
    return out


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
#: where ``${VAR}`` is replaced by the environment variable's value: store sections (DSNs, URLs,
#: paths) and the work directory -- so secrets stay out of config files
_EXPANDED = ("map_store", "data_store", "work_dir", "snapshot")


def _expand_env(raw: Mapping) -> Mapping:
    """``${VAR}`` in the strings of ``_EXPANDED`` sections, from the environment.  An unset
    variable is bad configuration, named with where it is used; a value is never printed."""

    def expand(v, where: str):
        if isinstance(v, str):
            def one(m):
                if m.group(1) not in os.environ:
                    raise BadInput(f"config {where}: environment variable {m.group(1)} is not set")
                return os.environ[m.group(1)]

            return _ENV_REF.sub(one, v)
        if isinstance(v, Mapping):
            return {k: expand(x, f"{where}.{k}") for k, x in v.items()}
        if isinstance(v, list):
            return [expand(x, f"{where}[{i}]") for i, x in enumerate(v)]
        return v

    return {k: (expand(v, k) if k in _EXPANDED else v) for k, v in raw.items()}


def load_config(path: str | None, overrides: Mapping[str, Any] | None = None, raw: Mapping | None = None) -> Config:
    """Read, merge flag overrides, validate.  Raises BadInput (exit 2)."""
    if raw is None:
        if path is None:
            raise BadInput("no configuration: pass --config FILE")
        try:
            with open(path, "r", encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise BadInput(f"cannot read config {path}: {e.strerror}") from e
        except UnicodeDecodeError as e:
            raise BadInput(f"config {path}: not UTF-8 text (byte {e.start})") from None
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise BadInput(f"config {path}: malformed YAML{where}") from e
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise BadInput(f"config {path}: expected a mapping at the top level")
        base = os.path.dirname(os.path.abspath(path))
    else:
        base = os.path.abspath(".")
    raw = _expand_env(raw)
    unknown = sorted(k for k in raw if k not in _SPEC and k not in _SECTIONS)
    if unknown:
        raise BadInput(f"config: unknown option {unknown[0]}" + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""))
    options = {}
    for spec in OPTIONS:
        v = raw.get(spec.name, spec.default)
        options[spec.name] = spec.parse(v) if v is not None or spec.kind in ("window", "str") else v
    for k, v in (overrides or {}).items():
        if v is None:
            continue
        if k not in _SPEC:
            raise BadInput(f"unknown option {k}")
        options[k] = _SPEC[k].parse(v)

    try:
        key_type = KeyType(raw.get("key_type", "string"))
    except ValueError:
        raise BadInput(f"option key_type: expected one of string, int64, uuid, bytes, got {raw.get('key_type')!r}") from None

    work_dir = _resolve(base, raw.get("work_dir", "work"), "work_dir")
    map_store = _store_section(raw.get("map_store"), base, "map_store")
    data_store = _store_section(raw.get("data_store", {"kind": "none"}), base, "data_store")

    cur = raw.get("current_shards", [])
    if not isinstance(cur, list) or not all(isinstance(s, str) and s for s in cur):
        raise BadInput("config current_shards: expected a list of shard ids")
    if len(set(cur)) != len(cur):
        raise BadInput("config current_shards: duplicate shard id")

    target = raw.get("target")
    if not isinstance(target, Mapping):
        raise BadInput("config target: expected a mapping (profile and shards, or snapshot)")
    unknown_t = sorted(set(target) - {"profile", "shards", "virtual_nodes", "snapshot"})
    if unknown_t:
        raise BadInput(f"config target: unknown field {unknown_t[0]}")
    profile = target.get("profile", "native")
    if profile not in ("native", "shardis", "ketama"):
        raise BadInput(f"config target.profile: expected native, shardis or ketama, got {profile!r}")
    shards_raw = target.get("shards", [])
    if not isinstance(shards_raw, list):
        raise BadInput("config target.shards: expected a list")
    tshards = []
    seen = set()
    for i, s in enumerate(shards_raw):
        if isinstance(s, str):
            s = {"id": s}
        if not isinstance(s, Mapping) or not isinstance(s.get("id"), str) or not s.get("id"):
            raise BadInput(f"config target.shards[{i}]: expected an id")
        bad = sorted(set(s) - {"id", "weight", "capacity_keys", "capacity_bytes"})
        if bad:
            raise BadInput(f"config target.shards[{i}]: unknown field {bad[0]}")
        if s["id"] in seen:
            raise BadInput(f"config target.shards: duplicate shard id at position {i}")
        seen.add(s["id"])
        w = s.get("weight", 1)
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0:
            raise BadInput(f"config target.shards[{i}].weight: must be > 0, got {w!r}")
        caps = {}
        for c in ("capacity_keys", "capacity_bytes"):
            v = s.get(c)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
                raise BadInput(f"config target.shards[{i}].{c}: must be a positive integer, got {v!r}")
            caps[c] = v
        tshards.append(TargetShard(s["id"], float(w), **caps))
    tsnap = target.get("snapshot")
    if tsnap is not None:
        tsnap = _resolve(base, tsnap, "target.snapshot")
    elif not tshards:
        raise BadInput("config target.shards: the target shard set is empty")
    vn = target.get("virtual_nodes")
    if vn is not None and (isinstance(vn, bool) or not isinstance(vn, int) or vn < 1 or vn > 100000):
        raise BadInput(f"config target.virtual_nodes: expected an integer 1..100000, got {vn!r}")

    beam = raw.get("beam") or {}
    if not isinstance(beam, Mapping):
        raise BadInput("config beam: expected a mapping")
    faults = raw.get("faults") or {}
    if not isinstance(faults, Mapping):
        raise BadInput("config faults: expected a mapping")
    snapshot = raw.get("snapshot")
    if snapshot is not None:
        snapshot = _resolve(base, snapshot, "snapshot")
    ds_shards = data_store.get("shards")
    if isinstance(ds_shards, Mapping):
        needed = set(cur) | {t.id for t in tshards}
        missing = sorted(needed - set(ds_shards))
        if missing:
            raise BadInput(f"config data_store.shards: {len(missing)} shard ids have no location "
                           f"({', '.join(missing[:3])})")
    return Config(
        key_type=key_type,
        work_dir=work_dir,
        map_store=map_store,
        data_store=data_store,
        current_shards=tuple(cur),
        target_profile=profile,
        target_shards=tuple(tshards),
        target_virtual_nodes=vn,
        target_snapshot=tsnap,
        snapshot=snapshot,
        beam=dict(beam),
        faults=dict(faults),
        options=options,
        base_dir=base,
    )


def options_table() -> str:
    """The README's configuration reference (checked by tests/test_docs.py)."""
    rows = ["| option | flag | default | valid range | meaning |", "|---|---|---|---|---|"]
    for o in OPTIONS:
        rows.append(f"| `{o.name}` | `{o.flag}` | {o.default_text()} | {o.range_text()} | {o.doc} |")
    return "\n".join(rows)


if __name__ == "__main__":  # python -m pipeline.config  -> the README table
    print(options_table())
