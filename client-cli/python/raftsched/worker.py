"""The worker runtime: same protocol and states as the Rust worker (client-cli/src/worker).

1. Register with a random ``instance`` (once per process), heartbeat every
   ``heartbeat_interval_ms``, open the assignment stream.
2. Each Assignment is deduplicated by ``(task, fence)`` and run; ``Started`` is reported if it
   still runs 10 ms later (unless the assignment says it was confirmed already).
3. Reports (Started / Succeeded / Failed, with the fence) go through one queue: reports queued
   while a Report RPC is in flight leave together in the next. A report that could not be
   delivered is resent with the same fence (the server answers ``duplicate`` if it was applied);
   one refused as stale is dropped.
4. A job is stopped on Revoke, on a Resync that does not list it, at its deadline (reported as
   a retryable timeout failure), when the session is lost, and at the end of a drain. A stopped
   job's outcome is not reported, except for the deadline.
5. The stream is reopened (any node serves it) after UNAVAILABLE; NOT_FOUND /
   FAILED_PRECONDITION mean the session is gone: stop everything, drop pending reports,
   register again.
6. SIGTERM drains: DrainWorker, finish held jobs within the grace, stop the rest,
   DeregisterWorker (the server requeues what is left).

Pools: ``threads`` runs each attempt on a thread (a timed-out thread is abandoned and its
outcome ignored); ``processes`` runs attempts in child processes, killed on timeout or revoke.
"""

from __future__ import annotations

import importlib
import json
import logging
import multiprocessing as mp
import os
import queue
import random
import signal
import socket
import sys
import threading
import time
import traceback
from typing import Any, Dict, List, Optional, Tuple

import grpc

from . import _codec
from ._context import TaskContext, _current
from ._pb import scheduler_pb2 as pb
from ._rpc import Connection
from .client import App

log = logging.getLogger("raftsched.worker")
Key = Tuple[int, int]
START_REPORT_DELAY = 0.010
MAX_REPORT_BATCH = 512
RECENT_CAPACITY = 65536
_SESSION_LOST = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION)


def load_app(spec: str) -> App:
    """``"module:attr"`` -> the App object."""
    mod, sep, attr = spec.partition(":")
    if not sep or not mod or not attr:
        raise ValueError(f"app: expected MODULE:APP, got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    obj: Any = importlib.import_module(mod)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not isinstance(obj, App):
        raise TypeError(f"app: {spec} is a {type(obj).__name__}, not a raftsched.App")
    return obj


def _error_message(e: BaseException) -> str:
    tb = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    return json.dumps({"type": type(e).__name__, "message": str(e), "traceback": tb[-16000:]})


def run_call(app: App, ctx: TaskContext, a_name: str, payload: bytes,
             deps: List[bytes]) -> Tuple[bool, bytes, str]:
    """Runs one attempt here: (ok, result bytes, failure message)."""
    token = _current.set(ctx)
    try:
        task = app.tasks.get(a_name)
        if task is None:
            raise LookupError(f"no task named {a_name!r} is registered in this worker's App")
        args, kwargs, mode = _codec.decode_call(payload)
        if mode == "first" and deps:
            args = [_codec.decode_result(deps[0])] + args
        elif mode == "list":
            args = [[_codec.decode_result(d) for d in deps]] + args
        value = task.fn(*args, **kwargs)
        return True, _codec.encode_result(a_name, value), ""
    except BaseException as e:  # the task's failure is a value
        return False, b"", _error_message(e)
    finally:
        _current.reset(token)


# =============================================================================== pools

class _ThreadJob:
    def __init__(self, worker: "Worker", key: Key, a: pb.Assignment) -> None:
        self.key = key
        self.cancelled = threading.Event()
        ctx = TaskContext(id=a.task, attempt=a.attempt, fence=a.fence, name=a.name,
                          worker=worker.id, deadline_ms=a.deadline_ms,
                          metadata=dict(a.metadata), cancelled=self.cancelled)
        deps = [d.result for d in a.dependencies]
        app = worker.app

        def body() -> None:
            out = run_call(app, ctx, a.name, a.payload, deps)
            worker._events.put(("done", key, out))

        self.thread = threading.Thread(target=body, name=f"task-{a.task}", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.cancelled.set()  # a thread cannot be killed: its outcome will be ignored


def _child_main(app_spec: str, conn: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    app = load_app(app_spec)
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        ctx_fields, name, payload, deps = msg
        out = run_call(app, TaskContext(**ctx_fields), name, payload, deps)
        conn.send(out)


class _ProcessJob:
    """One attempt in a fresh child process (killed on stop)."""

    def __init__(self, worker: "Worker", key: Key, a: pb.Assignment) -> None:
        self.key = key
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        self.proc = ctx.Process(target=_child_main, args=(worker.app_spec, child), daemon=True)
        self.proc.start()
        child.close()
        fields = dict(id=a.task, attempt=a.attempt, fence=a.fence, name=a.name,
                      worker=worker.id, deadline_ms=a.deadline_ms, metadata=dict(a.metadata))
        parent.send((fields, a.name, a.payload, [d.result for d in a.dependencies]))

        def wait() -> None:
            try:
                out = parent.recv()
            except (EOFError, OSError):
                out = (False, b"", json.dumps({"type": "WorkerLost",
                                               "message": f"child exited ({self.proc.exitcode})"}))
            worker._events.put(("done", key, out))
            try:
                parent.close()
                self.proc.terminate()
                self.proc.join(2)
            except Exception:
                pass

        threading.Thread(target=wait, name=f"task-{a.task}", daemon=True).start()

    def stop(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()


# =============================================================================== worker

class _Held:
    def __init__(self, a: pb.Assignment, job: Any, now: float) -> None:
        self.a = a
        self.job = job
        self.since = now
        self.started_sent = a.started
        self.stopped = False


class Worker:
    """Runs an App's tasks. ``run()`` blocks until a drain (SIGTERM/SIGINT or ``drain()``)."""

    def __init__(self, app: App, *, app_spec: str = "", queues: Optional[List[str]] = None,
                 concurrency: int = 0, pool: str = "threads", worker_id: Optional[str] = None,
                 drain_grace: float = 30.0, labels: Optional[Dict[str, str]] = None) -> None:
        if pool not in ("threads", "processes"):
            raise ValueError(f"pool must be 'threads' or 'processes', got {pool!r}")
        if pool == "processes" and not app_spec:
            raise ValueError("pool 'processes' needs app_spec (MODULE:APP) to load in children")
        self.app = app
        self.app_spec = app_spec
        self.conn: Connection = app._conn
        self.queues = queues or ["default"]
        self.concurrency = concurrency or (os.cpu_count() or 1) * (4 if pool == "threads" else 1)
        self.pool = pool
        self.id = worker_id or os.environ.get("SCHED_WORKER_ID") or \
            f"py-{socket.gethostname()}-{os.getpid()}-{random.randrange(1 << 24):06x}"
        self.instance = random.randrange(1, 1 << 63)
        self.drain_grace = drain_grace
        self.labels = labels or {}
        self._events: "queue.Queue[Tuple[Any, ...]]" = queue.Queue()
        self._reports: "queue.Queue[Optional[pb.TaskReport]]" = queue.Queue()
        self._held: Dict[Key, _Held] = {}
        self._recent: Dict[Key, None] = {}
        self._session = 0
        self._gen = 0
        self._interval = 1.0
        self._draining = False
        self._stop_net = threading.Event()
        self.stats = {"succeeded": 0, "failed": 0, "timed_out": 0, "stale": 0, "revoked": 0}

    # ------------------------------------------------------------------ public
    def drain(self) -> None:
        """Asks the worker to drain and exit (thread-safe, signal-safe)."""
        self._events.put(("drain",))

    def run(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                signal.signal(s, lambda *_: self.drain())
        threading.Thread(target=self._report_loop, name="raftsched-report", daemon=True).start()
        self._register()
        drain_until: Optional[float] = None
        while True:
            try:
                ev = self._events.get(timeout=START_REPORT_DELAY)
            except queue.Empty:
                ev = ("tick",)
            kind = ev[0]
            if kind == "assignment" and ev[1] == self._gen:
                self._on_assignment(ev[2])
            elif kind == "revoke" and ev[1] == self._gen:
                self._stop((ev[2].task, ev[2].fence))
                self.stats["revoked"] += 1
            elif kind == "resync" and ev[1] == self._gen:
                self._on_resync(ev[2])
            elif kind == "done":
                self._on_done(ev[1], ev[2])
            elif kind == "lost" and ev[1] == self._gen and not self._draining:
                log.warning("session lost; stopping held tasks and registering again")
                for k in list(self._held):
                    self._stop(k)
                self._drop_pending_reports()
                self._register()
            elif kind == "drain" and not self._draining:
                log.info("draining")
                self._draining = True
                drain_until = time.monotonic() + self.drain_grace
                try:
                    self.conn.call("DrainWorker", pb.DrainWorkerRequest(worker_id=self.id), budget=5)
                except grpc.RpcError as e:
                    log.warning("DrainWorker failed: %s", e)
            self._tick()
            if self._draining:
                live = [h for h in self._held.values() if not h.stopped]
                if drain_until is not None and time.monotonic() > drain_until:
                    for h in live:
                        self._stop(h.a.task_key if False else (h.a.task, h.a.fence))
                    live = []
                if not live:
                    self._finish()
                    return

    # ------------------------------------------------------------------ session
    def _register(self) -> None:
        self._gen += 1
        gen = self._gen
        self._stop_net.set()
        self._stop_net = threading.Event()
        spec = pb.WorkerSpec(id=self.id, queues=self.queues, labels=self.labels,
                             slots=self.concurrency)
        delay = 0.05
        for _ in range(10_000):
            try:
                r = self.conn.call("RegisterWorker",
                                   pb.RegisterWorkerRequest(worker=spec, instance=self.instance),
                                   budget=10)
                break
            except grpc.RpcError as e:
                if e.code() in (grpc.StatusCode.INVALID_ARGUMENT,  # type: ignore[attr-defined]
                                grpc.StatusCode.PERMISSION_DENIED,
                                grpc.StatusCode.UNAUTHENTICATED):
                    raise
                log.warning("cannot register yet: %s", e.code())  # type: ignore[attr-defined]
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
        else:
            raise RuntimeError("could not register")
        self._session = r.session
        self._interval = max(0.05, r.heartbeat_interval_ms / 1000)
        log.info("registered %s session %d", self.id, r.session)
        stop = self._stop_net
        threading.Thread(target=self._heartbeat_loop, args=(gen, r.session, stop),
                         daemon=True, name="raftsched-heartbeat").start()
        threading.Thread(target=self._stream_loop, args=(gen, r.session, stop),
                         daemon=True, name="raftsched-stream").start()

    def _heartbeat_loop(self, gen: int, session: int, stop: threading.Event) -> None:
        while not stop.wait(self._interval):
            try:
                self.conn.call("Heartbeat", pb.HeartbeatRequest(worker_id=self.id, session=session),
                               budget=max(1.0, self._interval * 2), timeout=max(1.0, self._interval))
            except grpc.RpcError as e:
                if e.code() in _SESSION_LOST:  # type: ignore[attr-defined]
                    self._events.put(("lost", gen))
                    return

    def _stream_loop(self, gen: int, session: int, stop: threading.Event) -> None:
        delay = 0.05
        while not stop.is_set():
            err: Optional[grpc.RpcError] = None
            try:
                call = self.conn.stream("OpenAssignments",
                                        pb.OpenAssignmentsRequest(worker_id=self.id, session=session))
                for m in call:
                    if stop.is_set():
                        call.cancel()
                        return
                    delay = 0.05
                    which = m.WhichOneof("msg")
                    self._events.put((which, gen, getattr(m, which)))
            except grpc.RpcError as e:
                err = e
                if e.code() in _SESSION_LOST:  # type: ignore[attr-defined]
                    self._events.put(("lost", gen))
                    return
            if stop.is_set():
                return
            self.conn.stream_failed(err)
            time.sleep(delay)
            delay = min(delay * 2, 1.0)

    # ------------------------------------------------------------------ jobs
    def _on_assignment(self, a: pb.Assignment) -> None:
        key = (a.task, a.fence)
        if key in self._held or key in self._recent:
            return
        if self._draining:
            return  # not started: the server requeues it at deregistration
        job_cls = _ThreadJob if self.pool == "threads" else _ProcessJob
        self._held[key] = _Held(a, job_cls(self, key, a), time.monotonic())

    def _on_resync(self, r: pb.Resync) -> None:
        listed = set(zip(r.tasks, r.fences))
        for k in list(self._held):
            if k not in listed:
                self._stop(k)
        for k in listed:
            if k not in self._held and k not in self._recent:
                # Held by us on the server but never received: we cannot run it without the
                # assignment, so give it back as a retryable failure.
                self._queue_report(pb.TaskReport(task=k[0], fence=k[1], failed=pb.Failed(
                    message="worker lost the assignment", retryable=True)))
                self._remember(k)

    def _stop(self, key: Key) -> None:
        h = self._held.get(key)
        if h is None or h.stopped:
            return
        h.stopped = True
        h.job.stop()
        if self.pool == "threads":
            self._held.pop(key, None)  # abandoned: the thread's outcome is ignored
            self._remember(key)

    def _on_done(self, key: Key, out: Tuple[bool, bytes, str]) -> None:
        h = self._held.pop(key, None)
        if h is None:
            return
        self._remember(key)
        if h.stopped:
            return
        ok, result, msg = out
        if ok:
            self.stats["succeeded"] += 1
            self._queue_report(pb.TaskReport(task=key[0], fence=key[1],
                                             succeeded=pb.Succeeded(result=result)))
        else:
            self.stats["failed"] += 1
            self._queue_report(pb.TaskReport(task=key[0], fence=key[1],
                                             failed=pb.Failed(message=msg, retryable=True)))

    def _tick(self) -> None:
        now = time.monotonic()
        now_ms = int(time.time() * 1000)
        for key, h in list(self._held.items()):
            if h.stopped:
                continue
            if h.a.deadline_ms and now_ms >= h.a.deadline_ms:
                self.stats["timed_out"] += 1
                self._stop(key)
                self._queue_report(pb.TaskReport(task=key[0], fence=key[1], failed=pb.Failed(
                    message=json.dumps({"type": "TimeoutError",
                                        "message": "timed out: the attempt passed its deadline"}),
                    retryable=True)))
                continue
            if not h.started_sent and now - h.since >= START_REPORT_DELAY:
                h.started_sent = True
                self._queue_report(pb.TaskReport(task=key[0], fence=key[1], started=pb.Started()))

    def _remember(self, key: Key) -> None:
        self._recent[key] = None
        if len(self._recent) > RECENT_CAPACITY:
            self._recent.pop(next(iter(self._recent)))

    # ------------------------------------------------------------------ reports
    def _queue_report(self, r: pb.TaskReport) -> None:
        self._reports.put(r)

    def _drop_pending_reports(self) -> None:
        try:
            while True:
                self._reports.get_nowait()
        except queue.Empty:
            pass

    def _report_loop(self) -> None:
        while True:
            first = self._reports.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < MAX_REPORT_BATCH:
                try:
                    r = self._reports.get_nowait()
                except queue.Empty:
                    break
                if r is None:
                    self._reports.put(None)
                    break
                batch.append(r)
            self._send_reports(batch)

    def _send_reports(self, batch: List[pb.TaskReport]) -> None:
        delay = 0.05
        for _ in range(1000):  # bounded: ~ minutes of retries across leader changes
            try:
                resp = self.conn.call("Report", pb.ReportRequest(worker_id=self.id, reports=batch),
                                      budget=30)
            except grpc.RpcError as e:
                code = e.code()  # type: ignore[attr-defined]
                if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED):
                    if len(batch) > 1:
                        for r in batch:
                            self._send_reports([r])
                        return
                    r = batch[0]
                    if r.WhichOneof("outcome") == "succeeded":
                        # e.g. the result is over the server's limit: fail the task clearly.
                        msg = json.dumps({"type": "ResultRefused", "message":
                                          f"the server refused the result: {e.details()}"})  # type: ignore[attr-defined]
                        self._send_reports([pb.TaskReport(task=r.task, fence=r.fence,
                                                          failed=pb.Failed(message=msg, retryable=False))])
                    else:
                        log.error("report for task %d refused: %s", r.task, e)
                    return
                if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
                    log.error("reports refused: %s", e)
                    return
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            for res in resp.results:
                if res.stale:
                    self.stats["stale"] += 1
                    log.info("report for task %d refused as stale; dropped", res.task)
                elif not res.accepted and not res.duplicate and res.error:
                    log.warning("report for task %d refused: %s", res.task, res.error)
            return

    def _finish(self) -> None:
        deadline = time.monotonic() + 10
        while not self._reports.empty() and time.monotonic() < deadline:
            time.sleep(0.01)
        self._reports.put(None)
        time.sleep(0.05)
        try:
            self.conn.call("DeregisterWorker",
                           pb.DeregisterWorkerRequest(worker_id=self.id, session=self._session),
                           budget=5)
        except grpc.RpcError as e:
            log.warning("DeregisterWorker failed: %s", e)
        self._stop_net.set()
        log.info("drained; stats %s", self.stats)
