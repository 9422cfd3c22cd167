"""Parse and trigger endpoints: each token touches only its own job or its own triggers.

Each route is declared from its row of the sandbox surface (:func:`sandbox_route`); a parse
result is stored by :mod:`privsep.server.services.parse_results`, which the fast path calls
too."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends, Request
from sqlalchemy import select
from sqlalchemy.orm import Session

from privsep.server.auth import (
    Parse_,
    ParsePrincipal,
    State_,
    Trigger_,
    TriggerPrincipal,
    require_trigger,
)
from privsep.server.db.models import AttemptState, TaskAttempt, Trigger, TriggerState, utcnow
from privsep.server.errors import ERROR_RESPONSES, conflict
from privsep.server.routes._surface import sandbox_route
from privsep.server.runs import fail_or_retry
from privsep.server.schemas import (
    AssignedTrigger,
    AssignedTriggers,
    Ok,
    ParseResultRequest,
    TriggerEventRequest,
    TriggerFailureRequest,
)
from privsep.server.services import parse_results
from privsep.server.state import ServerState

parse_router = APIRouter(prefix="/v1/parse", tags=["parse"], responses=ERROR_RESPONSES)
trigger_router = APIRouter(prefix="/v1/trigger", tags=["trigger"], responses=ERROR_RESPONSES)


@sandbox_route(parse_router, "parse.result")
def submit_result(
    body: ParseResultRequest, me: ParsePrincipal = Parse_, state: ServerState = State_
) -> Ok:
    """Store what the parse sandbox found in its one file: definitions, or an import error."""
    parse_results.store_result(state, me, body)
    return Ok()


@sandbox_route(trigger_router, "trigger.assigned")
def assigned(me: TriggerPrincipal = Trigger_, state: ServerState = State_) -> AssignedTriggers:
    with state.db.read_session() as session:
        rows = session.scalars(select(Trigger).where(Trigger.id.in_(me.trigger_ids)))
        return AssignedTriggers(
            triggers=[
                AssignedTrigger(
                    id=t.id,
                    module=str(t.serialized.get("module", "")),
                    qualname=str(t.serialized.get("qualname", "")),
                    kwargs=dict(t.serialized.get("kwargs", {})),
                )
                for t in rows
            ]
        )


@dataclass(frozen=True)
class TriggerCall:
    """What a route that ends a trigger takes: the request, the caller's trigger token and
    the server state, all three needed by :meth:`end`."""

    request: Request
    me: TriggerPrincipal
    state: ServerState

    def end(
        self,
        trigger_id: str,
        to: TriggerState,
        then: Callable[[Session, TaskAttempt], None],
        event: dict[str, Any] | None = None,
    ) -> Ok:
        """Move the trigger to ``to`` (with its ``event``, if any) and call ``then(session,
        its attempt)`` if that attempt is still deferred, in one transaction that holds the
        trigger locked, once the token is known to name it and it is still running under the
        token's supervisor."""
        require_trigger(self.me, trigger_id, self.request)
        with self.state.db.write_session() as session:
            trigger = session.get(Trigger, trigger_id, with_for_update=True)
            if (
                trigger is None
                or trigger.state != TriggerState.RUNNING
                or trigger.supervisor_id != self.me.supervisor_id
            ):
                raise conflict("this trigger is no longer running", "not_running")
            trigger.finished_at = utcnow()
            attempt = session.get(TaskAttempt, trigger.attempt_id)
            trigger.state = to
            if event is not None:
                trigger.event = event
            if attempt and attempt.state == AttemptState.DEFERRED:
                then(session, attempt)
        return Ok()


async def trigger_call(
    request: Request, me: TriggerPrincipal = Trigger_, state: ServerState = State_
) -> TriggerCall:
    # async, so FastAPI resolves it on the event loop rather than in a worker thread
    return TriggerCall(request, me, state)


TriggerCall_ = Depends(trigger_call)


@sandbox_route(trigger_router, "trigger.event")
def fire(trigger_id: str, body: TriggerEventRequest, call: TriggerCall = TriggerCall_) -> Ok:
    """The trigger fired: resume its deferred attempt (same try, queued again)."""

    def resume(session: Session, attempt: TaskAttempt) -> None:
        attempt.state = AttemptState.QUEUED
        attempt.trigger_event = {"payload": body.payload}
        attempt.next_try_at = None

    return call.end(trigger_id, TriggerState.FIRED, resume, event={"payload": body.payload})


@sandbox_route(trigger_router, "trigger.failure")
def trigger_failed(
    trigger_id: str, body: TriggerFailureRequest, call: TriggerCall = TriggerCall_
) -> Ok:
    """The trigger raised: its deferred attempt fails (or retries, per the task)."""

    def fail(session: Session, attempt: TaskAttempt) -> None:
        fail_or_retry(session, attempt, f"trigger failed: {body.error}")

    return call.end(trigger_id, TriggerState.FAILED, fail)
