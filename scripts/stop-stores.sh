#!/usr/bin/env bash
# Stops the private Redis and PostgreSQL that scripts/ensure-stores.sh started.
set -uo pipefail
open_port() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
if open_port 6390; then
  redis-cli -h 127.0.0.1 -p 6390 shutdown nosave >/dev/null 2>&1 || true
fi
if open_port 5440; then
  pgdir=$(psql -At "postgres://postgres@127.0.0.1:5440/postgres" -c 'show data_directory' 2>/dev/null)
  bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
  if [ -n "$pgdir" ] && [ -n "$bin" ]; then
    as=(); [ "$(id -u)" -eq 0 ] && as=(runuser -u postgres --)
    (cd / && "${as[@]}" "$bin/pg_ctl" -D "$pgdir" -m fast -w stop >/dev/null 2>&1) || true
  fi
fi
echo "stores: private instances stopped"
