"""Who is asking: the token check every route depends on. Deny by default.

Every principal comes from the bearer token and nothing else: never from the URL, the body or
a header of the client's choosing. A work token is honoured only while its attempt (or parse
job, or trigger batch) is running, with the same try number, owned by the supervisor that
claimed it; that database check is what makes "the attempt ended, so the token is dead" true.

Task routes split the check in two so that a request costs one database statement and at most
one trip to a worker thread: :func:`task_token` (an async dependency) verifies the token, which
for a token this worker has seen before is a dictionary look-up; the route then checks the
attempt *in the same statement or transaction* that does its work (:func:`check_attempt`), and
raises :class:`Denied` when it must refuse. Denials are audited after that transaction ends.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from fastapi import Depends, Request
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from starlette.concurrency import run_in_threadpool

from privsep.client import _surface as surface
from privsep.secrets.tokens import Claims, TokenRejected, verify_token
from privsep.server.db.models import (
    AttemptState,
    AuditLog,
    Operator,
    ParseJob,
    ParseJobState,
    Supervisor,
    Trigger,
    TriggerState,
    UsedJti,
)
from privsep.server.errors import ApiError, bad_request, forbidden, unauthorized
from privsep.server.metrics import REFUSALS
from privsep.server.routes._sql import affected
from privsep.server.state import ServerState

# Anything in a query string that looks like a JWT: tokens end up in logs and proxies there.
_JWT_SHAPE = re.compile(r"^[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]*$")
_TOKEN_PARAMS = frozenset({"access_token", "token", "jwt", "authorization", "bearer"})

# Each sandbox scope is one of the sandbox surface's (privsep.client._surface), whose rows say
# which routes take it.
TASK_SCOPES = frozenset({surface.TASK})
PARSE_SCOPES = frozenset({surface.PARSE})
TRIGGER_SCOPES = frozenset({surface.TRIGGER})
SUPERVISOR_SCOPES = frozenset({"supervisor"})
OPERATOR_SCOPES = frozenset({"operator"})

SESSION_GENERATION = "gen"
"""The claim of a supervisor or operator session token that names the key generation it was
opened under; a session whose generation is no longer the principal's is refused."""

EXECUTION = "execution"
"""The claim of a task token that names the execution of its attempt (``task_attempts.
execution``, moved on by every claim) it was issued for."""


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
    though the request that caused it fails. Every refusal passes here, so it is also where
    refusals are counted, by their reason code."""
    if event == "request_denied":
        REFUSALS.labels(str((detail or {}).get("code", "unknown"))).inc()
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


def token_in_request(request: Request) -> str:
    """The raw token from ``Authorization: Bearer``; a token in the URL is refused.

    Pure: raises the :class:`ApiError` to answer and leaves its audit record to the caller.
    """
    if request.scope.get("query_string"):
        for name, value in request.query_params.multi_items():
            if name.lower() in _TOKEN_PARAMS or _JWT_SHAPE.match(value):
                raise bad_request(
                    "token_in_url", "tokens are accepted only in the Authorization header"
                )
    return token_in_header(request.headers.get("authorization", ""))


def token_in_header(header: str) -> str:
    """The token in an ``Authorization`` header's value, or the :class:`ApiError` to answer."""
    scheme, _, value = header.partition(" ")
    if not header:
        raise unauthorized("missing_token", "no bearer token")
    if scheme.lower() != "bearer" or not value.strip():
        raise unauthorized("malformed", "expected an 'Authorization: Bearer <token>' header")
    return value.strip()


def bearer_token(request: Request) -> str:
    """The raw token from ``Authorization: Bearer``; a refusal is audited."""
    try:
        return token_in_request(request)
    except ApiError as error:
        raise _deny(get_state(request), request, error) from None


def verified_claims(request: Request, scopes: frozenset[str]) -> Claims:
    state = get_state(request)
    token = bearer_token(request)
    state.refresh_keys_if_stale()  # a key retired since the last look must not verify
    cached = state.token_cache.get(token, scopes, state.verifiers)
    if cached is not None:
        return cached
    return _verify(request, token, scopes)


def _check(state: ServerState, token: str, scopes: frozenset[str]) -> Claims:
    """Signature, issuer, audience, scope and times against the keys loaded now."""
    settings = state.settings
    return verify_token(
        token, state.verifiers, issuer=settings.issuer, audience=settings.audience, scopes=scopes
    )


def verify_silently(state: ServerState, token: str, scopes: frozenset[str]) -> Claims | None:
    """The token's claims if it verifies against the keys already loaded (and then cached),
    else ``None``: no key reload, no audit record, nothing that touches the database. For the
    fast path, which passes every doubtful request on to the route that does all of that."""
    if state.keys_stale():
        return None  # the route re-reads the key set (off the event loop) before trusting it
    cached = state.token_cache.get(token, scopes, state.verifiers)
    if cached is not None:
        return cached
    try:
        claims = _check(state, token, scopes)
    except TokenRejected:
        return None
    state.token_cache.put(token, claims)
    return claims


def _verify(request: Request, token: str, scopes: frozenset[str]) -> Claims:
    """The full check of a token the cache does not hold. It may read the published keys and
    write an audit record, so async callers run it in a worker thread."""
    state = get_state(request)
    try:
        claims = _check(state, token, scopes)
    except TokenRejected as exc:
        if exc.code == "unknown_key" and state.reload_verifiers():
            try:  # another replica may have rotated its key since we last looked
                claims = _check(state, token, scopes)
            except TokenRejected as again:
                raise _deny(state, request, unauthorized(again.code, again.message)) from None
        else:
            raise _deny(state, request, unauthorized(exc.code, exc.message)) from None
    state.token_cache.put(token, claims)
    return claims


async def verified_claims_async(request: Request, scopes: frozenset[str]) -> Claims:
    """:func:`verified_claims` for async dependencies. A token this worker has verified before
    costs a dictionary look-up on the event loop; whatever may touch the database (a first
    verification, a key reload, the audit record of a refusal) runs in a worker thread."""
    state = get_state(request)
    try:
        token = token_in_request(request)
    except ApiError as error:
        raise await run_in_threadpool(_deny, state, request, error) from None
    if state.keys_stale():
        await run_in_threadpool(state.refresh_keys_if_stale)
    cached = state.token_cache.get(token, scopes, state.verifiers)
    if cached is not None:
        return cached
    return await run_in_threadpool(_verify, request, token, scopes)


# --- principals ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SupervisorPrincipal:
    supervisor_id: str
    name: str
    generation: int


@dataclass(frozen=True)
class TaskPrincipal:
    attempt_id: str
    run_id: str
    workflow_id: str
    task_id: str
    try_number: int
    supervisor_id: str
    execution: int = 0


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


def registered_public_key(pem: str) -> Ed25519PublicKey:
    """The Ed25519 key a supervisor or operator is registered with (401 if it is another
    kind, which registration never stores)."""
    key = serialization.load_pem_public_key(pem.encode())
    if not isinstance(key, Ed25519PublicKey):
        raise unauthorized("unknown_key", "the registered key is not Ed25519")
    return key


def stamp_if_current(
    state: ServerState,
    model: type[Supervisor] | type[Operator],
    principal_id: str,
    generation: int,
    **stamp: datetime,
) -> bool:
    """Stamp the principal's row (its last session or heartbeat) only if it is still active
    under the key generation the assertion was checked against; False if it is not.

    A session is bound to that generation, and a revocation or a new key moves it on: a
    session opened while the principal was being revoked or re-keyed is refused here rather
    than at its first call."""
    with state.db.write_session() as session:
        current = affected(
            session,
            update(model)
            .where(
                model.id == principal_id,
                model.active.is_(True),
                model.key_generation == generation,
            )
            .values(**stamp),
        )
    return current > 0


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


async def _fetch(state: ServerState, sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    """One read statement on the read pool: on the event loop against SQLite (tens of
    microseconds), in a worker thread against PostgreSQL (a network round trip)."""
    if state.inline_reads is not None:
        return state.inline_reads.fetch(state.inline_reads.sql(sql), params)
    return await run_in_threadpool(state.reads.fetch, state.reads.sql(sql), params)


_SUPERVISOR_SQL = "SELECT s.name, s.active, s.key_generation FROM supervisors s WHERE s.id = :id"

_SESSION_ENDED = "this supervisor is unknown, revoked, or re-keyed since the session was opened"


async def active_supervisor(state: ServerState, claims: Claims) -> SupervisorPrincipal | None:
    """The supervisor of a session token, if it is registered, active, and still has the key
    generation the session was opened under (one statement; raises on a database error, such
    as a busy SQLite file). Read on every call, never cached: a revocation or a new key ends
    the session at its very next call, on every replica."""
    generation = _claim_int(claims, SESSION_GENERATION)
    rows = await _fetch(state, _SUPERVISOR_SQL, {"id": claims.sub})
    if not rows or not rows[0]["active"] or rows[0]["key_generation"] != generation:
        return None
    return SupervisorPrincipal(claims.sub, rows[0]["name"], generation)


async def supervisor_principal(request: Request) -> SupervisorPrincipal:
    """The calling supervisor, if its token verifies and it is still registered and active
    under the key its session was opened with. Async, one statement: every supervisor call
    (claims above all) pays for it."""
    state = get_state(request)
    claims = await verified_claims_async(request, SUPERVISOR_SCOPES)
    try:
        me = await active_supervisor(state, claims)
    except ApiError as error:  # a session token without its generation
        raise await run_in_threadpool(_deny, state, request, error, claims.sub) from None
    except Exception:  # a busy database on the loop: the full check, in a worker thread
        return await run_in_threadpool(_supervisor_principal_slow, request, claims)
    if me is None:
        raise await run_in_threadpool(
            _deny, state, request, unauthorized("revoked", _SESSION_ENDED), claims.sub
        )
    return me


def _supervisor_principal_slow(request: Request, claims: Claims) -> SupervisorPrincipal:
    state = get_state(request)
    generation = _claim_int(claims, SESSION_GENERATION)
    with state.db.read_session() as session:
        sup = session.get(Supervisor, claims.sub)
        if sup is None or not sup.active or sup.key_generation != generation:
            raise _deny(state, request, unauthorized("revoked", _SESSION_ENDED), claims.sub)
        return SupervisorPrincipal(sup.id, sup.name, generation)


@dataclass(frozen=True)
class TaskToken:
    """What a verified task token says, before the database is asked whether it still holds."""

    attempt_id: str
    try_number: int
    supervisor_id: str
    execution: int


def task_token_of(claims: Claims) -> TaskToken:
    return TaskToken(
        claims.sub,
        _claim_int(claims, "try"),
        _claim_str(claims, "sup"),
        _claim_int(claims, EXECUTION),
    )


async def task_token(request: Request) -> TaskToken:
    """The task token's claims. The attempt itself is checked by the route, in the statement
    or transaction that does the work (:func:`check_attempt`)."""
    return task_token_of(await verified_claims_async(request, TASK_SCOPES))


class Denied(Exception):
    """A refusal found inside a transaction, to be audited once that transaction is over.

    ``detail`` is what the ``request_denied`` audit record says besides the path; ``None``
    means the refusal is not a security event (a missing resource) and is not recorded.
    """

    def __init__(self, error: ApiError, subject: str | None, detail: dict[str, Any] | None) -> None:
        super().__init__(error.message)
        self.error = error
        self.subject = subject
        self.detail = detail

    def answer(self, state: ServerState, path: str) -> ApiError:
        """Write the audit record (outside any transaction) and return the error to raise."""
        if self.detail is not None:
            audit(
                state, "request_denied", subject=self.subject, detail={"path": path, **self.detail}
            )
        return self.error


def revoked(token: TaskToken, message: str) -> Denied:
    """401 ``revoked`` for this token's attempt, audited."""
    error = unauthorized("revoked", message)
    return Denied(error, token.attempt_id, {"code": error.code, "status": error.status})


# The columns ``check_attempt`` reads, which every task statement selects, with the attempt's
# workflow (``r``, the run, joined on ``a.run_id``) and whether its supervisor is still active
# (``s``, LEFT JOINed on ``a.supervisor_id``: see ATTEMPT_FROM).
ATTEMPT_COLUMNS = (
    "a.state, a.supervisor_id, a.try_number, a.execution, a.run_id, a.task_id, r.workflow_id, "
    "s.active AS supervisor_active"
)
ATTEMPT_COLUMN_COUNT = ATTEMPT_COLUMNS.count(",") + 1
ATTEMPT_FROM = (
    "FROM task_attempts a JOIN runs r ON r.id = a.run_id "
    "LEFT JOIN supervisors s ON s.id = a.supervisor_id"
)


def check_attempt(token: TaskToken, row: Mapping[str, Any] | None) -> TaskPrincipal:
    """The caller, if ``row`` (``ATTEMPT_COLUMNS`` of the token's attempt, by name, or
    ``None`` when there is no such attempt) says the attempt is running the very execution the
    token was issued for (same try, same claim), under the token's supervisor, which is still
    registered and active; otherwise :class:`Denied` (401 ``revoked``, audited)."""
    if row is None:
        raise revoked(token, "no such attempt")
    if (
        row["state"] != AttemptState.RUNNING
        or row["try_number"] != token.try_number
        or row["execution"] != token.execution
        or row["supervisor_id"] != token.supervisor_id
    ):
        raise revoked(token, "the attempt this token was issued for is no longer running")
    if not row["supervisor_active"]:
        raise revoked(token, "the supervisor this token was issued to has been revoked")
    return TaskPrincipal(
        token.attempt_id,
        row["run_id"],
        row["workflow_id"],
        row["task_id"],
        row["try_number"],
        token.supervisor_id,
        row["execution"],
    )


_ATTEMPT_SQL = f"SELECT {ATTEMPT_COLUMNS} {ATTEMPT_FROM} WHERE a.id = :attempt"


def load_task_principal(state: ServerState, token: TaskToken) -> TaskPrincipal:
    """The caller's attempt, checked in one read statement (raises :class:`Denied`)."""
    rows = state.reads.fetch(state.reads.sql(_ATTEMPT_SQL), {"attempt": token.attempt_id})
    return check_attempt(token, rows[0] if rows else None)


def task_principal(request: Request) -> TaskPrincipal:
    """A running attempt's principal as a (synchronous) dependency: the token and then the
    attempt, each audited when refused."""
    state = get_state(request)
    token = task_token_of(verified_claims(request, TASK_SCOPES))
    try:
        return load_task_principal(state, token)
    except Denied as denied:
        raise denied.answer(state, request.url.path) from None


_PARSE_JOB_SQL = (
    "SELECT j.state, j.supervisor_id, s.active AS supervisor_active FROM parse_jobs j "
    "LEFT JOIN supervisors s ON s.id = j.supervisor_id WHERE j.id = :id"
)


async def parse_principal(request: Request) -> ParsePrincipal:
    """The parse job of the token, if it is still running under the token's supervisor.
    Async, one statement (as :func:`supervisor_principal`)."""
    state = get_state(request)
    claims = await verified_claims_async(request, PARSE_SCOPES)
    me = parse_token_of(claims)
    try:
        rows = await _fetch(state, _PARSE_JOB_SQL, {"id": me.job_id})
    except Exception:  # a busy database on the loop: the full check, in a worker thread
        return await run_in_threadpool(_parse_principal_slow, request, claims, me.supervisor_id)
    job = rows[0] if rows else None
    if (
        job is None
        or job["state"] != ParseJobState.RUNNING
        or job["supervisor_id"] != me.supervisor_id
        or not job["supervisor_active"]
    ):
        raise await run_in_threadpool(_parse_revoked, state, request, me.job_id)
    return me


def parse_token_of(claims: Claims) -> ParsePrincipal:
    """What a verified parse token names: its job and the supervisor it was issued to (the
    job itself is checked against them by the caller)."""
    return ParsePrincipal(claims.sub, _claim_str(claims, "sup"))


def _parse_revoked(state: ServerState, request: Request, job_id: str) -> ApiError:
    return _deny(
        state,
        request,
        unauthorized("revoked", "the parse job this token was issued for is no longer running"),
        job_id,
    )


def _parse_principal_slow(request: Request, claims: Claims, sup: str) -> ParsePrincipal:
    state = get_state(request)
    with state.db.read_session() as session:
        job = session.get(ParseJob, claims.sub)
        owner = session.get(Supervisor, sup)
        if (
            job is None
            or job.state != ParseJobState.RUNNING
            or job.supervisor_id != sup
            or owner is None
            or not owner.active
        ):
            raise _parse_revoked(state, request, claims.sub)
        return ParsePrincipal(job.id, sup)


def trigger_principal(request: Request) -> TriggerPrincipal:
    state = get_state(request)
    claims = verified_claims(request, TRIGGER_SCOPES)
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


_OPERATOR_SQL = "SELECT o.name, o.active, o.key_generation FROM operators o WHERE o.id = :id"


def operator_principal(request: Request) -> OperatorPrincipal:
    """The calling operator, by the name it is registered under, if its session token verifies
    and the operator is still registered and active under the key the session was opened with
    (one read statement per call, never cached: a revocation ends the session at once)."""
    state = get_state(request)
    claims = verified_claims(request, OPERATOR_SCOPES)
    try:
        generation = _claim_int(claims, SESSION_GENERATION)
    except ApiError as error:
        raise _deny(state, request, error, claims.sub) from None
    rows = state.reads.fetch(state.reads.sql(_OPERATOR_SQL), {"id": claims.sub})
    if not rows or not rows[0]["active"] or rows[0]["key_generation"] != generation:
        raise _deny(
            state,
            request,
            unauthorized(
                "revoked", "this operator is unknown, revoked, or re-keyed since the session"
            ),
            claims.sub,
        )
    return OperatorPrincipal(rows[0]["name"])


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
TaskToken_ = Depends(task_token)
Parse_ = Depends(parse_principal)
Trigger_ = Depends(trigger_principal)
Operator_ = Depends(operator_principal)
State_ = Depends(get_state)
