#!/usr/bin/env bash
# Build vmlab's guest kernel: Debian's linux-source-6.1 + guest/kernel/patches
# + `make tinyconfig` + guest/kernel/config.fragment, built into vmlinux
# (booted directly, PVH / 64-bit entry) and an LZ4 bzImage.
#
# Results are cached under ${VMLAB_CACHE:-$HOME/.cache/vmlab}/kernel/<key>/,
# key = sha256(linux-source-6.1 package version, config.fragment, every patch,
# this script). The result is copied to <repo>/target/guest/:
#   vmlinux  bzImage  config  kernel-release
# See docs/GUEST-KERNEL.md. Idempotent; a cache hit takes well under a second.
#
# Environment:
#   VMLAB_CACHE             cache root (default $HOME/.cache/vmlab)
#   VMLAB_KERNEL_JOBS       make -j value (default: nproc)
#   VMLAB_KEEP_KERNEL_TREE  1 = keep the build tree after a successful build
set -euo pipefail

log() { echo "build-guest-kernel: $*"; }
die() { echo "build-guest-kernel: ERROR: $*" >&2; exit 1; }

SCRIPT_PATH="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
REPO="$(cd "$(dirname "$SCRIPT_PATH")/.." && pwd)"
FRAGMENT_REL=guest/kernel/config.fragment
PATCH_DIR_REL=guest/kernel/patches
SCRIPT_REL=scripts/$(basename "$SCRIPT_PATH")
SRC_PKG=linux-source-6.1
SRC_TARBALL=/usr/src/linux-source-6.1.tar.xz
CACHE_ROOT="${VMLAB_CACHE:-$HOME/.cache/vmlab}"
KCACHE="$CACHE_ROOT/kernel"
TARGET="$REPO/target/guest"
JOBS="${VMLAB_KERNEL_JOBS:-$(nproc)}"

cd "$REPO"
[ -f "$FRAGMENT_REL" ] || die "missing $REPO/$FRAGMENT_REL"

# ---------------------------------------------------------------- packages
# Debian package -> why. Installed only when missing; `apt-get update` once.
PACKAGES=(
  "$SRC_PKG"        # the kernel source tarball
  build-essential   # gcc, make, binutils (strip), libc headers
  flex bison bc     # kconfig and kernel build
  libelf-dev        # objtool
  lz4               # KERNEL_LZ4 bzImage compression
  cpio              # kheaders/initramfs tooling
  xz-utils          # unpacking the source tarball
  patch             # applying guest/kernel/patches
  perl              # kernel build scripts
  util-linux        # flock
)
missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if [ "${#missing[@]}" -gt 0 ]; then
  SUDO=()
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || die "need root (or sudo) to install: ${missing[*]}"
    SUDO=(sudo)
  fi
  log "installing missing packages: ${missing[*]}"
  "${SUDO[@]}" apt-get update -q
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
[ -f "$SRC_TARBALL" ] || die "$SRC_TARBALL not found after installing $SRC_PKG"

# --------------------------------------------------------------- cache key
SRC_VERSION="$(dpkg-query -W -f='${Version}' "$SRC_PKG")"
mapfile -t PATCHES < <(find "$PATCH_DIR_REL" -maxdepth 1 -name '*.patch' -type f 2>/dev/null | LC_ALL=C sort)
KEY="$(
  {
    echo "$SRC_PKG $SRC_VERSION"
    sha256sum "$FRAGMENT_REL" "${PATCHES[@]}" "$SCRIPT_REL"
  } | sha256sum | cut -c1-64
)"
OUT="$KCACHE/$KEY"
ARTIFACTS=(vmlinux bzImage config kernel-release)
log "$SRC_PKG $SRC_VERSION, ${#PATCHES[@]} patch(es), cache key $KEY"

have_cached() {
  local f
  for f in "${ARTIFACTS[@]}"; do [ -s "$OUT/$f" ] || return 1; done
}

install_to_target() {
  mkdir -p "$TARGET"
  local f
  for f in "${ARTIFACTS[@]}"; do
    cp -f "$OUT/$f" "$TARGET/$f.tmp.$$"
    mv -f "$TARGET/$f.tmp.$$" "$TARGET/$f"
  done
  log "kernel $(cat "$TARGET/kernel-release") -> $TARGET/{$(IFS=,; echo "${ARTIFACTS[*]}")}"
}

mkdir -p "$KCACHE"
if have_cached; then
  log "cache hit: $OUT"
  install_to_target
  exit 0
fi

# One build at a time per cache (a second caller waits, then hits the cache).
exec 9>"$KCACHE/.lock"
log "taking the build lock $KCACHE/.lock"
flock 9
if have_cached; then
  log "cache hit (built by another process): $OUT"
  install_to_target
  exit 0
fi

# ------------------------------------------------------ pristine source tree
PRISTINE="$KCACHE/src/$SRC_PKG-$SRC_VERSION"
if [ ! -f "$PRISTINE/.vmlab-pristine" ]; then
  log "extracting $SRC_TARBALL -> $PRISTINE"
  rm -rf "$PRISTINE" "$PRISTINE.tmp"
  mkdir -p "$PRISTINE.tmp"
  tar -xf "$SRC_TARBALL" -C "$PRISTINE.tmp" --strip-components=1
  [ -f "$PRISTINE.tmp/Makefile" ] || die "unexpected layout of $SRC_TARBALL"
  touch "$PRISTINE.tmp/.vmlab-pristine"
  mv -T "$PRISTINE.tmp" "$PRISTINE"
else
  log "reusing pristine source tree $PRISTINE"
fi

# -------------------------------------------------------------- build tree
BUILD="$KCACHE/build/$KEY"
# Trees of earlier (failed or kept) builds are stale now: ~1.5 GB each.
rm -rf "$KCACHE/build" "$KCACHE"/.tmp-*
mkdir -p "$KCACHE/build"
log "copying source tree -> $BUILD"
cp -a "$PRISTINE" "$BUILD"
rm -f "$BUILD/.vmlab-pristine"
cd "$BUILD"

for p in "${PATCHES[@]}"; do
  log "applying $(basename "$p")"
  patch -p1 --batch --forward --no-backup-if-mismatch -s < "$REPO/$p" \
    || die "patch $p does not apply to $SRC_PKG $SRC_VERSION"
done
if find . -name '*.rej' -print -quit | grep -q .; then
  die "patch rejects left in $BUILD"
fi

# ----------------------------------------------------------------- config
export KBUILD_BUILD_USER=vmlab KBUILD_BUILD_HOST=vmlab \
  KBUILD_BUILD_TIMESTAMP="$SRC_PKG $SRC_VERSION"
log "configuring: tinyconfig + $FRAGMENT_REL"
make -s tinyconfig >/dev/null
./scripts/kconfig/merge_config.sh -m .config "$REPO/$FRAGMENT_REL" >merge_config.log 2>&1 \
  || { cat merge_config.log >&2; die "merge_config.sh failed"; }
make -s olddefconfig

# Every setting of the fragment must have survived olddefconfig: `=y` (and
# any other value) exactly, `# ... is not set` as not enabled.
bad=0
while IFS= read -r line; do
  case "$line" in
    CONFIG_*=*)
      if ! grep -qxF -- "$line" .config; then
        got="$(grep -E "^(# )?${line%%=*}[= ]" .config || echo "${line%%=*} absent")"
        echo "build-guest-kernel: CONFIG MISMATCH: fragment wants '$line', .config has '$got'" >&2
        bad=1
      fi ;;
    "# CONFIG_"*" is not set")
      opt="${line#\# }"; opt="${opt%% *}"
      if grep -qE "^${opt}=[ym]$" .config; then
        echo "build-guest-kernel: CONFIG MISMATCH: fragment disables $opt, .config has '$(grep -E "^${opt}=" .config)'" >&2
        bad=1
      fi ;;
  esac
done < "$REPO/$FRAGMENT_REL"
[ "$bad" -eq 0 ] || die "config fragment not honoured (dependencies missing?); see above"
log "config verified: $(grep -c '^CONFIG_.*=y' .config) options =y"

# ------------------------------------------------------------------ build
log "make -j$JOBS vmlinux bzImage (a few minutes)"
start=$(date +%s)
make -j"$JOBS" vmlinux bzImage >build.log 2>&1 \
  || { tail -n 60 build.log >&2; die "kernel build failed (log: $BUILD/build.log)"; }
if grep -E ' warning: ' build.log >&2; then
  log "note: compiler warnings above (build.log)"
fi
log "built in $(( $(date +%s) - start )) s"

TMP_OUT="$KCACHE/.tmp-$KEY-$$"
rm -rf "$TMP_OUT"
mkdir -p "$TMP_OUT"
# vmlinux: no DWARF (DEBUG_INFO_NONE); keep the symbol table (useful to the
# VMM's diagnostics and to addr2line-free debugging), drop anything else.
strip --strip-debug -o "$TMP_OUT/vmlinux" vmlinux
cp arch/x86/boot/bzImage "$TMP_OUT/bzImage"
cp .config "$TMP_OUT/config"
make -s kernelrelease > "$TMP_OUT/kernel-release"
cp System.map "$TMP_OUT/System.map"
rm -rf "$OUT"
mv -T "$TMP_OUT" "$OUT"
log "stored in cache: $OUT"

cd "$REPO"
if [ "${VMLAB_KEEP_KERNEL_TREE:-0}" != 1 ]; then
  rm -rf "$BUILD"
fi
install_to_target
