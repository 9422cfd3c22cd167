"""The operator's session: an assertion signed by a registered operator's key buys a short
session token bound to that operator and its key generation.

Operators are registered, listed and revoked on the server host (``runner operators``, through
:mod:`privsep.server.admin`); every operator call checks the registration again
(:func:`privsep.server.auth.operator_principal`), so a revocation ends a session at its next
call.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from sqlalchemy import select

from privsep.secrets.tokens import TokenRejected, unverified_key_id
from privsep.secrets.tokens import verify_assertion as check_assertion
from privsep.server.auth import (
    SESSION_GENERATION,
    DatabaseReplayGuard,
    State_,
    audit,
    registered_public_key,
    stamp_if_current,
)
from privsep.server.db.models import Operator, utcnow
from privsep.server.errors import ERROR_RESPONSES, ApiError, unauthorized
from privsep.server.schemas import SessionRequest, SessionResponse
from privsep.server.services.claims import issue_work_token
from privsep.server.state import ServerState

router = APIRouter(prefix="/v1/operator", tags=["operator"], responses=ERROR_RESPONSES)


@router.post("/session", response_model=SessionResponse)
def open_session(
    body: SessionRequest, request: Request, state: ServerState = State_
) -> SessionResponse:
    """Exchange an assertion signed by a registered operator's key for a short operator
    session, bound to that operator's key generation. The operator is found by the key that
    signed the assertion: whatever name the assertion carries is never who the caller is, and
    the audit log records the registered name."""

    def refuse(code: str, message: str) -> ApiError:
        audit(state, "request_denied", detail={"path": request.url.path, "code": code})
        return unauthorized(code, message)

    try:
        kid = unverified_key_id(body.assertion)
    except TokenRejected as exc:
        raise refuse(exc.code, exc.message) from None
    with state.db.read_session() as session:
        found = session.scalars(select(Operator).where(Operator.key_id == kid)).first()
        known = found.id if found is not None and found.active else None
        registered = known is not None or session.scalar(select(Operator.id).limit(1))
        op = (found.id, found.name, found.public_key_pem, found.key_generation) if found else None
    if not registered:
        raise refuse("no_operator_key", "no operator is registered on this server")
    if op is None or known is None:
        raise refuse("unknown_operator", "no active operator is registered with this key")
    op_id, name, pem, generation = op
    try:
        claims = check_assertion(
            body.assertion,
            registered_public_key(pem),
            audience=state.settings.audience,
            replay_guard=DatabaseReplayGuard(state),
            max_ttl=state.settings.assertion_max_ttl,
        )
    except TokenRejected as exc:
        raise refuse(exc.code, exc.message) from None
    if not stamp_if_current(state, Operator, op_id, generation, last_session_at=utcnow()):
        raise refuse("revoked", "this operator was revoked or re-keyed meanwhile")
    token = issue_work_token(
        state,
        "operator",
        op_id,
        state.settings.session_token_ttl,
        {SESSION_GENERATION: generation},
    )
    detail = {"scope": "operator", "asserted": claims.sub}
    audit(state, "session_opened", actor=name, subject=op_id, detail=detail)
    return SessionResponse(token=token.reveal(), expires_at=token.exp, subject=op_id)
