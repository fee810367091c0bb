"""Against a secure (TLS + bearer token) cluster started by `schedctl dev up`."""

import json
import os
import signal
import subprocess
import tempfile
import time

import pytest

from cluster import Cluster, WorkerProc, find_binary, free_port, wait_until
from raftsched import App, SubmitError


@pytest.fixture(scope="module")
def secure_cluster():
    d = tempfile.mkdtemp(prefix="raftsched-py-secure-")
    out = open(os.path.join(d, "dev-up.out"), "wb")
    p = subprocess.Popen([find_binary("schedctl"), "dev", "up", "--nodes", "3", "--workers", "0",
                          "--dir", d, "--base-port", str(free_port())],
                         stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                         start_new_session=True)
    try:
        wait_until(lambda: "is up" in open(os.path.join(d, "dev-up.out")).read()
                   or p.poll() is not None, 60, "schedctl dev up")
        assert p.poll() is None, open(os.path.join(d, "dev-up.out")).read()
        nodes = json.load(open(os.path.join(d, "cluster.json")))["nodes"]
        c = Cluster(0)
        c.dir = d
        c.addrs = {n["id"]: n["grpc"] for n in nodes}
        c.ids = sorted(c.addrs)
        c.ca_cert = os.path.join(d, "pki", "ca.pem")
        c.token = open(os.path.join(d, "admin.token")).read().strip()
        yield c
    finally:
        p.send_signal(signal.SIGINT)
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)
        try:  # never leave a node behind
            for n in json.load(open(os.path.join(d, "cluster.json")))["nodes"]:
                try:
                    os.kill(n["pid"], signal.SIGKILL)
                except (ProcessLookupError, KeyError):
                    pass
        except (OSError, ValueError):
            pass


def test_tls_and_token_end_to_end(secure_cluster):
    c = secure_cluster
    app = App(c.endpoints, ca_cert=c.ca_cert, token=c.token)
    w = WorkerProc(c, "tasks_app:app", "--concurrency", "2")
    try:
        add = app.task(name="tasks_app.add")(lambda x, y: x + y)  # run by the worker's App
        assert add.delay(20, 22).get(timeout=60) == 42
    finally:
        w.stop()
        app.close()


def test_wrong_token_is_refused_clearly(secure_cluster):
    c = secure_cluster
    app = App(c.endpoints, ca_cert=c.ca_cert, token="not-a-real-token")
    add = app.task(name="tasks_app.add")(lambda x, y: x + y)
    with pytest.raises(SubmitError, match="UNAUTHENTICATED|PERMISSION_DENIED"):
        add.delay(1, 2).id
    app.close()


def _worker_token(c, name, prefix):
    """A replicated `worker` token for ids starting with `prefix`, usable on every node."""
    import hashlib
    import secrets

    import grpc
    from raftsched._pb import scheduler_pb2 as pb
    secret = secrets.token_hex(24)
    c.conn().call("CreateToken", pb.CreateTokenRequest(
        name=name, role="worker", worker_id_prefix=prefix,
        secret_sha256=hashlib.sha256(secret.encode()).hexdigest()))

    def known_everywhere():
        from raftsched._rpc import Connection
        for addr in c.addrs.values():
            try:  # a worker may not list workers: PERMISSION_DENIED means it was recognised
                Connection(addr, ca_cert=c.ca_cert, token=secret).call(
                    "ListWorkers", pb.ListWorkersRequest(stale_ok=True), budget=2)
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.UNAUTHENTICATED:
                    return False
        return True

    wait_until(known_everywhere, 30, "the new token on every node")
    return secret


def test_worker_token_runs_tasks_within_its_prefix_only(secure_cluster):
    c = secure_cluster
    secret = _worker_token(c, "py-pool-workers", "py-pool-")
    app = App(c.endpoints, ca_cert=c.ca_cert, token=c.token)  # admin: submits
    good = WorkerProc(c, "tasks_app:app", "--queue", "tok-q", "--concurrency", "2",
                      "--id", "py-pool-1", env={"SCHED_TOKEN": secret})
    bad = WorkerProc(c, "tasks_app:app", "--queue", "tok-q", "--id", "other-1",
                     env={"SCHED_TOKEN": secret})
    try:
        add = app.task(name="tasks_app.add")(lambda x, y: x + y)
        assert add.apply_async(args=(40, 2), queue="tok-q").get(timeout=60) == 42
        assert bad.proc.wait(60) == 2
        out = bad.output()
        assert "other-1" in out and "PERMISSION_DENIED" in out and "py-pool-" in out, out
    finally:
        good.stop()
        bad.stop()
        app.close()
