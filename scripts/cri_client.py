#!/usr/bin/python3
"""A small Kubernetes CRI v1 client (RuntimeService) for vmlab's tests.

Talks gRPC to a containerd CRI socket (default: the private one that
scripts/cri.sh starts, /run/vmlab-cri/containerd.sock; --socket or
$VMLAB_CRI_SOCKET). Every subcommand prints JSON on stdout; errors are one
line on stderr ("cri_client: ERROR: ...") and exit 1 (usage errors 2).

  version                                   runtime name/version, API version
  run-pod NAME --handler H [--namespace NS] [--port-mapping [HOST_IP:]HOST:CTR[/tcp|udp] ...]
                                            {"pod_id"}; the pod's config is kept in
                                            $VMLAB_CRI_CLIENT_DIR (/run/vmlab-cri/client) for create
  pod-status ID                             {"state", "ip", "handler", ...}
  create NAME --pod ID --image IMG [--env K=V ...] [--workdir D] -- CMD...
                                            {"container_id"} (CMD replaces the entrypoint)
  start ID | stop ID [--grace S] | remove ID
  exec-sync ID --timeout S -- CMD...        {"exit_code", "stdout", "stderr"}
  status ID                                 {"state", "exit_code", "reason", "log_path", ...}
  logs ID                                   {"stdout", "stderr", "log_path"} from the CRI log file
  stop-pod ID | remove-pod ID
  list-pods | list-containers [--pod ID]
  cleanup                                   stops and removes every pod (and so container)
  scenario --handler H [--image IMG]        the issue-18 scenario end to end (below)

The scenario: RunPodSandbox; a container "server" serving HTTP with busybox
httpd on 127.0.0.1:8080 and a container "client" that fetches from it over
the pod's loopback, prints the reply and exits 3; ExecSync in the server
(`exit 4`, with stdout and stderr) and `uname -r`; ContainerStatus exit codes
(client 3, server 0 after StopContainer: its shell traps SIGTERM); logs;
StopPodSandbox; RemovePodSandbox; and checks that nothing is left. It prints
a JSON summary (on failure with containerd's error lines from --containerd-log
during the run) and exits 0 only if every step passed. Every wait is bounded
(gRPC deadlines: --timeout, default 120 s per call; polls: --wait, 90 s).

The stubs are generated at run time with grpc_tools (python3-grpc-tools)
from the CRI v1 api.proto: --proto or $VMLAB_CRI_PROTO, else
tests/data/cri/api.proto (a copy of k8s.io/cri-api's runtime/v1 api.proto as
shipped in the k8s-cri 0.11.0 crate, Apache-2.0), else the k8s-cri crate's
proto/v1.proto in ~/.cargo/registry. gogo/protobuf imports and options
(older cri-api protos have them) are stripped first. The generated modules
are cached in ~/.cache/vmlab/cri-stubs/HASH (the stripped proto's sha256
and grpc_tools' version).
"""
import argparse
import glob
import hashlib
import json
import os
import re
import shutil
import sys
import time
import uuid

PROG = "cri_client"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_SOCKET = "/run/vmlab-cri/containerd.sock"
CGROUP_PARENT = "/vmlab-cri"


def die(msg, code=1):
    print(f"{PROG}: ERROR: {msg}", file=sys.stderr)
    sys.exit(code)


try:
    import grpc
    from grpc_tools import protoc
    import grpc_tools
    from google.protobuf import json_format
except ImportError:
    # Debian's python3-grpcio is for /usr/bin/python3, not a pyenv python.
    if os.path.realpath(sys.executable) != os.path.realpath("/usr/bin/python3") \
            and os.path.exists("/usr/bin/python3"):
        os.execv("/usr/bin/python3", ["/usr/bin/python3"] + sys.argv)
    die("python3-grpcio and python3-grpc-tools are needed (apt-get install python3-grpcio python3-grpc-tools)")


# --- stubs ------------------------------------------------------------------
def find_proto(explicit):
    cands = [explicit, os.environ.get("VMLAB_CRI_PROTO"),
             os.path.join(REPO, "tests/data/cri/api.proto")]
    home = os.path.expanduser("~")
    cands += sorted(glob.glob(os.path.join(home, ".cargo/registry/src/*/k8s-cri-*/proto/v1.proto")),
                    reverse=True)
    for c in cands:
        if c and os.path.isfile(c):
            return c
    die("no CRI v1 api.proto: give --proto, or $VMLAB_CRI_PROTO")


def strip_gogo(text):
    text = re.sub(r'^\s*import\s+"github\.com/gogo/protobuf/gogoproto/gogo\.proto"\s*;\s*$', "",
                  text, flags=re.M)
    text = re.sub(r'^\s*option\s+\(gogoproto\.[A-Za-z_]+\)\s*=\s*[^;]*;\s*$', "", text, flags=re.M)
    # Field options: [(gogoproto.x) = v, (gogoproto.y) = w] -> removed.
    def field_opts(m):
        opts = [o.strip() for o in m.group(1).split(",")]
        keep = [o for o in opts if o and not o.startswith("(gogoproto.")]
        return f" [{', '.join(keep)}]" if keep else ""
    text = re.sub(r'\s*\[([^\[\]]*\(gogoproto\.[^\[\]]*)\]', field_opts, text)
    return text


def load_stubs(proto_path):
    with open(proto_path) as f:
        text = strip_gogo(f.read())
    key = hashlib.sha256((text + grpc_tools.__file__ + getattr(grpc, "__version__", "")).encode()).hexdigest()[:16]
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                         "vmlab", "cri-stubs", key)
    if not os.path.isfile(os.path.join(cache, "api_pb2_grpc.py")):
        tmp = f"{cache}.tmp.{os.getpid()}"
        os.makedirs(tmp, exist_ok=True)
        with open(os.path.join(tmp, "api.proto"), "w") as f:
            f.write(text)
        inc = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
        rc = protoc.main(["grpc_tools.protoc", f"-I{tmp}", f"-I{inc}", f"--python_out={tmp}",
                          f"--grpc_python_out={tmp}", os.path.join(tmp, "api.proto")])
        if rc != 0:
            die(f"protoc failed on {proto_path} (rc {rc})")
        try:
            os.rename(tmp, cache)
        except OSError:
            pass  # another process made it first
    sys.path.insert(0, cache)
    import api_pb2  # noqa: E402
    import api_pb2_grpc  # noqa: E402
    return api_pb2, api_pb2_grpc


# --- client -----------------------------------------------------------------
class Cri:
    def __init__(self, socket, timeout, proto):
        self.pb, grpc_mod = load_stubs(find_proto(proto))
        self.timeout = timeout
        self.socket = socket
        self.chan = grpc.insecure_channel("unix://" + socket)
        self.rt = grpc_mod.RuntimeServiceStub(self.chan)

    def call(self, name, req, timeout=None):
        try:
            return getattr(self.rt, name)(req, timeout=timeout or self.timeout)
        except grpc.RpcError as e:
            raise CriError(f"{name}: {e.code().name}: {e.details()}") from None

    def d(self, msg):
        return json_format.MessageToDict(msg, preserving_proto_field_name=True)

    # enum names
    def pod_state(self, v):
        return self.pb.PodSandboxState.Name(v)

    def ctr_state(self, v):
        return self.pb.ContainerState.Name(v)


class CriError(Exception):
    pass


def client_dir():
    return os.environ.get("VMLAB_CRI_CLIENT_DIR", "/run/vmlab-cri/client")


def log_root():
    return os.path.abspath(os.environ.get("VMLAB_CRI_LOG_DIR", "/run/vmlab-cri/pod-logs"))


def parse_port(spec, pb):
    m = re.fullmatch(r'(?:(\d+\.\d+\.\d+\.\d+):)?(\d+):(\d+)(?:/(tcp|udp|sctp))?', spec)
    if not m:
        die(f"--port-mapping {spec}: want [HOST_IP:]HOST_PORT:CONTAINER_PORT[/tcp|udp|sctp]", 2)
    proto = {"tcp": pb.TCP, "udp": pb.UDP, "sctp": pb.SCTP}[m.group(4) or "tcp"]
    return pb.PortMapping(protocol=proto, container_port=int(m.group(3)),
                          host_port=int(m.group(2)), host_ip=m.group(1) or "")


def pod_config(c, name, namespace, ports):
    pb = c.pb
    uid = uuid.uuid4().hex
    logdir = os.path.join(log_root(), f"{namespace}_{name}_{uid}")
    os.makedirs(logdir, exist_ok=True)
    ns = pb.NamespaceOption(network=pb.POD, pid=pb.CONTAINER, ipc=pb.POD)
    return pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name=name, uid=uid, namespace=namespace, attempt=0),
        hostname=name[:63],
        log_directory=logdir,
        labels={"vmlab.cri/test": "1"},
        port_mappings=[parse_port(p, pb) for p in ports],
        linux=pb.LinuxPodSandboxConfig(
            cgroup_parent=CGROUP_PARENT,
            security_context=pb.LinuxSandboxSecurityContext(namespace_options=ns)),
    )


def save_pod(pod_id, cfg):
    os.makedirs(client_dir(), exist_ok=True)
    with open(os.path.join(client_dir(), pod_id + ".pb"), "wb") as f:
        f.write(cfg.SerializeToString())


def load_pod(c, pod_id):
    path = os.path.join(client_dir(), pod_id + ".pb")
    cfg = c.pb.PodSandboxConfig()
    if os.path.exists(path):
        with open(path, "rb") as f:
            cfg.ParseFromString(f.read())
        return cfg
    # Not made by this client: rebuild what CreateContainer needs.
    st = c.call("PodSandboxStatus", c.pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id)).status
    cfg.metadata.CopyFrom(st.metadata)
    cfg.labels.update(st.labels)
    cfg.annotations.update(st.annotations)
    return cfg


def forget_pod(pod_id):
    try:
        os.remove(os.path.join(client_dir(), pod_id + ".pb"))
    except FileNotFoundError:
        pass


def resolve_pod(c, ident):
    """A pod id, unique id prefix, or metadata name."""
    pods = c.call("ListPodSandbox", c.pb.ListPodSandboxRequest()).items
    hits = [p.id for p in pods if p.id == ident] or [p.id for p in pods if p.id.startswith(ident)] \
        or [p.id for p in pods if p.metadata.name == ident]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        return ident  # let the runtime say it
    raise CriError(f"{ident}: matches {len(hits)} pods")


def resolve_ctr(c, ident):
    ctrs = c.call("ListContainers", c.pb.ListContainersRequest()).containers
    hits = [x.id for x in ctrs if x.id == ident] or [x.id for x in ctrs if x.id.startswith(ident)]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        return ident
    raise CriError(f"{ident}: matches {len(hits)} containers")


def run_pod(c, name, handler, namespace="default", ports=()):
    cfg = pod_config(c, name, namespace, ports)
    r = c.call("RunPodSandbox", c.pb.RunPodSandboxRequest(config=cfg, runtime_handler=handler))
    save_pod(r.pod_sandbox_id, cfg)
    return r.pod_sandbox_id


def pod_status(c, pod_id):
    st = c.call("PodSandboxStatus", c.pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id)).status
    return {"id": st.id, "name": st.metadata.name, "state": c.pod_state(st.state),
            "ip": st.network.ip, "handler": st.runtime_handler,
            "created_at": st.created_at}


def create(c, pod_id, name, image, cmd, env=(), workdir=""):
    pb = c.pb
    cfg = load_pod(c, pod_id)
    envs = []
    for e in env:
        k, _, v = e.partition("=")
        envs.append(pb.KeyValue(key=k, value=v))
    cc = pb.ContainerConfig(
        metadata=pb.ContainerMetadata(name=name, attempt=0),
        image=pb.ImageSpec(image=image),
        command=list(cmd),
        working_dir=workdir,
        envs=envs,
        log_path=f"{name}.log",
        labels={"vmlab.cri/test": "1"},
        linux=pb.LinuxContainerConfig(security_context=pb.LinuxContainerSecurityContext(
            namespace_options=pb.NamespaceOption(network=pb.POD, pid=pb.CONTAINER, ipc=pb.POD))),
    )
    r = c.call("CreateContainer", pb.CreateContainerRequest(
        pod_sandbox_id=pod_id, config=cc, sandbox_config=cfg))
    return r.container_id


def ctr_status(c, cid):
    st = c.call("ContainerStatus", c.pb.ContainerStatusRequest(container_id=cid)).status
    out = {"id": st.id, "name": st.metadata.name, "state": c.ctr_state(st.state),
           "exit_code": st.exit_code, "reason": st.reason, "message": st.message,
           "log_path": st.log_path, "image": st.image.image,
           "created_at": st.created_at, "started_at": st.started_at, "finished_at": st.finished_at}
    return out


def exec_sync(c, cid, cmd, timeout):
    r = c.call("ExecSync", c.pb.ExecSyncRequest(container_id=cid, cmd=list(cmd), timeout=int(timeout)),
               timeout=int(timeout) + 30)
    return {"exit_code": r.exit_code, "stdout": r.stdout.decode(errors="replace"),
            "stderr": r.stderr.decode(errors="replace")}


def read_logs(path):
    """The CRI log format: TIMESTAMP STREAM TAG(P|F) MESSAGE, one a line."""
    out = {"stdout": "", "stderr": "", "log_path": path}
    try:
        with open(path, errors="replace") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        out["error"] = "no log file"
        return out
    for line in lines:
        parts = line.split(" ", 3)
        if len(parts) < 3 or parts[1] not in ("stdout", "stderr"):
            continue
        msg = parts[3] if len(parts) > 3 else ""
        out[parts[1]] += msg + ("\n" if parts[2] == "F" else "")
    return out


def logs(c, cid):
    return read_logs(ctr_status(c, cid)["log_path"])


def wait_state(c, cid, states, wait):
    deadline = time.monotonic() + wait
    while True:
        st = ctr_status(c, cid)
        if st["state"] in states:
            return st
        if time.monotonic() >= deadline:
            raise CriError(f"container {cid[:12]} still {st['state']} after {wait}s (want {'/'.join(states)})")
        time.sleep(0.5)


def stop_pod(c, pod_id):
    c.call("StopPodSandbox", c.pb.StopPodSandboxRequest(pod_sandbox_id=pod_id))


def remove_pod(c, pod_id):
    logdir = None
    path = os.path.join(client_dir(), pod_id + ".pb")
    if os.path.exists(path):
        logdir = load_pod(c, pod_id).log_directory
    c.call("RemovePodSandbox", c.pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    forget_pod(pod_id)
    # The CRI leaves the pod's log directory to the kubelet: ours go with the pod.
    if logdir and os.path.dirname(logdir) == log_root() and os.path.isdir(logdir):
        shutil.rmtree(logdir, ignore_errors=True)


def list_pods(c):
    pods = c.call("ListPodSandbox", c.pb.ListPodSandboxRequest()).items
    return [{"id": p.id, "name": p.metadata.name, "namespace": p.metadata.namespace,
             "state": c.pod_state(p.state), "handler": p.runtime_handler} for p in pods]


def list_containers(c, pod_id=""):
    req = c.pb.ListContainersRequest()
    if pod_id:
        req.filter.pod_sandbox_id = pod_id
    ctrs = c.call("ListContainers", req).containers
    return [{"id": x.id, "name": x.metadata.name, "pod_id": x.pod_sandbox_id,
             "state": c.ctr_state(x.state), "image": x.image.image} for x in ctrs]


def cleanup(c):
    done = []
    for p in list_pods(c):
        errs = []
        for step in (stop_pod, remove_pod):
            try:
                step(c, p["id"])
            except CriError as e:
                errs.append(str(e))
        done.append({"id": p["id"], "name": p["name"], "errors": errs})
    # Containers of no pod (should not happen) too.
    for x in list_containers(c):
        try:
            c.call("RemoveContainer", c.pb.RemoveContainerRequest(container_id=x["id"]))
        except CriError as e:
            done.append({"id": x["id"], "errors": [str(e)]})
    return {"removed_pods": done, "left_pods": len(list_pods(c)),
            "left_containers": len(list_containers(c))}


# --- the scenario -----------------------------------------------------------
SERVER_SH = r'''
echo "server uname -r: $(uname -r)"
mkdir -p /tmp/www
echo "hello from the server in pod $(hostname)" > /tmp/www/index.html
trap 'echo "server: SIGTERM"; kill $pid 2>/dev/null; exit 0' TERM
httpd -f -p 127.0.0.1:8080 -h /tmp/www &
pid=$!
echo "server: httpd pid $pid on 127.0.0.1:8080"
wait $pid
echo "server: httpd exited $?"
exit 1
'''

CLIENT_SH = r'''
echo "client uname -r: $(uname -r)"
i=0
while [ $i -lt 60 ]; do
  # (busybox-static's wget segfaults on Debian 12: nc speaks HTTP/1.0 here.)
  reply="$(printf 'GET /index.html HTTP/1.0\r\n\r\n' | nc -w 2 127.0.0.1 8080 2>/dev/null)"
  case "$reply" in
    "HTTP/1."?" 200 "*)
      echo "client got: $(printf '%s\n' "$reply" | tail -n 1)"
      exit 3 ;;
  esac
  i=$((i + 1))
  sleep 0.5
done
echo "client: no reply from 127.0.0.1:8080" >&2
exit 1
'''


def log_errors(path, offset, limit=20):
    """containerd's level=error lines after OFFSET, each message once."""
    out, seen = [], set()
    try:
        with open(path, errors="replace") as f:
            f.seek(offset)
            for line in f:
                if "level=error" not in line:
                    continue
                m = re.search(r'msg="((?:[^"\\]|\\.)*)"(?: error="((?:[^"\\]|\\.)*)")?', line)
                text = (m.group(1) + (": " + m.group(2) if m.group(2) else "")) if m else line.strip()
                text = text.replace('\\"', '"')
                key = re.sub(r"[0-9a-f]{64}", "ID", re.sub(r"Pid:\d+|ExitedAt:[^,]*", "", text))
                if key not in seen:
                    seen.add(key)
                    out.append(text[:600])
    except OSError:
        pass
    return out[:limit]


def scenario(c, handler, image, wait, containerd_log):
    summary = {"handler": handler, "image": image, "ok": False, "steps": [],
               "containers": {}, "socket": c.socket}
    t0 = time.monotonic()
    try:
        log_offset = os.path.getsize(containerd_log)
    except OSError:
        log_offset = None
    state = {"pod": None}

    def step(name, fn, check=None):
        t = time.monotonic()
        rec = {"step": name}
        summary["steps"].append(rec)
        try:
            val = fn()
            if check:
                err = check(val)
                if err:
                    raise CriError(err)
            rec["ok"] = True
            return val
        except CriError as e:
            rec["ok"] = False
            rec["error"] = str(e)
            raise
        finally:
            rec["seconds"] = round(time.monotonic() - t, 2)

    def uname_of(log):
        m = re.search(r"uname -r: (\S+)", log)
        return m.group(1) if m else None

    try:
        v = step("Version", lambda: c.call("Version", c.pb.VersionRequest()))
        summary["runtime"] = f"{v.runtime_name} {v.runtime_version} (CRI {v.runtime_api_version})"
        name = f"vmlab-scenario-{uuid.uuid4().hex[:8]}"
        pod = step("RunPodSandbox", lambda: run_pod(c, name, handler))
        state["pod"] = pod
        summary["pod_id"] = pod
        ps = step("PodSandboxStatus", lambda: pod_status(c, pod),
                  lambda s: None if s["state"] == "SANDBOX_READY" else f"pod is {s['state']}")
        summary["pod_ip"] = ps["ip"]
        srv = step("CreateContainer server",
                   lambda: create(c, pod, "server", image, ["/bin/sh", "-c", SERVER_SH]))
        summary["containers"]["server"] = {"id": srv}
        step("StartContainer server", lambda: c.call("StartContainer", c.pb.StartContainerRequest(container_id=srv)))
        step("server RUNNING", lambda: wait_state(c, srv, ["CONTAINER_RUNNING", "CONTAINER_EXITED"], wait),
             lambda s: None if s["state"] == "CONTAINER_RUNNING" else f"server {s['state']} exit {s['exit_code']}")
        cli = step("CreateContainer client",
                   lambda: create(c, pod, "client", image, ["/bin/sh", "-c", CLIENT_SH]))
        summary["containers"]["client"] = {"id": cli}
        step("StartContainer client", lambda: c.call("StartContainer", c.pb.StartContainerRequest(container_id=cli)))
        cst = step("client EXITED with 3", lambda: wait_state(c, cli, ["CONTAINER_EXITED"], wait),
                   lambda s: None if s["exit_code"] == 3 else f"client exit code {s['exit_code']} ({s['reason']})")
        clog = read_logs(cst["log_path"])
        summary["containers"]["client"].update(
            state=cst["state"], exit_code=cst["exit_code"], uname_r=uname_of(clog["stdout"]),
            stdout=clog["stdout"], stderr=clog["stderr"])
        step("client printed the server's reply", lambda: clog["stdout"],
             lambda out: None if "client got: hello from the server" in out else f"client stdout: {out!r}")
        ex = step("ExecSync exit 4",
                  lambda: exec_sync(c, srv, ["/bin/sh", "-c", "echo to-stdout; echo to-stderr >&2; exit 4"], 30),
                  lambda r: None if (r["exit_code"], r["stdout"], r["stderr"]) == (4, "to-stdout\n", "to-stderr\n")
                  else f"got {r}")
        summary["exec_sync"] = ex
        un = step("ExecSync uname -r", lambda: exec_sync(c, srv, ["uname", "-r"], 30),
                  lambda r: None if r["exit_code"] == 0 else f"got {r}")
        summary["containers"]["server"]["uname_r"] = un["stdout"].strip()
        step("StopContainer server",
             lambda: c.call("StopContainer", c.pb.StopContainerRequest(container_id=srv, timeout=10),
                            timeout=c.timeout + 10))
        sst = step("server EXITED with 0", lambda: wait_state(c, srv, ["CONTAINER_EXITED"], wait),
                   lambda s: None if s["exit_code"] == 0 else f"server exit code {s['exit_code']} ({s['reason']})")
        slog = read_logs(sst["log_path"])
        summary["containers"]["server"].update(
            state=sst["state"], exit_code=sst["exit_code"], uname_log=uname_of(slog["stdout"]),
            stdout=slog["stdout"], stderr=slog["stderr"])
        step("StopPodSandbox", lambda: stop_pod(c, pod))
        step("pod NOTREADY", lambda: pod_status(c, pod),
             lambda s: None if s["state"] == "SANDBOX_NOTREADY" else f"pod is {s['state']}")
        step("RemovePodSandbox", lambda: remove_pod(c, pod))
        state["pod"] = None
        step("nothing left", lambda: (
            [p for p in list_pods(c) if p["id"] == pod], list_containers(c, pod)),
            lambda left: None if left == ([], []) else f"left: {left}")
        summary["ok"] = True
    except CriError:
        pass
    finally:
        if state["pod"]:
            # A failed step: collect what the containers said, then clean up.
            for nm, info in summary["containers"].items():
                try:
                    st = ctr_status(c, info["id"])
                    lg = read_logs(st["log_path"])
                    info.update(state=st["state"], exit_code=st["exit_code"], reason=st["reason"],
                                message=st["message"], stdout=lg["stdout"], stderr=lg["stderr"])
                except CriError as e:
                    info["status_error"] = str(e)
            errs = []
            for fn in (stop_pod, remove_pod):
                try:
                    fn(c, state["pod"])
                except CriError as e:
                    errs.append(str(e))
            summary["cleanup"] = {"ok": not errs, "errors": errs}
        summary["seconds"] = round(time.monotonic() - t0, 2)
        if not summary["ok"] and log_offset is not None:
            summary["containerd_errors"] = log_errors(containerd_log, log_offset)
    return summary


def main():
    ap = argparse.ArgumentParser(prog="cri_client.py", description=__doc__.split("\n")[0])
    ap.add_argument("--socket", default=os.environ.get("VMLAB_CRI_SOCKET", DEFAULT_SOCKET))
    ap.add_argument("--timeout", type=float, default=120, help="deadline of each gRPC call (s)")
    ap.add_argument("--proto", help="the CRI v1 api.proto")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("version")
    p = sub.add_parser("run-pod")
    p.add_argument("name")
    p.add_argument("--handler", default="")
    p.add_argument("--namespace", default="default")
    p.add_argument("--port-mapping", action="append", default=[])
    for n in ("pod-status", "start", "remove", "status", "logs", "stop-pod", "remove-pod"):
        sub.add_parser(n).add_argument("id")
    p = sub.add_parser("stop")
    p.add_argument("id")
    p.add_argument("--grace", type=int, default=10)
    p = sub.add_parser("create")
    p.add_argument("name")
    p.add_argument("--pod", required=True)
    p.add_argument("--image", required=True)
    p.add_argument("--env", action="append", default=[])
    p.add_argument("--workdir", default="")
    p = sub.add_parser("exec-sync")
    p.add_argument("id")
    p.add_argument("--timeout", dest="exec_timeout", type=int, default=30)
    sub.add_parser("list-pods")
    sub.add_parser("list-containers").add_argument("--pod", default="")
    sub.add_parser("cleanup")
    p = sub.add_parser("scenario")
    p.add_argument("--handler", default="")
    p.add_argument("--image", default="vmlab-busybox:test")
    p.add_argument("--wait", type=float, default=90, help="bound of each poll (s)")
    p.add_argument("--containerd-log", default="/run/vmlab-cri/containerd.log",
                   help="on failure, its error lines from the scenario go in the summary")
    argv = sys.argv[1:]
    after = None
    if "--" in argv:
        i = argv.index("--")
        argv, after = argv[:i], argv[i + 1:]
    a = ap.parse_args(argv)

    def cmdline(x):
        if not after:
            die(f"{a.cmd}: give the command after --", 2)
        return after

    c = Cri(a.socket, a.timeout, a.proto)
    try:
        if a.cmd == "version":
            out = c.d(c.call("Version", c.pb.VersionRequest()))
        elif a.cmd == "run-pod":
            out = {"pod_id": run_pod(c, a.name, a.handler, a.namespace, a.port_mapping)}
        elif a.cmd == "pod-status":
            out = pod_status(c, resolve_pod(c, a.id))
        elif a.cmd == "create":
            out = {"container_id": create(c, resolve_pod(c, a.pod), a.name, a.image, cmdline(None),
                                          a.env, a.workdir)}
        elif a.cmd == "start":
            cid = resolve_ctr(c, a.id)
            c.call("StartContainer", c.pb.StartContainerRequest(container_id=cid))
            out = {"started": cid}
        elif a.cmd == "stop":
            cid = resolve_ctr(c, a.id)
            c.call("StopContainer", c.pb.StopContainerRequest(container_id=cid, timeout=a.grace),
                   timeout=a.timeout + a.grace)
            out = {"stopped": cid}
        elif a.cmd == "remove":
            cid = resolve_ctr(c, a.id)
            c.call("RemoveContainer", c.pb.RemoveContainerRequest(container_id=cid))
            out = {"removed": cid}
        elif a.cmd == "exec-sync":
            out = exec_sync(c, resolve_ctr(c, a.id), cmdline(None), a.exec_timeout)
        elif a.cmd == "status":
            out = ctr_status(c, resolve_ctr(c, a.id))
        elif a.cmd == "logs":
            out = logs(c, resolve_ctr(c, a.id))
        elif a.cmd == "stop-pod":
            pid = resolve_pod(c, a.id)
            stop_pod(c, pid)
            out = {"stopped": pid}
        elif a.cmd == "remove-pod":
            pid = resolve_pod(c, a.id)
            remove_pod(c, pid)
            out = {"removed": pid}
        elif a.cmd == "list-pods":
            out = list_pods(c)
        elif a.cmd == "list-containers":
            out = list_containers(c, resolve_pod(c, a.pod) if a.pod else "")
        elif a.cmd == "cleanup":
            out = cleanup(c)
        elif a.cmd == "scenario":
            out = scenario(c, a.handler, a.image, a.wait, a.containerd_log)
            print(json.dumps(out, indent=2))
            sys.exit(0 if out["ok"] else 1)
    except CriError as e:
        die(str(e))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
