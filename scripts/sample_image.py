#!/usr/bin/env python3
"""Writes vmlab's sample container image without Docker, deterministically.

Two layers:
  1. base (tar+gzip): busybox (static) with one symlink per applet, a
     minimal /etc (passwd and group with the image's user), /tmp, and two
     files the next layer removes: /etc/motd (a whiteout) and
     /opt/sample/old.txt (an opaque directory).
  2. app (uncompressed tar): /usr/bin/vmlab-workload, the working
     directory /work owned by the image's user, the whiteout of
     /etc/motd, /opt/sample made opaque with a new file in it.

Config: Env PATH and VMLAB_SAMPLE=1, WorkingDir /work, User 1000:1000,
Cmd ["vmlab-workload", "start"] (no Entrypoint, so `-- CMD` replaces it).

Outputs the same image twice: an OCI image layout directory and a classic
`docker save` archive. Same inputs, same bytes (fixed mtimes and owners,
sorted entries, gzip without name or time).

usage: sample_image.py --busybox PATH --workload PATH --layout DIR --archive FILE
"""

import argparse
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile

EPOCH = int(os.environ.get("SOURCE_DATE_EPOCH", "0"))
UID = 1000
GID = 1000
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class LayerTar:
    """A layer archive, entries in the order added."""

    def __init__(self):
        self.buf = io.BytesIO()
        self.tar = tarfile.open(fileobj=self.buf, mode="w", format=tarfile.PAX_FORMAT)

    def _info(self, name, kind, mode, uid=0, gid=0):
        ti = tarfile.TarInfo(name)
        ti.type = kind
        ti.mode = mode
        ti.uid, ti.gid = uid, gid
        ti.uname = ti.gname = ""
        ti.mtime = EPOCH
        return ti

    def dir(self, name, mode=0o755, uid=0, gid=0):
        self.tar.addfile(self._info(name, tarfile.DIRTYPE, mode, uid, gid))

    def file(self, name, data, mode=0o644, uid=0, gid=0):
        ti = self._info(name, tarfile.REGTYPE, mode, uid, gid)
        ti.size = len(data)
        self.tar.addfile(ti, io.BytesIO(data))

    def symlink(self, name, target):
        ti = self._info(name, tarfile.SYMTYPE, 0o777)
        ti.linkname = target
        self.tar.addfile(ti)

    def whiteout(self, name):
        self.file(name, b"", mode=0)

    def bytes(self):
        self.tar.close()
        return self.buf.getvalue()


def sha256(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def base_layer(busybox):
    l = LayerTar()
    for d in ["bin", "etc", "opt", "opt/sample", "sbin", "usr", "usr/bin", "usr/sbin"]:
        l.dir(d)
    l.dir("root", 0o700)
    l.dir("tmp", 0o1777)
    with open(busybox, "rb") as f:
        l.file("bin/busybox", f.read(), 0o755)
    applets = subprocess.run(
        [busybox, "--list-full"], check=True, capture_output=True, text=True
    ).stdout.split()
    for a in sorted(set(applets)):
        a = a.lstrip("/")
        if a in ("bin/busybox", "linuxrc") or "/" not in a:
            continue
        if a.split("/")[0] not in ("bin", "sbin", "usr"):
            continue
        l.symlink(a, "/bin/busybox")
    l.file(
        "etc/passwd",
        b"root:x:0:0:root:/root:/bin/sh\n"
        b"app:x:1000:1000:app:/work:/bin/sh\n"
        b"nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    )
    l.file("etc/group", b"root:x:0:\napp:x:1000:\nnogroup:x:65534:\n")
    l.file("etc/motd", b"removed by a whiteout in the next layer\n")
    l.file("opt/sample/old.txt", b"hidden by the opaque directory in the next layer\n")
    return l.bytes()


def app_layer(workload):
    l = LayerTar()
    l.dir("etc")
    l.whiteout("etc/.wh.motd")
    l.dir("opt/sample")
    l.whiteout("opt/sample/.wh..wh..opq")
    l.file("opt/sample/new.txt", b"from the app layer\n")
    l.dir("usr/bin")
    with open(workload, "rb") as f:
        l.file("usr/bin/vmlab-workload", f.read(), 0o755)
    l.dir("work", 0o755, UID, GID)
    l.file("work/README", b"the image's working directory\n", 0o644, UID, GID)
    return l.bytes()


def config_json(diff_ids):
    return json.dumps(
        {
            "created": "1970-01-01T00:00:00Z",
            "architecture": "amd64",
            "os": "linux",
            "config": {
                "Env": ["PATH=" + PATH, "VMLAB_SAMPLE=1"],
                "Cmd": ["vmlab-workload", "start"],
                "WorkingDir": "/work",
                "User": "%d:%d" % (UID, GID),
                "Labels": {"org.opencontainers.image.title": "vmlab sample"},
            },
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": [
                {"created": "1970-01-01T00:00:00Z", "created_by": "busybox-static, /etc"},
                {"created": "1970-01-01T00:00:00Z", "created_by": "vmlab-workload, /work"},
            ],
        },
        sort_keys=True,
        separators=(",", ":"),
    ).encode()


def gzip_bytes(data):
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as g:
        g.write(data)
    return buf.getvalue()


def write_layout(out, layers, config):
    """OCI image layout: layer 1 gzip, layer 2 plain."""
    blobs = os.path.join(out, "blobs", "sha256")
    os.makedirs(blobs)

    def put(data):
        d = sha256(data)
        with open(os.path.join(blobs, d[7:]), "wb") as f:
            f.write(data)
        return d

    descs = []
    for data, gz in zip(layers, [True, False]):
        blob = gzip_bytes(data) if gz else data
        mt = "application/vnd.oci.image.layer.v1.tar" + ("+gzip" if gz else "")
        descs.append({"mediaType": mt, "digest": put(blob), "size": len(blob)})
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": put(config),
                "size": len(config),
            },
            "layers": descs,
        },
        separators=(",", ":"),
    ).encode()
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": put(manifest),
                "size": len(manifest),
                "platform": {"architecture": "amd64", "os": "linux"},
                "annotations": {"org.opencontainers.image.ref.name": "latest"},
            }
        ],
    }
    with open(os.path.join(out, "index.json"), "w") as f:
        json.dump(index, f, separators=(",", ":"))
    with open(os.path.join(out, "oci-layout"), "w") as f:
        f.write('{"imageLayoutVersion":"1.0.0"}')


def write_archive(out, layers, config):
    """Classic `docker save`: manifest.json, <id>.json, <dir>/layer.tar."""
    with tarfile.open(out, "w", format=tarfile.USTAR_FORMAT) as t:

        def add(name, data=None):
            ti = tarfile.TarInfo(name)
            ti.mtime = EPOCH
            ti.uname = ti.gname = ""
            if data is None:
                ti.type, ti.mode = tarfile.DIRTYPE, 0o755
                t.addfile(ti)
            else:
                ti.mode, ti.size = 0o644, len(data)
                t.addfile(ti, io.BytesIO(data))

        names = []
        for data in layers:
            d = sha256(data)[7:]
            add(d)
            add(d + "/VERSION", b"1.0")
            add(d + "/layer.tar", data)
            names.append(d + "/layer.tar")
        config_name = sha256(config)[7:] + ".json"
        add(config_name, config)
        manifest = [{"Config": config_name, "RepoTags": ["vmlab-sample:latest"], "Layers": names}]
        add("manifest.json", json.dumps(manifest, separators=(",", ":")).encode())
        last = names[-1].split("/")[0]
        add("repositories", json.dumps({"vmlab-sample": {"latest": last}}).encode())


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--busybox", required=True)
    p.add_argument("--workload", required=True)
    p.add_argument("--layout", required=True)
    p.add_argument("--archive", required=True)
    a = p.parse_args()

    layers = [base_layer(a.busybox), app_layer(a.workload)]
    config = config_json([sha256(l) for l in layers])

    # Built under temporary names, then swapped in.
    tmp_layout = a.layout + ".tmp"
    tmp_archive = a.archive + ".tmp"
    shutil.rmtree(tmp_layout, ignore_errors=True)
    write_layout(tmp_layout, layers, config)
    write_archive(tmp_archive, layers, config)
    shutil.rmtree(a.layout, ignore_errors=True)
    os.rename(tmp_layout, a.layout)
    os.replace(tmp_archive, a.archive)
    print("sample image %s (image ID %s)" % (a.layout, sha256(config)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
