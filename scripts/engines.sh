#!/usr/bin/env bash
# Starts and stops containerd and dockerd without systemd, for the tests
# and for trying vmlab-runtime by hand (Debian's docker.io).
#
#   scripts/engines.sh start    containerd, then dockerd on containerd's socket;
#                               waits (at most $VMLAB_ENGINES_TIMEOUT s, default 60)
#                               until `/usr/bin/docker info` works. Already running:
#                               says so and exits 0.
#   scripts/engines.sh stop     stops what `start` started (by PID: SIGTERM, then
#                               SIGKILL after 30 s), and restores net.ipv4.ip_forward
#                               and the iptables FORWARD policy that dockerd changes
#   scripts/engines.sh status   what runs; exit 0 if both run and docker answers, else 3
#
# State in /run/vmlab-engines/: containerd.pid and dockerd.pid (only for
# daemons this script started), net.saved (the settings before dockerd),
# containerd.log and dockerd.log (appended, kept after stop).
# The last line of `start` is "engines: started" when it started at least
# one daemon, "engines: already running" when it started none.
set -euo pipefail
log() { echo "engines: $*"; }
die() { echo "engines: ERROR: $*" >&2; exit 1; }
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

run_dir=/run/vmlab-engines
timeout_s="${VMLAB_ENGINES_TIMEOUT:-60}"
ctr_sock=/run/containerd/containerd.sock
docker_sock=/var/run/docker.sock
# Debian's CLI, not a newer /usr/local/bin/docker that may shadow it.
docker_cli=/usr/bin/docker

# is_live PID NAME, alive_pid FILE NAME.
# shellcheck source=scripts/lib/proc.sh
. "$repo/scripts/lib/proc.sh"
# Any live process named NAME (started by us or not).
any_pid() {
  local pid
  for pid in $(pgrep -x "$1" || true); do
    if is_live "$pid" "$1"; then echo "$pid"; return 0; fi
  done
  return 1
}

containerd_ok() { timeout 5 ctr --address "$ctr_sock" version >/dev/null 2>&1; }
docker_ok() { DOCKER_HOST="unix://$docker_sock" timeout 10 "$docker_cli" info >/dev/null 2>&1; }

need() {
  local b
  for b in containerd dockerd ctr "$docker_cli"; do
    command -v "$b" >/dev/null || die "$b is missing (apt-get install docker.io)"
  done
  [ "$(id -u)" -eq 0 ] || die "must run as root"
}

# Waits until CHECK succeeds, or the process PID (if given) dies, or the timeout.
wait_for() {
  local what="$1" check="$2" pid="$3" logf="$4" waited=0
  until "$check"; do
    if [ -n "$pid" ] && ! is_live "$pid" "$what"; then
      tail -n 20 "$logf" >&2 || true
      die "$what exited while starting (log: $logf)"
    fi
    if [ "$waited" -ge "$timeout_s" ]; then
      tail -n 20 "$logf" >&2 || true
      die "$what did not answer within ${timeout_s}s (log: $logf)"
    fi
    sleep 1
    waited=$((waited + 1))
  done
}

save_net() {
  # Keep the first saved state: after a dockerd that was killed without
  # `stop`, the live settings are dockerd's, not the machine's.
  [ -f "$run_dir/net.saved" ] && return 0
  local fwd policy
  fwd="$(sysctl -n net.ipv4.ip_forward)"
  policy="$(iptables -S FORWARD 2>/dev/null | awk '$1 == "-P" {print $3; exit}')"
  printf 'ip_forward=%s\nforward_policy=%s\n' "$fwd" "${policy:-}" > "$run_dir/net.saved"
}

restore_net() {
  [ -f "$run_dir/net.saved" ] || return 0
  local fwd policy
  fwd="$(sed -n 's/^ip_forward=//p' "$run_dir/net.saved")"
  policy="$(sed -n 's/^forward_policy=//p' "$run_dir/net.saved")"
  if [ -n "$fwd" ]; then
    sysctl -q -w "net.ipv4.ip_forward=$fwd" && log "net.ipv4.ip_forward restored to $fwd"
  fi
  if [ -n "$policy" ]; then
    iptables -P FORWARD "$policy" && log "iptables FORWARD policy restored to $policy"
  fi
  rm -f "$run_dir/net.saved"
}

start() {
  need
  mkdir -p "$run_dir"
  local started=0 pid
  # containerd
  if containerd_ok; then
    log "containerd is already running (pid $(any_pid containerd || echo '?'))"
  else
    [ -z "$(any_pid containerd)" ] || die "a containerd (pid $(any_pid containerd)) runs but does not answer on $ctr_sock"
    # setsid: its own session, so the caller's terminal signals do not reach
    # it; every fd to the log so it holds none of the caller's pipes.
    setsid containerd </dev/null >>"$run_dir/containerd.log" 2>&1 &
    pid=$!
    echo "$pid" > "$run_dir/containerd.pid"
    log "containerd started (pid $pid, log $run_dir/containerd.log)"
    wait_for containerd containerd_ok "$pid" "$run_dir/containerd.log"
    started=1
  fi
  # dockerd
  if docker_ok; then
    log "dockerd is already running (pid $(any_pid dockerd || echo '?'))"
  else
    [ -z "$(any_pid dockerd)" ] || die "a dockerd (pid $(any_pid dockerd)) runs but does not answer on $docker_sock"
    # dockerd refuses to start over a pid file left by a killed dockerd.
    if [ -f /var/run/docker.pid ] && [ -z "$(alive_pid /var/run/docker.pid dockerd)" ]; then
      rm -f /var/run/docker.pid
    fi
    save_net
    setsid dockerd --containerd "$ctr_sock" </dev/null >>"$run_dir/dockerd.log" 2>&1 &
    pid=$!
    echo "$pid" > "$run_dir/dockerd.pid"
    log "dockerd started (pid $pid, log $run_dir/dockerd.log)"
    wait_for dockerd docker_ok "$pid" "$run_dir/dockerd.log"
    started=1
  fi
  log "docker info works ($docker_cli, server $(DOCKER_HOST="unix://$docker_sock" "$docker_cli" version --format '{{.Server.Version}}' 2>/dev/null))"
  if [ "$started" -eq 1 ]; then log "started"; else log "already running"; fi
}

# Stops the daemon recorded in NAME.pid, if it is still that daemon.
stop_one() {
  local name="$1" pid waited=0
  pid="$(alive_pid "$run_dir/$name.pid" "$name" || true)"
  if [ -z "$pid" ]; then
    if [ -f "$run_dir/$name.pid" ]; then log "$name (pid $(cat "$run_dir/$name.pid")) is not running"; fi
    rm -f "$run_dir/$name.pid"
    return 0
  fi
  kill -TERM "$pid" 2>/dev/null || true
  while is_live "$pid" "$name"; do
    if [ "$waited" -eq 60 ]; then
      log "$name (pid $pid) did not stop in 30 s: SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
    sleep 0.5
    waited=$((waited + 1))
    [ "$waited" -lt 80 ] || die "$name (pid $pid) is still there after SIGKILL"
  done
  rm -f "$run_dir/$name.pid"
  log "$name (pid $pid) stopped"
}

stop() {
  [ "$(id -u)" -eq 0 ] || die "must run as root"
  # dockerd first: it stops its containers and talks to containerd on the way out.
  stop_one dockerd
  stop_one containerd
  restore_net
  local p shims
  # A container whose engine was killed keeps its shim (containerd does not
  # stop them); said, not killed: starting the engines again reattaches it.
  shims="$(pgrep -f -- "containerd-shim.* -address $ctr_sock" | tr '\n' ' ' || true)"
  if [ -n "$shims" ]; then log "warning: containerd shims still run (pids ${shims% }): start the engines again and remove their containers"; fi
  for p in dockerd containerd; do
    if [ -n "$(any_pid "$p")" ]; then log "a $p not started by engines.sh still runs (pid $(any_pid "$p")): left alone"; fi
  done
}

status() {
  local rc=0 p pid
  for p in containerd dockerd; do
    pid="$(alive_pid "$run_dir/$p.pid" "$p" || true)"
    if [ -n "$pid" ]; then echo "$p: running (pid $pid, started by engines.sh)"
    elif [ -n "$(any_pid "$p")" ]; then echo "$p: running (pid $(any_pid "$p"), not started by engines.sh)"
    else echo "$p: stopped"; rc=3; fi
  done
  if docker_ok; then echo "docker info: ok"; else echo "docker info: fails"; rc=3; fi
  [ -f "$run_dir/net.saved" ] && echo "saved network settings: $(tr '\n' ' ' < "$run_dir/net.saved")"
  return "$rc"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
