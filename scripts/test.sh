#!/usr/bin/env bash
# The whole test suite: makes sure RabbitMQ, Redis and PostgreSQL are up, then runs every unit,
# integration and property test, the fault suite, the cluster fault suite (three RabbitMQ nodes
# beside the one on 5672), the Node tests of the Apps Script bridge, and the CPU per command gate
# (benches/pipeline/cpu.rs).
# Every step runs even when an earlier one failed; the summary at the end names the failures,
# and the exit status is non-zero if any step failed.
# Usage: scripts/test.sh [extra cargo test args]
set -uo pipefail
cd "$(dirname "$0")/.."
# The core's tests need no broker, store or network: they run first, before anything is started.
echo "==> core (no broker, store or network)"
cargo test -p poller-core "$@" || { echo "<== core: FAILED"; exit 1; }
echo "<== core: passed"
set -e
scripts/ensure-rabbitmq.sh
scripts/ensure-stores.sh
trap 'scripts/stop-stores.sh; scripts/cluster.sh stop >/dev/null 2>&1 || true' EXIT
if ! command -v node >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  echo "node: not installed; installing Debian's nodejs"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq nodejs >/dev/null
fi
if ! command -v promtool >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  echo "promtool: not installed; installing Debian's prometheus (the /metrics lint test uses it)"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq prometheus >/dev/null
fi
if ! command -v chromedriver >/dev/null 2>&1 || ! command -v chromium >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  echo "chromium: not installed; installing Debian's chromium and chromium-driver (tests/api/console_e2e.rs drives the console in it)"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
fi
if ! target/mcp-venv/bin/python -c "import mcp" >/dev/null 2>&1; then
  echo "mcp: making target/mcp-venv with the official MCP Python SDK (tests/api/mcp_e2e.rs drives the front door with it)"
  if ! python3 -c "import ensurepip, venv" >/dev/null 2>&1; then
    # Debian's python3 makes no venv without python3-venv: install it rather than go on
    # without the SDK (both MCP tests would fail on "the MCP client is still running").
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    echo "python3-venv: not installed; installing Debian's python3-venv"
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-venv >/dev/null
  fi
  mkdir -p target
  rm -rf target/mcp-venv
  # Each on its own line: under `set -e` a failure stops here, with its error, not later.
  python3 -m venv target/mcp-venv
  target/mcp-venv/bin/pip install -q "mcp==2.3.0"
fi
if ! command -v sudo >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ]; then
  echo "sudo: not installed; installing Debian's sudo (tests/api/scripts_e2e.rs runs the scripts as a user with sudo)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq sudo >/dev/null
fi
set +e
mkdir -p target
failed=()

step() {
  local name=$1; shift
  echo "==> $name"
  if "$@"; then echo "<== $name: passed"; else echo "<== $name: FAILED"; failed+=("$name"); fi
}

# Runs the ignored scenarios under MODULE:: one at a time into target/NAME.log, shows their
# RELIABILITY and CLUSTER lines (docs/RELIABILITY.md) and, on failure, every failing scenario's
# output.
serial_suite() {
  local module=$1 log="target/$2.log"
  cargo test --test api -- --ignored --test-threads=1 --nocapture "$module::" >"$log" 2>&1
  local rc=$?
  grep -E "^RELIABILITY|^CLUSTER|^test |test result" "$log"
  if [ $rc -ne 0 ]; then
    # With --nocapture a scenario's panic is printed where it happened, not under "failures:".
    echo "---- $module failures (from $log) ----"
    # The 40 lines before hold the poller warnings a failing scenario prints.
    grep -B40 -A12 "panicked at" "$log" | cut -c1-2000
    sed -n '/^failures:$/,$p' "$log"
  fi
  return $rc
}

# The fault suite restarts the broker and kills processes: after the parallel suite.
faults() { serial_suite faults faults; }

cluster_suite() {
  # The cluster fault suite (tests/api/cluster.rs): a three-node RabbitMQ cluster beside the
  # broker on 5672 (scripts/cluster.sh), a node killed, stopped, cut off, all restarted in turn.
  if ! scripts/cluster.sh start; then
    scripts/cluster.sh stop >/dev/null 2>&1
    return 1
  fi
  serial_suite cluster cluster
  local rc=$?
  scripts/cluster.sh stop
  return $rc
}

# tests/api/runs_as_shipped.rs runs the release binary the way the image does.
step "release binary" cargo build --release --locked --bin command-poller
step "unit, integration and property tests" cargo test --workspace --all-targets "$@"
# 100,000 reads of the control state, then every lever (366 s in a CI run): on its own.
step "control state reads" cargo test --test api -- --ignored --exact \
  state_log_e2e::a_hundred_thousand_reads_append_nothing_and_every_lever_stays_fast
step "fault suite" faults
step "cluster fault suite" cluster_suite
step "Apps Script web app (Node)" node --test tests/apps-script/bridge.test.js
# CPU per command against the raw relay's CPU per message, same run (about a minute after the
# build): fails when the ratio is more than 30% above benches/cpu-baseline.toml.
step "CPU per command gate" env BENCH_ONLY=gate cargo bench --bench pipeline

if [ ${#failed[@]} -ne 0 ]; then
  echo "FAILED steps: ${failed[*]}"
  exit 1
fi
echo "all steps passed"
