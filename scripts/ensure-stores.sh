#!/usr/bin/env bash
# Private Redis (127.0.0.1:6390, and with TLS on 127.0.0.1:6391) and PostgreSQL (127.0.0.1:5440,
# user postgres, database test, TLS offered) for the shared idempotency store tests. The TLS
# certificates come from a test CA made here (target/test-stores/tls/ca.pem, the server's
# certificate for 127.0.0.1 and localhost): instances of their own, with their data in
# target/test-stores/, on their own ports (TEST_REDIS_PORT, TEST_REDIS_TLS_PORT and TEST_POSTGRES_PORT choose others). The machine's own Redis and PostgreSQL (if any) are
# neither used nor reconfigured (as root, PostgreSQL's data lives in
# /var/tmp/command-poller-test-stores, where its own user can reach it). Installs Debian's
# redis-server and postgresql packages when the binaries are missing. Idempotent;
# scripts/stop-stores.sh stops them.
set -euo pipefail
cd "$(dirname "$0")/.."
# Root runs everything itself; anyone else needs sudo, and only to install packages.
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
REDIS_PORT=${TEST_REDIS_PORT:-6390}
REDIS_TLS_PORT=${TEST_REDIS_TLS_PORT:-6391}
PG_PORT=${TEST_POSTGRES_PORT:-5440}
DIR="$(pwd)/target/test-stores"
open_port() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
installed_apt=0
apt_install() {
  echo "stores: installing Debian's $* (this takes a minute)"
  if [ "$installed_apt" -eq 0 ]; then $SUDO apt-get update -qq; installed_apt=1; fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null
}
mkdir -p "$DIR"

# A test CA and a server certificate for 127.0.0.1 and localhost (kept while valid). As root they
# live beside the PostgreSQL cluster, one per machine, since the private servers are too (another
# checkout's run may have started them); the CA is copied into this checkout for the tests.
TLS_HOME="$DIR/tls"
[ "$(id -u)" -eq 0 ] && TLS_HOME=/var/tmp/command-poller-test-stores/tls
TLS="$DIR/tls"
if [ ! -f "$TLS_HOME/server.pem" ] || ! openssl x509 -checkend 86400 -noout -in "$TLS_HOME/server.pem" >/dev/null 2>&1; then
  command -v openssl >/dev/null 2>&1 || apt_install openssl
  mkdir -p "$TLS_HOME"
  openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=command-poller test CA" \
    -keyout "$TLS_HOME/ca.key" -out "$TLS_HOME/ca.pem" >/dev/null 2>&1
  openssl req -newkey rsa:2048 -nodes -subj "/CN=127.0.0.1" \
    -keyout "$TLS_HOME/server.key" -out "$TLS_HOME/server.csr" >/dev/null 2>&1
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' >"$TLS_HOME/ext.cnf"
  openssl x509 -req -in "$TLS_HOME/server.csr" -CA "$TLS_HOME/ca.pem" -CAkey "$TLS_HOME/ca.key" -CAcreateserial \
    -days 30 -extfile "$TLS_HOME/ext.cnf" -out "$TLS_HOME/server.pem" >/dev/null 2>&1
  echo "stores: made a test CA and a server certificate in $TLS_HOME"
fi
mkdir -p "$TLS"
[ "$TLS_HOME" = "$TLS" ] || cp "$TLS_HOME/ca.pem" "$TLS/ca.pem"
# Whether the server on port $1 presents a certificate of this CA (`$2`: openssl's -starttls).
tls_trusted() {
  openssl s_client -connect "127.0.0.1:$1" ${2:+-starttls "$2"} -CAfile "$TLS_HOME/ca.pem" \
    -verify_return_error </dev/null >/dev/null 2>&1
}
# A TLS server left by an earlier CA (one that expired and was remade) is restarted.
if open_port "$REDIS_TLS_PORT" && ! tls_trusted "$REDIS_TLS_PORT"; then
  echo "stores: the Redis on $REDIS_TLS_PORT presents another certificate: restarting it"
  redis-cli -p "$REDIS_TLS_PORT" --tls --insecure shutdown nosave >/dev/null 2>&1 || true
  for _ in $(seq 1 50); do open_port "$REDIS_TLS_PORT" || break; sleep 0.1; done
fi

if ! open_port "$REDIS_PORT"; then
  command -v redis-server >/dev/null 2>&1 || apt_install redis-server
  echo "stores: starting a private Redis on 127.0.0.1:$REDIS_PORT"
  redis-server --daemonize yes --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no \
    --dir "$DIR" --pidfile "$DIR/redis-$REDIS_PORT.pid" --logfile "$DIR/redis-$REDIS_PORT.log"
fi
for _ in $(seq 1 50); do open_port "$REDIS_PORT" && break; sleep 0.2; done
open_port "$REDIS_PORT" || { echo "redis: not reachable on 127.0.0.1:$REDIS_PORT" >&2; exit 1; }
echo "redis: running (private, 127.0.0.1:$REDIS_PORT)"
if ! open_port "$REDIS_TLS_PORT"; then
  echo "stores: starting a private Redis with TLS only on 127.0.0.1:$REDIS_TLS_PORT"
  redis-server --daemonize yes --bind 127.0.0.1 --port 0 --tls-port "$REDIS_TLS_PORT" \
    --tls-cert-file "$TLS_HOME/server.pem" --tls-key-file "$TLS_HOME/server.key" \
    --tls-ca-cert-file "$TLS_HOME/ca.pem" --tls-auth-clients no --save "" --appendonly no \
    --dir "$DIR" --pidfile "$DIR/redis-$REDIS_TLS_PORT.pid" --logfile "$DIR/redis-$REDIS_TLS_PORT.log"
fi
for _ in $(seq 1 50); do open_port "$REDIS_TLS_PORT" && break; sleep 0.2; done
open_port "$REDIS_TLS_PORT" || { echo "redis: TLS not reachable on 127.0.0.1:$REDIS_TLS_PORT" >&2; exit 1; }
echo "redis: running with TLS (private, 127.0.0.1:$REDIS_TLS_PORT)"

# A cluster started before this script offered TLS, or with another CA's certificate, is
# restarted.
if open_port "$PG_PORT" && ! tls_trusted "$PG_PORT" postgres; then
  echo "stores: restarting the private PostgreSQL to offer TLS with this CA's certificate"
  TEST_REDIS_PORT=1 TEST_REDIS_TLS_PORT=1 scripts/stop-stores.sh >/dev/null 2>&1 || true
fi
if ! open_port "$PG_PORT"; then
  if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then apt_install postgresql; fi
  bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
  pgdir="$DIR/postgres-$PG_PORT"
  # PostgreSQL refuses to run as root: the cluster then belongs to the postgres user, in a
  # directory it can reach whatever the checkout's path (commands run from /, for the same reason).
  as=()
  if [ "$(id -u)" -eq 0 ]; then
    as=(runuser -u postgres --)
    pgdir=/var/tmp/command-poller-test-stores/postgres-$PG_PORT
    mkdir -p /var/tmp/command-poller-test-stores
    chmod 755 /var/tmp/command-poller-test-stores
  fi
  if [ ! -f "$pgdir/PG_VERSION" ]; then
    echo "stores: creating a private PostgreSQL cluster in $pgdir"
    mkdir -p "$pgdir"
    if [ "$(id -u)" -eq 0 ]; then chown postgres:postgres "$pgdir"; chmod 700 "$pgdir"; fi
    # trust is for this private cluster only: it listens on loopback, on its own port.
    (cd / && "${as[@]}" "$bin/initdb" -D "$pgdir" -U postgres --auth=trust >/dev/null)
  fi
  # The server's key must belong to the server's user, readable by it alone.
  cp "$TLS_HOME/server.pem" "$pgdir/tls-server.pem"
  cp "$TLS_HOME/server.key" "$pgdir/tls-server.key"
  chmod 600 "$pgdir/tls-server.key"
  if [ "$(id -u)" -eq 0 ]; then chown postgres:postgres "$pgdir/tls-server.pem" "$pgdir/tls-server.key"; fi
  echo "stores: starting the private PostgreSQL on 127.0.0.1:$PG_PORT"
  (cd / && "${as[@]}" "$bin/pg_ctl" -D "$pgdir" -l "$pgdir/server.log" -w \
    -o "-p $PG_PORT -c listen_addresses=127.0.0.1 -k $pgdir -c ssl=on -c ssl_cert_file=$pgdir/tls-server.pem -c ssl_key_file=$pgdir/tls-server.key" start >/dev/null)
fi
for _ in $(seq 1 50); do open_port "$PG_PORT" && break; sleep 0.2; done
open_port "$PG_PORT" || { echo "postgres: not reachable on 127.0.0.1:$PG_PORT" >&2; exit 1; }
if ! psql "postgres://postgres@127.0.0.1:$PG_PORT/test" -c 'select 1' >/dev/null 2>&1; then
  psql "postgres://postgres@127.0.0.1:$PG_PORT/postgres" -c 'create database test' >/dev/null
fi
echo "postgres: running (private, 127.0.0.1:$PG_PORT)"
tls_trusted "$REDIS_TLS_PORT" || { echo "redis: the TLS port does not present the test CA's certificate" >&2; exit 1; }
tls_trusted "$PG_PORT" postgres || { echo "postgres: TLS does not present the test CA's certificate" >&2; exit 1; }
