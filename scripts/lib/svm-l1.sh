# shellcheck shell=bash
# Sourced by scripts/test-svm.sh: the cached part of its L1 environment,
# under ${VMLAB_CACHE:-~/.cache/vmlab}/svm/<key>, keyed by its inputs (the
# Debian 12 kernel package apt offers and its version, busybox-static's
# version, this file): the kernel (vmlinuz), the modules below, decompressed,
# in load order (modules/NN-name.ko), and busybox. svm_l1_env sets $cache.

# L1 kernel modules, in load order: KVM on AMD, then TAP and bridges.
SVM_MODULES=(irqbypass kvm ccp kvm-amd tun llc stp bridge)

svm_l1_env() {
  local kpkg kver bbver key tmp release i m f out
  local lib="${BASH_SOURCE[0]}"
  kpkg="$(apt-cache depends linux-image-amd64 2>/dev/null \
    | awk '$1 == "Depends:" && $2 ~ /^linux-image-6\.1\.0-[0-9]+-amd64$/ {print $2; exit}')"
  [ -n "$kpkg" ] || die "apt knows no linux-image-6.1.0-*-amd64 (Debian 12's kernel)"
  kver="$(apt-cache show --no-all-versions "$kpkg" | awk '$1 == "Version:" {print $2; exit}')"
  bbver="$(dpkg-query -W -f='${Version}' busybox-static)"
  key="$({ echo "$kpkg $kver"; echo "busybox-static $bbver"; cat "$lib"; } | sha256sum | cut -c1-32)"
  cache="${VMLAB_CACHE:-$HOME/.cache/vmlab}/svm/$key"
  if [ -f "$cache/done" ]; then
    log "L1 environment: cache hit: $cache ($kpkg $kver)"
  else
    log "L1 environment: building $cache ($kpkg $kver)"
    tmp="$(dirname "$cache")/.build-$$"
    rm -rf "$tmp"
    mkdir -p "$tmp/out/modules"
    trap 'rm -rf "$tmp"' EXIT
    (cd "$tmp" && apt-get download -q "$kpkg=$kver" >/dev/null 2>&1) \
      || die "apt-get download $kpkg=$kver failed"
    dpkg-deb -x "$tmp"/"$kpkg"_*.deb "$tmp/x"
    release="${kpkg#linux-image-}"
    cp "$tmp/x/boot/vmlinuz-$release" "$tmp/out/vmlinuz"
    i=0
    for m in "${SVM_MODULES[@]}"; do
      f="$(find "$tmp/x/lib/modules/$release" -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" | head -n1)"
      [ -n "$f" ] || die "module $m not in $kpkg"
      out="$tmp/out/modules/$(printf %02d $i)-$m.ko"
      case "$f" in
        *.xz) xz -dc "$f" > "$out" ;;
        *.zst) zstd -qdc "$f" > "$out" ;;
        *) cp "$f" "$out" ;;
      esac
      i=$((i + 1))
    done
    cp /bin/busybox "$tmp/out/busybox"
    echo "$kpkg $kver" > "$tmp/out/kernel-package"
    touch "$tmp/out/done"
    rm -rf "$cache"
    mv "$tmp/out" "$cache"
    rm -rf "$tmp"
    trap - EXIT
    log "L1 environment: stored in $cache"
  fi
}
