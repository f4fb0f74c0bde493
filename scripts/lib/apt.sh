# shellcheck shell=bash
# Sourced by the build scripts: installs the Debian packages among "$@" that
# are not installed yet, running `apt-get update` once first and only when
# something is missing; as root, or through sudo.
apt_install_missing() {
  local need=() sudo=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" \
      || need+=("$p")
  done
  [ "${#need[@]}" -eq 0 ] && return 0
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "need root (or sudo) to install: ${need[*]}" >&2; return 1; }
    sudo=(sudo)
  fi
  echo "installing ${need[*]}"
  "${sudo[@]}" apt-get -o DPkg::Lock::Timeout=600 update -q
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "${need[@]}"
}
