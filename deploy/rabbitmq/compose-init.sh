#!/bin/sh
# docker-compose only: start RabbitMQ (which loads definitions.json), then give the users from
# the definitions their passwords from the environment. The definitions ship no passwords.
set -eu
rabbitmq-server &
server=$!
rabbitmqctl --timeout 120 await_startup
for pair in "command-poller:${POLLER_PASSWORD}" "ops-admin:${OPS_PASSWORD}" "ops-oncall:${OPS_ONCALL_PASSWORD:-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')}" "audit-sink:${AUDIT_PASSWORD}" "agent-marketing:${AGENT_PASSWORD}" "approver:${APPROVER_PASSWORD}" "keda:${KEDA_PASSWORD:-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')}"; do
  rabbitmqctl change_password "${pair%%:*}" "${pair#*:}" >/dev/null
done
echo "compose-init: passwords set"
wait "$server"
