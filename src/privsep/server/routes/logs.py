"""The central logs' two routes: a supervisor ships its sandboxes' output, an operator reads it.

``POST /v1/supervisor/logs`` takes chunks of several items in one request (a supervisor ships
every running sandbox's output together, never a request per line);
``GET /v1/operator/attempts/{attempt_id}/log`` pages through one item's log by ``seq``. The
rules (who may append, what is stored once) are in :mod:`privsep.server.services.logs`.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from privsep.server.auth import (
    Operator_,
    OperatorPrincipal,
    State_,
    Supervisor_,
    SupervisorPrincipal,
)
from privsep.server.errors import ERROR_RESPONSES
from privsep.server.schemas import LogAppendRequest, LogAppendResponse, LogResponse
from privsep.server.services import logs
from privsep.server.state import ServerState

supervisor_router = APIRouter(
    prefix="/v1/supervisor", tags=["supervisor"], responses=ERROR_RESPONSES
)
operator_router = APIRouter(prefix="/v1/operator", tags=["operator"], responses=ERROR_RESPONSES)


@supervisor_router.post("/logs", response_model=LogAppendResponse)
def append_logs(
    body: LogAppendRequest, me: SupervisorPrincipal = Supervisor_, state: ServerState = State_
) -> LogAppendResponse:
    """Store what the supervisor's sandboxes wrote. Each chunk starts at a byte offset of its
    node-local file; the answer says, per chunk, how much of that file the server now holds,
    so a repeated chunk is acknowledged without being stored twice. All or nothing: 403
    ``not_owner`` when one chunk is for an item this supervisor never held, or for a stream
    another supervisor writes."""
    return LogAppendResponse(acks=logs.append_chunks(state, me, body.chunks))


@operator_router.get("/attempts/{attempt_id}/log", response_model=LogResponse)
def attempt_log(
    attempt_id: str,
    after: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
    me: OperatorPrincipal = Operator_,
    state: ServerState = State_,
) -> LogResponse:
    """An attempt's (or a parse job's, or a trigger batch's) log after chunk ``after``:
    poll again with ``after=next`` until ``complete``. 404 when the server knows neither
    the item nor a log of it."""
    return logs.read_log(state, attempt_id, after, limit)
