#!/usr/bin/env bash
# A three-node RabbitMQ cluster on this machine, beside the main broker.
#
#   tests/cluster/rabbitmq-cluster.sh start|stop|status|url|kill N|run N|stop-node N|start-node N|freeze N|thaw N
#
# Nodes c1@localhost, c2@localhost, c3@localhost listen on 127.0.0.1:5681-5683
# (distribution 25681-25683), each with its own mnesia, log, config, pid and
# plugins files under $EVROUTER_CLUSTER_DIR (default /tmp/evrouter-cluster),
# owned by the rabbitmq user the server drops to. The Debian wrappers run the
# server and rabbitmqctl as that user (HOME=/var/lib/rabbitmq), so every node
# and every rabbitmqctl call shares the main broker's Erlang cookie.
#
# With EVROUTER_CLUSTER_MGMT=1 each node also runs rabbitmq_management on
# 127.0.0.1:15681-15683 (the chaos stage's broker-side faults: an HTTP call
# costs milliseconds where a rabbitmqctl call starts an Erlang VM); unset,
# no plugin (the default).
#
# The main broker (rabbit@localhost on 5672) is never touched: every
# rabbitmqctl call here names its node with -n.
set -euo pipefail

BASE=${EVROUTER_CLUSTER_DIR:-/tmp/evrouter-cluster}
NODES=(1 2 3)
PORT0=5680
DIST0=25680
MGMT0=15680
MGMT=${EVROUTER_CLUSTER_MGMT:-}
REPO=$(cd "$(dirname "$0")/../.." && pwd)

log() { printf '[cluster] %s\n' "$*" >&2; }
node() { echo "c$1@localhost"; }
port() { echo $((PORT0 + $1)); }
ctl() { local n=$1; shift; rabbitmqctl -q -n "$(node "$n")" "$@"; }
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$(port "$1")") 2>/dev/null; }
pid_of() { cat "$BASE/c$1/pid" 2>/dev/null || true; }
# Alive only if the pid file's process really is that node: pids get reused
# (a stale file must never make us wait on, or kill -9, someone else, like
# the main broker's helpers).
alive() {
  local pid; pid=$(pid_of "$1")
  [ -n "$pid" ] && { tr '\0' '\n' < "/proc/$pid/environ"; } 2>/dev/null \
    | grep -qx "RABBITMQ_NODENAME=$(node "$1")"
}

prepare() {
  local n=$1 dir=$BASE/c$1
  mkdir -p "$dir/mnesia" "$dir/log"
  printf 'listeners.tcp.local = 127.0.0.1:%s\nloopback_users = none\n' "$(port "$n")" \
    > "$dir/rabbitmq.conf"
  if [ "$MGMT" = 1 ]; then
    printf 'management.tcp.ip = 127.0.0.1\nmanagement.tcp.port = %s\n' $((MGMT0 + n)) \
      >> "$dir/rabbitmq.conf"
    echo '[rabbitmq_management].' > "$dir/enabled_plugins"
  else
    echo '[].' > "$dir/enabled_plugins"
  fi
  # The parking queues' resend timeout of deploy/rabbitmq/advanced.config.
  cp "$REPO/deploy/rabbitmq/advanced.config" "$dir/advanced.config"
  chown -R rabbitmq:rabbitmq "$BASE"
}

start_node() {
  local n=$1 dir=$BASE/c$1
  alive "$n" && return 0
  prepare "$n"
  rm -f "$dir/pid"        # or `await` would read the dead one's pid
  # `su` (inside the Debian wrapper) keeps these; RABBITMQ_* beat the
  # NODENAME of /etc/rabbitmq/rabbitmq-env.conf.
  env RABBITMQ_NODENAME="$(node "$n")" RABBITMQ_NODE_PORT="$(port "$n")" \
      RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
      RABBITMQ_DIST_PORT=$((DIST0 + n)) \
      RABBITMQ_MNESIA_BASE="$dir/mnesia" RABBITMQ_LOG_BASE="$dir/log" \
      RABBITMQ_CONFIG_FILE="$dir/rabbitmq.conf" RABBITMQ_PID_FILE="$dir/pid" \
      RABBITMQ_ADVANCED_CONFIG_FILE="$dir/advanced.config" \
      RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins" \
      rabbitmq-server -detached >/dev/null 2>&1
}

await_node() {
  local n=$1 deadline=$((SECONDS + 120))
  # await_startup fails at once while the node is not reachable yet
  until ctl "$n" await_startup --timeout 10 >/dev/null 2>&1; do
    (( SECONDS < deadline )) || { log "c$n did not start"; return 1; }
    sleep 0.5
  done
  until listening "$n"; do
    (( SECONDS < deadline )) || { log "c$n does not listen on $(port "$n")"; return 1; }
    sleep 0.2
  done
}

kill_node() {
  local n=$1 pid
  alive "$n" || { log "c$n is not running"; return 1; }
  pid=$(pid_of "$n")
  kill -9 "$pid"
  for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
}

# SIGSTOP of the node's Erlang VM: frozen, it keeps its sockets open but
# answers nothing (neither AMQP nor its peers' votes). Thawing a node that
# is not running is a no-op, so clean-ups can thaw every node.
freeze_node() {
  alive "$1" || { log "c$1 is not running"; return 1; }
  kill -STOP "$(pid_of "$1")"
}
thaw_node() { if alive "$1"; then kill -CONT "$(pid_of "$1")"; fi; }

# Until node N sees all three running. A quorum queue declared before that
# gets only the members the node saw (3.10 does not grow it later).
await_whole() {
  local deadline=$((SECONDS + 60))
  until [ "$(members "$1")" = "3" ]; do
    (( SECONDS < deadline )) || { log "c$1 does not see the whole cluster"; return 1; }
    sleep 0.2
  done
}

members() { ctl "$1" eval 'length(rabbit_nodes:all_running()).' 2>/dev/null || echo 0; }

start() {
  if [ "$(members 1)" = "3" ]; then log "already running"; return 0; fi
  local t0=$SECONDS
  stop >/dev/null 2>&1 || true
  rm -rf "$BASE"
  for n in "${NODES[@]}"; do start_node "$n"; done
  for n in "${NODES[@]}"; do await_node "$n"; done
  for n in 2 3; do
    ctl "$n" stop_app >/dev/null 2>&1
    ctl "$n" join_cluster "$(node 1)" >/dev/null 2>&1
    ctl "$n" start_app >/dev/null 2>&1
  done
  for _ in $(seq 1 60); do [ "$(members 1)" = "3" ] && break; sleep 0.5; done
  [ "$(members 1)" = "3" ] || { log "the nodes did not form a cluster"; return 1; }
  log "3 nodes up and clustered in $((SECONDS - t0))s: $(url)"
}

stop() {
  for n in "${NODES[@]}"; do
    if alive "$n"; then ctl "$n" stop >/dev/null 2>&1 || kill_node "$n" || true; fi
  done
  log "stopped"
}

status() {
  for n in "${NODES[@]}"; do
    if alive "$n"; then echo "$(node "$n") pid $(pid_of "$n") port $(port "$n") running=$(members "$n")"
    else echo "$(node "$n") down"; fi
  done
}

url() {
  local hosts=()
  for n in "${NODES[@]}"; do hosts+=("guest:guest@127.0.0.1:$(port "$n")"); done
  (IFS=,; echo "rabbit://${hosts[*]}/")
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  url) url ;;
  # single-node operations for fault tests
  kill) kill_node "$2" ;;
  run) start_node "$2"; await_node "$2"; await_whole "$2" ;;   # after kill: same data, rejoins
  stop-node) ctl "$2" stop ;;                          # the whole Erlang node, cleanly
  start-node) start_node "$2"; await_node "$2"; await_whole "$2" ;;
  freeze) freeze_node "$2" ;;
  thaw) thaw_node "$2" ;;
  *) echo "usage: $0 start|stop|status|url|kill N|run N|stop-node N|start-node N|freeze N|thaw N" >&2; exit 2 ;;
esac
