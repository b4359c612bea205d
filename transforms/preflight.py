"""Checks of the Beam flags and of where the workers run, before anything is touched.

:func:`preflight` is called by ``plan`` and ``run`` (and everything built on
them) before a snapshot, a lease, a staging directory or a history record
exists.  It returns the final Beam arguments, with what the runner needs
filled in (a local Prism binary, the job-server jar), or raises
:class:`BadInput` (exit 2) with one line:

- **Unknown Beam flags** (``--no_such_flag=1``), for every runner: Beam itself
  would only log and discard them.  Every flag that no ``PipelineOptions``
  class knows is named.
- **An unknown runner**: Beam's runner names (``DirectRunner``,
  ``PrismRunner``, ``FlinkRunner``, ...) or a dotted ``module.Class`` path.
- **Runners whose workers may be on other machines** (Dataflow; Flink, Spark
  or Portable with a non-local master, job endpoint or worker pool):
  a SQLite map or data store is refused always (SQLite locking is unsafe on
  network filesystems); a local ``work_dir`` or local object-store shards are
  refused unless the configuration declares them shared (``shared_paths:
  true``, flag ``--shared-paths``: mounted at the same path on every worker).
  A Dataflow ``--dry_run=True`` translation runs the same checks but reports
  them as ``warning:`` lines and still translates.
- **Stores bound to this process** (``kind: memory``; an API instance or a
  plugin marked ``in_process_only``; an API instance that cannot be pickled)
  on a runner whose workers are other processes
  (anything but ``FnApiRunner`` in its ``in_memory``/``multi_threading`` modes).
- **Missing tools**: Prism (built with Go when absent), Java and the
  job-server jar for Flink and Spark (see :mod:`transforms.engines`).

:func:`check_stores` is the stores' half, called by ``run`` once the plan is
read and before the lease is taken or anything is copied: every source shard
of the plan must be readable and every target shard writable, with its tables
or schema in place -- each data store says how it judges that without writing
(:class:`~pipeline.stores.base.ShardChecks`: PostgreSQL asks
``has_table_privilege``, SQLite takes and rolls back its write lock, a local
object store asks ``os.access``).  A finding is one line, exit 2, naming the
shard and the object: ``preflight: data store: target shard s4: table
public.records does not exist``.
"""
from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass, field
from typing import Callable, Sequence

from pipeline.errors import BadInput
from transforms import engines
from transforms.runner import canonical_runner, pipeline_args

__all__ = ["Preflight", "preflight", "check_stores", "unknown_flags", "canonical_runner", "remote_reason"]

_LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1", "[::1]", "0.0.0.0")


@dataclass(frozen=True)
class Preflight:
    args: list[str]                   # the Beam arguments to build the pipeline with
    runner: str                       # canonical runner class name
    remote: str | None = None         # why workers may be on other machines, or None
    warnings: list[str] = field(default_factory=list)   # dry-run findings, one line each


def unknown_flags(args: Sequence[str]) -> list[str]:
    """The flags of ``args`` that no registered ``PipelineOptions`` class knows, as the user spelled them."""
    # deferred: Beam takes seconds to load; importing this module must not
    from apache_beam.options.pipeline_options import PipelineOptions

    log = logging.getLogger("apache_beam.options.pipeline_options")
    old = log.level
    log.setLevel(logging.ERROR)  # Beam logs "Discarding unparseable args": we say it ourselves
    try:
        opts = PipelineOptions(list(args))
        unknown = set(opts.get_all_options(retain_unknown_options=True)) - set(opts.get_all_options())
    finally:
        log.setLevel(old)
    out = []
    for a in args:
        if a.startswith("-"):
            name = a.lstrip("-").split("=", 1)[0]
            if name.replace("-", "_") in unknown and a.split("=", 1)[0] not in out:
                out.append(a.split("=", 1)[0])
    return out


def _host(endpoint: str | None) -> str | None:
    if not endpoint:
        return None
    e = endpoint.split("://", 1)[-1]
    if e.startswith("["):
        return e[: e.find("]") + 1]
    return e.rsplit(":", 1)[0] if ":" in e else e


def _is_local(host: str | None) -> bool:
    if host is None or host in _LOCAL_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def remote_reason(runner: str, opts) -> str | None:
    """Why this runner's workers may run on other machines, or None when they are local."""
    # deferred: Beam takes seconds to load; importing this module must not
    from apache_beam.options.pipeline_options import (
        FlinkRunnerOptions, PortableOptions, SparkRunnerOptions)

    if runner in ("DataflowRunner", "TestDataflowRunner"):
        return f"{runner} runs its workers on Google's machines"
    port = opts.view_as(PortableOptions)
    if port.environment_type in ("EXTERNAL",) and not _is_local(_host(port.environment_config)):
        return f"--environment_config={port.environment_config}: the worker pool is on another machine"
    if runner == "FlinkRunner":
        master = opts.view_as(FlinkRunnerOptions).flink_master
        if master not in ("[local]", "[auto]") and not _is_local(_host(master)):
            return f"--flink_master={master}: the Flink cluster's task managers may be on other machines"
    if runner == "SparkRunner":
        master = opts.view_as(SparkRunnerOptions).spark_master_url
        if not master.startswith("local") and not _is_local(_host(master)):
            return f"--spark_master_url={master}: the Spark executors may be on other machines"
    if runner == "PortableRunner" and not _is_local(_host(port.job_endpoint)):
        return f"--job_endpoint={port.job_endpoint}: the job service's workers may be on other machines"
    return None


def _shared_storage_findings(cfg, why: str) -> list[str]:
    """One line per thing a remote worker could not use; empty when all is reachable."""
    found = []
    for section in ("map_store", "data_store"):
        if (getattr(cfg, section) or {}).get("kind") == "sqlite":
            found.append(f"{section}: a SQLite store cannot be used when {why} "
                         f"(SQLite locking is unsafe on network filesystems); use PostgreSQL or Redis")
    if cfg.opt("shared_paths"):
        return found
    if "://" not in cfg.work_dir:
        found.append(f"work_dir {cfg.work_dir} is a local path and {why}: use gs://, or mount it at the same "
                     f"path on every worker and declare it with shared_paths: true (--shared-paths)")
    ds = cfg.data_store or {}
    if ds.get("kind") == "objects":
        local = sorted(s for s, loc in (ds.get("shards") or {}).items() if "://" not in str(loc))
        if local:
            found.append(f"data_store.shards: {len(local)} object-store shards are local paths ({', '.join(local[:3])}) "
                         f"and {why}: use gs://, or declare a shared mount with shared_paths: true (--shared-paths)")
    return found


def _check_in_process_stores(cfg, runner: str, opts) -> None:
    """A store bound to this process (a memory store, an unpicklable object): refuse runners
    whose workers are elsewhere."""
    from apache_beam.options.pipeline_options import DirectOptions

    from pipeline.stores.registry import in_process_only

    mode = opts.view_as(DirectOptions).direct_running_mode
    if runner == "FnApiRunner" and mode in (None, "in_memory", "multi_threading"):
        return
    for section in ("map_store", "data_store"):
        why = in_process_only(getattr(cfg, section, None))
        if why:
            where = f"{runner} with --direct_running_mode={mode}" if runner == "FnApiRunner" else runner
            raise BadInput(f"{section}: {why}, and {where} runs its workers in other processes; use the "
                           f"in-process runner (--runner=FnApiRunner, the default)")


def preflight(cfg, beam_args: Sequence[str] = (), log: Callable[[str], None] | None = None) -> Preflight:
    """Validate the Beam flags for ``cfg`` and fill in what the runner needs; see the module doc."""
    # deferred: Beam takes seconds to load; importing this module must not
    from apache_beam.options.pipeline_options import (
        PipelineOptions, PrismRunnerOptions, TestOptions, FlinkRunnerOptions, SparkRunnerOptions)

    args = pipeline_args(cfg.beam, beam_args)
    bad = unknown_flags(args)
    if bad:
        raise BadInput(f"unknown Beam flag{'s' if len(bad) > 1 else ''} {', '.join(bad)} "
                       f"(no Beam PipelineOptions class knows {'them' if len(bad) > 1 else 'it'}); nothing was modified")
    opts = PipelineOptions(args)
    runner = canonical_runner(opts.get_all_options().get("runner") or "FnApiRunner")
    remote = remote_reason(runner, opts)
    _check_in_process_stores(cfg, runner, opts)
    warnings: list[str] = []
    if remote:
        findings = _shared_storage_findings(cfg, f"workers may be on other machines ({remote})")
        if runner in ("DataflowRunner", "TestDataflowRunner") and opts.view_as(TestOptions).dry_run:
            warnings = [f"warning: {f}" for f in findings]
        elif findings:
            raise BadInput(findings[0] + (f" (and {len(findings) - 1} more)" if len(findings) > 1 else ""))
    extra: list[str] = []
    if runner in ("PrismRunner", "DirectRunner") and not opts.view_as(PrismRunnerOptions).prism_location:
        # DirectRunner hands the pipeline to Prism when it can: point both at the local binary
        # (otherwise Beam downloads a release binary from the internet, or DirectRunner quietly
        # falls back to the in-process engine).
        path = engines.ensure_prism(log=log) if runner == "PrismRunner" else engines.find_prism()
        if path:
            extra.append(f"--prism_location={path}")
    if runner in ("FlinkRunner", "SparkRunner"):
        engines.require_java(runner)
        if runner == "FlinkRunner":
            given = opts.view_as(FlinkRunnerOptions).flink_job_server_jar
            flag = "--flink_job_server_jar"
        else:
            given = opts.view_as(SparkRunnerOptions).spark_job_server_jar
            flag = "--spark_job_server_jar"
        jar = engines.find_job_server_jar(runner, opts, given)
        if not given:
            extra.append(f"{flag}={jar}")
    return Preflight(args + extra, runner, remote, warnings)


def check_stores(manifest: dict, data_store) -> None:
    """The data store's preflight for a plan (see the module doc): raises :class:`BadInput`
    (exit 2) with one line naming the first shard at fault and what is wrong there.

    A store without :class:`~pipeline.stores.base.ShardChecks` is asked only whether
    its shards exist (:class:`~pipeline.stores.base.ShardInventory`): every source
    must, and every target too where the store does not create shards."""
    from pipeline.stores.base import ShardChecks, ShardInventory

    order = lambda ids: sorted(ids, key=lambda s: s.encode())  # noqa: E731 - CONTRACTS: shard ids by UTF-8 bytes
    targets = order({p["target"] for p in manifest["pairs"]})
    sources = order({p["source"] for p in manifest["pairs"]} - set(targets))
    if isinstance(data_store, ShardChecks):
        found = []
        for role, shards, write in (("source", sources, False), ("target", targets, True)):
            for shard in shards:
                problem = data_store.check_shard(shard, write=write)
                if problem:
                    found.append(f"{role} shard {shard}: {problem}")
        if found:
            more = f" (and {len(found) - 1} more shards)" if len(found) > 1 else ""
            raise BadInput(f"preflight: data store: {found[0]}{more}; nothing was modified")
        return
    if not isinstance(data_store, ShardInventory):
        return
    missing = [s for s in order({p["source"] for p in manifest["pairs"]}) if not data_store.shard_exists(s)]
    if missing:
        raise BadInput(f"preflight: data store: {len(missing)} source shards of the plan do not exist "
                       f"({', '.join(missing[:3])})")
    absent = [t for t in targets if not data_store.shard_exists(t)]
    if absent and not getattr(data_store, "creates_shards", True):
        raise BadInput(f"preflight: data store: {len(absent)} target shards of the plan cannot be reached or lack "
                       f"the configured tables ({', '.join(absent[:3])})")
