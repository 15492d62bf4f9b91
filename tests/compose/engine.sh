#!/usr/bin/env bash
# A Docker engine and docker-compose on this machine (Debian 12, root), for
# the compose test: installs Debian's docker.io, docker-compose, debootstrap
# and iptables when missing, starts dockerd in the background when no engine
# answers, and waits for it.
#
# Idempotent; exits 3 with the reason when this machine cannot run one.
#
#   tests/compose/engine.sh
set -euo pipefail

cannot() { echo "cannot run a Docker engine here: $*"; exit 3; }
log() { printf '[engine] %s\n' "$*" >&2; }

[ "$(id -u)" = 0 ] || cannot "needs root to start dockerd"

missing=()
command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
command -v iptables >/dev/null 2>&1 || missing+=(iptables)
if ((${#missing[@]})); then
    command -v apt-get >/dev/null 2>&1 || cannot "missing ${missing[*]} and no apt-get"
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
        || cannot "apt-get could not install ${missing[*]}"
fi

if ! docker info >/dev/null 2>&1; then
    log "no Docker engine answers; starting dockerd (log: /var/log/dockerd.log)"
    # setsid: the daemon outlives this script and the test run that started it.
    setsid nohup dockerd >/var/log/dockerd.log 2>&1 </dev/null &
    for _ in $(seq 1 120); do
        docker info >/dev/null 2>&1 && break
        sleep 0.5
    done
    docker info >/dev/null 2>&1 \
        || cannot "dockerd did not answer within 60 s: $(tail -n 5 /var/log/dockerd.log)"
fi
log "engine $(docker info --format '{{.ServerVersion}} ({{.Driver}})'), $(docker-compose version --short)"
