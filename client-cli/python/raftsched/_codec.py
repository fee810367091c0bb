"""JSON encoding of task inputs and results, with errors that name the offending argument."""

from __future__ import annotations

import json
from typing import Any, Dict, Optional, Sequence, Tuple


_dumps = json.JSONEncoder(allow_nan=False, separators=(",", ":")).encode


def _check(value: Any, where: str) -> None:
    try:
        _dumps(value)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{where} cannot be sent as JSON ({type(value).__name__}): {e}") from None


def encode_call(
    name: str, args: Sequence[Any], kwargs: Optional[Dict[str, Any]], deps: Optional[str]
) -> bytes:
    """The payload of a task: ``{"args": [...], "kwargs": {...}}`` (+ how to pass dependency
    results: ``"first"`` prepends the one result, ``"list"`` prepends a list of all)."""
    if not isinstance(args, (list, tuple)):
        raise TypeError(f"{name}: args must be a tuple or list, not {type(args).__name__}")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise TypeError(f"{name}: kwargs must be a dict, not {type(kwargs).__name__}")
    for k in kwargs or ():
        if not isinstance(k, str):
            raise TypeError(f"{name}: keyword argument names must be strings, got {k!r}")
    body: Dict[str, Any] = {"args": list(args), "kwargs": dict(kwargs or {})}
    if deps:
        body["deps"] = deps
    try:
        return _dumps(body).encode()
    except (TypeError, ValueError):
        pass
    # Name the argument that JSON cannot carry (only on this slow path).
    for i, a in enumerate(args):
        _check(a, f"{name}: argument {i}")
    for k, v in (kwargs or {}).items():
        _check(v, f"{name}: argument {k!r}")
    raise TypeError(f"{name}: the arguments cannot be sent as JSON")


def decode_call(payload: bytes) -> Tuple[list, dict, Optional[str]]:
    if not payload:
        return [], {}, None
    body = json.loads(payload)
    return list(body.get("args", [])), dict(body.get("kwargs", {})), body.get("deps")


def encode_result(name: str, value: Any) -> bytes:
    try:
        return _dumps(value).encode()
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"{name}: the return value cannot be sent as JSON ({type(value).__name__}): {e}"
        ) from None


def decode_result(data: bytes) -> Any:
    return json.loads(data) if data else None
