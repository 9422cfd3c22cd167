"""Read-only views of the installation's health for an operator session: the registered
supervisors with their heartbeats, and the audit log's recent entries (its refusals above
all). They feed ``runner ui``; registering and revoking principals stays a server-host
command that works on the database directly, so nothing here changes anything.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import ConfigDict
from sqlalchemy import select

from privsep.server.auth import Operator_, OperatorPrincipal, State_
from privsep.server.db.models import AuditLog, Supervisor
from privsep.server.errors import ERROR_RESPONSES
from privsep.server.schemas import Open
from privsep.server.state import ServerState

router = APIRouter(prefix="/v1/operator", tags=["operator"], responses=ERROR_RESPONSES)

# Bounded like every listing: a huge limit is refused (422), not built.
MAX_AUDIT_ENTRIES = 1000


class _FromRow(Open):
    """A response read straight from a row's attributes (timestamps as ISO 8601)."""

    model_config = ConfigDict(extra="forbid", frozen=True, from_attributes=True)


class SupervisorStatus(_FromRow):
    id: str
    name: str
    active: bool
    registered_at: datetime
    last_heartbeat_at: datetime | None
    revoked_at: datetime | None
    # What the supervisor's last heartbeat said of its discovery: None when it never said
    # (it predates the report, or has not scanned yet).
    discovery_state: str | None
    discovery_error: str | None
    discovery_at: datetime | None


class SupervisorsResponse(Open):
    supervisors: list[SupervisorStatus]
    heartbeat_timeout: float


class AuditEntry(_FromRow):
    id: int
    at: datetime
    event: str
    actor: str | None
    subject: str | None
    detail: dict[str, Any] | None


class AuditResponse(Open):
    entries: list[AuditEntry]


@router.get("/supervisors", response_model=SupervisorsResponse)
def list_supervisors(
    me: OperatorPrincipal = Operator_, state: ServerState = State_
) -> SupervisorsResponse:
    """Every registered supervisor, revoked ones too, by name; ``heartbeat_timeout`` is the
    age after which the server takes a supervisor's work back, so a reader can tell a stale
    heartbeat from a fresh one by the server's own measure."""
    with state.db.read_session() as session:
        rows = session.scalars(select(Supervisor).order_by(Supervisor.name))
        return SupervisorsResponse(
            supervisors=[SupervisorStatus.model_validate(row) for row in rows],
            heartbeat_timeout=state.settings.supervisor_heartbeat_timeout,
        )


@router.get("/audit", response_model=AuditResponse)
def list_audit(
    me: OperatorPrincipal = Operator_,
    state: ServerState = State_,
    event: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_AUDIT_ENTRIES)] = 100,
) -> AuditResponse:
    """The newest audit entries first, of one ``event`` (``request_denied`` for refusals)
    or of all."""
    query = select(AuditLog).order_by(AuditLog.id.desc())
    if event:
        query = query.where(AuditLog.event == event)
    query = query.limit(limit)
    with state.db.read_session() as session:
        return AuditResponse(entries=[AuditEntry.model_validate(e) for e in session.scalars(query)])
