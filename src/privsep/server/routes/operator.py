"""Operator endpoints, behind their own credential: workflows, runs, variables, connections,
policy.

Policy grants are written here and nowhere else; workflow code cannot reach these routes
because no work token carries the ``operator`` scope. Connection secrets go one way only: an
operator can store a password or extra, but every read answers ``"***"`` for them, so a stolen
operator session cannot be turned into the connections' secrets.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Path
from sqlalchemy import Delete, delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from privsep.server.auth import (
    Operator_,
    OperatorPrincipal,
    State_,
    audit,
)
from privsep.server.db.models import (
    Connection,
    GrantKind,
    ParseError,
    PolicyGrant,
    Run,
    TaskAttempt,
    Variable,
    Workflow,
    WorkflowVersion,
)
from privsep.server.errors import ERROR_RESPONSES, conflict, not_found
from privsep.server.routes._sql import affected
from privsep.server.runs import start_run
from privsep.server.schemas import (
    MASKED,
    AttemptResponse,
    AttemptsResponse,
    ConnectionBody,
    ConnectionsResponse,
    GrantBody,
    GrantResponse,
    GrantsResponse,
    Ok,
    OperatorConnectionResponse,
    OperatorVariableBody,
    OperatorVariableResponse,
    ParseErrorResponse,
    ParseErrorsResponse,
    RunDetailResponse,
    RunResponse,
    RunsResponse,
    TriggerRunRequest,
    VariablesResponse,
    VariableSummary,
    WorkflowDetailResponse,
    WorkflowsResponse,
    WorkflowSummary,
)
from privsep.server.state import ServerState

# Grant ids are 32-bit INTEGER columns (PostgreSQL): a larger number is a 422, never an
# overflow in the database driver.
GrantId = Annotated[int, Path(ge=1, le=2**31 - 1)]

router = APIRouter(prefix="/v1/operator", tags=["operator"], responses=ERROR_RESPONSES)

_Row = TypeVar("_Row", Connection, Run, Variable, Workflow)


def _iso(moment: datetime | None) -> str | None:
    """A timestamp as the API spells it; None stays None (not started, not ended)."""
    return moment.isoformat() if moment else None


def _limit(limit: int) -> int:
    """Listings are bounded: a typo'd limit must not make the server build a huge answer."""
    return max(1, min(limit, 1000))


def _get_or_404(session: Session, model: type[_Row], key: str, what: str) -> _Row:
    """The row with primary key ``key``; a missing one is the caller's 404, named by ``what``."""
    row = session.get(model, key)
    if row is None:
        raise not_found(f"no {what} {key!r}")
    return row


def _delete_or_404(state: ServerState, statement: Delete, missing: str) -> None:
    """Run a DELETE of one row in its own transaction; deleting nothing is a 404."""
    with state.db.write_session() as session:
        if not affected(session, statement):
            raise not_found(missing)


def _run_out(run: Run) -> RunResponse:
    return RunResponse(
        id=run.id,
        workflow_id=run.workflow_id,
        state=run.state.value,
        created_at=run.created_at.isoformat(),
        ended_at=_iso(run.ended_at),
    )


@router.post("/workflows/{workflow_id}/runs", response_model=RunResponse)
def trigger_run(
    workflow_id: str,
    body: TriggerRunRequest,
    me: OperatorPrincipal = Operator_,
    state: ServerState = State_,
) -> RunResponse:
    with state.db.write_session() as session:
        workflow = session.get(Workflow, workflow_id)
        if workflow is None or workflow.current_version_id is None:
            raise not_found(f"no parsed workflow {workflow_id!r}")
        if not workflow.active:
            raise conflict(f"workflow {workflow_id!r} is deactivated", "inactive")
        run = Run(
            workflow_id=workflow_id, workflow_version_id=workflow.current_version_id, conf=body.conf
        )
        session.add(run)
        session.flush()
        start_run(session, run)
        out = _run_out(run)
    audit(state, "run_triggered", actor=me.name, subject=out.id)
    return out


@router.get("/runs", response_model=RunsResponse)
def list_runs(
    workflow_id: str | None = None,
    limit: int = 100,
    me: OperatorPrincipal = Operator_,
    state: ServerState = State_,
) -> RunsResponse:
    with state.db.read_session() as session:
        query = select(Run).order_by(Run.created_at.desc()).limit(_limit(limit))
        if workflow_id:
            query = query.where(Run.workflow_id == workflow_id)
        return RunsResponse(runs=[_run_out(r) for r in session.scalars(query)])


@router.get("/runs/{run_id}/attempts", response_model=AttemptsResponse)
def list_attempts(
    run_id: str, me: OperatorPrincipal = Operator_, state: ServerState = State_
) -> AttemptsResponse:
    with state.db.read_session() as session:
        _get_or_404(session, Run, run_id, "run")
        rows = session.scalars(
            select(TaskAttempt).where(TaskAttempt.run_id == run_id).order_by(TaskAttempt.created_at)
        )
        return AttemptsResponse(
            attempts=[
                AttemptResponse(
                    id=a.id,
                    task_id=a.task_id,
                    try_number=a.try_number,
                    state=a.state.value,
                    supervisor_id=a.supervisor_id,
                    started_at=_iso(a.started_at),
                    ended_at=_iso(a.ended_at),
                    error=a.error,
                )
                for a in rows
            ]
        )


@router.put("/variables/{key}", response_model=Ok)
def put_variable(
    key: str,
    body: OperatorVariableBody,
    me: OperatorPrincipal = Operator_,
    state: ServerState = State_,
) -> Ok:
    with state.db.write_session() as session:
        variable = session.get(Variable, key)
        if variable is None:
            session.add(Variable(key=key, value=body.value, description=body.description))
        else:
            variable.value = body.value
            variable.description = body.description
    return Ok()


@router.delete("/variables/{key}", response_model=Ok)
def delete_variable(key: str, me: OperatorPrincipal = Operator_, state: ServerState = State_) -> Ok:
    _delete_or_404(state, delete(Variable).where(Variable.key == key), f"no variable {key!r}")
    return Ok()


@router.put("/connections/{conn_id}", response_model=Ok)
def put_connection(
    conn_id: str,
    body: ConnectionBody,
    me: OperatorPrincipal = Operator_,
    state: ServerState = State_,
) -> Ok:
    """Store a connection; its password and extra are encrypted with the server's Fernet key."""
    cipher = state.cipher
    if cipher is None and (body.password or body.extra):
        raise conflict("set server.fernet_key before storing connection secrets", "no_fernet_key")

    def seal(value: str | None) -> str | None:
        return cipher.encrypt(value) if (value and cipher) else None

    with state.db.write_session() as session:
        session.execute(delete(Connection).where(Connection.conn_id == conn_id))
        session.add(
            Connection(
                conn_id=conn_id,
                conn_type=body.conn_type,
                host=body.host,
                port=body.port,
                login=body.login,
                password_encrypted=seal(body.password),
                schema=body.schema_,
                extra_encrypted=seal(body.extra),
                description=body.description,
            )
        )
    audit(state, "connection_written", actor=me.name, subject=conn_id)
    return Ok()


@router.delete("/connections/{conn_id}", response_model=Ok)
def delete_connection(
    conn_id: str, me: OperatorPrincipal = Operator_, state: ServerState = State_
) -> Ok:
    _delete_or_404(
        state, delete(Connection).where(Connection.conn_id == conn_id), f"no connection {conn_id!r}"
    )
    return Ok()


def _grant_out(grant: PolicyGrant) -> GrantResponse:
    return GrantResponse(
        id=grant.id,
        workflow_pattern=grant.workflow_pattern,
        kind=grant.kind.value,
        name_pattern=grant.name_pattern,
    )


@router.get("/policy", response_model=GrantsResponse)
def list_grants(me: OperatorPrincipal = Operator_, state: ServerState = State_) -> GrantsResponse:
    with state.db.read_session() as session:
        return GrantsResponse(grants=[_grant_out(g) for g in session.scalars(select(PolicyGrant))])


@router.post("/policy", response_model=GrantResponse)
def add_grant(
    body: GrantBody, me: OperatorPrincipal = Operator_, state: ServerState = State_
) -> GrantResponse:
    try:
        with state.db.write_session() as session:
            grant = PolicyGrant(
                workflow_pattern=body.workflow_pattern,
                kind=GrantKind(body.kind),
                name_pattern=body.name_pattern,
            )
            session.add(grant)
            session.flush()
            out = _grant_out(grant)
    except IntegrityError:
        raise conflict("that grant exists already", "exists") from None
    audit(state, "policy_granted", actor=me.name, subject=str(out.id), detail=body.model_dump())
    return out


@router.delete("/policy/{grant_id}", response_model=Ok)
def delete_grant(
    grant_id: GrantId, me: OperatorPrincipal = Operator_, state: ServerState = State_
) -> Ok:
    _delete_or_404(
        state, delete(PolicyGrant).where(PolicyGrant.id == grant_id), f"no grant {grant_id}"
    )
    audit(state, "policy_revoked", actor=me.name, subject=str(grant_id))
    return Ok()


# --- read views ------------------------------------------------------------------------------


def _definition(version: WorkflowVersion | None) -> dict[str, Any] | None:
    """The stored definition as JSON, or None; the text was written by the server itself from
    a validated model, so a row that does not parse means a corrupt database, not bad input."""
    if version is None:
        return None
    value = json.loads(version.definition)
    return value if isinstance(value, dict) else None


@router.get("/workflows", response_model=WorkflowsResponse)
def list_workflows(
    me: OperatorPrincipal = Operator_, state: ServerState = State_
) -> WorkflowsResponse:
    """Every known workflow with what its current version says (one query, no N+1)."""
    with state.db.read_session() as session:
        rows = session.execute(
            select(Workflow, WorkflowVersion)
            .outerjoin(WorkflowVersion, WorkflowVersion.id == Workflow.current_version_id)
            .order_by(Workflow.id)
        )
        out = []
        for row in rows:
            workflow, version = row.Workflow, row.WorkflowVersion
            definition = _definition(version) or {}
            schedule = definition.get("schedule")
            tasks = definition.get("tasks")
            out.append(
                WorkflowSummary(
                    id=workflow.id,
                    active=workflow.active,
                    current_version_id=workflow.current_version_id,
                    bundle_version=version.bundle_version if version else None,
                    schedule=schedule if isinstance(schedule, str | float | int) else None,
                    task_count=len(tasks) if isinstance(tasks, list) else 0,
                    source_uri=workflow.source_uri,
                )
            )
        return WorkflowsResponse(workflows=out)


@router.get("/workflows/{workflow_id}", response_model=WorkflowDetailResponse)
def show_workflow(
    workflow_id: str, me: OperatorPrincipal = Operator_, state: ServerState = State_
) -> WorkflowDetailResponse:
    with state.db.read_session() as session:
        workflow = _get_or_404(session, Workflow, workflow_id, "workflow")
        version = (
            session.get(WorkflowVersion, workflow.current_version_id)
            if workflow.current_version_id is not None
            else None
        )
        return WorkflowDetailResponse(
            id=workflow.id,
            active=workflow.active,
            current_version_id=workflow.current_version_id,
            bundle_version=version.bundle_version if version else None,
            source_uri=workflow.source_uri,
            parsed_at=version.created_at.isoformat() if version else None,
            definition=_definition(version),
        )


@router.get("/parse-errors", response_model=ParseErrorsResponse)
def list_parse_errors(
    limit: int = 100, me: OperatorPrincipal = Operator_, state: ServerState = State_
) -> ParseErrorsResponse:
    """Import errors of definition files, newest first.

    Its own path rather than ``/workflows/errors``, which a workflow named ``errors`` would own.
    """
    with state.db.read_session() as session:
        rows = session.scalars(
            select(ParseError)
            .order_by(ParseError.created_at.desc(), ParseError.id.desc())
            .limit(_limit(limit))
        )
        return ParseErrorsResponse(
            errors=[
                ParseErrorResponse(
                    id=e.id,
                    file_path=e.file_path,
                    message=e.message,
                    bundle_version=e.bundle_version,
                    created_at=e.created_at.isoformat(),
                )
                for e in rows
            ]
        )


@router.get("/runs/{run_id}", response_model=RunDetailResponse)
def show_run(
    run_id: str, me: OperatorPrincipal = Operator_, state: ServerState = State_
) -> RunDetailResponse:
    """One run by id: what ``runs trigger --wait`` polls, without listing every run."""
    with state.db.read_session() as session:
        run = _get_or_404(session, Run, run_id, "run")
        return RunDetailResponse(
            id=run.id,
            workflow_id=run.workflow_id,
            workflow_version_id=run.workflow_version_id,
            state=run.state.value,
            trigger_kind=run.trigger_kind.value,
            conf=dict(run.conf or {}),
            logical_date=_iso(run.logical_date),
            created_at=run.created_at.isoformat(),
            started_at=_iso(run.started_at),
            ended_at=_iso(run.ended_at),
        )


@router.get("/variables", response_model=VariablesResponse)
def list_variables(
    me: OperatorPrincipal = Operator_, state: ServerState = State_
) -> VariablesResponse:
    """Variable names and descriptions, not values: reading a value names it."""
    with state.db.read_session() as session:
        rows = session.execute(
            select(Variable.key, Variable.description).order_by(Variable.key)
        ).all()
        return VariablesResponse(
            variables=[VariableSummary(key=r.key, description=r.description) for r in rows]
        )


@router.get("/variables/{key}", response_model=OperatorVariableResponse)
def get_variable(
    key: str, me: OperatorPrincipal = Operator_, state: ServerState = State_
) -> OperatorVariableResponse:
    with state.db.read_session() as session:
        variable = _get_or_404(session, Variable, key, "variable")
        return OperatorVariableResponse(
            key=variable.key, value=variable.value, description=variable.description
        )


def _connection_out(conn: Connection) -> OperatorConnectionResponse:
    """Secrets are masked here, before anything leaves the server; they are never decrypted."""
    return OperatorConnectionResponse(
        conn_id=conn.conn_id,
        conn_type=conn.conn_type,
        host=conn.host,
        port=conn.port,
        login=conn.login,
        password=MASKED if conn.password_encrypted else None,
        schema=conn.schema,
        extra=MASKED if conn.extra_encrypted else None,
        description=conn.description,
    )


@router.get("/connections", response_model=ConnectionsResponse)
def list_connections(
    me: OperatorPrincipal = Operator_, state: ServerState = State_
) -> ConnectionsResponse:
    with state.db.read_session() as session:
        rows = session.scalars(select(Connection).order_by(Connection.conn_id))
        return ConnectionsResponse(connections=[_connection_out(c) for c in rows])


@router.get("/connections/{conn_id}", response_model=OperatorConnectionResponse)
def get_connection(
    conn_id: str, me: OperatorPrincipal = Operator_, state: ServerState = State_
) -> OperatorConnectionResponse:
    with state.db.read_session() as session:
        return _connection_out(_get_or_404(session, Connection, conn_id, "connection"))
