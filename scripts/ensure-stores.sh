#!/usr/bin/env bash
# Makes sure Redis (127.0.0.1:6379) and PostgreSQL (127.0.0.1:5432, user postgres without a
# password, database "test") answer, for the shared idempotency store tests: starts the installed
# servers, or installs Debian's packages where they are missing. Idempotent.
set -euo pipefail
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
open_port() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
installed_apt=0
apt_install() {
  if [ "$installed_apt" -eq 0 ]; then $SUDO apt-get update -qq; installed_apt=1; fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null
}

if ! open_port 6379; then
  command -v redis-server >/dev/null 2>&1 || apt_install redis-server
  $SUDO mkdir -p /var/lib/redis /var/log/redis
  $SUDO redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
fi
for _ in $(seq 1 50); do open_port 6379 && break; sleep 0.2; done
open_port 6379 || { echo "redis: not reachable on 127.0.0.1:6379" >&2; exit 1; }
echo "redis: running"

if ! open_port 5432; then
  command -v pg_ctlcluster >/dev/null 2>&1 || apt_install postgresql
  ver=$(ls /etc/postgresql | sort -n | tail -1)
  hba="/etc/postgresql/$ver/main/pg_hba.conf"
  # Loopback connections without a password, as the tests expect.
  if ! grep -q "command-poller tests" "$hba"; then
    $SUDO sed -i '1i host all all 127.0.0.1/32 trust # command-poller tests' "$hba"
  fi
  $SUDO pg_ctlcluster --skip-systemctl-redirect "$ver" main start || true
fi
for _ in $(seq 1 50); do open_port 5432 && break; sleep 0.2; done
open_port 5432 || { echo "postgres: not reachable on 127.0.0.1:5432" >&2; exit 1; }
if ! psql "postgres://postgres@127.0.0.1:5432/test" -c 'select 1' >/dev/null 2>&1; then
  psql "postgres://postgres@127.0.0.1:5432/postgres" -c 'create database test' >/dev/null
fi
echo "postgres: running"
