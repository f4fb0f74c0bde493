#!/usr/bin/env python3
"""`vmlab exec NAME true` round trip, next to the guest's own fork+exec.

Boots one detached VM (agent only, no main command), then N times,
interleaved:
  - host: wall time of `vmlab exec NAME true` (process start to exit:
    connect through the vsock socket, EXEC, the guest's fork+exec of
    /bin/true, EXIT, vmlab's own start-up and exit);
  - guest: busybox `time /bin/true` run through the agent, i.e. the fork,
    exec and wait of /bin/true measured by the guest's own clock.
Prints medians (and min/max) and stops the VM.

Usage: scripts/bench_exec.py [--runs 5] [--kernel K] [--initrd I] [--vmlab BIN]
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--kernel", default=os.path.join(REPO, "target/guest/vmlinux"))
    ap.add_argument("--initrd", default=os.path.join(REPO, "target/guest/initramfs.cpio.gz"))
    ap.add_argument("--vmlab", default=os.path.join(REPO, "target/release/vmlab"))
    args = ap.parse_args()

    state = tempfile.mkdtemp(prefix="vmlab-bench-exec-")
    env = dict(os.environ, VMLAB_STATE_DIR=state)
    name = f"bench-exec-{os.getpid()}"

    def vmlab(*a, **kw):
        return subprocess.run([args.vmlab, *a], env=env, capture_output=True, text=True, **kw)

    t0 = time.monotonic()
    r = vmlab("run", "--kernel", args.kernel, "--initrd", args.initrd,
              "--name", name, "--detach", "--ready-timeout", "900", timeout=1000)
    if r.returncode != 0:
        sys.exit(f"run --detach failed: {r.stderr}")
    print(f"VM up (agent answering) after {time.monotonic() - t0:.1f} s", file=sys.stderr)
    host, guest = [], []
    try:
        # One warm-up of each (first exec pages in busybox).
        vmlab("exec", name, "true", timeout=120)
        for i in range(args.runs):
            t = time.perf_counter()
            r = vmlab("exec", name, "true", timeout=120)
            host.append(time.perf_counter() - t)
            if r.returncode != 0:
                sys.exit(f"exec true: {r.returncode} {r.stderr}")
            r = vmlab("exec", name, "time", "/bin/true", timeout=120)
            m = re.search(r"real\s+(\d+)m\s*([\d.]+)s", r.stderr)
            if not m:
                sys.exit(f"no time output: {r.stderr!r}")
            guest.append(int(m.group(1)) * 60 + float(m.group(2)))
            print(f"run {i + 1}: exec round trip {host[-1] * 1e3:.0f} ms, "
                  f"guest fork+exec+wait {guest[-1] * 1e3:.0f} ms", file=sys.stderr)
    finally:
        vmlab("stop", name, "--timeout", "1", timeout=120)
        subprocess.run(["rm", "-rf", state])

    def row(label, xs):
        return (f"| {label} | {statistics.median(xs) * 1e3:.0f} ms | "
                f"{min(xs) * 1e3:.0f}-{max(xs) * 1e3:.0f} ms |")
    print(f"| measure (medians of {args.runs}) | median | range |")
    print("|---|---|---|")
    print(row("`vmlab exec NAME true`, host wall time", host))
    print(row("guest `time /bin/true` (fork+exec+wait, guest clock)", guest))


if __name__ == "__main__":
    main()
