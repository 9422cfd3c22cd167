"""The metadata database schema, as SQLAlchemy 2 typed declarative models.

The server is the only component that touches these tables (see ``DESIGN.md``), so the schema is
shaped by what the server asks of it:

* **Claiming work** (task attempts, parse jobs, triggers) is a ``state`` filter plus an ordering
  column, so each of those tables has an index that starts with ``state``.
* **Token checks** on every call look up one attempt by primary key and compare its ``state``,
  ``try_number`` and ``supervisor_id`` with the token's claims; nothing else is needed.
* **Several server replicas** share one database, so ids of work items are random UUIDs (no
  sequence to coordinate, nothing to enumerate), single-use assertion ids live in
  :class:`UsedJti`, and signing public keys live in :class:`SigningKey` so every replica can
  verify every other replica's tokens.

Portability rules, because the same schema runs on SQLite and PostgreSQL:

* States are ``VARCHAR`` with a ``CHECK`` constraint (``native_enum=False``), not PostgreSQL
  enum types, so adding a state is an ordinary batch migration on both backends.
* Every timestamp is a :class:`UTCDateTime`: timezone-aware UTC in Python on both backends,
  even though SQLite has no time zones.
* JSON columns use :class:`sqlalchemy.JSON`; nullable ones store SQL ``NULL`` for ``None``.
* Constraint and index names come from :data:`NAMING_CONVENTION`, so later migrations can name
  what they alter (SQLite batch mode and PostgreSQL both need the names).

Within one flush the ORM orders INSERTs by ``relationship()``s, not by bare foreign-key
columns; the parent links that new rows are likely to be created with in one session (version →
workflow, run → workflow and version, attempt → run, trigger → attempt, XCom → run) are
relationships for that reason.

The tables are created by the Alembic migrations in ``privsep/server/migrations``, never by
``metadata.create_all``; a test checks that the migrations and these models agree.
"""

from __future__ import annotations

import enum
import hashlib
import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    Enum,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# Lengths that are part of the schema. Ids are UUID strings; names are what a person types.
ID_LENGTH = 36
NAME_LENGTH = 250
QUEUE_LENGTH = 64
DEFAULT_QUEUE = "default"
URI_LENGTH = 1024
HASH_LENGTH = 128
# Every state column gets room for longer state names than today's, so that adding one is a
# change of the CHECK constraint only.
STATE_LENGTH = 32


def utcnow() -> datetime:
    """The current time as an aware UTC datetime: the only kind the schema stores."""
    return datetime.now(UTC)


def new_id() -> str:
    """A random UUID string for a new work item: unguessable and coordination-free."""
    return str(uuid.uuid4())


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp that is always timezone-aware UTC in Python, on every backend.

    PostgreSQL stores ``timestamptz`` and returns it in the session time zone; SQLite stores text
    and returns naive datetimes. This type converts every bound value to UTC (and refuses naive
    ones, whose meaning is a guess) and marks every loaded value as UTC, so comparisons such as
    "heartbeat older than 30 s" mean the same thing on both backends.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value!r}: the database stores aware UTC only")
        value = value.astimezone(UTC)
        if dialect.name == "sqlite":
            # Stored as text; dropping the offset keeps the text sortable and comparable.
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class RunState(enum.StrEnum):
    """Lifecycle of a run."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCESS = "success"
    FAILED = "failed"


class RunTriggerKind(enum.StrEnum):
    """What created a run."""

    MANUAL = "manual"
    SCHEDULE = "schedule"


class AttemptState(enum.StrEnum):
    """Lifecycle of one try of one task in one run."""

    QUEUED = "queued"
    RUNNING = "running"
    DEFERRED = "deferred"
    UP_FOR_RETRY = "up_for_retry"
    SUCCESS = "success"
    FAILED = "failed"
    SKIPPED = "skipped"
    UPSTREAM_FAILED = "upstream_failed"


class ParseJobState(enum.StrEnum):
    """Lifecycle of one definition-file parse."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCESS = "success"
    FAILED = "failed"


class TriggerState(enum.StrEnum):
    """Lifecycle of a deferred task's trigger."""

    QUEUED = "queued"
    RUNNING = "running"
    FIRED = "fired"
    FAILED = "failed"
    CANCELLED = "cancelled"


class GrantKind(enum.StrEnum):
    """What a policy grant gives a workflow read access to."""

    VARIABLE = "variable"
    CONNECTION = "connection"


def _state_enum(cls: type[enum.StrEnum], name: str) -> Enum:
    """A portable enum column type: VARCHAR plus a named CHECK constraint, storing the values."""
    return Enum(
        cls,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=STATE_LENGTH,
        values_callable=lambda members: [m.value for m in members],
        validate_strings=True,
    )


# ``None`` in a nullable JSON column means "absent" (SQL NULL), not the JSON literal ``null``.
NullableJSON = JSON(none_as_null=True)


class Base(DeclarativeBase):
    """Declarative base for every privsep table; carries the naming convention."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {  # noqa: RUF012 - read once by SQLAlchemy at class creation
        datetime: UTCDateTime(),
        dict[str, Any]: JSON(),
    }


class Workflow(Base):
    """A workflow known from discovery; ``current_version_id`` is what new runs will pin."""

    __tablename__ = "workflows"

    id: Mapped[str] = mapped_column(String(NAME_LENGTH), primary_key=True)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    # The definition file (manifest URI or crawled path) the workflow was last parsed from, so
    # that a file disappearing from discovery can deactivate its workflows without a join. Set
    # it together with current_version_id.
    source_uri: Mapped[str | None] = mapped_column(String(URI_LENGTH), index=True)
    # The supervisor whose discovery first defined the workflow: only files that supervisor
    # queued may define it again or report it deleted, so a second supervisor cannot take it
    # over. NULL for a workflow stored before owners were recorded (its next parse sets it).
    supervisor_id: Mapped[str | None] = mapped_column(ForeignKey("supervisors.id"))
    # A cycle with workflow_versions.workflow_id: created after both tables (use_alter) on
    # PostgreSQL; SQLite accepts the forward reference inline.
    current_version_id: Mapped[int | None] = mapped_column(
        ForeignKey(
            "workflow_versions.id",
            use_alter=True,
            name="fk_workflows_current_version_id_workflow_versions",
        )
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    versions: Mapped[list[WorkflowVersion]] = relationship(
        back_populates="workflow", foreign_keys="WorkflowVersion.workflow_id"
    )
    current_version: Mapped[WorkflowVersion | None] = relationship(
        foreign_keys=[current_version_id], post_update=True
    )


def version_digest(definition: str, source_uri: str | None) -> str:
    """A workflow version's ``content_hash``: its definition text and the (content-pinned)
    file URI it was parsed from, since the same definition from changed file contents (a task
    body edited) is another version."""
    text = definition if source_uri is None else f"{definition}\n{source_uri}"
    return hashlib.sha256(text.encode()).hexdigest()


class WorkflowVersion(Base):
    """One serialized definition of a workflow, as parsed from one bundle version.

    ``definition`` is the JSON text exactly as the parser produced it, so ``content_hash`` can
    be recomputed from it and ``source_uri`` (:func:`version_digest`). ``bundle_version`` is
    ``""`` when the bundle has no version; it is not NULL so the unique constraint deduplicates
    resubmitted parse results on every backend (NULLs are distinct in unique constraints).
    """

    __tablename__ = "workflow_versions"
    __table_args__ = (UniqueConstraint("workflow_id", "bundle_version", "content_hash"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    workflow_id: Mapped[str] = mapped_column(ForeignKey("workflows.id"), index=True)
    definition: Mapped[str] = mapped_column(Text)
    bundle_version: Mapped[str] = mapped_column(String(NAME_LENGTH), default="")
    content_hash: Mapped[str] = mapped_column(String(HASH_LENGTH))
    # The definition file this version was parsed from (provenance; may differ between versions
    # if a workflow moves between files).
    source_uri: Mapped[str | None] = mapped_column(String(URI_LENGTH))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    workflow: Mapped[Workflow] = relationship(back_populates="versions", foreign_keys=[workflow_id])


class Run(Base):
    """One run of a workflow, pinned to the workflow version current when it was created.

    ``logical_date`` is set for scheduled runs; the unique constraint makes two scheduler
    replicas that fire the same tick create one run, not two (manual runs leave it NULL, and
    NULLs never collide).
    """

    __tablename__ = "runs"
    __table_args__ = (
        UniqueConstraint("workflow_id", "logical_date"),
        Index("ix_runs_state_created_at", "state", "created_at"),
        Index("ix_runs_workflow_id_created_at", "workflow_id", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True, default=new_id)
    workflow_id: Mapped[str] = mapped_column(ForeignKey("workflows.id"))
    workflow_version_id: Mapped[int] = mapped_column(ForeignKey("workflow_versions.id"))
    state: Mapped[RunState] = mapped_column(
        _state_enum(RunState, "run_state"), default=RunState.QUEUED
    )
    trigger_kind: Mapped[RunTriggerKind] = mapped_column(
        _state_enum(RunTriggerKind, "run_trigger_kind"), default=RunTriggerKind.MANUAL
    )
    conf: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    logical_date: Mapped[datetime | None] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column()
    ended_at: Mapped[datetime | None] = mapped_column()

    workflow: Mapped[Workflow] = relationship()
    workflow_version: Mapped[WorkflowVersion] = relationship()
    attempts: Mapped[list[TaskAttempt]] = relationship(back_populates="run")


class Supervisor(Base):
    """A registered supervisor: its name and the Ed25519 public key it signs assertions with.

    ``key_generation`` is what a session token is bound to: it carries the generation it was
    opened under, and every call compares it with this column. Revoking the supervisor or giving
    it a new key moves the generation on, so every session opened before ends at its next call,
    on every replica, without a list of tokens to chase.
    """

    __tablename__ = "supervisors"

    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(NAME_LENGTH), unique=True)
    public_key_pem: Mapped[str] = mapped_column(Text)
    registered_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_heartbeat_at: Mapped[datetime | None] = mapped_column()
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    key_generation: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    revoked_at: Mapped[datetime | None] = mapped_column()
    # What its discovery said in its last heartbeat that said anything (the status page
    # shows it): ``up_to_date``, ``failing`` with the scan's error, or ``off``.
    discovery_state: Mapped[str | None] = mapped_column(String(32))
    discovery_error: Mapped[str | None] = mapped_column(Text)
    discovery_at: Mapped[datetime | None] = mapped_column()


class Operator(Base):
    """A registered operator credential: a name for people and the audit log, and the Ed25519
    public key its assertions are signed with.

    An operator is found by its key (``key_id``, the key's fingerprint), never by a name the
    assertion carries, so the audit log's actor is always the registered name. Sessions are
    bound to ``key_generation`` exactly as a supervisor's are.
    """

    __tablename__ = "operators"

    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(NAME_LENGTH), unique=True)
    public_key_pem: Mapped[str] = mapped_column(Text)
    key_id: Mapped[str] = mapped_column(String(NAME_LENGTH), unique=True)
    registered_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_session_at: Mapped[datetime | None] = mapped_column()
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    key_generation: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    revoked_at: Mapped[datetime | None] = mapped_column()


class TaskAttempt(Base):
    """One try of one task in one run: the subject (``sub``) of a task token.

    A token is honoured only while ``state`` is running, ``try_number`` and ``execution``
    match and ``supervisor_id`` is the claiming supervisor (still registered and active), so
    those columns are the revocation mechanism. ``execution`` counts the claims of this row:
    every claim (the first, and the one after each deferral or re-queue) is a new execution, and
    a token names the one it was issued for, so no token outlives the execution it was minted
    for. ``trigger_id`` points at the trigger of the current deferral, if any.
    """

    __tablename__ = "task_attempts"
    __table_args__ = (
        UniqueConstraint("run_id", "task_id", "try_number"),
        # The claimer: "queued, or up for retry and due", oldest first.
        Index("ix_task_attempts_state_next_try_at", "state", "next_try_at"),
        # The reaper: running attempts whose heartbeat is stale.
        Index("ix_task_attempts_state_heartbeat_at", "state", "heartbeat_at"),
        Index("ix_task_attempts_supervisor_id_state", "supervisor_id", "state"),
        # runs.advance: "is any attempt of this run unfinished?" without reading the run.
        Index("ix_task_attempts_run_id_state", "run_id", "state"),
    )

    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True, default=new_id)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"))
    task_id: Mapped[str] = mapped_column(String(NAME_LENGTH))
    try_number: Mapped[int] = mapped_column(Integer, default=1)
    execution: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    state: Mapped[AttemptState] = mapped_column(
        _state_enum(AttemptState, "attempt_state"), default=AttemptState.QUEUED
    )
    supervisor_id: Mapped[str | None] = mapped_column(ForeignKey("supervisors.id"))
    heartbeat_at: Mapped[datetime | None] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column()
    ended_at: Mapped[datetime | None] = mapped_column()
    next_try_at: Mapped[datetime | None] = mapped_column()
    exit_code: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    # A cycle with triggers.attempt_id, broken the same way as workflows.current_version_id.
    trigger_id: Mapped[str | None] = mapped_column(
        ForeignKey("triggers.id", use_alter=True, name="fk_task_attempts_trigger_id_triggers")
    )
    trigger_event: Mapped[dict[str, Any] | None] = mapped_column(NullableJSON)
    # The work queue of the task (its definition's ``queue``): a claim hands the attempt only
    # to a supervisor that serves this queue.
    queue: Mapped[str] = mapped_column(
        String(QUEUE_LENGTH), default=DEFAULT_QUEUE, server_default=DEFAULT_QUEUE
    )

    run: Mapped[Run] = relationship(back_populates="attempts")
    trigger: Mapped[Trigger | None] = relationship(foreign_keys=[trigger_id], post_update=True)


class ParseJob(Base):
    """One definition file to parse in a sandbox; the subject of a parse token."""

    __tablename__ = "parse_jobs"
    __table_args__ = (Index("ix_parse_jobs_state_created_at", "state", "created_at"),)

    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True, default=new_id)
    uri: Mapped[str] = mapped_column(String(URI_LENGTH))
    content_hash: Mapped[str | None] = mapped_column(String(HASH_LENGTH))
    bundle_version: Mapped[str] = mapped_column(String(NAME_LENGTH), default="")
    # The workflow ids this file may declare, when the workflows folder has a manifest that
    # assigns ids to files; NULL: any. A result declaring another id is refused whole.
    workflow_ids: Mapped[list[str] | None] = mapped_column(JSON(none_as_null=True))
    # The supervisor that queued the job: the owner of its file, and so of the workflows its
    # result defines (``supervisor_id`` is whoever claimed it, which may be another node).
    queued_by: Mapped[str | None] = mapped_column(ForeignKey("supervisors.id"))
    state: Mapped[ParseJobState] = mapped_column(
        _state_enum(ParseJobState, "parse_job_state"), default=ParseJobState.QUEUED
    )
    supervisor_id: Mapped[str | None] = mapped_column(ForeignKey("supervisors.id"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    claimed_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()


class SourceFile(Base):
    """A definition file and the supervisor whose discovery reported it first, its owner.

    Only the owner may queue a parse of the file or report it deleted: the server cannot see
    a supervisor's folder, so "what it discovered" is what it reported first. The row
    outlives the file (a file that comes back belongs to the same supervisor).
    """

    __tablename__ = "source_files"

    # The file's URI without the ``#sha256=`` pin, as ``Workflow.source_uri`` holds it.
    uri: Mapped[str] = mapped_column(String(URI_LENGTH), primary_key=True)
    supervisor_id: Mapped[str] = mapped_column(ForeignKey("supervisors.id"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ParseError(Base):
    """An import error from parsing one definition file, kept to show to operators."""

    __tablename__ = "parse_errors"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    file_path: Mapped[str] = mapped_column(String(URI_LENGTH), index=True)
    message: Mapped[str] = mapped_column(Text)
    bundle_version: Mapped[str] = mapped_column(String(NAME_LENGTH), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Trigger(Base):
    """The async trigger a deferred attempt waits on; the subject of a trigger token.

    ``serialized`` is ``{"module": ..., "qualname": ..., "kwargs": {...}}`` as the task
    submitted it; the trigger sandbox imports and runs it. ``event`` is what it fired with.
    """

    __tablename__ = "triggers"
    __table_args__ = (Index("ix_triggers_state_supervisor_id", "state", "supervisor_id"),)

    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True, default=new_id)
    attempt_id: Mapped[str] = mapped_column(ForeignKey("task_attempts.id"), index=True)
    serialized: Mapped[dict[str, Any]] = mapped_column(JSON)
    state: Mapped[TriggerState] = mapped_column(
        _state_enum(TriggerState, "trigger_state"), default=TriggerState.QUEUED
    )
    supervisor_id: Mapped[str | None] = mapped_column(ForeignKey("supervisors.id"))
    event: Mapped[dict[str, Any] | None] = mapped_column(NullableJSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    claimed_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()

    attempt: Mapped[TaskAttempt] = relationship(foreign_keys=[attempt_id])


class Variable(Base):
    """An operator-managed variable; tasks read it only when a policy grant allows."""

    __tablename__ = "variables"

    key: Mapped[str] = mapped_column(String(NAME_LENGTH), primary_key=True)
    value: Mapped[str] = mapped_column(Text)
    description: Mapped[str | None] = mapped_column(Text)


class Connection(Base):
    """A connection; ``password_encrypted`` and ``extra_encrypted`` are Fernet tokens.

    The key lives in a permission-checked file on the server, never in the database, so a copy
    of the database alone does not reveal connection secrets.
    """

    __tablename__ = "connections"

    conn_id: Mapped[str] = mapped_column(String(NAME_LENGTH), primary_key=True)
    conn_type: Mapped[str] = mapped_column(String(NAME_LENGTH))
    host: Mapped[str | None] = mapped_column(String(URI_LENGTH))
    port: Mapped[int | None] = mapped_column(Integer)
    login: Mapped[str | None] = mapped_column(String(NAME_LENGTH))
    password_encrypted: Mapped[str | None] = mapped_column(Text)
    schema: Mapped[str | None] = mapped_column(String(NAME_LENGTH))
    extra_encrypted: Mapped[str | None] = mapped_column(Text)
    description: Mapped[str | None] = mapped_column(Text)


class XCom(Base):
    """A value a task pushed; one per (run, task, key), overwritten by a later try."""

    __tablename__ = "xcoms"
    __table_args__ = (UniqueConstraint("run_id", "task_id", "key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"))
    task_id: Mapped[str] = mapped_column(String(NAME_LENGTH))
    key: Mapped[str] = mapped_column(String(NAME_LENGTH))
    # Never SQL NULL: a pushed None is stored as the JSON literal null.
    value: Mapped[Any] = mapped_column(JSON, nullable=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    run: Mapped[Run] = relationship()


class UsedJti(Base):
    """A ``jti`` of a single-use supervisor assertion, kept until the assertion would expire.

    Inserting the ``jti`` is the replay check: the primary key makes a second use fail on every
    replica at once. Rows past ``expires_at`` can be deleted at any time.
    """

    __tablename__ = "used_jtis"

    jti: Mapped[str] = mapped_column(String(NAME_LENGTH), primary_key=True)
    expires_at: Mapped[datetime] = mapped_column(index=True)


class SigningKey(Base):
    """A public key of the token-signing key ring, published so every replica can verify.

    Private keys never enter the database. ``retired_at`` is when the key was retired: from
    then on it verifies nothing, on any replica, and it is left out of ``/v1/jwks``. The row
    stays, so that a replica whose ring still holds the key cannot publish it again. (A key
    that merely stopped signing after a rotation is not retired: it keeps verifying the tokens
    it signed until it is pruned from the ring or retired.)
    """

    __tablename__ = "signing_keys"

    kid: Mapped[str] = mapped_column(String(NAME_LENGTH), primary_key=True)
    public_key_pem: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    retired_at: Mapped[datetime | None] = mapped_column()


class PolicyGrant(Base):
    """Operator policy: workflows matching ``workflow_pattern`` may read matching names.

    Patterns are shell-style globs (``fnmatch``), matched by the server. Grants are only ever
    written by operators; workflow code cannot create them.
    """

    __tablename__ = "policy_grants"
    __table_args__ = (UniqueConstraint("workflow_pattern", "kind", "name_pattern"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    workflow_pattern: Mapped[str] = mapped_column(String(NAME_LENGTH))
    kind: Mapped[GrantKind] = mapped_column(_state_enum(GrantKind, "grant_kind"))
    name_pattern: Mapped[str] = mapped_column(String(NAME_LENGTH))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class AuditLog(Base):
    """An append-only record of security events (tokens issued, requests denied, ...).

    The migration installs triggers that make UPDATE and DELETE (and TRUNCATE on PostgreSQL)
    fail, so not even a bug in the server can rewrite history; pruning old entries is a
    deliberate migration, not an API call.
    """

    __tablename__ = "audit_log"
    __table_args__ = (
        Index("ix_audit_log_event_at", "event", "at"),
        # "Was this item's token ever issued to this supervisor?": how the central logs tell
        # a supervisor that held an item (and may still ship its output) from one that never did.
        Index("ix_audit_log_subject", "subject"),
    )

    # BIGINT on PostgreSQL; on SQLite only INTEGER PRIMARY KEY is the auto-incrementing rowid.
    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    event: Mapped[str] = mapped_column(String(64))
    actor: Mapped[str | None] = mapped_column(String(NAME_LENGTH))
    subject: Mapped[str | None] = mapped_column(String(NAME_LENGTH))
    detail: Mapped[dict[str, Any] | None] = mapped_column(NullableJSON)


class AttemptLog(Base):
    """The central copy of one work item's output (a task attempt's, a parse job's or a
    trigger batch's), one per item however many executions and supervisors wrote it.

    ``size_bytes`` counts what is stored, for the per-item cap and the retention's byte
    budget; ``last_seq`` is the newest chunk's ``seq``, taken under this row's lock, so appends
    from two supervisors (the end of a deferred execution and its resumption elsewhere)
    interleave without colliding. ``final_execution`` is the newest task execution whose
    supervisor said "that was all of it".
    """

    __tablename__ = "attempt_logs"
    __table_args__ = (Index("ix_attempt_logs_updated_at", "updated_at"),)

    item_id: Mapped[str] = mapped_column(String(NAME_LENGTH), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    last_seq: Mapped[int] = mapped_column(Integer, default=0)
    truncated: Mapped[bool] = mapped_column(Boolean, default=False)
    final_execution: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class AttemptLogStream(Base):
    """One node-local log file feeding an item's central log: its supervisor, and how many of
    its bytes the server has (``end_offset``). A chunk names its starting offset in the file,
    so a chunk sent twice (its answer was lost, the supervisor restarted) is acknowledged and
    not stored twice."""

    __tablename__ = "attempt_log_streams"

    item_id: Mapped[str] = mapped_column(ForeignKey("attempt_logs.item_id"), primary_key=True)
    stream: Mapped[str] = mapped_column(String(64), primary_key=True)
    supervisor_id: Mapped[str] = mapped_column(ForeignKey("supervisors.id"))
    end_offset: Mapped[int] = mapped_column(BigInteger, default=0)
    final: Mapped[bool] = mapped_column(Boolean, default=False)


class AttemptLogChunk(Base):
    """A piece of an item's central log, in the order the server stored it (``seq``)."""

    __tablename__ = "attempt_log_chunks"

    item_id: Mapped[str] = mapped_column(ForeignKey("attempt_logs.item_id"), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    text: Mapped[str] = mapped_column(Text)


AUDIT_LOG_APPEND_ONLY_MESSAGE = "audit_log is append-only"
