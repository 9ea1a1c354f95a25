#!/usr/bin/env bash
# A three-node RabbitMQ cluster on this machine, for the cluster fault suite
# (tests/api/cluster.rs). It leaves the broker on 127.0.0.1:5672 (rabbit@localhost) alone.
#
#   node  name                AMQP             distribution     distribution connects from
#   1     rabbitc1@localhost  127.0.0.1:5681   0.0.0.0:25681    127.0.0.11
#   2     rabbitc2@localhost  127.0.0.1:5682   0.0.0.0:25682    127.0.0.12
#   3     rabbitc3@localhost  127.0.0.1:5683   0.0.0.0:25683    127.0.0.13
#
# Each node runs as the rabbitmq user with its own data directory under $CLUSTER_DIR (default
# /tmp/command-poller-cluster), deploy/rabbitmq/cluster.conf's settings (pause_minority: a node
# cut off from the other two pauses and closes its clients' connections) and a 10 s net_ticktime (a
# partition is noticed within about 10 s). Each node's distribution connects from its own
# loopback address, so `partition N` can cut node N off from the other two with nftables while
# clients and rabbitmqctl still reach every node.
#
# Usage:
#   scripts/cluster.sh start            start the three nodes and cluster them (idempotent)
#   scripts/cluster.sh stop             stop them and remove their data (CLUSTER_LOGS_TO=DIR
#                                       keeps their logs there first)
#   scripts/cluster.sh status           cluster_status from node 1
#   scripts/cluster.sh kill N           SIGKILL node N's Erlang VM
#   scripts/cluster.sh stop-node N      stop node N (rabbitmqctl stop)
#   scripts/cluster.sh start-node N     start node N again (it rejoins the cluster; waits for 3)
#   scripts/cluster.sh safe-to-stop N   wait (60 s at most) until stopping N leaves every quorum
#                                       queue a majority (rabbitmq-queues' own check)
#   scripts/cluster.sh partition N      cut node N off from the other two
#   scripts/cluster.sh heal             remove every cut
#   scripts/cluster.sh leader QUEUE     the node leading quorum queue QUEUE (1, 2 or 3)
#   scripts/cluster.sh leaders PART     every queue and stream whose name holds PART, with the
#                                       node leading it: "name=N ..."
#   scripts/cluster.sh pid N            node N's Erlang VM pid
#   scripts/cluster.sh solo-start       a lone node beside them, rabbitc9@localhost on
#                                       127.0.0.1:5689 (data under $SOLO_DIR, default
#                                       /tmp/command-poller-solo): the broker the fault suite
#                                       restarts when scripts/test.sh runs it beside the others
#   scripts/cluster.sh solo-stop        stop the lone node and remove its data
set -euo pipefail
# Starting nodes as the rabbitmq user and cutting them off with nftables takes root.
if [ "$(id -u)" -ne 0 ]; then exec sudo "$0" "$@"; fi

HERE=$(cd "$(dirname "$0")" && pwd)
DIR=${CLUSTER_DIR:-/tmp/command-poller-cluster}
NODES=(1 2 3)
# The lone node: not one of NODES, so nothing clusters, partitions or stops it but solo-*.
SOLO=9
SOLO_DIR=${SOLO_DIR:-/tmp/command-poller-solo}
TABLE=command_poller_cluster

name() { echo "rabbitc$1@localhost"; }
amqp_port() { echo $((5680 + $1)); }
dist_port() { echo $((25680 + $1)); }
ip_of() { echo "127.0.0.$((10 + $1))"; }
# Every call has a deadline: a node stuck mid-boot or paused can leave rabbitmqctl waiting
# forever (it once held a CI run past its limit).
ctl() { local n=$1; shift; timeout "${CTL_TIMEOUT:-150}" rabbitmqctl -q -n "$(name "$n")" "$@"; }

need() {
  if ! command -v rabbitmq-server >/dev/null 2>&1; then
    scripts/ensure-rabbitmq.sh >/dev/null
  fi
  if ! command -v nft >/dev/null 2>&1; then
    echo "cluster: installing Debian's nftables (partitions)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nftables >/dev/null
  fi
}

write_config() {
  local n=$1 b="$DIR/n$1"
  mkdir -p "$b"
  cat >"$b/rabbitmq.conf" <<EOF
listeners.tcp.local = 127.0.0.1:$(amqp_port "$n")
max_message_size = 1048576
# A test cluster on one small machine: don't refuse publishers for low disk.
disk_free_limit.absolute = 50MB
EOF
  # The shipped cluster settings (pause_minority, balanced leaders), less the production
  # node names: these nodes are clustered by hand.
  grep -vE '^[[:space:]]*(#|$)|cluster_formation' "$HERE/../deploy/rabbitmq/cluster.conf" >>"$b/rabbitmq.conf"
  cat >"$b/advanced.config" <<EOF
[
  {kernel, [
    {net_ticktime, 10},
    {inet_dist_listen_min, $(dist_port "$n")},
    {inet_dist_listen_max, $(dist_port "$n")},
    {inet_dist_connect_options, [{ip, {127,0,0,$((10 + n))}}]}
  ]}
].
EOF
}

running() { timeout 30 rabbitmq-diagnostics -q -n "$(name "$1")" check_running >/dev/null 2>&1; }

# A node whose VM answers but whose broker isn't running: one that paused itself in a minority
# and, back among the others, may not finish booting again (RabbitMQ 3.10 was seen stuck on
# mnesia's inconsistent_database here, 3 times so far). Give it 30 s (a
# healthy rejoin takes about 10), then rebuild it: restarting its app never brought one back
# (it waited out its 120 s in each case), so that step is gone.
revive() {
  local n=$1
  for _ in $(seq 1 30); do running "$n" && return 0; sleep 1; done
  # Its database won't come back: make it a new node, forgotten by the others, that joins again.
  echo "cluster: node $n is up but not running after 30 s; rebuilding it from scratch" >&2
  kill_node "$n" || true
  for _ in $(seq 1 30); do ctl "$n" ping >/dev/null 2>&1 || break; sleep 1; done
  local m
  m=$(peer_of "$n")
  ctl "$m" forget_cluster_node "$(name "$n")" >/dev/null 2>&1 || true
  rm -rf "$DIR/n$n/mnesia" "$DIR/n$n/pid"
  return 1
}

# A running node other than $1, to join or to ask.
peer_of() {
  local m
  for m in "${NODES[@]}"; do
    if [ "$m" != "$1" ] && running "$m"; then echo "$m"; return 0; fi
  done
  echo 1
}

start_node() {
  local n=$1 b="$DIR/n$1"
  if running "$n"; then return 0; fi
  if ctl "$n" ping >/dev/null 2>&1 && revive "$n"; then return 0; fi
  write_config "$n"
  chown -R rabbitmq:rabbitmq "$DIR"
  su rabbitmq -s /bin/sh -c "cd /var/lib/rabbitmq; env RABBITMQ_NODENAME=$(name "$n") \
    RABBITMQ_NODE_PORT=$(amqp_port "$n") RABBITMQ_DIST_PORT=$(dist_port "$n") \
    RABBITMQ_MNESIA_BASE=$b/mnesia RABBITMQ_LOG_BASE=$b/log RABBITMQ_PID_FILE=$b/pid \
    RABBITMQ_CONFIG_FILE=$b/rabbitmq RABBITMQ_ADVANCED_CONFIG_FILE=$b/advanced.config \
    RABBITMQ_ENABLED_PLUGINS_FILE=$b/enabled_plugins \
    /usr/lib/rabbitmq/bin/rabbitmq-server -detached" >/dev/null 2>&1
  # -detached returns before the VM registers with epmd, and await_startup gives up at once on
  # a node that isn't there yet.
  for _ in $(seq 1 90); do
    if ctl "$n" ping >/dev/null 2>&1; then
      ctl "$n" await_startup --timeout 90 >/dev/null
      return 0
    fi
    sleep 1
  done
  echo "cluster: node $n did not start within 90 s (see $b/log)" >&2
  return 1
}

in_cluster() { ctl 1 cluster_status --formatter json 2>/dev/null | grep -q "\"$(name "$1")\""; }

# A node rebuilt from empty data (see revive) may not rejoin on the first pass: the others can
# still count it as a member for a moment. So the whole start runs twice if it must; a pass is
# judged by its last step, all three nodes online.
start() {
  need
  if ! start_pass; then
    echo "cluster: not all three nodes online; starting again" >&2
    start_pass
  fi
  echo "cluster: 3 nodes running on 127.0.0.1:$(amqp_port 1),$(amqp_port 2),$(amqp_port 3)"
}

start_pass() {
  mkdir -p "$DIR"
  for n in "${NODES[@]}"; do start_node "$n"; done
  for n in "${NODES[@]}"; do
    local m
    m=$(peer_of "$n")
    if ! ctl "$m" cluster_status --formatter json | python3 -c "import json,sys; sys.exit(0 if '$(name "$n")' in json.load(sys.stdin)['running_nodes'] else 1)"; then
      ctl "$n" stop_app >/dev/null
      ctl "$n" reset >/dev/null
      ctl "$n" join_cluster "$(name "$m")" >/dev/null 2>&1
      ctl "$n" start_app >/dev/null
    fi
  done
  ctl "$(peer_of 0)" await_online_nodes 3 --timeout 60 >/dev/null
}

stop() {
  heal 2>/dev/null || true
  for n in "${NODES[@]}"; do
    CTL_TIMEOUT=60 ctl "$n" stop >/dev/null 2>&1 || true
    # Whatever still listens on its ports (a VM the stop didn't end) is killed.
    kill_node "$n" 2>/dev/null || true
  done
  # CLUSTER_LOGS_TO=DIR keeps every node's log (a failed soak or suite asks for them).
  if [ -n "${CLUSTER_LOGS_TO:-}" ]; then
    for n in "${NODES[@]}"; do
      mkdir -p "$CLUSTER_LOGS_TO/n$n" && cp -r "$DIR/n$n/log/." "$CLUSTER_LOGS_TO/n$n/" 2>/dev/null || true
    done
    echo "cluster: node logs kept in $CLUSTER_LOGS_TO"
  fi
  rm -rf "$DIR"
  echo "cluster: stopped"
}

pid_of() {
  local f="$DIR/n$1/pid"
  [ -s "$f" ] && cat "$f" && return 0
  # The pid file is written after boot: fall back to the VM whose node name it is.
  pgrep -f -- "-sname $(name "$1")|-name $(name "$1")|nodename $(name "$1")" | head -1
}

# The node's VM: whatever listens on its distribution or AMQP port (its command line names it
# only through the environment), and the pid in its pid file.
kill_node() {
  local try p pids
  for try in 1 2 3; do
    pids=()
    for p in $( { pid_of "$1" 2>/dev/null || true; listeners "$1"; } | sort -u); do
      # Only an Erlang VM: a stale pid file's pid may since belong to anything.
      case "$(cat "/proc/$p/comm" 2>/dev/null)" in beam*) pids+=("$p") ;; esac
    done
    [ ${#pids[@]} -eq 0 ] && return 0
    [ "$try" -gt 1 ] && echo "cluster: node $1's VM (${pids[*]}) survived a kill; again" >&2
    kill -KILL "${pids[@]}" 2>/dev/null || true
    # Gone once nothing listens on its ports any more.
    for _ in $(seq 1 50); do [ -z "$(listeners "$1")" ] && return 0; sleep 0.1; done
  done
  echo "cluster: node $1's VM still holds its ports" >&2
  return 1
}

# The pids listening on node $1's distribution or AMQP port.
listeners() {
  ss -ltnpH "( sport = :$(dist_port "$1") or sport = :$(amqp_port "$1") )" | grep -o 'pid=[0-9]*' | cut -d= -f2 || true
}

partition() {
  local n=$1 me others=() port=() 
  me=$(ip_of "$n")
  for m in "${NODES[@]}"; do
    if [ "$m" != "$n" ]; then others+=("$(ip_of "$m")"); port+=("$(dist_port "$m")"); fi
  done
  local o p
  o=$(IFS=,; echo "${others[*]}"); p=$(IFS=,; echo "${port[*]}")
  nft add table inet $TABLE
  nft "add chain inet $TABLE cut { type filter hook output priority 0; policy accept; }"
  # Node n's connections to the others' listeners, theirs to n's, and the answers both ways.
  nft add rule inet $TABLE cut ip saddr "$me" tcp dport "{ $p }" drop
  nft add rule inet $TABLE cut ip saddr "{ $o }" tcp dport "$(dist_port "$n")" drop
  nft add rule inet $TABLE cut tcp sport "$(dist_port "$n")" ip daddr "{ $o }" drop
  nft add rule inet $TABLE cut tcp sport "{ $p }" ip daddr "$me" drop
}

heal() { nft delete table inet $TABLE 2>/dev/null || true; }

leader() {
  ctl "$(peer_of 0)" list_queues name leader --formatter json | python3 -c "
import json,sys
for q in json.load(sys.stdin):
    if q['name'] == sys.argv[1]:
        print(q['leader'].split('@')[0][len('rabbitc'):]); break
else:
    sys.exit(1)" "$1"
}

# Every queue and stream whose name holds $1, with its leader's node number: "name=N ...".
leaders() {
  ctl "$(peer_of 0)" list_queues name leader --formatter json | python3 -c "
import json,sys
print(' '.join(q['name'] + '=' + q['leader'].split('@')[0][len('rabbitc'):]
               for q in json.load(sys.stdin) if sys.argv[1] in q['name']))" "$1"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) ctl "$(peer_of 0)" cluster_status ;;
  kill) kill_node "$2" ;;
  stop-node) ctl "$2" stop >/dev/null ;;
  start-node) start_node "$2"; ctl "$2" await_online_nodes 3 --timeout 60 >/dev/null ;;
  safe-to-stop)
    for _ in $(seq 1 60); do
      if rabbitmq-queues -q -n "$(name "$2")" check_if_node_is_quorum_critical >/dev/null 2>&1; then exit 0; fi
      sleep 1
    done
    echo "cluster: node $2 is still quorum-critical after 60 s" >&2; exit 1 ;;
  partition) partition "$2" ;;
  heal) heal ;;
  leader) leader "$2" ;;
  leaders) leaders "$2" ;;
  pid) pid_of "$2" ;;
  solo-start)
    need; DIR=$SOLO_DIR; mkdir -p "$DIR"; start_node $SOLO
    echo "cluster: a lone node $(name $SOLO) running on 127.0.0.1:$(amqp_port $SOLO)" ;;
  solo-stop)
    DIR=$SOLO_DIR
    CTL_TIMEOUT=60 ctl $SOLO stop >/dev/null 2>&1 || true
    kill_node $SOLO 2>/dev/null || true
    rm -rf "$DIR"; echo "cluster: lone node stopped" ;;
  *) sed -n '2,34p' "$0"; exit 2 ;;
esac
