#!/usr/bin/env bash
# The whole test suite: makes sure RabbitMQ is up, then runs every unit, integration and
# Node test. Usage: scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-rabbitmq.sh
cargo test --all-targets "$@"
# The Apps Script web app under Node (no npm packages needed).
if ! command -v node >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq nodejs >/dev/null
fi
node --test deploy/apps-script/test/bridge.test.js
