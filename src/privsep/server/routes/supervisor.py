"""Supervisor endpoints: open a session, heartbeat, claim work, refresh a work token, report
an outcome. The supervisor is trusted to run work, never to choose whose work it is: every
claim and refresh is checked against the rows it owns."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from fastapi import APIRouter, Request, Response
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from privsep.secrets.tokens import TokenRejected, unverified_issuer
from privsep.secrets.tokens import verify_assertion as check_assertion
from privsep.server.auth import (
    EXECUTION,
    SESSION_GENERATION,
    DatabaseReplayGuard,
    State_,
    Supervisor_,
    SupervisorPrincipal,
    audit,
    registered_public_key,
    stamp_if_current,
)
from privsep.server.db.models import (
    AttemptState,
    ParseError,
    ParseJob,
    ParseJobState,
    Supervisor,
    TaskAttempt,
    utcnow,
)
from privsep.server.errors import ERROR_RESPONSES, conflict, not_found, unauthorized
from privsep.server.reaper import take_back_from
from privsep.server.reconcile import Held, reconcile
from privsep.server.runs import fail_or_retry, requeue_triggers
from privsep.server.schemas import (
    ClaimRequest,
    ClaimResponse,
    DeletedFilesRequest,
    HeartbeatRequest,
    Ok,
    OutcomeRequest,
    ParseJobBatchRequest,
    ParseJobBatchResponse,
    ParseJobRequest,
    ParseJobResponse,
    RefreshRequest,
    SessionRequest,
    SessionResponse,
    TokenResponse,
)
from privsep.server.services import claims, discovery_reports
from privsep.server.state import ServerState

log = logging.getLogger("privsep.server.supervisor")

router = APIRouter(prefix="/v1/supervisor", tags=["supervisor"], responses=ERROR_RESPONSES)


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
        found = (sup.id, sup.public_key_pem, sup.active, sup.key_generation) if sup else None
    if found is None or not found[2]:
        audit(
            state,
            "request_denied",
            actor=name,
            detail={"path": request.url.path, "code": "unknown_supervisor"},
        )
        raise unauthorized("unknown_supervisor", "no active supervisor is registered by that name")
    sup_id, pem, _, generation = found
    try:
        check_assertion(
            body.assertion,
            registered_public_key(pem),
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
    if not stamp_if_current(state, Supervisor, sup_id, generation, last_heartbeat_at=utcnow()):
        raise unauthorized("revoked", "this supervisor was revoked or re-keyed meanwhile")
    token = claims.issue_work_token(
        state,
        "supervisor",
        sup_id,
        state.settings.session_token_ttl,
        {SESSION_GENERATION: generation},
    )
    audit(state, "session_opened", actor=name, subject=sup_id, detail={"jti": token.jti})
    return SessionResponse(token=token.reveal(), expires_at=token.exp, subject=sup_id)


@router.post("/heartbeat", response_model=Ok)
def heartbeat(
    body: HeartbeatRequest | None = None,
    me: SupervisorPrincipal = Supervisor_,
    state: ServerState = State_,
) -> Ok:
    """Record that this supervisor is alive and reconcile what it runs: the work it lists
    stays alive, the rest of what the server thinks it holds is taken back once older than a
    quarter of the heartbeat timeout. A heartbeat without a body (a supervisor from before
    reconciliation) keeps every attempt of this supervisor alive, as it always did."""
    now = utcnow()
    taken_back = 0
    with state.db.write_session() as session:
        seen: dict[str, object] = {"last_heartbeat_at": now}
        if body is not None and body.discovery is not None:
            seen.update(
                discovery_state=body.discovery.state,
                discovery_error=body.discovery.error,
                discovery_at=now,
            )
        session.execute(update(Supervisor).where(Supervisor.id == me.supervisor_id).values(seen))
        if body is None:
            session.execute(
                update(TaskAttempt)
                .where(
                    TaskAttempt.supervisor_id == me.supervisor_id,
                    TaskAttempt.state == AttemptState.RUNNING,
                )
                .values(heartbeat_at=now)
            )
        else:
            held = Held(body.tasks, body.parse_jobs, body.triggers)
            grace = state.settings.supervisor_heartbeat_timeout / 4
            taken_back = reconcile(session, me.supervisor_id, me.name, held, now, grace)
    if taken_back:
        log.warning("took back %d items supervisor %s no longer holds", taken_back, me.name)
    return Ok()


@router.post("/restarted", response_model=Ok)
def restarted(me: SupervisorPrincipal = Supervisor_, state: ServerState = State_) -> Ok:
    """The supervisor (re)started and runs nothing: whatever the server still thinks it runs
    died with its previous process. End it now rather than after the heartbeat timeout (which
    the new process's heartbeats would otherwise postpone forever)."""
    with state.db.write_session() as session:
        taken = take_back_from(
            session,
            me.supervisor_id,
            f"supervisor {me.name} restarted while this attempt was running",
            "attempt_orphaned",
        )
    if taken.attempts:
        audit(state, "attempts_orphaned", actor=me.name, detail={"attempts": taken.attempts})
    return Ok()


@router.post("/claim", response_model=ClaimResponse)
def claim(
    body: ClaimRequest, me: SupervisorPrincipal = Supervisor_, state: ServerState = State_
) -> Response:
    """Take up to ``max_items`` queued items. Each row moves queued → running in one
    conditional UPDATE, so two supervisors racing for it cannot both win."""
    return Response(claims.claim_work(state, me, body), media_type="application/json")


_WHAT = {"task": "attempt", "parse": "parse job"}
"""The item each kind of work token names (a trigger token names a batch), as errors call it."""


def _work_item(session: Session, kind: str, item_id: str) -> TaskAttempt | ParseJob:
    """The attempt or parse job ``item_id`` that a ``kind`` token is for (404 if none)."""
    item = session.get(TaskAttempt, item_id) if kind == "task" else session.get(ParseJob, item_id)
    if item is None:
        raise not_found(f"no such {_WHAT[kind]}")
    return item


def _refreshable(
    session: Session, kind: str, item_id: str, me: SupervisorPrincipal, oldest: datetime
) -> TaskAttempt | ParseJob:
    """The item a ``kind`` token is refreshed for, if it runs under ``me`` and started after
    ``oldest`` (when its token lifetime cap began)."""
    if kind not in _WHAT:
        raise conflict("trigger batches are re-claimed, not refreshed", "not_refreshable")
    item = _work_item(session, kind, item_id)
    if isinstance(item, TaskAttempt):
        running, started = item.state == AttemptState.RUNNING, item.started_at
    else:
        running, started = item.state == ParseJobState.RUNNING, item.claimed_at
    if item.supervisor_id != me.supervisor_id or not running:
        raise conflict(f"the {_WHAT[kind]} is not running under this supervisor", "not_running")
    if started and started < oldest:
        raise conflict(f"the {_WHAT[kind]}'s token lifetime cap is reached", "lifetime_exceeded")
    return item


@router.post("/refresh", response_model=TokenResponse)
def refresh(
    body: RefreshRequest, me: SupervisorPrincipal = Supervisor_, state: ServerState = State_
) -> TokenResponse:
    """A fresh work token, only for the claiming supervisor, only while the item runs, and
    never past ``work_token_max_lifetime`` from the claim."""
    oldest = utcnow() - timedelta(seconds=state.settings.work_token_max_lifetime)
    with state.db.read_session() as session:
        item = _refreshable(session, body.kind, body.id, me, oldest)
        extra: dict[str, object] = {"sup": me.supervisor_id}
        if isinstance(item, TaskAttempt):
            extra = {"try": item.try_number, EXECUTION: item.execution, **extra}
        token = claims.issue_work_token(
            state, body.kind, item.id, state.settings.work_token_ttl, extra
        )
    audit(state, "token_refreshed", actor=me.name, subject=body.id)
    return TokenResponse(token=token.reveal(), expires_at=token.exp)


@router.post("/outcome", response_model=Ok)
def outcome(
    body: OutcomeRequest, me: SupervisorPrincipal = Supervisor_, state: ServerState = State_
) -> Ok:
    """The sandbox ended without reporting (crash, kill, timeout): end the item for it."""
    reason = body.reason or f"sandbox exited with status {body.exit_code}"
    with state.db.write_session() as session:
        if body.kind not in _WHAT:
            requeue_triggers(session, [me.supervisor_id])
            return Ok()
        item = _work_item(session, body.kind, body.id)
        if item.supervisor_id != me.supervisor_id:
            raise conflict(f"the {_WHAT[body.kind]} is not owned by this supervisor", "not_owner")
        if isinstance(item, TaskAttempt):
            item.exit_code = body.exit_code
            if item.state == AttemptState.RUNNING:
                fail_or_retry(session, item, reason)
        elif item.state == ParseJobState.RUNNING:
            item.state = ParseJobState.FAILED
            item.finished_at = utcnow()
            # The sandbox died before it could report (killed at the parse timeout, say):
            # the file still gets a parse error, or it would fail with nothing to show.
            session.add(
                ParseError(
                    file_path=item.uri.split("#", 1)[0],
                    message=f"the parse sandbox ended without a result: {reason}",
                    bundle_version=item.bundle_version,
                )
            )
    return Ok()


@router.post("/parse-jobs", response_model=ParseJobResponse)
def submit_parse_job(
    body: ParseJobRequest,
    request: Request,
    me: SupervisorPrincipal = Supervisor_,
    state: ServerState = State_,
) -> ParseJobResponse:
    """Discovery found a new or changed definition file: queue a parse of it. Refused (403)
    for a file or a workflow id of another supervisor's (see
    :mod:`privsep.server.services.discovery_reports`)."""
    (job_id,) = discovery_reports.queue_parse_jobs(state, me, request.url.path, [body])
    return ParseJobResponse(id=job_id)


@router.post("/parse-jobs/batch", response_model=ParseJobBatchResponse)
def submit_parse_jobs(
    body: ParseJobBatchRequest,
    request: Request,
    me: SupervisorPrincipal = Supervisor_,
    state: ServerState = State_,
) -> ParseJobBatchResponse:
    """Discovery found many new or changed files at once (a checkout, a first scan): queue a
    parse of each in one request and one transaction, all or none. The ids are in the order
    of ``jobs``."""
    return ParseJobBatchResponse(
        ids=discovery_reports.queue_parse_jobs(state, me, request.url.path, body.jobs)
    )


@router.post("/deleted-files", response_model=Ok)
def deleted_files(
    body: DeletedFilesRequest,
    request: Request,
    me: SupervisorPrincipal = Supervisor_,
    state: ServerState = State_,
) -> Ok:
    """Discovery saw definition files disappear: deactivate the workflows parsed from them.
    Refused (403), with nothing changed, if one of them is another supervisor's."""
    discovery_reports.deactivate_deleted(state, me, request.url.path, body.uris)
    return Ok()
