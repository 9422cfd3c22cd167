"""Request and response bodies of the internal API.

Request models are strict and closed (``extra="forbid"``, strict types): a field the server
does not know is an error, never silently ignored, and ``"1"`` is not an integer. Nothing in a
request body ever names *who* is asking; that comes from the token alone.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

# A JSON value as user code may send it (XCom values, trigger payloads, run conf).
JSONValue = Any

WorkKind = Literal["task", "parse", "trigger"]

# Durations in seconds are bounded: a year is more than any wait means, and an unbounded float
# overflows the datetime arithmetic it feeds.
MAX_SECONDS = 366 * 86_400


def _json_integer(value: object) -> object:
    """JSON Schema counts ``2.0`` as an integer; strings and booleans stay refused."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# An integer as JSON Schema means it: strict (no "2", no true), but 2.0 is 2.
JsonInt = Annotated[int, BeforeValidator(_json_integer)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Open(BaseModel):
    """Responses: closed too, so the OpenAPI document says exactly what is sent."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# --- sessions --------------------------------------------------------------------------------


class SessionRequest(Strict):
    assertion: str = Field(min_length=1, max_length=8192)


class SessionResponse(Open):
    token: str
    expires_at: int
    subject: str


class Ok(Open):
    ok: bool = True


# --- supervisor ------------------------------------------------------------------------------


def _all_kinds() -> list[WorkKind]:
    return ["task", "parse", "trigger"]


# Ids a heartbeat may list: more than any pool runs at once, few enough to bound the request.
HeldIds = Annotated[
    list[Annotated[str, Field(min_length=1, max_length=250)]], Field(max_length=4096)
]


class DiscoveryStatus(Strict):
    """Discovery's state on a supervisor: ``up_to_date`` (its last scan was reported),
    ``failing`` (its last scan or report failed; ``error`` says why) or ``off``."""

    state: Literal["up_to_date", "failing", "off"]
    error: str | None = Field(default=None, max_length=2000)


class HeartbeatRequest(Strict):
    """The work the supervisor really holds. The server keeps these alive and takes back the
    rest of what it thinks this supervisor runs (a lost claim answer) after a grace period."""

    tasks: HeldIds = Field(default_factory=list)
    parse_jobs: HeldIds = Field(default_factory=list)
    triggers: HeldIds = Field(default_factory=list)
    # What discovery says now, for the status page; None from a supervisor that says nothing.
    discovery: DiscoveryStatus | None = None


QUEUE_PATTERN = r"^[A-Za-z0-9_.\-]{1,64}$"
"""A work queue's name: what ``supervisor.queues`` and the authoring API's ``queue`` accept."""
QueueName = Annotated[str, Field(pattern=QUEUE_PATTERN)]


class ClaimRequest(Strict):
    kinds: list[WorkKind] = Field(default_factory=_all_kinds, min_length=1, max_length=3)
    max_items: JsonInt = Field(default=1, ge=1, le=100)
    # The queues the claimer serves: it gets only tasks of these. None (a supervisor from
    # before queues) serves every queue, as every claim did then.
    queues: list[QueueName] | None = Field(default=None, min_length=1, max_length=100)


class TaskWork(Open):
    kind: Literal["task"] = "task"
    id: str
    token: str
    expires_at: int
    run_id: str
    workflow_id: str
    task_id: str
    try_number: int
    callable: dict[str, str]
    timeout: float | None
    bundle_version: str
    source_uri: str | None = None
    # The rest of the task's context (see TaskContext), handed to the sandbox with its payload.
    params: dict[str, JSONValue] = Field(default_factory=dict)
    trigger_event: JSONValue | None = None
    # Which claim of the attempt this is: the supervisor's last log chunk of an execution
    # names it, so the central log knows when the newest execution's output is all in.
    execution: int = 0


class ParseWork(Open):
    kind: Literal["parse"] = "parse"
    id: str
    token: str
    expires_at: int
    uri: str
    bundle_version: str


class TriggerWork(Open):
    kind: Literal["trigger"] = "trigger"
    id: str
    token: str
    expires_at: int
    trigger_ids: list[str]
    source_uris: list[str] = Field(default_factory=list)


class ClaimResponse(Open):
    items: list[TaskWork | ParseWork | TriggerWork]


class RefreshRequest(Strict):
    kind: WorkKind
    id: str = Field(min_length=1, max_length=250)


class TokenResponse(Open):
    token: str
    expires_at: int


class OutcomeRequest(Strict):
    kind: WorkKind
    id: str = Field(min_length=1, max_length=250)
    exit_code: JsonInt | None = None
    reason: str = Field(default="", max_length=4096)


WorkflowId = Annotated[str, Field(min_length=1, max_length=250, pattern=r"^[A-Za-z0-9_.\-]+$")]


class ParseJobRequest(Strict):
    uri: str = Field(min_length=1, max_length=1024)
    content_hash: str = Field(default="", max_length=128)
    bundle_version: str = Field(default="", max_length=250)
    # The workflow ids this file may declare (the folder's manifest.json assigns them);
    # absent: any. A result that declares another is stored as an import error instead.
    workflow_ids: list[WorkflowId] | None = Field(default=None, max_length=1000)


class ParseJobResponse(Open):
    id: str


MAX_PARSE_JOBS_PER_BATCH = 1000


class ParseJobBatchRequest(Strict):
    jobs: list[ParseJobRequest] = Field(min_length=1, max_length=MAX_PARSE_JOBS_PER_BATCH)


class ParseJobBatchResponse(Open):
    ids: list[str]


class DeletedFilesRequest(Strict):
    uris: list[str] = Field(max_length=10_000)


# --- task ------------------------------------------------------------------------------------


class TaskContext(Open):
    attempt_id: str
    run_id: str
    workflow_id: str
    task_id: str
    try_number: int
    params: dict[str, JSONValue]
    trigger_event: JSONValue | None


class SucceedRequest(Strict):
    return_value: JSONValue | None = None


class FailRequest(Strict):
    error: str = Field(default="", max_length=65536)


class SerializedTrigger(Strict):
    module: str = Field(min_length=1, max_length=250)
    qualname: str = Field(min_length=1, max_length=250)
    kwargs: dict[str, JSONValue] = Field(default_factory=dict)


class DeferRequest(Strict):
    trigger: SerializedTrigger
    timeout: float | None = Field(default=None, gt=0, le=MAX_SECONDS)


class AttemptStateResponse(Open):
    state: str


class VariableBody(Strict):
    value: str = Field(max_length=1_000_000)


class VariableResponse(Open):
    key: str
    value: str


class ConnectionResponse(Open):
    conn_id: str
    conn_type: str
    host: str | None
    port: int | None
    login: str | None
    password: str | None
    schema_: str | None = Field(alias="schema", serialization_alias="schema")
    extra: str | None

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class XComBody(Strict):
    value: JSONValue


class XComResponse(Open):
    task_id: str
    key: str
    value: JSONValue


# --- parse -----------------------------------------------------------------------------------


class TaskDefinition(Strict):
    task_id: str = Field(min_length=1, max_length=250, pattern=r"^[A-Za-z0-9_.\-]+$")
    upstream: list[str] = Field(default_factory=list)
    retries: JsonInt = Field(default=0, ge=0, le=100)
    retry_delay: float = Field(default=0, ge=0, le=MAX_SECONDS)
    timeout: float | None = Field(default=None, gt=0, le=MAX_SECONDS)
    module: str = Field(min_length=1, max_length=250)
    qualname: str = Field(min_length=1, max_length=250)
    queue: QueueName = "default"


class WorkflowDefinition(Strict):
    workflow_id: str = Field(min_length=1, max_length=250, pattern=r"^[A-Za-z0-9_.\-]+$")
    schedule: str | float | None = None
    tasks: list[TaskDefinition] = Field(max_length=10_000)


class ParseResultRequest(Strict):
    workflows: list[WorkflowDefinition] = Field(default_factory=list, max_length=1000)
    error: str | None = Field(default=None, max_length=65536)


# --- trigger ---------------------------------------------------------------------------------


class AssignedTrigger(Open):
    id: str
    module: str
    qualname: str
    kwargs: dict[str, JSONValue]


class AssignedTriggers(Open):
    triggers: list[AssignedTrigger]


class TriggerEventRequest(Strict):
    payload: JSONValue = None


class TriggerFailureRequest(Strict):
    error: str = Field(default="", max_length=65536)


# --- operator --------------------------------------------------------------------------------


class TriggerRunRequest(Strict):
    conf: dict[str, JSONValue] = Field(default_factory=dict)


class RunResponse(Open):
    id: str
    workflow_id: str
    state: str
    created_at: str
    ended_at: str | None


class RunsResponse(Open):
    runs: list[RunResponse]


class AttemptResponse(Open):
    id: str
    task_id: str
    try_number: int
    state: str
    supervisor_id: str | None
    started_at: str | None
    ended_at: str | None
    error: str | None


class AttemptsResponse(Open):
    attempts: list[AttemptResponse]


class OperatorVariableBody(Strict):
    value: str = Field(max_length=1_000_000)
    description: str | None = None


class ConnectionBody(Strict):
    conn_type: str = Field(min_length=1, max_length=250)
    host: str | None = None
    port: JsonInt | None = Field(default=None, ge=0, le=65535)
    login: str | None = None
    password: str | None = None
    schema_: str | None = Field(default=None, alias="schema")
    extra: str | None = None
    description: str | None = None

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, populate_by_name=True)


class GrantBody(Strict):
    workflow_pattern: str = Field(min_length=1, max_length=250)
    kind: Literal["variable", "connection"]
    name_pattern: str = Field(min_length=1, max_length=250)


class GrantResponse(Open):
    id: int
    workflow_pattern: str
    kind: str
    name_pattern: str


class GrantsResponse(Open):
    grants: list[GrantResponse]


# --- health ----------------------------------------------------------------------------------


class SupervisorHealth(Open):
    name: str
    heartbeat_age_seconds: float | None
    healthy: bool


class HealthResponse(Open):
    """``status`` and ``instance`` for anyone; the rest only for an operator session."""

    status: Literal["ok", "degraded"]
    # Which deployment answers (the id of its signing key ring): public, stable across
    # rotations, and different for every privsep home, so a client can tell "my server" from
    # "something else on that port".
    instance: str
    database: Literal["ok", "unreachable"] | None = None
    supervisors: list[SupervisorHealth] | None = None


# --- operator: read views --------------------------------------------------------------------
#
# What `runner workflows|runs|variables|connections` show. Connection secrets never appear:
# the server does not decrypt them for an operator, it only says whether one is set.

MASKED: Literal["***"] = "***"


class WorkflowSummary(Open):
    id: str
    active: bool
    current_version_id: int | None
    bundle_version: str | None
    schedule: str | float | None
    task_count: int
    source_uri: str | None


class WorkflowsResponse(Open):
    workflows: list[WorkflowSummary]


class WorkflowDetailResponse(Open):
    id: str
    active: bool
    current_version_id: int | None
    bundle_version: str | None
    source_uri: str | None
    parsed_at: str | None
    # The serialized definition exactly as the parse sandbox produced it (null if never parsed).
    definition: dict[str, JSONValue] | None


class ParseErrorResponse(Open):
    id: int
    file_path: str
    message: str
    bundle_version: str
    created_at: str


class ParseErrorsResponse(Open):
    errors: list[ParseErrorResponse]


class RunDetailResponse(Open):
    id: str
    workflow_id: str
    workflow_version_id: int
    state: str
    trigger_kind: str
    conf: dict[str, JSONValue]
    logical_date: str | None
    created_at: str
    started_at: str | None
    ended_at: str | None


class OperatorVariableResponse(Open):
    key: str
    value: str
    description: str | None


class VariableSummary(Open):
    """A variable without its value: listing names must not dump every value at once."""

    key: str
    description: str | None


class VariablesResponse(Open):
    variables: list[VariableSummary]


class OperatorConnectionResponse(Open):
    """A connection as operators see it: ``password`` and ``extra`` are ``"***"`` when set."""

    conn_id: str
    conn_type: str
    host: str | None
    port: int | None
    login: str | None
    password: Literal["***"] | None
    schema_: str | None = Field(alias="schema", serialization_alias="schema")
    extra: Literal["***"] | None
    description: str | None

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class ConnectionsResponse(Open):
    connections: list[OperatorConnectionResponse]


# --- central logs ----------------------------------------------------------------------------

LOG_CHUNK_MAX_BYTES = 65_536
"""The most text one shipped chunk carries (the supervisor cuts its reads to this)."""
LOG_CHUNKS_PER_REQUEST = 100


class LogChunkIn(Strict):
    """Bytes ``[offset, offset + length)`` of one node-local log file (``stream``), as text.

    ``length`` is their size in the file (``text`` encoded as UTF-8 unless the file held
    bytes that are not UTF-8). ``final`` says the execution that wrote the file has ended and
    this chunk reaches the file's end; ``execution`` is the attempt's claim it belongs to."""

    kind: WorkKind
    item_id: str = Field(min_length=1, max_length=250)
    stream: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    offset: JsonInt = Field(ge=0, le=2**62)
    length: JsonInt = Field(ge=0, le=4 * LOG_CHUNK_MAX_BYTES)
    text: str = Field(max_length=LOG_CHUNK_MAX_BYTES)
    final: bool = False
    execution: JsonInt = Field(default=0, ge=0, le=2**31 - 1)


class LogAppendRequest(Strict):
    chunks: list[LogChunkIn] = Field(min_length=1, max_length=LOG_CHUNKS_PER_REQUEST)


class LogAck(Open):
    """How many bytes of the stream the server holds now: where the next chunk starts (lower
    than what was sent when the server lost some, and the supervisor sends them again)."""

    item_id: str
    stream: str
    end: int


class LogAppendResponse(Open):
    acks: list[LogAck]


class LogChunkOut(Open):
    seq: int
    text: str


class LogResponse(Open):
    """One page of an item's central log. ``next`` is the ``after`` of the next poll;
    ``complete`` is true once the item has ended, its supervisors have shipped all of it and
    this page reaches its end. ``text`` is as the sandbox's capture wrote it (control
    characters escaped there), never unescaped by the server; whoever shows it escapes it
    for its own medium."""

    attempt_id: str
    kind: str | None
    chunks: list[LogChunkOut]
    next: int
    complete: bool
    # The item has ended (its log may still be waiting for its supervisor's last chunk).
    ended: bool = False
    truncated: bool = False
    size_bytes: int = 0
