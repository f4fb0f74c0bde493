#!/usr/bin/env bash
# Builds everything a vmlab guest needs into target/guest/: the kernel
# (vmlinux, bzImage; cached outside the clone, keyed by its inputs) and the
# initramfs with vmlab's init and busybox. Idempotent.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$repo/scripts/build-guest-kernel.sh"
"$repo/scripts/build-initramfs.sh"
"$repo/scripts/build-rootfs.sh"
