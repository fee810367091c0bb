"""Canvases: :func:`chain`, :func:`group`, :func:`chord`, submitted atomically as one DAG.

A canvas compiles to one SubmitTasks: every step is a TaskSpec and its dependencies are
``depends_on_batch`` positions. The worker passes dependency results in: after a single task a
step gets that result as its first argument; after a group it gets the list of the group's
results (in order) as its first argument.
"""

from __future__ import annotations

from typing import Any, Iterable, List, Optional, Tuple, Union

from ._pb import scheduler_pb2 as pb
from .client import App, AsyncResult, GroupResult, Signature

Node = Union[Signature, "chain", "group", "chord"]


class _Builder:
    def __init__(self) -> None:
        self.specs: List[pb.TaskSpec] = []
        self.app: Optional[App] = None

    def add(self, sig: Signature, after: List[int], after_group: bool) -> int:
        if self.app is None:
            self.app = sig.task.app
        elif sig.task.app is not self.app:
            raise ValueError("a canvas must use tasks of one App")
        deps = None
        if after:
            deps = "list" if after_group else "first"
        spec = self.app._spec(sig.task, sig.args, sig.kwargs, sig.options, deps)
        spec.depends_on_batch.extend(after)
        self.specs.append(spec)
        return len(self.specs) - 1


# A compiled node: its tail positions, whether it ends in a group, and a result shape
# (a position, or a list of shapes for a group).
Shape = Union[int, List[Any]]


def _compile(node: Any, b: _Builder, after: List[int], after_group: bool
             ) -> Tuple[List[int], bool, Shape]:
    if isinstance(node, Signature):
        i = b.add(node, after, after_group)
        return [i], False, i
    if isinstance(node, (chain, group, chord)):
        return node._compile(b, after, after_group)
    raise TypeError(f"canvas: expected a signature (task.s(...)), chain, group or chord, "
                    f"got {type(node).__name__}")


class _Canvas:
    def _compile(self, b: _Builder, after: List[int], after_group: bool
                 ) -> Tuple[List[int], bool, Shape]:
        raise NotImplementedError

    def delay(self) -> Union[AsyncResult, GroupResult]:
        """Submits the whole canvas in one request; the result of its last step(s)."""
        b = _Builder()
        _, _, shape = self._compile(b, [], False)
        if b.app is None:
            raise ValueError("canvas: nothing to submit (empty group?)")
        unit = b.app._submit_unit(b.specs)

        def build(s: Shape) -> Any:
            if isinstance(s, list):
                return GroupResult([build(x) for x in s])
            return AsyncResult(b.app, unit, s)  # type: ignore[arg-type]

        return build(shape)

    apply_async = delay


class chain(_Canvas):
    """Steps run one after another; each result is the next step's first argument."""

    def __init__(self, *steps: Any) -> None:
        if len(steps) == 1 and not isinstance(steps[0], (Signature, _Canvas)):
            steps = tuple(steps[0])
        if not steps:
            raise ValueError("chain: needs at least one step")
        self.steps = list(steps)

    def _compile(self, b, after, after_group):
        shape: Shape = []
        for s in self.steps:
            after, after_group, shape = _compile(s, b, after, after_group)
        return after, after_group, shape


class group(_Canvas):
    """Tasks run in parallel; the result is the list of their results, in order."""

    def __init__(self, *tasks: Any) -> None:
        if len(tasks) == 1 and not isinstance(tasks[0], (Signature, _Canvas)):
            tasks = tuple(tasks[0])
        self.tasks = list(tasks)
        if not self.tasks:
            raise ValueError("group: needs at least one task")

    def _compile(self, b, after, after_group):
        tails: List[int] = []
        shapes: List[Any] = []
        for t in self.tasks:
            tl, _, sh = _compile(t, b, after, after_group)
            tails.extend(tl)
            shapes.append(sh)
        return tails, True, shapes


class chord(_Canvas):
    """``chord(header_group, body)``: the body runs after every header task succeeded and
    gets the list of their results as its first argument."""

    def __init__(self, header: Any, body: Any = None) -> None:
        self.header = header if isinstance(header, group) else group(header)
        self.body = body

    def __call__(self, body: Any) -> "chord":
        return chord(self.header, body)

    def _compile(self, b, after, after_group):
        if self.body is None:
            raise ValueError("chord: needs a body (chord(group(...), task.s()))")
        tails, _, _ = self.header._compile(b, after, after_group)
        return _compile(self.body, b, tails, True)
