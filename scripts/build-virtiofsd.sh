#!/usr/bin/env bash
# Installs virtiofsd, the vhost-user-fs backend of `vmlab run --volume`
# (issue 15), from the crate registry: `cargo install virtiofsd --locked`
# of a pinned version, with the Debian packages it links against
# (libcap-ng-dev, libseccomp-dev).
#
# The binary is cached under ${VMLAB_CACHE:-$HOME/.cache/vmlab}/virtiofsd/<key>/,
# key = sha256(version, rustc version, this script), and copied to
# <repo>/target/guest/virtiofsd, where the tests and the demo point
# VMLAB_VIRTIOFSD. About 3 minutes cold on 2 cores; a cache hit takes well
# under a second. Idempotent.
set -euo pipefail
VERSION=1.14.0
log() { echo "build-virtiofsd: $*"; }
die() { echo "build-virtiofsd: ERROR: $*" >&2; exit 1; }

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
# shellcheck source=scripts/lib/apt.sh
. "$repo/scripts/lib/apt.sh"
CACHE_ROOT="${VMLAB_CACHE:-$HOME/.cache/vmlab}"
command -v cargo >/dev/null || die "cargo is missing"
KEY="$(
  { echo "virtiofsd $VERSION"; rustc -V; sha256sum "scripts/build-virtiofsd.sh"; } \
    | sha256sum | cut -c1-64
)"
OUT="$CACHE_ROOT/virtiofsd/$KEY"
TARGET="$repo/target/guest/virtiofsd"
mkdir -p "$CACHE_ROOT/virtiofsd" "$(dirname "$TARGET")"

if [ ! -x "$OUT/bin/virtiofsd" ]; then
  exec 9>"$CACHE_ROOT/virtiofsd/.lock"
  flock 9
  if [ ! -x "$OUT/bin/virtiofsd" ]; then
    apt_install_missing libcap-ng-dev libseccomp-dev pkg-config \
      || die "cannot install libcap-ng-dev, libseccomp-dev"
    log "cargo install virtiofsd $VERSION (a few minutes)"
    tmp="$CACHE_ROOT/virtiofsd/.tmp-$KEY-$$"
    rm -rf "$tmp"
    cargo install virtiofsd --version "=$VERSION" --locked --root "$tmp" --quiet \
      || die "cargo install virtiofsd failed"
    "$tmp/bin/virtiofsd" --version >/dev/null || die "the built virtiofsd does not run"
    rm -rf "$OUT"
    mv -T "$tmp" "$OUT"
    log "stored in cache: $OUT"
  fi
else
  log "cache hit: $OUT"
fi
cp -f "$OUT/bin/virtiofsd" "$TARGET.tmp.$$"
mv -f "$TARGET.tmp.$$" "$TARGET"
log "$("$TARGET" --version) -> $TARGET"
