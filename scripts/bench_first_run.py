#!/usr/bin/env python3
"""Start to first KVM_RUN: vmlab's own `--boot-time` mark over many short
starts (each vmlab is stopped with SIGTERM once its guest runs), for one or
more vmlab binaries, interleaved (A B A B ...) so that the load of a shared
machine hits them alike. Prints the median, min and max per binary.

The guest is the benchmark's (scripts/bench.py): target/guest/vmlinux with
the read-only root disk, vmlab's default memory and vCPUs.

Usage: scripts/bench_first_run.py [--runs 20] [--net] [--memory SIZE] [--json F] [VMLAB ...]
       (default VMLAB: target/release/vmlab)
"""

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(SCRIPTS)
sys.path.insert(0, SCRIPTS)
from bench import TAP, boot_time_marks, entered, net_unavailable, vm_network  # noqa: E402


def stop_once_running(argv, wait=0.5, tries=20, env=None):
    """Runs vmlab `argv` and sends it SIGTERM every `wait` s until it ends
    (vmlab takes SIGTERM, and then prints its --boot-time marks, once its
    vCPUs run; one that comes earlier ends it without them). Its stderr."""
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env)
    for _ in range(tries):
        time.sleep(wait)
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.communicate(timeout=wait)[1]
        except subprocess.TimeoutExpired:
            continue
    proc.kill()
    return proc.communicate()[1]


def first_kvm_run_ms(vmlab, ns, memory=None, wait=0.5):
    argv = [vmlab, "-q", "run", "--kernel", os.path.join(REPO, "target/guest/vmlinux"),
            "--disk", f"path={os.path.join(REPO, 'target/guest/rootfs.ext4')},readonly=on",
            "--boot-time"] + (["--memory", memory] if memory else []) + (["--net", f"tap={TAP}"] if ns else []) + ["--", "true"]
    with entered(ns):
        err = stop_once_running(argv, wait)
    first, _ = boot_time_marks(err)
    if first is None:
        raise RuntimeError(f"{vmlab} printed no --boot-time marks:\n{err[-2000:]}")
    return first


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--json")
    p.add_argument("--net", action="store_true",
                   help="with a virtio-net interface on a TAP in a namespace of its own, as bench.py runs it")
    p.add_argument("--memory", help="guest memory (default: each vmlab's default)")
    p.add_argument("vmlab", nargs="*", default=[os.path.join(REPO, "target/release/vmlab")])
    args = p.parse_args()
    if args.net and net_unavailable():
        sys.exit(f"bench_first_run: --net: {net_unavailable()}")
    with open("/proc/loadavg") as f:
        load_before = " ".join(f.read().split()[:3])
    runs = {b: [] for b in args.vmlab}
    # One namespace and TAP for all runs (see bench.py's short starts).
    with vm_network(args.net) as ns:
        for i in range(args.runs):
            for b in args.vmlab:
                runs[b].append(first_kvm_run_ms(b, ns, args.memory))
            print(f"run {i + 1}/{args.runs}: " + ", ".join(f"{runs[b][-1]:.1f}" for b in args.vmlab),
                  file=sys.stderr, flush=True)
    with open("/proc/loadavg") as f:
        load_after = " ".join(f.read().split()[:3])
    report = {"runs": args.runs, "net": args.net, "memory": args.memory, "load_before": load_before, "load_after": load_after,
              "first_kvm_run_ms": {b: {"median": statistics.median(v), "min": min(v), "max": max(v),
                                       "raw": v} for b, v in runs.items()}}
    for b, s in report["first_kvm_run_ms"].items():
        print(f"{b}: start to first KVM_RUN median {s['median']:.1f} ms (min {s['min']:.1f}, "
              f"max {s['max']:.1f}, {args.runs} runs)")
    print(f"load average {load_before} before, {load_after} after")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
