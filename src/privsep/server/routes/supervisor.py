"""Supervisor endpoints: open a session, heartbeat, claim work, refresh a work token, report
an outcome. The supervisor is trusted to run work, never to choose whose work it is: every
claim and refresh is checked against the rows it owns."""

from __future__ import annotations

import uuid
from datetime import timedelta

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from fastapi import APIRouter, Request, Response
from pydantic_core import to_json
from sqlalchemy import Integer, bindparam, insert, select, update
from sqlalchemy.orm import Session

from privsep.secrets.tokens import Token, TokenRejected, issue_token, unverified_issuer
from privsep.secrets.tokens import verify_assertion as check_assertion
from privsep.server.auth import (
    DatabaseReplayGuard,
    State_,
    Supervisor_,
    SupervisorPrincipal,
    audit,
)
from privsep.server.db.models import (
    AttemptState,
    AuditLog,
    ParseError,
    ParseJob,
    ParseJobState,
    Run,
    Supervisor,
    TaskAttempt,
    Trigger,
    TriggerState,
    Workflow,
    WorkflowVersion,
    new_id,
    utcnow,
)
from privsep.server.errors import ERROR_RESPONSES, conflict, not_found, unauthorized
from privsep.server.routes._sql import affected, table_of
from privsep.server.runs import fail_or_retry, version_graph
from privsep.server.scheduler import claim_candidates
from privsep.server.schemas import (
    ClaimRequest,
    ClaimResponse,
    DeletedFilesRequest,
    Ok,
    OutcomeRequest,
    ParseJobBatchRequest,
    ParseJobBatchResponse,
    ParseJobRequest,
    ParseJobResponse,
    ParseWork,
    RefreshRequest,
    SessionRequest,
    SessionResponse,
    TaskWork,
    TokenResponse,
    TriggerWork,
)
from privsep.server.state import ServerState

router = APIRouter(prefix="/v1/supervisor", tags=["supervisor"], responses=ERROR_RESPONSES)


def _public_key(pem: str) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(pem.encode())
    if not isinstance(key, Ed25519PublicKey):
        raise unauthorized("unknown_key", "the registered key is not Ed25519")
    return key


@router.post("/session", response_model=SessionResponse)
def open_session(
    body: SessionRequest, request: Request, state: ServerState = State_
) -> SessionResponse:
    """Exchange a single-use assertion, signed by the supervisor's own key, for a session."""
    try:
        name = unverified_issuer(body.assertion)
    except TokenRejected as exc:
        audit(state, "request_denied", detail={"path": request.url.path, "code": exc.code})
        raise unauthorized(exc.code, exc.message) from None
    with state.db.read_session() as session:
        sup = session.scalars(select(Supervisor).where(Supervisor.name == name)).first()
        found = (sup.id, sup.public_key_pem, sup.active) if sup else None
    if found is None or not found[2]:
        audit(
            state,
            "request_denied",
            actor=name,
            detail={"path": request.url.path, "code": "unknown_supervisor"},
        )
        raise unauthorized("unknown_supervisor", "no active supervisor is registered by that name")
    sup_id, pem, _ = found
    try:
        check_assertion(
            body.assertion,
            _public_key(pem),
            audience=state.settings.audience,
            replay_guard=DatabaseReplayGuard(state),
            supervisor_name=name,
            max_ttl=state.settings.assertion_max_ttl,
        )
    except TokenRejected as exc:
        audit(
            state, "request_denied", actor=name, detail={"path": request.url.path, "code": exc.code}
        )
        raise unauthorized(exc.code, exc.message) from None
    token = _issue(state, "supervisor", sup_id, state.settings.session_token_ttl)
    with state.db.write_session() as session:
        session.execute(
            update(Supervisor).where(Supervisor.id == sup_id).values(last_heartbeat_at=utcnow())
        )
    audit(state, "session_opened", actor=name, subject=sup_id, detail={"jti": token.jti})
    return SessionResponse(token=token.reveal(), expires_at=token.exp, subject=sup_id)


def _issue(
    state: ServerState, scope: str, subject: str, ttl: int, extra: dict[str, object] | None = None
) -> Token:
    settings = state.settings
    return issue_token(
        state.signer,
        issuer=settings.issuer,
        audience=settings.audience,
        subject=subject,
        scope=scope,  # type: ignore[arg-type]
        ttl_seconds=ttl,
        extra=extra,
    )


@router.post("/heartbeat", response_model=Ok)
def heartbeat(me: SupervisorPrincipal = Supervisor_, state: ServerState = State_) -> Ok:
    """Record that this supervisor is alive, and keep its running attempts alive."""
    now = utcnow()
    with state.db.write_session() as session:
        session.execute(
            update(Supervisor)
            .where(Supervisor.id == me.supervisor_id)
            .values(last_heartbeat_at=now)
        )
        session.execute(
            update(TaskAttempt)
            .where(
                TaskAttempt.supervisor_id == me.supervisor_id,
                TaskAttempt.state == AttemptState.RUNNING,
            )
            .values(heartbeat_at=now)
        )
    return Ok()


@router.post("/restarted", response_model=Ok)
def restarted(me: SupervisorPrincipal = Supervisor_, state: ServerState = State_) -> Ok:
    """The supervisor (re)started and runs nothing: whatever the server still thinks it runs
    died with its previous process. End it now rather than after the heartbeat timeout (which
    the new process's heartbeats would otherwise postpone forever)."""
    with state.db.write_session() as session:
        orphaned = session.scalars(
            select(TaskAttempt)
            .where(
                TaskAttempt.supervisor_id == me.supervisor_id,
                TaskAttempt.state == AttemptState.RUNNING,
            )
            .with_for_update()
        ).all()
        for attempt in orphaned:
            fail_or_retry(
                session, attempt, f"supervisor {me.name} restarted while this attempt was running"
            )
        session.execute(
            update(ParseJob)
            .where(
                ParseJob.supervisor_id == me.supervisor_id, ParseJob.state == ParseJobState.RUNNING
            )
            .values(state=ParseJobState.QUEUED, supervisor_id=None)
        )
        session.execute(
            update(Trigger)
            .where(Trigger.supervisor_id == me.supervisor_id, Trigger.state == TriggerState.RUNNING)
            .values(state=TriggerState.QUEUED, supervisor_id=None)
        )
    if orphaned:
        audit(
            state, "attempts_orphaned", actor=me.name, detail={"attempts": [a.id for a in orphaned]}
        )
    return Ok()


@router.post("/claim", response_model=ClaimResponse)
def claim(
    body: ClaimRequest, me: SupervisorPrincipal = Supervisor_, state: ServerState = State_
) -> Response:
    """Take up to ``max_items`` queued items. Each row moves queued → running in one
    conditional UPDATE, so two supervisors racing for it cannot both win."""
    return Response(claim_work(state, me, body), media_type="application/json")


def claim_work(state: ServerState, me: SupervisorPrincipal, body: ClaimRequest) -> bytes:
    """The claim itself (see :func:`claim`): its :class:`ClaimResponse` as JSON bytes, made
    before the transaction commits, so that if making them failed nothing was claimed. The
    route and the fast path send these very bytes."""
    items: list[TaskWork | ParseWork | TriggerWork] = []
    with state.db.write_session() as session:
        if "task" in body.kinds:
            items += _claim_tasks(session, state, me, body.max_items)
        if "parse" in body.kinds and len(items) < body.max_items:
            items += _claim_parse(session, state, me, body.max_items - len(items))
        if "trigger" in body.kinds and len(items) < body.max_items:
            items += _claim_triggers(session, state, me)
        # Recorded in the claim's own transaction: a token is issued exactly when the claim
        # commits (it is only revealed in the answer, after the commit).
        if items:  # one Core INSERT: ORM objects cost more to flush than the rows to write
            now = utcnow()
            session.execute(
                insert(AuditLog),
                [
                    {
                        "event": "token_issued",
                        "actor": me.name,
                        "subject": item.id,
                        "detail": {"scope": item.kind},
                        "at": now,
                    }
                    for item in items
                ],
            )
        answer = to_json(ClaimResponse(items=items).model_dump(mode="json"))
    return answer


def _claim_tasks(
    session: Session, state: ServerState, me: SupervisorPrincipal, limit: int
) -> list[TaskWork | ParseWork | TriggerWork]:
    now = utcnow()
    candidates = claim_candidates(
        session,
        now,
        limit,
        per_workflow=state.settings.max_running_per_workflow or None,
        global_limit=state.settings.max_running_total or None,
    )
    if not candidates:
        return []
    # One conditional UPDATE for the lot: a row another claimer took since the candidate query
    # is no longer queued, so it is simply not updated (and not returned).
    won = set(
        session.scalars(
            update(TaskAttempt)
            .where(TaskAttempt.id.in_(candidates[:limit]), TaskAttempt.state == AttemptState.QUEUED)
            .values(
                state=AttemptState.RUNNING,
                supervisor_id=me.supervisor_id,
                started_at=now,
                heartbeat_at=now,
            )
            .returning(TaskAttempt.id)
            .execution_options(synchronize_session=False)
        )
    )
    if not won:
        return []
    rows = session.execute(
        select(
            TaskAttempt.id,
            TaskAttempt.task_id,
            TaskAttempt.try_number,
            Run.id,
            Run.workflow_id,
            Run.workflow_version_id,
        )
        .join(Run, Run.id == TaskAttempt.run_id)
        .where(TaskAttempt.id.in_(sorted(won)))
    ).all()
    order = {attempt_id: index for index, attempt_id in enumerate(candidates)}
    out: list[TaskWork | ParseWork | TriggerWork] = []
    for attempt_id, task_id, try_number, run_id, workflow_id, version_id in sorted(
        rows, key=lambda row: order[row[0]]
    ):
        graph = version_graph(session, version_id)
        task = graph.tasks.get(task_id)
        if task is None:
            raise LookupError(f"task {task_id!r} is not in workflow version {version_id}")
        token = _issue(
            state,
            "task",
            attempt_id,
            state.settings.work_token_ttl,
            {"try": try_number, "sup": me.supervisor_id},
        )
        out.append(
            TaskWork(
                id=attempt_id,
                token=token.reveal(),
                expires_at=token.exp,
                run_id=run_id,
                workflow_id=workflow_id,
                task_id=task_id,
                try_number=try_number,
                callable={"module": task.module, "qualname": task.qualname},
                timeout=task.timeout,
                bundle_version=graph.bundle_version,
                source_uri=graph.source_uri,
            )
        )
    return out


# Built once, as Core statements on the table (see privsep.server.routes._sql).
_JOBS = table_of(ParseJob)
_QUEUED_PARSE_JOBS = (
    select(_JOBS.c.id)
    .where(_JOBS.c.state == ParseJobState.QUEUED)
    .order_by(_JOBS.c.created_at)
    .limit(bindparam("b_limit", type_=Integer))
)
_TAKE_PARSE_JOBS = (
    update(_JOBS)
    .where(
        _JOBS.c.id.in_(bindparam("b_ids", expanding=True)),
        _JOBS.c.state == ParseJobState.QUEUED,
    )
    .values(
        state=ParseJobState.RUNNING,
        supervisor_id=bindparam("b_supervisor_id"),
        claimed_at=bindparam("b_now"),
    )
    .returning(_JOBS.c.id, _JOBS.c.uri, _JOBS.c.bundle_version)
)
_NEW_PARSE_JOB = insert(_JOBS)


def _claim_parse(
    session: Session, state: ServerState, me: SupervisorPrincipal, limit: int
) -> list[TaskWork | ParseWork | TriggerWork]:
    candidates = session.scalars(_QUEUED_PARSE_JOBS, {"b_limit": limit * 4}).all()
    if not candidates:
        return []
    won = session.execute(
        _TAKE_PARSE_JOBS,
        {"b_ids": candidates[:limit], "b_supervisor_id": me.supervisor_id, "b_now": utcnow()},
    ).all()
    order = {job_id: index for index, job_id in enumerate(candidates)}
    out: list[TaskWork | ParseWork | TriggerWork] = []
    for job_id, uri, bundle_version in sorted(won, key=lambda row: order[row[0]]):
        token = _issue(
            state, "parse", job_id, state.settings.work_token_ttl, {"sup": me.supervisor_id}
        )
        out.append(
            ParseWork(
                id=job_id,
                token=token.reveal(),
                expires_at=token.exp,
                uri=uri,
                bundle_version=bundle_version,
            )
        )
    return out


def _claim_triggers(
    session: Session, state: ServerState, me: SupervisorPrincipal
) -> list[TaskWork | ParseWork | TriggerWork]:
    """The queued triggers of ONE workflow go to one batch: one sandbox, one event loop, one
    token. Two workflows never share a trigger sandbox, so one workflow's trigger code cannot
    see or disturb another's."""
    now = utcnow()
    rows = session.execute(
        select(Trigger.id, Run.workflow_id)
        .join(TaskAttempt, TaskAttempt.id == Trigger.attempt_id)
        .join(Run, Run.id == TaskAttempt.run_id)
        .where(Trigger.state == TriggerState.QUEUED)
        .order_by(Trigger.created_at)
        .limit(500)
    ).all()
    if not rows:
        return []
    workflow = rows[0][1]
    ids = [trigger_id for trigger_id, wf in rows if wf == workflow][:100]
    won: list[str] = []
    for trigger_id in ids:
        if affected(
            session,
            update(Trigger)
            .where(Trigger.id == trigger_id, Trigger.state == TriggerState.QUEUED)
            .values(state=TriggerState.RUNNING, supervisor_id=me.supervisor_id, claimed_at=now),
        ):
            won.append(trigger_id)
    if not won:
        return []
    batch = f"batch-{uuid.uuid4()}"
    token = _issue(
        state,
        "trigger",
        batch,
        state.settings.work_token_ttl,
        {"sup": me.supervisor_id, "triggers": won},
    )
    uris = session.scalars(
        select(WorkflowVersion.source_uri)
        .distinct()
        .join(Run, Run.workflow_version_id == WorkflowVersion.id)
        .join(TaskAttempt, TaskAttempt.run_id == Run.id)
        .join(Trigger, Trigger.attempt_id == TaskAttempt.id)
        .where(Trigger.id.in_(won))
    ).all()
    return [
        TriggerWork(
            id=batch,
            token=token.reveal(),
            expires_at=token.exp,
            trigger_ids=won,
            source_uris=sorted(u for u in uris if u),
        )
    ]


@router.post("/refresh", response_model=TokenResponse)
def refresh(
    body: RefreshRequest, me: SupervisorPrincipal = Supervisor_, state: ServerState = State_
) -> TokenResponse:
    """A fresh work token, only for the claiming supervisor, only while the item runs, and
    never past ``work_token_max_lifetime`` from the claim."""
    cap = timedelta(seconds=state.settings.work_token_max_lifetime)
    now = utcnow()
    with state.db.read_session() as session:
        if body.kind == "task":
            attempt = session.get(TaskAttempt, body.id)
            if attempt is None:
                raise not_found("no such attempt")
            if attempt.supervisor_id != me.supervisor_id or attempt.state != AttemptState.RUNNING:
                raise conflict("the attempt is not running under this supervisor", "not_running")
            if attempt.started_at and now - attempt.started_at > cap:
                raise conflict("the attempt's token lifetime cap is reached", "lifetime_exceeded")
            token = _issue(
                state,
                "task",
                attempt.id,
                state.settings.work_token_ttl,
                {"try": attempt.try_number, "sup": me.supervisor_id},
            )
        elif body.kind == "parse":
            job = session.get(ParseJob, body.id)
            if job is None:
                raise not_found("no such parse job")
            if job.supervisor_id != me.supervisor_id or job.state != ParseJobState.RUNNING:
                raise conflict("the parse job is not running under this supervisor", "not_running")
            if job.claimed_at and now - job.claimed_at > cap:
                raise conflict("the parse job's token lifetime cap is reached", "lifetime_exceeded")
            token = _issue(
                state, "parse", job.id, state.settings.work_token_ttl, {"sup": me.supervisor_id}
            )
        else:
            raise conflict("trigger batches are re-claimed, not refreshed", "not_refreshable")
    audit(state, "token_refreshed", actor=me.name, subject=body.id)
    return TokenResponse(token=token.reveal(), expires_at=token.exp)


@router.post("/outcome", response_model=Ok)
def outcome(
    body: OutcomeRequest, me: SupervisorPrincipal = Supervisor_, state: ServerState = State_
) -> Ok:
    """The sandbox ended without reporting (crash, kill, timeout): end the item for it."""
    reason = body.reason or f"sandbox exited with status {body.exit_code}"
    with state.db.write_session() as session:
        if body.kind == "task":
            attempt = session.get(TaskAttempt, body.id)
            if attempt is None:
                raise not_found("no such attempt")
            if attempt.supervisor_id != me.supervisor_id:
                raise conflict("the attempt is not owned by this supervisor", "not_owner")
            attempt.exit_code = body.exit_code
            if attempt.state == AttemptState.RUNNING:
                fail_or_retry(session, attempt, reason)
        elif body.kind == "parse":
            job = session.get(ParseJob, body.id)
            if job is None:
                raise not_found("no such parse job")
            if job.supervisor_id != me.supervisor_id:
                raise conflict("the parse job is not owned by this supervisor", "not_owner")
            if job.state == ParseJobState.RUNNING:
                job.state = ParseJobState.FAILED
                job.finished_at = utcnow()
                # The sandbox died before it could report (killed at the parse timeout, say):
                # the file still gets a parse error, or it would fail with nothing to show.
                session.add(
                    ParseError(
                        file_path=job.uri.split("#", 1)[0],
                        message=f"the parse sandbox ended without a result: {reason}",
                        bundle_version=job.bundle_version,
                    )
                )
        else:
            for trigger in session.scalars(
                select(Trigger).where(
                    Trigger.supervisor_id == me.supervisor_id, Trigger.state == TriggerState.RUNNING
                )
            ):
                trigger.state = TriggerState.QUEUED  # re-run by the next trigger sandbox
                trigger.supervisor_id = None
    return Ok()


@router.post("/parse-jobs", response_model=ParseJobResponse)
def submit_parse_job(
    body: ParseJobRequest, me: SupervisorPrincipal = Supervisor_, state: ServerState = State_
) -> ParseJobResponse:
    """Discovery found a new or changed definition file: queue a parse of it."""
    (job_id,) = _queue_parse_jobs(state, [body])
    return ParseJobResponse(id=job_id)


@router.post("/parse-jobs/batch", response_model=ParseJobBatchResponse)
def submit_parse_jobs(
    body: ParseJobBatchRequest, me: SupervisorPrincipal = Supervisor_, state: ServerState = State_
) -> ParseJobBatchResponse:
    """Discovery found many new or changed files at once (a checkout, a first scan): queue a
    parse of each in one request and one transaction, all or none. The ids are in the order
    of ``jobs``."""
    return ParseJobBatchResponse(ids=_queue_parse_jobs(state, body.jobs))


def _queue_parse_jobs(state: ServerState, jobs: list[ParseJobRequest]) -> list[str]:
    ids = [new_id() for _ in jobs]
    rows = [
        {
            "id": job_id,
            "uri": job.uri,
            "content_hash": job.content_hash or None,
            "bundle_version": job.bundle_version,
            "workflow_ids": job.workflow_ids,
        }
        for job_id, job in zip(ids, jobs, strict=True)
    ]
    with state.db.write_session() as session:
        session.execute(_NEW_PARSE_JOB, rows)
    return ids


@router.post("/deleted-files", response_model=Ok)
def deleted_files(
    body: DeletedFilesRequest, me: SupervisorPrincipal = Supervisor_, state: ServerState = State_
) -> Ok:
    """Discovery saw definition files disappear: deactivate the workflows parsed from them."""
    with state.db.write_session() as session:
        session.execute(
            update(Workflow).where(Workflow.source_uri.in_(body.uris)).values(active=False)
        )
    return Ok()
