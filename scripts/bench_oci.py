#!/usr/bin/env python3
"""OCI runtime benchmark: Docker with runc and with vmlab (`--runtime vmlab`),
the same image, interleaved (runc, vmlab, runc, vmlab ...), in one run.

Measures:
  1. start: wall time of `docker run --rm [--runtime vmlab] IMAGE true`
     (docker client start to exit: create, start, the command, the exit
     status, removal), --runs times each; median, min, max, vmlab/runc.
  2. memory: `docker run -d IMAGE sleep 600`, one container at a time; once
     it runs (`docker exec NAME true` succeeds, bounded by --ready-timeout)
     the host PSS (/proc/PID/smaps_rollup) summed over every host process
     the container adds: its containerd-shim-runc-v2 and the shim's
     descendants (runc: the container's processes; vmlab: the VMM, which is
     .State.Pid, and its two virtiofsd), plus any process whose command line
     names the VM's /run/vmlab-oci/VM directory. The VMM's PSS is also
     split into its guest-RAM mapping (the -m size) and the rest.
  3. exec: on the same container, one warm-up `docker exec NAME true`, then
     one timed; so --runs samples per runtime, one per container.
Every container is removed after its measurement and again on the way out
(try/finally, also on SIGTERM/SIGINT); every docker call has a timeout.

Usage: scripts/bench_oci.py [--runs 5] [--image vmlab-busybox:test]
         [--runtime vmlab] [--wait-quiet SECONDS] [--json F] [--markdown F]
Needs root (reads /proc/PID/smaps_rollup of the containers' processes) and
a Docker daemon with the vmlab runtime registered (scripts/install-runtime.sh,
images from scripts/build-oci-images.sh). DOCKER_HOST defaults to
unix:///var/run/docker.sock.
"""

import argparse
import datetime
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(SCRIPTS)
sys.path.insert(0, SCRIPTS)
from bench_boot import host_description, write_report  # noqa: E402

VMM_MARK = "vmlab -q --state-dir /run/vmlab-oci"

# Published by others, not measured here (see the sources): shown next to
# the measured figures for scale only; other hosts, other set-ups.
KATA_PUBLISHED = [
    ("Kata Containers 2.5.2 (Cloud Hypervisor), start of one pod with its "
     "container through CRI, serial, 500 runs",
     "about 850-950 ms",
     "Kuasar project's benchmark, https://github.com/kuasar-io/kuasar/blob/main/tests/benchmark/Benchmark.md"),
    ("Kata Containers 2.5.2, PSS of the containerd-shim-kata-v2 processes per pod "
     "(the shim only, not the hypervisor or guest RAM)",
     "about 18 MB",
     "same Kuasar benchmark"),
    ("Kata Containers (QEMU), `ctr run -d --runtime io.containerd.kata.v2 busybox top`, "
     "average of 10, without / with VM templating",
     "0.820 s / 0.503 s",
     "Kata docs, docs/how-to/what-is-vm-templating-and-how-do-I-use-it.md, "
     "linking https://gist.github.com/bergwolf/06974a3c5981494a40e2c408681c085d"),
    ("Kata Containers (QEMU), 100 containers of 128 MB guest RAM: memory saved "
     "by VM templating",
     "9 GB in total (about 72 % of the guest RAM)",
     "same Kata doc, linking https://github.com/kata-containers/runtime/pull/303"),
]


class Docker:
    def __init__(self, binary, timeout):
        self.binary = binary
        self.timeout = timeout
        self.env = dict(os.environ)
        self.env.setdefault("DOCKER_HOST", "unix:///var/run/docker.sock")
        self.names = set()  # every container this run may have created

    def __call__(self, *args, timeout=None, check=True):
        r = subprocess.run([self.binary, *args], env=self.env, capture_output=True, text=True,
                           stdin=subprocess.DEVNULL, timeout=timeout or self.timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"docker {' '.join(args)}: exit {r.returncode}: {r.stderr.strip()[-1500:]}")
        return r

    def rm(self, name):
        try:
            self("rm", "-f", name, timeout=180, check=False)
        except subprocess.TimeoutExpired:
            print(f"bench_oci: docker rm -f {name} timed out", file=sys.stderr)
        self.names.discard(name)

    def cleanup(self):
        for name in list(self.names):
            self.rm(name)


def runtime_args(rt):
    return [] if rt == "runc" else ["--runtime", rt]


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# --- processes -------------------------------------------------------------

def proc_table():
    """{pid: (ppid, argv)} of every process."""
    procs = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{d}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except (OSError, IndexError, ValueError):
            continue
        procs[int(d)] = (ppid, argv)
    return procs


def descendants(procs, root):
    children = {}
    for pid, (ppid, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def pss_kib(pid):
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


def guest_ram_pss_kib(pid, guest_bytes):
    """PSS of the VMM's mapping of guest RAM (the anonymous mapping of the
    guest's size)."""
    header = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) ")
    size, total = 0, 0
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            m = header.match(line)
            if m:
                size = int(m.group(2), 16) - int(m.group(1), 16)
            elif line.startswith("Pss:") and guest_bytes <= size <= guest_bytes + (8 << 20):
                total += int(line.split()[1])
    return total


def parse_size(s):
    m = re.fullmatch(r"(\d+)([KMGkmg]?)i?[Bb]?", s)
    if not m:
        return None
    return int(m.group(1)) << {"": 0, "k": 10, "m": 20, "g": 30}[m.group(2).lower()]


def vmm_option(argv, *names):
    for i, a in enumerate(argv):
        for n in names:
            if a == n and i + 1 < len(argv):
                return argv[i + 1]
            if a.startswith(n + "="):
                return a.split("=", 1)[1]
    return None


def container_memory(docker, name, rt):
    """PSS (KiB) of the host processes container NAME adds, by role."""
    info = json.loads(docker("inspect", name).stdout)[0]
    cid, pid = info["Id"], info["State"]["Pid"]
    procs = proc_table()
    # The shim: the parent of .State.Pid (Docker's containerd-shim-runc-v2 for
    # both runtimes), else the shim whose command line names the container.
    shim = procs.get(pid, (None,))[0]
    if shim not in procs or "containerd-shim" not in " ".join(procs[shim][1][:1]):
        shim = next((p for p, (_, argv) in procs.items()
                     if argv and "containerd-shim" in argv[0] and cid in argv), None)
    if shim is None:
        raise RuntimeError(f"{name}: no containerd-shim found for {cid}")
    members = set(descendants(procs, shim))
    vm_name = guest_bytes = None
    if rt != "runc":
        argv = procs[pid][1]
        vm_name = vmm_option(argv, "--name")
        guest_bytes = parse_size(vmm_option(argv, "-m", "--memory") or "512M")
        if vm_name:
            mark = f"/run/vmlab-oci/{vm_name}/"
            members |= {p for p, (_, a) in procs.items() if any(mark in x for x in a)}
    roles = {}
    detail = []
    for p in sorted(members):
        argv = procs[p][1]
        exe = os.path.basename(argv[0]) if argv else "?"
        if p == shim:
            role = "shim"
        elif rt != "runc" and p == pid:
            role = "VMM"
        elif "virtiofsd" in exe:
            role = "virtiofsd"
        else:
            role = "container processes" if rt == "runc" else "other"
        try:
            k = pss_kib(p)
        except OSError:
            continue  # exited meanwhile
        roles[role] = roles.get(role, 0) + k
        detail.append({"pid": p, "role": role, "exe": exe, "pss_kib": k})
    out = {"total_kib": sum(roles.values()), "roles_kib": roles, "processes": detail, "vm_name": vm_name}
    if rt != "runc":
        out["guest_ram_bytes"] = guest_bytes
        try:
            g = guest_ram_pss_kib(pid, guest_bytes)
            out["vmm_guest_ram_pss_kib"] = g
            out["vmm_outside_guest_ram_pss_kib"] = roles.get("VMM", 0) - g
        except (OSError, TypeError):
            pass
    return out


# --- quiet machine -----------------------------------------------------------

def busy_reasons():
    reasons = []
    vmms = cargo_tests = 0
    for _, argv in proc_table().values():
        line = " ".join(argv)
        if line.startswith(VMM_MARK):
            vmms += 1
        if argv and os.path.basename(argv[0]) == "cargo" and "test" in argv[1:3]:
            cargo_tests += 1
    if vmms:
        reasons.append(f"{vmms} vmlab OCI VMM(s) running")
    if cargo_tests:
        reasons.append(f"{cargo_tests} `cargo test` running")
    return reasons


def vmm_names():
    """--name of every vmlab OCI VMM running."""
    return {vmm_option(argv, "--name") for _, argv in proc_table().values()
            if " ".join(argv).startswith(VMM_MARK)}


def wait_quiet(limit):
    deadline = time.monotonic() + limit
    while True:
        reasons = busy_reasons()
        if not reasons:
            return []
        if time.monotonic() >= deadline:
            return reasons
        print(f"bench_oci: waiting for a quiet machine: {', '.join(reasons)}", file=sys.stderr, flush=True)
        time.sleep(30)


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


# --- the benchmark -----------------------------------------------------------

def wait_ready(docker, name, deadline):
    """Until `docker exec NAME true` succeeds; returns the seconds it took."""
    t0 = time.monotonic()
    last = ""
    while time.monotonic() < deadline:
        st = docker("inspect", "-f", "{{.State.Status}}", name, check=False).stdout.strip()
        if st in ("exited", "dead"):
            raise RuntimeError(f"{name} {st} before it answered exec: {docker('logs', name, check=False).stderr[-800:]}")
        if st == "running":
            try:
                r = docker("exec", name, "true", check=False,
                           timeout=max(5, min(120, deadline - time.monotonic())))
                if r.returncode == 0:
                    return time.monotonic() - t0
                last = r.stderr.strip()
            except subprocess.TimeoutExpired:
                last = "docker exec timed out"
        time.sleep(0.5)
    raise RuntimeError(f"{name}: not answering `docker exec true` within the ready timeout ({last})")


def stats(xs):
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "raw": xs}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5, help="runs per measure and runtime (default 5)")
    p.add_argument("--image", default="vmlab-busybox:test")
    p.add_argument("--runtime", default="vmlab", help="the Docker runtime name of vmlab")
    p.add_argument("--docker", default="/usr/bin/docker")
    p.add_argument("--timeout", type=float, default=300, help="seconds one docker command may take")
    p.add_argument("--ready-timeout", type=float, default=300,
                   help="seconds a detached container may take to answer `docker exec true`")
    p.add_argument("--settle", type=float, default=2.0,
                   help="seconds between readiness and the PSS reading")
    p.add_argument("--wait-quiet", type=float, default=0,
                   help="first wait up to this many seconds (polling every 30 s) until no vmlab OCI VMM "
                        "and no `cargo test` runs")
    p.add_argument("--json")
    p.add_argument("--markdown")
    a = p.parse_args()
    command = os.environ.get("VMLAB_BENCH_COMMAND") or "scripts/bench_oci.py" + "".join(
        f" {x}" for x in sys.argv[1:])

    if a.wait_quiet > 0:
        left = wait_quiet(a.wait_quiet)
        if left:
            print(f"bench_oci: still busy after {a.wait_quiet:.0f} s ({', '.join(left)}); running anyway",
                  file=sys.stderr)
    busy_before = busy_reasons()

    docker = Docker(a.docker, a.timeout)
    runtimes = ["runc", a.runtime]

    def on_signal(sig, _):
        raise SystemExit(f"bench_oci: signal {sig}")
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    docker("image", "inspect", a.image, "--format", "{{.Id}}")
    server = docker("version", "--format", "{{.Server.Version}}").stdout.strip()
    rt_path = json.loads(docker("info", "--format", "{{json .Runtimes}}").stdout).get(a.runtime, {}).get("path")
    if not rt_path:
        sys.exit(f"bench_oci: docker has no runtime {a.runtime!r} (scripts/install-runtime.sh)")
    others = [l for l in docker("ps", "--format", "{{.Names}} {{.Image}}").stdout.splitlines() if l]
    load_before = loadavg()
    started = datetime.datetime.now(datetime.timezone.utc)
    tag = f"bench-oci-{os.getpid()}"
    start = {rt: [] for rt in runtimes}
    mem = {rt: [] for rt in runtimes}
    ready = {rt: [] for rt in runtimes}
    execs = {rt: [] for rt in runtimes}
    mine = set()  # the VMs of this run's containers
    foreign = set()  # other VMMs seen while measuring

    def sample_foreign():
        foreign.update(vmm_names() - mine)
    try:
        # One unmeasured start per runtime (page cache, the runtime binary).
        for rt in runtimes:
            name = f"{tag}-warm-{rt}"
            docker.names.add(name)
            docker("run", "--rm", "--name", name, *runtime_args(rt), a.image, "true")
            docker.names.discard(name)
        for i in range(a.runs):
            for rt in runtimes:
                name = f"{tag}-true-{rt}-{i}"
                docker.names.add(name)
                start[rt].append(timed(lambda: docker("run", "--rm", "--name", name, *runtime_args(rt),
                                                      a.image, "true")))
                docker.names.discard(name)
            sample_foreign()
            print(f"start {i + 1}/{a.runs}: " + ", ".join(f"{rt} {start[rt][-1]:.2f} s" for rt in runtimes),
                  file=sys.stderr, flush=True)
        for i in range(a.runs):
            for rt in runtimes:
                name = f"{tag}-sleep-{rt}-{i}"
                docker.names.add(name)
                try:
                    docker("run", "-d", "--name", name, *runtime_args(rt), a.image, "sleep", "600")
                    ready[rt].append(wait_ready(docker, name, time.monotonic() + a.ready_timeout))
                    time.sleep(a.settle)
                    mem[rt].append(container_memory(docker, name, rt))
                    if mem[rt][-1].get("vm_name"):
                        mine.add(mem[rt][-1]["vm_name"])
                    sample_foreign()
                    docker("exec", name, "true")  # warm-up
                    execs[rt].append(timed(lambda: docker("exec", name, "true")))
                finally:
                    docker.rm(name)
            print(f"container {i + 1}/{a.runs}: " + ", ".join(
                f"{rt} {mem[rt][-1]['total_kib'] / 1024:.1f} MiB PSS, exec {execs[rt][-1] * 1e3:.0f} ms"
                for rt in runtimes), file=sys.stderr, flush=True)
    finally:
        docker.cleanup()

    report = {
        "command": command,
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "host": host_description(),
        "docker": server,
        "image": a.image,
        "vmlab_runtime": {"name": a.runtime, "path": rt_path, "resolves_to": os.path.realpath(rt_path)},
        "runs": a.runs,
        "load_before": load_before,
        "load_after": loadavg(),
        "busy_before": busy_before,
        "other_containers": others,
        "foreign_vmms_seen": sorted(foreign),
        "start_s": {rt: stats(v) for rt, v in start.items()},
        "ready_s": {rt: stats(v) for rt, v in ready.items()},
        "exec_s": {rt: stats(v) for rt, v in execs.items()},
        "memory_kib": {rt: {"total": stats([m["total_kib"] for m in v]),
                            "roles": {role: statistics.median([m["roles_kib"].get(role, 0) for m in v])
                                      for role in sorted({r for m in v for r in m["roles_kib"]})},
                            "samples": v} for rt, v in mem.items()},
        "kata_published": [{"what": w, "figure": f, "source": s} for w, f, s in KATA_PUBLISHED],
    }
    vm = mem[a.runtime]
    report["guest_ram_bytes"] = vm[0].get("guest_ram_bytes") if vm else None
    for k in ("vmm_guest_ram_pss_kib", "vmm_outside_guest_ram_pss_kib"):
        if vm and all(k in m for m in vm):
            report[k] = statistics.median([m[k] for m in vm])
    write_report(report, markdown(report, runtimes), a.json, a.markdown)
    return 0


def markdown(r, runtimes):
    runc, vm = runtimes
    n = r["runs"]
    mib = lambda k: f"{k / 1024:.1f} MiB"  # noqa: E731
    out = [f"Command: `{r['command']}` ({r['date']}; Docker {r['docker']}, image {r['image']}, "
           f"vmlab runtime {r['vmlab_runtime']['path']} → {r['vmlab_runtime']['resolves_to']}; "
           f"{r['host']['cpu']}, {r['host']['cores']} cores, {r['host']['kvm']}; "
           f"load average {r['load_before']} before, {r['load_after']} after).", ""]
    if r["busy_before"]:
        out += [f"Not quiet when it started: {', '.join(r['busy_before'])}.", ""]
    if r.get("foreign_vmms_seen"):
        out += [f"Other vmlab VMMs seen while measuring: {len(r['foreign_vmms_seen'])}.", ""]
    if r["other_containers"]:
        out += [f"Other containers running meanwhile: {', '.join(r['other_containers'])}.", ""]
    out += [f"| measure (median of {n}; min-max) | runc | vmlab | vmlab / runc |", "|---|---|---|---|"]

    def row(label, a, b, num, unit):
        ratio = b["median"] / a["median"] if a["median"] else float("nan")
        cell = lambda x: f"{num(x['median'])} {unit} ({num(x['min'])}-{num(x['max'])})"  # noqa: E731
        out.append(f"| {label} | {cell(a)} | {cell(b)} | {ratio:.1f} |")
    s = lambda x: f"{x:.2f}"  # noqa: E731
    row("`docker run --rm IMAGE true`, wall time", r["start_s"][runc], r["start_s"][vm], s, "s")
    row("`docker run -d IMAGE sleep 600` until `docker exec NAME true` first succeeds", r["ready_s"][runc],
        r["ready_s"][vm], s, "s")
    row("host PSS per running container (runc: shim + container processes; vmlab: shim + VMM + virtiofsd)",
        r["memory_kib"][runc]["total"], r["memory_kib"][vm]["total"], lambda k: f"{k / 1024:.1f}", "MiB")
    row("`docker exec NAME true` round trip (after one warm-up)", r["exec_s"][runc], r["exec_s"][vm],
        lambda x: f"{x * 1e3:.0f}", "ms")
    out += ["", "PSS by process (medians):", "", "| runtime | process | PSS |", "|---|---|---|"]
    for rt in runtimes:
        for role, k in r["memory_kib"][rt]["roles"].items():
            out.append(f"| {rt} | {role} | {mib(k)} |")
    if r.get("guest_ram_bytes"):
        g = r["guest_ram_bytes"] >> 20
        line = f"The VMM's guest RAM (`-m`) is {g} MiB"
        if "vmm_guest_ram_pss_kib" in r:
            line += (f"; of the VMM's PSS, {mib(r['vmm_guest_ram_pss_kib'])} is guest RAM the guest "
                     f"has touched and {mib(r['vmm_outside_guest_ram_pss_kib'])} the VMM itself")
        out += ["", line + "."]
    out += ["", "Published figures for Kata Containers, **not measured here** (other hosts, "
            "hardware virtualization, other set-ups; for scale only):", "",
            "| what | published figure | source |", "|---|---|---|"]
    for k in r["kata_published"]:
        out.append(f"| {k['what']} | {k['figure']} | {k['source']} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
