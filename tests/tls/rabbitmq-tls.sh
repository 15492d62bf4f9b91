#!/usr/bin/env bash
# A TLS-enabled RabbitMQ node on this machine, beside the main broker.
#
#   tests/tls/rabbitmq-tls.sh start|stop|status|dir|client[-san] NAME [DAYS]|ctl ARGS...
#
# Node tls1@localhost: plain AMQP on 127.0.0.1:5694 (set-up only), AMQPS on
# 127.0.0.1:5695 (TLS 1.2 and 1.3), distribution port 25694; its own mnesia,
# log, config, pid and plugins files under $EVROUTER_TLS_DIR (default
# /tmp/evrouter-tls), owned by the rabbitmq user the server drops to. The
# plugin rabbitmq_auth_mechanism_ssl maps a client certificate's CN to a
# broker user (SASL EXTERNAL); PLAIN stays for password users.
#
# Certificates are made here, at start, with openssl: a throwaway CA, the
# server's certificate (CN localhost, SAN localhost and 127.0.0.1), and a
# second CA nobody trusts (for wrong-CA tests). `client NAME` makes a client
# certificate with CN NAME signed by the CA; `client-san NAME` one with no
# CN and NAME as its only subjectAltName (DNS). Nothing here is secret or
# kept: stop removes the directory.
#
# EVROUTER_TLS_STRICT=1: a deployment where every service shows a
# certificate: fail_if_no_peer_cert = true (the TLS listener refuses a
# client without one) and the broker user is the certificate's first DNS
# subjectAltName (ssl_cert_login_from = subject_alternative_name). Its own
# certificate names localhost only (no 127.0.0.1).
#
# The main broker (rabbit@localhost on 5672) is never touched: every
# rabbitmqctl call here names the node with -n.
set -euo pipefail

BASE=${EVROUTER_TLS_DIR:-/tmp/evrouter-tls}
NODE=${EVROUTER_TLS_NODE:-tls1@localhost}
PORT=${EVROUTER_TLS_PLAIN_PORT:-5694}
TLS_PORT=${EVROUTER_TLS_PORT:-5695}
DIST=${EVROUTER_TLS_DIST_PORT:-25694}
CERTS=$BASE/certs
STRICT=${EVROUTER_TLS_STRICT:-0}

log() { printf '[tls] %s\n' "$*" >&2; }
ctl() { rabbitmqctl -q -n "$NODE" "$@"; }
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
pid_of() { cat "$BASE/pid" 2>/dev/null || true; }
# Alive only if the pid file's process really is this node (pids get reused).
alive() {
  local pid; pid=$(pid_of)
  [ -n "$pid" ] && { tr '\0' '\n' < "/proc/$pid/environ"; } 2>/dev/null \
    | grep -qx "RABBITMQ_NODENAME=$NODE"
}

sign() {   # sign NAME CA SUBJECT DAYS [SAN [USAGE]]
  local name=$1 ca=$2 subject=$3 days=$4 san=${5:-} usage=${6:-serverAuth}
  local ext=$CERTS/$name.ext
  openssl req -new -newkey rsa:2048 -nodes -keyout "$CERTS/$name.key" \
    -out "$CERTS/$name.csr" -subj "$subject" 2>/dev/null
  if [ -n "$san" ]; then
    printf 'subjectAltName = %s\nextendedKeyUsage = %s\n' "$san" "$usage" > "$ext"
  else
    printf 'extendedKeyUsage = clientAuth\n' > "$ext"
  fi
  openssl x509 -req -in "$CERTS/$name.csr" -CA "$CERTS/$ca.pem" \
    -CAkey "$CERTS/$ca.key" -CAcreateserial -days "$days" -sha256 \
    -extfile "$ext" -out "$CERTS/$name.pem" 2>/dev/null
  rm -f "$CERTS/$name.csr" "$ext"
  chmod 600 "$CERTS/$name.key"
}

make_ca() {  # make_ca NAME SUBJECT
  openssl req -x509 -newkey rsa:2048 -nodes -keyout "$CERTS/$1.key" \
    -out "$CERTS/$1.pem" -subj "$2" -days 2 -sha256 2>/dev/null
  chmod 600 "$CERTS/$1.key"
}

certificates() {
  mkdir -p "$CERTS"
  make_ca ca "/CN=evrouter test CA"
  make_ca other-ca "/CN=evrouter untrusted CA"
  # The strict node's certificate names localhost only: clients must check
  # the name of the URL, not the address kombu turns localhost into.
  if [ "$STRICT" = 1 ]; then
    sign server ca "/CN=localhost" 2 "DNS:localhost"
  else
    sign server ca "/CN=localhost" 2 "DNS:localhost,IP:127.0.0.1"
  fi
}

client() {   # client NAME [DAYS]: a client certificate, CN NAME
  [ -f "$CERTS/ca.key" ] || { log "no CA: start the node first"; return 1; }
  sign "$1" ca "/CN=$1" "${2:-2}"
  echo "$CERTS/$1.pem $CERTS/$1.key"
}

client_san() {   # client-san NAME [DAYS]: no CN, subjectAltName DNS:NAME
  [ -f "$CERTS/ca.key" ] || { log "no CA: start the node first"; return 1; }
  sign "$1" ca "/O=evrouter test client" "${2:-2}" "DNS:$1" clientAuth
  echo "$CERTS/$1.pem $CERTS/$1.key"
}

login_settings() {
  if [ "$STRICT" = 1 ]; then
    printf '%s\n' "ssl_options.fail_if_no_peer_cert = true" \
      "ssl_cert_login_from = subject_alternative_name" \
      "ssl_cert_login_san_type = dns" "ssl_cert_login_san_index = 0"
  else
    printf '%s\n' "ssl_options.fail_if_no_peer_cert = false" \
      "ssl_cert_login_from = common_name"
  fi
}

prepare() {
  mkdir -p "$BASE/mnesia" "$BASE/log"
  cat > "$BASE/rabbitmq.conf" <<EOF
listeners.tcp.local = 127.0.0.1:$PORT
listeners.ssl.default = 127.0.0.1:$TLS_PORT
loopback_users = none
ssl_options.cacertfile = $CERTS/ca.pem
ssl_options.certfile = $CERTS/server.pem
ssl_options.keyfile = $CERTS/server.key
ssl_options.verify = verify_peer
ssl_options.versions.1 = tlsv1.3
ssl_options.versions.2 = tlsv1.2
auth_mechanisms.1 = PLAIN
auth_mechanisms.2 = AMQPLAIN
auth_mechanisms.3 = EXTERNAL
$(login_settings)
EOF
  echo '[rabbitmq_auth_mechanism_ssl].' > "$BASE/enabled_plugins"
  chown -R rabbitmq:rabbitmq "$BASE/mnesia" "$BASE/log" "$BASE/rabbitmq.conf" \
    "$BASE/enabled_plugins"
  # The server reads its own key; client keys stay root's.
  chown rabbitmq:rabbitmq "$CERTS/server.key"
  chown rabbitmq:rabbitmq "$BASE"      # its pid file
  chmod 755 "$BASE" "$CERTS"
}

start() {
  if alive && listening "$TLS_PORT"; then log "already running"; return 0; fi
  local t0=$SECONDS deadline=$((SECONDS + 120))
  stop >/dev/null 2>&1 || true
  rm -rf "$BASE"
  mkdir -p "$BASE"
  certificates
  prepare
  env RABBITMQ_NODENAME="$NODE" RABBITMQ_NODE_PORT="$PORT" \
      RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 RABBITMQ_DIST_PORT="$DIST" \
      RABBITMQ_MNESIA_BASE="$BASE/mnesia" RABBITMQ_LOG_BASE="$BASE/log" \
      RABBITMQ_CONFIG_FILE="$BASE/rabbitmq.conf" RABBITMQ_PID_FILE="$BASE/pid" \
      RABBITMQ_ENABLED_PLUGINS_FILE="$BASE/enabled_plugins" \
      rabbitmq-server -detached >/dev/null 2>&1
  until ctl await_startup --timeout 10 >/dev/null 2>&1; do
    (( SECONDS < deadline )) || { log "$NODE did not start (see $BASE/log)"; return 1; }
    sleep 0.5
  done
  until listening "$TLS_PORT"; do
    (( SECONDS < deadline )) || { log "$NODE does not listen on $TLS_PORT"; return 1; }
    sleep 0.2
  done
  log "$NODE up in $((SECONDS - t0))s: amqps://127.0.0.1:$TLS_PORT (CA $CERTS/ca.pem)"
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
  if alive; then echo "$NODE pid $(pid_of) tls $TLS_PORT plain $PORT"
  else echo "$NODE down"; fi
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  dir) echo "$BASE" ;;
  client) shift; client "$@" ;;
  client-san) shift; client_san "$@" ;;
  ctl) shift; ctl "$@" ;;
  *) echo "usage: $0 start|stop|status|dir|client[-san] NAME [DAYS]|ctl ARGS..." >&2; exit 2 ;;
esac
