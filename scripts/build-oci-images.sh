#!/usr/bin/env bash
# Builds the container images the OCI-runtime tests run, offline (no
# registry), and loads them into Docker (and, with --podman, Podman):
#   vmlab-busybox:test   Debian's static busybox with its applet links,
#                        /etc/passwd and /etc/group with root (0:0) and
#                        user (1000:1000, home /home/user), /tmp (1777);
#                        CMD ["/bin/sh"].
# The root file system is a reproducible tar (fixed mtimes and owners,
# sorted), cached as ${XDG_CACHE_HOME:-~/.cache}/vmlab/oci-images/KEY.tar,
# KEY (busybox-DIGEST) being a digest of its inputs (busybox's bytes and this script's
# recipe). The image carries the label org.vmlab.input=KEY; an image that
# already has it is not imported again.
#
# Usage: scripts/build-oci-images.sh [--podman] [--no-docker] [--force]
#   --podman     also import the images into Podman's storage
#   --no-docker  do not use Docker (with --podman: Podman only)
#   --force      import again even if the label matches
# Docker must be running (scripts/engines.sh start).
set -euo pipefail
log() { echo "build-oci-images: $*"; }
die() { echo "build-oci-images: ERROR: $*" >&2; exit 1; }
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

use_docker=1 use_podman=0 force=0
while [ $# -gt 0 ]; do
  case "$1" in
    --podman) use_podman=1 ;;
    --no-docker) use_docker=0 ;;
    --force) force=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "usage: $0 [--podman] [--no-docker] [--force]" >&2; exit 2 ;;
  esac
  shift
done
[ "$use_docker" -eq 1 ] || [ "$use_podman" -eq 1 ] || die "nothing to load into (--no-docker without --podman)"

# shellcheck source=scripts/lib/apt.sh
. "$repo/scripts/lib/apt.sh"
apt_install_missing busybox-static python3 || die "cannot install busybox-static, python3"

cache="${XDG_CACHE_HOME:-$HOME/.cache}/vmlab/oci-images"
mkdir -p "$cache"
# Debian's CLI, not a newer /usr/local/bin/docker that may shadow it.
docker=(env DOCKER_HOST=unix:///var/run/docker.sock /usr/bin/docker)
if [ "$use_docker" -eq 1 ]; then
  "${docker[@]}" info >/dev/null 2>&1 || die "docker does not answer: start it with scripts/engines.sh start"
fi
if [ "$use_podman" -eq 1 ]; then
  command -v podman >/dev/null || die "podman is missing (apt-get install podman)"
fi

# The recipe of the busybox root: what goes into the key besides busybox.
busybox_recipe_version=1
passwd='root:x:0:0:root:/root:/bin/sh
user:x:1000:1000:user:/home/user:/bin/sh
'
group='root:x:0:
user:x:1000:
'

# Writes the busybox root's tar to $1.
busybox_rootfs_tar() {
  python3 - "$1" /bin/busybox "$passwd" "$group" <<'PY'
import io, os, subprocess, sys, tarfile
out, busybox, passwd, group = sys.argv[1:5]
applets = subprocess.run([busybox, "--list-full"], check=True, capture_output=True,
                         text=True).stdout.split()
entries = {}
def d(path, mode=0o755):
    entries[path] = ("dir", mode, None)
for p in ["bin", "sbin", "usr", "usr/bin", "usr/sbin", "etc", "root", "home",
          "proc", "sys", "dev", "run", "var", "var/tmp", "mnt"]:
    d(p)
d("root", 0o700)
d("tmp", 0o1777)
entries["home/user"] = ("dir", 0o755, (1000, 1000))
with open(busybox, "rb") as f:
    entries["bin/busybox"] = ("file", 0o755, f.read())
entries["etc/passwd"] = ("file", 0o644, passwd.encode())
entries["etc/group"] = ("file", 0o644, group.encode())
for a in applets:
    a = a.lstrip("/")
    if a == "bin/busybox" or a in entries:
        continue
    parent = os.path.dirname(a)
    if parent not in entries:
        d(parent)
    entries[a] = ("link", 0o777, os.path.relpath("bin/busybox", parent))
tmp = out + ".tmp"
with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
    for path in sorted(entries):
        kind, mode, data = entries[path]
        ti = tarfile.TarInfo(path)
        ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = 0, mode, 0, 0, "", ""
        if kind == "dir":
            ti.type = tarfile.DIRTYPE
            if data:
                ti.uid, ti.gid = data
            tar.addfile(ti)
        elif kind == "file":
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
        else:
            ti.type, ti.linkname = tarfile.SYMTYPE, data
            tar.addfile(ti)
os.rename(tmp, out)
PY
}

# Imports TAR as IMAGE with the label KEY into Docker and/or Podman,
# unless the image there already has that label.
import_image() {
  local image="$1" tar="$2" key="$3" cmd="$4" have engine
  local -a cli quiet
  for engine in docker podman; do
    if [ "$engine" = docker ]; then
      [ "$use_docker" -eq 1 ] || continue
      cli=("${docker[@]}")
    else
      [ "$use_podman" -eq 1 ] || continue
      cli=(podman)
    fi
    have="$("${cli[@]}" image inspect --format '{{index .Config.Labels "org.vmlab.input"}}' "$image" 2>/dev/null || true)"
    if [ "$force" -eq 0 ] && [ "$have" = "$key" ]; then
      log "$engine: $image is up to date (org.vmlab.input=$key)"
      continue
    fi
    quiet=()
    [ "$engine" = podman ] && quiet=(--quiet)
    "${cli[@]}" import "${quiet[@]}" --change "CMD $cmd" --change "LABEL org.vmlab.input=$key" \
      "$tar" "$image" >/dev/null
    log "$engine: $image imported (org.vmlab.input=$key)"
  done
}

build_busybox() {
  local key tar
  key="busybox-$( { echo "busybox-recipe $busybox_recipe_version"; sha256sum /bin/busybox | cut -d' ' -f1;
            printf '%s' "$passwd" "$group"; sed -n '/^busybox_rootfs_tar()/,/^}/p' "${BASH_SOURCE[0]}"; } \
          | sha256sum | cut -c1-16)"
  tar="$cache/$key.tar"
  if [ -f "$tar" ]; then
    log "rootfs $tar (cached)"
  else
    busybox_rootfs_tar "$tar"
    log "rootfs $tar ($(stat -c %s "$tar") bytes)"
  fi
  import_image vmlab-busybox:test "$tar" "$key" '["/bin/sh"]'
}

# TODO: a PostgreSQL image (vmlab-postgres:test) for the database tests,
# built offline like the busybox one. Not written yet; nothing here builds it.

build_busybox
