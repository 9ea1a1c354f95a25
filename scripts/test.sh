#!/usr/bin/env bash
# The whole test suite: makes sure RabbitMQ, Redis and PostgreSQL are up, then runs every unit,
# integration and property test, the fault suite, and the Node tests of the Apps Script bridge.
# Usage: scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-rabbitmq.sh
scripts/ensure-stores.sh
cargo test --all-targets "$@"
# The fault suite restarts the broker and kills processes: one scenario at a time, after the
# parallel suite. It prints a RELIABILITY line per scenario (docs/RELIABILITY.md).
cargo test --test faults -- --ignored --test-threads=1 --nocapture 2>&1 | tee target/faults.log | grep -E "^RELIABILITY|^test |test result"
test "${PIPESTATUS[0]}" -eq 0
# The Apps Script web app under Node (no npm packages needed).
if ! command -v node >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq nodejs >/dev/null
fi
node --test deploy/apps-script/test/bridge.test.js
