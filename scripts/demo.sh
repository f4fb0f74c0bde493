#!/usr/bin/env bash
# The README's first command: set everything up on a fresh machine, boot a
# demo micro-VM that runs a shell command and prints its output, then
# compare the same workload on the host, in a container and in a micro-VM
# (`vmlab compare`; report in target/compare.{md,json,svg}).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
scripts/build-guest.sh
# runc runs the container side of the comparison; ip (iproute2) makes its
# private network namespaces.
# shellcheck source=scripts/lib/apt.sh
. "$repo/scripts/lib/apt.sh"
apt_install_missing runc iproute2 || { echo "demo: cannot install runc, iproute2" >&2; exit 1; }
# The container engines that run vmlab as an OCI runtime (README: "vmlab as
# an OCI runtime"); installed only, not started (scripts/engines.sh does that).
apt_install_missing docker.io docker-compose podman containernetworking-plugins \
  || { echo "demo: cannot install docker.io, docker-compose, podman, containernetworking-plugins" >&2; exit 1; }
echo "demo: building vmlab (release)"
cargo build --release --quiet --bin vmlab
echo "demo: booting a micro-VM (about a minute on a nested-KVM host, well under a second on hardware KVM)"
target/release/vmlab run \
  --kernel target/guest/vmlinux \
  --initrd target/guest/initramfs.cpio \
  --memory 256M --cpus 2 --boot-time \
  -- sh -c 'echo "hello from the vmlab guest"; echo "kernel: $(uname -r) (host: '"$(uname -r)"')"; echo "vCPUs: $(nproc)"; grep MemTotal /proc/meminfo'
echo "demo: the same docker run line with runc and with --runtime vmlab (each container a micro-VM)"
if ! scripts/engines.sh status >/dev/null 2>&1; then
  trap 'scripts/engines.sh stop >/dev/null 2>&1 || true' EXIT
fi
scripts/engines.sh start | tail -1
scripts/install-runtime.sh --binary target/release/vmlab --reload | tail -1
scripts/build-oci-images.sh | tail -1
docker=(env DOCKER_HOST=unix:///var/run/docker.sock /usr/bin/docker)
for rt in runc vmlab; do
  start=$(date +%s.%N)
  out=$("${docker[@]}" run --rm --runtime "$rt" vmlab-busybox:test sh -c 'echo "kernel $(uname -r), $(nproc) CPU(s)"')
  secs=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  echo "demo: docker run --runtime $rt: $out (${secs} s)"
done
echo "demo: the same workload on the host, in a container and in a micro-VM (vmlab compare; minutes on a nested-KVM host, seconds on hardware KVM)"
target/release/vmlab compare \
  --image target/guest/sample-image \
  --kernel target/guest/vmlinux \
  --repeat 1 \
  --json target/compare.json --markdown target/compare.md --chart target/compare.svg
