#!/bin/sh
# A private libvirtd for tests and the benchmark, inside a network namespace
# of its own, never touching the host's libvirt:
#
#   libvirtd-netns.sh start NS DIR   prints the URI: qemu:///system?socket=DIR/sock/libvirt-sock
#   libvirtd-netns.sh stop NS DIR    stops it (domains first) and removes NS
#
# Needs root, and Debian's libvirt-daemon-system and dnsmasq-base. libvirtd
# and virtlogd run in a mount namespace (from `ip netns exec`) where DIR's
# folders are bind-mounted over /etc/libvirt, /run/libvirt, /var/lib/libvirt,
# /var/cache/libvirt and /var/log/libvirt, so their sockets, state and
# definitions are private. qemu.conf is Debian's own (qemu runs as
# libvirt-qemu, the DAC security driver on) but for two workarounds this
# machine needs (DESIGN.md): no mount namespaces for domains, and /dev/kvm
# hidden behind an empty read-only file (with no udev here libvirt would
# otherwise find KVM half-usable and re-probe qemu on every call). The socket
# is Debian's way: read-write for the group `libvirt`, so an ordinary user in
# it can use the daemon. DIR must exist and belong to root (callers make it
# with mktemp -d; it is opened to 0711 so that group can reach the socket);
# keep it short: socket paths are limited to 108 bytes.
set -eu
action=$1 ns=$2 dir=$3

start() {
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    mkdir -p "$dir"/sock "$dir"/run "$dir"/lib/dnsmasq "$dir"/cache "$dir"/log "$dir"/etc
    chmod 0711 "$dir"
    chmod 0755 "$dir"/sock
    cp -a /etc/libvirt/. "$dir"/etc/
    rm -f "$dir"/etc/qemu/networks/default.xml "$dir"/etc/qemu/networks/autostart/*
    cat > "$dir"/etc/libvirtd.conf <<CONF
unix_sock_dir = "$dir/sock"
unix_sock_group = "libvirt"
unix_sock_rw_perms = "0770"
unix_sock_ro_perms = "0777"
unix_sock_admin_perms = "0700"
auth_unix_rw = "none"
auth_unix_ro = "none"
log_outputs = "3:file:$dir/log/libvirtd.log"
CONF
    cat >> "$dir"/etc/qemu.conf <<CONF

namespaces = []
CONF
    : > "$dir"/kvm-blocker
    chmod 0600 "$dir"/kvm-blocker
    ip netns exec "$ns" sh -c '
        set -eu
        dir=$1
        mount --bind "$dir/etc" /etc/libvirt
        mkdir -p /run/libvirt /var/lib/libvirt /var/cache/libvirt /var/log/libvirt
        mount --bind "$dir/run" /run/libvirt
        mount --bind "$dir/lib" /var/lib/libvirt
        mount --bind "$dir/cache" /var/cache/libvirt
        mount --bind "$dir/log" /var/log/libvirt
        if [ -e /dev/kvm ]; then
            mount --bind "$dir/kvm-blocker" /dev/kvm
            mount -o remount,bind,ro /dev/kvm
        fi
        /usr/sbin/virtlogd -d -p "$dir/virtlogd.pid"
        /usr/sbin/libvirtd -d -f /etc/libvirt/libvirtd.conf -p "$dir/libvirtd.pid"
    ' sh "$dir"
    tries=0
    while [ ! -S "$dir/sock/libvirt-sock" ]; do
        tries=$((tries + 1))
        if [ "$tries" -gt 200 ]; then
            echo "libvirtd did not open $dir/sock/libvirt-sock; its log:" >&2
            tail -n 20 "$dir/log/libvirtd.log" >&2 || true
            exit 1
        fi
        sleep 0.05
    done
    echo "qemu:///system?socket=$dir/sock/libvirt-sock"
}

# Stops the daemon whose pid is in file $1: TERM, then KILL after 5 s.
stop_daemon() {
    [ -f "$1" ] || return 0
    pid=$(cat "$1")
    kill "$pid" 2>/dev/null || true
    tries=0
    while kill -0 "$pid" 2>/dev/null && [ "$tries" -lt 50 ]; do
        tries=$((tries + 1))
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        kill -9 "$pid"
    fi
}

stop() {
    uri="qemu:///system?socket=$dir/sock/libvirt-sock"
    if [ -S "$dir/sock/libvirt-sock" ]; then
        for domain in $(virsh -q -c "$uri" list --name 2>/dev/null); do
            virsh -q -c "$uri" destroy "$domain" >/dev/null 2>&1 || true
        done
    fi
    stop_daemon "$dir/libvirtd.pid"
    stop_daemon "$dir/virtlogd.pid"
    ip netns del "$ns" 2>/dev/null || true
}

"$action"
