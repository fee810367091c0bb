"""The client side: :class:`App`, tasks, signatures, results, and the batching submitter.

``delay()`` never waits for the cluster. Each call queues its task specs for a submitter
thread, which sends everything queued while the previous SubmitTasks was in flight as one
SubmitTasks (one durable round trip for many calls). Every spec carries an idempotency key
(the caller's ``key``, or one made here), so a batch retried after an ambiguous failure creates
each task exactly once. A canvas is queued as one unit and always travels inside one request,
so it is accepted or refused as a whole.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import queue
import threading
import time
import uuid
from typing import (Any, Callable, Dict, Generic, Iterable, List, Optional, Sequence,
                    Tuple, TypeVar, Union)

import grpc

from . import _codec
from ._pb import scheduler_pb2 as pb
from ._quantity import parse_cpu_milli, parse_mem_mib
from ._rpc import Connection
from ._waiter import TERMINAL, Slot, Waiter
from .errors import SubmitError, TaskCancelled, TaskFailed, UpstreamFailed

R = TypeVar("R")

MAX_BATCH_SPECS = 2000
_SUBMIT_BUDGET = 60.0


def state_name(state: int) -> str:
    """``TASK_STATE_QUEUED`` -> ``"QUEUED"``."""
    return pb.TaskState.Name(state).replace("TASK_STATE_", "")


# ============================================================================ submitting

# Every unit's acknowledgement: one notify per SubmitTasks answer, not one lock per task.
_acked = threading.Condition()


class _Unit:
    """Specs that must travel together (one delay(), or one canvas): once answered, their
    ``ids`` and result ``slots`` (or the ``error`` that refused them)."""

    __slots__ = ("specs", "ids", "slots", "error", "_callbacks")

    def __init__(self, specs: List[pb.TaskSpec]) -> None:
        self.specs = specs
        self.ids: Optional[List[int]] = None
        self.slots: Optional[List[Slot]] = None
        self.error: Optional[BaseException] = None
        self._callbacks: Optional[List[Callable[[], None]]] = None

    def answered(self) -> bool:
        return self.ids is not None or self.error is not None

    def wait(self, timeout: float) -> bool:
        if self.ids is not None or self.error is not None:
            return True
        with _acked:
            return _acked.wait_for(self.answered, timeout)

    def add_callback(self, cb: Callable[[], None]) -> None:
        """Calls ``cb()`` once answered (now, if it is already)."""
        with _acked:
            if not self.answered():
                if self._callbacks is None:
                    self._callbacks = []
                self._callbacks.append(cb)
                return
        cb()


def _answer(units: Sequence[_Unit], ids: Optional[Sequence[int]], waiter: "Waiter",
            err: Optional[BaseException] = None) -> None:
    """Resolves ``units`` with consecutive ``ids`` (or fails them with ``err``), then wakes
    everyone waiting on any of them."""
    slots = waiter.track(ids) if ids is not None else None
    cbs: List[Callable[[], None]] = []
    pos = 0
    with _acked:
        for u in units:
            if u.answered():
                continue
            if slots is not None and ids is not None:
                n = len(u.specs)
                u.slots = slots[pos:pos + n]
                u.ids = list(ids[pos:pos + n])
                pos += n
            else:
                u.error = err
            if u._callbacks:
                cbs.extend(u._callbacks)
                u._callbacks = None
        _acked.notify_all()
    for cb in cbs:
        try:
            cb()
        except Exception:
            pass


class _Submitter:
    """One thread sending queued units; units queued during a send join the next request."""

    def __init__(self, conn: Connection, waiter: "Waiter") -> None:
        self._conn = conn
        self._waiter = waiter
        self._q: "queue.Queue[Optional[_Unit]]" = queue.Queue()
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()
        self._stopped = False

    def submit(self, unit: _Unit) -> None:
        with self._lock:
            if self._stopped:
                raise SubmitError("the App is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="raftsched-submit",
                                                daemon=True)
                self._thread.start()
        self._q.put(unit)

    def close(self, timeout: float = 10.0) -> None:
        with self._lock:
            self._stopped = True
            t = self._thread
        if t is not None:
            self._q.put(None)
            t.join(timeout)

    def _run(self) -> None:
        stop = False
        while not stop:
            first = self._q.get()
            if first is None:
                return
            units = [first]
            n = len(first.specs)
            while n < MAX_BATCH_SPECS:
                try:
                    u = self._q.get_nowait()
                except queue.Empty:
                    break
                if u is None:
                    stop = True
                    break
                units.append(u)
                n += len(u.specs)
            self._send(units)

    def _send(self, units: List[_Unit]) -> None:
        specs: List[pb.TaskSpec] = []
        for u in units:
            base = len(specs)
            for s in u.specs:
                if base and s.depends_on_batch:
                    moved = pb.TaskSpec()
                    moved.CopyFrom(s)
                    del moved.depends_on_batch[:]
                    moved.depends_on_batch.extend(base + d for d in s.depends_on_batch)
                    s = moved
                specs.append(s)
        req = pb.SubmitTasksRequest(tasks=specs)
        try:
            resp = self._conn.call("SubmitTasks", req, budget=_SUBMIT_BUDGET, timeout=15.0)
        except grpc.RpcError as e:
            code = e.code()  # type: ignore[attr-defined]
            if len(units) > 1 and code in (grpc.StatusCode.INVALID_ARGUMENT,
                                           grpc.StatusCode.RESOURCE_EXHAUSTED,
                                           grpc.StatusCode.FAILED_PRECONDITION,
                                           grpc.StatusCode.NOT_FOUND):
                # One bad unit must not sink the others: send each alone.
                for u in units:
                    self._send([u])
                return
            err = SubmitError(f"submit refused: {code.name}: {e.details()}")  # type: ignore[attr-defined]
            _answer(units, None, self._waiter, err)
            return
        except BaseException as e:  # never leave a caller waiting
            _answer(units, None, self._waiter, SubmitError(f"submit failed: {e!r}"))
            return
        _answer(units, [t.id for t in resp.tasks], self._waiter)


# ============================================================================ results

def _raise_for(task: pb.Task) -> None:
    st = task.state
    if st == pb.TASK_STATE_FAILED:
        lf = task.last_failure
        try:
            info = json.loads(lf.message)
            if not isinstance(info, dict):
                raise ValueError
        except ValueError:
            info = {"type": "TimeoutError" if lf.kind == "timeout" else "Error",
                    "message": lf.message}
        raise TaskFailed(task.id, str(info.get("type", "Error")), str(info.get("message", "")),
                         str(info.get("traceback", "")), lf.kind, lf.attempt)
    if st == pb.TASK_STATE_CANCELLED:
        raise TaskCancelled(task.id, task.cancel_reason)
    if st == pb.TASK_STATE_UPSTREAM_FAILED:
        raise UpstreamFailed(task.id, task.upstream or None)


class AsyncResult(Generic[R]):
    """A submitted task. ``id`` waits for the submit to be acknowledged (and raises
    :class:`SubmitError` if it was refused). Waiting goes through the App's shared waiter
    (one event stream and batched reads for all results), so waiting on many results costs
    a few RPCs, not one stream per task."""

    def __init__(self, app: "App", src: "Union[int, _Unit]", index: int = 0) -> None:
        self.app = app
        self._unit: Optional[_Unit] = None
        self._index = index
        self._id: Optional[int] = None
        self._slot: Optional[Slot] = None
        if isinstance(src, _Unit):
            self._unit = src
        else:
            self._id = src
            self._slot = app._waiter.slot(src)

    def _answered(self) -> None:
        u = self._unit
        assert u is not None
        if u.error is not None:
            raise u.error
        assert u.ids is not None and u.slots is not None
        self._id = u.ids[self._index]
        self._slot = u.slots[self._index]

    @property
    def id(self) -> int:
        if self._id is None:
            assert self._unit is not None
            if not self._unit.wait(_SUBMIT_BUDGET + 15):
                raise SubmitError("the submit was not answered in time")
            self._answered()
        assert self._id is not None
        return self._id

    def __repr__(self) -> str:
        if self._id is None and self._unit is not None and not self._unit.answered():
            return "<AsyncResult (submitting)>"
        try:
            return f"<AsyncResult {self.id}>"
        except Exception as e:
            return f"<AsyncResult (submit failed: {e})>"

    def _task(self, stale_ok: bool = False) -> pb.Task:
        return self.app._conn.call("GetTask", pb.GetTaskRequest(id=self.id, stale_ok=stale_ok))

    def _bound(self) -> Slot:
        self.id  # raises SubmitError if the submit was refused
        assert self._slot is not None
        self.app._waiter.start()
        return self._slot

    @property
    def state(self) -> str:
        """``WAITING``, ``QUEUED``, ``DELAYED``, ``ASSIGNED``, ``RUNNING``, ``SUCCEEDED``,
        ``FAILED``, ``CANCELLED`` or ``UPSTREAM_FAILED``."""
        s = self._slot
        if s is not None and s.done and s.task is not None:
            return state_name(s.task.state)
        return state_name(self._task().state)

    def ready(self) -> bool:
        s = self._slot
        return (s is not None and s.done) or self._task().state in TERMINAL

    def _timed_out(self, timeout: Optional[float]) -> TimeoutError:
        try:
            st = state_name(self._task(stale_ok=True).state)
        except Exception as e:  # the message is best effort
            st = f"unknown: {e.__class__.__name__}"
        return TimeoutError(f"task {self.id} not finished after {timeout}s (state {st})")

    def wait_task(self, timeout: Optional[float] = None) -> pb.Task:
        """The stored task once it is terminal; ``TimeoutError`` after ``timeout`` seconds."""
        s = self._bound()
        if not s.wait(timeout):
            raise self._timed_out(timeout)
        if s.error is not None:
            raise s.error
        assert s.task is not None
        return s.task

    def get(self, timeout: Optional[float] = None) -> R:
        """The task's return value. Raises :class:`TaskFailed`, :class:`TaskCancelled`,
        :class:`UpstreamFailed`, :class:`SubmitError`, or ``TimeoutError``."""
        t = self.wait_task(timeout)
        _raise_for(t)
        return _codec.decode_result(t.result)

    async def aget(self, timeout: Optional[float] = None) -> R:
        """``get()`` for asyncio code: waits without holding a thread."""
        loop = asyncio.get_running_loop()
        if self._id is None and self._unit is not None and not self._unit.answered():
            await _until(loop, self._unit.add_callback, _SUBMIT_BUDGET + 15,
                         SubmitError("the submit was not answered in time"))
        s = self._bound()
        await _until(loop, s.add_callback, timeout, None, lambda: self._timed_out(timeout))
        if s.error is not None:
            raise s.error
        assert s.task is not None
        _raise_for(s.task)
        return _codec.decode_result(s.task.result)

    def cancel(self, reason: str = "cancelled by client") -> bool:
        """Cancels the task; True if it is now cancelled (False if it already finished)."""
        resp = self.app._conn.call("CancelTasks", pb.CancelTasksRequest(ids=[self.id], reason=reason))
        r = resp.results[0]
        return r.ok or r.already_cancelled

    def retry(self, with_dependents: bool = False) -> List[int]:
        """Runs a task that ended ``FAILED``, ``CANCELLED`` or ``UPSTREAM_FAILED`` again, as a new
        attempt (same id; its retry policy starts over). With ``with_dependents`` its failed and
        upstream-failed dependents run again too, after it succeeds. Returns the ids re-run.
        ``get()`` on this result then waits for the new run. A task in another state raises
        ``grpc.RpcError`` with ``FAILED_PRECONDITION``."""
        resp = self.app._conn.call(
            "RetryTask", pb.RetryTaskRequest(id=self.id, with_dependents=with_dependents))
        self._slot = self.app._waiter.reset(self.id)
        return [t.id for t in resp.tasks]

    def explain(self) -> str:
        """One sentence saying why the task is where it is."""
        return self.app._conn.call("ExplainTask", pb.ExplainTaskRequest(id=self.id)).summary


async def _until(loop: asyncio.AbstractEventLoop, add_callback: Callable[[Callable[[], None]], None],
                 timeout: Optional[float], err: Optional[BaseException],
                 make_err: Optional[Callable[[], BaseException]] = None) -> None:
    """Awaits a thread-side callback registered with ``add_callback``."""
    done: "asyncio.Future[None]" = loop.create_future()

    def wake() -> None:
        if not done.done():
            done.set_result(None)

    def fire() -> None:
        try:
            loop.call_soon_threadsafe(wake)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass

    add_callback(fire)
    try:
        await asyncio.wait_for(done, timeout)
    except asyncio.TimeoutError:
        raise (make_err() if make_err is not None else err) from None  # type: ignore[misc]


class GroupResult:
    """The results of a group, in order. ``get()`` returns a list; the first failure raises."""

    def __init__(self, results: List[AsyncResult]) -> None:
        self.results = results

    @property
    def ids(self) -> List[int]:
        return [r.id for r in self.results]

    def __len__(self) -> int:
        return len(self.results)

    def __iter__(self):
        return iter(self.results)

    def get(self, timeout: Optional[float] = None) -> List[Any]:
        deadline = None if timeout is None else time.monotonic() + timeout
        out = []
        for r in self.results:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            out.append(r.get(left))
        return out

    async def aget(self, timeout: Optional[float] = None) -> List[Any]:
        """``get()`` for asyncio code."""
        try:
            return await asyncio.wait_for(
                asyncio.gather(*(r.aget() for r in self.results)), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"group not finished after {timeout}s") from None

    def cancel(self) -> None:
        for r in self.results:
            r.cancel()


# ============================================================================ tasks

_OPTION_NAMES = ("queue", "priority", "max_attempts", "timeout", "cpu", "mem", "resources",
                 "labels", "countdown", "key", "retry_backoff", "metadata")


class Task(Generic[R]):
    """A function registered with :meth:`App.task`. Calling it runs it locally."""

    def __init__(self, app: "App", fn: Callable[..., R], name: str, options: Dict[str, Any]) -> None:
        self.app = app
        self.fn = fn
        self.name = name
        self.options = options
        self._base = app._spec_options(name, options)  # validated once, copied per call
        self.__doc__ = fn.__doc__
        self.__wrapped__ = fn

    def __call__(self, *args: Any, **kwargs: Any) -> R:
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<Task {self.name}>"

    def s(self, *args: Any, **kwargs: Any) -> "Signature":
        """A signature (task + arguments) for canvases."""
        return Signature(self, args, kwargs, {})

    signature = s

    def delay(self, *args: Any, **kwargs: Any) -> AsyncResult[R]:
        return self.apply_async(args, kwargs)

    def apply_async(self, args: Sequence[Any] = (), kwargs: Optional[Dict[str, Any]] = None,
                    **options: Any) -> AsyncResult[R]:
        """Submits with per-call options: ``queue``, ``priority``, ``countdown`` (seconds),
        ``key`` (idempotency key), ``max_attempts``, ``timeout``, ``cpu``, ``mem``,
        ``resources``, ``labels``, ``metadata``."""
        spec = self.app._spec(self, args, kwargs, options, None)
        unit = _Unit([spec])
        self.app._submitter.submit(unit)
        return AsyncResult(self.app, unit)


class Signature:
    """A task with its arguments and options, not yet submitted (``task.s(...)``)."""

    def __init__(self, task: Task, args: Sequence[Any], kwargs: Dict[str, Any],
                 options: Dict[str, Any]) -> None:
        self.task = task
        self.args = tuple(args)
        self.kwargs = dict(kwargs)
        self.options = dict(options)

    def set(self, **options: Any) -> "Signature":
        """A copy with these options (``queue``, ``priority``, ...)."""
        for k in options:
            if k not in _OPTION_NAMES:
                raise TypeError(f"{self.task.name}: unknown option {k!r}")
        return Signature(self.task, self.args, self.kwargs, {**self.options, **options})

    def __repr__(self) -> str:
        return f"{self.task.name}.s{self.args!r}"

    def delay(self) -> AsyncResult:
        return self.task.apply_async(self.args, self.kwargs, **self.options)

    apply_async = delay


# ============================================================================ app

def _ms(name: str, seconds: Any) -> int:
    if seconds is None:
        return 0
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or seconds < 0:
        raise ValueError(f"{name} must be a number of seconds >= 0, got {seconds!r}")
    return int(round(seconds * 1000))


def _mem_mib(mem: Any) -> int:
    if mem is None:
        return 0
    if isinstance(mem, int) and not isinstance(mem, bool) and mem >= 0:
        return mem
    if isinstance(mem, str):
        try:
            return parse_mem_mib(mem)
        except ValueError as e:
            raise ValueError(f"mem: {e}") from None
    raise ValueError(f"mem must be MiB (int) or a size such as '512Mi' / '2GiB', got {mem!r}")


def _cpu_milli(cpu: Any) -> int:
    if cpu is None:
        return 0
    if isinstance(cpu, str):
        try:
            return parse_cpu_milli(cpu)
        except ValueError as e:
            raise ValueError(f"cpu: {e}") from None
    if isinstance(cpu, (int, float)) and not isinstance(cpu, bool) and cpu >= 0:
        return int(round(cpu * 1000))
    raise ValueError(f"cpu must be cores (e.g. 0.5) or millicores ('500m'), got {cpu!r}")


def _str_map(name: str, m: Any) -> Dict[str, str]:
    if m is None:
        return {}
    if not isinstance(m, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                          for k, v in m.items()):
        raise TypeError(f"{name} must be a dict of str to str, got {m!r}")
    return m


class App:
    """A raftsched application: where the cluster is, and the tasks it knows.

    ``endpoints`` defaults to ``SCHED_ENDPOINTS``; ``ca_cert`` (a PEM file; TLS when given)
    to ``SCHED_CA_CERT``; ``token`` (sent as ``authorization: Bearer``) to ``SCHED_TOKEN``.
    """

    def __init__(self, endpoints: "Optional[Union[str, Sequence[str]]]" = None, *,
                 ca_cert: Optional[str] = None, token: Optional[str] = None,
                 name: Optional[str] = None) -> None:
        self._conn = Connection(endpoints, ca_cert=ca_cert, token=token)
        self._waiter = Waiter(self._conn)
        self._submitter = _Submitter(self._conn, self._waiter)
        self._new_key_prefix()
        self.tasks: Dict[str, Task] = {}
        self.name = name

    @property
    def endpoints(self) -> List[str]:
        return list(self._conn.endpoints)

    def task(self, fn: Optional[Callable[..., Any]] = None, *, name: Optional[str] = None,
             **options: Any) -> Any:
        """Registers a function as a task (``@app.task`` or ``@app.task(queue=..., ...)``).

        Options: ``queue`` ("default"), ``priority`` (0; higher first), ``max_attempts`` (3),
        ``timeout`` (seconds per attempt), ``cpu`` (cores or "500m"), ``mem`` (MiB or "512Mi"),
        ``resources`` ({"gpu": 1}), ``labels`` (required worker labels), ``retry_backoff``
        (seconds before the first retry).
        """
        for k in options:
            if k not in _OPTION_NAMES:
                raise TypeError(f"app.task: unknown option {k!r}")

        def register(f: Callable[..., Any]) -> Task:
            tname = name or f"{f.__module__}.{f.__qualname__}"
            if "<" in tname:
                raise ValueError(f"app.task: {tname!r} is not importable; give name=")
            t = Task(self, f, tname, dict(options))  # validates the options now
            self.tasks[tname] = t
            return t

        return register(fn) if fn is not None else register

    def _spec_options(self, name: str, o: Dict[str, Any]) -> pb.TaskSpec:
        spec = pb.TaskSpec(name=name)
        q = o.get("queue", "default")
        if not isinstance(q, str) or not q:
            raise ValueError(f"{name}: queue must be a non-empty string, got {q!r}")
        spec.queue = q
        p = o.get("priority", 0)
        if not isinstance(p, int) or isinstance(p, bool) or not -(2**31) <= p < 2**31:
            raise ValueError(f"{name}: priority must be a 32-bit int, got {p!r}")
        spec.priority = p
        ma = o.get("max_attempts", 3)
        if not isinstance(ma, int) or isinstance(ma, bool) or ma < 1:
            raise ValueError(f"{name}: max_attempts must be an int >= 1, got {ma!r}")
        spec.retry.max_attempts = ma
        if "retry_backoff" in o:
            spec.retry.initial_backoff_ms = _ms(f"{name}: retry_backoff", o["retry_backoff"])
        spec.timeout_ms = _ms(f"{name}: timeout", o.get("timeout"))
        spec.delay_ms = _ms(f"{name}: countdown", o.get("countdown"))
        try:
            spec.resources.cpu_milli = _cpu_milli(o.get("cpu"))
            spec.resources.memory_mib = _mem_mib(o.get("mem"))
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        res = o.get("resources") or {}
        if not isinstance(res, dict) or not all(isinstance(k, str) and isinstance(v, int)
                                                and v >= 0 for k, v in res.items()):
            raise TypeError(f"{name}: resources must be a dict of str to int >= 0, got {res!r}")
        spec.resources.named.update(res)
        spec.labels.update(_str_map(f"{name}: labels", o.get("labels")))
        spec.metadata.update(_str_map(f"{name}: metadata", o.get("metadata")))
        key = o.get("key")
        if key is not None and (not isinstance(key, str) or not key):
            raise ValueError(f"{name}: key must be a non-empty string, got {key!r}")
        return spec

    def _new_key_prefix(self) -> None:
        self._key_pid = os.getpid()
        self._key_prefix = f"py:{uuid.uuid4().hex}:"
        self._key_seq = itertools.count(1)

    def _spec(self, task: Task, args: Sequence[Any], kwargs: Optional[Dict[str, Any]],
              options: Dict[str, Any], deps: Optional[str]) -> pb.TaskSpec:
        if options:
            for k in options:
                if k not in _OPTION_NAMES:
                    raise TypeError(f"{task.name}.apply_async: unknown option {k!r}")
            merged = {**task.options, **options}
            base = self._spec_options(task.name, merged)
            key = merged.get("key")
        else:
            base, key = task._base, task.options.get("key")
        payload = _codec.encode_call(task.name, args, kwargs, deps)
        spec = pb.TaskSpec()
        spec.CopyFrom(base)
        spec.payload = payload
        # Unique per call: this App's random prefix and a counter (a retried submit resends
        # the same spec, so the key is what makes it exactly-once).
        if not key:
            if os.getpid() != self._key_pid:  # a forked child must not reuse the parent's keys
                self._new_key_prefix()
            key = f"{self._key_prefix}{next(self._key_seq)}"
        spec.idempotency_key = key
        return spec

    def _submit_unit(self, specs: List[pb.TaskSpec]) -> _Unit:
        unit = _Unit(specs)
        self._submitter.submit(unit)
        return unit

    def get_result(self, task_id: int) -> AsyncResult:
        """An :class:`AsyncResult` for a task submitted earlier (by anyone)."""
        if not isinstance(task_id, int) or isinstance(task_id, bool) or task_id <= 0:
            raise ValueError(f"task_id must be a positive int, got {task_id!r}")
        return AsyncResult(self, task_id)

    AsyncResult = get_result

    def close(self) -> None:
        """Sends what is queued, then closes the connections."""
        self._submitter.close()
        self._waiter.close()
        self._conn.close()

    def __enter__(self) -> "App":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
