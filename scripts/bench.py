#!/usr/bin/env python3
"""vmlab against its peers in one session: QEMU's microvm machine on the same
guest, and an OCI runtime (runc, through `vmlab container`) on the same root
file system as the container reference. Runs are interleaved (vmlab, QEMU,
container, vmlab, QEMU, container, ...); every figure is the median of N runs
with its min and max, and the ratio vmlab/QEMU.

The guest is the same for both VMMs: target/guest/vmlinux, the read-only
root disk target/guest/rootfs.ext4 (/dev/vda), a fresh data disk (/dev/vdb),
a virtio-net interface on a TAP device (QEMU: `-netdev tap`, no vhost) in a
network namespace of its own, vmlab's default memory and vCPU count (read
from `vmlab run --help`), and the same kernel command line: vmlab's own (read
from `vmlab -v run`, which logs it), given to QEMU as it is minus vmlab's
`virtio_mmio.device=` entries, for which QEMU adds its own. The container
runs the same command on the tree the root disk is made of, in a network
namespace joined to the "host" one by a veth pair. The command prints a
marker, runs `vmlab-workload disk` on /dev/vdb (the container: on its root,
/tmp), then serves one `net-server` session to the host side (TCP host ->
guest and round trips) and runs one `net-client` session to it (guest ->
host). So each repetition boots each VMM once and takes every figure from
that boot.

How each figure is taken (process start = just before the VMM is spawned):
  - start -> guest init up: the kernel trace event of the guest init's
    write of "up" to port 0xf4 (vmlab's status port; a write QEMU ignores,
    but the host kernel traces it the same way for both VMMs);
  - start -> guest command output: the marker line on the serial console;
  - start -> first guest instruction: the first kvm_entry (hardware KVM) or
    kvm_emulate_insn (a PVM host, where the guest's first instructions run
    under KVM's emulator) trace event of the VMM's threads, over a series of
    short starts (each VMM stopped once its guest runs);
  - vmlab's start (main) -> first KVM_RUN: its `--boot-time` mark, same
    series;
  - VMM CPU time and memory overhead: /proc/PID/stat (utime+stime, all
    threads, so including the guest's time on its vCPU threads; and without
    the vCPU threads) and /proc/PID/smaps (RSS outside the guest-RAM
    mapping), read when the guest init is up;
  - block: `vmlab-workload disk` (O_DIRECT, sequential write+fsync and read
    in 1 MiB blocks, 4 KiB random reads at queue depth 1);
  - TCP: vmlab-workload net-server/net-client with scripts/bench_net.py's
    namespaces, TAP and veth set-up (bulk data for --net-seconds each way,
    then 1-byte round trips with TCP_NODELAY).
The kernel trace events need root and tracefs; without them the figures that
need them say why they are missing, as do the container figures without
root or runc and the QEMU ones without QEMU.

Output: JSON (--json, default target/bench/bench.json), Markdown (--markdown),
and, unless --no-docs, the Markdown between the `<!-- bench:begin -->` and
`<!-- bench:end -->` markers of docs/BENCHMARKS.md.

Usage: scripts/bench.py [--runs 5] [--quick] [--json F] [--markdown F] [--no-docs]
"""

import argparse
import contextlib
import ctypes
import json
import os
import re
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
from bench_block import fresh_image, parse_json_line  # noqa: E402
from bench_boot import cpu_seconds, host_description, overhead_kib, run_until, write_report  # noqa: E402,F401

try:
    import bench_net  # noqa: E402  (scripts/bench_net.py: the virtio-net work, issue 4)
    NET_IMPORT_ERROR = None
except ImportError as e:  # not written yet, or broken
    bench_net = None
    NET_IMPORT_ERROR = str(e)

GUEST = os.path.join(REPO, "target/guest")
MARKER = "vmlab-bench-ready"
DOCS = os.path.join(REPO, "docs/BENCHMARKS.md")
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
VMS = ("vmlab", "qemu")
ENVS = ("vmlab", "qemu", "container")

# Every figure: key -> (label, unit, digits, better). `better` says which
# way is good, for the goals.
FIGURES = {
    "boot_init_up_s": ("process start to guest init up (port 0xf4 write, kernel trace)", "s", 2, "lower"),
    "boot_output_s": ("process start to the guest command's first output (console)", "s", 2, "lower"),
    "first_instruction_ms": ("process start to first guest instruction (kernel trace)", "ms", 1, "lower"),
    "first_kvm_run_ms": ("vmlab's `main` to first KVM_RUN (its `--boot-time` mark)", "ms", 1, "lower"),
    "vmm_cpu_s": ("VMM CPU time until init up (user+sys, all threads: includes the guest)", "s", 2, "lower"),
    "vmm_cpu_no_vcpu_s": ("VMM CPU time until init up, without the vCPU threads", "s", 3, "lower"),
    "vmm_overhead_mib": ("VMM memory overhead at init up (RSS outside guest RAM, smaps)", "MiB", 2, "lower"),
    "block_write_mib_s": ("block sequential write, MiB/s (1 MiB blocks, fsync, O_DIRECT)", "MiB/s", 1, "higher"),
    "block_read_mib_s": ("block sequential read, MiB/s (1 MiB blocks, O_DIRECT)", "MiB/s", 1, "higher"),
    "block_randread_iops": ("block 4 KiB random read, IOPS (queue depth 1, O_DIRECT)", "IOPS", 1, "higher"),
    "net_g2h_mib_s": ("TCP throughput guest to host, MiB/s", "MiB/s", 2, "higher"),
    "net_h2g_mib_s": ("TCP throughput host to guest, MiB/s", "MiB/s", 2, "higher"),
    "net_rtt_us": ("TCP round trip, 1 byte (median of the session), µs", "µs", 0, "lower"),
}


def log(msg):
    print(f"bench: {msg}", file=sys.stderr, flush=True)


# --- Kernel tracing: the same clock and the same events for every VMM -------

class TraceUnavailable(Exception):
    pass


TRACE_LINE = re.compile(r"\s(\d+\.\d+): (kvm_\w+): (.*)$")
PIO_WRITE = re.compile(r"pio_write at 0x([0-9a-f]+) size \d+ count \d+ val 0x([0-9a-f]+)")


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)


class KvmTrace:
    """Two private ftrace instances (they change nothing in the host's main
    trace buffer), restricted to this process and its descendants
    (set_event_pid + event-fork), on CLOCK_MONOTONIC, the clock of
    time.monotonic():

    - `first`: kvm_entry and kvm_emulate_insn, with a trigger that turns the
      instance off after the first event is recorded, so that a boot costs
      one recorded event, not millions;
    - `pio`: kvm_pio writes to port 0xf4 (a few per boot), looked up in
      its `trace` file while the VMM runs (trace_pipe would be the obvious
      reader, but poll() on it can report data that read() then does not
      return, which made a select() loop spin).
    """

    PREFIX = "vmlab-bench-"
    FIRST_EVENTS = ("kvm_entry", "kvm_emulate_insn")
    # A trigger with a condition runs after the event is recorded (one
    # without would stop the instance before recording the first event).
    TRIGGER = "traceoff if common_pid > 0"
    INIT_UP_PORT, INIT_UP_VALUE = 0xF4, 1

    def __init__(self):
        root = next((r for r in ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
                     if os.path.isdir(os.path.join(r, "instances"))), None)
        if root is None:
            raise TraceUnavailable("no tracefs (mount it on /sys/kernel/tracing)")
        if os.geteuid() != 0:
            raise TraceUnavailable("kernel trace events need root")
        events = os.path.join(root, "events/kvm")
        self.first_events = [e for e in self.FIRST_EVENTS if os.path.isdir(os.path.join(events, e))]
        if not self.first_events or not os.path.isdir(os.path.join(events, "kvm_pio")):
            raise TraceUnavailable("the host kernel has no kvm trace events (kvm_entry, kvm_pio)")
        self.instances = os.path.join(root, "instances")
        self._remove_stale()
        self.dirs = []
        try:
            self.first = self._instance("first")
            _write(os.path.join(self.first, "buffer_size_kb"), "64")
            for e in self.first_events:
                _write(os.path.join(self.first, f"events/kvm/{e}/trigger"), self.TRIGGER)
                _write(os.path.join(self.first, f"events/kvm/{e}/enable"), "1")
            self.pio = self._instance("pio")
            _write(os.path.join(self.pio, "events/kvm/kvm_pio/filter"), f"port == {self.INIT_UP_PORT:#x}")
            _write(os.path.join(self.pio, "events/kvm/kvm_pio/enable"), "1")
        except OSError as e:
            self.close()
            raise TraceUnavailable(f"cannot set up kernel tracing: {e}") from e

    def _instance(self, name):
        path = os.path.join(self.instances, f"{self.PREFIX}{os.getpid()}-{name}")
        os.mkdir(path)
        self.dirs.append(path)
        with open(os.path.join(path, "trace_clock")) as f:
            if "mono" not in f.read().replace("[", " ").replace("]", " ").split():
                raise OSError("trace clock 'mono' not available")
        _write(os.path.join(path, "trace_clock"), "mono")
        _write(os.path.join(path, "set_event_pid"), str(os.getpid()))
        _write(os.path.join(path, "options/event-fork"), "1")
        return path

    def _remove_stale(self):
        """Instances left by a bench run that was killed."""
        for name in os.listdir(self.instances):
            m = re.match(re.escape(self.PREFIX) + r"(\d+)-", name)
            if not m:
                continue
            try:
                os.kill(int(m.group(1)), 0)
                continue  # its bench run is alive
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
            self._teardown(os.path.join(self.instances, name))

    def _teardown(self, path):
        for e in self.FIRST_EVENTS + ("kvm_pio",):
            ev = os.path.join(path, f"events/kvm/{e}")
            for file, text in (("enable", "0"), ("trigger", "!" + self.TRIGGER)):
                try:
                    _write(os.path.join(ev, file), text)
                except OSError:
                    pass
        try:
            os.rmdir(path)
        except OSError as e:
            log(f"cannot remove trace instance {path}: {e}")

    def close(self):
        for path in self.dirs:
            self._teardown(path)
        self.dirs = []

    def arm(self):
        """Before spawning a VMM: empty both instances, turn `first` on."""
        for path in (self.first, self.pio):
            _write(os.path.join(path, "trace"), "")
        _write(os.path.join(self.first, "tracing_on"), "1")

    @staticmethod
    def _events(path):
        """(monotonic time, event, details) of the events in an instance."""
        with open(os.path.join(path, "trace")) as f:
            return [(float(m.group(1)), m.group(2), m.group(3)) for m in map(TRACE_LINE.search, f) if m]

    def first_event(self, start):
        """Seconds from `start` to the first guest-running event, or None."""
        stamps = [t for t, _, _ in self._events(self.first) if t >= start]
        return min(stamps) - start if stamps else None

    def init_up(self, start):
        """Seconds from `start` to the guest init's "up" write, if it came."""
        for t, event, details in self._events(self.pio):
            w = PIO_WRITE.search(details) if event == "kvm_pio" else None
            if w and t >= start and (int(w.group(1), 16), int(w.group(2), 16)) == (
                    self.INIT_UP_PORT, self.INIT_UP_VALUE):
                return t - start
        return None


# --- /proc sampling ---------------------------------------------------------

def proc_stat(pid):
    """(comm, ppid, utime+stime, cutime+cstime) in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    comm = text[text.index("(") + 1:text.rindex(")")]
    fields = text.rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return comm, int(fields[1]), (int(fields[11]) + int(fields[12])) / tick, \
        (int(fields[13]) + int(fields[14])) / tick


VCPU_THREAD = re.compile(r"^(vcpu\d+|CPU \d+/KVM)$")  # vmlab's and QEMU's vCPU threads


def cpu_without_vcpus(pid):
    """The process's CPU time minus that of its (live) vCPU threads."""
    total = cpu_seconds(pid)
    vcpus = 0.0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            comm, _, own, _ = proc_stat(f"{pid}/task/{tid}")
        except (OSError, ValueError):
            continue
        if VCPU_THREAD.match(comm):
            vcpus += own
    return total - vcpus


def sample_vmm(pid, mem_bytes):
    return {"vmm_overhead_mib": overhead_kib(pid, mem_bytes) / 1024, "vmm_cpu_s": cpu_seconds(pid),
            "vmm_cpu_no_vcpu_s": cpu_without_vcpus(pid)}


def process_tree(root):
    """[(pid, comm)] of `root` and all its descendants."""
    parent = {}
    comms = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                comm, ppid, _, _ = proc_stat(d)
            except (OSError, ValueError):
                continue
            parent[int(d)] = ppid
            comms[int(d)] = comm
    tree = [root] if root in comms else []
    i = 0
    while i < len(tree):
        tree += [p for p, pp in parent.items() if pp == tree[i]]
        i += 1
    return [(p, comms[p]) for p in tree]


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def sample_container(pid):
    """The container run's cost when its process is up: the monitor side
    (`vmlab container` and runc) is its "VMM"; its CPU time is that of every
    process of the run, the container's own included, as a VMM's includes
    the guest."""
    overhead = 0
    cpu = 0.0
    monitor_cpu = 0.0
    for p, comm in process_tree(pid):
        try:
            _, _, own, children = proc_stat(p)
            monitor = p == pid or comm == "runc"
            if monitor:
                overhead += rss_kib(p)
                monitor_cpu += own + children
            cpu += own + children
        except (OSError, ValueError):
            continue
    return {"vmm_overhead_mib": overhead / 1024, "vmm_cpu_s": cpu, "vmm_cpu_no_vcpu_s": monitor_cpu}


# --- The peers --------------------------------------------------------------

def parse_mib(text):
    m = re.fullmatch(r"(\d+)\s*([KMGT]?)(i?B)?", text.strip(), re.I)
    if not m:
        raise ValueError(f"cannot read a memory size from {text!r}")
    scale = {"": 1 << 20, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[m.group(2).upper()]
    return int(m.group(1)) * scale >> 20


def vmlab_defaults(vmlab):
    """vmlab's default guest memory (MiB) and vCPU count, from its help."""
    text = subprocess.run([vmlab, "run", "--help"], capture_output=True, text=True, check=True).stdout
    mem = re.search(r"--memory <\w+>.*?\[default: ([^\]]+)\]", text, re.S)
    cpus = re.search(r"--cpus <\w+>.*?\[default: (\d+)\]", text, re.S)
    if not mem or not cpus:
        raise RuntimeError("cannot read the default --memory and --cpus from `vmlab run --help`")
    return parse_mib(mem.group(1)), int(cpus.group(1))


def vmlab_cmdline(argv, timeout=60):
    """The guest command line vmlab builds for `argv` (a `vmlab -q run ...`
    command), from its debug log; the VM is stopped right after."""
    run = argv.index("run")
    probe = [argv[0]] + [a for a in argv[1:run] if a != "-q"] + ["-v"] + argv[run:]
    proc = subprocess.Popen(probe, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    found = None
    lines = []
    deadline = time.monotonic() + timeout
    try:
        for line in proc.stderr:
            lines.append(line)
            # "[DEBUG] guest command line: ..." (not the INFO line about
            # what the host quirks add "to the guest command line").
            m = re.match(r"(?:\[\w+\s*\]\s*)?guest command line: (.*)$", line.rstrip("\n"))
            if m:
                found = m.group(1)
                break
            if time.monotonic() > deadline:
                break
    finally:
        proc.kill()
        proc.wait()
    if found is None:
        raise RuntimeError("vmlab did not log its guest command line:\n" + "".join(lines[-20:]))
    return found


def qemu_cmdline(vmlab_line):
    """vmlab's command line without vmlab's own device entries; QEMU's
    microvm adds its own `virtio_mmio.device=` entries (acpi=off)."""
    return " ".join(p for p in vmlab_line.split() if not p.startswith("virtio_mmio.device="))


def elf_linking(path):
    """"static" or "dynamic" (an ELF with a PT_INTERP program header)."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            phoff = int.from_bytes(head[32:40], "little")
            size, count = int.from_bytes(head[54:56], "little"), int.from_bytes(head[56:58], "little")
            f.seek(phoff)
            table = f.read(size * count)
    except OSError:
        return None
    types = [int.from_bytes(table[i * size:i * size + 4], "little") for i in range(count)]
    return "dynamic" if 3 in types else "static"


def tool_version(argv):
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return None


def git_describe():
    try:
        head = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=30).stdout.strip()
        return head + ("+changes" if dirty else "") if head else None
    except (OSError, subprocess.TimeoutExpired):
        return None


NET_NEEDS = ("Netns", "server", "client", "json_line", "HOST_IP", "GUEST_IP", "GUEST_PORT", "HOST_PORT",
             "WORKLOAD_HOST")
TAP = "bt0"


def net_unavailable():
    """Why the TCP figures cannot be taken here, or None."""
    if bench_net is None:
        return f"not measured: scripts/bench_net.py cannot be imported ({NET_IMPORT_ERROR})"
    missing = [n for n in NET_NEEDS if not hasattr(bench_net, n)]
    if missing:
        return f"not measured: scripts/bench_net.py has no {', '.join(missing)} any more"
    if os.geteuid() != 0:
        return "not measured: network namespaces and TAP devices need root"
    if not shutil.which("ip"):
        return "not measured: iproute2 (ip) is not installed"
    if not os.access(bench_net.WORKLOAD_HOST, os.X_OK):
        return f"not measured: {os.path.relpath(bench_net.WORKLOAD_HOST, REPO)} is missing (scripts/build-guest.sh)"
    return None


CLONE_NEWNET = 0x40000000


@contextlib.contextmanager
def entered(ns):
    """This process in network namespace `ns` (None: where it is) for the
    block: a VMM spawned inside starts there with no `ip netns exec` in
    front of it, so its start time is its own."""
    if ns is None:
        yield
        return
    libc = ctypes.CDLL(None, use_errno=True)

    def setns(fd):
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {ns.name}")

    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    target = os.open(os.path.join("/run/netns", ns.name), os.O_RDONLY)
    try:
        setns(target)
        try:
            yield
        finally:
            setns(home)
    finally:
        os.close(target)
        os.close(home)


@contextlib.contextmanager
def vm_network(enabled):
    """A network namespace with the TAP the guest's eth0 is on, the host
    end addressed (bench_net's addresses); yields the namespace or None."""
    if not enabled:
        yield None
        return
    with bench_net.Netns() as ns:
        ns.ip("tuntap", "add", "dev", TAP, "mode", "tap")
        ns.ip("addr", "add", f"{bench_net.HOST_IP}/24", "dev", TAP)
        ns.ip("link", "set", TAP, "up")
        yield ns


@contextlib.contextmanager
def container_network(enabled):
    """Two namespaces joined by a veth pair, as a container runtime's bridge
    network would give (without the bridge): yields (host side, the
    container's namespace), or (None, None)."""
    if not enabled:
        yield None, None
        return
    with bench_net.Netns() as host, bench_net.Netns() as guest:
        host.ip("link", "add", "va", "type", "veth", "peer", "name", "vb", "netns", guest.name)
        host.ip("addr", "add", f"{bench_net.HOST_IP}/24", "dev", "va")
        guest.ip("addr", "add", f"{bench_net.GUEST_IP}/24", "dev", "vb")
        host.ip("link", "set", "va", "up")
        guest.ip("link", "set", "vb", "up")
        yield host, guest


class Setup:
    """Everything that makes the runs the same."""

    def __init__(self, args, workdir):
        self.args = args
        self.kernel = os.path.join(GUEST, "vmlinux")
        self.rootfs = os.path.join(GUEST, "rootfs.ext4")
        self.tree = os.path.join(GUEST, "rootfs-tree")
        for path in (self.kernel, self.rootfs, args.vmlab):
            if not os.path.exists(path):
                raise SystemExit(f"bench: {path} is missing: run scripts/build-guest.sh and "
                                 "cargo build --release (scripts/bench.sh does both)")
        mem, cpus = vmlab_defaults(args.vmlab)
        self.memory_mib = args.memory_mib or mem
        self.cpus = args.cpus or cpus
        self.data = os.path.join(workdir, "data.img")
        self.net_reason = net_unavailable()
        self.net = self.net_reason is None
        fresh_image(self.data, args.mib)
        vm_cmd = self.command("/dev/vdb --force")
        self.vmlab = [args.vmlab, "-q", "run", "--kernel", self.kernel,
                      "--memory", f"{self.memory_mib}M", "--cpus", str(self.cpus),
                      "--disk", f"path={self.rootfs},readonly=on", "--disk", f"path={self.data}"]
        if self.net:
            self.vmlab += ["--net", f"tap={TAP}", "--cmdline",
                           f"ip={bench_net.GUEST_IP}::{bench_net.HOST_IP}:255.255.255.0::eth0:off"]
        self.vmlab += ["--boot-time", "--"] + vm_cmd
        with vm_network(self.net) as ns, entered(ns):
            self.cmdline = vmlab_cmdline(self.vmlab)
        self.qemu_bin = shutil.which("qemu-system-x86_64")
        self.qemu = None
        if self.qemu_bin:
            # The machine of docs/BENCHMARKS.md's earlier QEMU figures: no
            # option ROMs, the ISA serial port, PIT and PIC; no ACPI (the
            # guest kernel has none), so QEMU lists its virtio-mmio devices
            # on the command line. No vhost anywhere.
            self.qemu = [self.qemu_bin, "-M", "microvm,x-option-roms=off,isa-serial=on,rtc=off,pit=on,pic=on,acpi=off",
                         "-enable-kvm", "-cpu",
                         "host,-arch-capabilities,-invtsc,-kvm-pv-ipi,-kvm-pv-tlb-flush,-kvm-pv-sched-yield",
                         "-m", str(self.memory_mib), "-smp", str(self.cpus), "-nodefaults", "-no-user-config",
                         "-nographic", "-serial", "stdio", "-no-reboot",
                         # Thread names ("CPU 0/KVM"): the vCPU threads' CPU time apart.
                         "-name", "vmlab-bench,debug-threads=on",
                         "-kernel", self.kernel, "-append", qemu_cmdline(self.cmdline),
                         "-drive", f"id=root,file={self.rootfs},format=raw,if=none,readonly=on",
                         "-device", "virtio-blk-device,drive=root",
                         "-drive", f"id=data,file={self.data},format=raw,if=none",
                         "-device", "virtio-blk-device,drive=data"]
            if self.net:
                self.qemu += ["-netdev", f"tap,id=n0,ifname={TAP},script=no,downscript=no,vhost=off",
                              "-device", "virtio-net-device,netdev=n0"]
        self.runc = shutil.which("runc") or next(
            (p for p in ("/usr/sbin/runc", "/sbin/runc") if os.access(p, os.X_OK)), None)
        self.container = [args.vmlab, "-q", "container", "--image", self.tree, "--"] + self.command("/tmp")

    def command(self, disk_target):
        """The command every environment runs: the marker, the disk
        workload, then (with a network) one net-server session for the host
        side's client and one net-client session to the host side's server.
        stderr joins stdout: the server's "listening" line is the cue for
        the host's client, and a container's stderr is not its console."""
        parts = [f"echo {MARKER}",
                 f"vmlab-workload disk --mib {self.args.mib} --random-ops {self.args.random_ops} --direct "
                 f"--path {disk_target}"]
        if self.net:
            parts += [f"vmlab-workload net-server --bind 0.0.0.0 --port {bench_net.GUEST_PORT} --timeout 600 2>&1",
                      f"vmlab-workload net-client --host {bench_net.HOST_IP} --port {bench_net.HOST_PORT} "
                      f"--seconds {self.args.net_seconds:g} --rtt-count {self.args.rtt_count} --timeout 60 2>&1"]
        return ["sh", "-c", "; ".join(parts)]

    def unavailable(self, env):
        """Why `env` cannot be measured on this host, or None."""
        if env == "qemu" and not self.qemu:
            return "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)"
        if env == "container":
            if os.geteuid() != 0:
                return "vmlab container needs root"
            if not self.runc:
                return "runc is not installed (apt-get install runc)"
            if not os.path.isdir(self.tree):
                return f"{self.tree} is missing (scripts/build-guest.sh)"
        return None

    def describe(self):
        release = None
        try:
            with open(os.path.join(GUEST, "kernel-release")) as f:
                release = f.read().strip()
        except OSError:
            pass
        return {
            "kernel": os.path.relpath(self.kernel, REPO), "kernel_release": release,
            "rootfs": os.path.relpath(self.rootfs, REPO), "container_root": os.path.relpath(self.tree, REPO),
            "memory_mib": self.memory_mib, "cpus": self.cpus,
            "disk_mib": self.args.mib, "random_ops": self.args.random_ops,
            "net": self.net_reason or {"seconds": self.args.net_seconds, "rtt_count": self.args.rtt_count},
            "cmdline_vmlab": self.cmdline,
            "cmdline_qemu": qemu_cmdline(self.cmdline) + " (+ QEMU's virtio_mmio.device= entries)",
            "argv_vmlab": self.vmlab, "argv_qemu": self.qemu, "argv_container": self.container,
            "vmlab": tool_version([self.args.vmlab, "--version"]), "vmlab_commit": git_describe(),
            "vmlab_binary": os.path.relpath(self.args.vmlab, REPO), "vmlab_linking": elf_linking(self.args.vmlab),
            "qemu": tool_version([self.qemu_bin, "--version"]) if self.qemu_bin else None,
            "runc": tool_version([self.runc, "--version"]) if self.runc else None,
        }


# --- One run of each kind -----------------------------------------------------

def boot_time_marks(stderr):
    """vmlab's --boot-time line: (first KVM_RUN ms, init up s or None)."""
    m = re.search(r"first KVM_RUN after ([0-9.]+) ms, guest init up after ([0-9.]+ ms|never)", stderr)
    if not m:
        return None, None
    up = None if m.group(2) == "never" else float(m.group(2).split()[0]) / 1000
    return float(m.group(1)), up


def quick_start(env, setup, trace, ns, limit=5.0):
    """Starts a VMM (in network namespace `ns`, with its TAP), stops it once
    its guest runs: the first guest instruction (trace) and, for vmlab, its
    first-KVM_RUN mark."""
    argv = setup.vmlab if env == "vmlab" else setup.qemu
    with entered(ns):
        if trace:
            trace.arm()
        start = time.monotonic()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        first = None
        try:
            while time.monotonic() - start < limit and proc.poll() is None:
                time.sleep(0.02)
                if trace:
                    first = trace.first_event(start)
                    if first is not None:
                        break
                elif time.monotonic() - start > 1.5:
                    break
            # vmlab takes SIGTERM (and prints its marks) once its vCPUs run.
            time.sleep(0.1)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                _, err = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
    r = {}
    if first is not None:
        r["first_instruction_ms"] = first * 1000
    if env == "vmlab":
        r["first_kvm_run_ms"], _ = boot_time_marks(err)
        if r["first_kvm_run_ms"] is None:
            raise RuntimeError(f"vmlab printed no --boot-time marks:\n{err[-2000:]}")
    return r


def workload_results(env, argv, setup, host_ns, timeout, on_marker, every=None):
    """Runs `argv` (an environment running setup.command()) to the end of
    its workloads: the disk figures, and with a network the TCP figures
    (the host side's client runs when the guest's server listens; a server
    on the host side takes the guest's client). Calls `on_marker(start,
    pid)` when the marker appears."""
    state = {}
    srv = bench_net.server(host_ns, bench_net.HOST_IP, bench_net.HOST_PORT) if host_ns else None

    def check(out, start, pid):
        state["start"] = start
        if "Kernel panic - not syncing" in out:
            # QEMU would not end on the reset that follows (no i8042).
            raise RuntimeError(f"{env}: the guest kernel panicked:\n{out[-3000:]}")
        if MARKER in out and "marker" not in state:
            state["marker"] = time.monotonic() - start
            on_marker(start, pid)
        if "disk" not in state:
            disk = parse_json_line(out)
            if disk is None:
                return None
            state["disk"] = disk
            if not host_ns:
                return True
        if "h2g" not in state:
            if "net-server listening" not in out:
                return None
            state["h2g"] = bench_net.client(host_ns, bench_net.GUEST_IP, bench_net.GUEST_PORT,
                                            argparse.Namespace(seconds=setup.args.net_seconds,
                                                               rtt_count=setup.args.rtt_count))
        return bench_net.json_line(out, "net-client")

    try:
        g2h, err = run_until(argv, timeout, check, every)
    finally:
        if srv:
            srv.kill()
            srv.communicate()
    disk = state["disk"]
    r = {"boot_output_s": state["marker"], "block_write_mib_s": disk["write_mib_per_s"],
         "block_read_mib_s": disk["read_mib_per_s"], "block_randread_iops": disk["rand_read_iops"]}
    if host_ns:
        h2g = state["h2g"]
        r.update({"net_h2g_mib_s": h2g["mib_per_s"], "net_g2h_mib_s": g2h["mib_per_s"],
                  "net_rtt_us": h2g["rtt_median_us"]})
    return r, err, state.get("start")


def vm_run(env, setup, trace, timeout):
    """One boot: boot figures when the guest init is up, then the
    workloads' figures."""
    mem = setup.memory_mib << 20
    fresh_image(setup.data, setup.args.mib)
    state = {}

    def on_trace(start, pid):
        up = trace.init_up(start)
        if up is not None and "boot_init_up_s" not in state:
            state["boot_init_up_s"] = up
            if "vmm_cpu_s" not in state and pid is not None:
                state.update(sample_vmm(pid, mem))
                state["sampled_at"] = "init up (trace)"

    def on_marker(_start, pid):
        if "vmm_cpu_s" not in state:
            # No trace event (yet): the marker is the next best moment.
            state.update(sample_vmm(pid, mem))
            state["sampled_at"] = "guest command output"

    argv = setup.vmlab if env == "vmlab" else setup.qemu
    with vm_network(setup.net) as ns, entered(ns):
        if trace:
            trace.arm()
        results, err, start = workload_results(env, argv, setup, ns, timeout, on_marker,
                                               (0.2, on_trace) if trace else None)
    if trace and "boot_init_up_s" not in state and start is not None:
        on_trace(start, None)  # an event seen only after the output
    state.update(results)
    if env == "vmlab":
        first, up = boot_time_marks(err)
        state["vmlab_first_kvm_run_ms"] = first
        state["vmlab_init_up_s"] = up
        if not trace and up is not None:
            state["boot_init_up_s"] = up  # vmlab's own mark stands in
    return state


def container_run(setup, timeout):
    state = {}

    def on_marker(_start, pid):
        state.update(sample_container(pid))

    with container_network(setup.net) as (host, guest):
        argv = list(setup.container)
        if guest:
            netns = os.path.join("/run/netns", guest.name)
            argv[argv.index("container") + 1:argv.index("container") + 1] = ["--netns", netns]
        results, _, _ = workload_results("container", argv, setup, host, timeout, on_marker)
    state.update(results)
    return state


# --- Summaries ------------------------------------------------------------------

def summarize(values):
    nums = [v for v in values if isinstance(v, (int, float))]
    if not nums:
        return None
    return {"median": statistics.median(nums), "min": min(nums), "max": max(nums), "n": len(nums),
            "runs": nums}


def build_figures(raw, reasons, trace_reason, net_reason):
    """figures[key][env] = {median, min, max, n, runs} or {reason}."""
    no_trace = f"not measured: {trace_reason}" if trace_reason else None
    fixed = {
        ("first_kvm_run_ms", "qemu"): "QEMU has no such mark; the first-guest-instruction row measures both VMMs the same way",
        ("first_kvm_run_ms", "container"): "no KVM",
        ("first_instruction_ms", "container"): "no guest: a container runs on the host kernel",
        ("boot_init_up_s", "container"): "no guest init: see the first-output row",
    }
    figures = {}
    for key in FIGURES:
        row = {}
        for env in ENVS:
            if env in reasons:
                row[env] = {"reason": reasons[env]}
                continue
            if key.startswith("net_") and net_reason:
                row[env] = {"reason": net_reason}
                continue
            if fixed.get((key, env)):
                row[env] = {"reason": fixed[(key, env)]}
                continue
            s = summarize([r.get(key) for r in raw.get(env, [])])
            if s is None:
                if key in ("first_instruction_ms", "boot_init_up_s") and no_trace:
                    s = {"reason": no_trace}
                else:
                    s = {"reason": "not measured (no run gave a value)"}
            row[env] = s
        v, q = row["vmlab"].get("median"), row["qemu"].get("median")
        row["ratio_vmlab_qemu"] = v / q if v is not None and q else None
        figures[key] = row
    return figures


def goals(figures):
    """Issue 7's goals against the medians. A comparison with QEMU that the
    median misses but whose run ranges overlap QEMU's is "within noise"."""
    def med(key, env):
        return figures[key][env].get("median")

    def absolute(what, key, limit, unit):
        v = med(key, "vmlab")
        ok = None if v is None else v <= limit
        return (what, None if v is None else f"{v:.2f} {unit}",
                "not measured" if ok is None else ("met" if ok else "NOT met"))

    def versus_qemu(what, key):
        row = figures[key]
        r = row["ratio_vmlab_qemu"]
        if r is None:
            return (what, None, "not measured")
        v, q = row["vmlab"], row["qemu"]
        ok = r >= 1.0 if FIGURES[key][3] == "higher" else r <= 1.0
        overlap = v["min"] <= q["max"] and q["min"] <= v["max"]
        return (what, f"vmlab/QEMU {r:.2f}", "met" if ok else ("within noise" if overlap else "NOT met"))

    out = [
        absolute("VMM memory overhead at most 4 MiB", "vmm_overhead_mib", 4.0, "MiB"),
        versus_qemu("boot time (to init up) no worse than QEMU's", "boot_init_up_s"),
        absolute("start to first KVM_RUN under 10 ms", "first_kvm_run_ms", 10.0, "ms"),
        versus_qemu("start to first guest instruction no later than QEMU's", "first_instruction_ms"),
    ]
    for key in ("block_write_mib_s", "block_read_mib_s", "block_randread_iops", "net_g2h_mib_s",
                "net_h2g_mib_s"):
        out.append(versus_qemu(f"{FIGURES[key][0].split(',')[0]} at least QEMU's", key))
    out.append(versus_qemu("TCP round trip no longer than QEMU's", "net_rtt_us"))
    return [{"goal": g, "value": v, "verdict": s} for g, v, s in out]


def cell(s, digits):
    if "reason" in s:
        return None
    if s["n"] == 1:
        return f"{s['median']:.{digits}f}"
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}–{s['max']:.{digits}f})"


def markdown(report):
    h = report["host"]
    st = report["setup"]
    lines = [
        f"Host: {h['cpu']}, {h['cores']} cores, Linux {h['kernel']}, {h['kvm']}; "
        f"load average {report['load_before']} at the start, {report['load_after']} at the end.",
        f"Run: {report['date']}, vmlab {st['vmlab_commit'] or '?'} (`{st['vmlab_binary']}`, "
        f"{st['vmlab_linking'] or '?'}ally linked), {st['qemu'] or 'no QEMU'}, "
        f"{st['runc'] or 'no runc'}; {report['runs']} interleaved repetition(s)"
        f"{' (quick mode)' if report['quick'] else ''}, {report['duration_s'] / 60:.1f} min in all.",
        f"Guest: `{st['kernel']}` (Linux {st['kernel_release']}), root disk `{st['rootfs']}` read-only "
        f"(/dev/vda), a fresh data disk (/dev/vdb) and virtio-net on a TAP, {st['memory_mib']} MiB, "
        f"{st['cpus']} vCPU(s) (vmlab's defaults); both VMMs get vmlab's kernel command line; the "
        f"container runs on `{st['container_root']}`, the tree the root disk is made of, on a veth "
        f"pair. Block: {st['disk_mib']} MiB, {st['random_ops']} random reads. TCP: "
        + (f"{st['net']['seconds']:g} s of bulk data each way, {st['net']['rtt_count']} round trips"
           if isinstance(st['net'], dict) else "not measured")
        + f". First instruction and first KVM_RUN: {report['starts']} short starts per VMM.",
        "",
        f"Command: `{report['command']}`",
        "",
        "| figure | vmlab | QEMU microvm | container (runc) | vmlab/QEMU |",
        "|---|---|---|---|---|",
    ]
    notes = []

    def note(text):
        if text not in notes:
            notes.append(text)
        return f"n/a ({notes.index(text) + 1})"

    for key, (label, _unit, digits, _better) in FIGURES.items():
        row = report["figures"][key]
        cells = [cell(row[env], digits) or note(row[env]["reason"]) for env in ENVS]
        r = row["ratio_vmlab_qemu"]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {'' if r is None else f'{r:.2f}'} |")
    lines.append("")
    lines.append("Medians, with (min–max) over the runs. n/a:")
    lines += [f"{i + 1}. {text}" for i, text in enumerate(notes)]
    lines += ["", "Goals (issue 7):", "", "| goal | measured | verdict |", "|---|---|---|"]
    lines += [f"| {g['goal']} | {g['value'] or ''} | {g['verdict']} |" for g in report["goals"]]
    lines += ["", "Kernel command line (both VMMs): `" + st["cmdline_vmlab"] + "`"]
    return "\n".join(lines) + "\n"


def write_docs(md, path=DOCS):
    """Replaces what is between the markers (appends a section with them
    when they are missing)."""
    with open(path) as f:
        text = f.read()
    block = f"{BEGIN}\n{md}{END}"
    if BEGIN in text and END in text and text.index(BEGIN) < text.index(END):
        text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n## vmlab, QEMU microvm and a container in one run\n\n" + block + "\n"
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# --- Main --------------------------------------------------------------------------

def loadavg():
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=None, help="repetitions (default 5; 1 with --quick)")
    p.add_argument("--quick", action="store_true", help="1 repetition, small sizes: checks, not figures")
    p.add_argument("--starts", type=int, default=None,
                   help="short starts per VMM for the first-instruction figures (default 10; 2 with --quick)")
    p.add_argument("--mib", type=int, default=None, help="block workload size (default 32; 8 with --quick)")
    p.add_argument("--random-ops", type=int, default=None, help="random reads (default 500; 100 with --quick)")
    p.add_argument("--net-seconds", type=float, default=None,
                   help="seconds of bulk TCP data each way (default 3; 1 with --quick)")
    p.add_argument("--rtt-count", type=int, default=None,
                   help="TCP round trips per session (default 100; 20 with --quick)")
    p.add_argument("--memory-mib", type=int, default=None, help="guest memory (default: vmlab's default)")
    p.add_argument("--cpus", type=int, default=None, help="vCPUs (default: vmlab's default)")
    p.add_argument("--vmlab", default=os.path.join(REPO, "target/release/vmlab"))
    p.add_argument("--timeout", type=float, default=600, help="seconds one run may take")
    p.add_argument("--json", default=os.path.join(REPO, "target/bench/bench.json"))
    p.add_argument("--markdown", help="also write the Markdown section to this file")
    p.add_argument("--no-docs", action="store_true", help=f"do not write {os.path.relpath(DOCS, REPO)}")
    args = p.parse_args()
    args.runs = args.runs or (1 if args.quick else 5)
    args.starts = args.starts or (2 if args.quick else 10)
    args.mib = args.mib or (8 if args.quick else 32)
    # Sized so that the default run ends within 15 minutes on the
    # project's nested-KVM machines (~20 s per boot there, ~10 MiB/s and
    # ~120 IOPS on disk, ~20 ms per TCP round trip).
    args.random_ops = args.random_ops or (100 if args.quick else 500)
    args.net_seconds = args.net_seconds or (1 if args.quick else 3)
    args.rtt_count = args.rtt_count or (20 if args.quick else 100)
    args.vmlab = os.path.abspath(args.vmlab)

    began = time.monotonic()
    load_before = loadavg()
    workdir = tempfile.mkdtemp(prefix="vmlab-bench-", dir="/var/tmp")
    trace = None
    try:
        setup = Setup(args, workdir)
        reasons = {env: r for env in ENVS if (r := setup.unavailable(env))}
        try:
            trace = KvmTrace()
            trace_reason = None
        except TraceUnavailable as e:
            trace_reason = str(e)
            log(f"no kernel tracing ({e}): figures that need it are left out")
        vms = [env for env in VMS if env not in reasons]
        raw = {env: [] for env in ENVS}

        if setup.net_reason:
            log(f"TCP figures {setup.net_reason}")
        log(f"{args.starts} short starts per VMM (first guest instruction, first KVM_RUN)")
        # One namespace for the whole series: creating one (and its TAP)
        # keeps the host busy for a few ms, which would land in the figures.
        with vm_network(setup.net) as ns:
            for i in range(args.starts):
                for env in vms:
                    r = quick_start(env, setup, trace, ns)
                    raw[env].append(r)
                    log(f"start {i + 1}/{args.starts} {env}: {json.dumps(r)}")

        for i in range(args.runs):
            for env in ENVS:
                if env in reasons:
                    continue
                t = time.monotonic()
                r = vm_run(env, setup, trace, args.timeout) if env in VMS else container_run(setup, args.timeout)
                raw[env].append(r)
                log(f"run {i + 1}/{args.runs} {env} ({time.monotonic() - t:.0f} s): {json.dumps(r)}")
            elapsed = time.monotonic() - began
            log(f"{elapsed / 60:.1f} min so far, about {elapsed / (i + 1) * args.runs / 60:.1f} min in all")

        figures = build_figures(raw, reasons, trace_reason, setup.net_reason)
        report = {
            "host": host_description(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "command": os.environ.get("VMLAB_BENCH_COMMAND") or " ".join(
                [os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:]),
            "runs": args.runs, "starts": args.starts, "quick": args.quick,
            "load_before": load_before, "load_after": loadavg(),
            "duration_s": time.monotonic() - began,
            "setup": setup.describe(), "trace": trace_reason or "kvm trace events",
            "figures": figures, "raw": raw,
        }
        report["goals"] = goals(figures)
    finally:
        if trace:
            trace.close()
        shutil.rmtree(workdir, ignore_errors=True)

    md = markdown(report)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(report, f, indent=2)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(md)
    if not args.no_docs:
        write_docs(md)
        log(f"wrote {os.path.relpath(DOCS, REPO)}")
    print(md)
    log(f"done in {report['duration_s'] / 60:.1f} min; JSON in {args.json}")


if __name__ == "__main__":
    main()
