#!/usr/bin/env bash
# shardmove: the two set-up commands.
#   ./run_local.sh          create .venv, install, create the demo keyspace (demo/) if absent, run the demo migration
#   ./run_local.sh test     create .venv, install with test dependencies, make sure services run, run the whole suite
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
}

ensure_services() {
  # PostgreSQL and Redis on 127.0.0.1 (this machine kind starts them; start them if they stopped).
  if command -v pg_isready >/dev/null 2>&1 && ! pg_isready -q -h 127.0.0.1 -p 5432; then
    if command -v pg_ctlcluster >/dev/null 2>&1; then
      pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
      for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
    fi
  fi
  if command -v redis-cli >/dev/null 2>&1 && ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
    if command -v redis-server >/dev/null 2>&1; then
      mkdir -p /var/lib/redis /var/log/redis 2>/dev/null || true
      redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
        --dir /var/lib/redis --logfile /var/log/redis/ci.log || true
      for _ in $(seq 1 30); do redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && break; sleep 1; done
    fi
  fi
}

ensure_chromium() {
  # tests/test_report.py renders report.html in headless Chromium (Debian package chromium)
  command -v chromium >/dev/null 2>&1 && return 0
  local SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo -n"
  if command -v apt-get >/dev/null 2>&1; then
    echo "installing chromium for the report rendering test ..." >&2
    { $SUDO apt-get update && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y chromium; } >.venv/apt-chromium.log 2>&1 \
      || echo "warning: chromium not installed (see .venv/apt-chromium.log); the rendering test skips, or fails with CI=true" >&2
  fi
}

cmd=${1:-demo}
case "$cmd" in
  test)
    shift || true
    ensure_venv test
    ensure_services
    ensure_chromium
    exec .venv/bin/python -m pytest -q "$@"
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
      "$SM" plan --config demo/shardmove.yaml --dry-run
      "$SM" plan --config demo/shardmove.yaml | tee demo/.plan.out
      PLAN_ID=$(sed -n 's/^plan id: //p' demo/.plan.out | head -n1)
      echo "$PLAN_ID" > demo/PLAN
    fi
    "$SM" run "$PLAN_ID" --config demo/shardmove.yaml
    ;;
  *)
    echo "usage: ./run_local.sh [test|reset]" >&2
    exit 2
    ;;
esac
