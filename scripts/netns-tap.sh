#!/usr/bin/env bash
# The host side of a vmlab network, inside a network namespace of its own:
# nothing touches the host's own interfaces, addresses or routes.
#
#   scripts/netns-tap.sh up NS [TAP] [HOST_CIDR]
#       creates namespace NS (if missing) with loopback up, and in it the
#       TAP device TAP (default vmtap0) with address HOST_CIDR (default
#       10.0.0.1/24), up; the /24 route to the guests comes with the address.
#   scripts/netns-tap.sh bridge NS BRIDGE HOST_CIDR TAP...
#       creates namespace NS, a bridge BRIDGE with HOST_CIDR, and TAPs
#       enslaved to it (several guests on one segment).
#   scripts/netns-tap.sh down NS
#       deletes the namespace and every device in it.
#
# Then run vmlab inside the namespace, e.g.:
#   ip netns exec NS vmlab run --kernel target/guest/vmlinux \
#     --disk path=target/guest/rootfs.ext4,readonly=on --net tap=vmtap0 \
#     --cmdline "ip=10.0.0.2::10.0.0.1:255.255.255.0::eth0:off" -- ping -c 3 10.0.0.1
# Needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN) and iproute2.
set -euo pipefail

usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
[ $# -ge 2 ] || usage
cmd=$1 ns=$2
shift 2

ensure_ns() {
  if ! ip netns list | grep -qw "^$ns"; then
    ip netns add "$ns"
  fi
  ip -n "$ns" link set lo up
}

add_tap() {
  ip -n "$ns" tuntap add dev "$1" mode tap
  ip -n "$ns" link set "$1" up
}

case "$cmd" in
  up)
    tap=${1:-vmtap0} cidr=${2:-10.0.0.1/24}
    ensure_ns
    add_tap "$tap"
    ip -n "$ns" addr add "$cidr" dev "$tap"
    echo "netns $ns: tap $tap with $cidr"
    ;;
  bridge)
    [ $# -ge 3 ] || usage
    br=$1 cidr=$2
    shift 2
    ensure_ns
    ip -n "$ns" link add "$br" type bridge
    ip -n "$ns" addr add "$cidr" dev "$br"
    ip -n "$ns" link set "$br" up
    for tap in "$@"; do
      add_tap "$tap"
      ip -n "$ns" link set "$tap" master "$br"
    done
    echo "netns $ns: bridge $br with $cidr, taps $*"
    ;;
  down)
    ip netns delete "$ns"
    ;;
  *)
    usage
    ;;
esac
