#!/usr/bin/env bash
# A plain single RabbitMQ node beside the main broker, for tests that change
# a node-wide setting (the main broker's settings are shared: never touched).
#
#   tests/functional/rabbitmq-node.sh start|stop|status|ctl ARGS...
#
# Node $EVROUTER_NODE (default hc1@localhost) on 127.0.0.1:$EVROUTER_NODE_PORT
# (default 5730), distribution $EVROUTER_NODE_DIST_PORT (default 25730), its
# own mnesia, log, config, pid and plugins files under $EVROUTER_NODE_DIR
# (default /tmp/evrouter-<node>), owned by the rabbitmq user the server drops
# to. Every rabbitmqctl call here names the node with -n.
# With $EVROUTER_NODE_MGMT_PORT set, the node also runs rabbitmq_management
# on 127.0.0.1:that port (an HTTP call costs milliseconds where a rabbitmqctl
# call starts an Erlang VM, about a second); unset, no plugin (the default).
set -euo pipefail

NODE=${EVROUTER_NODE:-hc1@localhost}
PORT=${EVROUTER_NODE_PORT:-5730}
DIST=${EVROUTER_NODE_DIST_PORT:-25730}
BASE=${EVROUTER_NODE_DIR:-/tmp/evrouter-${NODE%%@*}}
MGMT=${EVROUTER_NODE_MGMT_PORT:-}
REPO=$(cd "$(dirname "$0")/../.." && pwd)

log() { printf '[node] %s\n' "$*" >&2; }
ctl() { rabbitmqctl -q -n "$NODE" "$@"; }
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; }
pid_of() { cat "$BASE/pid" 2>/dev/null || true; }
# Alive only if the pid file's process really is this node (pids get reused).
alive() {
  local pid; pid=$(pid_of)
  [ -n "$pid" ] && { tr '\0' '\n' < "/proc/$pid/environ"; } 2>/dev/null \
    | grep -qx "RABBITMQ_NODENAME=$NODE"
}

start() {
  if alive && listening; then log "already running"; return 0; fi
  local t0=$SECONDS deadline=$((SECONDS + 120))
  stop >/dev/null 2>&1 || true
  mkdir -p "$BASE/mnesia" "$BASE/log"
  printf 'listeners.tcp.local = 127.0.0.1:%s\nloopback_users = none\n' "$PORT" \
    > "$BASE/rabbitmq.conf"
  if [ -n "$MGMT" ]; then
    printf 'management.tcp.ip = 127.0.0.1\nmanagement.tcp.port = %s\n' "$MGMT" \
      >> "$BASE/rabbitmq.conf"
    echo '[rabbitmq_management].' > "$BASE/enabled_plugins"
  else
    echo '[].' > "$BASE/enabled_plugins"
  fi
  # The parking queues' resend timeout of deploy/rabbitmq/advanced.config.
  cp "$REPO/deploy/rabbitmq/advanced.config" "$BASE/advanced.config"
  chown -R rabbitmq:rabbitmq "$BASE"
  env RABBITMQ_NODENAME="$NODE" RABBITMQ_NODE_PORT="$PORT" \
      RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 RABBITMQ_DIST_PORT="$DIST" \
      RABBITMQ_MNESIA_BASE="$BASE/mnesia" RABBITMQ_LOG_BASE="$BASE/log" \
      RABBITMQ_CONFIG_FILE="$BASE/rabbitmq.conf" RABBITMQ_PID_FILE="$BASE/pid" \
      RABBITMQ_ADVANCED_CONFIG_FILE="$BASE/advanced.config" \
      RABBITMQ_ENABLED_PLUGINS_FILE="$BASE/enabled_plugins" \
      rabbitmq-server -detached >/dev/null 2>&1
  until ctl await_startup --timeout 10 >/dev/null 2>&1; do
    (( SECONDS < deadline )) || { log "$NODE did not start (see $BASE/log)"; return 1; }
    sleep 0.5
  done
  until listening; do
    (( SECONDS < deadline )) || { log "$NODE does not listen on $PORT"; return 1; }
    sleep 0.2
  done
  log "$NODE up in $((SECONDS - t0))s: amqp://127.0.0.1:$PORT"
}

stop() {
  if alive; then
    ctl stop >/dev/null 2>&1 || kill -9 "$(pid_of)" || true
    for _ in $(seq 1 100); do alive || break; sleep 0.1; done
  fi
  rm -rf "$BASE"
  log "stopped"
}

status() {
  if alive; then echo "$NODE pid $(pid_of) port $PORT"; else echo "$NODE down"; fi
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  ctl) shift; ctl "$@" ;;
  *) echo "usage: $0 start|stop|status|ctl ARGS..." >&2; exit 2 ;;
esac
