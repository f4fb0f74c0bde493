#!/usr/bin/env bash
# Builds vmlab's sample container image, without Docker, from Debian's
# busybox-static and the project's workload program (guest/workload, a
# static Rust binary):
#   target/guest/sample-image/      OCI image layout (layer 1 tar+gzip,
#                                   layer 2 plain tar)
#   target/guest/sample-image.tar   the same image as a `docker save` archive
# Same inputs, same bytes (scripts/sample_image.py says what is in it).
# Run it with:  vmlab run --kernel target/guest/vmlinux --image target/guest/sample-image
# Idempotent: both outputs are rebuilt and swapped in atomically.
set -euo pipefail
log() { echo "build-sample-image: $*"; }
die() { echo "build-sample-image: ERROR: $*" >&2; exit 1; }
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="$repo/target/guest"
busybox=/bin/busybox

# shellcheck source=scripts/lib/apt.sh
. "$repo/scripts/lib/apt.sh"
apt_install_missing busybox-static file python3 || die "cannot install the build's packages"

is_static() {
  case "$(file -b "$1")" in
    *"statically linked"* | *"static-pie linked"*) return 0 ;;
    *) return 1 ;;
  esac
}
is_static "$busybox" || die "$busybox is not static; install busybox-static"

log "building vmlab-workload (static, release)"
(cd "$repo" && RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build -q -p vmlab-workload --release --target x86_64-unknown-linux-gnu)
workload="${CARGO_TARGET_DIR:-$repo/target}/x86_64-unknown-linux-gnu/release/vmlab-workload"
is_static "$workload" || die "$workload is not static"

mkdir -p "$out"
python3 "$repo/scripts/sample_image.py" --busybox "$busybox" --workload "$workload" \
  --layout "$out/sample-image" --archive "$out/sample-image.tar" \
  | sed 's/^/build-sample-image: /'
log "$out/sample-image.tar: $(stat -c %s "$out/sample-image.tar") bytes"
