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
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

from fastapi import APIRouter, Depends, Request

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


@dataclass(frozen=True)
class TaskCall:
    """What every task route takes: the request, the caller's task token and the server
    state, bundled because each route hands all three to :meth:`answer`."""

    request: Request
    token: TaskToken
    state: ServerState

    def answer(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``fn(...)``, with a :class:`Denied` refusal audited and raised as its API error."""
        try:
            return fn(*args, **kwargs)
        except Denied as denied:
            raise denied.answer(self.state, self.request.url.path) from None


async def task_call(
    request: Request, token: TaskToken = TaskToken_, state: ServerState = State_
) -> TaskCall:
    # async, so FastAPI resolves it on the event loop rather than in a worker thread
    return TaskCall(request, token, state)


Call_ = Depends(task_call)


def _failed(call: TaskCall, body: FailRequest, *, allow_retry: bool) -> AttemptStateResponse:
    """End the attempt as failed: ``fail`` and ``retry`` are one service call that differ
    only in whether the task's retries may queue a new try."""
    ended = call.answer(
        attempts.finish_failure, call.state, call.token, body.error, allow_retry=allow_retry
    )
    return AttemptStateResponse(state=ended.value)


@sandbox_route(router, "task.context")
def context(call: TaskCall = Call_) -> TaskContext:
    return call.answer(attempts.read_context, call.state.reads, call.token)


@sandbox_route(router, "task.heartbeat")
def heartbeat(call: TaskCall = Call_) -> Ok:
    call.answer(attempts.beat, call.state, call.token)
    return Ok()


@sandbox_route(router, "task.succeed")
def succeed(body: SucceedRequest, call: TaskCall = Call_) -> AttemptStateResponse:
    call.answer(attempts.finish_success, call.state, call.token, body.return_value)
    return AttemptStateResponse(state=AttemptState.SUCCESS.value)


@sandbox_route(router, "task.fail")
def fail(body: FailRequest, call: TaskCall = Call_) -> AttemptStateResponse:
    """Fail for good: no retry, whatever the task's retries say."""
    return _failed(call, body, allow_retry=False)


@sandbox_route(router, "task.retry")
def retry(body: FailRequest, call: TaskCall = Call_) -> AttemptStateResponse:
    """Fail this try; a new try is queued if the task has retries left."""
    return _failed(call, body, allow_retry=True)


@sandbox_route(router, "task.defer")
def defer(body: DeferRequest, call: TaskCall = Call_) -> AttemptStateResponse:
    """Park the attempt on a trigger; it is queued again (same try) when the trigger fires."""
    parked = call.answer(attempts.defer, call.state, call.token, body.trigger, body.timeout)
    return AttemptStateResponse(state=parked.value)


@sandbox_route(router, "task.variable")
def get_variable(key: str, call: TaskCall = Call_) -> VariableResponse:
    value = call.answer(attempts.read_variable, call.state.reads, call.token, key)
    return VariableResponse(key=key, value=value)


@sandbox_route(router, "task.set_variable")
def set_variable(key: str, body: VariableBody, call: TaskCall = Call_) -> Ok:
    call.answer(attempts.set_variable, call.state, call.token, key, body.value)
    return Ok()


@sandbox_route(router, "task.delete_variable")
def delete_variable(key: str, call: TaskCall = Call_) -> Ok:
    call.answer(attempts.delete_variable, call.state, call.token, key)
    return Ok()


@sandbox_route(router, "task.connection")
def get_connection(conn_id: str, call: TaskCall = Call_) -> ConnectionResponse:
    found = call.answer(attempts.read_connection, call.state.reads, call.token, conn_id)
    cipher = call.state.cipher
    secrets = ("password_encrypted", "extra_encrypted")
    if cipher is None and any(found[name] for name in secrets):
        raise conflict("the server has no Fernet key configured", "no_fernet_key")

    def reveal(value: str | None) -> str | None:
        return cipher.decrypt(value) if (value and cipher) else value

    fields = {name: value for name, value in found.items() if name not in secrets}
    password, extra = (reveal(found[name]) for name in secrets)
    return ConnectionResponse.model_validate({**fields, "password": password, "extra": extra})


@sandbox_route(router, "task.push_xcom")
def push_xcom(key: str, body: XComBody, call: TaskCall = Call_) -> Ok:
    """Write an XCom of this task in this run; there is no way to name another task."""
    call.answer(attempts.push_xcom, call.state, call.token, key, body.value)
    return Ok()


@sandbox_route(router, "task.pull_xcom")
def pull_xcom(task_id: str, key: str, call: TaskCall = Call_) -> XComResponse:
    """Read an XCom of any task, but only within the caller's own run."""
    value = call.answer(attempts.read_xcom, call.state.reads, call.token, task_id, key)
    return XComResponse(task_id=task_id, key=key, value=value)
