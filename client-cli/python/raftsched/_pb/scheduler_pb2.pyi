from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TaskState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_STATE_UNSPECIFIED: _ClassVar[TaskState]
    TASK_STATE_WAITING: _ClassVar[TaskState]
    TASK_STATE_QUEUED: _ClassVar[TaskState]
    TASK_STATE_DELAYED: _ClassVar[TaskState]
    TASK_STATE_ASSIGNED: _ClassVar[TaskState]
    TASK_STATE_RUNNING: _ClassVar[TaskState]
    TASK_STATE_SUCCEEDED: _ClassVar[TaskState]
    TASK_STATE_FAILED: _ClassVar[TaskState]
    TASK_STATE_CANCELLED: _ClassVar[TaskState]
    TASK_STATE_UPSTREAM_FAILED: _ClassVar[TaskState]
TASK_STATE_UNSPECIFIED: TaskState
TASK_STATE_WAITING: TaskState
TASK_STATE_QUEUED: TaskState
TASK_STATE_DELAYED: TaskState
TASK_STATE_ASSIGNED: TaskState
TASK_STATE_RUNNING: TaskState
TASK_STATE_SUCCEEDED: TaskState
TASK_STATE_FAILED: TaskState
TASK_STATE_CANCELLED: TaskState
TASK_STATE_UPSTREAM_FAILED: TaskState

class Resources(_message.Message):
    __slots__ = ("cpu_milli", "memory_mib", "named")
    class NamedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    CPU_MILLI_FIELD_NUMBER: _ClassVar[int]
    MEMORY_MIB_FIELD_NUMBER: _ClassVar[int]
    NAMED_FIELD_NUMBER: _ClassVar[int]
    cpu_milli: int
    memory_mib: int
    named: _containers.ScalarMap[str, int]
    def __init__(self, cpu_milli: _Optional[int] = ..., memory_mib: _Optional[int] = ..., named: _Optional[_Mapping[str, int]] = ...) -> None: ...

class RetryPolicy(_message.Message):
    __slots__ = ("max_attempts", "initial_backoff_ms", "multiplier_permille", "max_backoff_ms")
    MAX_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    INITIAL_BACKOFF_MS_FIELD_NUMBER: _ClassVar[int]
    MULTIPLIER_PERMILLE_FIELD_NUMBER: _ClassVar[int]
    MAX_BACKOFF_MS_FIELD_NUMBER: _ClassVar[int]
    max_attempts: int
    initial_backoff_ms: int
    multiplier_permille: int
    max_backoff_ms: int
    def __init__(self, max_attempts: _Optional[int] = ..., initial_backoff_ms: _Optional[int] = ..., multiplier_permille: _Optional[int] = ..., max_backoff_ms: _Optional[int] = ...) -> None: ...

class TaskSpec(_message.Message):
    __slots__ = ("name", "payload", "queue", "priority", "depends_on", "depends_on_batch", "resources", "labels", "retry", "timeout_ms", "not_before_ms", "delay_ms", "metadata", "idempotency_key")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    DEPENDS_ON_FIELD_NUMBER: _ClassVar[int]
    DEPENDS_ON_BATCH_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    RETRY_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    NOT_BEFORE_MS_FIELD_NUMBER: _ClassVar[int]
    DELAY_MS_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    name: str
    payload: bytes
    queue: str
    priority: int
    depends_on: _containers.RepeatedScalarFieldContainer[int]
    depends_on_batch: _containers.RepeatedScalarFieldContainer[int]
    resources: Resources
    labels: _containers.ScalarMap[str, str]
    retry: RetryPolicy
    timeout_ms: int
    not_before_ms: int
    delay_ms: int
    metadata: _containers.ScalarMap[str, str]
    idempotency_key: str
    def __init__(self, name: _Optional[str] = ..., payload: _Optional[bytes] = ..., queue: _Optional[str] = ..., priority: _Optional[int] = ..., depends_on: _Optional[_Iterable[int]] = ..., depends_on_batch: _Optional[_Iterable[int]] = ..., resources: _Optional[_Union[Resources, _Mapping]] = ..., labels: _Optional[_Mapping[str, str]] = ..., retry: _Optional[_Union[RetryPolicy, _Mapping]] = ..., timeout_ms: _Optional[int] = ..., not_before_ms: _Optional[int] = ..., delay_ms: _Optional[int] = ..., metadata: _Optional[_Mapping[str, str]] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class AttemptFailure(_message.Message):
    __slots__ = ("attempt", "fence", "worker", "kind", "message", "at_ms")
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    FENCE_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    AT_MS_FIELD_NUMBER: _ClassVar[int]
    attempt: int
    fence: int
    worker: str
    kind: str
    message: str
    at_ms: int
    def __init__(self, attempt: _Optional[int] = ..., fence: _Optional[int] = ..., worker: _Optional[str] = ..., kind: _Optional[str] = ..., message: _Optional[str] = ..., at_ms: _Optional[int] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("id", "spec", "state", "submitted_at_ms", "updated_at_ms", "attempt", "fence", "worker", "assigned_at_ms", "started_at_ms", "deadline_ms", "until_ms", "finished_at_ms", "result", "cancel_reason", "upstream", "last_failure")
    ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SUBMITTED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    FENCE_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    ASSIGNED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    UNTIL_MS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    CANCEL_REASON_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_FIELD_NUMBER: _ClassVar[int]
    LAST_FAILURE_FIELD_NUMBER: _ClassVar[int]
    id: int
    spec: TaskSpec
    state: TaskState
    submitted_at_ms: int
    updated_at_ms: int
    attempt: int
    fence: int
    worker: str
    assigned_at_ms: int
    started_at_ms: int
    deadline_ms: int
    until_ms: int
    finished_at_ms: int
    result: bytes
    cancel_reason: str
    upstream: int
    last_failure: AttemptFailure
    def __init__(self, id: _Optional[int] = ..., spec: _Optional[_Union[TaskSpec, _Mapping]] = ..., state: _Optional[_Union[TaskState, str]] = ..., submitted_at_ms: _Optional[int] = ..., updated_at_ms: _Optional[int] = ..., attempt: _Optional[int] = ..., fence: _Optional[int] = ..., worker: _Optional[str] = ..., assigned_at_ms: _Optional[int] = ..., started_at_ms: _Optional[int] = ..., deadline_ms: _Optional[int] = ..., until_ms: _Optional[int] = ..., finished_at_ms: _Optional[int] = ..., result: _Optional[bytes] = ..., cancel_reason: _Optional[str] = ..., upstream: _Optional[int] = ..., last_failure: _Optional[_Union[AttemptFailure, _Mapping]] = ...) -> None: ...

class SubmitTasksRequest(_message.Message):
    __slots__ = ("tasks",)
    TASKS_FIELD_NUMBER: _ClassVar[int]
    tasks: _containers.RepeatedCompositeFieldContainer[TaskSpec]
    def __init__(self, tasks: _Optional[_Iterable[_Union[TaskSpec, _Mapping]]] = ...) -> None: ...

class SubmittedTask(_message.Message):
    __slots__ = ("id", "created", "state")
    ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    id: int
    created: bool
    state: TaskState
    def __init__(self, id: _Optional[int] = ..., created: _Optional[bool] = ..., state: _Optional[_Union[TaskState, str]] = ...) -> None: ...

class SubmitTasksResponse(_message.Message):
    __slots__ = ("tasks", "log_index")
    TASKS_FIELD_NUMBER: _ClassVar[int]
    LOG_INDEX_FIELD_NUMBER: _ClassVar[int]
    tasks: _containers.RepeatedCompositeFieldContainer[SubmittedTask]
    log_index: int
    def __init__(self, tasks: _Optional[_Iterable[_Union[SubmittedTask, _Mapping]]] = ..., log_index: _Optional[int] = ...) -> None: ...

class GetTaskRequest(_message.Message):
    __slots__ = ("id", "stale_ok")
    ID_FIELD_NUMBER: _ClassVar[int]
    STALE_OK_FIELD_NUMBER: _ClassVar[int]
    id: int
    stale_ok: bool
    def __init__(self, id: _Optional[int] = ..., stale_ok: _Optional[bool] = ...) -> None: ...

class ListTasksRequest(_message.Message):
    __slots__ = ("states", "queue", "name", "page_token", "limit", "stale_ok", "include_payload", "newest_first", "created_since_ms")
    STATES_FIELD_NUMBER: _ClassVar[int]
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    STALE_OK_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    NEWEST_FIRST_FIELD_NUMBER: _ClassVar[int]
    CREATED_SINCE_MS_FIELD_NUMBER: _ClassVar[int]
    states: _containers.RepeatedScalarFieldContainer[TaskState]
    queue: str
    name: str
    page_token: int
    limit: int
    stale_ok: bool
    include_payload: bool
    newest_first: bool
    created_since_ms: int
    def __init__(self, states: _Optional[_Iterable[_Union[TaskState, str]]] = ..., queue: _Optional[str] = ..., name: _Optional[str] = ..., page_token: _Optional[int] = ..., limit: _Optional[int] = ..., stale_ok: _Optional[bool] = ..., include_payload: _Optional[bool] = ..., newest_first: _Optional[bool] = ..., created_since_ms: _Optional[int] = ...) -> None: ...

class ListTasksResponse(_message.Message):
    __slots__ = ("tasks", "next_page_token", "remaining", "remaining_is_lower_bound")
    TASKS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    REMAINING_FIELD_NUMBER: _ClassVar[int]
    REMAINING_IS_LOWER_BOUND_FIELD_NUMBER: _ClassVar[int]
    tasks: _containers.RepeatedCompositeFieldContainer[Task]
    next_page_token: int
    remaining: int
    remaining_is_lower_bound: bool
    def __init__(self, tasks: _Optional[_Iterable[_Union[Task, _Mapping]]] = ..., next_page_token: _Optional[int] = ..., remaining: _Optional[int] = ..., remaining_is_lower_bound: _Optional[bool] = ...) -> None: ...

class CancelTasksRequest(_message.Message):
    __slots__ = ("ids", "reason")
    IDS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    reason: str
    def __init__(self, ids: _Optional[_Iterable[int]] = ..., reason: _Optional[str] = ...) -> None: ...

class CancelResult(_message.Message):
    __slots__ = ("id", "ok", "already_cancelled", "upstream_failed", "error")
    ID_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    ALREADY_CANCELLED_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_FAILED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    id: int
    ok: bool
    already_cancelled: bool
    upstream_failed: _containers.RepeatedScalarFieldContainer[int]
    error: str
    def __init__(self, id: _Optional[int] = ..., ok: _Optional[bool] = ..., already_cancelled: _Optional[bool] = ..., upstream_failed: _Optional[_Iterable[int]] = ..., error: _Optional[str] = ...) -> None: ...

class CancelTasksResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[CancelResult]
    def __init__(self, results: _Optional[_Iterable[_Union[CancelResult, _Mapping]]] = ...) -> None: ...

class ExplainTaskRequest(_message.Message):
    __slots__ = ("id", "stale_ok")
    ID_FIELD_NUMBER: _ClassVar[int]
    STALE_OK_FIELD_NUMBER: _ClassVar[int]
    id: int
    stale_ok: bool
    def __init__(self, id: _Optional[int] = ..., stale_ok: _Optional[bool] = ...) -> None: ...

class ExplainTaskResponse(_message.Message):
    __slots__ = ("id", "state", "summary", "waiting_on", "ahead", "blocker", "until_ms", "worker", "attempt", "fence", "last_failure")
    ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    WAITING_ON_FIELD_NUMBER: _ClassVar[int]
    AHEAD_FIELD_NUMBER: _ClassVar[int]
    BLOCKER_FIELD_NUMBER: _ClassVar[int]
    UNTIL_MS_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    FENCE_FIELD_NUMBER: _ClassVar[int]
    LAST_FAILURE_FIELD_NUMBER: _ClassVar[int]
    id: int
    state: TaskState
    summary: str
    waiting_on: _containers.RepeatedScalarFieldContainer[int]
    ahead: int
    blocker: str
    until_ms: int
    worker: str
    attempt: int
    fence: int
    last_failure: AttemptFailure
    def __init__(self, id: _Optional[int] = ..., state: _Optional[_Union[TaskState, str]] = ..., summary: _Optional[str] = ..., waiting_on: _Optional[_Iterable[int]] = ..., ahead: _Optional[int] = ..., blocker: _Optional[str] = ..., until_ms: _Optional[int] = ..., worker: _Optional[str] = ..., attempt: _Optional[int] = ..., fence: _Optional[int] = ..., last_failure: _Optional[_Union[AttemptFailure, _Mapping]] = ...) -> None: ...

class RetryTaskRequest(_message.Message):
    __slots__ = ("id", "with_dependents")
    ID_FIELD_NUMBER: _ClassVar[int]
    WITH_DEPENDENTS_FIELD_NUMBER: _ClassVar[int]
    id: int
    with_dependents: bool
    def __init__(self, id: _Optional[int] = ..., with_dependents: _Optional[bool] = ...) -> None: ...

class RetriedTask(_message.Message):
    __slots__ = ("id", "state")
    ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    id: int
    state: TaskState
    def __init__(self, id: _Optional[int] = ..., state: _Optional[_Union[TaskState, str]] = ...) -> None: ...

class RetryTaskResponse(_message.Message):
    __slots__ = ("tasks", "log_index")
    TASKS_FIELD_NUMBER: _ClassVar[int]
    LOG_INDEX_FIELD_NUMBER: _ClassVar[int]
    tasks: _containers.RepeatedCompositeFieldContainer[RetriedTask]
    log_index: int
    def __init__(self, tasks: _Optional[_Iterable[_Union[RetriedTask, _Mapping]]] = ..., log_index: _Optional[int] = ...) -> None: ...

class QueueInfo(_message.Message):
    __slots__ = ("name", "paused", "paused_since_ms", "queued", "workers")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PAUSED_FIELD_NUMBER: _ClassVar[int]
    PAUSED_SINCE_MS_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    name: str
    paused: bool
    paused_since_ms: int
    queued: int
    workers: int
    def __init__(self, name: _Optional[str] = ..., paused: _Optional[bool] = ..., paused_since_ms: _Optional[int] = ..., queued: _Optional[int] = ..., workers: _Optional[int] = ...) -> None: ...

class PauseQueueRequest(_message.Message):
    __slots__ = ("queue",)
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    queue: str
    def __init__(self, queue: _Optional[str] = ...) -> None: ...

class PauseQueueResponse(_message.Message):
    __slots__ = ("queue", "changed")
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    queue: QueueInfo
    changed: bool
    def __init__(self, queue: _Optional[_Union[QueueInfo, _Mapping]] = ..., changed: _Optional[bool] = ...) -> None: ...

class ResumeQueueRequest(_message.Message):
    __slots__ = ("queue",)
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    queue: str
    def __init__(self, queue: _Optional[str] = ...) -> None: ...

class ResumeQueueResponse(_message.Message):
    __slots__ = ("queue", "changed")
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    queue: QueueInfo
    changed: bool
    def __init__(self, queue: _Optional[_Union[QueueInfo, _Mapping]] = ..., changed: _Optional[bool] = ...) -> None: ...

class ListQueuesRequest(_message.Message):
    __slots__ = ("stale_ok",)
    STALE_OK_FIELD_NUMBER: _ClassVar[int]
    stale_ok: bool
    def __init__(self, stale_ok: _Optional[bool] = ...) -> None: ...

class ListQueuesResponse(_message.Message):
    __slots__ = ("queues",)
    QUEUES_FIELD_NUMBER: _ClassVar[int]
    queues: _containers.RepeatedCompositeFieldContainer[QueueInfo]
    def __init__(self, queues: _Optional[_Iterable[_Union[QueueInfo, _Mapping]]] = ...) -> None: ...

class WatchTaskRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: int
    def __init__(self, id: _Optional[int] = ...) -> None: ...

class WatchEventsRequest(_message.Message):
    __slots__ = ("from_index",)
    FROM_INDEX_FIELD_NUMBER: _ClassVar[int]
    from_index: int
    def __init__(self, from_index: _Optional[int] = ...) -> None: ...

class TaskEvent(_message.Message):
    __slots__ = ("task", "state", "attempt", "worker", "fence", "revoked_worker", "revoked_fence")
    TASK_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    FENCE_FIELD_NUMBER: _ClassVar[int]
    REVOKED_WORKER_FIELD_NUMBER: _ClassVar[int]
    REVOKED_FENCE_FIELD_NUMBER: _ClassVar[int]
    task: int
    state: TaskState
    attempt: int
    worker: str
    fence: int
    revoked_worker: str
    revoked_fence: int
    def __init__(self, task: _Optional[int] = ..., state: _Optional[_Union[TaskState, str]] = ..., attempt: _Optional[int] = ..., worker: _Optional[str] = ..., fence: _Optional[int] = ..., revoked_worker: _Optional[str] = ..., revoked_fence: _Optional[int] = ...) -> None: ...

class EventBatch(_message.Message):
    __slots__ = ("index", "log_time_ms", "events", "term", "planned_at")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    LOG_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    PLANNED_AT_FIELD_NUMBER: _ClassVar[int]
    index: int
    log_time_ms: int
    events: _containers.RepeatedCompositeFieldContainer[TaskEvent]
    term: int
    planned_at: int
    def __init__(self, index: _Optional[int] = ..., log_time_ms: _Optional[int] = ..., events: _Optional[_Iterable[_Union[TaskEvent, _Mapping]]] = ..., term: _Optional[int] = ..., planned_at: _Optional[int] = ...) -> None: ...

class WorkerSpec(_message.Message):
    __slots__ = ("id", "queues", "labels", "capacity", "slots")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    QUEUES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    id: str
    queues: _containers.RepeatedScalarFieldContainer[str]
    labels: _containers.ScalarMap[str, str]
    capacity: Resources
    slots: int
    def __init__(self, id: _Optional[str] = ..., queues: _Optional[_Iterable[str]] = ..., labels: _Optional[_Mapping[str, str]] = ..., capacity: _Optional[_Union[Resources, _Mapping]] = ..., slots: _Optional[int] = ...) -> None: ...

class RegisterWorkerRequest(_message.Message):
    __slots__ = ("worker", "instance")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    worker: WorkerSpec
    instance: int
    def __init__(self, worker: _Optional[_Union[WorkerSpec, _Mapping]] = ..., instance: _Optional[int] = ...) -> None: ...

class RegisterWorkerResponse(_message.Message):
    __slots__ = ("session", "heartbeat_interval_ms", "heartbeat_ttl_ms", "requeued")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_TTL_MS_FIELD_NUMBER: _ClassVar[int]
    REQUEUED_FIELD_NUMBER: _ClassVar[int]
    session: int
    heartbeat_interval_ms: int
    heartbeat_ttl_ms: int
    requeued: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, session: _Optional[int] = ..., heartbeat_interval_ms: _Optional[int] = ..., heartbeat_ttl_ms: _Optional[int] = ..., requeued: _Optional[_Iterable[int]] = ...) -> None: ...

class OpenAssignmentsRequest(_message.Message):
    __slots__ = ("worker_id", "session")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    session: int
    def __init__(self, worker_id: _Optional[str] = ..., session: _Optional[int] = ...) -> None: ...

class DependencyResult(_message.Message):
    __slots__ = ("task", "result")
    TASK_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    task: int
    result: bytes
    def __init__(self, task: _Optional[int] = ..., result: _Optional[bytes] = ...) -> None: ...

class Assignment(_message.Message):
    __slots__ = ("task", "fence", "attempt", "name", "payload", "deadline_ms", "metadata", "started", "dependencies")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TASK_FIELD_NUMBER: _ClassVar[int]
    FENCE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    STARTED_FIELD_NUMBER: _ClassVar[int]
    DEPENDENCIES_FIELD_NUMBER: _ClassVar[int]
    task: int
    fence: int
    attempt: int
    name: str
    payload: bytes
    deadline_ms: int
    metadata: _containers.ScalarMap[str, str]
    started: bool
    dependencies: _containers.RepeatedCompositeFieldContainer[DependencyResult]
    def __init__(self, task: _Optional[int] = ..., fence: _Optional[int] = ..., attempt: _Optional[int] = ..., name: _Optional[str] = ..., payload: _Optional[bytes] = ..., deadline_ms: _Optional[int] = ..., metadata: _Optional[_Mapping[str, str]] = ..., started: _Optional[bool] = ..., dependencies: _Optional[_Iterable[_Union[DependencyResult, _Mapping]]] = ...) -> None: ...

class Revoke(_message.Message):
    __slots__ = ("task", "fence", "reason")
    TASK_FIELD_NUMBER: _ClassVar[int]
    FENCE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    task: int
    fence: int
    reason: str
    def __init__(self, task: _Optional[int] = ..., fence: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class Resync(_message.Message):
    __slots__ = ("tasks", "fences")
    TASKS_FIELD_NUMBER: _ClassVar[int]
    FENCES_FIELD_NUMBER: _ClassVar[int]
    tasks: _containers.RepeatedScalarFieldContainer[int]
    fences: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, tasks: _Optional[_Iterable[int]] = ..., fences: _Optional[_Iterable[int]] = ...) -> None: ...

class WorkerMessage(_message.Message):
    __slots__ = ("assignment", "revoke", "resync")
    ASSIGNMENT_FIELD_NUMBER: _ClassVar[int]
    REVOKE_FIELD_NUMBER: _ClassVar[int]
    RESYNC_FIELD_NUMBER: _ClassVar[int]
    assignment: Assignment
    revoke: Revoke
    resync: Resync
    def __init__(self, assignment: _Optional[_Union[Assignment, _Mapping]] = ..., revoke: _Optional[_Union[Revoke, _Mapping]] = ..., resync: _Optional[_Union[Resync, _Mapping]] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("worker_id", "session")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    session: int
    def __init__(self, worker_id: _Optional[str] = ..., session: _Optional[int] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("draining",)
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    draining: bool
    def __init__(self, draining: _Optional[bool] = ...) -> None: ...

class Started(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Succeeded(_message.Message):
    __slots__ = ("result",)
    RESULT_FIELD_NUMBER: _ClassVar[int]
    result: bytes
    def __init__(self, result: _Optional[bytes] = ...) -> None: ...

class Failed(_message.Message):
    __slots__ = ("message", "retryable")
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RETRYABLE_FIELD_NUMBER: _ClassVar[int]
    message: str
    retryable: bool
    def __init__(self, message: _Optional[str] = ..., retryable: _Optional[bool] = ...) -> None: ...

class TaskReport(_message.Message):
    __slots__ = ("task", "fence", "started", "succeeded", "failed")
    TASK_FIELD_NUMBER: _ClassVar[int]
    FENCE_FIELD_NUMBER: _ClassVar[int]
    STARTED_FIELD_NUMBER: _ClassVar[int]
    SUCCEEDED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    task: int
    fence: int
    started: Started
    succeeded: Succeeded
    failed: Failed
    def __init__(self, task: _Optional[int] = ..., fence: _Optional[int] = ..., started: _Optional[_Union[Started, _Mapping]] = ..., succeeded: _Optional[_Union[Succeeded, _Mapping]] = ..., failed: _Optional[_Union[Failed, _Mapping]] = ...) -> None: ...

class ReportRequest(_message.Message):
    __slots__ = ("worker_id", "reports")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    REPORTS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    reports: _containers.RepeatedCompositeFieldContainer[TaskReport]
    def __init__(self, worker_id: _Optional[str] = ..., reports: _Optional[_Iterable[_Union[TaskReport, _Mapping]]] = ...) -> None: ...

class ReportResult(_message.Message):
    __slots__ = ("task", "accepted", "duplicate", "state", "error", "stale")
    TASK_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    STALE_FIELD_NUMBER: _ClassVar[int]
    task: int
    accepted: bool
    duplicate: bool
    state: TaskState
    error: str
    stale: bool
    def __init__(self, task: _Optional[int] = ..., accepted: _Optional[bool] = ..., duplicate: _Optional[bool] = ..., state: _Optional[_Union[TaskState, str]] = ..., error: _Optional[str] = ..., stale: _Optional[bool] = ...) -> None: ...

class ReportResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ReportResult]
    def __init__(self, results: _Optional[_Iterable[_Union[ReportResult, _Mapping]]] = ...) -> None: ...

class StartTaskRequest(_message.Message):
    __slots__ = ("worker_id", "task", "fence")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    FENCE_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    task: int
    fence: int
    def __init__(self, worker_id: _Optional[str] = ..., task: _Optional[int] = ..., fence: _Optional[int] = ...) -> None: ...

class CompleteTaskRequest(_message.Message):
    __slots__ = ("worker_id", "task", "fence", "result")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    FENCE_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    task: int
    fence: int
    result: bytes
    def __init__(self, worker_id: _Optional[str] = ..., task: _Optional[int] = ..., fence: _Optional[int] = ..., result: _Optional[bytes] = ...) -> None: ...

class FailTaskRequest(_message.Message):
    __slots__ = ("worker_id", "task", "fence", "message", "retryable")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    FENCE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RETRYABLE_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    task: int
    fence: int
    message: str
    retryable: bool
    def __init__(self, worker_id: _Optional[str] = ..., task: _Optional[int] = ..., fence: _Optional[int] = ..., message: _Optional[str] = ..., retryable: _Optional[bool] = ...) -> None: ...

class TaskReportResponse(_message.Message):
    __slots__ = ("state", "duplicate")
    STATE_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    state: TaskState
    duplicate: bool
    def __init__(self, state: _Optional[_Union[TaskState, str]] = ..., duplicate: _Optional[bool] = ...) -> None: ...

class DrainWorkerRequest(_message.Message):
    __slots__ = ("worker_id",)
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    def __init__(self, worker_id: _Optional[str] = ...) -> None: ...

class DrainWorkerResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class UndrainWorkerRequest(_message.Message):
    __slots__ = ("worker_id",)
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    def __init__(self, worker_id: _Optional[str] = ...) -> None: ...

class UndrainWorkerResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RemoveWorkerRequest(_message.Message):
    __slots__ = ("worker_id",)
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    def __init__(self, worker_id: _Optional[str] = ...) -> None: ...

class RemoveWorkerResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DeregisterWorkerRequest(_message.Message):
    __slots__ = ("worker_id", "session")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    session: int
    def __init__(self, worker_id: _Optional[str] = ..., session: _Optional[int] = ...) -> None: ...

class DeregisterWorkerResponse(_message.Message):
    __slots__ = ("requeued",)
    REQUEUED_FIELD_NUMBER: _ClassVar[int]
    requeued: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, requeued: _Optional[_Iterable[int]] = ...) -> None: ...

class ListWorkersRequest(_message.Message):
    __slots__ = ("stale_ok",)
    STALE_OK_FIELD_NUMBER: _ClassVar[int]
    stale_ok: bool
    def __init__(self, stale_ok: _Optional[bool] = ...) -> None: ...

class WorkerInfo(_message.Message):
    __slots__ = ("spec", "status", "session", "registered_at_ms", "used", "tasks")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    USED_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    spec: WorkerSpec
    status: str
    session: int
    registered_at_ms: int
    used: Resources
    tasks: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, spec: _Optional[_Union[WorkerSpec, _Mapping]] = ..., status: _Optional[str] = ..., session: _Optional[int] = ..., registered_at_ms: _Optional[int] = ..., used: _Optional[_Union[Resources, _Mapping]] = ..., tasks: _Optional[_Iterable[int]] = ...) -> None: ...

class ListWorkersResponse(_message.Message):
    __slots__ = ("workers",)
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    workers: _containers.RepeatedCompositeFieldContainer[WorkerInfo]
    def __init__(self, workers: _Optional[_Iterable[_Union[WorkerInfo, _Mapping]]] = ...) -> None: ...

class Member(_message.Message):
    __slots__ = ("id", "addr", "peer_addr")
    ID_FIELD_NUMBER: _ClassVar[int]
    ADDR_FIELD_NUMBER: _ClassVar[int]
    PEER_ADDR_FIELD_NUMBER: _ClassVar[int]
    id: int
    addr: str
    peer_addr: str
    def __init__(self, id: _Optional[int] = ..., addr: _Optional[str] = ..., peer_addr: _Optional[str] = ...) -> None: ...

class InitClusterRequest(_message.Message):
    __slots__ = ("members",)
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    members: _containers.RepeatedCompositeFieldContainer[Member]
    def __init__(self, members: _Optional[_Iterable[_Union[Member, _Mapping]]] = ...) -> None: ...

class InitClusterResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ClusterStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeStatus(_message.Message):
    __slots__ = ("id", "addr", "voter", "reachable", "error", "role", "term", "last_log_index", "committed_index", "applied_index", "snapshot_index", "purged_index", "leader_id", "digest", "matched_index", "peer_addr", "disk_free_bytes", "disk_min_free_bytes", "disk_low", "data_dir", "command_version")
    ID_FIELD_NUMBER: _ClassVar[int]
    ADDR_FIELD_NUMBER: _ClassVar[int]
    VOTER_FIELD_NUMBER: _ClassVar[int]
    REACHABLE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    LAST_LOG_INDEX_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_INDEX_FIELD_NUMBER: _ClassVar[int]
    APPLIED_INDEX_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_INDEX_FIELD_NUMBER: _ClassVar[int]
    PURGED_INDEX_FIELD_NUMBER: _ClassVar[int]
    LEADER_ID_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    MATCHED_INDEX_FIELD_NUMBER: _ClassVar[int]
    PEER_ADDR_FIELD_NUMBER: _ClassVar[int]
    DISK_FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DISK_MIN_FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DISK_LOW_FIELD_NUMBER: _ClassVar[int]
    DATA_DIR_FIELD_NUMBER: _ClassVar[int]
    COMMAND_VERSION_FIELD_NUMBER: _ClassVar[int]
    id: int
    addr: str
    voter: bool
    reachable: bool
    error: str
    role: str
    term: int
    last_log_index: int
    committed_index: int
    applied_index: int
    snapshot_index: int
    purged_index: int
    leader_id: int
    digest: int
    matched_index: int
    peer_addr: str
    disk_free_bytes: int
    disk_min_free_bytes: int
    disk_low: bool
    data_dir: str
    command_version: int
    def __init__(self, id: _Optional[int] = ..., addr: _Optional[str] = ..., voter: _Optional[bool] = ..., reachable: _Optional[bool] = ..., error: _Optional[str] = ..., role: _Optional[str] = ..., term: _Optional[int] = ..., last_log_index: _Optional[int] = ..., committed_index: _Optional[int] = ..., applied_index: _Optional[int] = ..., snapshot_index: _Optional[int] = ..., purged_index: _Optional[int] = ..., leader_id: _Optional[int] = ..., digest: _Optional[int] = ..., matched_index: _Optional[int] = ..., peer_addr: _Optional[str] = ..., disk_free_bytes: _Optional[int] = ..., disk_min_free_bytes: _Optional[int] = ..., disk_low: _Optional[bool] = ..., data_dir: _Optional[str] = ..., command_version: _Optional[int] = ...) -> None: ...

class ClusterStatusResponse(_message.Message):
    __slots__ = ("leader_id", "term", "nodes", "cluster_version")
    LEADER_ID_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_VERSION_FIELD_NUMBER: _ClassVar[int]
    leader_id: int
    term: int
    nodes: _containers.RepeatedCompositeFieldContainer[NodeStatus]
    cluster_version: int
    def __init__(self, leader_id: _Optional[int] = ..., term: _Optional[int] = ..., nodes: _Optional[_Iterable[_Union[NodeStatus, _Mapping]]] = ..., cluster_version: _Optional[int] = ...) -> None: ...

class AddLearnerRequest(_message.Message):
    __slots__ = ("id", "addr", "wait_ms", "peer_addr")
    ID_FIELD_NUMBER: _ClassVar[int]
    ADDR_FIELD_NUMBER: _ClassVar[int]
    WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    PEER_ADDR_FIELD_NUMBER: _ClassVar[int]
    id: int
    addr: str
    wait_ms: int
    peer_addr: str
    def __init__(self, id: _Optional[int] = ..., addr: _Optional[str] = ..., wait_ms: _Optional[int] = ..., peer_addr: _Optional[str] = ...) -> None: ...

class AddLearnerResponse(_message.Message):
    __slots__ = ("matched_index",)
    MATCHED_INDEX_FIELD_NUMBER: _ClassVar[int]
    matched_index: int
    def __init__(self, matched_index: _Optional[int] = ...) -> None: ...

class PromoteRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: int
    def __init__(self, id: _Optional[int] = ...) -> None: ...

class PromoteResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RemoveNodeRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: int
    def __init__(self, id: _Optional[int] = ...) -> None: ...

class RemoveNodeResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TransferLeaderRequest(_message.Message):
    __slots__ = ("to",)
    TO_FIELD_NUMBER: _ClassVar[int]
    to: int
    def __init__(self, to: _Optional[int] = ...) -> None: ...

class TransferLeaderResponse(_message.Message):
    __slots__ = ("leader_id",)
    LEADER_ID_FIELD_NUMBER: _ClassVar[int]
    leader_id: int
    def __init__(self, leader_id: _Optional[int] = ...) -> None: ...

class TriggerSnapshotRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TriggerSnapshotResponse(_message.Message):
    __slots__ = ("snapshot_index",)
    SNAPSHOT_INDEX_FIELD_NUMBER: _ClassVar[int]
    snapshot_index: int
    def __init__(self, snapshot_index: _Optional[int] = ...) -> None: ...

class SaveSnapshotRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SnapshotChunk(_message.Message):
    __slots__ = ("data", "index", "term", "size")
    DATA_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    index: int
    term: int
    size: int
    def __init__(self, data: _Optional[bytes] = ..., index: _Optional[int] = ..., term: _Optional[int] = ..., size: _Optional[int] = ...) -> None: ...

class TokenInfo(_message.Message):
    __slots__ = ("name", "role", "worker_id_prefix", "created_at_ms", "expires_at_ms", "expired", "source")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_PREFIX_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_MS_FIELD_NUMBER: _ClassVar[int]
    EXPIRED_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    name: str
    role: str
    worker_id_prefix: str
    created_at_ms: int
    expires_at_ms: int
    expired: bool
    source: str
    def __init__(self, name: _Optional[str] = ..., role: _Optional[str] = ..., worker_id_prefix: _Optional[str] = ..., created_at_ms: _Optional[int] = ..., expires_at_ms: _Optional[int] = ..., expired: _Optional[bool] = ..., source: _Optional[str] = ...) -> None: ...

class CreateTokenRequest(_message.Message):
    __slots__ = ("name", "role", "secret_sha256", "worker_id_prefix", "ttl_ms")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    SECRET_SHA256_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_PREFIX_FIELD_NUMBER: _ClassVar[int]
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    name: str
    role: str
    secret_sha256: str
    worker_id_prefix: str
    ttl_ms: int
    def __init__(self, name: _Optional[str] = ..., role: _Optional[str] = ..., secret_sha256: _Optional[str] = ..., worker_id_prefix: _Optional[str] = ..., ttl_ms: _Optional[int] = ...) -> None: ...

class CreateTokenResponse(_message.Message):
    __slots__ = ("token", "created")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    token: TokenInfo
    created: bool
    def __init__(self, token: _Optional[_Union[TokenInfo, _Mapping]] = ..., created: _Optional[bool] = ...) -> None: ...

class ListTokensRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListTokensResponse(_message.Message):
    __slots__ = ("tokens",)
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedCompositeFieldContainer[TokenInfo]
    def __init__(self, tokens: _Optional[_Iterable[_Union[TokenInfo, _Mapping]]] = ...) -> None: ...

class RevokeTokenRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class RevokeTokenResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
