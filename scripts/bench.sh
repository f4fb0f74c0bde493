#!/usr/bin/env bash
# The benchmark (issue 7): vmlab, QEMU microvm and a runc container on the
# same guest, interleaved, in one run. Installs the peers (QEMU, runc) with
# apt-get where missing, builds vmlab (release) and the guest, then runs
# scripts/bench.py with the arguments given; by default 5 repetitions,
# with the results in target/bench/bench.json and docs/BENCHMARKS.md.
#   scripts/bench.sh              # the full run (under 15 minutes on the project's machines)
#   scripts/bench.sh --quick      # one repetition, small sizes: checks the set-up
#   scripts/bench.sh --no-docs    # leave docs/BENCHMARKS.md alone
# Needs root (containers, network namespaces, kernel trace events) and /dev/kvm.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
[ -e /dev/kvm ] || { echo "bench: /dev/kvm is missing" >&2; exit 1; }
# shellcheck source=scripts/lib/apt.sh
. "$repo/scripts/lib/apt.sh"
apt_install_missing qemu-system-x86 runc iproute2 python3
scripts/build-guest.sh
# vmlab built as a static-pie binary, as vmlab-init and vmlab-workload
# are. Linked dynamically, the pages of ld.so, libc,
# libm and libgcc_s that vmlab maps add ~1.4 MiB to its memory overhead
# (docs/BENCHMARKS.md). --target keeps the flag off build scripts and
# proc-macros, which cannot be static.
RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --release --quiet -p vmlab --bin vmlab --target x86_64-unknown-linux-gnu
VMLAB_BENCH_COMMAND="scripts/bench.sh${*:+ $*}" exec python3 scripts/bench.py \
  --vmlab target/x86_64-unknown-linux-gnu/release/vmlab "$@"
