"""Who is asking: the token check every route depends on. Deny by default.

Every principal comes from the bearer token and nothing else: never from the URL, the body or
a header of the client's choosing. A work token is honoured only while its attempt (or parse
job, or trigger batch) is running, with the same try number, owned by the supervisor that
claimed it; that database check is what makes "the attempt ended, so the token is dead" true.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from fastapi import Depends, Request
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from privsep.secrets.tokens import Claims, TokenRejected, verify_token
from privsep.server.db.models import (
    AttemptState,
    AuditLog,
    ParseJob,
    ParseJobState,
    Run,
    Supervisor,
    TaskAttempt,
    Trigger,
    TriggerState,
    UsedJti,
)
from privsep.server.errors import ApiError, bad_request, forbidden, unauthorized
from privsep.server.state import ServerState

# Anything in a query string that looks like a JWT: tokens end up in logs and proxies there.
_JWT_SHAPE = re.compile(r"^[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]*$")
_TOKEN_PARAMS = frozenset({"access_token", "token", "jwt", "authorization", "bearer"})


def get_state(request: Request) -> ServerState:
    state: ServerState = request.app.state.privsep
    return state


def audit(
    state: ServerState,
    event: str,
    *,
    actor: str | None = None,
    subject: str | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    """Append one security event. Its own short transaction: a denial is recorded even
    though the request that caused it fails."""
    with state.db.write_session() as session:
        session.add(AuditLog(event=event, actor=actor, subject=subject, detail=detail))


def _deny(
    state: ServerState, request: Request, error: ApiError, subject: str | None = None
) -> ApiError:
    audit(
        state,
        "request_denied",
        subject=subject,
        detail={"path": request.url.path, "code": error.code, "status": error.status},
    )
    return error


def bearer_token(request: Request) -> str:
    """The raw token from ``Authorization: Bearer``; a token in the URL is refused."""
    state = get_state(request)
    for name, value in request.query_params.multi_items():
        if name.lower() in _TOKEN_PARAMS or _JWT_SHAPE.match(value):
            raise _deny(
                state,
                request,
                bad_request("token_in_url", "tokens are accepted only in the Authorization header"),
            )
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if not header:
        raise _deny(state, request, unauthorized("missing_token", "no bearer token"))
    if scheme.lower() != "bearer" or not value.strip():
        raise _deny(
            state,
            request,
            unauthorized("malformed", "expected an 'Authorization: Bearer <token>' header"),
        )
    return value.strip()


def verified_claims(request: Request, scopes: frozenset[str]) -> Claims:
    state = get_state(request)
    token = bearer_token(request)
    cached = state.token_cache.get(token, scopes)
    if cached is not None:
        return cached
    settings = state.settings
    try:
        claims = verify_token(
            token,
            state.verifiers,
            issuer=settings.issuer,
            audience=settings.audience,
            scopes=scopes,
        )
    except TokenRejected as exc:
        if exc.code == "unknown_key" and state.reload_verifiers():
            try:  # another replica may have rotated its key since we last looked
                claims = verify_token(
                    token,
                    state.verifiers,
                    issuer=settings.issuer,
                    audience=settings.audience,
                    scopes=scopes,
                )
            except TokenRejected as again:
                raise _deny(state, request, unauthorized(again.code, again.message)) from None
        else:
            raise _deny(state, request, unauthorized(exc.code, exc.message)) from None
    state.token_cache.put(token, claims)
    return claims


# --- principals ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SupervisorPrincipal:
    supervisor_id: str
    name: str


@dataclass(frozen=True)
class TaskPrincipal:
    attempt_id: str
    run_id: str
    workflow_id: str
    task_id: str
    try_number: int
    supervisor_id: str


@dataclass(frozen=True)
class ParsePrincipal:
    job_id: str
    supervisor_id: str


@dataclass(frozen=True)
class TriggerPrincipal:
    batch_id: str
    trigger_ids: frozenset[str]
    supervisor_id: str


@dataclass(frozen=True)
class OperatorPrincipal:
    name: str


def _claim_int(claims: Claims, name: str) -> int:
    value = claims.extra.get(name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise unauthorized("missing_claim", f"token has no {name!r} claim")
    return value


def _claim_str(claims: Claims, name: str) -> str:
    value = claims.extra.get(name)
    if not isinstance(value, str) or not value:
        raise unauthorized("missing_claim", f"token has no {name!r} claim")
    return value


def supervisor_principal(request: Request) -> SupervisorPrincipal:
    state = get_state(request)
    claims = verified_claims(request, frozenset({"supervisor"}))
    with state.db.read_session() as session:
        sup = session.get(Supervisor, claims.sub)
        if sup is None or not sup.active:
            raise _deny(
                state,
                request,
                unauthorized("revoked", "this supervisor is unknown or deactivated"),
                claims.sub,
            )
        return SupervisorPrincipal(sup.id, sup.name)


def task_principal(request: Request) -> TaskPrincipal:
    state = get_state(request)
    claims = verified_claims(request, frozenset({"task"}))
    try_number = _claim_int(claims, "try")
    sup = _claim_str(claims, "sup")
    with state.db.read_session() as session:
        row = session.execute(
            select(TaskAttempt, Run.workflow_id)
            .join(Run, Run.id == TaskAttempt.run_id)
            .where(TaskAttempt.id == claims.sub)
        ).first()
        if row is None:
            raise _deny(state, request, unauthorized("revoked", "no such attempt"), claims.sub)
        attempt, workflow_id = row
        if (
            attempt.state != AttemptState.RUNNING
            or attempt.try_number != try_number
            or attempt.supervisor_id != sup
        ):
            raise _deny(
                state,
                request,
                unauthorized(
                    "revoked", "the attempt this token was issued for is no longer running"
                ),
                claims.sub,
            )
        return TaskPrincipal(
            attempt.id, attempt.run_id, workflow_id, attempt.task_id, attempt.try_number, sup
        )


def parse_principal(request: Request) -> ParsePrincipal:
    state = get_state(request)
    claims = verified_claims(request, frozenset({"parse"}))
    sup = _claim_str(claims, "sup")
    with state.db.read_session() as session:
        job = session.get(ParseJob, claims.sub)
        if job is None or job.state != ParseJobState.RUNNING or job.supervisor_id != sup:
            raise _deny(
                state,
                request,
                unauthorized(
                    "revoked", "the parse job this token was issued for is no longer running"
                ),
                claims.sub,
            )
        return ParsePrincipal(job.id, sup)


def trigger_principal(request: Request) -> TriggerPrincipal:
    state = get_state(request)
    claims = verified_claims(request, frozenset({"trigger"}))
    sup = _claim_str(claims, "sup")
    ids = claims.extra.get("triggers")
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise _deny(state, request, unauthorized("missing_claim", "token lists no triggers"))
    with state.db.read_session() as session:
        live = set(
            session.scalars(
                select(Trigger.id).where(
                    Trigger.id.in_(ids),
                    Trigger.state == TriggerState.RUNNING,
                    Trigger.supervisor_id == sup,
                )
            )
        )
    if not live:
        raise _deny(
            state,
            request,
            unauthorized("revoked", "none of this token's triggers is still running"),
            claims.sub,
        )
    return TriggerPrincipal(claims.sub, frozenset(live), sup)


def operator_principal(request: Request) -> OperatorPrincipal:
    claims = verified_claims(request, frozenset({"operator"}))
    return OperatorPrincipal(claims.sub)


def require_trigger(principal: TriggerPrincipal, trigger_id: str, request: Request) -> None:
    """A trigger token may touch only the triggers assigned to it (and still running)."""
    if trigger_id not in principal.trigger_ids:
        state = get_state(request)
        raise _deny(
            state,
            request,
            forbidden("this trigger is not assigned to your token"),
            principal.batch_id,
        )


class DatabaseReplayGuard:
    """Single-use assertion ids, shared by every replica through a primary key."""

    def __init__(self, state: ServerState) -> None:
        self.state = state

    def __call__(self, jti: str, exp: float) -> bool:
        try:
            with self.state.db.write_session() as session:
                session.add(UsedJti(jti=jti, expires_at=datetime.fromtimestamp(exp, UTC)))
        except IntegrityError:
            return False
        return True


SupervisorDep = Callable[..., SupervisorPrincipal]
Supervisor_ = Depends(supervisor_principal)
Task_ = Depends(task_principal)
Parse_ = Depends(parse_principal)
Trigger_ = Depends(trigger_principal)
Operator_ = Depends(operator_principal)
State_ = Depends(get_state)
