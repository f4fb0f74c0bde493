#!/usr/bin/env python3
"""Block I/O benchmark: the same disk workload (vmlab-workload disk: sequential
write with fsync, sequential read, 4 KiB random reads, all O_DIRECT) on the
host, in a vmlab guest (virtio-blk) and in a QEMU microvm guest
(virtio-blk-device, no vhost), on the same kind of raw image file, with the
same kernel and root disk. Runs are interleaved (host, vmlab, QEMU, ...);
medians of N.

Usage: scripts/bench_block.py [--runs 5] [--mib 64] [--random-ops 2000] [--json F] [--markdown F]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_boot import CLEARCPUID, host_description, run_until, write_report  # noqa: E402

GUEST = os.path.join(REPO, "target/guest")
WORKLOAD_HOST = os.path.join(REPO, "target/x86_64-unknown-linux-gnu/release/vmlab-workload")


def parse_json_line(text):
    """The workload's JSON line, once it has arrived complete."""
    complete = text.split("\n")[:-1] if not text.endswith("\n") else text.split("\n")
    for line in complete:
        line = line.strip().strip("\r")
        if line.startswith("{") and '"workload":"disk"' in line.replace(" ", ""):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def run_vm(argv, timeout):
    """Runs a VMM until the guest prints the workload's JSON line."""
    result, _ = run_until(argv, timeout, lambda out, _start, _pid: parse_json_line(out))
    return result


def fresh_image(path, mib):
    with open(path, "wb") as f:
        f.truncate((mib + 16) << 20)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--mib", type=int, default=64)
    p.add_argument("--random-ops", type=int, default=2000)
    p.add_argument("--vmlab", default=os.path.join(REPO, "target/release/vmlab"))
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--dir", default=None, help="where the image files go (default: a temp dir on /var/tmp)")
    p.add_argument("--json")
    p.add_argument("--markdown")
    args = p.parse_args()

    workdir = args.dir or tempfile.mkdtemp(prefix="vmlab-bench-block-", dir="/var/tmp")
    image = os.path.join(workdir, "data.img")
    rootfs = os.path.join(GUEST, "rootfs.ext4")
    kernel = os.path.join(GUEST, "vmlinux")
    wl = ["vmlab-workload", "disk", "--path", "/dev/vdb", "--mib", str(args.mib),
          "--random-ops", str(args.random_ops), "--direct", "--force"]
    vmlab = [args.vmlab, "-q", "run", "--kernel", kernel, "--disk", f"path={rootfs},readonly=on",
             "--disk", f"path={image}", "--"] + wl
    pvm = "kvm_pvm" in host_description()["kvm"]
    append = ("console=ttyS0 reboot=k panic=-1 8250.nr_uarts=1 random.trust_bootloader=on quiet "
              + (CLEARCPUID + " " if pvm else "")
              + "root=/dev/vda ro vmlab.tty=0 vmlab.quiet=1 vmlab.cmd=" + "\0".join(wl).encode().hex())
    # acpi=off: the guest kernel has no ACPI; QEMU then lists the
    # virtio-mmio devices on the kernel command line (auto-kernel-cmdline).
    qemu = ["qemu-system-x86_64", "-M", "microvm,x-option-roms=off,isa-serial=on,rtc=off,pit=on,pic=on,acpi=off",
            "-enable-kvm", "-cpu", "host,-arch-capabilities,-invtsc,-kvm-pv-ipi,-kvm-pv-tlb-flush,-kvm-pv-sched-yield",
            "-m", "256", "-smp", "1", "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio",
            "-no-reboot", "-kernel", kernel, "-append", append,
            "-drive", f"id=root,file={rootfs},format=raw,if=none,readonly=on",
            "-device", "virtio-blk-device,drive=root",
            "-drive", f"id=data,file={image},format=raw,if=none",
            "-device", "virtio-blk-device,drive=data"]
    host = [WORKLOAD_HOST, "disk", "--path", image, "--mib", str(args.mib),
            "--random-ops", str(args.random_ops), "--direct", "--force"]

    runs = {"host": [], "vmlab": [], "qemu": []}
    for i in range(args.runs):
        for name in ("host", "vmlab", "qemu"):
            fresh_image(image, args.mib)
            if name == "host":
                out = subprocess.run(host, capture_output=True, text=True, timeout=args.timeout)
                r = parse_json_line(out.stdout)
                if r is None:
                    raise RuntimeError(f"host workload failed: {out.stdout}\n{out.stderr}")
            else:
                r = run_vm(vmlab if name == "vmlab" else qemu, args.timeout)
            runs[name].append(r)
            print(f"run {i + 1}/{args.runs} {name}: {json.dumps(r)}", file=sys.stderr, flush=True)
    os.unlink(image)

    keys = ("write_mib_per_s", "read_mib_per_s", "rand_read_iops")
    med = {n: {k: statistics.median([r[k] for r in rs]) for k in keys} for n, rs in runs.items()}
    report = {"host": host_description(), "runs": args.runs, "mib": args.mib,
              "random_ops": args.random_ops, "median": med, "raw": runs,
              "command": " ".join(sys.argv)}
    h = report["host"]
    labels = {"write_mib_per_s": "sequential write, MiB/s (1 MiB blocks, fsync)",
              "read_mib_per_s": "sequential read, MiB/s (1 MiB blocks)",
              "rand_read_iops": "4 KiB random read, IOPS (queue depth 1)"}
    lines = [f"Host: {h['cpu']}, {h['cores']} cores, Linux {h['kernel']}, {h['kvm']}.",
             f"{args.mib} MiB, {args.random_ops} random reads, O_DIRECT everywhere; medians of {args.runs} interleaved runs.",
             "", "| figure | host | vmlab | QEMU microvm | vmlab/QEMU | vmlab/host |", "|---|---|---|---|---|---|"]
    for k in keys:
        hv, vv, qv = med["host"][k], med["vmlab"][k], med["qemu"][k]
        lines.append(f"| {labels[k]} | {hv:.1f} | {vv:.1f} | {qv:.1f} | {vv / qv:.2f} | {vv / hv:.3f} |")
    lines += ["", f"Command: `{report['command']}`"]
    md = "\n".join(lines) + "\n"
    write_report(report, md, args.json, args.markdown)


if __name__ == "__main__":
    main()
