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
   job's outcome is not reported, except for the deadline. An attempt a Resync lists that this
   worker never received is read back (GetTask, and its dependencies' results) and run if it
   is still ours, as the Rust worker does; if its inputs cannot be read it is given back.
5. The stream is reopened (any node serves it) after UNAVAILABLE; NOT_FOUND /
   FAILED_PRECONDITION mean the session is gone: stop everything, drop pending reports,
   register again.
6. SIGTERM drains: DrainWorker, finish held jobs within the grace, stop the rest,
   DeregisterWorker (the server requeues what is left).

Pools: ``threads`` runs attempts on reusable threads (a timed-out thread is abandoned, its
outcome ignored, and replaced); ``processes`` runs them in reusable child processes, one
attempt at a time each: a child is killed on timeout or revoke and replaced when needed.

The main loop handles every queued event before it looks at timers, and sleeps until the
next timer (start report, deadline) instead of polling.
"""

from __future__ import annotations

import heapq
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
from typing import Any, Callable, Dict, List, Optional, Tuple

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
_T_START, _T_DEADLINE = 0, 1


class WorkerRefused(RuntimeError):
    """The cluster refused this worker (bad spec, or a token that may not act as this id)."""


def _machine_memory_mib() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") >> 20
    except (ValueError, OSError, AttributeError):
        return 0


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

class _ThreadPool:
    """Reusable threads for attempts. A stopped attempt's thread cannot be killed: it is
    abandoned (its outcome ignored) and a new thread is made when no idle one is left, so a
    stuck task never blocks the others. Threads beyond ``keep`` exit after idling a while."""

    IDLE_EXIT = 30.0

    def __init__(self, keep: int) -> None:
        self._keep = keep
        self._q: "queue.SimpleQueue[Callable[[], None]]" = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0
        self._threads = 0

    def submit(self, fn: Callable[[], None]) -> None:
        with self._lock:
            if self._idle > 0:
                self._idle -= 1  # that idle thread takes it
                spawn = False
            else:
                self._threads += 1
                spawn = True
        self._q.put(fn)
        if spawn:
            threading.Thread(target=self._run, name="raftsched-task", daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                fn = self._q.get(timeout=self.IDLE_EXIT)
            except queue.Empty:
                with self._lock:
                    if self._threads > self._keep and self._idle > 0:
                        self._idle -= 1
                        self._threads -= 1
                        return
                continue
            fn()
            with self._lock:
                self._idle += 1


class _ThreadJob:
    def __init__(self, worker: "Worker", key: Key, a: pb.Assignment) -> None:
        self.key = key
        self.cancelled = threading.Event()
        ctx = TaskContext(id=a.task, attempt=a.attempt, fence=a.fence, name=a.name,
                          worker=worker.id, deadline_ms=a.deadline_ms,
                          metadata=dict(a.metadata), cancelled=self.cancelled)
        deps = [d.result for d in a.dependencies]
        app, events, name, payload = worker.app, worker._events, a.name, a.payload

        def body() -> None:
            events.put(("done", key, run_call(app, ctx, name, payload, deps)))

        worker._threads.submit(body)

    def stop(self) -> None:
        self.cancelled.set()  # a thread cannot be killed: its outcome will be ignored


def _child_main(app_spec: str, conn: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    app = load_app(app_spec)
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        ctx_fields, name, payload, deps = msg
        out = run_call(app, TaskContext(**ctx_fields), name, payload, deps)
        conn.send(out)


class _Child:
    """One reusable child process and the thread reading its answers."""

    def __init__(self, pool: "_ProcessPool") -> None:
        ctx = mp.get_context("spawn")
        self.pipe, child = ctx.Pipe()
        self.proc = ctx.Process(target=_child_main, args=(pool.app_spec, child), daemon=True)
        self.proc.start()
        child.close()
        self.pool = pool
        self.key: Optional[Key] = None
        self.runs = 0
        self.killed = False
        self._jobs: "queue.SimpleQueue[Optional[Key]]" = queue.SimpleQueue()
        threading.Thread(target=self._read, name="raftsched-child", daemon=True).start()

    def run(self, key: Key, msg: Tuple[Any, ...]) -> None:
        self.key = key
        self.runs += 1
        self._jobs.put(key)
        try:
            self.pipe.send(msg)
        except (OSError, ValueError):
            pass  # the reader sees the child gone and reports the attempt lost

    def _read(self) -> None:
        while True:
            key = self._jobs.get()
            if key is None:
                return
            try:
                out = self.pipe.recv()
                gone = False
            except (EOFError, OSError):
                out = (False, b"", json.dumps({
                    "type": "WorkerLost",
                    "message": f"the child process exited ({self.proc.exitcode})"}))
                gone = True
            self.pool._finished(self, key, out, gone)
            if gone:
                return

    def kill(self) -> None:
        self.killed = True
        if self.proc.is_alive():
            self.proc.kill()

    def retire(self) -> None:
        self._jobs.put(None)
        try:
            self.pipe.close()  # the child reads EOF and exits
        except OSError:
            pass
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()


class _ProcessPool:
    """Reusable child processes, one attempt at a time each. A stopped attempt's child is
    killed (the only way to stop Python code for sure) and replaced on demand; the others
    keep running. A child that ran ``max_tasks_per_child`` attempts is retired (0 = never)."""

    def __init__(self, worker: "Worker", max_tasks_per_child: int) -> None:
        self.worker = worker
        self.app_spec = worker.app_spec
        self.max_tasks = max_tasks_per_child
        self._lock = threading.Lock()
        self._idle: List[_Child] = []
        self._busy: Dict[Key, _Child] = {}

    def start(self, key: Key, a: pb.Assignment) -> None:
        fields = dict(id=a.task, attempt=a.attempt, fence=a.fence, name=a.name,
                      worker=self.worker.id, deadline_ms=a.deadline_ms,
                      metadata=dict(a.metadata))
        msg = (fields, a.name, a.payload, [d.result for d in a.dependencies])
        with self._lock:
            child = self._idle.pop() if self._idle else None
        if child is None or not child.proc.is_alive():
            if child is not None:
                child.retire()
            child = _Child(self)
        with self._lock:
            self._busy[key] = child
        child.run(key, msg)

    def stop(self, key: Key) -> None:
        with self._lock:
            child = self._busy.get(key)
        if child is not None:
            child.kill()

    def _finished(self, child: _Child, key: Key, out: Tuple[bool, bytes, str],
                  gone: bool) -> None:
        with self._lock:
            self._busy.pop(key, None)
            reuse = not gone and not child.killed and (
                not self.max_tasks or child.runs < self.max_tasks)
            if reuse:
                self._idle.append(child)
        if not reuse and not gone:
            threading.Thread(target=child.retire, daemon=True).start()
        self.worker._events.put(("done", key, out))

    def close(self) -> None:
        with self._lock:
            children = self._idle + list(self._busy.values())
            self._idle, self._busy = [], {}
        for c in children:
            c.kill()


class _ProcessJob:
    def __init__(self, worker: "Worker", key: Key, a: pb.Assignment) -> None:
        self.key = key
        self._pool = worker._procs
        self._pool.start(key, a)

    def stop(self) -> None:
        self._pool.stop(self.key)


# =============================================================================== worker

class _Held:
    __slots__ = ("a", "job", "since", "started_sent", "stopped")

    def __init__(self, a: pb.Assignment, job: Any, now: float) -> None:
        self.a = a
        self.job = job
        self.since = now
        self.started_sent = a.started
        self.stopped = False


class Worker:
    """Runs an App's tasks. ``run()`` blocks until a drain (SIGTERM/SIGINT or ``drain()``).

    ``cpu`` (millicores), ``mem`` (MiB), ``resources`` ({name: amount}) and ``labels`` are
    what the worker offers the scheduler's placement, as with ``schedctl worker run``;
    ``cpu`` defaults to 1000 per CPU and ``mem`` to the machine's memory."""

    def __init__(self, app: App, *, app_spec: str = "", queues: Optional[List[str]] = None,
                 concurrency: int = 0, pool: str = "threads", worker_id: Optional[str] = None,
                 drain_grace: float = 30.0, labels: Optional[Dict[str, str]] = None,
                 cpu: Optional[int] = None, mem: Optional[int] = None,
                 resources: Optional[Dict[str, int]] = None,
                 max_tasks_per_child: int = 0) -> None:
        if pool not in ("threads", "processes"):
            raise ValueError(f"pool must be 'threads' or 'processes', got {pool!r}")
        if pool == "processes" and not app_spec:
            raise ValueError("pool 'processes' needs app_spec (MODULE:APP) to load in children")
        if concurrency < 0:
            raise ValueError(f"concurrency must be >= 0, got {concurrency}")
        if max_tasks_per_child < 0:
            raise ValueError(f"max_tasks_per_child must be >= 0, got {max_tasks_per_child}")
        for what, v in (("cpu", cpu), ("mem", mem)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                raise ValueError(f"{what} must be an int >= 0, got {v!r}")
        for k, v in (resources or {}).items():
            if not isinstance(k, str) or not k or not isinstance(v, int) or v < 0:
                raise ValueError(f"resources: {k!r}={v!r} is not name=amount (amount >= 0)")
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
        self.labels = dict(labels or {})
        self.capacity = pb.Resources(
            cpu_milli=(os.cpu_count() or 1) * 1000 if cpu is None else cpu,
            memory_mib=_machine_memory_mib() if mem is None else mem,
            named=dict(resources or {}))
        self._events: "queue.SimpleQueue[Tuple[Any, ...]]" = queue.SimpleQueue()
        self._reports: "queue.Queue[Optional[pb.TaskReport]]" = queue.Queue()
        self._held: Dict[Key, _Held] = {}
        self._recent: Dict[Key, None] = {}
        self._timers: List[Tuple[float, int, Key]] = []  # (when, kind, key): a heap
        self._session = 0
        self._gen = 0
        self._interval = 1.0
        self._draining = False
        self._stop_net = threading.Event()
        self._threads = _ThreadPool(self.concurrency)
        self._procs = _ProcessPool(self, max_tasks_per_child) if pool == "processes" else None
        self.stats = {"succeeded": 0, "failed": 0, "timed_out": 0, "stale": 0, "revoked": 0,
                      "recovered": 0}

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
        events = self._events
        while True:
            timers = self._timers
            wait = 1.0 if not timers else max(0.0, min(1.0, timers[0][0] - time.monotonic()))
            if self._draining:
                wait = min(wait, 0.05)
            try:
                ev: Optional[Tuple[Any, ...]] = events.get(timeout=wait)
            except queue.Empty:
                ev = None
            # Handle everything queued, then the timers once.
            while ev is not None:
                self._handle(ev)
                try:
                    ev = events.get_nowait()
                except queue.Empty:
                    ev = None
            if self._timers:
                self._tick()
            if self._draining:
                if drain_until is None:
                    drain_until = time.monotonic() + self.drain_grace
                live = [k for k, h in self._held.items() if not h.stopped]
                if time.monotonic() > drain_until:
                    for k in live:
                        self._stop(k)
                    live = []
                if not live:
                    self._finish()
                    return

    def _handle(self, ev: Tuple[Any, ...]) -> None:
        kind = ev[0]
        if kind == "done":
            self._on_done(ev[1], ev[2])
        elif kind == "assignment":
            if ev[1] == self._gen:
                self._on_assignment(ev[2])
        elif kind == "revoke":
            if ev[1] == self._gen:
                self._stop((ev[2].task, ev[2].fence))
                self.stats["revoked"] += 1
        elif kind == "resync":
            if ev[1] == self._gen:
                self._on_resync(ev[2])
        elif kind == "recovered":
            if ev[1] == self._gen:
                self._on_recovered(ev[2], ev[3], ev[4])
        elif kind == "lost":
            if ev[1] == self._gen and not self._draining:
                log.warning("session lost; stopping held tasks and registering again")
                for k in list(self._held):
                    self._stop(k)
                self._drop_pending_reports()
                self._register()
        elif kind == "drain" and not self._draining:
            log.info("draining")
            self._draining = True
            try:
                self.conn.call("DrainWorker", pb.DrainWorkerRequest(worker_id=self.id), budget=5)
            except grpc.RpcError as e:
                log.warning("DrainWorker failed: %s", e)

    # ------------------------------------------------------------------ session
    def _register(self) -> None:
        self._gen += 1
        gen = self._gen
        self._stop_net.set()
        self._stop_net = threading.Event()
        spec = pb.WorkerSpec(id=self.id, queues=self.queues, labels=self.labels,
                             capacity=self.capacity, slots=self.concurrency)
        delay = 0.05
        for _ in range(10_000):
            try:
                r = self.conn.call("RegisterWorker",
                                   pb.RegisterWorkerRequest(worker=spec, instance=self.instance),
                                   budget=10)
                break
            except grpc.RpcError as e:
                code = e.code()  # type: ignore[attr-defined]
                if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED,
                            grpc.StatusCode.UNAUTHENTICATED):
                    raise WorkerRefused(f"worker {self.id!r} cannot register: {code.name}: "
                                        f"{e.details()}") from None  # type: ignore[attr-defined]
                log.warning("cannot register yet: %s", code)
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
        events = self._events
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
                    events.put((which, gen, getattr(m, which)))
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
        # Another attempt of the same task: the newest fence wins (as in the Rust worker).
        others = [k for k in self._held if k[0] == a.task] if self._held else []
        if any(k[1] > a.fence for k in others):
            return
        for k in others:
            self._stop(k)
        if self._draining:
            return  # not started: the server requeues it at deregistration
        self._start(a)

    def _start(self, a: pb.Assignment) -> None:
        key = (a.task, a.fence)
        now = time.monotonic()
        job_cls = _ThreadJob if self.pool == "threads" else _ProcessJob
        self._held[key] = _Held(a, job_cls(self, key, a), now)
        if not a.started:
            heapq.heappush(self._timers, (now + START_REPORT_DELAY, _T_START, key))
        if a.deadline_ms:
            left = (a.deadline_ms - time.time() * 1000) / 1000
            heapq.heappush(self._timers, (now + max(0.0, left), _T_DEADLINE, key))

    def _on_resync(self, r: pb.Resync) -> None:
        listed = set(zip(r.tasks, r.fences))
        for k in list(self._held):
            if k not in listed:
                self._stop(k)
        for k in sorted(listed):
            if k not in self._held and k not in self._recent:
                # Held by us on the server but never received (as the Rust worker does): read
                # the task back and run it if it is still ours, so it is neither stuck nor lost.
                threading.Thread(target=self._recover, args=(self._gen, k[0], k[1]),
                                 daemon=True, name="raftsched-recover").start()

    def _recover(self, gen: int, task: int, fence: int) -> None:
        """Reads a task known only from a resync, with its dependencies' results."""
        found: Optional[pb.Task] = None
        deps: Optional[List[bytes]] = []
        try:
            found = self.conn.call("GetTask", pb.GetTaskRequest(id=task), budget=10)
            for d in found.spec.depends_on:
                try:
                    dt = self.conn.call("GetTask", pb.GetTaskRequest(id=d, stale_ok=True),
                                        budget=10)
                except grpc.RpcError as e:
                    if e.code() == grpc.StatusCode.NOT_FOUND:  # type: ignore[attr-defined]
                        continue  # purged: left out, as the server does for assignments
                    raise
                deps.append(dt.result)  # type: ignore[union-attr]
        except grpc.RpcError as e:
            log.warning("cannot read task %d back after a resync: %s", task,
                        e.code())  # type: ignore[attr-defined]
            deps = None
        self._events.put(("recovered", gen, (task, fence), found, deps))

    def _on_recovered(self, key: Key, t: Optional[pb.Task], deps: Optional[List[bytes]]) -> None:
        if key in self._held or key in self._recent or t is None:
            return
        ours = (t.fence == key[1] and t.worker == self.id
                and t.state in (pb.TASK_STATE_ASSIGNED, pb.TASK_STATE_RUNNING))
        if not ours:
            return
        if self._draining or deps is None:
            # Nothing will run it here (or its inputs cannot be read): give it back.
            why = "the worker is shutting down" if self._draining else \
                "the worker could not read the task's inputs"
            self._queue_report(pb.TaskReport(task=key[0], fence=key[1], failed=pb.Failed(
                message=json.dumps({"type": "WorkerLost", "message": why}), retryable=True)))
            self._remember(key)
            return
        log.info("running task %d (fence %d) known only from a resync", key[0], key[1])
        self.stats["recovered"] += 1
        self._start(pb.Assignment(
            task=key[0], fence=key[1], attempt=t.attempt, name=t.spec.name,
            payload=t.spec.payload, deadline_ms=t.deadline_ms, metadata=dict(t.spec.metadata),
            started=t.state == pb.TASK_STATE_RUNNING,
            dependencies=[pb.DependencyResult(task=d, result=r)
                          for d, r in zip(t.spec.depends_on, deps)]))

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
            self._reports.put(pb.TaskReport(task=key[0], fence=key[1],
                                            succeeded=pb.Succeeded(result=result)))
        else:
            self.stats["failed"] += 1
            self._reports.put(pb.TaskReport(task=key[0], fence=key[1],
                                            failed=pb.Failed(message=msg, retryable=True)))

    def _tick(self) -> None:
        now = time.monotonic()
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, kind, key = heapq.heappop(timers)
            h = self._held.get(key)
            if h is None or h.stopped:
                continue
            if kind == _T_DEADLINE:
                self.stats["timed_out"] += 1
                self._stop(key)
                self._queue_report(pb.TaskReport(task=key[0], fence=key[1], failed=pb.Failed(
                    message=json.dumps({"type": "TimeoutError",
                                        "message": "timed out: the attempt passed its deadline"}),
                    retryable=True)))
            elif not h.started_sent:
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
        if self._procs is not None:
            self._procs.close()
        log.info("drained; stats %s", self.stats)
