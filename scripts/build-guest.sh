#!/usr/bin/env bash
# Builds everything a vmlab guest needs into target/guest/: the kernel
# (vmlinux, bzImage; cached outside the clone, keyed by its inputs) and the
# initramfs with vmlab's init and busybox, the root disk, and the sample
# container image (OCI layout and docker save archive), and the teaching
# guest of docs/LABS.md (guest/teach), and virtiofsd (the backend of
# `--volume`; cached like the kernel). Idempotent.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$repo/scripts/build-guest-kernel.sh"
"$repo/scripts/build-initramfs.sh"
"$repo/scripts/build-rootfs.sh"
"$repo/scripts/build-sample-image.sh"
"$repo/scripts/build-teach-guest.sh"
"$repo/scripts/build-virtiofsd.sh"
