"""The internal API as a FastAPI application: routers, error handlers, the body cap, and the
fast path for the hottest task reads (:mod:`privsep.server.fastpath`).

:func:`create_app` takes a built :class:`ServerState`, so tests and benchmarks run the very
same app in-process against a real database.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Literal

from fastapi import APIRouter, FastAPI, Request, Response
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from privsep import __version__
from privsep.secrets.keyring import jwks_of
from privsep.server.auth import State_, operator_principal
from privsep.server.body_limit import BodyLimitMiddleware
from privsep.server.db.models import Supervisor, utcnow
from privsep.server.db.outage import unavailable
from privsep.server.errors import ERROR_RESPONSES, UNAVAILABLE_HEADERS, install_error_handlers
from privsep.server.fastpath import TaskFastPath
from privsep.server.metrics import Metered
from privsep.server.routes import (
    logs,
    observability,
    operator,
    operator_session,
    parse_trigger,
    status,
    supervisor,
    task,
)
from privsep.server.schemas import HealthResponse, SupervisorHealth
from privsep.server.state import ServerState

health_router = APIRouter(prefix="/v1", tags=["health"])


# Unset, not None: the short answer leaves the detail fields out; a supervisor without a
# heartbeat yet still says ``"heartbeat_age_seconds": null``.
@health_router.get(
    "/health",
    response_model=HealthResponse,
    response_model_exclude_unset=True,
    responses={
        400: ERROR_RESPONSES[400],
        401: ERROR_RESPONSES[401],
        503: {"model": HealthResponse, "description": "The database is unreachable"},
    },
)
def health(request: Request, response: Response, state: ServerState = State_) -> HealthResponse:
    """Whether the server is up and which deployment it is (``instance``), for anyone. With
    an operator session (``Authorization: Bearer``), also the database's reachability and each
    supervisor's heartbeat age: who is registered is not for an unauthenticated prober. A
    token that is sent must verify (401 otherwise), so an operator never mistakes the short
    answer for "no supervisors"."""
    detailed = "authorization" in request.headers
    if detailed:
        operator_principal(request)
    supervisors: list[SupervisorHealth] = []
    try:
        with state.db.read_session() as session:
            session.execute(text("SELECT 1"))
            if detailed:
                supervisors = _supervisor_health(session, state)
        database = "ok"
    except Exception as exc:  # any database failure is "unreachable" to a prober
        if unavailable(exc):
            state.db.incidents.failed(exc, "GET /v1/health")
        database = "unreachable"
    ok = database == "ok"
    if not ok:
        response.status_code = 503
        response.headers.update(UNAVAILABLE_HEADERS)
    status: Literal["ok", "degraded"] = "ok" if ok else "degraded"
    if not detailed:
        return HealthResponse(status=status, instance=state.keys.ring)
    return HealthResponse(
        status=status,
        instance=state.keys.ring,
        database=database,  # type: ignore[arg-type]
        supervisors=supervisors,
    )


def _supervisor_health(session: Session, state: ServerState) -> list[SupervisorHealth]:
    limit = timedelta(seconds=state.settings.supervisor_heartbeat_timeout)
    now = utcnow()
    out = []
    for sup in session.scalars(
        select(Supervisor).where(Supervisor.active.is_(True)).order_by(Supervisor.name)
    ):
        age = (now - sup.last_heartbeat_at) if sup.last_heartbeat_at else None
        out.append(
            SupervisorHealth(
                name=sup.name,
                heartbeat_age_seconds=age.total_seconds() if age else None,
                healthy=age is not None and age <= limit,
            )
        )
    return out


@health_router.get("/jwks")
def jwks(state: ServerState = State_) -> dict[str, object]:
    """Public keys that verify tokens from any replica (RFC 8037 OKP keys); never a retired
    one (the key set is re-read first when it is older than ``signing_keys_refresh``)."""
    state.refresh_keys_if_stale()
    return jwks_of(state.verifiers)


ROUTERS: tuple[APIRouter, ...] = (
    health_router,
    supervisor.router,
    task.router,
    parse_trigger.parse_router,
    parse_trigger.trigger_router,
    operator_session.router,
    operator.router,
    observability.router,
    status.router,
    logs.supervisor_router,
    logs.operator_router,
)


def _routed() -> FastAPI:
    """The application's routes and metadata, without state or middleware: all the OpenAPI
    document needs. The document is served to operator sessions only
    (``GET /v1/operator/openapi.json``), so FastAPI's own unauthenticated ``/openapi.json``
    and ``/docs`` are off."""
    app = FastAPI(
        title="privsep internal API",
        version=__version__,
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    for router in ROUTERS:
        app.include_router(router)
    return app


def openapi_document() -> dict[str, Any]:
    """The OpenAPI document, offline: no database, no keys, no server."""
    document: dict[str, Any] = _routed().openapi()
    return document


def create_app(state: ServerState, *, fast_path: bool = True) -> FastAPI:
    """The FastAPI application. With ``fast_path`` (the default, what tests and embedders
    get) the task fast path and the request metrics are its outermost middlewares;
    :func:`serving_app` puts them in front of the application instead."""
    app = _routed()
    app.state.privsep = state
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=state.settings.max_request_bytes)
    if fast_path:
        # Outermost (added last): answers the hottest task reads itself and passes everything
        # else on, bodies included, so the body cap above still sees every request it must.
        app.add_middleware(TaskFastPath, state=state)
        app.add_middleware(Metered)  # around the fast path too, so its answers are timed
    return app


def serving_app(state: ServerState) -> Metered:
    """What ``runner server`` runs: the request metrics and the task fast path in front of
    the FastAPI application.

    The same middlewares as inside :func:`create_app`, one step further out: a request the
    fast path answers skips FastAPI's own entry (its telemetry check, the error middleware),
    about a quarter of the fast path's cost. Everything else reaches the application
    unchanged.
    """
    return Metered(TaskFastPath(create_app(state, fast_path=False), state))
