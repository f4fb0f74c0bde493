#!/usr/bin/env bash
# Builds vmlab's teaching guest (guest/teach/*.S) into flat binaries in
# target/guest/teach/, with GNU as and ld from binutils: the image is the
# program's bytes and nothing else, loaded at 0x1000 by `vmlab run --raw`.
# Idempotent; rebuilds only when the source is newer.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/lib/apt.sh
. "$repo/scripts/lib/apt.sh"
command -v as >/dev/null && command -v ld >/dev/null || apt_install_missing binutils
out="$repo/target/guest/teach"
mkdir -p "$out"
for src in "$repo"/guest/teach/*.S; do
  name="$(basename "$src" .S)"
  bin="$out/$name.bin"
  if [ -f "$bin" ] && [ "$bin" -nt "$src" ]; then continue; fi
  as --32 -o "$out/$name.o" "$src"
  ld -m elf_i386 -Ttext 0x1000 --oformat binary -e _start -o "$bin.tmp" "$out/$name.o"
  mv "$bin.tmp" "$bin"
  rm -f "$out/$name.o"
  echo "build-teach-guest: $bin ($(stat -c %s "$bin") bytes)"
done
