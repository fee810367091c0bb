"""Exceptions raised by the SDK. Every task outcome error derives from :class:`TaskError`."""

from __future__ import annotations

from typing import Optional


class RaftschedError(Exception):
    """Base of every error this package raises on purpose."""


class SubmitError(RaftschedError):
    """The cluster refused a submit (bad spec, limits, permissions) or could not be reached."""


class TaskError(RaftschedError):
    """A task ended without a result. ``task_id`` names it."""

    def __init__(self, task_id: int, message: str) -> None:
        super().__init__(message)
        self.task_id = task_id


class TaskFailed(TaskError):
    """The task raised (on its last attempt) or timed out.

    ``exc_type``, ``exc_message`` and ``traceback`` describe the remote exception;
    ``kind`` is the server's failure kind (``error``, ``fatal error``, ``timeout``, ``worker lost``).
    """

    def __init__(
        self,
        task_id: int,
        exc_type: str,
        exc_message: str,
        traceback: str = "",
        kind: str = "error",
        attempt: int = 0,
    ) -> None:
        super().__init__(task_id, f"task {task_id} failed: {exc_type}: {exc_message}")
        self.exc_type = exc_type
        self.exc_message = exc_message
        self.traceback = traceback
        self.kind = kind
        self.attempt = attempt


class TaskCancelled(TaskError):
    """The task was cancelled; ``reason`` says why."""

    def __init__(self, task_id: int, reason: str) -> None:
        super().__init__(task_id, f"task {task_id} was cancelled: {reason or 'no reason given'}")
        self.reason = reason


class UpstreamFailed(TaskError):
    """A dependency of the task did not succeed, so it never ran; ``upstream`` names it."""

    def __init__(self, task_id: int, upstream: Optional[int]) -> None:
        super().__init__(task_id, f"task {task_id} cannot run: its dependency {upstream} did not succeed")
        self.upstream = upstream
