"""Connections to a raftsched cluster: endpoint rotation, leader hints, TLS and tokens.

Every node serves every RPC and forwards writes to the leader, so a call may go to any node.
A call answered UNAVAILABLE (no leader known yet, or the node is going away) is retried on the
node named by the ``x-raftsched-leader`` hint, else on the next endpoint, within a time budget.
Other errors are the caller's to handle.
"""

from __future__ import annotations

import os
import random
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import grpc

from ._pb import scheduler_pb2 as pb

LEADER_HINT_KEY = "x-raftsched-leader"
_RETRY_CODES = (grpc.StatusCode.UNAVAILABLE,)

# (service, method) -> (request class, response class, streaming?)
_METHODS: Dict[str, Tuple[str, Any, Any, bool]] = {
    "SubmitTasks": ("Tasks", pb.SubmitTasksRequest, pb.SubmitTasksResponse, False),
    "GetTask": ("Tasks", pb.GetTaskRequest, pb.Task, False),
    "ListTasks": ("Tasks", pb.ListTasksRequest, pb.ListTasksResponse, False),
    "CancelTasks": ("Tasks", pb.CancelTasksRequest, pb.CancelTasksResponse, False),
    "RetryTask": ("Tasks", pb.RetryTaskRequest, pb.RetryTaskResponse, False),
    "ExplainTask": ("Tasks", pb.ExplainTaskRequest, pb.ExplainTaskResponse, False),
    "WatchTask": ("Tasks", pb.WatchTaskRequest, pb.Task, True),
    "WatchEvents": ("Tasks", pb.WatchEventsRequest, pb.EventBatch, True),
    "RegisterWorker": ("Workers", pb.RegisterWorkerRequest, pb.RegisterWorkerResponse, False),
    "OpenAssignments": ("Workers", pb.OpenAssignmentsRequest, pb.WorkerMessage, True),
    "Heartbeat": ("Workers", pb.HeartbeatRequest, pb.HeartbeatResponse, False),
    "Report": ("Workers", pb.ReportRequest, pb.ReportResponse, False),
    "DrainWorker": ("Workers", pb.DrainWorkerRequest, pb.DrainWorkerResponse, False),
    "DeregisterWorker": ("Workers", pb.DeregisterWorkerRequest, pb.DeregisterWorkerResponse, False),
    "ListWorkers": ("Workers", pb.ListWorkersRequest, pb.ListWorkersResponse, False),
    "Status": ("Cluster", pb.ClusterStatusRequest, pb.ClusterStatusResponse, False),
    "InitCluster": ("Cluster", pb.InitClusterRequest, pb.InitClusterResponse, False),
    "CreateToken": ("Cluster", pb.CreateTokenRequest, pb.CreateTokenResponse, False),
}


def parse_endpoints(endpoints: "Optional[str | Sequence[str]]") -> List[str]:
    """``"h1:7001,h2:7001"`` or a list of ``host:port``; ``None`` reads ``SCHED_ENDPOINTS``."""
    if endpoints is None:
        endpoints = os.environ.get("SCHED_ENDPOINTS", "127.0.0.1:7001")
    if isinstance(endpoints, str):
        items = [e.strip() for e in endpoints.split(",")]
    else:
        items = [str(e).strip() for e in endpoints]
    items = [e for e in items if e]
    if not items:
        raise ValueError("endpoints: no endpoint given (expected host:port[,host:port...])")
    for e in items:
        host, sep, port = e.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"endpoints: {e!r} is not host:port")
    return items


def _hint_addr(err: grpc.RpcError) -> Optional[str]:
    try:
        md = err.trailing_metadata() or ()  # type: ignore[attr-defined]
    except Exception:
        return None
    for k, v in md:
        if k == LEADER_HINT_KEY:
            v = v.decode() if isinstance(v, bytes) else v
            _, _, addr = v.partition("@")
            return addr or None
    return None


class Connection:
    """A set of channels to the cluster's nodes, shared by clients and workers (thread-safe)."""

    def __init__(
        self,
        endpoints: "Optional[str | Sequence[str]]" = None,
        ca_cert: Optional[str] = None,
        token: Optional[str] = None,
    ) -> None:
        self.endpoints = parse_endpoints(endpoints)
        ca_cert = ca_cert if ca_cert is not None else os.environ.get("SCHED_CA_CERT") or None
        token = token if token is not None else os.environ.get("SCHED_TOKEN") or None
        self._creds: Optional[grpc.ChannelCredentials] = None
        if ca_cert:
            try:
                with open(ca_cert, "rb") as f:
                    self._creds = grpc.ssl_channel_credentials(root_certificates=f.read())
            except OSError as e:
                raise ValueError(f"ca_cert: cannot read {ca_cert!r}: {e}") from None
        if token is not None and not token.strip():
            raise ValueError("token: empty")
        self._metadata: Tuple[Tuple[str, str], ...] = (
            (("authorization", f"Bearer {token.strip()}"),) if token else ()
        )
        self._lock = threading.Lock()
        self._channels: Dict[str, grpc.Channel] = {}
        self._current = random.randrange(len(self.endpoints))
        self._preferred: Optional[str] = None
        self._closed = False

    # ------------------------------------------------------------------ channels
    def _channel(self, addr: str) -> grpc.Channel:
        with self._lock:
            ch = self._channels.get(addr)
            if ch is None:
                opts = [
                    ("grpc.max_receive_message_length", 64 << 20),
                    ("grpc.keepalive_time_ms", 10_000),
                    ("grpc.keepalive_timeout_ms", 5_000),
                    ("grpc.initial_reconnect_backoff_ms", 100),
                    ("grpc.max_reconnect_backoff_ms", 1_000),
                ]
                if self._creds is not None:
                    ch = grpc.secure_channel(addr, self._creds, options=opts)
                else:
                    ch = grpc.insecure_channel(addr, options=opts)
                self._channels[addr] = ch
            return ch

    def _pick(self) -> str:
        with self._lock:
            if self._preferred:
                return self._preferred
            return self.endpoints[self._current % len(self.endpoints)]

    def _failed(self, addr: str, hint: Optional[str]) -> None:
        with self._lock:
            if hint and hint != addr:
                self._preferred = hint
            else:
                self._preferred = None
                self._current = (self._current + 1) % len(self.endpoints)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            chans, self._channels = list(self._channels.values()), {}
        for c in chans:
            c.close()

    # ------------------------------------------------------------------ calls
    def _callable(self, addr: str, method: str) -> Callable[..., Any]:
        service, req_cls, resp_cls, streaming = _METHODS[method]
        path = f"/scheduler.v1.{service}/{method}"
        ch = self._channel(addr)
        make = ch.unary_stream if streaming else ch.unary_unary
        return make(path, request_serializer=req_cls.SerializeToString,
                    response_deserializer=resp_cls.FromString)

    def call(
        self,
        method: str,
        request: Any,
        *,
        budget: float = 30.0,
        timeout: float = 10.0,
        retry_codes: Sequence[grpc.StatusCode] = _RETRY_CODES,
    ) -> Any:
        """One unary call, retried on UNAVAILABLE (and ``retry_codes``) for up to ``budget`` s."""
        deadline = time.monotonic() + budget
        delay = 0.02
        while True:
            addr = self._pick()
            try:
                left = max(0.05, min(timeout, deadline - time.monotonic()))
                return self._callable(addr, method)(request, timeout=left, metadata=self._metadata)
            except grpc.RpcError as e:
                code = e.code()  # type: ignore[attr-defined]
                retry = code in retry_codes or (
                    code == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() < deadline
                )
                if not retry or time.monotonic() + delay >= deadline:
                    raise
                self._failed(addr, _hint_addr(e))
                time.sleep(delay)
                delay = min(delay * 2, 0.5)

    def stream(self, method: str, request: Any, timeout: Optional[float] = None) -> Iterator[Any]:
        """Opens a server stream on the current node (the caller reopens it when it ends)."""
        addr = self._pick()
        try:
            return self._callable(addr, method)(request, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            self._failed(addr, _hint_addr(e))
            raise

    def stream_failed(self, err: Optional[grpc.RpcError]) -> None:
        """Moves on from the current node after its stream failed."""
        self._failed(self._pick(), _hint_addr(err) if err is not None else None)
