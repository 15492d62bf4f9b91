#!/bin/sh
# A libvirtd with the QEMU driver (software emulation) for the real-hypervisor
# agent tests, as docs "A real hypervisor for tests" describes (Debian 12, root).
#
# Idempotent: installs only the packages that are missing, and leaves a
# libvirtd that is already running alone (its configuration too). Prints why
# and exits 3 when this machine cannot run it; the test fixture then skips.
#
#   tests/functional/libvirtd.sh          start virtlogd and libvirtd if needed
set -eu

cannot() { echo "cannot run libvirtd here: $*"; exit 3; }

[ "$(id -u)" = 0 ] || cannot "needs root to start the system libvirtd"

alive() {   # alive NAME: the daemon that wrote /run/NAME.pid still runs
    [ -f "/run/$1.pid" ] || return 1
    pid=$(cat "/run/$1.pid")
    # Not a zombie (a killed daemon stays one until reaped), not a reused pid.
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$1" ] \
        && ! grep -q ') Z ' "/proc/$pid/stat" 2>/dev/null
}

if alive libvirtd; then
    exit 0
fi

missing=""
command -v libvirtd >/dev/null 2>&1 || missing="$missing libvirt-daemon"
dpkg -s libvirt-daemon-driver-qemu >/dev/null 2>&1 \
    || missing="$missing libvirt-daemon-driver-qemu"
[ -x /usr/bin/qemu-system-x86_64 ] || missing="$missing qemu-system-x86"
if [ -n "$missing" ]; then
    command -v apt-get >/dev/null 2>&1 || cannot "missing$missing and no apt-get"
    echo "installing$missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends $missing \
        || { apt-get update && apt-get install -y --no-install-recommends $missing; } \
        || cannot "apt-get could not install$missing"
fi

# The QEMU driver refuses to start until its default user and group exist,
# even when qemu.conf says to run guests as root.
getent group kvm >/dev/null || groupadd -r kvm
getent group libvirt-qemu >/dev/null || groupadd -r libvirt-qemu
id libvirt-qemu >/dev/null 2>&1 || useradd -r -g kvm libvirt-qemu

mkdir -p /etc/libvirt /var/log/libvirt /var/run/libvirt /var/lib/libvirt/qemu
conf=/etc/libvirt/qemu.conf
touch "$conf"
set_key() {
    if grep -qE "^[[:space:]]*$1[[:space:]]*=" "$conf"; then
        sed -i -E "s|^[[:space:]]*$1[[:space:]]*=.*|$1 = $2|" "$conf"
    else
        echo "$1 = $2" >>"$conf"
    fi
}
set_key user '"root"'
set_key group '"root"'
set_key dynamic_ownership 0
set_key security_driver '"none"'

alive virtlogd || virtlogd -d
# -d returns once the daemon has initialised its drivers (or failed to).
libvirtd -d || cannot "libvirtd -d failed (see /var/log/libvirt)"
i=0
until alive libvirtd && [ -S /var/run/libvirt/libvirt-sock ]; do
    i=$((i + 1))
    [ "$i" -le 100 ] || cannot "libvirtd did not come up within 10 s"
    sleep 0.1
done
