"""Task endpoints: what one running attempt may do, and only to itself.

A task token changes only its own attempt's state and writes only its own XComs. It reads
XComs of its own run, and variables and connections that operator policy grants to its
workflow. State changes re-check "still running, same try, same supervisor" inside the
writing transaction, so a token cannot race its own attempt's end.
"""

from __future__ import annotations

from datetime import timedelta
from fnmatch import fnmatchcase

from fastapi import APIRouter, Request
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from privsep.server.auth import State_, Task_, TaskPrincipal, audit
from privsep.server.db.models import (
    AttemptState,
    Connection,
    GrantKind,
    PolicyGrant,
    Run,
    TaskAttempt,
    Trigger,
    Variable,
    XCom,
    utcnow,
)
from privsep.server.errors import ERROR_RESPONSES, conflict, forbidden, not_found, unauthorized
from privsep.server.routes._sql import affected
from privsep.server.runs import advance, fail_or_retry
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


def _own_running_attempt(session: Session, me: TaskPrincipal) -> TaskAttempt:
    """The caller's attempt, locked for this transaction, still running as the token says."""
    attempt = session.get(TaskAttempt, me.attempt_id, with_for_update=True)
    if (
        attempt is None
        or attempt.state != AttemptState.RUNNING
        or attempt.try_number != me.try_number
        or attempt.supervisor_id != me.supervisor_id
    ):
        raise unauthorized("revoked", "the attempt this token was issued for is no longer running")
    return attempt


def _granted(session: Session, workflow_id: str, kind: GrantKind, name: str) -> bool:
    grants = session.scalars(select(PolicyGrant).where(PolicyGrant.kind == kind))
    return any(
        fnmatchcase(workflow_id, g.workflow_pattern) and fnmatchcase(name, g.name_pattern)
        for g in grants
    )


def _require_grant(
    request: Request, state: ServerState, me: TaskPrincipal, kind: GrantKind, name: str
) -> None:
    """Deny unless operator policy grants this workflow ``name``. Checked in its own read
    transaction before any write starts, so the denial can be audited on its own."""
    with state.db.read_session() as session:
        allowed = _granted(session, me.workflow_id, kind, name)
    if not allowed:
        audit(
            state,
            "request_denied",
            subject=me.attempt_id,
            detail={"path": request.url.path, "code": "not_granted", "kind": kind.value},
        )
        raise forbidden(
            f"policy grants workflow {me.workflow_id!r} no access to this {kind.value}",
            "not_granted",
        )


@router.get("/context", response_model=TaskContext)
def context(me: TaskPrincipal = Task_, state: ServerState = State_) -> TaskContext:
    with state.db.read_session() as session:
        run = session.get(Run, me.run_id)
        attempt = session.get(TaskAttempt, me.attempt_id)
        return TaskContext(
            attempt_id=me.attempt_id,
            run_id=me.run_id,
            workflow_id=me.workflow_id,
            task_id=me.task_id,
            try_number=me.try_number,
            params=run.conf if run else {},
            trigger_event=attempt.trigger_event if attempt else None,
        )


@router.post("/heartbeat", response_model=Ok)
def heartbeat(me: TaskPrincipal = Task_, state: ServerState = State_) -> Ok:
    with state.db.write_session() as session:
        _own_running_attempt(session, me).heartbeat_at = utcnow()
    return Ok()


@router.post("/succeed", response_model=AttemptStateResponse)
def succeed(
    body: SucceedRequest, me: TaskPrincipal = Task_, state: ServerState = State_
) -> AttemptStateResponse:
    with state.db.write_session() as session:
        attempt = _own_running_attempt(session, me)
        if body.return_value is not None:
            _put_xcom(session, me, "return_value", body.return_value)
        attempt.state = AttemptState.SUCCESS
        attempt.ended_at = utcnow()
        run = session.get(Run, me.run_id)
        if run is not None:
            advance(session, run)
        return AttemptStateResponse(state=attempt.state.value)


@router.post("/fail", response_model=AttemptStateResponse)
def fail(
    body: FailRequest, me: TaskPrincipal = Task_, state: ServerState = State_
) -> AttemptStateResponse:
    """Fail for good: no retry, whatever the task's retries say."""
    with state.db.write_session() as session:
        attempt = _own_running_attempt(session, me)
        return AttemptStateResponse(
            state=fail_or_retry(session, attempt, body.error, allow_retry=False).value
        )


@router.post("/retry", response_model=AttemptStateResponse)
def retry(
    body: FailRequest, me: TaskPrincipal = Task_, state: ServerState = State_
) -> AttemptStateResponse:
    """Fail this try; a new try is queued if the task has retries left."""
    with state.db.write_session() as session:
        attempt = _own_running_attempt(session, me)
        return AttemptStateResponse(state=fail_or_retry(session, attempt, body.error).value)


@router.post("/defer", response_model=AttemptStateResponse)
def defer(
    body: DeferRequest, me: TaskPrincipal = Task_, state: ServerState = State_
) -> AttemptStateResponse:
    """Park the attempt on a trigger. No sandbox is held while it waits; when the trigger
    fires, the attempt is queued again (same try) with the event in its context."""
    with state.db.write_session() as session:
        attempt = _own_running_attempt(session, me)
        trigger = Trigger(attempt_id=attempt.id, serialized=body.trigger.model_dump())
        session.add(trigger)
        session.flush()
        attempt.state = AttemptState.DEFERRED
        attempt.trigger_id = trigger.id
        attempt.supervisor_id = None
        if body.timeout is not None:
            attempt.next_try_at = utcnow() + timedelta(seconds=body.timeout)
        return AttemptStateResponse(state=attempt.state.value)


# --- variables and connections ----------------------------------------------------------------


@router.get("/variables/{key}", response_model=VariableResponse)
def get_variable(
    key: str, request: Request, me: TaskPrincipal = Task_, state: ServerState = State_
) -> VariableResponse:
    _require_grant(request, state, me, GrantKind.VARIABLE, key)
    with state.db.read_session() as session:
        variable = session.get(Variable, key)
        if variable is None:
            raise not_found(f"no variable {key!r}")
        return VariableResponse(key=key, value=variable.value)


@router.put("/variables/{key}", response_model=Ok)
def set_variable(
    key: str,
    body: VariableBody,
    request: Request,
    me: TaskPrincipal = Task_,
    state: ServerState = State_,
) -> Ok:
    _require_grant(request, state, me, GrantKind.VARIABLE, key)
    with state.db.write_session() as session:
        _own_running_attempt(session, me)
        variable = session.get(Variable, key)
        if variable is None:
            session.add(Variable(key=key, value=body.value))
        else:
            variable.value = body.value
    return Ok()


@router.delete("/variables/{key}", response_model=Ok)
def delete_variable(
    key: str, request: Request, me: TaskPrincipal = Task_, state: ServerState = State_
) -> Ok:
    _require_grant(request, state, me, GrantKind.VARIABLE, key)
    with state.db.write_session() as session:
        _own_running_attempt(session, me)
        if not affected(session, delete(Variable).where(Variable.key == key)):
            raise not_found(f"no variable {key!r}")
    return Ok()


@router.get("/connections/{conn_id}", response_model=ConnectionResponse)
def get_connection(
    conn_id: str, request: Request, me: TaskPrincipal = Task_, state: ServerState = State_
) -> ConnectionResponse:
    _require_grant(request, state, me, GrantKind.CONNECTION, conn_id)
    with state.db.read_session() as session:
        conn = session.get(Connection, conn_id)
        if conn is None:
            raise not_found(f"no connection {conn_id!r}")
        cipher = state.cipher
        if cipher is None and (conn.password_encrypted or conn.extra_encrypted):
            raise conflict("the server has no Fernet key configured", "no_fernet_key")

        def reveal(value: str | None) -> str | None:
            return cipher.decrypt(value) if (value and cipher) else value

        return ConnectionResponse.model_validate(
            {
                "conn_id": conn.conn_id,
                "conn_type": conn.conn_type,
                "host": conn.host,
                "port": conn.port,
                "login": conn.login,
                "password": reveal(conn.password_encrypted),
                "schema": conn.schema,
                "extra": reveal(conn.extra_encrypted),
            }
        )


# --- XComs ---------------------------------------------------------------------------------


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
    key: str, body: XComBody, me: TaskPrincipal = Task_, state: ServerState = State_
) -> Ok:
    """Write an XCom of this task in this run; there is no way to name another task."""
    with state.db.write_session() as session:
        _own_running_attempt(session, me)
        _put_xcom(session, me, key, body.value)
    return Ok()


@router.get("/xcoms/{task_id}/{key}", response_model=XComResponse)
def pull_xcom(
    task_id: str, key: str, me: TaskPrincipal = Task_, state: ServerState = State_
) -> XComResponse:
    """Read an XCom of any task, but only within the caller's own run."""
    with state.db.read_session() as session:
        xcom = session.scalars(
            select(XCom).where(XCom.run_id == me.run_id, XCom.task_id == task_id, XCom.key == key)
        ).first()
        if xcom is None:
            raise not_found(f"no XCom {key!r} from task {task_id!r} in this run")
        return XComResponse(task_id=task_id, key=key, value=xcom.value)
