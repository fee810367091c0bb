"""raftsched: a Python client and worker for the raftsched task scheduler."""

from ._context import TaskContext, current_task
from .canvas import chain, chord, group
from .client import App, AsyncResult, GroupResult, Signature, Task
from .errors import (RaftschedError, SubmitError, TaskCancelled, TaskError, TaskFailed,
                     UpstreamFailed)

__all__ = ["App", "AsyncResult", "GroupResult", "Signature", "Task", "chain", "group", "chord",
           "current_task", "TaskContext", "RaftschedError", "SubmitError", "TaskError",
           "TaskFailed", "TaskCancelled", "UpstreamFailed"]
__version__ = "0.1.0"
