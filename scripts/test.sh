#!/usr/bin/env bash
# The README's second command: set up (guest kernel, initramfs) and run
# every check: formatting, clippy, unit tests, the integration tests that
# boot real guests on /dev/kvm, and the same tests on emulated SVM hardware.
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
# The container engines the OCI-runtime tests drive vmlab-runtime from
# (installed, not started: scripts/engines.sh starts and stops them).
apt_install_missing docker.io docker-compose podman containernetworking-plugins iproute2 curl bsdutils \
  || { echo "test: cannot install docker.io, docker-compose, podman, containernetworking-plugins" >&2; exit 1; }
# tests/oci.rs starts containerd and dockerd (scripts/engines.sh start) once
# for its binary and leaves them up; stop them at the end if they were not
# running before (a developer's own engines stay).
if ! scripts/engines.sh status >/dev/null 2>&1; then
  trap 'scripts/engines.sh stop >/dev/null 2>&1 || echo "test: scripts/engines.sh stop failed" >&2' EXIT
fi
echo "test: cargo fmt --check"
cargo fmt --all -- --check
echo "test: cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "test: cargo test"
cargo test --workspace --no-fail-fast 2>&1
# The fuzz targets (fuzz/, nightly and cargo-fuzz), 30 s each.
echo "test: scripts/fuzz.sh 30"
scripts/fuzz.sh 30
# The hardware-style lane: the boot, block, net and image tests again, on
# emulated AMD-V (QEMU TCG with nested SVM), where vmlab must apply no PVM
# workaround (scripts/test-svm.sh; about 3 min warm on an idle machine,
# ~50 s more cold; docs/HOST.md).
if command -v qemu-system-x86_64 >/dev/null; then
  echo "test: scripts/test-svm.sh (nested SVM under QEMU TCG)"
  scripts/test-svm.sh
else
  echo "test: skipped scripts/test-svm.sh: qemu-system-x86_64 is missing"
fi
