"""``current_task()``: who is running, so task code can fence its own side effects."""

from __future__ import annotations

import contextvars
import threading
from dataclasses import dataclass, field
from typing import Dict, Optional


@dataclass(frozen=True)
class TaskContext:
    """The attempt being run: ``id`` (task id), ``attempt`` (1-based), ``fence`` (a token that
    grows with every attempt: store it next to side effects and refuse older ones), ``name``,
    ``deadline_ms`` (unix ms, 0 = none), ``metadata``."""

    id: int
    attempt: int
    fence: int
    name: str
    worker: str
    deadline_ms: int = 0
    metadata: Dict[str, str] = field(default_factory=dict)
    cancelled: Optional[threading.Event] = field(default=None, compare=False, repr=False)

    @property
    def is_cancelled(self) -> bool:
        """True once the worker was told to stop this attempt (revoked, timed out, draining)."""
        return bool(self.cancelled and self.cancelled.is_set())


_current: "contextvars.ContextVar[Optional[TaskContext]]" = contextvars.ContextVar(
    "raftsched_current_task", default=None
)


def current_task() -> TaskContext:
    """The attempt being run by this thread / process; ``RuntimeError`` outside a task."""
    ctx = _current.get()
    if ctx is None:
        raise RuntimeError("current_task() called outside a running raftsched task")
    return ctx
