import os

import pytest

from raftsched import (App, SubmitError, TaskCancelled, TaskError, TaskFailed, UpstreamFailed,
                       chain, chord, group)


def test_delay_and_get(app, workers):
    import tasks_app as t
    r = t.add.delay(2, 3)
    assert isinstance(r.id, int) and r.id > 0
    assert r.get(timeout=30) == 5
    assert r.state == "SUCCEEDED"
    assert app.get_result(r.id).get(timeout=5) == 5


def test_apply_async_options_and_key(app, workers):
    import tasks_app as t
    a = t.add.apply_async(args=(1, 1), priority=5, queue="default", key="idem-py-1")
    b = t.add.apply_async(args=(1, 1), priority=5, key="idem-py-1")
    assert a.id == b.id
    assert a.get(timeout=30) == 2


def test_countdown_then_runs(app, workers):
    import tasks_app as t
    r = t.add.apply_async(args=(4, 4), countdown=1)
    assert r.get(timeout=30) == 8


def test_many_delays_batch_and_keep_order(app, workers):
    import tasks_app as t
    rs = [t.add.delay(i, 1) for i in range(300)]
    assert len({r.id for r in rs}) == 300
    assert [r.get(timeout=60) for r in rs] == [i + 1 for i in range(300)]


def test_chain_group_chord(app, workers):
    import tasks_app as t
    assert chain(t.add.s(1, 2), t.add.s(10)).delay().get(timeout=30) == 13
    assert group(t.add.s(i, i) for i in range(10)).delay().get(timeout=30) == [2 * i for i in range(10)]
    assert chord(group(t.add.s(i, i) for i in range(10)), t.tsum.s()).delay().get(timeout=30) == 90


def test_failure_carries_remote_exception(app, workers):
    import tasks_app as t
    r = t.boom.delay("bad thing")
    with pytest.raises(TaskFailed) as ei:
        r.get(timeout=30)
    e = ei.value
    assert e.exc_type == "ValueError" and e.exc_message == "bad thing"
    assert "raise ValueError" in e.traceback
    assert isinstance(e, TaskError)


def test_upstream_failure_and_cancel(app, workers):
    import tasks_app as t
    r = chain(t.boom.s("first"), t.add.s(1)).delay()
    with pytest.raises(UpstreamFailed):
        r.get(timeout=30)
    late = t.add.apply_async(args=(1, 2), countdown=600)
    assert late.cancel()
    with pytest.raises(TaskCancelled):
        late.get(timeout=10)
    assert isinstance(late.explain(), str)


def test_retry_runs_a_failed_task_again(app, workers, tmp_path):
    import grpc
    import tasks_app as t
    r = t.flaky_once.delay(str(tmp_path))
    with pytest.raises(TaskFailed):
        r.get(timeout=30)
    assert r.retry() == [r.id]
    assert r.get(timeout=30) == 2, "the retry is the task's second attempt"
    assert r.state == "SUCCEEDED"
    with pytest.raises(grpc.RpcError) as ei:
        r.retry()
    assert ei.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_get_timeout(app, workers):
    import tasks_app as t
    r = t.add.apply_async(args=(1, 2), countdown=600)
    with pytest.raises(TimeoutError):
        r.get(timeout=0.5)
    r.cancel()


def test_timeout_kills_attempt(app, workers):
    import tasks_app as t
    with pytest.raises(TaskFailed) as ei:
        t.sleepy.delay(30).get(timeout=60)
    assert "time" in (ei.value.exc_message + ei.value.kind).lower()


def test_current_task(app, workers):
    import tasks_app as t
    r = t.whoami.delay()
    v = r.get(timeout=30)
    assert v["id"] == r.id and v["attempt"] == 1 and v["fence"] > 0


def test_bad_input_is_named(app):
    import tasks_app as t
    with pytest.raises(TypeError, match="argument 1"):
        t.add.delay(1, object())
    with pytest.raises(TypeError, match="'y'"):
        t.add.delay(1, y={1, 2})
    with pytest.raises(ValueError, match="priority"):
        t.add.apply_async(args=(1, 2), priority="high")
    with pytest.raises(TypeError, match="unknown option"):
        t.add.apply_async(args=(1, 2), colour="red")
    with pytest.raises(ValueError, match="endpoints"):
        App("nonsense")


def test_submit_error_surfaces_at_id(app):
    import tasks_app as t
    r = t.add.apply_async(args=(1, 2), queue="x" * 5000)
    with pytest.raises(SubmitError):
        r.id
    with pytest.raises(SubmitError):
        r.get(timeout=10)


def test_result_over_limit_fails_clearly(app, workers):
    import tasks_app as t
    with pytest.raises(TaskFailed) as ei:
        t.big.delay(2 << 20).get(timeout=30)
    assert "result" in ei.value.exc_message.lower()


def test_aget(app, workers):
    import asyncio
    import tasks_app as t
    assert asyncio.run(t.add.delay(20, 22).aget(timeout=30)) == 42


def test_older_protobuf_runtime_gets_the_same_messages():
    """With a protobuf runtime older than the gencode's (Python 3.9 has protobuf 6 at most),
    raftsched/_pb builds the classes from the committed descriptor: same wire bytes."""
    import subprocess
    import sys
    code = r'''
from google.protobuf import runtime_version
def refuse(*a, **k):
    raise runtime_version.VersionError("simulated older runtime")
runtime_version.ValidateProtobufRuntimeVersion = refuse
from raftsched._pb import scheduler_pb2 as pb, FROM_DESCRIPTOR
assert FROM_DESCRIPTOR
m = pb.SubmitTasksRequest(tasks=[pb.TaskSpec(name="x", labels={"a": "b"}, depends_on_batch=[0],
                                             retry=pb.RetryPolicy(max_attempts=3))])
print(m.SerializeToString().hex(), pb.TaskState.Name(pb.TASK_STATE_SUCCEEDED))
import raftsched.worker  # everything imports on top of it
'''
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    from raftsched._pb import scheduler_pb2 as pb
    m = pb.SubmitTasksRequest(tasks=[pb.TaskSpec(name="x", labels={"a": "b"}, depends_on_batch=[0],
                                                 retry=pb.RetryPolicy(max_attempts=3))])
    assert out.stdout.split() == [m.SerializeToString().hex(), "TASK_STATE_SUCCEEDED"]


def test_generated_keys_differ_in_a_forked_child(app):
    """Generated idempotency keys are unique per call, also across fork (a child reusing
    the parent's keys would have its tasks taken for the parent's)."""
    import tasks_app as t
    r, w = os.pipe()
    parent_key = app._spec(t.add, (1, 2), None, {}, None).idempotency_key
    pid = os.fork()
    if pid == 0:
        os.write(w, app._spec(t.add, (1, 2), None, {}, None).idempotency_key.encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child_key = os.read(r, 200).decode()
    next_key = app._spec(t.add, (1, 2), None, {}, None).idempotency_key
    assert len({parent_key, child_key, next_key}) == 3
    assert child_key.rsplit(":", 1)[0] != parent_key.rsplit(":", 1)[0]
