#!/usr/bin/env bash
# Makes sure a RabbitMQ broker answers on 127.0.0.1:5672 with guest/guest: starts the installed
# broker, or installs Debian's rabbitmq-server where it is missing. Idempotent.
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

port_open() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }

if port_open && $SUDO rabbitmqctl -q await_startup >/dev/null 2>&1; then
  echo "rabbitmq: running"
  exit 0
fi

if ! command -v rabbitmq-server >/dev/null 2>&1; then
  echo "rabbitmq: not installed; installing Debian's rabbitmq-server"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq rabbitmq-server >/dev/null
  # A broker this script installed is configured like the shipped one: messages over 1 MiB
  # are refused at the publisher (deploy/rabbitmq/rabbitmq.conf). A broker that was already
  # there is left as its owner configured it.
  $SUDO mkdir -p /etc/rabbitmq/conf.d
  echo "max_message_size = 1048576" | $SUDO tee /etc/rabbitmq/conf.d/20-command-poller.conf >/dev/null
  $SUDO rabbitmqctl -q stop >/dev/null 2>&1 || true
fi

if ! port_open; then
  echo "rabbitmq: starting"
  # The Debian package may start it through its service; otherwise start it detached.
  $SUDO rabbitmq-server -detached >/dev/null 2>&1 || true
fi

for _ in $(seq 1 60); do
  if port_open && $SUDO rabbitmqctl -q await_startup >/dev/null 2>&1; then
    echo "rabbitmq: running"
    exit 0
  fi
  sleep 1
done
echo "rabbitmq: did not come up on 127.0.0.1:5672 within 60 s" >&2
exit 1
