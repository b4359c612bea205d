#!/usr/bin/env bash
# shardmove: the two set-up commands.
#   ./run_local.sh          create .venv, install, create the demo keyspace (demo/) if absent, run the demo migration
#   ./run_local.sh test     create .venv, install with test dependencies and the Debian packages the tests
#                           need (PostgreSQL, Redis, Chromium), run the whole suite (it starts its own servers)
#   ./run_local.sh prism    build (once) and print the Prism binary for the pinned Beam version
#   ./run_local.sh reset    delete demo/ (the next ./run_local.sh starts afresh)
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(pwd)
PY=${PYTHON:-python3}

ensure_venv() {
  local extra=$1
  if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
  fi
  local stamp=".venv/.installed-$(cat pyproject.toml | sha256sum | cut -c1-16)-${extra:-base}"
  if [ ! -f "$stamp" ]; then
    echo "installing shardmove into .venv (first time: about a minute) ..." >&2
    local log=.venv/install.log
    local target="."
    [ -n "$extra" ] && target=".[$extra]"
    if ! { .venv/bin/python -m pip install --disable-pip-version-check --upgrade pip \
           && .venv/bin/python -m pip install --disable-pip-version-check -e "$target"; } >"$log" 2>&1; then
      tail -n 30 "$log" >&2
      echo "error: installation failed (full log: $log)" >&2
      exit 1
    fi
    touch "$stamp"
  fi
  # Byte-code for our own modules (only what changed since the last call): where the environment
  # sets PYTHONDONTWRITEBYTECODE (this machine kind does), every shardmove process and SDK worker
  # otherwise compiles them again at import, about 0.2 s each
  .venv/bin/python -m compileall -q -j 0 pipeline transforms shardmove >/dev/null 2>&1 || true
}

ensure_packages() {
  # What the suite needs from Debian's packages, installed once (as root, or with password-less sudo):
  #   postgresql    server binaries: tests/servers.py starts a throw-away cluster on a free port
  #   redis-server  Redis >= 7.0 (the Redis store's Lua scripts use #!lua flags): started the same way
  #   chromium      tests/test_report.py renders report.html headless
  # The servers are started and stopped by the test session itself, not here; servers already
  # running (or named by SHARDMOVE_TEST_PG / SHARDMOVE_TEST_REDIS) are used as they are.
  local missing=()
  [ -n "${SHARDMOVE_TEST_PG:-}" ] || ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 \
    || command -v postgres >/dev/null 2>&1 || missing+=(postgresql)
  [ -n "${SHARDMOVE_TEST_REDIS:-}" ] || command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
  command -v chromium >/dev/null 2>&1 || missing+=(chromium)
  [ ${#missing[@]} -eq 0 ] && return 0
  local SUDO=""
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
      echo "warning: the tests need Debian packages ${missing[*]}; install them (apt-get install ${missing[*]}) or set SHARDMOVE_TEST_PG / SHARDMOVE_TEST_REDIS" >&2
      return 0
    fi
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "warning: no apt-get: install ${missing[*]} yourself, or set SHARDMOVE_TEST_PG / SHARDMOVE_TEST_REDIS" >&2
    return 0
  fi
  echo "installing ${missing[*]} from Debian's packages for the tests (first time: a minute or two) ..." >&2
  local log=.venv/apt.log
  # policy-rc.d 101: the packages' own services are not started (the test session starts its own)
  local rc_policy=/usr/sbin/policy-rc.d created_policy=""
  if [ ! -e "$rc_policy" ] && [ -z "$SUDO" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$rc_policy" && chmod +x "$rc_policy" && created_policy=1
  fi
  if ! { $SUDO apt-get update && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y "${missing[@]}"; } >"$log" 2>&1; then
    tail -n 15 "$log" >&2
    echo "warning: could not install ${missing[*]} (full log: $log); their tests skip, or fail with CI=true" >&2
  fi
  [ -n "$created_policy" ] && rm -f "$rc_policy"
  return 0
}

ensure_prism() {
  # Prism (Beam's Go runner) for the pinned Beam version: built once with `go install` from the Go
  # module proxy into ~/.cache/shardmove/prism/ (never into the repository); the runner tests use it.
  # Go's official tarball installs to /usr/local/go, often not on a non-login shell's PATH
  [ -x /usr/local/go/bin/go ] && ! command -v go >/dev/null 2>&1 && export PATH="$PATH:/usr/local/go/bin"
  if ! .venv/bin/python -m transforms.engines prism >/dev/null; then
    if [ "${CI:-}" = "true" ]; then
      echo "error: CI=true: Prism could not be built, and its tests must run" >&2
      exit 1
    fi
    echo "warning: no Prism binary; the Prism tests skip" >&2
  fi
}

cmd=${1:-demo}
case "$cmd" in
  test)
    shift || true
    ensure_venv test
    ensure_packages
    ensure_prism
    echo "set-up: ${SECONDS}s (venv, packages, Prism); the suite starts its servers itself" >&2
    # two pytest worker processes (pytest-xdist), one test file each at a time: the suite's
    # tests mostly wait on subprocesses and servers; SHARDMOVE_TEST_WORKERS=0 runs it in one process
    exec .venv/bin/python -m pytest -q -n "${SHARDMOVE_TEST_WORKERS:-2}" --dist loadfile "$@"
    ;;
  prism)
    ensure_venv ""
    .venv/bin/python -m transforms.engines prism
    ;;
  reset)
    rm -rf demo
    echo "demo/ removed"
    ;;
  demo|"")
    ensure_venv ""
    SM=.venv/bin/shardmove
    if [ ! -f demo/shardmove.yaml ]; then
      "$SM" demo demo --keys "${DEMO_KEYS:-20000}" --shards 4
    fi
    if [ -f demo/PLAN ]; then
      PLAN_ID=$(cat demo/PLAN)
    else
      # the plan block once; its `plan id:` line is the run's (printed next), not repeated here
      "$SM" plan --config demo/shardmove.yaml --name demo > demo/.plan.out
      grep -v '^plan id: ' demo/.plan.out || true
      PLAN_ID=$(sed -n 's/^plan id: //p' demo/.plan.out | head -n1)
      echo "$PLAN_ID" > demo/PLAN
    fi
    echo "look at it (from another terminal while it runs, or afterwards):"
    echo "  $SM status ${PLAN_ID:0:12} --config demo/shardmove.yaml"
    echo "  $SM report ${PLAN_ID:0:12} --config demo/shardmove.yaml"
    echo "  $SM verify ${PLAN_ID:0:12} --config demo/shardmove.yaml"
    # exec: the executor takes this process's place, so SIGINT/SIGTERM to the script (or its
    # process group) reach the executor alone, which stops gracefully (exit 130, lease released)
    exec "$SM" run "$PLAN_ID" --config demo/shardmove.yaml
    ;;
  *)
    echo "usage: ./run_local.sh [test|prism|reset]" >&2
    exit 2
    ;;
esac
