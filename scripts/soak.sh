#!/usr/bin/env bash
# The chaos soak (tests/api/soak.rs): three replicas on the three-node cluster
# (scripts/cluster.sh) and a Redis of their own, a steady load with bursts, and at random one
# after another: pause, halt or quarantine and their lifts, a replica SIGKILLed, a node stopped or
# cut off, the Redis restarted, the bridge or the LLM judge slow, failing or answering HTML, the
# policy reloaded; three agents, an approver approving, denying or leaving parked commands to
# expire, the audit sink chaining every record. At the end every
# command is checked (a final result, at most one execution, none under a lever); it prints a
# table (SOAK and RELIABILITY lines) and exits non-zero on any violation.
#
# Usage: scripts/soak.sh [--minutes N] [--seed S] [--skip EVENTS]
#   (default 3 minutes, a new seed; EVENTS comma-separated from: kill, stop-node, partition,
#   redis, bridge, pause, halt, quarantine, judge, reload; a skipped event is a quiet spell)
# The whole output is kept in target/soak.log; after a failure, the cluster's node logs in
# target/soak-cluster-logs/ (when this script started the cluster).

set -uo pipefail
cd "$(dirname "$0")/.."
minutes=3
seed=""
skip=""
while [ $# -gt 0 ]; do
  case "$1" in
    --minutes) minutes=$2; shift 2 ;;
    --seed) seed=$2; shift 2 ;;
    --skip) skip=$2; shift 2 ;;
    *) sed -n '2,16p' "$0"; exit 2 ;;
  esac
done
case "$minutes" in ''|*[!0-9.]*) echo "soak: --minutes takes a number, not '$minutes'" >&2; exit 2 ;; esac
command -v redis-server >/dev/null 2>&1 || scripts/ensure-stores.sh >/dev/null
# The cluster is stopped at the end only if this script started it.
started=""
if ! scripts/cluster.sh status >/dev/null 2>&1; then
  scripts/cluster.sh start || exit 1
  started=1
fi
mkdir -p target
env SOAK_MINUTES="$minutes" ${seed:+SOAK_SEED="$seed"} ${skip:+SOAK_SKIP="$skip"} \
  cargo test --test api -- --ignored --exact --nocapture soak::chaos_soak >target/soak.log 2>&1
rc=$?
grep -E "^SOAK|^RELIABILITY|^test result" target/soak.log
if [ $rc -ne 0 ]; then
  echo "---- soak failure (from target/soak.log) ----"
  grep -B40 -A12 "panicked at" target/soak.log | cut -c1-2000
fi
if [ -n "$started" ]; then
  if [ $rc -ne 0 ]; then rm -rf target/soak-cluster-logs; CLUSTER_LOGS_TO=$PWD/target/soak-cluster-logs scripts/cluster.sh stop
  else scripts/cluster.sh stop >/dev/null; fi
fi
exit $rc
