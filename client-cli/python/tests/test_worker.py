"""The Python worker: what it offers placement, resync recovery, the processes pool."""

import os
import subprocess
import sys
import tempfile
import threading

import pytest

from cluster import WorkerProc, wait_until
from raftsched import TaskFailed, chain
from raftsched._pb import scheduler_pb2 as pb
from raftsched.worker import Worker


def _worker_info(cluster, wid):
    for w in cluster.conn().call("ListWorkers", pb.ListWorkersRequest()).workers:
        if w.spec.id == wid and w.status != "gone":
            return w
    return None


def test_worker_offers_capacity_and_labels_and_placement_respects_them(cluster, app):
    import tasks_app as t
    w = WorkerProc(cluster, "tasks_app:app", "--queue", "res-q", "--concurrency", "2",
                   "--id", "py-res-small", "--cpu", "1", "--mem", "256", "--resource", "gpu=1",
                   "--label", "zone=eu")
    try:
        info = wait_until(lambda: _worker_info(cluster, "py-res-small"), 30, "registration")
        cap = info.spec.capacity
        assert (cap.cpu_milli, cap.memory_mib, dict(cap.named)) == (1000, 256, {"gpu": 1})
        assert dict(info.spec.labels) == {"zone": "eu"}
        # Submitted first, each needing more than the worker offers: never placed on it.
        too_much_cpu = t.needs_two_cpus.apply_async(queue="res-q")
        too_many_gpus = t.fits_small_worker.apply_async(queue="res-q", resources={"gpu": 2})
        wrong_zone = t.fits_small_worker.apply_async(queue="res-q", labels={"zone": "us"})
        # Submitted after them, and fitting: runs.
        assert t.fits_small_worker.apply_async(queue="res-q").get(timeout=60) == "ran"
        for r in (too_much_cpu, too_many_gpus, wrong_zone):
            assert r.state == "QUEUED", (r, r.explain())
        for r in (too_much_cpu, too_many_gpus, wrong_zone):
            r.cancel()
    finally:
        w.stop()


def test_worker_default_capacity_is_the_machine(cluster, workers):
    def fixture_worker():
        for w in cluster.conn().call("ListWorkers", pb.ListWorkersRequest()).workers:
            if w.status != "gone" and list(w.spec.queues) == ["default"] \
                    and w.spec.id.startswith("py-"):
                return w
        return None

    info = wait_until(fixture_worker, 30, "a fixture worker to register")
    assert info.spec.capacity.cpu_milli == (os.cpu_count() or 1) * 1000
    assert info.spec.capacity.memory_mib > 0
    assert info.spec.slots == 8


@pytest.mark.parametrize("args, message", [
    (["--cpu", "1500"], "1500m"),
    (["--mem", "lots"], "not a memory size"),
    (["--resource", "gpu=two"], "not a whole number"),
    (["--label", "novalue"], "not KEY=VALUE"),
])
def test_worker_refuses_bad_resource_flags_clearly(cluster, args, message):
    p = subprocess.run([sys.executable, "-m", "raftsched", "worker", "tasks_app:app", *args],
                       capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, SCHED_ENDPOINTS=cluster.endpoints))
    assert p.returncode == 2
    assert message in p.stderr, p.stderr


def test_resync_runs_an_attempt_the_worker_never_received(cluster, app, workers):
    """The server says the worker holds an attempt it has no record of (its assignment was
    lost): like the Rust worker, it reads the task back, with its dependency's result, and
    runs it."""
    import tasks_app as t
    dropped = []

    class LossyWorker(Worker):
        def _on_assignment(self, a):
            dropped.append((a.task, a.fence))  # every delivery of it is lost

    w = LossyWorker(t.app, queues=["resync-q"], concurrency=2, worker_id="py-resync-test")
    th = threading.Thread(target=w.run, daemon=True)
    th.start()
    try:
        r = chain(t.add.s(1, 2), t.add.s(10).set(queue="resync-q")).delay()
        key = wait_until(lambda: dropped and dropped[0], 60, "the assignment to be delivered")
        assert key[0] == r.id
        w._events.put(("resync", w._gen, pb.Resync(tasks=[key[0]], fences=[key[1]])))
        assert r.get(timeout=60) == 13
        assert w.stats["recovered"] == 1
    finally:
        w.drain()
        th.join(30)
    assert not th.is_alive()


def test_processes_pool_reuses_children_and_replaces_a_killed_one(cluster, app):
    import tasks_app as t
    marks = tempfile.mkdtemp(dir=cluster.dir)
    w = WorkerProc(cluster, "tasks_app:app", "--queue", "pool-q", "--pool", "processes",
                   "--concurrency", "2")
    try:
        pids = [t.pid.apply_async(queue="pool-q").get(timeout=60) for _ in range(3)]
        assert len(set(pids)) <= 2 and os.getpid() not in pids  # children, reused
        # A slow attempt runs next to one that times out: killing the latter's child must not
        # lose the former (it finishes as attempt 1).
        slow = t.slow_marked.apply_async(args=(2, marks), queue="pool-q")
        wait_until(lambda: os.listdir(marks), 30, "the slow attempt to start")
        with pytest.raises(TaskFailed):
            t.sleepy.apply_async(args=(30,), queue="pool-q").get(timeout=60)
        assert slow.get(timeout=60) == 1
        assert t.add.apply_async(args=(3, 4), queue="pool-q").get(timeout=60) == 7
    finally:
        w.stop()


def test_processes_pool_max_tasks_per_child(cluster, app):
    import tasks_app as t
    w = WorkerProc(cluster, "tasks_app:app", "--queue", "mtpc-q", "--pool", "processes",
                   "--concurrency", "1", "--max-tasks-per-child", "2")
    try:
        pids = [t.pid.apply_async(queue="mtpc-q").get(timeout=60) for _ in range(4)]
        assert pids[0] == pids[1] and pids[2] == pids[3] and pids[1] != pids[2], pids
    finally:
        w.stop()
