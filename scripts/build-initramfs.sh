#!/usr/bin/env bash
# Builds the vmlab guest's root filesystem content: vmlab-init (static) as
# /init and /sbin/init, busybox (static) with a symlink per applet, and a
# minimal /etc. Produces, from one staging tree:
#   target/guest/initramfs.cpio.gz   newc, gzip -9 (what the VMM loads)
#   target/guest/initramfs.cpio      newc, uncompressed (no decompression at
#                                    boot: may boot faster on slow guests)
# All entries are owned by root with a fixed mtime (SOURCE_DATE_EPOCH, 0 by
# default), in sorted order, so the same inputs give the same archives.
#
# Usage:
#   scripts/build-initramfs.sh              build both archives
#   scripts/build-initramfs.sh --tree DIR   only build the tree, into DIR
#                                           (e.g. for an ext4 root filesystem;
#                                           a previous tree there is replaced)
# When sourced, it only defines the functions (build_init, build_tree, ...).
#
# Environment:
#   SOURCE_DATE_EPOCH   mtime of every entry (default 0)
#   CARGO               cargo to use (default: cargo)
# Idempotent: everything is rebuilt into a fresh staging directory and the
# results are replaced atomically.
set -euo pipefail

log() { echo "build-initramfs: $*"; }
die() { echo "build-initramfs: ERROR: $*" >&2; exit 1; }

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/lib/apt.sh
. "$REPO/scripts/lib/apt.sh"
RUST_TARGET=x86_64-unknown-linux-gnu
OUT_DIR="$REPO/target/guest"
INIT_BIN="${CARGO_TARGET_DIR:-$REPO/target}/$RUST_TARGET/release/vmlab-init"
BUSYBOX=/bin/busybox
EPOCH="${SOURCE_DATE_EPOCH:-0}"
STAGE=""

# The Debian packages the build needs.
ensure_packages() {
  apt_install_missing busybox-static cpio file gzip || die "cannot install the build's packages"
}

# Builds vmlab-init as a static executable and checks that it is static
# (a dynamic one would not start: the initramfs has no libc).
build_init() {
  log "building vmlab-init (static, release, $RUST_TARGET)"
  (cd "$REPO" && RUSTFLAGS="-C target-feature=+crt-static" \
    "${CARGO:-cargo}" build -p vmlab-init --release --target "$RUST_TARGET")
  [ -x "$INIT_BIN" ] || die "$INIT_BIN was not built"
  local desc
  desc="$(file -b "$INIT_BIN")"
  case "$desc" in
    *"statically linked"* | *"static-pie linked"*) ;;
    *) die "$INIT_BIN is not static: $desc" ;;
  esac
  if ldd "$INIT_BIN" >/dev/null 2>&1 && ! ldd "$INIT_BIN" 2>&1 | grep -q "statically linked"; then
    die "$INIT_BIN has dynamic dependencies: $(ldd "$INIT_BIN" 2>&1 | tr '\n' ' ')"
  fi
  log "vmlab-init: $(stat -c %s "$INIT_BIN") bytes, ${desc%%,*}, static"
}

# Fills DIR (created, must be empty or absent) with the guest's root
# filesystem content. Needs build_init to have run.
build_tree() {
  local root="$1"
  [ -x "$INIT_BIN" ] || die "$INIT_BIN missing (run build_init first)"
  [ -x "$BUSYBOX" ] || die "$BUSYBOX missing (package busybox-static)"
  case "$(file -b "$BUSYBOX")" in
    *"statically linked"* | *"static-pie linked"*) ;;
    *) die "$BUSYBOX is not static; install busybox-static" ;;
  esac
  if [ -e "$root" ] && [ -n "$(ls -A "$root")" ]; then
    die "tree directory $root is not empty"
  fi
  log "assembling tree in $root"
  mkdir -p "$root"
  (
    cd "$root"
    mkdir -p bin sbin usr/bin usr/sbin etc dev proc sys tmp run root
    chmod 0755 . bin sbin usr usr/bin usr/sbin etc dev proc sys run
    chmod 1777 tmp
    chmod 0700 root

    # init: /init for the initramfs, /sbin/init for a disk root (the
    # kernel's default). Stripped: less to load and page in at boot.
    install -m 0755 "$INIT_BIN" init
    if command -v strip >/dev/null; then strip --strip-all init; fi
    ln -s /init sbin/init

    install -m 0755 "$BUSYBOX" bin/busybox
    local applet n=0
    while IFS= read -r applet; do
      applet="${applet#/}"
      case "$applet" in
        "" | bin/busybox | sbin/init | init | linuxrc) continue ;;
      esac
      mkdir -p "$(dirname "$applet")"
      [ -e "$applet" ] || [ -L "$applet" ] || { ln -s /bin/busybox "$applet"; n=$((n + 1)); }
    done < <("$BUSYBOX" --list-full | LC_ALL=C sort)
    [ -L bin/sh ] || die "busybox has no sh applet"
    log "busybox: $n applet symlinks"

    cat >etc/passwd <<'EOF'
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
EOF
    cat >etc/group <<'EOF'
root:x:0:
tty:x:5:
nogroup:x:65534:
EOF
    echo vmlab >etc/hostname
    cat >etc/hosts <<'EOF'
127.0.0.1	localhost
127.0.1.1	vmlab
::1	localhost
EOF
    chmod 0644 etc/passwd etc/group etc/hostname etc/hosts

    # The kernel opens /dev/console for init before init mounts devtmpfs;
    # the node must exist in the root filesystem itself (the kernel's
    # built-in initramfs has one, but a disk root does not).
    if ! mknod -m 0600 dev/console c 5 1 2>/dev/null; then
      log "warning: cannot create dev/console (not root?); init falls back to devtmpfs's"
    fi
  )
  # Reproducible metadata: fixed mtimes (owner is set at archive time).
  find "$root" -exec touch -h -d "@$EPOCH" {} +
}

# Writes the newc archive of tree DIR to FILE (uncompressed), entries sorted,
# owned by root, inode numbers renumbered.
make_cpio() {
  local root="$1" out="$2"
  (cd "$root" && find . -mindepth 1 -print0 | LC_ALL=C sort -z \
    | cpio --quiet --null --create --format=newc --owner=0:0 --reproducible) >"$out"
}

main() {
  local tree_dir=""
  while [ $# -gt 0 ]; do
    case "$1" in
      --tree) [ $# -ge 2 ] || die "--tree needs a directory"; tree_dir="$2"; shift 2 ;;
      --tree=*) tree_dir="${1#--tree=}"; shift ;;
      -h | --help) sed -n '2,22p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; return 0 ;;
      *) die "unknown argument: $1 (see --help)" ;;
    esac
  done

  ensure_packages
  build_init

  if [ -n "$tree_dir" ]; then
    tree_dir="$(realpath -m "$tree_dir")"
    [ "$tree_dir" != / ] || die "refusing to build the tree in /"
    # Rebuilt from scratch next to DIR, then swapped in. An existing DIR is
    # replaced only if it is empty or a tree made by this script.
    if [ -e "$tree_dir" ] && [ -n "$(ls -A "$tree_dir")" ] \
      && ! { [ -e "$tree_dir/init" ] && [ -e "$tree_dir/bin/busybox" ]; }; then
      die "$tree_dir exists and is not a tree made by this script"
    fi
    STAGE="$tree_dir.tmp.$$"
    trap 'rm -rf "$STAGE"' EXIT
    rm -rf "$STAGE"
    build_tree "$STAGE"
    rm -rf "$tree_dir"
    mv -T "$STAGE" "$tree_dir"
    log "tree ready: $tree_dir"
    return 0
  fi

  mkdir -p "$OUT_DIR"
  STAGE="$(mktemp -d "$OUT_DIR/.initramfs-stage.XXXXXX")"
  trap 'rm -rf "$STAGE"' EXIT
  local stage="$STAGE"
  build_tree "$stage/root"
  make_cpio "$stage/root" "$stage/initramfs.cpio"
  gzip -9 -n -c "$stage/initramfs.cpio" >"$stage/initramfs.cpio.gz"
  mv -f "$stage/initramfs.cpio" "$OUT_DIR/initramfs.cpio"
  mv -f "$stage/initramfs.cpio.gz" "$OUT_DIR/initramfs.cpio.gz"
  log "$OUT_DIR/initramfs.cpio: $(stat -c %s "$OUT_DIR/initramfs.cpio") bytes"
  log "$OUT_DIR/initramfs.cpio.gz: $(stat -c %s "$OUT_DIR/initramfs.cpio.gz") bytes"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  main "$@"
fi
