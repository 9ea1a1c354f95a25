#!/usr/bin/env bash
# The whole test suite: makes sure RabbitMQ is up, then runs every unit, integration and
# Node test. Usage: scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-rabbitmq.sh
cargo test --all-targets "$@"
if [ -d deploy/apps-script/test ]; then
  node --test deploy/apps-script/test/
fi
