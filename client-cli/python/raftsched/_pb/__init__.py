"""The generated protobuf module, ``scheduler_pb2`` (protoc output, committed; the Rust test
``committed_python_stubs_match_the_proto`` keeps it fresh).

That module asks for the protobuf runtime it was generated for (7.x, which needs Python >=
3.10). With an older runtime (the newest for Python 3.9 is 6.x) the same message classes are
built here from the serialized file descriptor inside it, which any protobuf >= 4.21 loads:
the wire format and the classes' API are the same.
"""

from __future__ import annotations

import ast
import os
import sys
import types


def _from_descriptor() -> types.ModuleType:
    from google.protobuf import descriptor_pool
    from google.protobuf.internal import builder

    name = __name__ + ".scheduler_pb2"
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scheduler_pb2.py")
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    data = None
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "AddSerializedFile":
            data = ast.literal_eval(node.args[0])
    if not isinstance(data, bytes):
        raise ImportError(f"{path}: no serialized descriptor found (regenerate it with protoc)")
    mod = types.ModuleType(name)
    mod.__file__ = path
    g = mod.__dict__
    g["DESCRIPTOR"] = descriptor_pool.Default().AddSerializedFile(data)
    builder.BuildMessageAndEnumDescriptors(g["DESCRIPTOR"], g)
    builder.BuildTopDescriptorsAndMessages(g["DESCRIPTOR"], "scheduler.v1.scheduler_pb2", g)
    sys.modules[name] = mod
    return mod


def _load() -> "tuple[types.ModuleType, bool]":
    """The module, and whether it was built from the descriptor (an older runtime)."""
    try:
        from . import scheduler_pb2
        return scheduler_pb2, False
    except ImportError:  # protobuf < 5.26: no runtime_version module
        pass
    except Exception as e:  # runtime_version.VersionError: an older major version
        if type(e).__name__ != "VersionError":
            raise
    return _from_descriptor(), True


scheduler_pb2, FROM_DESCRIPTOR = _load()
