#!/usr/bin/env python3
"""File-system benchmark (issue 15): a host directory shared with a vmlab
guest over virtio-fs, against the same phases on a virtio-blk disk in the
same guest, on the host itself, in a runc container on a bind mount, and in
a QEMU microvm guest on the same virtiofsd. Runs are interleaved (virtio-fs,
virtio-blk, host, runc, QEMU, virtio-fs, ...); every figure is the median of
N runs, and every run's value is reported too.

Every environment runs the same POSIX shell script (FS_SCRIPT below, written
as fsb.sh into the directory under test, so it never rides on the kernel
command line) in a directory of the file system under test:
  1. write: `dd if=/dev/zero of=F bs=1M count=MIB conv=fsync`;
  2. read: `dd if=F of=/dev/null bs=1M`;
  3. create: FILES empty files, `: > f$i` (a shell builtin: one open(O_CREAT)
     and close each, no process per file);
  4. stat: `[ -e f$i ]` on each (builtin test: one stat() each);
  5. remove: one `rm -f f*` (a readdir for the glob, then lstat+unlink each).
Before every phase it runs `sync` and `echo 3 >
/proc/sys/vm/drop_caches` (guest, container: their kernel's caches; the host
row: the host's), so reads and stats go to the file system, not the dentry,
inode or page cache. It times each phase with a clock read before and after,
in the shell itself (no process per reading): /proc/uptime in the guests
(10 ms resolution; busybox `date` here has no %N, and a read of
/proc/timer_list costs 65-110 ms of emulated guest kernel time), the "now at"
nanoseconds of /proc/timer_list on the host and in the container. The phases
that start a program (write, read, remove) include that program's fork and
exec; the script measures that cost on its own (`dd count=0`, the "spawn"
figure in the JSON) but does not subtract it.

Environments:
  - virtio-fs: `vmlab run --volume TMPDIR:/tmp/fs` (vmlab starts virtiofsd,
    VMLAB_VIRTIOFSD, default target/guest/virtiofsd); /tmp/fs, not /mnt/fs:
    the root disk is read-only and has no /mnt, so the init could not
    create the mount point there (/tmp is a tmpfs);
  - virtio-blk: the same guest with `--disk path=IMG` (/dev/vdb), IMG a
    64 MiB sparse file made with `mkfs.ext4 -q -F -d` each run (inode tables
    and journal initialized by mkfs, not lazily by the guest), mounted at
    /tmp/blk;
  - host: the same script with busybox sh (else /bin/sh) in a temp dir on
    /var/tmp;
  - runc: a bundle from `runc spec` on target/guest/rootfs-tree (read-only
    root), the temp dir bind-mounted on /tmp; so that the phases are the
    same, the container has CAP_SYS_ADMIN and a writable /proc/sys (to drop
    caches) and an unmasked /proc/timer_list (its clock);
  - QEMU microvm + virtiofsd: the same kernel, root disk, memory and kernel
    command line (vmlab's, read from `vmlab -v run`, without vmlab's
    virtio_mmio.device= entries and with the init's fs item for tag
    `bench`), guest RAM in a shared memfd, `-device vhost-user-fs-device`
    (virtio-mmio) on a virtiofsd started here with vmlab's flags.
Both guests use the guest init's own mounting of the share (vmlab=...,fs:).

Output: a Markdown table on stdout (--markdown F also writes it), JSON
(--json F). Every subprocess is bounded (--timeout per guest run), every
temp dir removed, every virtiofsd started here killed.

Usage: scripts/bench_fs.py [--runs 3] [--mib 8] [--files 200] [--json F] [--markdown F]
"""

import argparse
import ctypes
import json
import os
import re
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(SCRIPTS)
sys.path.insert(0, SCRIPTS)
from bench import git_describe, write_report, loadavg, qemu_cmdline, tool_version, vmlab_cmdline, vmlab_defaults  # noqa: E402
from bench_boot import host_description  # noqa: E402

GUEST = os.path.join(REPO, "target/guest")
ENVS = ("virtiofs", "virtioblk", "host", "runc", "qemu")
LABELS = {"virtiofs": "vmlab virtio-fs (`--volume`)", "virtioblk": "vmlab virtio-blk (ext4 on /dev/vdb)",
          "host": "host (ext4, /var/tmp)", "runc": "runc container (bind mount of a host dir)",
          "qemu": "QEMU microvm + virtiofsd"}
FIGURES = {  # key -> (column label, digits)
    "write_mib_s": ("write MiB/s", 2),
    "read_mib_s": ("read MiB/s", 2),
    "create_per_s": ("create/s", 1),
    "stat_per_s": ("stat/s", 1),
    "remove_per_s": ("remove/s", 1),
}
QEMU_TAG = "bench"

# $1 directory, $2 MiB, $3 files, $4 clock: cs (/proc/uptime) or ns
# (/proc/timer_list). KEY=VALUE lines, all FSB_-prefixed.
FS_SCRIPT = r"""
D=$1; MIB=$2; N=$3; CLK=$4; DROP=1
if [ "$CLK" = ns ]; then
  now() { T=; while read w1 w2 w3 w4; do if [ "$w1 $w2" = "now at" ]; then T=$w3; return; fi; done < /proc/timer_list; }
else
  now() { read w1 w2 < /proc/uptime; T=$(( ${w1%.*} * 1000000000 + (1${w1#*.} - 100) * 10000000 )); }
fi
drop() { sync; { echo 3 > /proc/sys/vm/drop_caches; } 2>/dev/null || DROP=0; }
echo FSB_BEGIN=1
now; [ -n "$T" ] || { echo FSB_ERROR=no-clock; exit 1; }
W=$D/fsb.$$
mkdir -p $W/m || { echo FSB_ERROR=mkdir; exit 1; }
now; t0=$T; now; echo FSB_CLOCK_NS=$((T - t0))
now; t0=$T; dd if=/dev/zero of=/dev/null bs=1M count=0 2>/dev/null; now; echo FSB_SPAWN_NS=$((T - t0))
drop
now; t0=$T; dd if=/dev/zero of=$W/data bs=1M count=$MIB conv=fsync 2>/dev/null || echo FSB_ERROR=write; now
echo FSB_WRITE_NS=$((T - t0))
drop
now; t0=$T; dd if=$W/data of=/dev/null bs=1M 2>/dev/null || echo FSB_ERROR=read; now
echo FSB_READ_NS=$((T - t0))
rm -f $W/data
drop
now; t0=$T; i=0; while [ $i -lt $N ]; do : > $W/m/f$i || break; i=$((i + 1)); done; now
echo FSB_CREATE_NS=$((T - t0)); echo FSB_CREATED=$i
drop
now; t0=$T; i=0; k=0; while [ $i -lt $N ]; do [ -e $W/m/f$i ] && k=$((k + 1)); i=$((i + 1)); done; now
echo FSB_STAT_NS=$((T - t0)); echo FSB_STATED=$k
drop
now; t0=$T; rm -f $W/m/f*; now
echo FSB_REMOVE_NS=$((T - t0))
set -- $W/m/f*; [ -e "$1" ] && echo FSB_ERROR=left-files
rmdir $W/m $W
echo FSB_DROP=$DROP
echo FSB_END=1
"""


def log(msg):
    print(f"bench_fs: {msg}", file=sys.stderr, flush=True)


# --- Processes: bounded, killed with us --------------------------------------

PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def _die_with_parent():
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def spawn(argv, **kw):
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent, **kw)


def stop(proc, grace=20):
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def parse_fsb(text):
    """{KEY: value} of the FSB_ lines, once FSB_END (or an error) is there."""
    vals = {}
    for line in text.replace("\r", "").split("\n"):
        m = re.match(r"\s*FSB_([A-Z_]+)=(\S*)\s*$", line)
        if m:
            vals[m.group(1)] = m.group(2)
    return vals


def run_guest(argv, timeout, env=None):
    """Runs a VMM until the script's FSB_END line (or an error, or EOF),
    then stops it. Returns (FSB values, output)."""
    start = time.monotonic()
    proc = spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    out = b""
    err = b""
    vals = {}
    streams = [proc.stdout, proc.stderr]
    try:
        eof = False
        while time.monotonic() - start < timeout and not eof:
            ready, _, _ = select.select(streams, [], [], 1.0)
            for f in ready:
                chunk = os.read(f.fileno(), 65536)
                if f is proc.stderr:
                    err += chunk
                    if not chunk:
                        streams.remove(f)
                    continue
                if not chunk:
                    eof = True
                out += chunk
            text = out.decode(errors="replace")
            vals = parse_fsb(text)
            if "END" in vals or "ERROR" in vals or "Kernel panic - not syncing" in text:
                break
    finally:
        stop(proc)
        err += proc.stderr.read() or b""
    text = out.decode(errors="replace")
    if "END" not in vals or "ERROR" in vals:
        why = vals.get("ERROR") or ("no FSB_END within %ds" % timeout if time.monotonic() - start >= timeout
                                    else f"ended (status {proc.returncode}) without FSB_END")
        raise RuntimeError(f"{argv[0]}: {why}\n--- stdout\n{text[-2500:]}\n--- stderr\n"
                           f"{err.decode(errors='replace')[-2500:]}")
    return vals, text


def figures(vals, mib, files):
    ns = {k: int(vals[k + "_NS"]) for k in ("WRITE", "READ", "CREATE", "STAT", "REMOVE")}
    if int(vals.get("CREATED", -1)) != files or int(vals.get("STATED", -1)) != files:
        raise RuntimeError(f"created {vals.get('CREATED')} / stat'ed {vals.get('STATED')} of {files} files")

    def rate(n, key):
        return n / (ns[key] / 1e9) if ns[key] > 0 else None

    return {"write_mib_s": rate(mib, "WRITE"), "read_mib_s": rate(mib, "READ"),
            "create_per_s": rate(files, "CREATE"), "stat_per_s": rate(files, "STAT"),
            "remove_per_s": rate(files, "REMOVE"),
            "phase_ns": ns, "clock_ns": int(vals["CLOCK_NS"]), "spawn_ns": int(vals["SPAWN_NS"]),
            "caches_dropped": vals.get("DROP") == "1"}


def write_script(directory):
    path = os.path.join(directory, "fsb.sh")
    with open(path, "w") as f:
        f.write(FS_SCRIPT)
    return path


def fresh_dir(workdir, name):
    d = tempfile.mkdtemp(prefix=f"{name}-", dir=workdir)
    os.chmod(d, 0o777)
    write_script(d)
    return d


# --- The environments -----------------------------------------------------------

class Bench:
    def __init__(self, args, workdir):
        self.args = args
        self.workdir = workdir
        self.kernel = os.path.join(GUEST, "vmlinux")
        self.rootfs = os.path.join(GUEST, "rootfs.ext4")
        self.tree = os.path.join(GUEST, "rootfs-tree")
        for path in (self.kernel, self.rootfs, args.vmlab, args.virtiofsd):
            if not os.path.exists(path):
                raise SystemExit(f"bench_fs: {path} is missing (scripts/build-guest.sh, "
                                 "scripts/build-virtiofsd.sh, cargo build --release)")
        self.memory_mib, self.cpus = vmlab_defaults(args.vmlab)
        self.env = dict(os.environ, VMLAB_VIRTIOFSD=args.virtiofsd)
        self.base = [args.vmlab, "-q", "run", "--kernel", self.kernel,
                     "--disk", f"path={self.rootfs},readonly=on"]
        self.reasons = {}
        self.qemu_bin = shutil.which("qemu-system-x86_64")
        self.runc = shutil.which("runc") or next(
            (p for p in ("/usr/sbin/runc", "/sbin/runc") if os.access(p, os.X_OK)), None)
        self.shell = [shutil.which("busybox"), "sh"] if shutil.which("busybox") else ["/bin/sh"]
        if not self.qemu_bin:
            self.reasons["qemu"] = "not measured: qemu-system-x86_64 is not installed"
        if not self.runc:
            self.reasons["runc"] = "not measured: runc is not installed"
        elif os.geteuid() != 0:
            self.reasons["runc"] = "not measured: runc needs root here"
        elif not os.path.isdir(self.tree):
            self.reasons["runc"] = f"not measured: {self.tree} is missing (scripts/build-guest.sh)"
        # vmlab's kernel command line for this guest, for QEMU.
        probe = self.base + ["--", "true"]
        self.cmdline_vmlab = vmlab_cmdline(probe)

    def script_args(self, directory, clock):
        return [directory, str(self.args.mib), str(self.args.files), clock]

    # vmlab, virtio-fs
    def virtiofs(self):
        d = fresh_dir(self.workdir, "virtiofs")
        try:
            argv = self.base + ["--volume", f"{d}:/tmp/fs", "--", "sh", "/tmp/fs/fsb.sh"] + \
                self.script_args("/tmp/fs", "cs")
            vals, _ = run_guest(argv, self.args.timeout, self.env)
            return vals
        finally:
            shutil.rmtree(d, ignore_errors=True)

    # vmlab, virtio-blk
    def virtioblk(self):
        src = fresh_dir(self.workdir, "blk-src")
        img = os.path.join(self.workdir, "blk.img")
        try:
            with open(img, "wb") as f:
                f.truncate(64 << 20)
            # Inode tables and journal initialized here, not by the guest's
            # ext4lazyinit thread while the phases run.
            subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0",
                            "-d", src, img], check=True, timeout=120, capture_output=True)
            cmd = ("mkdir -p /tmp/blk && mount -t ext4 /dev/vdb /tmp/blk && "
                   "exec sh /tmp/blk/fsb.sh " + " ".join(self.script_args("/tmp/blk", "cs")))
            argv = self.base + ["--disk", f"path={img}", "--", "sh", "-c", cmd]
            vals, _ = run_guest(argv, self.args.timeout, self.env)
            return vals
        finally:
            shutil.rmtree(src, ignore_errors=True)
            if os.path.exists(img):
                os.unlink(img)

    # host
    def host(self):
        d = fresh_dir(self.workdir, "host")
        try:
            out = subprocess.run(self.shell + [os.path.join(d, "fsb.sh")] + self.script_args(d, "ns"),
                                 capture_output=True, text=True, timeout=self.args.timeout,
                                 stdin=subprocess.DEVNULL)
            vals = parse_fsb(out.stdout)
            if "END" not in vals or "ERROR" in vals:
                raise RuntimeError(f"host run failed: {out.stdout[-2000:]}\n{out.stderr[-2000:]}")
            return vals
        finally:
            shutil.rmtree(d, ignore_errors=True)

    # runc
    def runc_run(self):
        d = fresh_dir(self.workdir, "runc-data")
        bundle = tempfile.mkdtemp(prefix="runc-bundle-", dir=self.workdir)
        cid = f"vmlab-bench-fs-{os.getpid()}-{int(time.monotonic() * 1000)}"
        try:
            subprocess.run([self.runc, "spec"], cwd=bundle, check=True, timeout=60, capture_output=True)
            cfg_path = os.path.join(bundle, "config.json")
            with open(cfg_path) as f:
                cfg = json.load(f)
            cfg["root"] = {"path": self.tree, "readonly": True}
            proc = cfg["process"]
            proc["terminal"] = False
            proc["args"] = ["sh", "/tmp/fsb.sh"] + self.script_args("/tmp", "ns")
            for kind in ("bounding", "effective", "permitted"):
                caps = proc["capabilities"].setdefault(kind, [])
                if "CAP_SYS_ADMIN" not in caps:
                    caps.append("CAP_SYS_ADMIN")  # drop_caches
            linux = cfg["linux"]
            linux["readonlyPaths"] = [p for p in linux.get("readonlyPaths", []) if p != "/proc/sys"]
            linux["maskedPaths"] = [p for p in linux.get("maskedPaths", []) if p != "/proc/timer_list"]
            cfg["mounts"].append({"destination": "/tmp", "type": "bind", "source": d,
                                  "options": ["rbind", "rw"]})
            with open(cfg_path, "w") as f:
                json.dump(cfg, f, indent=1)
            p = spawn([self.runc, "run", "--bundle", bundle, cid], stdout=subprocess.PIPE,
                      stderr=subprocess.PIPE, text=True)
            try:
                out, err = p.communicate(timeout=self.args.timeout)
            except subprocess.TimeoutExpired:
                stop(p)
                raise RuntimeError(f"runc: no end within {self.args.timeout}s")
            vals = parse_fsb(out)
            if "END" not in vals or "ERROR" in vals:
                raise RuntimeError(f"runc run failed (status {p.returncode}): {out[-2000:]}\n{err[-2000:]}")
            return vals
        finally:
            subprocess.run([self.runc, "delete", "-f", cid], capture_output=True, timeout=60)
            shutil.rmtree(bundle, ignore_errors=True)
            shutil.rmtree(d, ignore_errors=True)

    # QEMU microvm + virtiofsd
    def qemu_argv(self, sock, guest_cmd):
        init_word = "vmlab=" + ",".join([
            "tty:0", "quiet:1", "cmd:" + "\0".join(guest_cmd).encode().hex(),
            "fs:" + "\0".join([QEMU_TAG, "/tmp/fs", "rw"]).encode().hex()])
        words = [w for w in qemu_cmdline(self.cmdline_vmlab).split() if not w.startswith("vmlab=")]
        append = " ".join(words + [init_word])
        mem = f"{self.memory_mib}M"
        return [self.qemu_bin,
                "-M", "microvm,x-option-roms=off,isa-serial=on,rtc=off,pit=on,pic=on,acpi=off,memory-backend=mem",
                "-enable-kvm", "-cpu",
                "host,-arch-capabilities,-invtsc,-kvm-pv-ipi,-kvm-pv-tlb-flush,-kvm-pv-sched-yield",
                "-m", mem, "-smp", str(self.cpus),
                "-object", f"memory-backend-memfd,id=mem,size={mem},share=on",
                "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio", "-no-reboot",
                "-name", "vmlab-bench-fs", "-kernel", self.kernel, "-append", append,
                "-drive", f"id=root,file={self.rootfs},format=raw,if=none,readonly=on",
                "-device", "virtio-blk-device,drive=root",
                "-chardev", f"socket,id=char0,path={sock}",
                "-device", f"vhost-user-fs-device,queue-size=1024,chardev=char0,tag={QEMU_TAG}"]

    def start_virtiofsd(self, shared, sock):
        d = spawn([self.args.virtiofsd, "--socket-path", sock, "--shared-dir", shared,
                   "--sandbox", "chroot", "--cache", "auto", "--xattr", "--thread-pool-size", "0",
                   "--inode-file-handles=never", "--log-level", "error"],
                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 20
        while not os.path.exists(sock):
            if d.poll() is not None:
                raise RuntimeError(f"virtiofsd exited ({d.returncode}): {d.stderr.read().decode()[-1000:]}")
            if time.monotonic() > deadline:
                stop(d)
                raise RuntimeError("virtiofsd made no socket within 20 s")
            time.sleep(0.05)
        return d

    def qemu(self):
        d = fresh_dir(self.workdir, "qemu-data")
        sockdir = tempfile.mkdtemp(prefix="qemu-sock-", dir=self.workdir)
        sock = os.path.join(sockdir, "fs.sock")
        daemon = None
        try:
            daemon = self.start_virtiofsd(d, sock)
            argv = self.qemu_argv(sock, ["sh", "/tmp/fs/fsb.sh"] + self.script_args("/tmp/fs", "cs"))
            vals, _ = run_guest(argv, self.args.timeout)
            return vals
        finally:
            stop(daemon, grace=5)
            shutil.rmtree(sockdir, ignore_errors=True)
            shutil.rmtree(d, ignore_errors=True)

    def run(self, env):
        return {"virtiofs": self.virtiofs, "virtioblk": self.virtioblk, "host": self.host,
                "runc": self.runc_run, "qemu": self.qemu}[env]()


# --- Report ----------------------------------------------------------------------

def summarize(values):
    nums = [v for v in values if isinstance(v, (int, float))]
    if not nums:
        return None
    return {"median": statistics.median(nums), "runs": nums}


def fmt(x, digits):
    if x >= 1000:
        return f"{x:.0f}"
    return f"{x:.{digits}f}"


def markdown(report):
    h = report["host"]
    a = report["args"]
    lines = [
        f"Host: {h['cpu']}, {h['cores']} cores, Linux {h['kernel']}, {h['kvm']}; load average "
        f"{report['load_before']} at the start, {report['load_after']} at the end.",
        f"Run: {report['date']}, vmlab {report['vmlab_commit'] or '?'} (`{report['vmlab_binary']}`, "
        f"built {report['vmlab_built']}), "
        f"{report['qemu'] or 'no QEMU'}, {report['runc'] or 'no runc'}; {a['runs']} interleaved "
        f"run(s), {report['duration_s'] / 60:.1f} min in all.",
        f"Phases: write {a['mib']} MiB (dd bs=1M conv=fsync), read it back (dd bs=1M), create, stat "
        f"and remove {a['files']} files; caches dropped before every phase. Guests: "
        f"{report['memory_mib']} MiB, {report['cpus']} vCPU(s), read-only root disk.",
        "",
        f"Command: `{report['command']}`",
        "",
        "| | " + " | ".join(lbl for lbl, _ in FIGURES.values()) + " |",
        "|---" * (len(FIGURES) + 1) + "|",
    ]
    notes = []
    for env in ENVS:
        row = report["figures"][env]
        if "reason" in row:
            if row["reason"] not in notes:
                notes.append(row["reason"])
            n = notes.index(row["reason"]) + 1
            lines.append(f"| {LABELS[env]} | " + " | ".join([f"n/a ({n})"] * len(FIGURES)) + " |")
            continue
        cells = []
        for key, (_, digits) in FIGURES.items():
            s = row.get(key)
            if s is None:
                cells.append("n/a")
            elif len(s["runs"]) == 1:
                cells.append(fmt(s["median"], digits))
            else:
                cells.append(fmt(s["median"], digits) + " (" + ", ".join(fmt(v, digits) for v in s["runs"]) + ")")
        lines.append(f"| {LABELS[env]} | " + " | ".join(cells) + " |")
    ratio = report["ratio_vmlab_qemu"]
    lines.append("| ratio vmlab virtio-fs / QEMU virtio-fs | " + " | ".join(
        "" if ratio.get(k) is None else f"{ratio[k]:.2f}" for k in FIGURES) + " |")
    lines.append("")
    if any(len(report["figures"][e].get("write_mib_s", {}).get("runs", [])) > 1 for e in ENVS
           if "reason" not in report["figures"][e]):
        lines.append("Medians, every run's value in parentheses.")
    for i, n in enumerate(notes):
        lines.append(f"{i + 1}. {n}")
    lines.append("")
    lines.append("Program start (fork+exec of dd, included in write, read and remove), median: " + ", ".join(
        f"{env} {report['figures'][env]['spawn_ms']:.1f} ms" for env in ENVS
        if "reason" not in report["figures"][env] and report["figures"][env].get("spawn_ms") is not None) + ".")
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--mib", type=int, default=8, help="size of the sequential write and read (MiB)")
    p.add_argument("--files", type=int, default=200,
                   help="files to create, stat and remove (default 200; the issue asks for 1000, "
                        "which takes about 5 times as long per guest run on a nested-KVM host)")
    p.add_argument("--vmlab", default=os.path.join(REPO, "target/release/vmlab"))
    p.add_argument("--virtiofsd", default=os.environ.get("VMLAB_VIRTIOFSD")
                   or os.path.join(GUEST, "virtiofsd"))
    p.add_argument("--timeout", type=float, default=600, help="seconds one run may take")
    p.add_argument("--only", default=",".join(ENVS), help="comma-separated subset of " + ",".join(ENVS))
    p.add_argument("--json")
    p.add_argument("--markdown")
    args = p.parse_args()
    args.vmlab = os.path.abspath(args.vmlab)
    args.virtiofsd = os.path.abspath(args.virtiofsd)
    if args.mib > 48:
        raise SystemExit("bench_fs: --mib at most 48 (the virtio-blk image is 64 MiB)")
    only = [e for e in args.only.split(",") if e]
    bad = [e for e in only if e not in ENVS]
    if bad:
        raise SystemExit(f"bench_fs: unknown environment(s) {bad}")

    # SIGTERM/SIGHUP run the finally blocks (virtiofsd, temp dirs) too.
    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)

    began = time.monotonic()
    load_before = loadavg()
    workdir = tempfile.mkdtemp(prefix="vmlab-bench-fs-", dir="/var/tmp")
    try:
        bench = Bench(args, workdir)
        raw = {env: [] for env in ENVS}
        errors = {env: [] for env in ENVS}
        for env in ENVS:
            if env not in only:
                bench.reasons.setdefault(env, "not measured: left out with --only")
        for i in range(args.runs):
            for env in ENVS:
                if env in bench.reasons:
                    continue
                t = time.monotonic()
                try:
                    vals = bench.run(env)
                    r = figures(vals, args.mib, args.files)
                except (RuntimeError, subprocess.SubprocessError, OSError) as e:
                    log(f"run {i + 1}/{args.runs} {env} FAILED: {e}")
                    errors[env].append(str(e))
                    continue
                raw[env].append(r)
                log(f"run {i + 1}/{args.runs} {env} ({time.monotonic() - t:.0f} s): " + json.dumps(
                    {k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()}))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    figs = {}
    for env in ENVS:
        if env in bench.reasons:
            figs[env] = {"reason": bench.reasons[env]}
            continue
        if not raw[env]:
            first = errors[env][0].strip().splitlines() if errors[env] else ["no run"]
            figs[env] = {"reason": "not measured: every run failed: " + " / ".join(
                l.strip() for l in first[:1] + [l for l in first if "qemu-system" in l or "Error" in l][:3])}
            continue
        figs[env] = {k: summarize([r[k] for r in raw[env]]) for k in FIGURES}
        figs[env]["spawn_ms"] = statistics.median([r["spawn_ns"] / 1e6 for r in raw[env]])
        figs[env]["clock_ms"] = statistics.median([r["clock_ns"] / 1e6 for r in raw[env]])
        figs[env]["caches_dropped"] = all(r["caches_dropped"] for r in raw[env])
        if not figs[env]["caches_dropped"]:
            log(f"{env}: caches could not be dropped in every run")
    ratio = {}
    for k in FIGURES:
        v = figs["virtiofs"].get(k)
        q = figs["qemu"].get(k)
        ratio[k] = v["median"] / q["median"] if v and q and q["median"] else None
    report = {
        "host": host_description(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:]),
        "args": {"runs": args.runs, "mib": args.mib, "files": args.files, "timeout": args.timeout},
        "load_before": load_before, "load_after": loadavg(), "duration_s": time.monotonic() - began,
        "vmlab_commit": git_describe(), "vmlab_binary": os.path.relpath(args.vmlab, REPO),
        "vmlab_built": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(os.stat(args.vmlab).st_mtime)),
        "qemu": tool_version([bench.qemu_bin, "--version"]) if bench.qemu_bin else None,
        "runc": tool_version([bench.runc, "--version"]) if bench.runc else None,
        "memory_mib": bench.memory_mib, "cpus": bench.cpus, "shell_host": " ".join(bench.shell),
        "cmdline_vmlab": bench.cmdline_vmlab,
        "argv_qemu_example": bench.qemu_argv("SOCK", ["sh", "/tmp/fs/fsb.sh"] + bench.script_args("/tmp/fs", "cs")),
        "figures": figs, "ratio_vmlab_qemu": ratio, "raw": raw, "errors": errors,
    }
    md = markdown(report)
    write_report(report, md, args.json, args.markdown)


if __name__ == "__main__":
    main()
