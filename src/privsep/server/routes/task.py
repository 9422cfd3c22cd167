"""Task endpoints: thin adapters over :mod:`privsep.server.services.attempts`.

Each route is declared from its row of the sandbox surface (:func:`sandbox_route`). The token
is checked by :func:`~privsep.server.auth.task_token`, an async dependency (a dictionary
look-up for a token this worker verified before); the attempt and its grants are checked by
the service, in the statement or transaction that does the work, and a refusal is audited
here once that transaction is over. :mod:`privsep.server.fastpath` serves the hottest of these
rows without FastAPI, through the very same service functions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ParamSpec, TypeVar

from fastapi import APIRouter, Request

from privsep.server.auth import Denied, State_, TaskToken, TaskToken_
from privsep.server.db.models import AttemptState
from privsep.server.errors import ERROR_RESPONSES, conflict
from privsep.server.routes._surface import sandbox_route
from privsep.server.schemas import (
    AttemptStateResponse,
    ConnectionResponse,
    DeferRequest,
    FailRequest,
    Ok,
    SucceedRequest,
    TaskContext,
    VariableBody,
    VariableResponse,
    XComBody,
    XComResponse,
)
from privsep.server.services import attempts
from privsep.server.state import ServerState

router = APIRouter(prefix="/v1/task", tags=["task"], responses=ERROR_RESPONSES)

P = ParamSpec("P")
T = TypeVar("T")


def answering(
    request: Request, state: ServerState, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs
) -> T:
    """``fn(...)``, with a :class:`Denied` refusal audited and raised as its API error."""
    try:
        return fn(*args, **kwargs)
    except Denied as denied:
        raise denied.answer(state, request.url.path) from None


@sandbox_route(router, "task.context")
def context(
    request: Request, token: TaskToken = TaskToken_, state: ServerState = State_
) -> TaskContext:
    return answering(request, state, attempts.read_context, state.reads, token)


@sandbox_route(router, "task.heartbeat")
def heartbeat(request: Request, token: TaskToken = TaskToken_, state: ServerState = State_) -> Ok:
    answering(request, state, attempts.beat, state, token)
    return Ok()


@sandbox_route(router, "task.succeed")
def succeed(
    body: SucceedRequest,
    request: Request,
    token: TaskToken = TaskToken_,
    state: ServerState = State_,
) -> AttemptStateResponse:
    answering(request, state, attempts.finish_success, state, token, body.return_value)
    return AttemptStateResponse(state=AttemptState.SUCCESS.value)


@sandbox_route(router, "task.fail")
def fail(
    body: FailRequest, request: Request, token: TaskToken = TaskToken_, state: ServerState = State_
) -> AttemptStateResponse:
    """Fail for good: no retry, whatever the task's retries say."""
    ended = answering(
        request, state, attempts.finish_failure, state, token, body.error, allow_retry=False
    )
    return AttemptStateResponse(state=ended.value)


@sandbox_route(router, "task.retry")
def retry(
    body: FailRequest, request: Request, token: TaskToken = TaskToken_, state: ServerState = State_
) -> AttemptStateResponse:
    """Fail this try; a new try is queued if the task has retries left."""
    ended = answering(
        request, state, attempts.finish_failure, state, token, body.error, allow_retry=True
    )
    return AttemptStateResponse(state=ended.value)


@sandbox_route(router, "task.defer")
def defer(
    body: DeferRequest, request: Request, token: TaskToken = TaskToken_, state: ServerState = State_
) -> AttemptStateResponse:
    """Park the attempt on a trigger; it is queued again (same try) when the trigger fires."""
    parked = answering(request, state, attempts.defer, state, token, body.trigger, body.timeout)
    return AttemptStateResponse(state=parked.value)


@sandbox_route(router, "task.variable")
def get_variable(
    key: str, request: Request, token: TaskToken = TaskToken_, state: ServerState = State_
) -> VariableResponse:
    value = answering(request, state, attempts.read_variable, state.reads, token, key)
    return VariableResponse(key=key, value=value)


@sandbox_route(router, "task.set_variable")
def set_variable(
    key: str,
    body: VariableBody,
    request: Request,
    token: TaskToken = TaskToken_,
    state: ServerState = State_,
) -> Ok:
    answering(request, state, attempts.set_variable, state, token, key, body.value)
    return Ok()


@sandbox_route(router, "task.delete_variable")
def delete_variable(
    key: str, request: Request, token: TaskToken = TaskToken_, state: ServerState = State_
) -> Ok:
    answering(request, state, attempts.delete_variable, state, token, key)
    return Ok()


@sandbox_route(router, "task.connection")
def get_connection(
    conn_id: str, request: Request, token: TaskToken = TaskToken_, state: ServerState = State_
) -> ConnectionResponse:
    found = answering(request, state, attempts.read_connection, state.reads, token, conn_id)
    cipher = state.cipher
    secrets = ("password_encrypted", "extra_encrypted")
    if cipher is None and any(found[name] for name in secrets):
        raise conflict("the server has no Fernet key configured", "no_fernet_key")

    def reveal(value: str | None) -> str | None:
        return cipher.decrypt(value) if (value and cipher) else value

    fields = {name: value for name, value in found.items() if name not in secrets}
    password, extra = (reveal(found[name]) for name in secrets)
    return ConnectionResponse.model_validate({**fields, "password": password, "extra": extra})


@sandbox_route(router, "task.push_xcom")
def push_xcom(
    key: str,
    body: XComBody,
    request: Request,
    token: TaskToken = TaskToken_,
    state: ServerState = State_,
) -> Ok:
    """Write an XCom of this task in this run; there is no way to name another task."""
    answering(request, state, attempts.push_xcom, state, token, key, body.value)
    return Ok()


@sandbox_route(router, "task.pull_xcom")
def pull_xcom(
    task_id: str,
    key: str,
    request: Request,
    token: TaskToken = TaskToken_,
    state: ServerState = State_,
) -> XComResponse:
    """Read an XCom of any task, but only within the caller's own run."""
    value = answering(request, state, attempts.read_xcom, state.reads, token, task_id, key)
    return XComResponse(task_id=task_id, key=key, value=value)
