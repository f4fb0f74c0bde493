#!/usr/bin/env bash
# Builds the container images the OCI-runtime tests run, offline (no
# registry), and loads them into Docker (and, with --podman, Podman):
#   vmlab-busybox:test   Debian's static busybox with its applet links,
#                        /etc/passwd and /etc/group with root (0:0) and
#                        user (1000:1000, home /home/user), /tmp (1777);
#                        CMD ["/bin/sh"].
#   vmlab-postgres:test  PostgreSQL 15 from the host's Debian packages
#                        (postgresql-15, postgresql-client-15; installed if
#                        missing): their files without docs, man pages,
#                        translations, JIT (llvmjit, bitcode) and pgxs, the
#                        ldd closure of their binaries and modules, tzdata's
#                        zoneinfo (without right/), busybox's applets (/bin/sh,
#                        su, ...) in a merged-/usr layout, the user postgres
#                        (999:999, home /var/lib/postgresql) and
#                        /usr/local/bin/docker-entrypoint.sh, a small subset of
#                        the official image's, and a PRE-INITIALIZED cluster in
#                        /var/lib/postgresql/data (0700, 999:999): the host's
#                        initdb (the same package) runs at build time, at
#                        native speed, as 999:999 (in a mount namespace whose
#                        /etc/passwd has that uid) with --locale=C
#                        --encoding=UTF8 --auth=trust --username=postgres -N
#                        and TZ=UTC, then postgresql.conf gets
#                        listen_addresses='*', shared_buffers=16MB,
#                        dynamic_shared_memory_type=posix, timezone and
#                        log_timezone 'UTC', and pg_hba.conf
#                        "host all all all trust" (local stays trust). initdb
#                        in a micro-VM, where the guest kernel is emulated,
#                        takes minutes; the baked cluster starts in seconds.
#                        The entrypoint exports TZ=UTC if TZ is unset; with the
#                        baked cluster (PG_VERSION exists) it runs no initdb
#                        and trusts every host, ignoring POSTGRES_PASSWORD
#                        (unless POSTGRES_HOST_AUTH_METHOD names another
#                        method: then it sets the password); on the first
#                        start it creates POSTGRES_USER and POSTGRES_DB if
#                        they are not postgres, in single-user mode (no
#                        server), and runs /docker-entrypoint-initdb.d/*.sql
#                        and *.sh (with a temporary server, only if there are
#                        any). An empty $PGDATA (a fresh volume) gets initdb
#                        as postgres (POSTGRES_USER, POSTGRES_PASSWORD,
#                        POSTGRES_INITDB_ARGS), listen_addresses='*' and
#                        "host all all all METHOD" (POSTGRES_HOST_AUTH_METHOD,
#                        else scram-sha-256 with a POSTGRES_PASSWORD, else
#                        trust; the official image refuses to start without
#                        a password, this one trusts). Then it execs
#                        postgres as user postgres. Arguments that are not
#                        postgres options are run instead, so the image is a
#                        client too (psql, pg_isready, ... are in PATH);
#                        CMD ["/usr/local/bin/docker-entrypoint.sh"],
#                        ENV PGDATA, PATH and PSQL_PAGER= (no pager: the image
#                        has none, Debian's psql runs "pager", and under the
#                        vmlab runtime stdout can be a terminal of 0 rows, so
#                        psql -c "select 42" ran it and failed), EXPOSE 5432
#                        (docker import takes no STOPSIGNAL); no VOLUME (so
#                        containers leave no anonymous volumes).
# Each root file system is a tar with fixed mtimes and owners, sorted,
# cached as ${XDG_CACHE_HOME:-~/.cache}/vmlab/oci-images/KEY.tar, KEY
# (busybox-DIGEST, postgres-DIGEST) being a digest of its inputs: this
# script's recipe, and for busybox its bytes, for postgres the installed
# versions of its Debian packages and the sha256 of every host file that
# goes in. Busybox's tar is reproducible; postgres's is not byte for byte
# (initdb picks a random system identifier), but being keyed by its inputs
# it is built once. The image carries the label org.vmlab.input=KEY; an
# image that already has it is not imported again.
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

# The Debian packages whose files make up vmlab-postgres:test.
pg_packages=(postgresql-15 postgresql-client-15)

# shellcheck source=scripts/lib/apt.sh
. "$repo/scripts/lib/apt.sh"
apt_install_missing busybox-static python3 tzdata "${pg_packages[@]}" \
  || die "cannot install busybox-static, python3, tzdata, ${pg_packages[*]}"

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

# The recipe of the postgres root, besides its packages and host files.
postgres_recipe_version=2
pg_uid=999
pg_passwd="root:x:0:0:root:/root:/bin/sh
postgres:x:$pg_uid:$pg_uid:PostgreSQL administrator:/var/lib/postgresql:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
"
pg_group="root:x:0:
postgres:x:$pg_uid:
nogroup:x:65534:
"
pg_path=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/usr/lib/postgresql/15/bin
# Busybox ash, not bash: the image has no bash.
pg_entrypoint="$(cat <<'SH'
#!/bin/sh
# vmlab-postgres:test (scripts/build-oci-images.sh): a small subset of the
# official postgres image's docker-entrypoint.sh.
#
# The image ships an initialized cluster in /var/lib/postgresql/data (made
# by initdb at image build time, superuser postgres, locale C, UTF8) so that
# a container starts in seconds in a micro-VM, where initdb takes minutes.
# That cluster trusts every host (pg_hba: local and "host all all all
# trust"): this test image ignores POSTGRES_PASSWORD and accepts any or no
# password, unless POSTGRES_HOST_AUTH_METHOD names another method (then the
# password is set and that method required). On its first start, POSTGRES_USER
# (a superuser, besides postgres) and POSTGRES_DB are created if they are not
# postgres, in single-user mode (no server is started for it); only
# /docker-entrypoint-initdb.d/* (none in the image) start a temporary server.
# An empty $PGDATA (a mounted volume) gets initdb at start, as in the
# official image.
set -eu
: "${PGDATA:=/var/lib/postgresql/data}"
export PGDATA
# Without TZ, anything timezone-related scans /usr/share/zoneinfo (slow).
: "${TZ:=UTC}"
export TZ
# No arguments, or options: the server. Anything else (psql ...): run it.
if [ "$#" -eq 0 ] || [ "${1#-}" != "$1" ]; then
  set -- postgres "$@"
fi
[ "$1" = postgres ] || exec "$@"

if [ "$(id -u)" = 0 ]; then
  mkdir -p "$PGDATA" /var/run/postgresql
  if [ "$(stat -c %U "$PGDATA")" != postgres ]; then
    chown -R postgres:postgres "$PGDATA"
  fi
  chmod 700 "$PGDATA"
  chown postgres:postgres /var/run/postgresql
  chmod 2775 /var/run/postgresql
  # Again as postgres (busybox su execs the shell, which execs this script).
  # shellcheck disable=SC2016
  exec su postgres -s /bin/sh -c 'exec "$0" "$@"' "$0" "$@"
fi

# SQL quoting: an identifier, a literal.
qi() { printf '"%s"' "$(printf %s "$1" | sed 's/"/""/g')"; }
ql() { printf "'%s'" "$(printf %s "$1" | sed "s/'/''/g")"; }
pg_user="${POSTGRES_USER:-postgres}"
pg_db="${POSTGRES_DB:-$pg_user}"

# Runs SQL (one statement a line) in single-user mode, quick as it starts no
# server; it reports errors on stderr and goes on, so they are looked for.
single_user() {
  err="$(printf '%s\n' "$1" | postgres --single -D "$PGDATA" postgres 2>&1 >/dev/null)" || {
    echo "$err" >&2; exit 1; }
  case "$err" in
    *ERROR:*|*FATAL:*) echo "$err" >&2; exit 1 ;;
  esac
}

# The init scripts, with a server on the Unix socket only.
init_scripts() {
  for f in /docker-entrypoint-initdb.d/*; do
    [ -e "$f" ] || return 0
    break
  done
  pg_ctl -D "$PGDATA" -o "-c listen_addresses=" -w -t 120 start
  export PGUSER="$pg_user"
  for f in /docker-entrypoint-initdb.d/*; do
    case "$f" in
      *.sh)
        echo "$0: running $f"
        if [ -x "$f" ]; then
          "$f"
        else
          # shellcheck disable=SC1090
          . "$f"
        fi ;;
      *.sql)
        echo "$0: running $f"
        psql -v ON_ERROR_STOP=1 --no-psqlrc --no-password --dbname "$pg_db" -f "$f" ;;
      *) echo "$0: ignoring $f" ;;
    esac
  done
  unset PGUSER
  pg_ctl -D "$PGDATA" -m fast -w stop
}

if [ -s "$PGDATA/PG_VERSION" ]; then
  if [ -e "$PGDATA/vmlab-first-start" ]; then
    # The image's cluster, started for the first time.
    sql=
    auth="${POSTGRES_HOST_AUTH_METHOD:-trust}"
    pw=
    if [ "$auth" != trust ] && [ -n "${POSTGRES_PASSWORD:-}" ]; then
      pw=" PASSWORD $(ql "$POSTGRES_PASSWORD")"
    fi
    if [ "$pg_user" != postgres ]; then
      sql="CREATE ROLE $(qi "$pg_user") SUPERUSER LOGIN$pw;"
    elif [ -n "$pw" ]; then
      sql="ALTER ROLE postgres$pw;"
    fi
    if [ "$pg_db" != postgres ]; then
      sql="$sql
CREATE DATABASE $(qi "$pg_db") OWNER $(qi "$pg_user");"
    fi
    [ -z "$sql" ] || single_user "$sql"
    if [ "$auth" != trust ]; then
      sed -i "s/^host all all all trust\$/host all all all $auth/" "$PGDATA/pg_hba.conf"
    fi
    init_scripts
    rm -f "$PGDATA/vmlab-first-start"
  fi
else
  if [ -n "${POSTGRES_HOST_AUTH_METHOD:-}" ]; then
    auth="$POSTGRES_HOST_AUTH_METHOD"
  elif [ -n "${POSTGRES_PASSWORD:-}" ]; then
    auth=scram-sha-256
  else
    auth=trust
  fi
  pwfile=
  if [ -n "${POSTGRES_PASSWORD:-}" ]; then
    pwfile="$(mktemp)"
    printf "%s\n" "$POSTGRES_PASSWORD" >"$pwfile"
  fi
  # POSTGRES_INITDB_ARGS: split into words, as in the official image.
  # shellcheck disable=SC2086
  initdb --username="$pg_user" ${pwfile:+--pwfile="$pwfile"} --locale=C --encoding=UTF8 \
    --auth-local=trust --auth-host=trust ${POSTGRES_INITDB_ARGS:-}
  [ -z "$pwfile" ] || rm -f "$pwfile"
  printf "listen_addresses = '*'\n" >>"$PGDATA/postgresql.conf"
  printf "host all all all %s\n" "$auth" >>"$PGDATA/pg_hba.conf"
  if [ "$pg_db" != postgres ]; then
    single_user "CREATE DATABASE $(qi "$pg_db");"
  fi
  init_scripts
  echo "$0: PostgreSQL init process complete; ready for start up."
fi
exec "$@"
SH
)"$'\n'

# Writes a root's tar: rootfs_py busybox OUT BUSYBOX PASSWD GROUP, or
# rootfs_py postgres OUT|--list BUSYBOX PASSWD GROUP ENTRYPOINT UID PGDATA PACKAGE...
# (--list: print the host files it would take, one a line, and write nothing;
# PGDATA: a host directory that becomes var/lib/postgresql/data, owned by
# UID:UID with its files' modes, or - for none).
rootfs_py() {
  python3 - "$@" <<'PY'
import io, os, stat, subprocess, sys, tarfile
mode, out, busybox, passwd, group = sys.argv[1:6]
entries = {}  # path in the root -> (kind, mode, data, (uid, gid))
def d(path, mode=0o755, owner=(0, 0)):
    entries[path] = ("dir", mode, None, owner)
def f(path, data, mode=0o644, owner=(0, 0)):
    entries[path] = ("file", mode, data, owner)
def resolve(path):
    """PATH with the root's directory symlinks (bin -> usr/bin) followed."""
    parts, cur = path.split("/"), ""
    for i, part in enumerate(parts):
        cur = part if not cur else cur + "/" + part
        e = entries.get(cur)
        if e and e[0] == "link" and i < len(parts) - 1:
            t = e[2]
            base = "" if t.startswith("/") else os.path.dirname(cur)
            return resolve(os.path.normpath(os.path.join(base, t.lstrip("/"))).lstrip("./")
                           + "/" + "/".join(parts[i + 1:]))
    return path
def parents(path):
    parent = os.path.dirname(path)
    if parent and parent not in entries:
        parents(parent)
        d(parent)
def host(p):
    """Host path P into the root at the same place, with the symlinks on its way."""
    parts, cur = p.strip("/").split("/"), ""
    for i, part in enumerate(parts):
        cur = part if not cur else cur + "/" + part
        hp = "/" + cur
        st = os.lstat(hp)
        if stat.S_ISLNK(st.st_mode):
            t = os.readlink(hp)
            entries.setdefault(cur, ("link", 0o777, t, (0, 0)))
            target = os.path.normpath(os.path.join(os.path.dirname(hp), t))
            return host("/".join([target] + parts[i + 1:]))
        if stat.S_ISDIR(st.st_mode):
            if cur not in entries:
                d(cur, stat.S_IMODE(st.st_mode))
        elif i == len(parts) - 1 and stat.S_ISREG(st.st_mode):
            entries.setdefault(cur, ("host", stat.S_IMODE(st.st_mode), hp, (0, 0)))
            return
        else:
            sys.exit(f"rootfs: {hp}: not a file, directory or symlink")
def applets(prefix):
    """Busybox at PREFIX/busybox with a link for each applet."""
    with open(busybox, "rb") as fh:
        f(prefix + "/busybox", fh.read(), 0o755)
    names = subprocess.run([busybox, "--list-full"], check=True, capture_output=True,
                           text=True).stdout.split()
    for a in names:
        a = resolve(a.lstrip("/"))
        if a in entries:
            continue
        parents(a)
        entries[a] = ("link", 0o777, os.path.relpath(prefix + "/busybox", os.path.dirname(a)),
                      (0, 0))

if mode == "busybox":
    for p in ["bin", "sbin", "usr", "usr/bin", "usr/sbin", "etc", "root", "home",
              "proc", "sys", "dev", "run", "var", "var/tmp", "mnt"]:
        d(p)
    d("root", 0o700)
    d("tmp", 0o1777)
    d("home/user", owner=(1000, 1000))
    applets("bin")
elif mode == "postgres":
    entrypoint, uid, pgdata = sys.argv[6], int(sys.argv[7]), sys.argv[8]
    listed = subprocess.run(["dpkg-query", "-L"] + sys.argv[9:], check=True,
                            capture_output=True, text=True).stdout.split("\n")
    skip = ("/usr/share/doc/", "/usr/share/man/", "/usr/share/locale/", "/usr/share/lintian/",
            "/usr/share/postgresql/15/man/", "/usr/lib/postgresql/15/lib/bitcode/",
            "/usr/lib/postgresql/15/lib/llvmjit", "/usr/lib/postgresql/15/lib/pgxs/")
    files = [p for p in listed if p.startswith("/usr/") and not p.startswith(skip)
             and not os.path.isdir(p) and os.path.lexists(p)]
    for top, dirs, names in os.walk("/usr/share/zoneinfo"):
        dirs[:] = sorted(x for x in dirs if not (top == "/usr/share/zoneinfo" and x == "right"))
        files += [os.path.join(top, n) for n in names]
        files += [os.path.join(top, x) for x in dirs if os.path.islink(os.path.join(top, x))]
    # The merged-/usr layout of Debian 12 (and the host's symlinks on the way).
    for p in ["/bin", "/sbin", "/lib", "/lib64"]:
        host(p)
    # Every ELF and the shared libraries they need (ldd: the whole closure).
    elves, libs = [], set()
    for p in files:
        if os.path.isfile(p) and not os.path.islink(p):
            with open(p, "rb") as fh:
                if fh.read(4) == b"\x7fELF":
                    elves.append(p)
    for p in elves:
        r = subprocess.run(["ldd", p], capture_output=True, text=True)
        for line in r.stdout.splitlines():
            w = line.split()
            if "not found" in line:
                sys.exit(f"rootfs: {p}: {line.strip()}")
            if "=>" in w and len(w) > w.index("=>") + 1 and w[w.index("=>") + 1].startswith("/"):
                libs.add(w[w.index("=>") + 1])
            elif w and w[0].startswith("/"):
                libs.add(w[0])
    for p in sorted(set(files) | libs):
        host(p)
    if out == "--list":
        for path in sorted(entries):
            if entries[path][0] == "host":
                print(entries[path][2])
        sys.exit(0)
    applets("usr/bin")
    for p in ["etc", "root", "home", "proc", "sys", "dev", "run", "var", "var/lib",
              "var/tmp", "mnt", "usr/local", "usr/local/bin", "usr/local/sbin",
              "docker-entrypoint-initdb.d"]:
        parents(p)
        d(p)
    d("root", 0o700)
    d("tmp", 0o1777)
    d("var/tmp", 0o1777)
    entries["var/run"] = ("link", 0o777, "../run", (0, 0))
    d("run/postgresql", 0o2775, (uid, uid))
    d("var/lib/postgresql", 0o755, (uid, uid))
    f("etc/nsswitch.conf", b"passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n")
    f("usr/local/bin/docker-entrypoint.sh", entrypoint.encode(), 0o755)
    for b in ["postgres", "initdb", "pg_ctl", "psql", "pg_isready", "pg_dump", "createdb"]:
        entries["usr/local/bin/" + b] = ("link", 0o777, "../../lib/postgresql/15/bin/" + b, (0, 0))
    if pgdata != "-":
        # The cluster initdb made on the host, owned by postgres (UID:UID).
        for top, dirs, names in os.walk(pgdata):
            dirs.sort()
            rel = os.path.relpath(top, pgdata)
            dst = "var/lib/postgresql/data" + ("" if rel == "." else "/" + rel)
            d(dst, stat.S_IMODE(os.lstat(top).st_mode), (uid, uid))
            for n in names + [x for x in dirs if os.path.islink(os.path.join(top, x))]:
                hp = os.path.join(top, n)
                st = os.lstat(hp)
                if stat.S_ISLNK(st.st_mode):
                    entries[dst + "/" + n] = ("link", 0o777, os.readlink(hp), (uid, uid))
                elif stat.S_ISREG(st.st_mode):
                    entries[dst + "/" + n] = ("host", stat.S_IMODE(st.st_mode), hp, (uid, uid))
                else:
                    sys.exit(f"rootfs: {hp}: not a file, directory or symlink")
else:
    sys.exit(f"rootfs: unknown root {mode}")
f("etc/passwd", passwd.encode())
f("etc/group", group.encode())

tmp = out + ".tmp"
with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
    for path in sorted(entries):
        kind, mode, data, owner = entries[path]
        ti = tarfile.TarInfo(path)
        ti.mtime, ti.mode, ti.uname, ti.gname = 0, mode, "", ""
        ti.uid, ti.gid = owner
        if kind == "dir":
            ti.type = tarfile.DIRTYPE
            tar.addfile(ti)
        elif kind == "link":
            ti.type, ti.linkname = tarfile.SYMTYPE, data
            tar.addfile(ti)
        else:
            if kind == "host":
                with open(data, "rb") as fh:
                    data = fh.read()
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
os.rename(tmp, out)
PY
}

# Imports TAR as IMAGE with the label KEY and the CHANGEs (Dockerfile
# instructions: CMD ..., ENV ...) into Docker and/or Podman, unless the image
# there already has that label.
import_image() {
  local image="$1" tar="$2" key="$3" have engine change
  shift 3
  local -a cli quiet changes=()
  for change in "$@" "LABEL org.vmlab.input=$key"; do
    changes+=(--change "$change")
  done
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
    "${cli[@]}" import "${quiet[@]}" "${changes[@]}" "$tar" "$image" >/dev/null
    log "$engine: $image imported (org.vmlab.input=$key)"
  done
}

# This script's lines from the function NAME() to its closing brace.
recipe_of() { sed -n "/^$1()/,/^}/p" "${BASH_SOURCE[0]}"; }

build_busybox() {
  local key tar
  key="busybox-$( { echo "busybox-recipe $busybox_recipe_version"; sha256sum /bin/busybox | cut -d' ' -f1;
            printf '%s' "$passwd" "$group"; recipe_of rootfs_py; recipe_of build_busybox; } \
          | sha256sum | cut -c1-16)"
  tar="$cache/$key.tar"
  if [ -f "$tar" ]; then
    log "rootfs $tar (cached)"
  else
    rootfs_py busybox "$tar" /bin/busybox "$passwd" "$group"
    log "rootfs $tar ($(stat -c %s "$tar") bytes)"
  fi
  import_image vmlab-busybox:test "$tar" "$key" 'CMD ["/bin/sh"]'
}

# Makes the image's cluster in DIR/data (DIR: an empty directory) with the
# host's initdb, the image's own (the same Debian package), as the image's
# postgres ($pg_uid:$pg_uid), and configures it for the image.
bake_pgdata() {
  local dir="$1"
  chown "$pg_uid:$pg_uid" "$dir"
  printf 'postgres:x:%s:%s::/nonexistent:/bin/sh\n' "$pg_uid" "$pg_uid" >"$dir/passwd"
  # initdb refuses to run as root and looks its uid up in /etc/passwd (the
  # host may have no $pg_uid): a private mount namespace with a passwd that
  # has it. TZ=UTC: initdb writes it as timezone (without TZ it scans
  # zoneinfo for the host's zone).
  # shellcheck disable=SC2016
  (cd / && unshare --mount --propagation private sh -c '
    mount --bind "$1/passwd" /etc/passwd &&
    exec env -i TZ=UTC LC_ALL=C PATH=/usr/bin:/bin \
      setpriv --reuid="$2" --regid="$2" --clear-groups \
      /usr/lib/postgresql/15/bin/initdb -D "$1/data" --locale=C --encoding=UTF8 \
        --auth=trust --username=postgres -N' sh "$dir" "$pg_uid") >"$dir/initdb.log" 2>&1 \
    || { cat "$dir/initdb.log" >&2; return 1; }
  # Later settings win: these override initdb's. shared_buffers: the
  # default 128MB costs a micro-VM page faults at start.
  cat >>"$dir/data/postgresql.conf" <<'CONF'

# vmlab-postgres:test (scripts/build-oci-images.sh)
listen_addresses = '*'
shared_buffers = 16MB
dynamic_shared_memory_type = posix
timezone = 'UTC'
log_timezone = 'UTC'
CONF
  # initdb --auth=trust made local and loopback trust; every host too.
  printf '\n# vmlab-postgres:test: every host, without a password.\nhost all all all trust\n' \
    >>"$dir/data/pg_hba.conf"
  # The entrypoint's cue for its first-start setup (POSTGRES_DB, ...).
  : >"$dir/data/vmlab-first-start"
  chown "$pg_uid:$pg_uid" "$dir/data/vmlab-first-start"
  chmod 600 "$dir/data/vmlab-first-start"
}

build_postgres() {
  local key tar inputs bake
  local -a args=(/bin/busybox "$pg_passwd" "$pg_group" "$pg_entrypoint" "$pg_uid")
  inputs="$(rootfs_py postgres --list "${args[@]}" - "${pg_packages[@]}")" \
    || die "cannot list the postgres root's files"
  key="postgres-$( { echo "postgres-recipe $postgres_recipe_version"; sha256sum /bin/busybox | cut -d' ' -f1;
            dpkg-query -W "${pg_packages[@]}" libpq5 busybox-static tzdata;
            printf '%s' "$pg_passwd" "$pg_group" "$pg_entrypoint" "$pg_path";
            recipe_of rootfs_py; recipe_of bake_pgdata; recipe_of build_postgres;
            tr '\n' '\0' <<<"$inputs" | xargs -0 sha256sum; } \
          | sha256sum | cut -c1-16)"
  tar="$cache/$key.tar"
  if [ -f "$tar" ]; then
    log "rootfs $tar (cached)"
  else
    bake="$(mktemp -d)"
    # shellcheck disable=SC2064
    trap "rm -rf '$bake'" EXIT
    bake_pgdata "$bake" || die "initdb for the image's cluster failed"
    rootfs_py postgres "$tar" "${args[@]}" "$bake/data" "${pg_packages[@]}"
    rm -rf "$bake"
    trap - EXIT
    log "rootfs $tar ($(stat -c %s "$tar") bytes, with an initialized cluster)"
  fi
  import_image vmlab-postgres:test "$tar" "$key" 'CMD ["/usr/local/bin/docker-entrypoint.sh"]' \
    "ENV PATH=$pg_path" 'ENV PGDATA=/var/lib/postgresql/data' 'ENV PSQL_PAGER=' 'EXPOSE 5432'
}

build_busybox
build_postgres
