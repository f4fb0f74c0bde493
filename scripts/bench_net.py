#!/usr/bin/env python3
"""Network benchmark: TCP throughput host -> guest, guest -> host, and TCP
round-trip latency, for
  - vmlab (virtio-net on a TAP device),
  - QEMU microvm with the same kernel and root disk (virtio-net-device on
    `-netdev tap`, vhost=off),
  - two network namespaces joined by a veth pair (what a container gets),
each in network namespaces this script creates and deletes; no address
outside them is used. Runs are interleaved (vmlab, QEMU, veth, ...);
medians of N.

The same program measures everywhere: vmlab-workload net-server /
net-client (TCP, --seconds of bulk data, then --rtt-count one-byte
round trips with TCP_NODELAY). The guest's root disk has no iperf3, and
one tool on both ends of every pair keeps the comparison fair.
"host" is the namespace holding the TAP (or the veth's first end);
"guest" is the VM (or the veth's second namespace).

Usage: scripts/bench_net.py [--runs 5] [--seconds 10] [--rtt-count 200] [--json F] [--markdown F]
Needs root, iproute2, qemu-system-x86_64, target/release/vmlab and the
guest (scripts/build-guest.sh).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_boot import CLEARCPUID, host_description, run_until, write_report  # noqa: E402

GUEST = os.path.join(REPO, "target/guest")
WORKLOAD_HOST = os.path.join(REPO, "target/x86_64-unknown-linux-gnu/release/vmlab-workload")
HOST_IP, GUEST_IP = "10.0.0.1", "10.0.0.2"
GUEST_PORT, HOST_PORT = 7430, 7433
KEYS = ("h2g_mib_per_s", "g2h_mib_per_s", "rtt_median_us")


def sh(*argv):
    subprocess.run(argv, check=True, stdin=subprocess.DEVNULL)


class Netns:
    """A network namespace, deleted with its devices on exit."""
    count = 0

    def __init__(self):
        Netns.count += 1
        self.name = f"vmlab-bench-net-{os.getpid()}-{Netns.count}"
        sh("ip", "netns", "add", self.name)
        sh("ip", "-n", self.name, "link", "set", "lo", "up")

    def ip(self, *args):
        sh("ip", "-n", self.name, *args)

    def exec(self, *argv):
        return ["ip", "netns", "exec", self.name, *argv]

    def __enter__(self):
        return self

    def __exit__(self, *_):
        subprocess.run(["ip", "netns", "delete", self.name], stdin=subprocess.DEVNULL)


def json_line(text, workload):
    """The first complete JSON line of `workload` in `text`."""
    for line in text.replace("\r", "").split("\n")[:-1]:
        line = line.strip()
        if line.startswith("{") and f'"workload":"{workload}"' in line:
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def client(ns, host, port, args):
    """A net-client session from namespace `ns`; its JSON result."""
    out = subprocess.run(ns.exec(WORKLOAD_HOST, "net-client", "--host", host, "--port", str(port),
                                 "--seconds", str(args.seconds), "--rtt-count", str(args.rtt_count),
                                 "--timeout", "60"),
                         capture_output=True, text=True, timeout=args.seconds + 600)
    r = json_line(out.stdout + "\n", "net-client")
    if r is None:
        raise RuntimeError(f"net-client to {host}:{port} failed: {out.stdout}\n{out.stderr}")
    return r


def server(ns, bind, port):
    """A net-server in namespace `ns`, ready when this returns."""
    proc = subprocess.Popen(ns.exec(WORKLOAD_HOST, "net-server", "--bind", bind, "--port", str(port),
                                    "--timeout", "1200"),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    line = proc.stderr.readline()
    if "listening" not in line:
        proc.kill()
        raise RuntimeError(f"net-server in {ns.name}: {line}")
    return proc


def run_vm(name, args):
    """One boot of vmlab or QEMU on a fresh TAP: the guest serves one
    session from the host (host -> guest, RTT), then runs one session to
    the host (guest -> host)."""
    guest_cmd = ["sh", "-c",
                 f"vmlab-workload net-server --bind 0.0.0.0 --port {GUEST_PORT} --timeout 1200; "
                 f"vmlab-workload net-client --host {HOST_IP} --port {HOST_PORT} "
                 f"--seconds {args.seconds} --rtt-count {args.rtt_count} --timeout 60"]
    ipcfg = f"ip={GUEST_IP}::{HOST_IP}:255.255.255.0::eth0:off"
    kernel, rootfs = os.path.join(GUEST, "vmlinux"), os.path.join(GUEST, "rootfs.ext4")
    with Netns() as ns:
        ns.ip("tuntap", "add", "dev", "bt0", "mode", "tap")
        ns.ip("addr", "add", f"{HOST_IP}/24", "dev", "bt0")
        ns.ip("link", "set", "bt0", "up")
        if name == "vmlab":
            argv = [args.vmlab, "-q", "run", "--kernel", kernel, "--memory", "256M",
                    "--disk", f"path={rootfs},readonly=on", "--net", "tap=bt0",
                    "--cmdline", ipcfg, "--"] + guest_cmd
        else:
            pvm = "kvm_pvm" in host_description()["kvm"]
            append = ("console=ttyS0 reboot=k panic=-1 8250.nr_uarts=1 random.trust_bootloader=on quiet "
                      + (CLEARCPUID + " " if pvm else "") + ipcfg
                      + " root=/dev/vda ro vmlab.tty=0 vmlab.quiet=1 vmlab.cmd="
                      + "\0".join(guest_cmd).encode().hex())
            argv = ["qemu-system-x86_64", "-M",
                    "microvm,x-option-roms=off,isa-serial=on,rtc=off,pit=on,pic=on,acpi=off",
                    "-enable-kvm", "-cpu",
                    "host,-arch-capabilities,-invtsc,-kvm-pv-ipi,-kvm-pv-tlb-flush,-kvm-pv-sched-yield",
                    "-m", "256", "-smp", "1", "-nodefaults", "-no-user-config", "-nographic",
                    "-serial", "stdio", "-no-reboot", "-kernel", kernel, "-append", append,
                    "-drive", f"id=root,file={rootfs},format=raw,if=none,readonly=on",
                    "-device", "virtio-blk-device,drive=root",
                    "-netdev", "tap,id=n0,ifname=bt0,script=no,downscript=no,vhost=off",
                    "-device", "virtio-net-device,netdev=n0"]
        host_server = server(ns, HOST_IP, HOST_PORT)
        state = {}

        def check(out, _start, _pid):
            if "h2g" not in state and "net-server listening" in out:
                state["h2g"] = client(ns, GUEST_IP, GUEST_PORT, args)
            if "h2g" in state:
                return json_line(out, "net-client")
            return None

        try:
            g2h, _ = run_until(ns.exec(*argv), args.timeout, check)
        finally:
            host_server.kill()
            host_server.communicate()
    h2g = state["h2g"]
    return {"h2g_mib_per_s": h2g["mib_per_s"], "g2h_mib_per_s": g2h["mib_per_s"],
            "rtt_median_us": h2g["rtt_median_us"], "g2h_rtt_median_us": g2h["rtt_median_us"]}


def run_veth(args):
    """The container case: namespace A ("host") and B ("guest") joined by
    a veth pair."""
    with Netns() as a, Netns() as b:
        a.ip("link", "add", "va", "type", "veth", "peer", "name", "vb", "netns", b.name)
        a.ip("addr", "add", f"{HOST_IP}/24", "dev", "va")
        b.ip("addr", "add", f"{GUEST_IP}/24", "dev", "vb")
        a.ip("link", "set", "va", "up")
        b.ip("link", "set", "vb", "up")
        srv = server(b, GUEST_IP, GUEST_PORT)
        h2g = client(a, GUEST_IP, GUEST_PORT, args)
        srv.communicate(timeout=60)
        srv = server(a, HOST_IP, HOST_PORT)
        g2h = client(b, HOST_IP, HOST_PORT, args)
        srv.communicate(timeout=60)
    return {"h2g_mib_per_s": h2g["mib_per_s"], "g2h_mib_per_s": g2h["mib_per_s"],
            "rtt_median_us": h2g["rtt_median_us"], "g2h_rtt_median_us": g2h["rtt_median_us"]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--rtt-count", type=int, default=200)
    p.add_argument("--vmlab", default=os.path.join(REPO, "target/release/vmlab"))
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--only", default="vmlab,qemu,veth", help="comma-separated subset")
    p.add_argument("--json")
    p.add_argument("--markdown")
    args = p.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_net: needs root (network namespaces, TAP devices)")

    names = [n for n in ("vmlab", "qemu", "veth") if n in args.only.split(",")]
    runs = {n: [] for n in names}
    for i in range(args.runs):
        for name in names:
            r = run_veth(args) if name == "veth" else run_vm(name, args)
            runs[name].append(r)
            print(f"run {i + 1}/{args.runs} {name}: {json.dumps(r)}", file=sys.stderr, flush=True)

    med = {n: {k: statistics.median([r[k] for r in rs]) for k in KEYS} for n, rs in runs.items()}
    report = {"host": host_description(), "runs": args.runs, "seconds": args.seconds,
              "rtt_count": args.rtt_count, "median": med, "raw": runs, "command": " ".join(sys.argv)}
    h = report["host"]
    labels = {"h2g_mib_per_s": "TCP host → guest, MiB/s", "g2h_mib_per_s": "TCP guest → host, MiB/s",
              "rtt_median_us": "TCP round trip (1 byte, median), µs"}
    cols = {"vmlab": "vmlab (TAP)", "qemu": "QEMU microvm (TAP, no vhost)", "veth": "veth pair (container)"}
    lines = [f"Host: {h['cpu']}, {h['cores']} cores, Linux {h['kernel']}, {h['kvm']}. "
             f"Medians of {args.runs} interleaved runs; {args.seconds:g} s of bulk data, "
             f"{args.rtt_count} round trips per session.", "",
             "| figure | " + " | ".join(cols[n] for n in names) + " |",
             "|---|" + "---|" * len(names)]
    for k in KEYS:
        lines.append(f"| {labels[k]} | " + " | ".join(f"{med[n][k]:.2f}" if k != "rtt_median_us"
                                                      else f"{med[n][k]:.0f}" for n in names) + " |")
    lines += ["", f"Command: `{report['command']}`"]
    md = "\n".join(lines) + "\n"
    write_report(report, md, args.json, args.markdown)


if __name__ == "__main__":
    main()
