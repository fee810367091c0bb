"""A real 3-node cluster of our built binaries, on free 127.0.0.1 ports (tests only)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import List, Optional

from raftsched._pb import scheduler_pb2 as pb
from raftsched._rpc import Connection


def find_binary(name: str) -> str:
    env = os.environ.get(f"{name.upper()}_BIN")
    if env and os.path.isfile(env):
        return env
    here = os.path.dirname(os.path.abspath(__file__))
    for up in range(1, 6):
        p = os.path.join(here, *[".."] * up, "target", "release", name)
        if os.path.isfile(p):
            return os.path.abspath(p)
    p = shutil.which(name)
    if p:
        return p
    raise RuntimeError(f"{name} not found: build it with `cargo build --release` or set {name.upper()}_BIN")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(cond, within: float, what: str, step: float = 0.05):
    deadline = time.monotonic() + within
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        time.sleep(step)


class Cluster:
    def __init__(self, n: int = 3, extra_args: Optional[List[str]] = None,
                 ca_cert: Optional[str] = None, token: Optional[str] = None) -> None:
        self.bin = find_binary("schedulerd")
        self.dir = tempfile.mkdtemp(prefix="raftsched-py-")
        self.ids = list(range(1, n + 1))
        self.addrs = {i: f"127.0.0.1:{free_port()}" for i in self.ids}
        self.procs: dict = {}
        self.extra = extra_args or []
        self.ca_cert, self.token = ca_cert, token

    @property
    def endpoints(self) -> str:
        return ",".join(self.addrs[i] for i in self.ids)

    def start_node(self, i: int) -> None:
        logf = open(os.path.join(self.dir, f"node-{i}.log"), "ab")
        self.procs[i] = subprocess.Popen(
            [self.bin, "--id", str(i), "--listen", self.addrs[i],
             "--data-dir", os.path.join(self.dir, f"node-{i}")] + self.extra,
            stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def conn(self, addrs: Optional[List[str]] = None) -> Connection:
        return Connection(addrs or self.endpoints, ca_cert=self.ca_cert, token=self.token)

    def start(self) -> "Cluster":
        for i in self.ids:
            self.start_node(i)
        first = self.conn([self.addrs[1]])
        members = [pb.Member(id=i, addr=self.addrs[i]) for i in self.ids]
        first.call("InitCluster", pb.InitClusterRequest(members=members), budget=30,
                   retry_codes=(__import__("grpc").StatusCode.UNAVAILABLE,))
        self.wait_leader()
        return self

    def leader(self) -> Optional[int]:
        for i in self.ids:
            if i not in self.procs or self.procs[i].poll() is not None:
                continue
            try:
                st = self.conn([self.addrs[i]]).call("Status", pb.ClusterStatusRequest(),
                                                      budget=1, timeout=1)
            except Exception:
                continue
            lid = st.leader_id
            if lid and lid in self.procs and self.procs[lid].poll() is None:
                return lid
        return None

    def wait_leader(self, within: float = 30) -> int:
        return wait_until(self.leader, within, "a leader")

    def kill(self, i: int) -> None:
        p = self.procs.get(i)
        if p and p.poll() is None:
            p.send_signal(signal.SIGKILL)
            p.wait(10)

    def stop(self) -> None:
        for i, p in self.procs.items():
            if p.poll() is None:
                p.kill()
                p.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


class WorkerProc:
    """``python -m raftsched worker`` as a child process."""

    def __init__(self, cluster: Cluster, app: str = "tasks_app:app", *args: str,
                 env: Optional[dict] = None) -> None:
        here = os.path.dirname(os.path.abspath(__file__))
        e = dict(os.environ, SCHED_ENDPOINTS=cluster.endpoints, RAFTSCHED_LOG="INFO")
        if cluster.ca_cert:
            e["SCHED_CA_CERT"] = cluster.ca_cert
        if cluster.token:
            e["SCHED_TOKEN"] = cluster.token
        e.update(env or {})
        # The package under test (this checkout), then the tests' own modules.
        e["PYTHONPATH"] = os.pathsep.join(
            [os.path.dirname(here), here] + [p for p in [(env or {}).get("PYTHONPATH")] if p])
        self.log = os.path.join(cluster.dir, f"worker-{time.time_ns()}.log")
        self.proc = subprocess.Popen([sys.executable, "-m", "raftsched", "worker", app, *args],
                                     env=e, stdout=open(self.log, "wb"), stderr=subprocess.STDOUT)

    def output(self) -> str:
        with open(self.log, errors="replace") as f:
            return f.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
