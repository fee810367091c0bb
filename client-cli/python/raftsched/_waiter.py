"""Waiting for many results at once: one event stream and batched reads for a whole App.

Each id an :class:`~raftsched.AsyncResult` knows gets a :class:`Slot` in its App's waiter,
held weakly (a result nobody references any more is forgotten). Results are tracked from the
submit's acknowledgement on, but the waiter only starts at the first wait (an App that never
waits costs nothing here). Once started it:

- watches one WatchEvents stream (any node) for terminal states of tracked ids;
- reads finished tasks back in batches: ListTasks over ranges of nearby ids, GetTask for lone
  ones. The reads are linearizable, so a task seen finished by one node is found finished;
- sweeps every tracked id when the stream (re)opens, on its first message, and every
  ``SWEEP_EVERY`` seconds, so no result depends on one event arriving (a reconnect can miss
  some). A sweep is cheap: a range read skips the unfinished tasks on the server. A periodic
  sweep that finds nothing doubles the period (up to ``SWEEP_MAX``); a reconnect resets it.

A terminal state changes only by an explicit retry, which gives the id a fresh slot
(:meth:`Waiter.reset`); a filled slot is final.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import weakref
from typing import Any, Callable, Iterable, List, Optional, Sequence, Set

import grpc

from ._pb import scheduler_pb2 as pb

log = logging.getLogger("raftsched.client")

TERMINAL = frozenset({
    pb.TASK_STATE_SUCCEEDED,
    pb.TASK_STATE_FAILED,
    pb.TASK_STATE_CANCELLED,
    pb.TASK_STATE_UPSTREAM_FAILED,
})
_TERMINAL_LIST = sorted(TERMINAL)
SWEEP_EVERY = 2.0
SWEEP_MAX = 30.0
# Ids closer than this are read with one ranged ListTasks (wider in sweeps, which read many
# unfinished ids); a range needs RANGE_MIN ids, fewer are read one by one.
RANGE_GAP = 64
SWEEP_GAP = 1024
RANGE_MIN = 3
# Tasks per ListTasks page: results are at most 64 KiB by default, so a page stays < 32 MiB.
LIST_LIMIT = 256
# Lone long-pending ids checked one by one per sweep (finds purged or unknown ids).
CHECK_OLD_AFTER = 10.0
CHECK_OLD_MAX = 64
_STREAM_RETRY = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                 grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL,
                 grpc.StatusCode.OUT_OF_RANGE)

_cb_lock = threading.Lock()


class Slot:
    """The outcome of one task id: the terminal ``task``, or the ``error`` that reading it
    raised (for example NOT_FOUND). ``done`` turns True once, when either is set."""

    __slots__ = ("id", "task", "error", "done", "since", "_waiters", "__weakref__")

    def __init__(self, task_id: int) -> None:
        self.id = task_id
        self.task: Optional[pb.Task] = None
        self.error: Optional[BaseException] = None
        self.done = False
        self.since = time.monotonic()
        self._waiters: Optional[List[Callable[[], None]]] = None

    def wait(self, timeout: Optional[float]) -> bool:
        if self.done:
            return True
        ev = threading.Event()
        self.add_callback(ev.set)
        return ev.wait(timeout)

    def fill(self, task: Optional[pb.Task] = None, error: Optional[BaseException] = None) -> None:
        with _cb_lock:
            if self.done:
                return
            self.task, self.error = task, error
            self.done = True
            cbs, self._waiters = self._waiters, None
        for cb in cbs or ():
            try:
                cb()
            except Exception:  # a callback's failure must not stop the waiter
                log.exception("result callback failed")

    def add_callback(self, cb: Callable[[], None]) -> None:
        """Calls ``cb()`` once the slot is filled (now, if it is already)."""
        with _cb_lock:
            if not self.done:
                if self._waiters is None:
                    self._waiters = []
                self._waiters.append(cb)
                return
        cb()


class Waiter:
    """The slots of one App and the two threads that fill them (thread-safe)."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self._slots: "weakref.WeakValueDictionary[int, Slot]" = weakref.WeakValueDictionary()
        self._lock = threading.Lock()
        # Ids to read: an int (from an event), a list (newly tracked), or None (a wake-up).
        self._todo: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
        self._sweep = threading.Event()
        self._started = False
        self._closed = False
        self._call: Any = None
        self._filled = 0

    # ------------------------------------------------------------------ public
    def slot(self, task_id: int) -> Slot:
        """The slot of ``task_id`` (one per id while anyone holds it)."""
        return self.track((task_id,))[0]

    def track(self, ids: Sequence[int]) -> List[Slot]:
        """The slots of ``ids``; a running waiter checks new ones at once (a task may have
        finished before anyone tracked it)."""
        out = []
        fresh = []
        with self._lock:
            slots = self._slots
            for i in ids:
                s = slots.get(i)
                if s is None:
                    s = slots[i] = Slot(i)
                    fresh.append(i)
                out.append(s)
            started = self._started
        if started and fresh:
            self._todo.put(fresh)
        return out

    def reset(self, task_id: int) -> Slot:
        """A fresh slot for a task that runs again after a retry. Whoever holds the old slot
        keeps the outcome it saw. Slots are only filled from linearizable reads made after
        this, so an event of the earlier run cannot fill the new slot."""
        with self._lock:
            s = self._slots[task_id] = Slot(task_id)
            started = self._started
        if started:
            self._todo.put([task_id])
        return s

    def start(self) -> None:
        with self._lock:
            if self._started or self._closed:
                return
            self._started = True
        self._sweep.set()
        threading.Thread(target=self._fetch_loop, name="raftsched-results", daemon=True).start()
        threading.Thread(target=self._stream_loop, name="raftsched-events", daemon=True).start()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            call = self._call
        self._todo.put(None)
        if call is not None:
            call.cancel()

    # ------------------------------------------------------------------ threads
    def _pending(self) -> List[Slot]:
        with self._lock:
            return [s for s in self._slots.values() if not s.done]

    def _stream_loop(self) -> None:
        delay = 0.05
        slots = self._slots
        while not self._closed:
            err: Optional[grpc.RpcError] = None
            try:
                call = self._conn.stream("WatchEvents", pb.WatchEventsRequest(from_index=0))
                with self._lock:
                    self._call = call
                if self._closed:
                    call.cancel()
                    return
                self._sweep.set()
                self._todo.put(None)
                first = True
                for batch in call:
                    delay = 0.05
                    if first:
                        # Anything applied before the stream's start is older than this.
                        first = False
                        self._sweep.set()
                        self._todo.put(None)
                    for e in batch.events:
                        if e.state in TERMINAL:
                            s = slots.get(e.task)
                            if s is not None and not s.done:
                                self._todo.put(e.task)
            except grpc.RpcError as e:
                err = e
                code = e.code()  # type: ignore[attr-defined]
                if code not in _STREAM_RETRY:
                    log.warning("result events refused (%s); using periodic reads", code)
                    delay = 5.0
            except Exception:  # never let the thread die: sweeps go on meanwhile
                log.exception("result event stream failed")
            if self._closed:
                return
            self._conn.stream_failed(err)
            time.sleep(delay)
            delay = min(delay * 2, 5.0 if delay >= 5.0 else 1.0)

    def _fetch_loop(self) -> None:
        last_sweep = 0.0
        every = SWEEP_EVERY
        while True:
            ids: Set[int] = set()
            try:
                item = self._todo.get(timeout=every)
                while True:
                    if isinstance(item, int):
                        ids.add(item)
                    elif item is not None:
                        ids.update(item)
                    item = self._todo.get_nowait()
            except queue.Empty:
                pass
            if self._closed:
                return
            now = time.monotonic()
            old: List[Slot] = []
            asked = self._sweep.is_set()
            sweep = asked or now - last_sweep >= every
            if sweep:
                self._sweep.clear()
                last_sweep = now
                pending = self._pending()
                ids.update(s.id for s in pending)
                old = sorted((s for s in pending if now - s.since > CHECK_OLD_AFTER),
                             key=lambda s: s.since)[:CHECK_OLD_MAX]
            if ids:
                filled = self._filled
                try:
                    self._read(ids, SWEEP_GAP if sweep else RANGE_GAP)
                    for s in old:
                        if not s.done:
                            self._read_one(s.id)
                except Exception as e:  # retried by the next sweep
                    log.warning("reading results failed (%r); retrying", e)
                    self._sweep.set()
                    time.sleep(0.1)
                if sweep:
                    every = SWEEP_EVERY if asked or self._filled > filled else \
                        min(every * 2, SWEEP_MAX)

    # ------------------------------------------------------------------ reads
    def _fill(self, t: pb.Task) -> None:
        s = self._slots.get(t.id)
        if s is not None and t.state in TERMINAL and not s.done:
            self._filled += 1
            s.fill(task=t)

    def _read(self, ids: Iterable[int], gap: int) -> None:
        slots = self._slots
        todo = sorted(i for i in ids if _pending(slots, i))
        run: List[int] = []
        for i in todo:
            if run and i - run[-1] > gap:
                self._read_run(run)
                run = []
            run.append(i)
        if run:
            self._read_run(run)

    def _read_run(self, run: List[int]) -> None:
        if len(run) < RANGE_MIN:
            for i in run:
                self._read_one(i)
            return
        lo, hi = run[0], run[-1]
        token = lo - 1
        while True:
            resp = self._conn.call("ListTasks", pb.ListTasksRequest(
                states=_TERMINAL_LIST, page_token=token, limit=LIST_LIMIT,
                include_payload=True))
            for t in resp.tasks:
                if t.id > hi:
                    return
                self._fill(t)
            token = resp.next_page_token
            if not token or token >= hi:
                return

    def _read_one(self, task_id: int) -> None:
        try:
            t = self._conn.call("GetTask", pb.GetTaskRequest(id=task_id))
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:  # type: ignore[attr-defined]
                s = self._slots.get(task_id)
                if s is not None:
                    s.fill(error=e)
                return
            raise
        self._fill(t)


def _pending(slots: "weakref.WeakValueDictionary[int, Slot]", i: int) -> bool:
    s = slots.get(i)
    return s is not None and not s.done
