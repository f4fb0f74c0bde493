#!/usr/bin/env bash
# The README's second command: set up (guest kernel, initramfs) and run
# every check: formatting, clippy, unit tests and the integration tests
# that boot real guests on /dev/kvm.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
[ -e /dev/kvm ] || { echo "test: /dev/kvm is missing: vmlab's tests need KVM" >&2; exit 1; }
scripts/build-guest.sh
# runc: the OCI runtime tests/container.rs runs `vmlab container` with.
# shellcheck source=scripts/lib/apt.sh
. "$repo/scripts/lib/apt.sh"
apt_install_missing runc || { echo "test: cannot install runc" >&2; exit 1; }
# ip (network namespaces, TAP devices, bridges) and ping: tests/net.rs.
apt_install_missing iproute2 iputils-ping || { echo "test: cannot install iproute2, iputils-ping" >&2; exit 1; }
# QEMU: the peer tests/bench.rs runs scripts/bench.py against (it reports
# the QEMU figures as "not installed" without it).
apt_install_missing qemu-system-x86 || { echo "test: cannot install qemu-system-x86" >&2; exit 1; }
echo "test: cargo fmt --check"
cargo fmt --all -- --check
echo "test: cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "test: cargo test"
cargo test --workspace --no-fail-fast 2>&1
