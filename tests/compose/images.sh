#!/usr/bin/env bash
# Local base images for the compose test, on a machine with no image
# registry: a Debian bookworm root from debootstrap, a Python base on it (in
# place of python:3.11-slim-bookworm) and RabbitMQ from Debian's
# rabbitmq-server package (in place of rabbitmq:3.x-management). Then the
# wheels of evrouter and its dependencies, built on this machine (pip inside
# a container cannot verify the package index's TLS here), for the
# Dockerfile to install with --no-index.
#
# Idempotent: an image that exists is kept, and so are wheels newer than
# every source file (FORCE=1 rebuilds all). Prints the variables the compose
# file takes to use these images.
#
#   tests/compose/images.sh
set -euo pipefail
cd "$(dirname "$0")/../.."

DEBIAN_IMAGE=${EVROUTER_TEST_DEBIAN_IMAGE:-evrouter-test/debian:bookworm}
PYTHON_IMAGE=${EVROUTER_TEST_PYTHON_IMAGE:-evrouter-test/python:3.11-bookworm}
RABBITMQ_IMAGE=${EVROUTER_TEST_RABBITMQ_IMAGE:-evrouter-test/rabbitmq:bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
WHEELS=.compose-wheels

log() { printf '[images] %s\n' "$*" >&2; }
have() { [ -z "${FORCE:-}" ] && docker image inspect "$1" >/dev/null 2>&1; }
# The legacy builder (no buildx here) warns that it is deprecated; it works.
build() { DOCKER_BUILDKIT=0 docker build -q "$@" >/dev/null; }

if ! have "$DEBIAN_IMAGE"; then
    log "debootstrap bookworm -> $DEBIAN_IMAGE"
    root=$(mktemp -d /tmp/evrouter-bookworm.XXXXXX)
    trap 'rm -rf "$root"' EXIT
    debootstrap --variant=minbase bookworm "$root" "$MIRROR" >/dev/null
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    tar -C "$root" -c . | docker import - "$DEBIAN_IMAGE" >/dev/null
    rm -rf "$root"
    trap - EXIT
fi
if ! have "$PYTHON_IMAGE"; then
    log "Debian's python3 -> $PYTHON_IMAGE"
    build --build-arg DEBIAN_IMAGE="$DEBIAN_IMAGE" -t "$PYTHON_IMAGE" tests/compose/python
fi
if ! have "$RABBITMQ_IMAGE"; then
    log "Debian's rabbitmq-server -> $RABBITMQ_IMAGE"
    build --build-arg DEBIAN_IMAGE="$DEBIAN_IMAGE" -t "$RABBITMQ_IMAGE" tests/compose/rabbitmq
fi

stamp=$WHEELS/.built
if [ -n "${FORCE:-}" ] || [ ! -f "$stamp" ] \
        || [ -n "$(find setup.py router compute network -newer "$stamp" -print -quit)" ]; then
    log "wheels of evrouter and its dependencies -> $WHEELS/"
    rm -rf "$WHEELS"
    # setuptools and wheel too: the image builds evrouter itself from its
    # sources, offline, in an isolated build environment.
    .venv/bin/python -m pip wheel -q --wheel-dir "$WHEELS" . setuptools wheel
    touch "$stamp"
fi

echo "EVROUTER_PYTHON_IMAGE=$PYTHON_IMAGE"
echo "EVROUTER_RABBITMQ_IMAGE=$RABBITMQ_IMAGE"
