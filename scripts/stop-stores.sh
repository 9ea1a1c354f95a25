#!/usr/bin/env bash
# Stops the private Redis and PostgreSQL that scripts/ensure-stores.sh started (on the ports it
# used: TEST_REDIS_PORT, TEST_REDIS_TLS_PORT and TEST_POSTGRES_PORT, 6390, 6391 and 5440 unless set).
set -uo pipefail
cd "$(dirname "$0")/.."
REDIS_PORT=${TEST_REDIS_PORT:-6390}
REDIS_TLS_PORT=${TEST_REDIS_TLS_PORT:-6391}
PG_PORT=${TEST_POSTGRES_PORT:-5440}
open_port() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
if open_port "$REDIS_PORT"; then
  redis-cli -h 127.0.0.1 -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
fi
if open_port "$REDIS_TLS_PORT" && [ -f "target/test-stores/redis-$REDIS_TLS_PORT.pid" ]; then
  kill "$(cat "target/test-stores/redis-$REDIS_TLS_PORT.pid")" 2>/dev/null || true
fi
if open_port "$PG_PORT"; then
  pgdir=$(psql -At "postgres://postgres@127.0.0.1:$PG_PORT/postgres" -c 'show data_directory' 2>/dev/null)
  bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
  if [ -n "$pgdir" ] && [ -n "$bin" ]; then
    as=(); [ "$(id -u)" -eq 0 ] && as=(runuser -u postgres --)
    (cd / && "${as[@]}" "$bin/pg_ctl" -D "$pgdir" -m fast -w stop >/dev/null 2>&1) || true
  fi
fi
echo "stores: private instances stopped"
