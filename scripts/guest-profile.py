#!/usr/bin/env python3
"""Maps a `vmlab run --profile-guest FILE` sample file onto the guest
kernel's functions.

Usage: scripts/guest-profile.py VMLINUX SAMPLES [--top N] [--bucket SECONDS]

Prints: the functions with the most samples (each sample is one period of
wall time of one vCPU, 10 ms by default), split by whether the guest had
interrupts enabled (on the nested PVM host, interrupts-off code runs in
KVM's instruction emulator, so that split says what is emulated); then a
timeline: per bucket of wall time, the top functions.
"""
import argparse
import bisect
import collections
import subprocess
import sys


def load_symbols(vmlinux):
    out = subprocess.run(["nm", "-n", vmlinux], check=True, capture_output=True, text=True).stdout
    addrs, names = [], []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) != 3 or parts[1] not in "tTwW":
            continue
        addrs.append(int(parts[0], 16))
        names.append(parts[2])
    return addrs, names


def symbolize(addrs, names, rip):
    i = bisect.bisect_right(addrs, rip) - 1
    if i < 0 or rip >= 0xffffffff_ffffffff:
        return f"?{rip:#x}"
    if rip < 0xffff_8000_0000_0000:
        return "[user]"
    return names[i]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("vmlinux")
    ap.add_argument("samples")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--bucket", type=float, default=2.0, help="timeline bucket in seconds")
    ap.add_argument("--under", metavar="FUNC", help="only: what the samples with FUNC on their stack were running inside it")
    a = ap.parse_args()
    addrs, names = load_symbols(a.vmlinux)
    samples = []
    with open(a.samples) as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            parts = line.split()
            ms, vcpu, rip, irq = parts[:4]
            stack = [int(x, 16) for x in parts[4].split(",")] if len(parts) > 4 else []
            samples.append((int(ms), int(vcpu), int(rip, 16), irq == "1", stack))
    if not samples:
        sys.exit("no samples")
    if a.under:
        under(addrs, names, samples, a.under, a.top)
        return
    total = len(samples)
    by_fn = collections.Counter()
    by_fn_off = collections.Counter()
    for ms, vcpu, rip, irq, _ in samples:
        fn = symbolize(addrs, names, rip)
        by_fn[fn] += 1
        if not irq:
            by_fn_off[fn] += 1
    off = sum(1 for s in samples if not s[3])
    print(f"{total} samples, {off} ({100 * off / total:.0f}%) with interrupts off")
    print(f"\n{'samples':>8} {'%':>5} {'irq-off':>8}  function")
    for fn, n in by_fn.most_common(a.top):
        print(f"{n:8d} {100 * n / total:5.1f} {by_fn_off[fn]:8d}  {fn}")
    print(f"\ntimeline (bucket {a.bucket:g} s): top functions")
    buckets = collections.defaultdict(collections.Counter)
    for ms, vcpu, rip, irq, _ in samples:
        buckets[int(ms / 1000 / a.bucket)][symbolize(addrs, names, rip)] += 1
    for b in sorted(buckets):
        c = buckets[b]
        n = sum(c.values())
        top = ", ".join(f"{fn} {100 * k / n:.0f}%" for fn, k in c.most_common(4))
        print(f"{b * a.bucket:6.1f}s {n:5d}  {top}")

    phases = collections.Counter()
    phases_off = collections.Counter()
    first_ms = {}
    last_ms = {}
    for ms, vcpu, rip, irq, stack in samples:
        p = phase(addrs, names, rip, stack)
        phases[p] += 1
        if not irq:
            phases_off[p] += 1
        first_ms.setdefault(p, ms)
        last_ms[p] = ms
    print("\nby phase (the function called from start_kernel, kernel_init_freeable,")
    print("do_one_initcall, ... found on the sampled stack; a guess-unwind, so approximate)")
    print(f"{'samples':>8} {'%':>5} {'irq-off':>8} {'from s':>7} {'to s':>7}  phase")
    for p, n in phases.most_common(a.top):
        print(f"{n:8d} {100 * n / total:5.1f} {phases_off[p]:8d} {first_ms[p] / 1000:7.2f} {last_ms[p] / 1000:7.2f}  {p}")


def under(addrs, names, samples, func, top):
    """Breaks the samples with `func` on their stack down by the frame
    called from `func` and by the innermost function."""
    child = collections.Counter()
    leaf = collections.Counter()
    n = 0
    for ms, vcpu, rip, irq, stack in samples:
        chain = [symbolize(addrs, names, rip)] + [symbolize(addrs, names, x) for x in stack]
        if func not in chain[1:]:
            continue
        i = chain.index(func, 1)
        n += 1
        child[chain[i - 1]] += 1
        leaf[chain[0]] += 1
    print(f"{n} samples with {func} on the stack")
    print("\ncalled from it:")
    for f, k in child.most_common(top):
        print(f"{k:8d}  {f}")
    print("\ninnermost:")
    for f, k in leaf.most_common(top):
        print(f"{k:8d}  {f}")


# Functions whose callees name a boot phase, most specific first.
ROOTS = ("do_one_initcall", "start_kernel", "kernel_init_freeable", "kernel_init",
         "smpboot_thread_fn", "worker_thread", "kthread", "ret_from_fork")


def phase(addrs, names, rip, stack):
    """The boot phase of a sample: the frame right inside the most specific
    known root on its stack (e.g. "start_kernel > mm_init")."""
    frames = [symbolize(addrs, names, rip)] + [symbolize(addrs, names, a) for a in stack]
    chain = []
    for f in frames:
        if not chain or chain[-1] != f:
            chain.append(f)
    for root in ROOTS:
        if root in chain:
            i = chain.index(root)
            return f"{root} > {chain[i - 1]}" if i > 0 else root
    return f"? > {chain[0]}"

if __name__ == "__main__":
    main()
