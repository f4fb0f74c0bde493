#!/usr/bin/env bash
# Installs vmlab as an OCI runtime for Docker, Podman and containerd:
#   - a link `vmlab-runtime` -> the vmlab binary (vmlab dispatches on its
#     argv[0] basename), next to the binary, or in --link-dir;
#   - /etc/vmlab/runtime.json: {"kernel": ..., "virtiofsd": ..., "state": ...},
#     where the runtime finds vmlab's guest kernel and virtiofsd;
#   - Docker: "runtimes": {"vmlab": {"path": LINK}} merged into
#     /etc/docker/daemon.json (other keys kept);
#   - Podman: `vmlab = [LINK]` under [engine.runtimes] in
#     /etc/containers/containers.conf (other content kept);
#   - containerd: /etc/containerd/vmlab.toml, the CRI plugin's section with a
#     runtime `vmlab` (io.containerd.runc.v2, options.BinaryName = LINK),
#     for `imports` in /etc/containerd/config.toml (--containerd-import adds
#     that line).
# Idempotent; --uninstall removes what it added. It restarts nothing unless
# --reload is given (SIGHUP to a running dockerd, which rereads its runtimes).
#
# Usage: scripts/install-runtime.sh [--binary PATH] [--kernel PATH] [--virtiofsd PATH]
#          [--link-dir DIR] [--containerd-import] [--reload] [--uninstall]
set -euo pipefail
log() { echo "install-runtime: $*"; }
die() { echo "install-runtime: ERROR: $*" >&2; exit 1; }
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
  cat <<EOF
usage: $0 [--binary PATH] [--kernel PATH] [--virtiofsd PATH] [--link-dir DIR]
          [--containerd-import] [--reload] [--uninstall]
  --binary PATH        the vmlab binary (default: $repo/target/debug/vmlab, else target/release/vmlab)
  --kernel PATH        the guest kernel for runtime.json (default: $repo/target/guest/vmlinux)
  --virtiofsd PATH     virtiofsd for runtime.json (default: target/guest/virtiofsd, else virtiofsd on PATH, else none)
  --link-dir DIR       where the vmlab-runtime link goes (default: the binary's directory if writable,
                       else /usr/local/libexec/vmlab)
  --containerd-import  also add /etc/containerd/vmlab.toml to the imports of /etc/containerd/config.toml
  --reload             SIGHUP a running dockerd so it rereads daemon.json (containerd needs a restart)
  --uninstall          remove the link, runtime.json and the three registrations
EOF
}

binary="" kernel="" virtiofsd="" link_dir="" uninstall=0 reload=0 ctr_import=0
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) binary="${2:?--binary needs a path}"; shift 2 ;;
    --kernel) kernel="${2:?--kernel needs a path}"; shift 2 ;;
    --virtiofsd) virtiofsd="${2:?--virtiofsd needs a path}"; shift 2 ;;
    --link-dir) link_dir="${2:?--link-dir needs a directory}"; shift 2 ;;
    --containerd-import) ctr_import=1; shift ;;
    --reload) reload=1; shift ;;
    --uninstall) uninstall=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
done
[ "$(id -u)" -eq 0 ] || die "must run as root (it writes /etc/docker, /etc/containers, /etc/containerd, /etc/vmlab)"
command -v python3 >/dev/null || die "python3 is needed (JSON/TOML merging)"

config_dir=/etc/vmlab
runtime_json=$config_dir/runtime.json
daemon_json=/etc/docker/daemon.json
containers_conf=/etc/containers/containers.conf
ctr_config=/etc/containerd/config.toml
ctr_snippet=/etc/containerd/vmlab.toml
libexec=/usr/local/libexec/vmlab
# The runtime's state roots (src/oci/state.rs: DEFAULT_ROOT, VM_ROOT), for
# runtime.json's "state".
state_dir=/run/vmlab-oci

abspath() { python3 -c 'import os,sys; print(os.path.abspath(sys.argv[1]))' "$1"; }

# Every file edit: python3, reading the old file, writing a temporary one
# and renaming it over (so a failed merge leaves the old file).
helper_py="$(cat <<'PY'
import json, os, re, sys, tomllib

MARK = "# added by vmlab scripts/install-runtime.sh"

def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".vmlab-tmp"
    with open(tmp, "w") as f:
        f.write(text)
    if os.path.exists(path):
        st = os.stat(path)
        os.chmod(tmp, st.st_mode & 0o7777)
    else:
        os.chmod(tmp, 0o644)
    os.rename(tmp, path)

def read(path):
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return None

def say(msg):
    print("install-runtime: " + msg)

cmd, args = sys.argv[1], sys.argv[2:]

if cmd == "docker-add":
    path, link = args
    text = read(path)
    data = json.loads(text) if text and text.strip() else {}
    if not isinstance(data, dict):
        sys.exit(f"{path}: not a JSON object")
    runtimes = data.setdefault("runtimes", {})
    want = {"path": link}
    if runtimes.get("vmlab") == want:
        say(f"{path}: runtime vmlab already registered")
    else:
        runtimes["vmlab"] = want
        write(path, json.dumps(data, indent=2) + "\n")
        say(f"{path}: runtime vmlab -> {link}")

elif cmd == "docker-remove":
    (path,) = args
    text = read(path)
    if text is None:
        sys.exit(0)
    data = json.loads(text) if text.strip() else {}
    runtimes = data.get("runtimes", {})
    if "vmlab" not in runtimes:
        sys.exit(0)
    del runtimes["vmlab"]
    if not runtimes:
        del data["runtimes"]
    if data:
        write(path, json.dumps(data, indent=2) + "\n")
        say(f"{path}: runtime vmlab removed")
    else:
        os.remove(path)
        say(f"{path}: removed (it held only the vmlab runtime)")

elif cmd in ("podman-add", "podman-remove"):
    path = args[0]
    link = args[1] if cmd == "podman-add" else None
    text = read(path) or ""
    lines = text.splitlines()
    header = re.compile(r'^\s*\[\s*engine\s*\.\s*runtimes\s*\]\s*(#.*)?$')
    any_header = re.compile(r'^\s*\[')
    key = re.compile(r'^\s*"?vmlab"?\s*=')
    start = next((i for i, l in enumerate(lines) if header.match(l)), None)
    if start is not None:
        end = next((i for i in range(start + 1, len(lines)) if any_header.match(lines[i])), len(lines))
        # Drop an existing vmlab key (one line, or a multi-line array).
        i = start + 1
        while i < end:
            if key.match(lines[i]):
                j = i
                while "]" not in lines[j].split("#")[0] and j + 1 < end:
                    j += 1
                del lines[i:j + 1]
                end -= j + 1 - i
            else:
                i += 1
        if link is not None:
            lines.insert(start + 1, f"vmlab = [{json.dumps(link)}]")
        else:
            body = [l for l in lines[start + 1:end] if l.strip() and not l.strip().startswith("#")]
            if not body and start > 0 and lines[start - 1] == MARK:
                del lines[start - 1:end]
    elif link is not None:
        if lines and lines[-1].strip():
            lines.append("")
        lines += [MARK, "[engine.runtimes]", f"vmlab = [{json.dumps(link)}]"]
    new = "\n".join(lines).rstrip("\n") + "\n" if "".join(lines).strip() else ""
    parsed = tomllib.loads(new)
    got = parsed.get("engine", {}).get("runtimes", {}).get("vmlab")
    if link is not None and got != [link]:
        sys.exit(f"{path}: merge failed (engine.runtimes.vmlab = {got!r})")
    if link is None and got is not None:
        sys.exit(f"{path}: could not remove engine.runtimes.vmlab")
    if new == text:
        if link is not None:
            say(f"{path}: runtime vmlab already registered")
    elif not new and link is None:
        os.remove(path)
        say(f"{path}: removed (it held only the vmlab runtime)")
    else:
        write(path, new)
        say(f"{path}: runtime vmlab " + (f"-> {link}" if link else "removed"))

elif cmd == "ctr-unimport":
    # Copy of config.toml without our import, or with it removed in place.
    src, dst, snippet = args
    text = read(src)
    if text is None:
        sys.exit(0)
    out, changed = [], False
    for l in text.splitlines():
        m = re.match(r'^(\s*imports\s*=\s*)\[(.*)\](\s*(#.*)?)$', l)
        if m and json.dumps(snippet) in m.group(2):
            items = [s.strip() for s in m.group(2).split(",") if s.strip() and s.strip() != json.dumps(snippet)]
            changed = True
            if items:
                out.append(f"{m.group(1)}[{', '.join(items)}]{m.group(3)}")
            continue
        if l == MARK and changed is False:
            # our marker sits right above our imports line
            continue
        out.append(l)
    new = "\n".join(out) + "\n"
    tomllib.loads(new)
    if dst == src:
        if changed:
            write(src, new)
            say(f"{src}: import of {snippet} removed")
    else:
        write(dst, new)

elif cmd == "ctr-import":
    path, snippet = args
    text = read(path)
    if text is None:
        text = "version = 2\n"
    parsed = tomllib.loads(text)
    if snippet in parsed.get("imports", []):
        say(f"{path}: already imports {snippet}")
        sys.exit(0)
    if parsed.get("version") != 2:
        sys.exit(f"{path}: not a version 2 config; add imports = [\"{snippet}\"] yourself")
    lines = text.splitlines()
    idx = next((i for i, l in enumerate(lines) if re.match(r'^\s*imports\s*=', l)), None)
    if idx is not None:
        m = re.match(r'^(\s*imports\s*=\s*)\[(.*)\](\s*(#.*)?)$', lines[idx])
        if not m:
            sys.exit(f"{path}: a multi-line imports array; add \"{snippet}\" to it yourself")
        items = [s.strip() for s in m.group(2).split(",") if s.strip()] + [json.dumps(snippet)]
        lines[idx] = f"{m.group(1)}[{', '.join(items)}]{m.group(3)}"
    else:
        # Top-level keys go before the first table.
        first = next((i for i, l in enumerate(lines) if re.match(r'^\s*\[', l)), len(lines))
        lines[first:first] = [MARK, f"imports = [{json.dumps(snippet)}]"]
    new = "\n".join(lines) + "\n"
    if snippet not in tomllib.loads(new).get("imports", []):
        sys.exit(f"{path}: merge failed")
    write(path, new)
    say(f"{path}: imports {snippet}")

elif cmd == "ctr-snippet":
    # stdin: `containerd config dump` of the configuration without our
    # import. containerd replaces a whole plugin section with an imported
    # one (and a `runtimes` table replaces the default one, runc included),
    # so the snippet carries the complete CRI section in effect, plus vmlab.
    out, link, restrict = args
    dump = sys.stdin.read()
    full = tomllib.loads(dump)
    cri = full.get("plugins", {}).get("io.containerd.grpc.v1.cri")
    if cri is None:
        sys.exit("containerd config dump has no io.containerd.grpc.v1.cri section")
    prefix = '[plugins."io.containerd.grpc.v1.cri"'
    vm = prefix + '.containerd.runtimes.vmlab'
    block, inside, skip = [], False, False
    for l in dump.splitlines():
        s = l.strip()
        if s.startswith("["):
            inside = s.startswith(prefix + "]") or s.startswith(prefix + ".")
            skip = s.startswith(vm + "]") or s.startswith(vm + ".")
        if inside and not skip:
            block.append(l)
    block = [re.sub(r'^(\s*restrict_oom_score_adj\s*=\s*)false\s*$', r'\g<1>true', l)
             if restrict == "1" else l for l in block]
    text = "\n".join([
        "# " + "Written by vmlab's scripts/install-runtime.sh from `containerd config dump`:",
        "# the CRI plugin's whole section as it was, plus the runtime `vmlab`.",
        "# containerd replaces a plugin's section with an imported one, so it is",
        "# complete; rerun install-runtime.sh after changing config.toml's CRI section.",
        "# Include it with  imports = [\"" + os.path.abspath(out) + "\"]  in config.toml.",
        "version = 2",
        "",
        *block,
        "",
        "        " + vm + "]",
        '          runtime_type = "io.containerd.runc.v2"',
        "          " + vm + ".options]",
        "            BinaryName = " + json.dumps(link),
        "",
    ])
    parsed = tomllib.loads(text)["plugins"]["io.containerd.grpc.v1.cri"]
    runtimes = parsed["containerd"]["runtimes"]
    if runtimes["vmlab"] != {"runtime_type": "io.containerd.runc.v2", "options": {"BinaryName": link}}:
        sys.exit("snippet: vmlab runtime did not come out as intended")
    for name, rt in cri["containerd"]["runtimes"].items():
        if name != "vmlab" and runtimes.get(name) != rt:
            sys.exit(f"snippet: runtime {name} was not copied faithfully")
    old = read(out)
    if old == text:
        say(f"{out}: up to date")
    else:
        write(out, text)
        say(f"{out}: CRI runtime vmlab -> {link}")

elif cmd == "runtime-json":
    path, kernel, virtiofsd, state = args
    data = {"kernel": kernel}
    if virtiofsd:
        data["virtiofsd"] = virtiofsd
    data["state"] = state
    text = json.dumps(data, indent=2) + "\n"
    if read(path) == text:
        say(f"{path}: up to date")
    else:
        write(path, text)
        say(f"{path}: {json.dumps(data)}")

else:
    sys.exit(f"unknown helper command {cmd}")
PY
)"
helper() { python3 -c "$helper_py" "$@"; }

dockerd_pid() {
  local pid
  for f in /run/vmlab-engines/dockerd.pid /var/run/docker.pid; do
    pid="$(cat "$f" 2>/dev/null || true)"
    if [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = dockerd ]; then
      echo "$pid"; return 0
    fi
  done
  return 1
}

reload_engines() {
  [ "$reload" -eq 1 ] || { log "no daemon restarted: --reload sends SIGHUP to dockerd; restart containerd yourself for it to reread $ctr_config"; return 0; }
  local pid
  if pid="$(dockerd_pid)"; then
    kill -HUP "$pid"
    log "sent SIGHUP to dockerd (pid $pid): it rereads $daemon_json"
  else
    log "dockerd is not running: nothing to reload"
  fi
  log "containerd does not reload its configuration: restart it to reread $ctr_config (Podman reads containers.conf on every call)"
}

# The link: our own symlink is recognized by its target's basename.
our_link() { [ -L "$1" ] && [ "$(basename "$(readlink "$1")")" = vmlab ]; }

if [ "$uninstall" -eq 1 ]; then
  helper docker-remove "$daemon_json"
  helper podman-remove "$containers_conf"
  helper ctr-unimport "$ctr_config" "$ctr_config" "$ctr_snippet"
  if [ -f "$ctr_snippet" ]; then rm -f "$ctr_snippet"; log "$ctr_snippet: removed"; fi
  # Links: the one runtime.json's install recorded, plus the usual places.
  links=()
  if [ -f "$config_dir/link" ]; then links+=("$(cat "$config_dir/link")"); fi
  [ -n "$link_dir" ] && links+=("$link_dir/vmlab-runtime")
  [ -n "$binary" ] && links+=("$(dirname "$(abspath "$binary")")/vmlab-runtime")
  links+=("$repo/target/debug/vmlab-runtime" "$repo/target/release/vmlab-runtime" "$libexec/vmlab-runtime")
  for l in "${links[@]}"; do
    if our_link "$l"; then rm -f "$l"; log "$l: removed"; fi
  done
  rmdir "$libexec" 2>/dev/null || true
  rm -f "$runtime_json" "$config_dir/link"
  rmdir "$config_dir" 2>/dev/null || true
  log "$runtime_json: removed"
  reload_engines
  exit 0
fi

# The binary, the kernel, virtiofsd.
if [ -z "$binary" ]; then
  for b in "$repo/target/debug/vmlab" "$repo/target/release/vmlab"; do
    [ -x "$b" ] && { binary="$b"; break; }
  done
  [ -n "$binary" ] || die "no vmlab binary in $repo/target/{debug,release}: run cargo build --bin vmlab, or give --binary"
fi
binary="$(abspath "$binary")"
{ [ -f "$binary" ] && [ -x "$binary" ]; } || die "$binary is not an executable file"
[ "$(basename "$binary")" = vmlab ] || die "$binary: the binary must be named vmlab (the link is made to it)"
kernel="$(abspath "${kernel:-$repo/target/guest/vmlinux}")"
[ -f "$kernel" ] || die "guest kernel $kernel does not exist: run scripts/build-guest.sh, or give --kernel"
if [ -z "$virtiofsd" ]; then
  if [ -x "$repo/target/guest/virtiofsd" ]; then virtiofsd="$repo/target/guest/virtiofsd"
  else virtiofsd="$(command -v virtiofsd || true)"; fi
fi
if [ -n "$virtiofsd" ]; then
  virtiofsd="$(abspath "$virtiofsd")"
  [ -x "$virtiofsd" ] || die "virtiofsd $virtiofsd is not executable"
else
  log "no virtiofsd found: runtime.json gets none (scripts/build-virtiofsd.sh builds one)"
fi

# The link.
if [ -z "$link_dir" ]; then
  link_dir="$(dirname "$binary")"
  [ -w "$link_dir" ] || link_dir="$libexec"
fi
mkdir -p "$link_dir"
link_dir="$(cd "$link_dir" && pwd)"
link="$link_dir/vmlab-runtime"
if [ "$link_dir" = "$(dirname "$binary")" ]; then target=vmlab; else target="$binary"; fi
if [ -L "$link" ] && [ "$(readlink "$link")" = "$target" ]; then
  log "$link -> $target: exists"
elif [ -e "$link" ] && ! our_link "$link"; then
  die "$link exists and is not a link to a vmlab binary; remove it or use --link-dir"
else
  ln -sfn "$target" "$link"
  log "$link -> $target"
fi
[ "$(readlink -f "$link")" = "$(readlink -f "$binary")" ] || die "$link does not resolve to $binary"
# A previous install's link elsewhere is replaced by this one.
if [ -f "$config_dir/link" ]; then
  old="$(cat "$config_dir/link")"
  if [ "$old" != "$link" ] && our_link "$old"; then rm -f "$old"; log "$old: removed (previous install)"; fi
fi

mkdir -p "$config_dir"
helper runtime-json "$runtime_json" "$kernel" "$virtiofsd" "$state_dir"
echo "$link" > "$config_dir/link"

# Docker, Podman.
helper docker-add "$daemon_json" "$link"
helper podman-add "$containers_conf" "$link"

# containerd: the snippet from the configuration in effect without it.
if command -v containerd >/dev/null; then
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  if [ -f "$ctr_config" ]; then
    helper ctr-unimport "$ctr_config" "$tmp/config.toml" "$ctr_snippet"
  else
    echo "version = 2" > "$tmp/config.toml"
  fi
  # Root without CAP_SYS_RESOURCE cannot lower oom_score_adj, which the CRI
  # pause sandbox asks for (-998): restrict_oom_score_adj then.
  capeff="$(awk '/^CapEff:/ {print $2}' /proc/self/status)"
  restrict=0
  (( (16#$capeff >> 24) & 1 )) || restrict=1
  containerd --config "$tmp/config.toml" config dump \
    | helper ctr-snippet "$ctr_snippet" "$link" "$restrict"
  [ "$restrict" -eq 1 ] && log "$ctr_snippet: restrict_oom_score_adj = true (root lacks CAP_SYS_RESOURCE)"
  if [ "$ctr_import" -eq 1 ]; then
    helper ctr-import "$ctr_config" "$ctr_snippet"
  elif ! grep -qF "\"$ctr_snippet\"" "$ctr_config" 2>/dev/null; then
    log "containerd: add  imports = [\"$ctr_snippet\"]  to $ctr_config (top level), or rerun with --containerd-import, then restart containerd"
  fi
  # Check that containerd reads it as meant.
  cp "$ctr_config" "$tmp/check.toml" 2>/dev/null || echo "version = 2" > "$tmp/check.toml"
  helper ctr-import "$tmp/check.toml" "$ctr_snippet" >/dev/null
  containerd --config "$tmp/check.toml" config dump | grep -qF "BinaryName = \"$link\"" \
    || die "containerd config dump with $ctr_snippet does not show the vmlab runtime"
else
  log "containerd is not installed: no $ctr_snippet"
fi

cat <<EOF
install-runtime: installed. Use it with:
  docker run --runtime vmlab IMAGE ...             (after dockerd rereads $daemon_json: --reload or a restart)
  podman --runtime vmlab run --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 IMAGE ...
  ctr run --runtime io.containerd.runc.v2 --runc-binary $link IMAGE ID ...
  CRI (RuntimeClass handler vmlab): imports = ["$ctr_snippet"] in $ctr_config
EOF
reload_engines
