"""Operator endpoints, behind their own credential: runs, variables, connections, policy.

Policy grants are written here and nowhere else; workflow code cannot reach these routes
because no work token carries the ``operator`` scope.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError

from privsep.secrets.tokens import TokenRejected, issue_token
from privsep.secrets.tokens import verify_assertion as check_assertion
from privsep.server.auth import (
    DatabaseReplayGuard,
    Operator_,
    OperatorPrincipal,
    State_,
    audit,
)
from privsep.server.db.models import (
    Connection,
    GrantKind,
    PolicyGrant,
    Run,
    TaskAttempt,
    Variable,
    Workflow,
)
from privsep.server.errors import ERROR_RESPONSES, conflict, not_found, unauthorized
from privsep.server.routes._sql import affected
from privsep.server.runs import start_run
from privsep.server.schemas import (
    AttemptResponse,
    AttemptsResponse,
    ConnectionBody,
    GrantBody,
    GrantResponse,
    GrantsResponse,
    Ok,
    OperatorVariableBody,
    RunResponse,
    RunsResponse,
    SessionRequest,
    SessionResponse,
    TriggerRunRequest,
)
from privsep.server.state import ServerState

router = APIRouter(prefix="/v1/operator", tags=["operator"], responses=ERROR_RESPONSES)


@router.post("/session", response_model=SessionResponse)
def open_session(
    body: SessionRequest, request: Request, state: ServerState = State_
) -> SessionResponse:
    """Exchange an assertion signed by the operator key for a short operator session."""
    if state.operator_key is None:
        raise unauthorized("no_operator_key", "the server has no operator public key configured")
    try:
        claims = check_assertion(
            body.assertion,
            state.operator_key,
            audience=state.settings.audience,
            replay_guard=DatabaseReplayGuard(state),
            max_ttl=state.settings.assertion_max_ttl,
        )
    except TokenRejected as exc:
        audit(state, "request_denied", detail={"path": request.url.path, "code": exc.code})
        raise unauthorized(exc.code, exc.message) from None
    settings = state.settings
    token = issue_token(
        state.signer,
        issuer=settings.issuer,
        audience=settings.audience,
        subject=claims.sub,
        scope="operator",
        ttl_seconds=settings.session_token_ttl,
    )
    audit(state, "session_opened", actor=claims.sub, detail={"scope": "operator"})
    return SessionResponse(token=token.reveal(), expires_at=token.exp, subject=claims.sub)


def _run_out(run: Run) -> RunResponse:
    return RunResponse(
        id=run.id,
        workflow_id=run.workflow_id,
        state=run.state.value,
        created_at=run.created_at.isoformat(),
        ended_at=run.ended_at.isoformat() if run.ended_at else None,
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
        query = select(Run).order_by(Run.created_at.desc()).limit(max(1, min(limit, 1000)))
        if workflow_id:
            query = query.where(Run.workflow_id == workflow_id)
        return RunsResponse(runs=[_run_out(r) for r in session.scalars(query)])


@router.get("/runs/{run_id}/attempts", response_model=AttemptsResponse)
def list_attempts(
    run_id: str, me: OperatorPrincipal = Operator_, state: ServerState = State_
) -> AttemptsResponse:
    with state.db.read_session() as session:
        if session.get(Run, run_id) is None:
            raise not_found(f"no run {run_id!r}")
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
                    started_at=a.started_at.isoformat() if a.started_at else None,
                    ended_at=a.ended_at.isoformat() if a.ended_at else None,
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
    with state.db.write_session() as session:
        if not affected(session, delete(Variable).where(Variable.key == key)):
            raise not_found(f"no variable {key!r}")
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
    with state.db.write_session() as session:
        if not affected(session, delete(Connection).where(Connection.conn_id == conn_id)):
            raise not_found(f"no connection {conn_id!r}")
    return Ok()


@router.get("/policy", response_model=GrantsResponse)
def list_grants(me: OperatorPrincipal = Operator_, state: ServerState = State_) -> GrantsResponse:
    with state.db.read_session() as session:
        return GrantsResponse(
            grants=[
                GrantResponse(
                    id=g.id,
                    workflow_pattern=g.workflow_pattern,
                    kind=g.kind.value,
                    name_pattern=g.name_pattern,
                )
                for g in session.scalars(select(PolicyGrant))
            ]
        )


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
            out = GrantResponse(
                id=grant.id,
                workflow_pattern=grant.workflow_pattern,
                kind=grant.kind.value,
                name_pattern=grant.name_pattern,
            )
    except IntegrityError:
        raise conflict("that grant exists already", "exists") from None
    audit(state, "policy_granted", actor=me.name, subject=str(out.id), detail=body.model_dump())
    return out


@router.delete("/policy/{grant_id}", response_model=Ok)
def delete_grant(
    grant_id: int, me: OperatorPrincipal = Operator_, state: ServerState = State_
) -> Ok:
    with state.db.write_session() as session:
        if not affected(session, delete(PolicyGrant).where(PolicyGrant.id == grant_id)):
            raise not_found(f"no grant {grant_id}")
    audit(state, "policy_revoked", actor=me.name, subject=str(grant_id))
    return Ok()
