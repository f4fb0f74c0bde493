#!/usr/bin/env python3
"""Start of `vmlab run --image` to its first KVM_RUN, for the 3 MB sample
image and a 200+ MB image (the sample plus one layer with a 220 MB file),
with the root on a per-run ext4 copy (`--root-device block`) and over
virtio-fs (`--root-device fs`, nothing copied), interleaved. Each vmlab is
stopped with SIGTERM once its vCPUs run; a first unmeasured run per image
fills the image cache. Prints medians (issue 15's target: the big image
within 50 ms of the sample with `fs`).

Usage: scripts/bench_image_start.py [--runs 5] [--json F] [VMLAB]
       (default VMLAB: target/release/vmlab)
"""

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(SCRIPTS)
sys.path.insert(0, SCRIPTS)
from bench import boot_time_marks  # noqa: E402
from bench_first_run import stop_once_running  # noqa: E402
import sample_image  # noqa: E402

GUEST = os.path.join(REPO, "target/guest")
BIG_MB = 220


def big_image(out):
    """A `docker save` archive: the sample's two layers plus one with a
    BIG_MB MB file of incompressible bytes."""
    import shutil
    busybox = shutil.which("busybox") or "/bin/busybox"
    workload = os.path.join(GUEST, "rootfs-tree/usr/bin/vmlab-workload")
    big = sample_image.LayerTar()
    big.dir("opt")
    # Seeded: the same image (and image ID, so one cache entry) every time.
    big.file("opt/big.bin", random.Random(15).randbytes(BIG_MB << 20), 0o644)
    layers = [sample_image.base_layer(busybox), sample_image.app_layer(workload), big.bytes()]
    config = sample_image.config_json([sample_image.sha256(l) for l in layers])
    sample_image.write_archive(out, layers, config)


def first_kvm_run_ms(vmlab, image, root, env, wait=0.3):
    argv = [vmlab, "run", "--kernel", os.path.join(GUEST, "vmlinux"), "--image", image,
            "--root-device", root, "--boot-time", "--", "true"]
    err = stop_once_running(argv, wait, tries=100, env=env)
    first, _ = boot_time_marks(err)
    if first is None:
        raise RuntimeError(f"{' '.join(argv)}: no --boot-time marks:\n{err[-2000:]}")
    return first


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--json")
    p.add_argument("vmlab", nargs="?", default=os.path.join(REPO, "target/release/vmlab"))
    a = p.parse_args()
    env = dict(os.environ)
    env.setdefault("VMLAB_VIRTIOFSD", os.path.join(GUEST, "virtiofsd"))
    with tempfile.TemporaryDirectory(prefix="vmlab-bench-image-") as tmp:
        big = os.path.join(tmp, "big.tar")
        big_image(big)
        images = {"sample (3 MB)": os.path.join(GUEST, "sample-image"),
                  f"big ({os.path.getsize(big) >> 20} MB)": big}
        cases = [(name, path, root) for name, path in images.items() for root in ("block", "fs")]
        for name, path, root in cases:
            # Unmeasured, to the end: extracts the image and builds its disk.
            subprocess.run([a.vmlab, "-q", "run", "--kernel", os.path.join(GUEST, "vmlinux"),
                            "--image", path, "--root-device", root, "--", "true"],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=env,
                           timeout=900, check=False)
        runs = {c: [] for c in cases}
        for i in range(a.runs):
            for c in cases:
                runs[c].append(first_kvm_run_ms(a.vmlab, c[1], c[2], env))
            print(f"run {i + 1}/{a.runs}: " + ", ".join(f"{runs[c][-1]:.1f}" for c in cases),
                  file=sys.stderr, flush=True)
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    print(f"| image | --root-device | first KVM_RUN, median of {a.runs} (ms) | min | max |")
    print("|---|---|---|---|---|")
    for (name, _, root), v in runs.items():
        print(f"| {name} | {root} | {statistics.median(v):.1f} | {min(v):.1f} | {max(v):.1f} |")
    med = {(n, r): statistics.median(v) for (n, _, r), v in runs.items()}
    names = list(images)
    for root in ("block", "fs"):
        print(f"\n{root}: big minus sample = {med[(names[1], root)] - med[(names[0], root)]:.1f} ms")
    print(f"\nload average after: {load}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({f"{n}/{r}": {"median": statistics.median(v), "raw": v}
                       for (n, _, r), v in runs.items()}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
