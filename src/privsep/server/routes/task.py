"""Task endpoints: what one running attempt may do, and only to itself.

A task token changes only its own attempt's state and writes only its own XComs. It reads
XComs of its own run, and variables and connections that operator policy grants to its
workflow.

Every route checks "still running, same try, same supervisor" in the same statement or
transaction that does its work, so a token cannot race its own attempt's end, and a request
costs one database round trip and one trip to a worker thread at most:

* the token itself is checked by :func:`~privsep.server.auth.task_token`, an async dependency
  (a dictionary look-up for a token this worker verified before);
* reads (:func:`read_variable`, :func:`read_xcom`, the connection read) are one statement on a
  read-only driver connection that returns the attempt's state, its workflow, the policy grants
  of that kind and the value together; the grants are matched here, with ``fnmatch``;
* writes run in one write transaction that locks the attempt, checks it and the grants, then
  writes.

Refusals are raised as :class:`~privsep.server.auth.Denied` and audited after the transaction
is over. :mod:`privsep.server.fastpath` serves the hottest of these routes without FastAPI,
through the very same functions.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from datetime import timedelta
from fnmatch import fnmatchcase
from typing import Any, ParamSpec, TypeVar

from fastapi import APIRouter, Request
from sqlalchemy import bindparam, delete, insert, select, update
from sqlalchemy.orm import Session

from privsep.server.auth import (
    ATTEMPT_COLUMNS,
    Denied,
    State_,
    TaskPrincipal,
    TaskToken,
    TaskToken_,
    check_attempt,
    load_task_principal,
    revoked,
)
from privsep.server.db.models import (
    AttemptState,
    GrantKind,
    PolicyGrant,
    Run,
    TaskAttempt,
    Trigger,
    Variable,
    XCom,
    utcnow,
)
from privsep.server.errors import ERROR_RESPONSES, conflict, forbidden, not_found
from privsep.server.readpool import ReadPool
from privsep.server.routes._sql import affected
from privsep.server.runs import advance_run, fail_or_retry
from privsep.server.schemas import (
    AttemptStateResponse,
    ConnectionResponse,
    DeferRequest,
    FailRequest,
    Ok,
    SucceedRequest,
    TaskContext,
    VariableBody,
    VariableResponse,
    XComBody,
    XComResponse,
)
from privsep.server.state import ServerState

router = APIRouter(prefix="/v1/task", tags=["task"], responses=ERROR_RESPONSES)

P = ParamSpec("P")
T = TypeVar("T")


def answering(
    request: Request, state: ServerState, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs
) -> T:
    """``fn(...)``, with a :class:`Denied` refusal audited and raised as its API error."""
    try:
        return fn(*args, **kwargs)
    except Denied as denied:
        raise denied.answer(state, request.url.path) from None


# --- policy ----------------------------------------------------------------------------------


def require_grant(
    token: TaskToken,
    grants: Iterable[tuple[str, str]],
    workflow_id: str,
    kind: GrantKind,
    name: str,
) -> None:
    """Deny (403 ``not_granted``, audited) unless a ``(workflow_pattern, name_pattern)`` of
    ``grants`` matches this workflow and ``name``."""
    if not any(fnmatchcase(workflow_id, wf) and fnmatchcase(name, nm) for wf, nm in grants):
        raise Denied(
            forbidden(
                f"policy grants workflow {workflow_id!r} no access to this {kind.value}",
                "not_granted",
            ),
            token.attempt_id,
            {"code": "not_granted", "kind": kind.value},
        )


def _grants_in(session: Session, kind: GrantKind) -> list[tuple[str, str]]:
    rows = session.execute(
        select(PolicyGrant.workflow_pattern, PolicyGrant.name_pattern).where(
            PolicyGrant.kind == kind
        )
    )
    return [(wf, nm) for wf, nm in rows]


# --- one-statement reads ---------------------------------------------------------------------
#
# Each statement returns one row tagged 'a' (the attempt, its workflow and the resource,
# left-joined so a missing resource is NULLs) and, for policy-checked reads, one row tagged
# 'g' per grant of the kind asked for. Both halves of the UNION start with two text columns.

_GRANT_ROWS = (
    "SELECT 'g', g.workflow_pattern, g.name_pattern{nulls} FROM policy_grants g "
    "WHERE g.kind = :kind"
)


def _with_grants(main: str, columns: int) -> str:
    return f"{main} UNION ALL {_GRANT_ROWS.format(nulls=', NULL' * (columns - 3))}"


_VARIABLE_SQL = _with_grants(
    f"SELECT 'a', {ATTEMPT_COLUMNS}, r.workflow_id, v.value FROM task_attempts a "  # noqa: S608
    "JOIN runs r ON r.id = a.run_id LEFT JOIN variables v ON v.key = :key "
    "WHERE a.id = :attempt",
    columns=8,
)

_CONNECTION_SQL = _with_grants(
    f"SELECT 'a', {ATTEMPT_COLUMNS}, r.workflow_id, c.conn_id, c.conn_type, c.host, c.port, "  # noqa: S608
    "c.login, c.password_encrypted, c.schema, c.extra_encrypted FROM task_attempts a "
    "JOIN runs r ON r.id = a.run_id LEFT JOIN connections c ON c.conn_id = :conn_id "
    "WHERE a.id = :attempt",
    columns=15,
)

# JSON is stored as text on SQLite (where a bare number comes back as a number, because of the
# column's affinity) and as ``json`` on PostgreSQL (cast to its text here): see _json_value.
_XCOM_SQL = (
    f"SELECT {ATTEMPT_COLUMNS}, x.value, x.id FROM task_attempts a "  # noqa: S608
    "LEFT JOIN xcoms x ON x.run_id = a.run_id AND x.task_id = :task_id AND x.key = :key "
    "WHERE a.id = :attempt"
)
_XCOM_SQL_PG = _XCOM_SQL.replace("x.value,", "CAST(x.value AS TEXT),")


def _split(rows: Sequence[tuple[Any, ...]]) -> tuple[tuple[Any, ...] | None, list[tuple[str, str]]]:
    attempt: tuple[Any, ...] | None = None
    grants: list[tuple[str, str]] = []
    for row in rows:
        if row[0] == "a":
            attempt = row[1:]
        else:
            grants.append((row[1], row[2]))
    return attempt, grants


def read_variable(reads: ReadPool, token: TaskToken, key: str) -> str:
    """The value of variable ``key``, if the attempt is live and policy grants it."""
    attempt, grants = _split(
        reads.fetch(
            reads.sql(_VARIABLE_SQL),
            {"attempt": token.attempt_id, "key": key, "kind": GrantKind.VARIABLE.value},
        )
    )
    me = check_attempt(token, attempt, attempt[5] if attempt else "")
    require_grant(token, grants, me.workflow_id, GrantKind.VARIABLE, key)
    assert attempt is not None  # noqa: S101 - check_attempt refused otherwise
    value = attempt[6]
    if value is None:
        raise not_found(f"no variable {key!r}")
    return str(value)


def _json_value(stored: Any) -> Any:
    return json.loads(stored) if isinstance(stored, str) else stored


def read_xcom(reads: ReadPool, token: TaskToken, task_id: str, key: str) -> Any:
    """An XCom of ``task_id`` in the caller's own run, if the attempt is live."""
    rows = reads.fetch(
        reads.sql(_XCOM_SQL, _XCOM_SQL_PG),
        {"attempt": token.attempt_id, "task_id": task_id, "key": key},
    )
    row = rows[0] if rows else None
    check_attempt(token, row, "")
    assert row is not None  # noqa: S101 - check_attempt refused otherwise
    if row[6] is None:  # no such XCom (its id is never NULL)
        raise not_found(f"no XCom {key!r} from task {task_id!r} in this run")
    return _json_value(row[5])


def beat(state: ServerState, token: TaskToken) -> None:
    """Record a heartbeat, in one conditional UPDATE: only a live attempt's row matches."""
    with state.db.write_session() as session:
        updated = affected(
            session,
            update(TaskAttempt)
            .where(
                TaskAttempt.id == token.attempt_id,
                TaskAttempt.state == AttemptState.RUNNING,
                TaskAttempt.try_number == token.try_number,
                TaskAttempt.supervisor_id == token.supervisor_id,
            )
            .values(heartbeat_at=utcnow())
            .execution_options(synchronize_session=False),
        )
    if not updated:
        load_task_principal(state, token)  # raises the refusal that says why, or else:
        raise revoked(token, "the attempt this token was issued for is no longer running")


# --- writes ----------------------------------------------------------------------------------


def _own_running_attempt(session: Session, token: TaskToken) -> tuple[TaskAttempt, TaskPrincipal]:
    """The caller's attempt, locked for this transaction, still running as the token says."""
    row = session.execute(
        select(TaskAttempt, Run.workflow_id)
        .join(Run, Run.id == TaskAttempt.run_id)
        .where(TaskAttempt.id == token.attempt_id)
        .with_for_update(of=TaskAttempt)
    ).first()
    if row is None:
        raise revoked(token, "no such attempt")
    attempt, workflow_id = row
    me = check_attempt(
        token,
        (attempt.state, attempt.supervisor_id, attempt.try_number, attempt.run_id, attempt.task_id),
        workflow_id,
    )
    return attempt, me


@router.get("/context", response_model=TaskContext)
def context(
    request: Request, token: TaskToken = TaskToken_, state: ServerState = State_
) -> TaskContext:
    return answering(request, state, read_context, state.reads, token)


_CONTEXT_SQL = (
    f"SELECT {ATTEMPT_COLUMNS}, r.workflow_id, r.conf, a.trigger_event "  # noqa: S608
    "FROM task_attempts a JOIN runs r ON r.id = a.run_id WHERE a.id = :attempt"
)
_CONTEXT_SQL_PG = _CONTEXT_SQL.replace(
    "r.conf, a.trigger_event", "CAST(r.conf AS TEXT), CAST(a.trigger_event AS TEXT)"
)


def read_context(reads: ReadPool, token: TaskToken) -> TaskContext:
    """The attempt's context (run, workflow, task, try, params, trigger event), if it is
    live: one statement."""
    rows = reads.fetch(reads.sql(_CONTEXT_SQL, _CONTEXT_SQL_PG), {"attempt": token.attempt_id})
    row = rows[0] if rows else None
    me = check_attempt(token, row, row[5] if row else "")
    assert row is not None  # noqa: S101 - check_attempt refused otherwise
    return TaskContext(
        attempt_id=me.attempt_id,
        run_id=me.run_id,
        workflow_id=me.workflow_id,
        task_id=me.task_id,
        try_number=me.try_number,
        params=_json_value(row[6]) or {},
        trigger_event=_json_value(row[7]),
    )


@router.post("/heartbeat", response_model=Ok)
def heartbeat(request: Request, token: TaskToken = TaskToken_, state: ServerState = State_) -> Ok:
    answering(request, state, beat, state, token)
    return Ok()


@router.post("/succeed", response_model=AttemptStateResponse)
def succeed(
    body: SucceedRequest,
    request: Request,
    token: TaskToken = TaskToken_,
    state: ServerState = State_,
) -> AttemptStateResponse:
    answering(request, state, finish_success, state, token, body.return_value)
    return AttemptStateResponse(state=AttemptState.SUCCESS.value)


# Built once: constructing a statement costs about as much Python as executing it.
_END_AS_SUCCESS = (
    update(TaskAttempt)
    .where(
        TaskAttempt.id == bindparam("b_attempt_id"),
        TaskAttempt.state == AttemptState.RUNNING,
        TaskAttempt.try_number == bindparam("b_try_number"),
        TaskAttempt.supervisor_id == bindparam("b_supervisor_id"),
    )
    .values(state=AttemptState.SUCCESS, ended_at=bindparam("b_now"))
    .returning(TaskAttempt.run_id, TaskAttempt.task_id)
    .execution_options(synchronize_session=False)
)
_RUN_VERSION = select(Run.workflow_version_id).where(Run.id == bindparam("run_id"))


def finish_success(state: ServerState, token: TaskToken, return_value: Any) -> None:
    """End the token's attempt as a success, store its return value, move the run on.

    The attempt is checked and ended by one conditional UPDATE (only a running attempt with
    the token's try and supervisor matches); when it matches nothing, the attempt is read
    again to say why. The rest is Core statements: the ORM's unit of work cost more than the
    statements themselves on the hottest write a task makes."""
    with state.db.write_session() as session:
        ended = session.execute(
            _END_AS_SUCCESS,
            {
                "b_attempt_id": token.attempt_id,
                "b_try_number": token.try_number,
                "b_supervisor_id": token.supervisor_id,
                "b_now": utcnow(),
            },
        ).first()
        if ended is None:
            _own_running_attempt(session, token)  # raises the refusal that says why
            raise revoked(token, "the attempt this token was issued for is no longer running")
        run_id, task_id = ended
        if return_value is not None:
            _put_xcom_core(session, run_id, task_id, "return_value", return_value)
        version_id = session.scalar(_RUN_VERSION, {"run_id": run_id})
        if version_id is not None:
            advance_run(session, run_id, version_id, task_id)


@router.post("/fail", response_model=AttemptStateResponse)
def fail(
    body: FailRequest, request: Request, token: TaskToken = TaskToken_, state: ServerState = State_
) -> AttemptStateResponse:
    """Fail for good: no retry, whatever the task's retries say."""

    def work() -> AttemptStateResponse:
        with state.db.write_session() as session:
            attempt, _ = _own_running_attempt(session, token)
            return AttemptStateResponse(
                state=fail_or_retry(session, attempt, body.error, allow_retry=False).value
            )

    return answering(request, state, work)


@router.post("/retry", response_model=AttemptStateResponse)
def retry(
    body: FailRequest, request: Request, token: TaskToken = TaskToken_, state: ServerState = State_
) -> AttemptStateResponse:
    """Fail this try; a new try is queued if the task has retries left."""

    def work() -> AttemptStateResponse:
        with state.db.write_session() as session:
            attempt, _ = _own_running_attempt(session, token)
            return AttemptStateResponse(state=fail_or_retry(session, attempt, body.error).value)

    return answering(request, state, work)


@router.post("/defer", response_model=AttemptStateResponse)
def defer(
    body: DeferRequest, request: Request, token: TaskToken = TaskToken_, state: ServerState = State_
) -> AttemptStateResponse:
    """Park the attempt on a trigger. No sandbox is held while it waits; when the trigger
    fires, the attempt is queued again (same try) with the event in its context."""

    def work() -> AttemptStateResponse:
        with state.db.write_session() as session:
            attempt, _ = _own_running_attempt(session, token)
            trigger = Trigger(attempt_id=attempt.id, serialized=body.trigger.model_dump())
            session.add(trigger)
            session.flush()
            attempt.state = AttemptState.DEFERRED
            attempt.trigger_id = trigger.id
            attempt.supervisor_id = None
            if body.timeout is not None:
                attempt.next_try_at = utcnow() + timedelta(seconds=body.timeout)
            return AttemptStateResponse(state=attempt.state.value)

    return answering(request, state, work)


# --- variables and connections ----------------------------------------------------------------


@router.get("/variables/{key}", response_model=VariableResponse)
def get_variable(
    key: str, request: Request, token: TaskToken = TaskToken_, state: ServerState = State_
) -> VariableResponse:
    value = answering(request, state, read_variable, state.reads, token, key)
    return VariableResponse(key=key, value=value)


@router.put("/variables/{key}", response_model=Ok)
def set_variable(
    key: str,
    body: VariableBody,
    request: Request,
    token: TaskToken = TaskToken_,
    state: ServerState = State_,
) -> Ok:
    def work() -> None:
        with state.db.write_session() as session:
            _, me = _own_running_attempt(session, token)
            grants = _grants_in(session, GrantKind.VARIABLE)
            require_grant(token, grants, me.workflow_id, GrantKind.VARIABLE, key)
            variable = session.get(Variable, key)
            if variable is None:
                session.add(Variable(key=key, value=body.value))
            else:
                variable.value = body.value

    answering(request, state, work)
    return Ok()


@router.delete("/variables/{key}", response_model=Ok)
def delete_variable(
    key: str, request: Request, token: TaskToken = TaskToken_, state: ServerState = State_
) -> Ok:
    def work() -> None:
        with state.db.write_session() as session:
            _, me = _own_running_attempt(session, token)
            grants = _grants_in(session, GrantKind.VARIABLE)
            require_grant(token, grants, me.workflow_id, GrantKind.VARIABLE, key)
            if not affected(session, delete(Variable).where(Variable.key == key)):
                raise not_found(f"no variable {key!r}")

    answering(request, state, work)
    return Ok()


def read_connection(reads: ReadPool, token: TaskToken, conn_id: str) -> tuple[Any, ...]:
    """The connection's columns (still encrypted), if the attempt is live and policy grants
    it: ``conn_id, conn_type, host, port, login, password_encrypted, schema, extra_encrypted``."""
    attempt, grants = _split(
        reads.fetch(
            reads.sql(_CONNECTION_SQL),
            {"attempt": token.attempt_id, "conn_id": conn_id, "kind": GrantKind.CONNECTION.value},
        )
    )
    me = check_attempt(token, attempt, attempt[5] if attempt else "")
    require_grant(token, grants, me.workflow_id, GrantKind.CONNECTION, conn_id)
    assert attempt is not None  # noqa: S101 - check_attempt refused otherwise
    if attempt[6] is None:
        raise not_found(f"no connection {conn_id!r}")
    return attempt[6:14]


@router.get("/connections/{conn_id}", response_model=ConnectionResponse)
def get_connection(
    conn_id: str, request: Request, token: TaskToken = TaskToken_, state: ServerState = State_
) -> ConnectionResponse:
    found = answering(request, state, read_connection, state.reads, token, conn_id)
    conn_id_, conn_type, host, port, login, password_encrypted, schema, extra_encrypted = found
    cipher = state.cipher
    if cipher is None and (password_encrypted or extra_encrypted):
        raise conflict("the server has no Fernet key configured", "no_fernet_key")

    def reveal(value: str | None) -> str | None:
        return cipher.decrypt(value) if (value and cipher) else value

    return ConnectionResponse.model_validate(
        {
            "conn_id": conn_id_,
            "conn_type": conn_type,
            "host": host,
            "port": port,
            "login": login,
            "password": reveal(password_encrypted),
            "schema": schema,
            "extra": reveal(extra_encrypted),
        }
    )


# --- XComs ---------------------------------------------------------------------------------


def _put_xcom_core(session: Session, run_id: str, task_id: str, key: str, value: object) -> None:
    """Insert or replace one XCom with Core statements (no ORM objects)."""
    replaced = affected(
        session,
        update(XCom)
        .where(XCom.run_id == run_id, XCom.task_id == task_id, XCom.key == key)
        .values(value=value, created_at=utcnow())
        .execution_options(synchronize_session=False),
    )
    if not replaced:
        session.execute(insert(XCom).values(run_id=run_id, task_id=task_id, key=key, value=value))


def _put_xcom(session: Session, me: TaskPrincipal, key: str, value: object) -> None:
    existing = session.scalars(
        select(XCom).where(XCom.run_id == me.run_id, XCom.task_id == me.task_id, XCom.key == key)
    ).first()
    if existing is None:
        session.add(XCom(run_id=me.run_id, task_id=me.task_id, key=key, value=value))
    else:
        existing.value = value
        existing.created_at = utcnow()


@router.put("/xcoms/{key}", response_model=Ok)
def push_xcom(
    key: str,
    body: XComBody,
    request: Request,
    token: TaskToken = TaskToken_,
    state: ServerState = State_,
) -> Ok:
    """Write an XCom of this task in this run; there is no way to name another task."""

    def work() -> None:
        with state.db.write_session() as session:
            _, me = _own_running_attempt(session, token)
            _put_xcom(session, me, key, body.value)

    answering(request, state, work)
    return Ok()


@router.get("/xcoms/{task_id}/{key}", response_model=XComResponse)
def pull_xcom(
    task_id: str,
    key: str,
    request: Request,
    token: TaskToken = TaskToken_,
    state: ServerState = State_,
) -> XComResponse:
    """Read an XCom of any task, but only within the caller's own run."""
    value = answering(request, state, read_xcom, state.reads, token, task_id, key)
    return XComResponse(task_id=task_id, key=key, value=value)
