"""What a Beam runner needs on the launcher: the Prism binary, Java, job-server jars.

Everything is tied to the installed Beam version (``apache_beam.version``), so
the Python SDK, Prism and the job servers always match.

- **Prism** is built from the Go module proxy with ``go install
  github.com/apache/beam/sdks/v2/go/cmd/prism@v<beam version>`` into a cache
  directory outside the repository (:func:`prism_cache_dir`), once; Go's own
  module cache makes a rebuild cheap.  :func:`find_prism` only looks;
  :func:`ensure_prism` builds when nothing is cached.
- **Job-server jars** (Flink, Spark) are never downloaded by shardmove: a jar
  named with ``--flink_job_server_jar`` / ``--spark_job_server_jar`` must
  exist, otherwise the Maven coordinates to fetch are named in the error.
- A missing tool is a :class:`BadInput` (exit 2) whose one line says what to
  install; nothing has been modified at that point.
"""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import tempfile

from pipeline.errors import BadInput

__all__ = [
    "PRISM_PACKAGE",
    "beam_version",
    "prism_cache_dir",
    "find_prism",
    "ensure_prism",
    "require_java",
    "job_server_coordinates",
    "find_job_server_jar",
]

PRISM_PACKAGE = "github.com/apache/beam/sdks/v2/go/cmd/prism"


def beam_version() -> str:
    # deferred: Beam takes seconds to load; importing this module must not
    from apache_beam.version import __version__

    return __version__


def _cache_root() -> str:
    root = os.environ.get("SHARDMOVE_CACHE")
    if root:
        return root
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "shardmove")


def prism_cache_dir(version: str | None = None) -> str:
    """``<cache>/prism/v<version>-<os>-<arch>/``: one binary per Beam version."""
    v = version or beam_version()
    return os.path.join(_cache_root(), "prism", f"v{v}-{platform.system().lower()}-{platform.machine().lower()}")


def _is_exe(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def find_prism(version: str | None = None) -> str | None:
    """A local Prism binary for this Beam version, or None.

    Looked for, in order: ``$SHARDMOVE_PRISM``; shardmove's cache (built by
    :func:`ensure_prism`); Beam's own cache, where Beam unpacks a release
    binary it downloaded (``~/.apache_beam/cache/prism/bin``)."""
    v = version or beam_version()
    env = os.environ.get("SHARDMOVE_PRISM")
    if env:
        if not _is_exe(env):
            raise BadInput(f"SHARDMOVE_PRISM: {env} is not an executable file")
        return env
    ours = os.path.join(prism_cache_dir(v), "prism")
    if _is_exe(ours):
        return ours
    osname, arch = platform.system().lower(), platform.machine().lower()
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(arch, arch)
    beams = os.path.join(os.path.expanduser("~"), ".apache_beam", "cache", "prism", "bin",
                         f"apache_beam-v{v}-prism-{osname}-{arch}")
    if _is_exe(beams):
        return beams
    return None


def ensure_prism(version: str | None = None, log=None) -> str:
    """The Prism binary for this Beam version, built with ``go install`` if none is cached.

    The build goes to a temporary directory next to the cache and is renamed
    into place, so an interrupted build leaves nothing half-written.  A
    missing Go, or a failed build, is one :class:`BadInput` line."""
    v = version or beam_version()
    found = find_prism(v)
    if found:
        return found
    go = shutil.which("go")
    if go is None:
        raise BadInput(f"Prism v{v} is not built and Go is not installed: install Go 1.26 or newer "
                       f"(https://go.dev/doc/install) so shardmove can build it, or pass --prism_location=PATH")
    dest = prism_cache_dir(v)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".build-", dir=os.path.dirname(dest))
    if log:
        log(f"building Prism v{v} with go install (first use only; a few minutes) into {dest}")
    try:
        env = dict(os.environ, GOBIN=tmp, CGO_ENABLED="0")
        proc = subprocess.run([go, "install", f"{PRISM_PACKAGE}@v{v}"], env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise BadInput(f"Prism v{v}: go install {PRISM_PACKAGE}@v{v} failed ({last})")
        os.makedirs(dest, exist_ok=True)
        os.replace(os.path.join(tmp, "prism"), os.path.join(dest, "prism"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return os.path.join(dest, "prism")


def require_java(runner: str) -> str:
    java = shutil.which("java")
    if java is None:
        raise BadInput(f"{runner} starts Beam's job server, a Java program, and no java is on PATH: "
                       f"install Java 17 (apt-get install openjdk-17-jre-headless)")
    return java


def job_server_coordinates(runner: str, opts) -> str:
    """Maven coordinates ``G:A:V`` of the job-server jar Beam would use for ``runner``."""
    # deferred: Beam takes seconds to load; importing this module must not
    from apache_beam.options.pipeline_options import FlinkRunnerOptions

    v = beam_version()
    if runner == "FlinkRunner":
        return f"org.apache.beam:beam-runners-flink-{opts.view_as(FlinkRunnerOptions).flink_version}-job-server:{v}"
    return f"org.apache.beam:beam-runners-spark-3-job-server:{v}"


def find_job_server_jar(runner: str, opts, given: str | None) -> str:
    """The job-server jar to pass explicitly: the one given (it must exist), or
    one already in Maven's local repository or Beam's jar cache."""
    coords = job_server_coordinates(runner, opts)
    flag = "--flink_job_server_jar" if runner == "FlinkRunner" else "--spark_job_server_jar"
    if given:
        if "://" in given or os.path.isfile(given):
            return given
        raise BadInput(f"{flag}: {given} does not exist")
    g, a, v = coords.split(":")
    name = f"{a}-{v}.jar"
    for path in (os.path.join(os.path.expanduser("~"), ".m2", "repository", *g.split("."), a, v, name),
                 os.path.join(os.path.expanduser("~"), ".apache_beam", "cache", "jars", name)):
        if os.path.isfile(path):
            return path
    raise BadInput(f"{runner} needs Beam's job-server jar {coords}: fetch it (mvn dependency:copy "
                   f"-Dartifact={coords} -DoutputDirectory=DIR) and pass {flag}=DIR/{name}")


def _main(argv) -> int:  # python -m transforms.engines prism  -> build (or find) Prism, print its path
    if argv[1:] != ["prism"]:
        sys.stderr.write("usage: python -m transforms.engines prism\n")
        return 2
    try:
        print(ensure_prism(log=lambda s: sys.stderr.write(s + "\n")))
    except BadInput as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv))
