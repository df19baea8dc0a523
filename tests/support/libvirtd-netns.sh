#!/bin/sh
# Private libvirtds for tests and the benchmark, each inside a network
# namespace of its own, never touching the host's libvirt:
#
#   libvirtd-netns.sh start NS DIR   prints the URI: qemu:///system?socket=DIR/run/libvirt-sock
#   libvirtd-netns.sh stop NS DIR    stops it (domains first) and removes NS
#
# A "libvirt host" as testbed reaches a remote one: the same, plus a link
# into a runner namespace where the client runs, and an sshd for root.
#
#   libvirtd-netns.sh runner NS                  NS with the bridge tb-br, 10.77.0.1/24
#   libvirtd-netns.sh stop-runner NS
#   AUTHORIZED_KEYS=FILE libvirtd-netns.sh start NS DIR IP RUNNER
#                                                a veth into RUNNER's bridge with IP/24,
#                                                the default route via 10.77.0.1, and
#                                                sshd on IP:22 (host key DIR/ssh/host_key.pub)
#
# Needs root, and Debian's libvirt-daemon-system, dnsmasq-base and
# openssh-server. libvirtd, virtlogd and sshd run in a mount namespace (from
# `ip netns exec`) where DIR's folders are bind-mounted over /etc/libvirt,
# /run/libvirt, /var/lib/libvirt, /var/cache/libvirt and /var/log/libvirt, so
# their sockets, state and definitions are private, and `qemu+ssh://` finds
# the private socket where libvirt looks by default. qemu.conf is Debian's
# own (qemu runs as libvirt-qemu, the DAC security driver on) but for two
# workarounds this machine needs (DESIGN.md): no mount namespaces for
# domains, and /dev/kvm hidden behind an empty read-only file (with no udev
# here libvirt would otherwise find KVM half-usable and re-probe qemu on
# every call). The socket is Debian's way: read-write for the group
# `libvirt`, so an ordinary user in it can use the daemon. DIR must exist and
# belong to root (callers make it with mktemp -d; it is opened to 0711 so
# that group can reach the socket); keep it short: socket paths are limited
# to 108 bytes.
set -eu
action=$1 ns=$2
dir=${3:-}

runner() {
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    ip -n "$ns" link add tb-br type bridge
    # Every port gets the networks' multicast (no IGMP querier here).
    ip -n "$ns" link set tb-br type bridge mcast_snooping 0
    ip -n "$ns" addr add 10.77.0.1/24 dev tb-br
    ip -n "$ns" link set tb-br up
}

stop_runner() {
    ip netns del "$ns" 2>/dev/null || true
}

# A veth from NS into the runner's bridge, NS at $1/24.
link_to_runner() {
    ip=$1 runner=$2
    here=tbv$$h there=tbv$$r
    ip link add "$here" type veth peer name "$there"
    ip link set "$here" netns "$ns"
    ip link set "$there" netns "$runner"
    ip -n "$runner" link set "$there" master tb-br up
    ip -n "$ns" addr add "$ip/24" dev "$here"
    ip -n "$ns" link set "$here" up
    ip -n "$ns" route add default via 10.77.0.1
}

start() {
    ip=${4:-} runner=${5:-}
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    mkdir -p "$dir"/run "$dir"/lib/dnsmasq "$dir"/cache "$dir"/log "$dir"/etc "$dir"/ssh
    chmod 0711 "$dir"
    cp -a /etc/libvirt/. "$dir"/etc/
    rm -f "$dir"/etc/qemu/networks/default.xml "$dir"/etc/qemu/networks/autostart/*
    cat > "$dir"/etc/libvirtd.conf <<CONF
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
    sshd=
    if [ -n "$ip" ]; then
        link_to_runner "$ip" "$runner"
        ssh-keygen -q -t ed25519 -N '' -C "libvirt-host-$ip" -f "$dir"/ssh/host_key
        cp "${AUTHORIZED_KEYS:?AUTHORIZED_KEYS names the key sshd lets in}" "$dir"/ssh/authorized_keys
        sshd=$ip
    fi
    ip netns exec "$ns" sh -c '
        set -eu
        dir=$1 sshd=$2
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
        if [ -n "$sshd" ]; then
            mkdir -p /run/sshd
            /usr/sbin/sshd -f /dev/null -o ListenAddress="$sshd" \
                -o HostKey="$dir/ssh/host_key" -o AuthorizedKeysFile="$dir/ssh/authorized_keys" \
                -o StrictModes=no -o PidFile="$dir/sshd.pid" -o UsePAM=no \
                -o PermitRootLogin=prohibit-password
        fi
    ' sh "$dir" "$sshd"
    tries=0
    while [ ! -S "$dir/run/libvirt-sock" ]; do
        tries=$((tries + 1))
        if [ "$tries" -gt 200 ]; then
            echo "libvirtd did not open $dir/run/libvirt-sock; its log:" >&2
            tail -n 20 "$dir/log/libvirtd.log" >&2 || true
            exit 1
        fi
        sleep 0.05
    done
    echo "qemu:///system?socket=$dir/run/libvirt-sock"
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
    uri="qemu:///system?socket=$dir/run/libvirt-sock"
    if [ -S "$dir/run/libvirt-sock" ]; then
        for domain in $(virsh -q -c "$uri" list --name 2>/dev/null); do
            virsh -q -c "$uri" destroy "$domain" >/dev/null 2>&1 || true
        done
    fi
    stop_daemon "$dir/sshd.pid"
    stop_daemon "$dir/libvirtd.pid"
    stop_daemon "$dir/virtlogd.pid"
    ip netns del "$ns" 2>/dev/null || true
}

case $action in
    start) start "$@" ;;
    stop) stop ;;
    runner) runner ;;
    stop-runner) stop_runner ;;
    *) echo "usage: $0 start|stop|runner|stop-runner NS [DIR [IP RUNNER]]" >&2; exit 2 ;;
esac
