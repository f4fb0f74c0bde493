#!/usr/bin/env bash
# Builds target/guest/rootfs.ext4: the same tree as the initramfs (vmlab's
# init at /init and /sbin/init, busybox) as an ext4 image made with
# `mkfs.ext4 -d`, so no loop mount or privileges beyond file ownership are
# needed. Boot it with: vmlab run --kernel target/guest/vmlinux --disk path=target/guest/rootfs.ext4
# Idempotent: rebuilt when the tree changed or the image was modified since
# it was built (a guest that booted it read-write, or was killed without a
# clean shutdown, may have left its journal dirty).
set -euo pipefail
log() { echo "build-rootfs: $*"; }
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="$repo/target/guest/rootfs.ext4"
size_mib="${VMLAB_ROOTFS_MIB:-64}"

# shellcheck source=scripts/lib/apt.sh
. "$repo/scripts/lib/apt.sh"
apt_install_missing e2fsprogs

tree="$repo/target/guest/rootfs-tree"
"$repo/scripts/build-initramfs.sh" --tree "$tree" >/dev/null
# The workload program (guest/workload) goes on the disk only: the
# initramfs stays small because the guest kernel unpacks it byte by byte.
if [ -f "$repo/guest/workload/Cargo.toml" ]; then
  (cd "$repo" && RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build -q -p vmlab-workload --release --target x86_64-unknown-linux-gnu)
  install -D -m 0755 "${CARGO_TARGET_DIR:-$repo/target}/x86_64-unknown-linux-gnu/release/vmlab-workload" \
    "$tree/usr/bin/vmlab-workload"
  strip --strip-all "$tree/usr/bin/vmlab-workload" 2>/dev/null || true
  touch -h -d @0 "$tree/usr/bin/vmlab-workload" "$tree/usr/bin"
fi
# Content, not mtimes: the tree's mtimes are fixed for reproducibility.
stamp="$(cd "$tree" && { find . -printf '%p %m %U %G %l\n'; find . -type f -exec sha256sum {} +; } \
  | LC_ALL=C sort | sha256sum | cut -c1-16)-$size_mib-4k-nojournal"
image_state() { stat -c '%Y.%s' "$out" 2>/dev/null || echo none; }
if [ -f "$out" ] && [ "$(cat "$out.stamp" 2>/dev/null)" = "$stamp $(image_state)" ]; then
  log "$out is up to date"
  exit 0
fi
tmp="$out.tmp"
rm -f "$tmp"
truncate -s "${size_mib}M" "$tmp"
# No lazy initialization: the guest kernel would otherwise spend its first
# seconds zeroing inode tables and the journal in the background.
# 4 KiB blocks (one block group), no journal and no metadata checksums: the
# guest kernel's mount then reads and checks one group descriptor instead
# of eight, without a journal to load, which saved about 0.4 s of boot on
# the nested-KVM host (docs/BOOT.md). The image is the read-only root of
# the demo and the tests; build-rootfs.sh rebuilds it when it was modified.
mkfs.ext4 -q -F -L vmlab-root -d "$tree" -b 4096 -O ^has_journal,^metadata_csum \
  -E lazy_itable_init=0,lazy_journal_init=0 "$tmp"
mv "$tmp" "$out"
echo "$stamp $(image_state)" > "$out.stamp"
log "$out: $(du -h --apparent-size "$out" | cut -f1) image, $(du -sh "$tree" | cut -f1) of files"
