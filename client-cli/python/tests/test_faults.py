import os
import signal
import tempfile

import pytest

from raftsched import TaskFailed, group
from cluster import WorkerProc, wait_until


def test_leader_sigkill_in_the_middle_of_a_group(cluster, app, workers):
    import tasks_app as t
    g = group(t.add.s(i, 1) for i in range(200)).delay()
    assert len(g.ids) == 200
    leader = cluster.wait_leader()
    cluster.kill(leader)
    try:
        assert g.get(timeout=90) == [i + 1 for i in range(200)]
        # New work goes through after the failover too.
        assert t.add.delay(5, 5).get(timeout=60) == 10
    finally:
        cluster.start_node(leader)
        cluster.wait_leader()


def test_worker_sigkill_mid_task_reruns_elsewhere(cluster, app, workers):
    import tasks_app as t
    marks = tempfile.mkdtemp(dir=cluster.dir)
    victim = WorkerProc(cluster, "tasks_app:app", "--queue", "kill-q", "--concurrency", "1")
    try:
        r = t.slow_marked.apply_async(args=(2, marks), queue="kill-q")
        wait_until(lambda: os.listdir(marks), 30, "the first attempt to start")
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait(10)
        other = WorkerProc(cluster, "tasks_app:app", "--queue", "kill-q", "--concurrency", "1")
        try:
            assert r.get(timeout=90) >= 2  # a later attempt finished it
            files = os.listdir(marks)
            assert len({f.split("-")[1] for f in files}) >= 2, files  # two fences
        finally:
            other.stop()
    finally:
        victim.stop()


def test_stale_completion_is_refused(cluster, app):
    from raftsched._pb import scheduler_pb2 as pb
    import tasks_app as t
    conn = cluster.conn()
    wid = "py-stale-test"
    reg = conn.call("RegisterWorker", pb.RegisterWorkerRequest(
        worker=pb.WorkerSpec(id=wid, queues=["stale-q"], slots=1), instance=7))
    r = t.add.apply_async(args=(1, 1), queue="stale-q")
    stream = conn.stream("OpenAssignments", pb.OpenAssignmentsRequest(worker_id=wid, session=reg.session),
                         timeout=30)
    a = None
    for m in stream:
        if m.WhichOneof("msg") == "assignment" and m.assignment.task == r.id:
            a = m.assignment
            break
    stream.cancel()
    assert a is not None
    # A restart (new instance) requeues what the old one held: its fence is now stale.
    conn.call("RegisterWorker", pb.RegisterWorkerRequest(
        worker=pb.WorkerSpec(id=wid, queues=["stale-q"], slots=1), instance=8))
    resp = conn.call("Report", pb.ReportRequest(worker_id=wid, reports=[pb.TaskReport(
        task=a.task, fence=a.fence, succeeded=pb.Succeeded(result=b"99"))]))
    assert resp.results[0].stale and not resp.results[0].accepted
    r.cancel()


def test_sigterm_drains_and_finishes_held_task(cluster, app):
    import tasks_app as t
    marks = tempfile.mkdtemp(dir=cluster.dir)
    w = WorkerProc(cluster, "tasks_app:app", "--queue", "drain-q", "--concurrency", "1")
    try:
        r = t.slow_marked.apply_async(args=(1.5, marks), queue="drain-q")
        wait_until(lambda: os.listdir(marks), 30, "the attempt to start")
        w.proc.send_signal(signal.SIGTERM)
        assert w.proc.wait(30) == 0
        assert r.get(timeout=10) == 1  # finished inside the grace, by the same attempt
        assert "drained" in w.output()
    finally:
        w.stop()


def test_processes_pool_kills_timed_out_child(cluster, app):
    import tasks_app as t
    w = WorkerProc(cluster, "tasks_app:app", "--queue", "proc-q", "--pool", "processes",
                   "--concurrency", "2")
    try:
        assert t.add.apply_async(args=(3, 4), queue="proc-q").get(timeout=60) == 7
        with pytest.raises(TaskFailed) as ei:
            t.sleepy.apply_async(args=(30,), queue="proc-q").get(timeout=60)
        assert "time" in (ei.value.exc_message + ei.value.kind).lower()
    finally:
        w.stop()
