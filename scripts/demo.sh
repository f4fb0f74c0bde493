#!/usr/bin/env bash
# The README's first command: set everything up on a fresh machine and boot
# a demo micro-VM that runs a shell command and prints its output.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
scripts/build-guest.sh
echo "demo: building vmlab (release)"
cargo build --release --quiet --bin vmlab
echo "demo: booting a micro-VM (about a minute on a nested-KVM host, well under a second on hardware KVM)"
exec target/release/vmlab run \
  --kernel target/guest/vmlinux \
  --initrd target/guest/initramfs.cpio \
  --memory 256M --cpus 2 --boot-time \
  -- sh -c 'echo "hello from the vmlab guest"; echo "kernel: $(uname -r) (host: '"$(uname -r)"')"; echo "vCPUs: $(nproc)"; grep MemTotal /proc/meminfo'
