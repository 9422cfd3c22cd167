"""Read-only views of the installation's health for an operator session: the registered
supervisors with their heartbeats, and the audit log's recent entries (its refusals above
all). They feed ``runner ui``; registering and revoking principals stays a server-host
command that works on the database directly, so nothing here changes anything.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter
from sqlalchemy import select

from privsep.server.auth import Operator_, OperatorPrincipal, State_
from privsep.server.db.models import AuditLog, Supervisor
from privsep.server.errors import ERROR_RESPONSES
from privsep.server.schemas import Open
from privsep.server.state import ServerState

router = APIRouter(prefix="/v1/operator", tags=["operator"], responses=ERROR_RESPONSES)

# Bounded like every listing: a typo'd limit must not make the server build a huge answer.
MAX_AUDIT_ENTRIES = 1000


class SupervisorStatus(Open):
    id: str
    name: str
    active: bool
    registered_at: str
    last_heartbeat_at: str | None
    revoked_at: str | None
    # What the supervisor's last heartbeat said of its discovery: None when it never said
    # (discovery is off there, or the supervisor predates the report).
    discovery_state: str | None
    discovery_error: str | None
    discovery_at: str | None


class SupervisorsResponse(Open):
    supervisors: list[SupervisorStatus]
    heartbeat_timeout: float


class AuditEntry(Open):
    id: int
    at: str
    event: str
    actor: str | None
    subject: str | None
    detail: dict[str, Any] | None


class AuditResponse(Open):
    entries: list[AuditEntry]


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


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
            supervisors=[
                SupervisorStatus(
                    id=s.id,
                    name=s.name,
                    active=s.active,
                    registered_at=s.registered_at.isoformat(),
                    last_heartbeat_at=_iso(s.last_heartbeat_at),
                    revoked_at=_iso(s.revoked_at),
                    discovery_state=s.discovery_state,
                    discovery_error=s.discovery_error,
                    discovery_at=_iso(s.discovery_at),
                )
                for s in rows
            ],
            heartbeat_timeout=state.settings.supervisor_heartbeat_timeout,
        )


@router.get("/audit", response_model=AuditResponse)
def list_audit(
    event: str | None = None,
    limit: int = 100,
    me: OperatorPrincipal = Operator_,
    state: ServerState = State_,
) -> AuditResponse:
    """The newest audit entries first, of one ``event`` (``request_denied`` for refusals)
    or of all."""
    query = select(AuditLog).order_by(AuditLog.id.desc())
    if event:
        query = query.where(AuditLog.event == event)
    query = query.limit(max(1, min(limit, MAX_AUDIT_ENTRIES)))
    with state.db.read_session() as session:
        return AuditResponse(
            entries=[
                AuditEntry(
                    id=e.id,
                    at=e.at.isoformat(),
                    event=e.event,
                    actor=e.actor,
                    subject=e.subject,
                    detail=e.detail,
                )
                for e in session.scalars(query)
            ]
        )
