#!/usr/bin/env bash
# One command from a fresh Debian machine with Rust: makes sure RabbitMQ is up, builds the
# poller, runs it on the embedded defaults (bridge simulator, rule judges), sends the runbook's
# three example commands as an agent would, prints their results, and stops the poller.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-rabbitmq.sh
echo "quickstart: building the poller (the first build takes a few minutes)"
cargo build --quiet
BIN=target/debug/command-poller
LOG=target/quickstart-poller.log
PORT=${QUICKSTART_HEALTH_PORT:-9464}

# A fresh idempotency store each run, so the examples run again rather than replay.
STORE=target/quickstart-results.redb
rm -f "$STORE"
# APP_ENVIRONMENT=local: one poller on an embedded store (production refuses it) and guest as
# operator (config/local.toml).
APP_ENVIRONMENT=local POLLER__IDEMPOTENCY__PATH="$STORE" POLLER__HEALTH__LISTEN="127.0.0.1:${PORT}" "$BIN" run >"$LOG" 2>&1 &
POLLER_PID=$!
trap 'kill -TERM $POLLER_PID 2>/dev/null || true; wait $POLLER_PID 2>/dev/null || true' EXIT

for _ in $(seq 1 100); do
  if curl -fsS "http://127.0.0.1:${PORT}/readyz" >/dev/null 2>&1; then break; fi
  if ! kill -0 $POLLER_PID 2>/dev/null; then cat "$LOG"; echo "poller exited" >&2; exit 1; fi
  sleep 0.2
done

for f in examples/commands/sop-int-01-check-status.json \
         examples/commands/sop-int-02-refresh-token.json \
         examples/commands/sop-int-03-connect-integration.json; do
  echo "==> $f"
  "$BIN" send "$f" --wait
done
echo "(poller log: $LOG)"
