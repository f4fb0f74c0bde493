#!/usr/bin/env python3
"""Boot benchmark: vmlab and QEMU microvm on the same kernel and initramfs,
interleaved (A B A B ...), medians of N runs.

For each run it measures, from the moment the VMM process is spawned:
  - time until the guest command's marker line appears on the serial
    console (the same external measure for both VMMs);
  - vmlab only: its own --boot-time marks (first KVM_RUN, init up);
  - the VMM's memory overhead when the marker appears: RSS of every mapping
    except the guest-RAM mapping, from /proc/PID/smaps;
  - the VMM's CPU time (user+system) until then.

Usage: scripts/bench_boot.py [--runs 5] [--kernel K] [--initrd I] [--json F] [--markdown F]
"""

import argparse
import json
import os
import platform
import re
import select
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKER = "vmlab-bench-ready"
CLEARCPUID = ("noxsave mitigations=off clearcpuid=popcnt,cx16,smap,smep,rdpid,invpcid,"
              "pcid,pku,rdtscp,movbe,bmi1,bmi2,abm,rdrand,rdseed,erms,fsrm,avx,avx2,avx512f")


def write_report(report, md, json_path=None, markdown_path=None):
    """A benchmark's outputs: the report as JSON and its markdown table
    where asked, and the table on stdout."""
    if json_path:
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        with open(json_path, "w") as f:
            json.dump(report, f, indent=2)
    if markdown_path:
        with open(markdown_path, "w") as f:
            f.write(md)
    print(md)


def host_description():
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        with open("/proc/cpuinfo") as f:
            flags = next((l for l in f if l.startswith("flags")), "")
    except OSError:
        flags = ""
    pvm = os.path.exists("/sys/module/kvm_pvm")
    hw = " vmx " in f" {flags.split(':', 1)[-1]} " or " svm " in f" {flags.split(':', 1)[-1]} "
    kind = "nested KVM without VT-x (kvm_pvm)" if pvm or not hw else "hardware KVM"
    return {"cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release(), "kvm": kind}


def overhead_kib(pid, guest_bytes):
    """RSS (KiB) of all mappings except the one holding guest RAM."""
    total = 0
    guest = 0
    size = 0
    rss = 0
    header = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) ")
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            m = header.match(line)
            if m:
                size = int(m.group(2), 16) - int(m.group(1), 16)
                continue
            if line.startswith("Rss:"):
                rss = int(line.split()[1])
                total += rss
                # Guest RAM: the anonymous mapping of the guest's size (QEMU
                # may round it up or add a guard page).
                if guest_bytes <= size <= guest_bytes + (8 << 20):
                    guest += rss
    return total - guest


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def run_until(argv, timeout, check, every=None):
    """Spawns a VMM and feeds everything it has printed so far, with its
    start time (time.monotonic()) and pid, to `check(out_text, start, pid)`
    until that returns a result; then stops the VMM. `every`: (seconds,
    callback); `callback(start, pid)` also runs about that often while the
    VMM runs (scripts/bench.py looks for kernel trace events this way).
    Returns (result, stderr text)."""
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    out = b""
    result = None
    interval, tick = every or (1.0, None)
    ticked = start
    eof = False
    try:
        while result is None and time.monotonic() - start < timeout:
            ready, _, _ = select.select([proc.stdout], [], [], min(interval, 1.0))
            if tick and time.monotonic() - ticked >= interval:
                ticked = time.monotonic()
                tick(start, proc.pid)
            if ready:
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    eof = True
                    break
                out += chunk
                result = check(out.decode(errors="replace"), start, proc.pid)
    finally:
        proc.terminate()
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    err = err.decode(errors="replace")
    if result is None:
        why = f"ended (status {proc.returncode})" if eof else f"no result within {timeout}s"
        raise RuntimeError(f"{argv[0]}: {why}\n{out.decode(errors='replace')[-3000:]}\n{err[-2000:]}")
    return result, err


def run_once(argv, mem_bytes, timeout):
    def at_marker(out, start, pid):
        if MARKER not in out:
            return None
        return {"ready_s": time.monotonic() - start, "overhead_kib": overhead_kib(pid, mem_bytes),
                "cpu_s": cpu_seconds(pid)}

    result, err = run_until(argv, timeout, at_marker)
    m = re.search(r"first KVM_RUN after ([0-9.]+) ms, guest init up after ([0-9.]+|never)", err)
    if m:
        result["first_kvm_run_ms"] = float(m.group(1))
        result["init_up_s"] = float(m.group(2)) / 1000 if m.group(2) != "never" else None
    return result


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--kernel", default=os.path.join(REPO, "target/guest/vmlinux"))
    p.add_argument("--initrd", default=os.path.join(REPO, "target/guest/initramfs.cpio"))
    p.add_argument("--memory-mib", type=int, default=256)
    p.add_argument("--vmlab", default=os.path.join(REPO, "target/release/vmlab"))
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--json")
    p.add_argument("--markdown")
    args = p.parse_args()

    mem = args.memory_mib << 20
    pvm = "kvm_pvm" in host_description()["kvm"]
    # The guest command: print the marker, then wait to be measured.
    cmd = ["sh", "-c", f"echo {MARKER}; sleep 60"]
    vmlab = [args.vmlab, "run", "--kernel", args.kernel, "--initrd", args.initrd,
             "--memory", f"{args.memory_mib}M", "--boot-time", "--"] + cmd
    hexcmd = "\0".join(cmd).encode().hex()
    append = f"console=ttyS0 reboot=t panic=-1 8250.nr_uarts=1 random.trust_bootloader=on quiet vmlab.tty=0 vmlab.quiet=1 vmlab.cmd={hexcmd}"
    if pvm:
        append = append.replace("quiet", CLEARCPUID + " quiet", 1)
    qemu = ["qemu-system-x86_64", "-M", "microvm,x-option-roms=off,isa-serial=on,rtc=off,pit=on,pic=on",
            "-enable-kvm", "-cpu", "host,-arch-capabilities,-invtsc", "-m", str(args.memory_mib),
            "-smp", "1", "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio",
            "-no-reboot", "-kernel", args.kernel, "-initrd", args.initrd, "-append", append]

    runs = {"vmlab": [], "qemu": []}
    for i in range(args.runs):
        for name, argv in (("vmlab", vmlab), ("qemu", qemu)):
            r = run_once(argv, mem, args.timeout)
            runs[name].append(r)
            print(f"run {i + 1}/{args.runs} {name}: {json.dumps(r)}", file=sys.stderr, flush=True)

    summary = {}
    for name, rs in runs.items():
        summary[name] = {k: median([r.get(k) for r in rs]) for k in
                         ("ready_s", "overhead_kib", "cpu_s", "first_kvm_run_ms", "init_up_s")}
    report = {"host": host_description(), "runs": args.runs, "kernel": args.kernel,
              "initrd": args.initrd, "memory_mib": args.memory_mib, "raw": runs, "median": summary,
              "command": " ".join(sys.argv)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    md = markdown(report)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(md)
    print(md)


def fmt(v, unit, digits=1):
    return "n/a" if v is None else f"{v:.{digits}f} {unit}"


def markdown(r):
    v, q = r["median"]["vmlab"], r["median"]["qemu"]
    def ratio(a, b):
        return "n/a" if a is None or b is None or b == 0 else f"{a / b:.2f}"
    h = r["host"]
    lines = [
        f"Host: {h['cpu']}, {h['cores']} cores, Linux {h['kernel']}, {h['kvm']}.",
        f"Guest: {os.path.basename(r['kernel'])} + {os.path.basename(r['initrd'])}, {r['memory_mib']} MiB, 1 vCPU; medians of {r['runs']} interleaved runs.",
        "",
        "| figure | vmlab | QEMU microvm | vmlab/QEMU |",
        "|---|---|---|---|",
        f"| process start to guest command output | {fmt(v['ready_s'], 's', 2)} | {fmt(q['ready_s'], 's', 2)} | {ratio(v['ready_s'], q['ready_s'])} |",
        f"| process start to first KVM_RUN (vmlab's mark) | {fmt(v['first_kvm_run_ms'], 'ms', 2)} | n/a | |",
        f"| process start to guest init up (vmlab's mark) | {fmt(v['init_up_s'], 's', 2)} | n/a | |",
        f"| VMM memory overhead (RSS outside guest RAM) | {fmt(v['overhead_kib'] / 1024 if v['overhead_kib'] is not None else None, 'MiB', 2)} | {fmt(q['overhead_kib'] / 1024 if q['overhead_kib'] is not None else None, 'MiB', 2)} | {ratio(v['overhead_kib'], q['overhead_kib'])} |",
        f"| VMM process CPU time until then (user+sys, includes the vCPU threads, i.e. the guest) | {fmt(v['cpu_s'], 's', 2)} | {fmt(q['cpu_s'], 's', 2)} | {ratio(v['cpu_s'], q['cpu_s'])} |",
        "",
        f"Command: `{r['command']}`",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
