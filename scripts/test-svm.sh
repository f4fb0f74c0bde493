#!/usr/bin/env bash
# The hardware-style KVM lane (issue 13): runs vmlab's integration tests on
# emulated AMD-V. QEMU's software emulation (TCG, no -enable-kvm) gives an
# L1 guest an EPYC CPU with SVM and nested paging; Debian 12's kernel loads
# kvm-amd there, and the test executables cargo built for this tree run
# unchanged inside it (at the same absolute paths as here, so that
# CARGO_BIN_EXE_vmlab and the CARGO_MANIFEST_DIR-relative guest files
# resolve), with VMLAB_EXPECT_HOST=hardware: any PVM workaround vmlab
# applies there fails them (tests/common/mod.rs).
#
#   scripts/test-svm.sh                       the lane
#   scripts/test-svm.sh --self-check-broken   the lane on a build with
#       --features test-break-hardware (a PVM-only change applied on
#       hardware); succeeds only if the lane FAILS
#   scripts/test-svm.sh --bench [RUNS]        no checks: scripts/bench_boot.py
#       in L1 (release vmlab vs QEMU microvm -enable-kvm, same kernel,
#       initramfs and command line; RUNS interleaved runs, default 5);
#       the table goes to target/svm/bench.md
#
# Cached outside the clone (scripts/lib/svm-l1.sh): the L1 kernel, its KVM
# and network modules, busybox. Built per run, in target/svm/: the L1
# initramfs with this tree's binaries.
# Environment: SVM_TIMEOUT (seconds for the whole L1 run, default 1500),
# SVM_SMP (L1 CPUs, default 2), SVM_ONLY (run only the listed test files).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

# The checks: one line per tests/<file>.rs, with libtest arguments. Add a
# test file here and it runs in L1 (its tools go in TOOLS below).
CHECKS=(
  "boot"
  "block"
  # The 8 MiB transfers each way take minutes under TCG; the bridge test
  # and the ping still cross real virtio-net queues in both directions.
  "net --skip ping_and_8_mib_each_way"
  "image"
  # Issue 13's stray-output bug showed on hardware-speed KVM only: 20 runs
  # of `vmlab run -- echo` with two vCPUs (VMLAB_STDOUT_* below).
  "console"
  # virtio-fs with the real virtiofsd: the killed daemon's EIO, no daemon
  # after SIGTERM/SIGKILL, the image root over virtio-fs. Not the share
  # test: L1's /tmp is a tmpfs of Linux 6.1, which has no user xattrs.
  "fs --skip share_behaves_as_the_host"
  # The OCI runtime's own command line on a bundle (no engine in L1):
  # create, the hooks, start, exec with a pty and a resize, kill, delete.
  "oci runtime_cli"
)
# Host programs the tests run (copied into L1 with their libraries).
TOOLS=(ip ping mkfs.ext4 debugfs)

broken=0
bench=0
case "${1:-}" in
  "") ;;
  --self-check-broken) broken=1 ;;
  --bench)
    bench="${2:-5}"
    [[ "$bench" =~ ^[1-9][0-9]?$ ]] || { echo "test-svm: --bench RUNS: 1 to 99" >&2; exit 2; }
    ;;
  *) echo "usage: scripts/test-svm.sh [--self-check-broken | --bench [RUNS]]" >&2; exit 2 ;;
esac
timeout_s="${SVM_TIMEOUT:-1500}"
smp="${SVM_SMP:-2}"
log() { echo "test-svm: $*" >&2; }
die() { echo "test-svm: ERROR: $*" >&2; exit 1; }

# shellcheck source=scripts/lib/apt.sh
. "$repo/scripts/lib/apt.sh"
apt_install_missing qemu-system-x86 busybox-static cpio xz-utils binutils \
  iproute2 iputils-ping e2fsprogs || die "cannot install the lane's packages"
command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 not found"

# --- The L1 environment (cached; scripts/lib/svm-l1.sh) --------------------
# shellcheck source=scripts/lib/svm-l1.sh
. "$repo/scripts/lib/svm-l1.sh"
svm_l1_env  # sets $cache

# --- This tree's binaries ----------------------------------------------------
scripts/build-guest.sh >&2
cargo_args=()
if [ "$broken" = 1 ]; then
  # Its own target directory: the ordinary build stays as it is.
  export CARGO_TARGET_DIR="$repo/target/svm-broken"
  cargo_args=(--features test-break-hardware)
  log "self-check: building vmlab with --features test-break-hardware"
fi
names=()
exes=""
if [ "$bench" = 0 ]; then
  for c in "${CHECKS[@]}"; do
    read -r name _ <<< "$c"
    if [ -n "${SVM_ONLY:-}" ] && [[ " $SVM_ONLY " != *" $name "* ]]; then continue; fi
    names+=("$name")
  done
  [ "${#names[@]}" -gt 0 ] || die "SVM_ONLY=$SVM_ONLY matches no check"
  test_args=()
  for n in "${names[@]}"; do test_args+=(--test "$n"); done
  exes="$(nice -n 10 cargo test --no-run --message-format=json "${cargo_args[@]}" "${test_args[@]}" \
    | python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        print(m["target"]["kind"][0], m["target"]["name"], m["executable"])
')" || die "cargo test --no-run failed"
else
  nice -n 10 cargo build --release --bin vmlab >&2 || die "cargo build --release failed"
  exes="bin vmlab $repo/target/release/vmlab"
fi

# --- The L1 initramfs -------------------------------------------------------
work="$repo/target/svm"
[ "$broken" = 1 ] && work="$repo/target/svm-broken/svm"
stage="$work/root"
rm -rf "$stage"
mkdir -p "$stage"/{bin,dev,proc,sys,tmp,run,root,etc,lib/modules,svm}
cp "$cache/busybox" "$stage/bin/busybox"
for a in $("$stage/bin/busybox" --list); do
  [ -e "$stage/bin/$a" ] || ln -s busybox "$stage/bin/$a"
done
cp "$cache"/modules/*.ko "$stage/lib/modules/"
# A file at the same absolute path inside L1.
same_path() { mkdir -p "$stage$(dirname "$1")"; cp -L "$1" "$stage$1"; }
# An executable and the shared libraries ldd finds for it; debug info
# stripped (the test executables carry ~90% DWARF).
with_libs() {
  mkdir -p "$stage$(dirname "$1")"
  objcopy --strip-debug "$1" "$stage$1" 2>/dev/null || cp -L "$1" "$stage$1"
  local lib
  for lib in $(ldd "$1" 2>/dev/null | grep -o '/[^ ]*'); do
    [ -e "$stage$lib" ] || same_path "$lib"
  done
}
for t in "${TOOLS[@]}"; do
  p="$(PATH="$PATH:/usr/sbin:/sbin" command -v "$t")" || die "$t not found"
  with_libs "$p"
done
[ -f /etc/mke2fs.conf ] && same_path /etc/mke2fs.conf
vmlab_bin=""
touch "$stage/svm/steps"
while read -r kind name path; do
  with_libs "$path"
  if [ "$kind" = bin ] && [ "$name" = vmlab ]; then vmlab_bin="$path"; fi
  if [ "$kind" = test ]; then echo "$name $path" >> "$stage/svm/exes"; fi
done <<< "$exes"
[ -n "$vmlab_bin" ] || die "cargo built no vmlab binary"
# The guest artifacts; the static guest init `run --image` puts on the
# image's disk; the host-side workload binary tests/image.rs compares the
# guest's output with.
for f in "$repo"/target/guest/*; do
  [ -f "$f" ] && same_path "$f"
done
# virtiofsd (tests/fs.rs) links libseccomp and libcap-ng.
with_libs "$repo/target/guest/virtiofsd"
cp -a "$repo/target/guest/sample-image" "$stage$repo/target/guest/"
# The busybox tree tests/fs.rs boots as a --rootfs directory.
cp -a "$repo/target/guest/rootfs-tree" "$stage$repo/target/guest/"
for f in vmlab-init vmlab-workload; do
  with_libs "$repo/target/x86_64-unknown-linux-gnu/release/$f"
done
# The steps L1 runs, one a line: NAME COMMAND (run with sh -c).
if [ "$bench" = 0 ]; then
  for c in "${CHECKS[@]}"; do
    read -r name rest <<< "$c"
    exe="$(awk -v n="$name" '$1 == n {print $2}' "$stage/svm/exes")"
    # --show-output: a test that skips says so (reported below).
    [ -n "$exe" ] && echo "$name $exe --test-threads=1 --show-output ${rest:-}" >> "$stage/svm/steps"
  done
else
  # QEMU (microvm's firmware included) and a Python for bench_boot.py.
  with_libs "$(command -v qemu-system-x86_64)"
  mkdir -p "$stage/usr/share"
  cp -a /usr/share/qemu "$stage/usr/share/"
  py="$(readlink -f /usr/bin/python3)"
  with_libs "$py"
  ln -sf "$(basename "$py")" "$stage/usr/bin/python3"
  pylib="$(dirname "$py")/../lib/$(basename "$py")"
  pylib="$(readlink -f "$pylib")"
  mkdir -p "$stage$pylib"
  (cd "$pylib" && tar -c --exclude=test --exclude=tests --exclude=idlelib --exclude=tkinter \
    --exclude=ensurepip --exclude=lib2to3 --exclude=__pycache__ --exclude=site-packages \
    --exclude=dist-packages .) | tar -x -C "$stage$pylib"
  for so in "$pylib"/lib-dynload/*.so; do
    for lib in $(ldd "$so" 2>/dev/null | grep -o '/[^ ]*'); do
      [ -e "$stage$lib" ] || same_path "$lib"
    done
  done
  same_path "$repo/scripts/bench_boot.py"
  echo "bench python3 $repo/scripts/bench_boot.py --runs $bench --vmlab $vmlab_bin" >> "$stage/svm/steps"
  names=(bench)
fi
cat > "$stage/init" <<'EOF'
#!/bin/sh
# L1 init of scripts/test-svm.sh: load KVM for AMD, run the checks, report
# each with SVM-* markers on the serial console, power off.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TMPDIR=/tmp
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
# ptys, for the OCI runtime's exec --tty (tests/oci.rs).
mkdir -p /dev/pts && mount -t devpts -o ptmxmode=0666,newinstance devpts /dev/pts \
  && { [ -e /dev/ptmx ] || ln -s pts/ptmx /dev/ptmx; }
# Not over a checkout staged under /tmp (a clone in /tmp/...): the
# initramfs's own /tmp is writable too.
[ -n "$(ls -A /tmp)" ] || mount -t tmpfs tmp /tmp
mount -t tmpfs run /run
ip link set lo up
for m in /lib/modules/*.ko; do
  insmod "$m" || echo "SVM-FAIL insmod $m"
done
flags="$(grep -m1 '^flags' /proc/cpuinfo)"
has() { case " ${flags#*:} " in *" $1 "*) echo "$1" ;; *) echo "no-$1" ;; esac; }
echo
echo "SVM-INFO cpu:$(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2-), $(has svm) $(has npt), $(nproc) CPUs"
echo "SVM-INFO kvm_amd npt=$(cat /sys/module/kvm_amd/parameters/npt 2>/dev/null) nested=$(cat /sys/module/kvm_amd/parameters/nested 2>/dev/null)"
if [ -c /dev/kvm ]; then echo "SVM-INFO /dev/kvm present"; else echo "SVM-FAIL no /dev/kvm"; fi
export VMLAB_EXPECT_HOST=hardware RUST_BACKTRACE=1
export VMLAB_STDOUT_RUNS=20 VMLAB_STDOUT_CPUS=2 VMLAB_STDOUT_PARALLEL=2
while read -r name cmd; do
  echo "SVM-BEGIN $name"
  start=$(date +%s)
  timeout -s KILL 900 sh -c "$cmd" 2>&1
  rc=$?
  echo "SVM-END $name rc=$rc seconds=$(( $(date +%s) - start ))"
done < /svm/steps
echo "SVM-DONE"
poweroff -f
EOF
chmod +x "$stage/init"
cpio_file="$work/l1-initramfs.cpio"
(cd "$stage" && find . | cpio -o -H newc --quiet) > "$cpio_file"
log "L1 initramfs: $cpio_file ($(du -m "$cpio_file" | cut -f1) MiB; checks: ${names[*]})"

# --- Boot L1 and collect ----------------------------------------------------
serial="$work/serial.log"
# One boot of L1: its serial console in $serial, QEMU's status in $qrc.
boot_l1() {
  log "booting L1: QEMU TCG, -cpu EPYC,+svm,+npt, $smp CPUs, 3 GiB (at most ${timeout_s} s)"
  start=$(date +%s)
  set +e
  timeout -k 10 "$timeout_s" qemu-system-x86_64 -machine q35 -accel tcg \
    -cpu EPYC,+svm,+npt -m 3G -smp "$smp" -nographic -no-reboot -nic none \
    -kernel "$cache/vmlinuz" -initrd "$cpio_file" \
    -append "console=ttyS0 panic=-1 quiet loglevel=3" \
    < /dev/null > "$serial" 2>&1 &
  qpid=$!
  # L1 powers off after SVM-DONE. QEMU TCG has been seen to keep running at
  # full CPU after L1's "reboot: Power down" (1 of 4 runs, 2026-12-07): give
  # it 30 s to exit after SVM-DONE, then end it (timeout passes the TERM on).
  done_at=""
  while kill -0 "$qpid" 2>/dev/null; do
    if [ -z "$done_at" ]; then
      grep -q 'SVM-DONE' "$serial" 2>/dev/null && done_at=$(date +%s)
    elif [ $(( $(date +%s) - done_at )) -ge 30 ]; then
      log "L1 finished, but QEMU had not exited 30 s after SVM-DONE: stopping it"
      kill -TERM "$qpid" 2>/dev/null
      break
    fi
    sleep 1
  done
  wait "$qpid"
  qrc=$?
  set -e
  wall=$(( $(date +%s) - start ))
  tr -d '\r' < "$serial" > "$serial.txt"
  log "L1 ran ${wall} s (qemu exit status $qrc); serial log: $serial.txt"
}
boot_l1
# L1's own kernel (Debian's, with kvm_amd, on QEMU's emulated SVM) has
# been seen to crash under the checks: "BUG: TASK stack guard page was hit"
# in a vcpu thread's error_entry, then "Kernel panic - not syncing" (1 of 7
# lanes, 2026-12-07). That is the emulator's or L1's fault, not a check's
# result: such a lane is run once more, and the crash stays in the output.
if ! grep -q '^SVM-DONE' "$serial.txt" && grep -q 'Kernel panic - not syncing' "$serial.txt"; then
  cp "$serial.txt" "$serial.crashed.txt"
  log "L1's kernel crashed before the checks finished (not a check failure):"
  grep -m3 -e 'BUG:' -e 'Kernel panic' "$serial.txt" | sed 's/^/test-svm:   /' >&2
  log "its serial log: $serial.crashed.txt; booting L1 once more"
  boot_l1
fi

passed=0
failed=0
report=()
while read -r name _; do
  begin="SVM-BEGIN $name"
  body="$(awk -v b="$begin" -v e="SVM-END $name " '$0 == b {on=1; next} index($0, e) == 1 {on=0} on' "$serial.txt")"
  end="$(grep -m1 "^SVM-END $name " "$serial.txt" || true)"
  ok=$(grep -c '^test .* \.\.\. ok$' <<< "$body" || true)
  bad=$(grep -c '^test .* \.\.\. FAILED$' <<< "$body" || true)
  passed=$((passed + ok))
  failed=$((failed + bad))
  rc="${end#*rc=}"; rc="${rc%% *}"
  if [ -z "$end" ]; then
    failed=$((failed + 1)); report+=("$name: no result (L1 ended or timed out)")
  elif [ "$rc" != 0 ] && [ "$bad" = 0 ]; then
    failed=$((failed + 1)); report+=("$name: exit status $rc")
  else
    report+=("$name: $ok passed, $bad failed (${end##*seconds=} s)")
  fi
  grep -e '^test .* \.\.\. \(FAILED\|ignored\)$' -e '^skipped: ' <<< "$body" \
    | sed "s/^/  $name: /" >&2 || true
  if [ "$name" = bench ]; then
    sed -n '/^Host: /,$p' <<< "$body" | grep -v '^SVM-' > "$work/bench.md"
    log "bench: $work/bench.md"
    cat "$work/bench.md"
    [ "$rc" = 0 ] && [ -s "$work/bench.md" ] && passed=$((passed + 1))
  fi
done < "$stage/svm/steps"
while read -r line; do
  failed=$((failed + 1)); report+=("L1: ${line#SVM-FAIL }")
done < <(grep '^SVM-FAIL' "$serial.txt" || true)
grep -q '^SVM-DONE' "$serial.txt" || { failed=$((failed + 1)); report+=("L1: did not finish (timeout ${timeout_s} s or crash)"); }
grep '^SVM-INFO' "$serial.txt" | sed 's/^SVM-INFO /test-svm: L1: /' >&2 || true
for r in "${report[@]}"; do log "$r"; done
if [ "$failed" -gt 0 ]; then
  log "failures: see $serial.txt"
fi
echo "svm: $passed passed, $failed failed"
if [ "$broken" = 1 ]; then
  # A failure of the checks themselves, not of the machinery (L1 finished).
  if [ "$failed" -gt 0 ] && grep -q '^SVM-DONE' "$serial.txt"; then
    echo "svm self-check: the lane FAILED on the deliberately broken build, as it must"
    exit 0
  fi
  echo "svm self-check: the lane PASSED a build that applies PVM workarounds on hardware" >&2
  exit 1
fi
[ "$failed" -eq 0 ] && [ "$passed" -gt 0 ]
