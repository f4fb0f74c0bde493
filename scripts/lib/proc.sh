# shellcheck shell=bash
# Sourced by scripts/engines.sh and scripts/cri.sh: the daemons they start
# are found again by PID file, and a PID counts only while it is that
# program and not a zombie (a PID may have been reused).

# Whether PID is a live (not zombie) process named NAME.
is_live() {
  local st
  [ "$(cat "/proc/$1/comm" 2>/dev/null || true)" = "$2" ] || return 1
  st="$(sed -n 's/^State:[[:space:]]*\([A-Z]\).*/\1/p' "/proc/$1/status" 2>/dev/null || true)"
  [ -n "$st" ] && [ "$st" != Z ] && [ "$st" != X ]
}
# The pid in FILE, if that process is alive and is NAME.
alive_pid() {
  local pid
  pid="$(cat "$1" 2>/dev/null || true)"
  [ -n "$pid" ] && is_live "$pid" "$2" && echo "$pid"
}
