#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for SECONDS each (default 30), one
# after the other, and fails on the first crash, leak or timeout (libFuzzer
# then leaves the input in fuzz/artifacts/TARGET/: turn it into a unit test).
#   scripts/fuzz.sh [SECONDS] [TARGET...]
# Needs the nightly toolchain (rustup's `nightly`) and cargo-fuzz, which is
# installed from crates.io the first time (cargo install keeps the binary in
# ~/.cargo/bin). New inputs the fuzzer finds go to target/fuzz-corpus/TARGET
# (not into the repository); fuzz/corpus/TARGET holds the seeds. Scratch
# files go to VMLAB_FUZZ_TMPDIR (default /dev/shm when writable).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo/fuzz"
seconds="${1:-30}"
shift || true
case "$seconds" in ''|*[!0-9]*) echo "fuzz: SECONDS must be a number, not '$seconds'" >&2; exit 2;; esac

cargo +nightly --version >/dev/null 2>&1 \
  || { echo "fuzz: the nightly toolchain is missing (rustup toolchain install nightly)" >&2; exit 1; }
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz from crates.io"
  cargo install --locked cargo-fuzz
fi

# The targets that write files (layers, image layouts, passwd) run several
# times faster on a tmpfs: their scratch directories go to $TMPDIR.
if [ -z "${VMLAB_FUZZ_TMPDIR:-}" ] && [ -d /dev/shm ] && [ -w /dev/shm ]; then
  VMLAB_FUZZ_TMPDIR=/dev/shm
fi
export TMPDIR="${VMLAB_FUZZ_TMPDIR:-${TMPDIR:-/tmp}}"

targets=("$@")
[ "${#targets[@]}" -gt 0 ] || mapfile -t targets < <(cargo +nightly fuzz list)
echo "fuzz: building ${targets[*]}"
cargo +nightly fuzz build
for t in "${targets[@]}"; do
  work="$repo/target/fuzz-corpus/$t"
  mkdir -p "$work"
  echo "fuzz: $t for ${seconds} s"
  # -rss_limit_mb: a parser that allocates without bound is a finding too.
  if ! cargo +nightly fuzz run "$t" "$work" "corpus/$t" -- \
      -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
      2> "$repo/target/fuzz-$t.log"; then
    tail -40 "$repo/target/fuzz-$t.log" >&2
    echo "fuzz: $t FAILED (log: target/fuzz-$t.log, input: fuzz/artifacts/$t/)" >&2
    exit 1
  fi
  grep -E '^stat::number_of_executed_units' "$repo/target/fuzz-$t.log" | sed "s/^/fuzz: $t: /" || true
done
echo "fuzz: ${#targets[@]} targets, no crash"
