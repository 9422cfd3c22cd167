"""The internal API as a FastAPI application: routers, error handlers, the body cap, and the
fast path for the hottest task reads (:mod:`privsep.server.fastpath`).

:func:`create_app` takes a built :class:`ServerState`, so tests and benchmarks run the very
same app in-process against a real database.
"""

from __future__ import annotations

from datetime import timedelta

from fastapi import APIRouter, FastAPI, Response
from sqlalchemy import select, text

from privsep import __version__
from privsep.secrets.keyring import jwks_of
from privsep.server.auth import State_
from privsep.server.body_limit import BodyLimitMiddleware
from privsep.server.db.models import Supervisor, utcnow
from privsep.server.db.outage import unavailable
from privsep.server.errors import UNAVAILABLE_HEADERS, install_error_handlers
from privsep.server.fastpath import TaskFastPath
from privsep.server.routes import operator, operator_session, parse_trigger, supervisor, task
from privsep.server.schemas import HealthResponse, SupervisorHealth
from privsep.server.state import ServerState

health_router = APIRouter(prefix="/v1", tags=["health"])


@health_router.get("/health", response_model=HealthResponse)
def health(response: Response, state: ServerState = State_) -> HealthResponse:
    """No authentication: the database's reachability and each supervisor's heartbeat age."""
    limit = timedelta(seconds=state.settings.supervisor_heartbeat_timeout)
    now = utcnow()
    supervisors: list[SupervisorHealth] = []
    try:
        with state.db.read_session() as session:
            session.execute(text("SELECT 1"))
            for sup in session.scalars(
                select(Supervisor).where(Supervisor.active.is_(True)).order_by(Supervisor.name)
            ):
                age = (now - sup.last_heartbeat_at) if sup.last_heartbeat_at else None
                supervisors.append(
                    SupervisorHealth(
                        name=sup.name,
                        heartbeat_age_seconds=age.total_seconds() if age else None,
                        healthy=age is not None and age <= limit,
                    )
                )
        database = "ok"
    except Exception as exc:  # any database failure is "unreachable" to a prober
        if unavailable(exc):
            state.db.incidents.failed(exc, "GET /v1/health")
        database = "unreachable"
    ok = database == "ok"
    if not ok:
        response.status_code = 503
        response.headers.update(UNAVAILABLE_HEADERS)
    return HealthResponse(
        status="ok" if ok else "degraded",
        database=database,  # type: ignore[arg-type]
        supervisors=supervisors,
    )


@health_router.get("/jwks")
def jwks(state: ServerState = State_) -> dict[str, object]:
    """Public keys that verify tokens from any replica (RFC 8037 OKP keys)."""
    return jwks_of(state.verifiers)


def create_app(state: ServerState, *, fast_path: bool = True) -> FastAPI:
    """The FastAPI application. With ``fast_path`` (the default, what tests and embedders
    get) the task fast path is its outermost middleware; :func:`serving_app` puts it in front
    of the application instead."""
    app = FastAPI(
        title="privsep internal API",
        version=__version__,
        openapi_url="/v1/openapi.json",
        docs_url=None,
        redoc_url=None,
    )
    app.state.privsep = state
    install_error_handlers(app)
    for router in (
        health_router,
        supervisor.router,
        task.router,
        parse_trigger.parse_router,
        parse_trigger.trigger_router,
        operator_session.router,
        operator.router,
    ):
        app.include_router(router)
    app.add_middleware(BodyLimitMiddleware, max_bytes=state.settings.max_request_bytes)
    if fast_path:
        # Outermost (added last): answers the hottest task reads itself and passes everything
        # else on, bodies included, so the body cap above still sees every request it must.
        app.add_middleware(TaskFastPath, state=state)
    return app


def serving_app(state: ServerState) -> TaskFastPath:
    """What ``runner server`` runs: the task fast path in front of the FastAPI application.

    The same middleware as inside :func:`create_app`, one step further out: a request it
    answers skips FastAPI's own entry (its telemetry check, the error middleware), about a
    quarter of the fast path's cost. Everything else reaches the application unchanged.
    """
    return TaskFastPath(create_app(state, fast_path=False), state)
