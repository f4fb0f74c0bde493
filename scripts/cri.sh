#!/usr/bin/env bash
# A PRIVATE containerd with its CRI plugin, for driving the Kubernetes CRI
# API (scripts/cri_client.py) with the runtimes `runc` and `vmlab` without
# touching the containerd that Docker uses (/run/containerd).
#
#   scripts/cri.sh start [--runtime-binary PATH]
#        starts it (already running: says so, checks the images, exits 0);
#        waits at most $VMLAB_CRI_TIMEOUT s (default 60) for its socket.
#        PATH (else $VMLAB_RUNTIME, else REPO/target/debug/vmlab-runtime) is
#        the runtime `vmlab`'s options.BinaryName (io.containerd.runc.v2).
#   scripts/cri.sh stop [--purge]
#        stops and removes every pod (through the CRI), stops containerd by
#        PID (SIGTERM, SIGKILL after 30 s) and the shims it left, unmounts
#        everything under /run/vmlab-cri and /var/lib/vmlab-cri, deletes the
#        bridge vmlabcri0 and the pods' cgroups. --purge: also removes the
#        root (/var/lib/vmlab-cri: images, snapshots). The log stays.
#        A pod the CRI cannot remove (vmlab-runtime today: see below) keeps
#        its record in the root; the next start removes it.
#   scripts/cri.sh status
#        what runs; exit 0 if containerd answers on the socket, else 3.
#
# Layout: socket /run/vmlab-cri/containerd.sock, config
# /run/vmlab-cri/config.toml, state /run/vmlab-cri/state (the pods' network
# namespaces too: netns_mounts_under_state_dir, none in /var/run/netns), root
# /var/lib/vmlab-cri, log /run/vmlab-cri/containerd.log (appended), pid
# /run/vmlab-cri/containerd.pid, CNI config /run/vmlab-cri/net.d (bridge
# vmlabcri0 with 10.244.77.1/24, host-local 10.244.77.0/24, no gateway route,
# no masquerade, portmap; containerd adds loopback itself), plugins from
# /usr/lib/cni, IPAM state /run/vmlab-cri/ipam. The bridge is made here
# with the host's address on it, so the bridge plugin runs with
# isGateway=false and changes no sysctl (no ip_forward); traffic stays on
# the machine. Pods' cgroups go under /vmlab-cri (scripts/cri_client.py sets
# that cgroup_parent). restrict_oom_score_adj = true: root here lacks
# CAP_SYS_RESOURCE, and the sandbox asks for -998.
#
# Images (namespace k8s.io, imported with ctr from docker-archive tars that
# this script writes, cached in ~/.cache/vmlab/cri/):
#   vmlab.local/pause:1   sandbox_image: tests/data/cri/pause.c built with
#                         gcc -static (sleeps until SIGTERM/SIGINT, reaps);
#                         like Kubernetes' pause it has no /etc/resolv.conf,
#                         /etc/hostname, /etc/hosts. VMLAB_CRI_PAUSE_ETC=1 at
#                         start adds them empty (a workaround: vmlab-runtime
#                         cannot create bind-mount points on the sandbox's
#                         read-only root).
#   docker.io/library/vmlab-busybox:test (CRI name vmlab-busybox:test): the
#                         newest busybox root tar scripts/build-oci-images.sh
#                         cached in ~/.cache/vmlab/oci-images, else one made
#                         here from the host's static busybox; CMD /bin/sh.
#
# The handler vmlab today (vmlab-runtime as the shim's runc; each CRI
# container, the sandbox too, is its own VM): `cri_client.py scenario
# --handler vmlab` fails. The sandbox VM exits 127 after boot (it cannot
# bind-mount /etc/resolv.conf on the read-only pause root); the app
# containers' VMs cannot have the pod's network (the sandbox VM holds the
# TAP in the pod's namespace); and `kill --all` of an exited container
# fails with an empty message (vmlab-runtime writes "container not running"
# only to --log, while containerd reads stderr for kill), so containerd
# never records the exits and StopPodSandbox/RemovePodSandbox fail: stop
# ends those shims itself.
set -euo pipefail
log() { echo "cri: $*"; }
die() { echo "cri: ERROR: $*" >&2; exit 1; }
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

run_dir=/run/vmlab-cri
sock="$run_dir/containerd.sock"
state_dir="$run_dir/state"
root_dir=/var/lib/vmlab-cri
config="$run_dir/config.toml"
net_dir="$run_dir/net.d"
ipam_dir="$run_dir/ipam"
logf="$run_dir/containerd.log"
pidf="$run_dir/containerd.pid"
# The runtimes' --root (the shim's default is /run/containerd/runc, Docker's).
runc_root="$run_dir/runc"
bridge=vmlabcri0
bridge_addr=10.244.77.1/24
subnet=10.244.77.0/24
cni_bin=/usr/lib/cni
cgroup_parent=vmlab-cri
pause_image=vmlab.local/pause:1
busybox_image=docker.io/library/vmlab-busybox:test
timeout_s="${VMLAB_CRI_TIMEOUT:-60}"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/vmlab/cri"
client=(/usr/bin/python3 "$repo/scripts/cri_client.py" --socket "$sock")
ctr_k8s=(ctr --address "$sock" --namespace k8s.io)

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

# is_live PID NAME, alive_pid FILE NAME.
# shellcheck source=scripts/lib/proc.sh
. "$repo/scripts/lib/proc.sh"
our_pid() { alive_pid "$pidf" containerd; }
answers() { timeout 5 ctr --address "$sock" version >/dev/null 2>&1; }
# The shims our containerd started: their command line names our socket.
our_shims() {
  local p
  for p in /proc/[0-9]*; do
    tr '\0' ' ' 2>/dev/null <"$p/cmdline" | grep -qF -- "-address $sock " && basename "$p"
  done
  return 0
}

# --- images -----------------------------------------------------------------
# image_py OUT REF CMD_JSON (pause BINARY | rootfs TAR | busybox BUSYBOX)
# writes a docker-archive tar (manifest.json, config, one layer) for ctr import.
image_py() {
  python3 - "$@" <<'PY'
import hashlib, io, json, os, subprocess, sys, tarfile
out, ref, cmd, kind, src = sys.argv[1:6]

def tar_bytes(entries):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for path, typ, mode, data in sorted(entries):
            ti = tarfile.TarInfo(path)
            ti.mtime, ti.mode, ti.uid, ti.gid = 0, mode, 0, 0
            if typ == "dir":
                ti.type = tarfile.DIRTYPE
                t.addfile(ti)
            elif typ == "link":
                ti.type, ti.linkname = tarfile.SYMTYPE, data
                t.addfile(ti)
            else:
                ti.size = len(data)
                t.addfile(ti, io.BytesIO(data))
    return buf.getvalue()

base = [(d, "dir", 0o755, None) for d in ["dev", "proc", "sys", "etc", "run", "var"]]
base.append(("tmp", "dir", 0o1777, None))
if kind == "pause":
    with open(src, "rb") as f:
        layer = tar_bytes(base + [("pause", "file", 0o755, f.read()),
                                  ("etc/passwd", "file", 0o644, b"root:x:0:0:root:/:/pause\n"),
                                  ("etc/group", "file", 0o644, b"root:x:0:\n")]
                         + ([("etc/" + n, "file", 0o644, b"") for n in ("resolv.conf", "hostname", "hosts")]
                            if os.environ.get("VMLAB_CRI_PAUSE_ETC") == "1" else []))
elif kind == "rootfs":
    with open(src, "rb") as f:
        layer = f.read()
elif kind == "busybox":
    names = subprocess.run([src, "--list-full"], check=True, capture_output=True,
                           text=True).stdout.split()
    with open(src, "rb") as f:
        ents = base + [("bin", "dir", 0o755, None), ("sbin", "dir", 0o755, None),
                       ("usr", "dir", 0o755, None), ("usr/bin", "dir", 0o755, None),
                       ("usr/sbin", "dir", 0o755, None), ("root", "dir", 0o700, None),
                       ("bin/busybox", "file", 0o755, f.read()),
                       ("etc/passwd", "file", 0o644, b"root:x:0:0:root:/root:/bin/sh\n"),
                       ("etc/group", "file", 0o644, b"root:x:0:\n")]
    have = {e[0] for e in ents}
    for n in names:
        n = n.lstrip("/")
        if n not in have:
            have.add(n)
            ents.append((n, "link", 0o777, os.path.relpath("bin/busybox", os.path.dirname(n))))
    layer = tar_bytes(ents)
else:
    sys.exit(f"image: unknown kind {kind}")

diff = "sha256:" + hashlib.sha256(layer).hexdigest()
conf = {
    "architecture": "amd64", "os": "linux",
    "created": "1970-01-01T00:00:00Z",
    "config": {"Cmd": json.loads(cmd), "Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"],
               "Labels": {"org.vmlab.cri": "1"}},
    "rootfs": {"type": "layers", "diff_ids": [diff]},
    "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "vmlab scripts/cri.sh"}],
}
cbytes = json.dumps(conf, sort_keys=True).encode()
cname = hashlib.sha256(cbytes).hexdigest() + ".json"
lname = diff[7:] + "/layer.tar"
manifest = json.dumps([{"Config": cname, "RepoTags": [ref], "Layers": [lname]}]).encode()
tmp = out + ".tmp"
with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as t:
    for name, data in [(diff[7:], None), (lname, layer), (cname, cbytes), ("manifest.json", manifest)]:
        ti = tarfile.TarInfo(name)
        ti.mtime = 0
        if data is None:
            ti.type, ti.mode = tarfile.DIRTYPE, 0o755
            t.addfile(ti)
        else:
            ti.size, ti.mode = len(data), 0o644
            t.addfile(ti, io.BytesIO(data))
os.rename(tmp, out)
PY
}

# The archive of the pause image (built once per pause.c and compiler).
pause_archive() {
  local src="$repo/tests/data/cri/pause.c" key bin tarf
  command -v gcc >/dev/null && [ -e /usr/lib/x86_64-linux-gnu/libc.a ] || {
    # shellcheck source=scripts/lib/apt.sh
    . "$repo/scripts/lib/apt.sh"
    apt_install_missing gcc libc6-dev >&2 || die "cannot install gcc libc6-dev"
  }
  key="$( { cat "$src"; gcc --version | head -1; echo "image-1 etc=${VMLAB_CRI_PAUSE_ETC:-0}"; } | sha256sum | cut -c1-16)"
  bin="$cache/pause-$key"
  tarf="$cache/pause-$key.tar"
  if [ ! -x "$bin" ]; then
    gcc -static -Os -Wall -o "$bin.tmp" "$src" >&2 && mv "$bin.tmp" "$bin"
  fi
  [ -f "$tarf" ] || image_py "$tarf" "$pause_image" '["/pause"]' pause "$bin"
  echo "$tarf"
}

# The archive of the busybox image: from build-oci-images.sh's newest cached
# root, else from the host's static busybox.
busybox_archive() {
  local rootfs key tarf
  rootfs="$(ls -t "${XDG_CACHE_HOME:-$HOME/.cache}"/vmlab/oci-images/busybox-*.tar 2>/dev/null | head -1 || true)"
  if [ -n "$rootfs" ]; then
    key="$(basename "$rootfs" .tar)"
    tarf="$cache/image-$key.tar"
    [ -f "$tarf" ] || image_py "$tarf" "$busybox_image" '["/bin/sh"]' rootfs "$rootfs"
  else
    [ -x /bin/busybox ] || {
      . "$repo/scripts/lib/apt.sh"
      apt_install_missing busybox-static >&2 || die "cannot install busybox-static"
    }
    key="host-$(sha256sum /bin/busybox | cut -c1-16)"
    tarf="$cache/image-busybox-$key.tar"
    [ -f "$tarf" ] || image_py "$tarf" "$busybox_image" '["/bin/sh"]' busybox /bin/busybox
  fi
  echo "$tarf"
}

# Imports TAR as REF unless the image REF already has the archive's config.
import_archive() {
  local tarf="$1" ref="$2" want have
  want="sha256:$(tar -xOf "$tarf" manifest.json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["Config"][:-5])')"
  have="$("${ctr_k8s[@]}" images ls name=="$ref" 2>/dev/null | awk 'NR > 1 {print $3}')"
  # ctr shows the manifest digest; compare the config through the content store.
  if [ -n "$have" ] && "${ctr_k8s[@]}" content get "$have" 2>/dev/null | grep -qF "$want"; then
    log "image $ref is up to date"
    return 0
  fi
  "${ctr_k8s[@]}" images import "$tarf" >/dev/null \
    || die "ctr images import $tarf failed"
  "${ctr_k8s[@]}" images ls -q | grep -qxF "$ref" || die "$ref is not in namespace k8s.io after importing $tarf"
  log "image $ref imported ($(basename "$tarf"))"
}

images() {
  mkdir -p "$cache"
  import_archive "$(pause_archive)" "$pause_image"
  import_archive "$(busybox_archive)" "$busybox_image"
}

# --- network ----------------------------------------------------------------
write_cni() {
  mkdir -p "$net_dir" "$ipam_dir"
  cat >"$net_dir/10-vmlab-cri.conflist.tmp" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "vmlab-cri",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$bridge",
      "isGateway": false,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "$subnet", "gateway": "${bridge_addr%/*}"}]],
        "routes": [],
        "dataDir": "$ipam_dir"
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF
  mv "$net_dir/10-vmlab-cri.conflist.tmp" "$net_dir/10-vmlab-cri.conflist"
}

bridge_up() {
  if ! ip link show "$bridge" >/dev/null 2>&1; then
    ip link add "$bridge" type bridge
    log "bridge $bridge created"
  fi
  local addrs
  addrs="$(ip -o -4 addr show dev "$bridge")"
  grep -qF "inet $bridge_addr " <<<"$addrs" || ip addr add "$bridge_addr" dev "$bridge"
  ip link set "$bridge" up
}

# --- containerd -------------------------------------------------------------
write_config() {
  local binary="$1"
  mkdir -p "$state_dir" "$root_dir"
  cat >"$config.tmp" <<EOF
# Written by vmlab's scripts/cri.sh: a private containerd for CRI tests.
version = 2
root = "$root_dir"
state = "$state_dir"
oom_score = 0

[grpc]
  address = "$sock"

[ttrpc]
  address = "$sock.ttrpc"

[debug]
  address = ""
  level = "info"

[metrics]
  address = ""

[plugins]
  [plugins."io.containerd.internal.v1.opt"]
    path = "$root_dir/opt"
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = "$pause_image"
    restrict_oom_score_adj = true
    netns_mounts_under_state_dir = true
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"
    disable_tcp_service = true
    [plugins."io.containerd.grpc.v1.cri".containerd]
      snapshotter = "overlayfs"
      default_runtime_name = "runc"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
          Root = "$runc_root"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.vmlab]
        runtime_type = "io.containerd.runc.v2"
        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.vmlab.options]
          BinaryName = "$binary"
          Root = "$runc_root"
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "$cni_bin"
      conf_dir = "$net_dir"
      max_conf_num = 1
    [plugins."io.containerd.grpc.v1.cri".registry]
      config_path = ""
EOF
  mv "$config.tmp" "$config"
  containerd --config "$config" config dump >/dev/null 2>&1 || die "containerd rejects $config"
}

start() {
  local binary="${runtime_binary:-${VMLAB_RUNTIME:-$repo/target/debug/vmlab-runtime}}" pid waited=0
  [ "$(id -u)" -eq 0 ] || die "must run as root"
  for b in containerd ctr containerd-shim-runc-v2 runc ip python3; do
    command -v "$b" >/dev/null || die "$b is missing (apt-get install docker.io iproute2)"
  done
  [ -x "$cni_bin/bridge" ] && [ -x "$cni_bin/host-local" ] && [ -x "$cni_bin/loopback" ] || {
    . "$repo/scripts/lib/apt.sh"
    apt_install_missing containernetworking-plugins || die "cannot install containernetworking-plugins"
  }
  case "$binary" in /*) ;; *) binary="$(pwd)/$binary" ;; esac
  [ -x "$binary" ] || log "warning: the vmlab runtime $binary is not executable (handler vmlab will fail; handler runc works)"
  mkdir -p "$run_dir"
  if answers; then
    if pid="$(our_pid)"; then
      log "containerd is already running (pid $pid, socket $sock)"
      grep -qF "BinaryName = \"$binary\"" "$config" 2>/dev/null \
        || log "note: it runs with $(sed -n 's/^ *BinaryName = //p' "$config"), not $binary (stop and start to change)"
    else
      die "something answers on $sock but is not the containerd in $pidf"
    fi
    bridge_up
    images
    log "already running"
    return 0
  fi
  pid="$(our_pid || true)"
  [ -z "$pid" ] || die "containerd (pid $pid) runs but does not answer on $sock: scripts/cri.sh stop"
  rm -f "$sock" "$sock.ttrpc"
  write_config "$binary"
  write_cni
  bridge_up
  setsid containerd --config "$config" </dev/null >>"$logf" 2>&1 &
  pid=$!
  echo "$pid" >"$pidf"
  log "containerd started (pid $pid, socket $sock, log $logf, runtime vmlab -> $binary)"
  until answers; do
    if ! is_live "$pid" containerd; then tail -n 20 "$logf" >&2; die "containerd exited while starting (log: $logf)"; fi
    if [ "$waited" -ge "$timeout_s" ]; then tail -n 20 "$logf" >&2; die "containerd did not answer within ${timeout_s}s (log: $logf)"; fi
    sleep 1
    waited=$((waited + 1))
  done
  images
  # The CRI plugin is up when it answers Version and its network is ready.
  waited=0
  until "${client[@]}" --timeout 5 version >/dev/null 2>&1; do
    [ "$waited" -lt "$timeout_s" ] || { tail -n 20 "$logf" >&2; die "the CRI plugin does not answer (log: $logf)"; }
    sleep 1
    waited=$((waited + 1))
  done
  # Pods restored from the root (a stop that could not remove them: their
  # shims are gone now, so removing them works).
  local left
  left="$("${client[@]}" --timeout 30 list-pods | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')"
  if [ "$left" != 0 ]; then
    "${client[@]}" --timeout 60 cleanup >/dev/null || log "warning: could not remove the $left pods left from before"
    log "removed $left pods left from a previous run"
  fi
  log "CRI: $("${client[@]}" version | tr -d '\n' | tr -s ' ')"
  log "started"
}

umount_under() {
  # Deepest first; lazily if a mount is still busy.
  local m
  awk -v a="$run_dir/" -v b="$root_dir/" 'index($5, a) == 1 || index($5, b) == 1 {print $5}' /proc/self/mountinfo \
    | sort -r | while read -r m; do
      m="$(printf '%b' "$m")"
      umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || log "warning: cannot unmount $m"
      log "unmounted $m"
    done
}

stop() {
  local pid waited=0 p n left
  [ "$(id -u)" -eq 0 ] || die "must run as root"
  if answers; then
    left="$("${client[@]}" --timeout 60 cleanup | python3 -c 'import json,sys; print(json.load(sys.stdin)["left_pods"])' || echo '?')"
    [ "$left" = 0 ] || log "warning: $left pods could not be removed through the CRI (see $logf); their shims are ended below and the next start removes them (or stop --purge)"
  fi
  if pid="$(our_pid)"; then
    kill -TERM "$pid"
    while is_live "$pid" containerd && [ "$waited" -lt 30 ]; do sleep 1; waited=$((waited + 1)); done
    if is_live "$pid" containerd; then kill -KILL "$pid"; log "containerd (pid $pid) killed"; sleep 1
    else log "containerd (pid $pid) stopped"; fi
  elif [ -f "$pidf" ]; then
    log "containerd (pid $(cat "$pidf")) is not running"
  else
    log "containerd is not running"
  fi
  rm -f "$pidf"
  # Shims (and so containers) left behind, e.g. after a kill of containerd.
  for p in $(our_shims); do
    kill -TERM "$p" 2>/dev/null && log "shim pid $p: SIGTERM"
  done
  n=0
  while [ -n "$(our_shims)" ] && [ "$n" -lt 10 ]; do sleep 1; n=$((n + 1)); done
  for p in $(our_shims); do
    kill -KILL "$p" 2>/dev/null && log "shim pid $p: SIGKILL"
  done
  umount_under
  if ip link show "$bridge" >/dev/null 2>&1; then
    ip link del "$bridge" && log "bridge $bridge deleted"
  fi
  # The pods' cgroups (empty now), deepest first.
  for p in /sys/fs/cgroup/*/"$cgroup_parent" /sys/fs/cgroup/"$cgroup_parent"; do
    [ -d "$p" ] || continue
    find "$p" -depth -type d -exec rmdir {} \; 2>/dev/null || log "warning: $p is not empty"
  done
  # libcni's cached results of pods whose teardown did not run (its cache is
  # /var/lib/cni, shared): ours by network name, and their loopback's.
  for p in /var/lib/cni/results/vmlab-cri-*-eth0; do
    [ -e "$p" ] || continue
    n="${p#/var/lib/cni/results/vmlab-cri-}"
    rm -f "$p" "/var/lib/cni/results/cni-loopback-${n%-eth0}-lo"
    log "removed libcni's cached result of pod ${n%-eth0}"
  done
  # portmap's chains (nat), once no pod anywhere has a host port in them.
  if iptables -t nat -S CNI-HOSTPORT-DNAT >/dev/null 2>&1 \
    && [ "$(iptables -t nat -S CNI-HOSTPORT-DNAT | grep -c '^-A')" -eq 0 ]; then
    iptables -t nat -D PREROUTING -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT 2>/dev/null || true
    iptables -t nat -D OUTPUT -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT 2>/dev/null || true
    iptables -t nat -D POSTROUTING -m comment --comment "CNI portfwd requiring masquerade" -j CNI-HOSTPORT-MASQ 2>/dev/null || true
    for p in CNI-HOSTPORT-DNAT CNI-HOSTPORT-MASQ CNI-HOSTPORT-SETMARK; do
      iptables -t nat -F "$p" 2>/dev/null && iptables -t nat -X "$p" 2>/dev/null || true
    done
    log "removed portmap's empty iptables chains (nat CNI-HOSTPORT-*)"
  fi
  rm -rf "$run_dir/client" "$run_dir/pod-logs"
  rm -rf "$state_dir" "$runc_root" "$ipam_dir" "$net_dir" "$sock" "$sock.ttrpc" "$config"
  if [ "$purge" -eq 1 ] && [ -d "$root_dir" ]; then
    rm -rf "$root_dir" && log "$root_dir removed"
  fi
  log "stopped"
}

status() {
  local pid rc=0
  if pid="$(our_pid)"; then log "containerd: pid $pid"; else log "containerd: not running (by $pidf)"; fi
  if answers; then
    log "socket $sock answers"
    "${client[@]}" --timeout 10 version || true
    log "images: $("${ctr_k8s[@]}" images ls -q | tr '\n' ' ')"
    log "pods: $("${client[@]}" --timeout 10 list-pods | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))' 2>/dev/null || echo '?')"
  else
    log "socket $sock does not answer"
    rc=3
  fi
  if ip link show "$bridge" >/dev/null 2>&1; then log "bridge $bridge: present"; else log "bridge $bridge: absent"; fi
  log "shims: $(our_shims | tr '\n' ' ')"
  return "$rc"
}

cmd="${1:-}"
[ $# -gt 0 ] && shift
runtime_binary="" purge=0
while [ $# -gt 0 ]; do
  case "$1" in
    --runtime-binary) [ $# -ge 2 ] || die "--runtime-binary needs a path"; runtime_binary="$2"; shift ;;
    --runtime-binary=*) runtime_binary="${1#*=}" ;;
    --purge) purge=1 ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
  shift
done
case "$cmd" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  -h|--help|help) usage ;;
  *) usage >&2; exit 2 ;;
esac
